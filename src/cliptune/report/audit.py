"""The near-duplicate audit as one self-contained HTML page: counts, then each pair's thumbnails side by side.

Built as a :class:`~cliptune.report.document.Document` and rendered by the one HTML renderer, so the page
looks like ``report.html`` and inlines its thumbnails the same way (base64 JPEG, no external file).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from cliptune.report.document import Document, Grid, GridRow, Paragraph, Section, Table, Tile
from cliptune.report.grids import thumbnail
from cliptune.report.html import render_html

__all__ = ["FINDINGS", "audit_html"]

FINDINGS = {
    "leak": "crosses splits (a leak: the held-out copy is not held out)",
    "same_split": "two groups of one split (the picture weighs double)",
    "same_group": "inside one declared group (harmless)",
}
_FLAG = {"leak": "red", "same_split": "yellow", "same_group": "none"}


def audit_html(
    table: pd.DataFrame,
    image_path: Callable[[str], Path],
    title: str,
    notes: list[str],
    max_pairs: int = 300,
) -> str:
    """The audit page for a table from :func:`cliptune.data.audit.audit_table`.

    Args:
        table: One row per pair (leaks first).
        image_path: ``file_name`` -> image file, for the thumbnails.
        title: The page's title (names the catalogue).
        notes: Lines said under the counts (thresholds, where the splits came from).
        max_pairs: Pairs shown with thumbnails per finding; the CSV lists them all.

    Returns:
        The page as HTML text.
    """
    counts = [
        [finding, *(str(int(((table["finding"] == finding) & (table["kind"] == k)).sum())) for k in _KINDS)]
        for finding in FINDINGS
    ]
    summary = Section("summary", "Summary", [Table(["finding", *_KINDS], counts, caption="pairs found")])
    summary.blocks += [Paragraph(line) for line in notes]
    doc = Document(
        title, f"{len(table)} pair(s); leaks cross splits and flatter every held-out metric.", [summary]
    )
    for finding, meaning in FINDINGS.items():
        part = table[table["finding"] == finding]
        if part.empty:
            continue
        rows = [_row(r, image_path) for r in part.head(max_pairs).to_dict("records")]
        more = f" (first {max_pairs} of {len(part)}; audit.csv lists all)" if len(part) > max_pairs else ""
        grid = Grid(finding, f"{len(part)} pair(s) {meaning}{more}", rows, legend=())
        doc.sections.append(Section(finding, finding.replace("_", " "), [grid]))
    return render_html(doc)


_KINDS = ("exact", "near", "embedding")


def _row(r: dict[str, Any], image_path: Callable[[str], Path]) -> GridRow:
    kind, score = str(r["kind"]), float(r["score"])
    what = f"cosine {score:.3f}" if kind == "embedding" else f"{score:.0f} bits apart"
    mirrored = ", mirrored" if bool(r["mirrored"]) else ""
    flag = _FLAG[str(r["finding"])]
    tiles = []
    for side in ("a", "b"):
        name = str(r[f"file_{side}"])
        image, note = thumbnail(image_path(name))
        label = f"{name} ({r[f'split_{side}']}, {r[f'group_{side}']})"
        tiles.append(Tile(label, image, flag, note=note))
    return GridRow(f"{kind}{mirrored}", what, tiles)
