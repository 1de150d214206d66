"""Render a :class:`~cliptune.report.document.Document` as one self-contained HTML page.

Inline CSS, inline base64 images, no script and no external reference: the file can be mailed, attached
to a CI run or opened offline, and looks the same everywhere.
"""

from __future__ import annotations

from html import escape

from cliptune.report.diagnostics import Finding
from cliptune.report.document import (
    FLAG_COLOURS,
    Cell,
    Document,
    Findings,
    Grid,
    Paragraph,
    Plot,
    Section,
    Table,
    format_numbers,
)

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.7em;margin:0 0 4px}h2{font-size:1.3em;margin:34px 0 10px;border-bottom:2px solid #d8dde3;padding-bottom:4px}
.subtitle{color:#5b6570;margin:0 0 18px}
nav{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:8px 12px;font-size:.9em}
nav a{margin-right:14px;color:#2457a6;text-decoration:none}
section{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:4px 20px 16px;margin-top:18px}
table{border-collapse:collapse;margin:10px 0 6px;font-size:.88em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dfe3e8;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#eef1f5;font-weight:600}table.text td,table.text th{text-align:left}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0;color:#3b4650}
td.better,td.pass{background:#dff3e4;color:#16642e;font-weight:600}
td.worse,td.fail{background:#fbe1e0;color:#9b1c17;font-weight:600}
td.same{background:#f1f2f4;color:#4a535c}td.warn{background:#fff4d6;color:#7a5600;font-weight:600}
.finding{border-left:5px solid #8aa4c8;background:#f4f7fb;margin:8px 0;padding:6px 12px;border-radius:3px}
.finding.warning{border-color:#e0a800;background:#fff8e3}
.finding .rule{font-weight:700;font-size:.8em;text-transform:uppercase;letter-spacing:.04em;color:#5b6570}
.finding.warning .rule{color:#8a6100}
.finding .numbers{font-family:ui-monospace,Menlo,monospace;font-size:.78em;color:#5b6570;margin-top:3px}
.banner{padding:8px 12px;border-radius:4px;margin:10px 0}.banner.warn{background:#fff4d6;border:1px solid #e0a800}
.banner.ok{background:#dff3e4;border:1px solid #2e9d4b}.banner.note{background:#eef1f5;border:1px solid #c9d1da}
.plots{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:8px 0;background:#fff;border:1px solid #e6e9ed;border-radius:6px;padding:6px}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.8em;color:#5b6570;margin-top:4px}
.grid-row{display:flex;align-items:flex-start;gap:8px;padding:8px 0;border-bottom:1px solid #eef0f3}
.query{width:230px;flex:none;font-size:.88em}.query b{display:block;margin-bottom:3px}
.query span{color:#5b6570;font-size:.85em}
.tile{width:104px;flex:none;text-align:center;font-size:.68em;color:#4a535c;word-break:break-all}
.tile img,.tile .missing{width:96px;height:96px;object-fit:contain;border:4px solid #b0b0b0;border-radius:4px;background:#fafafa}
.tile .missing{display:flex;align-items:center;justify-content:center;font-size:.9em;overflow:hidden}
.legend span{display:inline-block;margin-right:14px;font-size:.82em}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
"""


def render_html(doc: Document) -> str:
    """The whole page as a string (UTF-8, no external references).

    Args:
        doc: The document to render.

    Returns:
        An HTML5 page.
    """
    nav = " ".join(f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in doc.sections)
    body = "\n".join(_section(s) for s in doc.sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<h1>{escape(doc.title)}</h1>\n<p class="subtitle">{escape(doc.subtitle)}</p>\n'
        f"<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _section(section: Section) -> str:
    parts = [f'<section id="{escape(section.id)}">', f"<h2>{escape(section.title)}</h2>"]
    plots: list[Plot] = []
    for block in section.blocks:
        if isinstance(block, Plot):
            plots.append(block)
            continue
        if plots:
            parts.append(_plots(plots))
            plots = []
        parts.append(_block(block))
    if plots:
        parts.append(_plots(plots))
    parts.append("</section>")
    return "\n".join(parts)


def _block(block: object) -> str:
    if isinstance(block, Paragraph):
        css = f' class="banner {escape(block.css)}"' if block.css else ""
        return f"<p{css}>{escape(block.text)}</p>"
    if isinstance(block, Findings):
        return "\n".join(_finding(f) for f in block.items)
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Grid):
        return _grid(block)
    raise TypeError(f"render_html: cannot render a {type(block).__name__}")


def _finding(f: Finding) -> str:
    numbers = format_numbers(f.numbers)
    return (
        f'<div class="finding {escape(f.severity)}"><div class="rule">{escape(f.severity)} · '
        f"{escape(f.rule.replace('_', ' '))}</div>{escape(f.message)}"
        f'<div class="numbers">{escape(numbers)}</div></div>'
    )


def _table(table: Table) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = []
        for cell in row:
            if isinstance(cell, Cell):
                css = f' class="{escape(cell.css)}"' if cell.css else ""
                cells.append(f"<td{css}>{escape(cell.text)}</td>")
            else:
                cells.append(f"<td>{escape(str(cell))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{escape(table.caption)}</caption>" if table.caption else ""
    css = "" if table.numeric else ' class="text"'
    return f"<table{css}>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _plots(plots: list[Plot]) -> str:
    figures = [
        f'<figure><img id="{escape(p.id)}" alt="{escape(p.title)}" src="data:image/png;base64,{p.png}">'
        f"<figcaption><b>{escape(p.title)}</b>. {escape(p.caption)}</figcaption></figure>"
        for p in plots
    ]
    return '<div class="plots">' + "".join(figures) + "</div>"


def _grid(grid: Grid) -> str:
    names = {
        "relevant": "relevant",
        "yellow": "yellow flag (acceptable)",
        "red": "red flag (wrong)",
        "none": "not relevant",
        "anchor": "anchor (query image)",
    }
    legend = "".join(
        f'<span><i style="background:{FLAG_COLOURS[f]}"></i>{escape(names[f])}</span>' for f in grid.legend
    )
    rows = []
    for row in grid.rows:
        tiles = []
        for t in row.tiles:
            colour = FLAG_COLOURS.get(t.flag, FLAG_COLOURS["none"])
            score = f"<br>{t.score:.3f}" if t.score is not None else ""
            if t.image is not None:
                img = (
                    f'<img style="border-color:{colour}" alt="{escape(t.label)}" '
                    f'src="data:image/jpeg;base64,{t.image}">'
                )
            else:
                img = f'<div class="missing" style="border-color:{colour}" title="{escape(t.note)}">missing</div>'
            name = t.label.rsplit("/", 1)[-1]
            tiles.append(f'<div class="tile" title="{escape(t.label)}">{img}{escape(name)}{score}</div>')
        rows.append(
            f'<div class="grid-row"><div class="query"><b>{escape(row.query)}</b>'
            f"<span>{escape(row.subtitle)}</span></div>{''.join(tiles)}</div>"
        )
    return (
        f'<div class="grid" id="{escape(grid.id)}"><h3>{escape(grid.title)}</h3>'
        f'<div class="legend">{legend}</div>{"".join(rows)}</div>'
    )
