"""A tiny document model that both renderers (HTML and Markdown) read, so the two never disagree.

Report builders assemble a :class:`Document` of sections holding paragraphs, findings, tables, plots and
image grids; :mod:`cliptune.report.html` and :mod:`cliptune.report.markdown` turn it into text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from cliptune.report.diagnostics import Finding

__all__ = [
    "Cell",
    "Table",
    "Plot",
    "Tile",
    "GridRow",
    "Grid",
    "Paragraph",
    "Findings",
    "Section",
    "Document",
    "format_numbers",
]

# Colours of a tile border / a flag, shared by the legend and the renderers.
FLAG_COLOURS = {
    "relevant": "#2e9d4b",
    "yellow": "#e0a800",
    "red": "#d0312d",
    "none": "#b0b0b0",
    "anchor": "#3b6fb6",
}
FLAG_MARKS = {"relevant": "✅", "yellow": "🟡", "red": "🔴", "none": "·", "anchor": "⚓"}


@dataclass(frozen=True)
class Cell:
    """A table cell with a style: ``better``, ``worse``, ``same``, ``pass``, ``fail``, ``warn`` or ``""``."""

    text: str
    css: str = ""


@dataclass
class Table:
    """A table; the first column is a label, the others are right-aligned values unless ``numeric`` is False."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str | Cell]]  # read-only: rows of plain text are rows too
    caption: str = ""
    numeric: bool = True


@dataclass
class Plot:
    """A rendered plot: ``png`` is base64 PNG data."""

    id: str
    title: str
    png: str
    caption: str = ""


@dataclass
class Tile:
    """One result image: ``image`` is base64 JPEG data or None when it could not be read (``note`` says why)."""

    label: str
    image: str | None
    flag: str = "none"
    score: float | None = None
    note: str = ""


@dataclass
class GridRow:
    """A query and its results, left to right in rank order."""

    query: str
    subtitle: str
    tiles: list[Tile]


@dataclass
class Grid:
    """Rows of query + result thumbnails with coloured borders."""

    id: str
    title: str
    rows: list[GridRow]
    legend: tuple[str, ...] = ("relevant", "none")


@dataclass
class Paragraph:
    """Plain text; ``css`` ``warn`` / ``ok`` / ``note`` styles it as a banner."""

    text: str
    css: str = ""


def _number(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_number(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_number(x) for x in v) + "]"
    return str(v)


def format_numbers(numbers: Mapping[str, object]) -> str:
    """A finding's numbers as both renderers show them: ``k=v, ...``, floats to 6 significant digits.

    Example:
        >>> format_numbers({"gap": 0.1234567, "epochs": [1, 2], "best": {"val": 2.0}})
        'gap=0.123457, epochs=[1, 2], best={val: 2}'
    """
    return ", ".join(f"{k}={_number(v)}" for k, v in numbers.items())


@dataclass
class Findings:
    """Diagnostic findings, shown with their numbers."""

    items: list[Finding]


Block = Union[Paragraph, Findings, Table, Plot, Grid]  # noqa: UP007 (a runtime alias)


@dataclass
class Section:
    """A titled part of a document."""

    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    """A whole report: a title, a one-line subtitle and sections."""

    title: str
    subtitle: str
    sections: list[Section] = field(default_factory=list)
