"""Retrieval grids: a query and its top results as 96 px thumbnails with coloured borders.

Numbers say how often a model is wrong; grids show how. Thumbnails are JPEG, base64-inlined, so the
report stays one self-contained file. Images are found through the catalogue the eval/suite JSON names
(else the run's config.yaml); an image that cannot be read becomes a tile that says why, never a gap.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cliptune.report.document import Grid, GridRow, Tile

__all__ = ["ImageResolver", "thumbnail", "retrieval_grid", "suite_grid", "triplet_grid", "query_rows"]

THUMB_PX = 96
_JPEG_QUALITY = 80


class ImageResolver:
    """Maps catalogue ``file_name`` values to thumbnails (memoised), honouring ``catalogue.json`` pointers."""

    def __init__(self, catalogue: Path | str | None) -> None:
        self.root = Path(catalogue) if catalogue else None
        self._image_root: Path | None = None
        self._cache: dict[str, tuple[str | None, str]] = {}

    def path(self, file_name: str) -> Path | None:
        """The image file of ``file_name``, or None when no catalogue is known."""
        if self.root is None:
            return None
        if self._image_root is None:
            self._image_root = self.root
            pointer = self.root / "catalogue.json"
            if pointer.is_file():
                from cliptune.data.catalogue import image_root

                self._image_root = image_root(self.root)  # the images only: no caption column needed
        return self._image_root / file_name

    def thumb(self, file_name: str) -> tuple[str | None, str]:
        """``(base64 JPEG or None, note)`` for an image id; the note explains a missing thumbnail."""
        if file_name not in self._cache:
            path = self.path(file_name)
            self._cache[file_name] = (None, "no catalogue to find it in") if path is None else thumbnail(path)
        return self._cache[file_name]


def thumbnail(path: Path, size: int = THUMB_PX) -> tuple[str | None, str]:
    """A ``size`` px (longest side) JPEG thumbnail as base64, or ``(None, reason)`` when it cannot be read."""
    from cliptune.data.images import ImageLoadError, load_image

    try:
        img = load_image(path)
    except ImageLoadError as exc:
        return None, str(exc)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return base64.b64encode(buf.getvalue()).decode("ascii"), ""


def _tiles(
    resolver: ImageResolver, ids: Sequence[str], scores: Sequence[float] | None, flags: Sequence[str]
) -> list[Tile]:
    tiles = []
    for i, item in enumerate(ids):
        image, note = resolver.thumb(item)
        score = float(scores[i]) if scores is not None and i < len(scores) else None
        tiles.append(Tile(label=item, image=image, flag=flags[i], score=score, note=note))
    return tiles


def query_rows(
    block: dict[str, Any], indices: Sequence[int], resolver: ImageResolver, k: int = 5, prefix: str = ""
) -> list[GridRow]:
    """Grid rows for t2i queries ``indices`` of an eval JSON ``per_query["t2i"]`` block.

    Args:
        block: ``per_query["t2i"]`` of ``eval/<split>.json`` (``queries``, ``top``, ``top_scores``,
            ``relevant``, ``values``).
        indices: Positions of the queries to show.
        resolver: Finds the images.
        k: Results per row.
        prefix: Put before each subtitle (e.g. the run name in a comparison).
    """
    rows = []
    mrr = block.get("values", {}).get("mrr")
    for i in indices:
        top = list(block["top"][i])[:k]
        relevant = set(block.get("relevant", [[]] * len(block["top"]))[i])
        scores = block.get("top_scores", [None] * len(block["top"]))[i]
        flags = ["relevant" if t in relevant else "none" for t in top]
        sub = f"query {block['query_ids'][i]}" + (f", mrr {mrr[i]:.3g}" if mrr is not None else "")
        rows.append(GridRow(block["queries"][i], prefix + sub, _tiles(resolver, top, scores, flags)))
    return rows


def retrieval_grid(
    ev: dict[str, Any], resolver: ImageResolver, k: int = 5, chosen: int = 3, worst: int = 3
) -> Grid | None:
    """The first ``chosen`` t2i queries and the ``worst`` ones by MRR (ties: file order) of an eval JSON."""
    block = ev.get("per_query", {}).get("t2i")
    if not block or not block.get("top"):
        return None
    n = len(block["top"])
    first = list(range(min(chosen, n)))
    mrr = block.get("values", {}).get("mrr")
    rest = [i for i in range(n) if i not in first]
    worst_idx = sorted(rest, key=lambda i: (mrr[i], i))[:worst] if mrr is not None else []
    rows = query_rows(block, first, resolver, k, "first queries: ") + query_rows(
        block, worst_idx, resolver, k, "worst by mrr: "
    )
    split = ev.get("split", "")
    return Grid(f"grid-{split}-t2i", f"Text-to-image results on {split}: first and worst queries", rows)


def suite_grid(suite: dict[str, Any], resolver: ImageResolver, max_rows: int = 8) -> Grid | None:
    """Failed suite queries first (then passed ones) with their top results flagged green / yellow / red."""
    queries = [q for q in suite.get("queries", []) if q.get("top")]
    if not queries:
        return None
    ordered = [q for q in queries if not q.get("passed")] + [q for q in queries if q.get("passed")]
    rows = []
    for q in ordered[:max_rows]:
        top = q["top"][: int(q.get("k") or len(q["top"]))]
        flags = [
            t.get("flag", "none") if t.get("flag") in {"relevant", "yellow", "red"} else "none" for t in top
        ]
        status = "passed" if q.get("passed") else "FAILED: " + "; ".join(q.get("failures", []))
        rows.append(
            GridRow(
                q.get("text") or q.get("image") or q.get("id", ""),
                f"{q.get('category', '')} / {q.get('id', '')}: {status}",
                _tiles(resolver, [t["id"] for t in top], [t.get("score", 0.0) for t in top], flags),
            )
        )
    name = suite.get("suite", "suite")
    return Grid(
        f"grid-suite-{name}",
        f"Suite {name}: failed queries first",
        rows,
        ("relevant", "yellow", "red", "none"),
    )


def triplet_grid(ev: dict[str, Any], resolver: ImageResolver, max_rows: int = 6) -> Grid | None:
    """Triplets the model gets wrong (fused accuracy 0): anchor, positive (green), negative (red)."""
    block = ev.get("per_query", {}).get("triplet")
    if not block:
        return None
    acc = block.get("values", {}).get("accuracy")
    if acc is None:
        return None
    wrong = [i for i, a in enumerate(acc) if a < 1.0][:max_rows]
    rows = []
    for i in wrong:
        parts = str(block["query_ids"][i]).split("|")
        if len(parts) != 3:
            continue
        tiles = _tiles(resolver, parts, None, ["anchor", "relevant", "red"])
        rows.append(GridRow(f"anchor {parts[0]}", f"triplet {i}: negative ranked above the positive", tiles))
    if not rows:
        return None
    split = ev.get("split", "")
    return Grid(
        f"grid-{split}-triplets",
        f"Triplets the model gets wrong on {split} (anchor, positive, negative)",
        rows,
        ("anchor", "relevant", "red"),
    )
