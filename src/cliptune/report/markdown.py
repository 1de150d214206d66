"""Render a :class:`~cliptune.report.document.Document` as Markdown: the text, tables and findings.

The Markdown version is for pull requests, chat and diffs between runs: plots and thumbnails stay in the
HTML page (a data-URI image does not display in most Markdown viewers), grids become rows of result ids
marked with their flags.
"""

from __future__ import annotations

from cliptune.report.document import (
    FLAG_MARKS,
    Cell,
    Document,
    Findings,
    Grid,
    Paragraph,
    Plot,
    Table,
    format_numbers,
)

__all__ = ["render_markdown"]


def render_markdown(doc: Document) -> str:
    """The whole document as GitHub-flavoured Markdown.

    Args:
        doc: The document to render.

    Returns:
        Markdown text ending with a newline.
    """
    out = [f"# {doc.title}", "", f"_{doc.subtitle}_", ""]
    for section in doc.sections:
        out += [f"## {section.title}", ""]
        plots = [b for b in section.blocks if isinstance(b, Plot)]
        for block in section.blocks:
            if not isinstance(block, Plot):
                out += _block(block) + [""]
        if plots:
            out += ["Plots (in the HTML report): " + "; ".join(p.title for p in plots) + ".", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _block(block: object) -> list[str]:
    if isinstance(block, Paragraph):
        return [f"> **{block.text}**" if block.css == "warn" else block.text]
    if isinstance(block, Findings):
        return [
            f"- **{f.severity.upper()} · {f.rule.replace('_', ' ')}**: {f.message}"
            + (f" `{format_numbers(f.numbers)}`" if f.numbers else "")
            for f in block.items
        ]
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Grid):
        return _grid(block)
    raise TypeError(f"render_markdown: cannot render a {type(block).__name__}")


def _cell(cell: str | Cell) -> str:
    if isinstance(cell, Cell):
        text = _escape(cell.text)
        return f"**{text}**" if cell.css in {"better", "worse", "fail", "warn"} else text
    return _escape(str(cell))


def _table(table: Table) -> list[str]:
    lines = [f"**{table.caption}**", ""] if table.caption else []
    lines.append("| " + " | ".join(_escape(c) for c in table.columns) + " |")
    lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(table.columns) - 1)) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def _grid(grid: Grid) -> list[str]:
    legend = ", ".join(f"{FLAG_MARKS[f]} {f}" for f in grid.legend)
    lines = [f"**{grid.title}** ({legend})", ""]
    for row in grid.rows:
        results = " ".join(f"{FLAG_MARKS.get(t.flag, '·')}`{t.label}`" for t in row.tiles)
        lines.append(f"- _{_escape(row.query)}_ ({_escape(row.subtitle)}): {results}")
    return lines
