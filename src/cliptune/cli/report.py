"""``cliptune report``: write a run's HTML and Markdown report, print its diagnostic findings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cliptune.cli import compare as compare_cli
from cliptune.cli.errors import exit_on_error

__all__ = ["register", "report"]

_SEVERITY_STYLE = {"warning": "bold yellow", "info": "dim"}


def register(app: typer.Typer) -> None:
    """Add ``cliptune report`` to ``app``, and ``cliptune compare`` after it.

    ``compare`` lives in :mod:`cliptune.cli.compare`; it is added here too because this function added
    both before the split and tests/test_compare.py still builds its app with it. Drop that line once
    it uses ``cliptune.cli.compare.register`` (adding ``compare`` twice is harmless: it is added once).
    """
    app.command("report")(report)
    compare_cli.register(app)  # transitional, see above


def report(
    run: Annotated[Path, typer.Argument(help="Run directory (runs/<name>) holding metrics.jsonl.")],
) -> None:
    """Write RUN/report.html and RUN/report.md: curves, diagnostics, metrics, suites, retrieval grids.

    Prints the report paths and every diagnostic finding (warnings first); exit 1 when the run directory
    cannot be read.

    Examples:
        cliptune report runs/fashion-tuned
        cliptune report runs/art-siamese
    """
    from cliptune.report import build_report, diagnose, load_run

    console = Console(soft_wrap=True)
    with exit_on_error(1, prefix="report failed: "):
        html, md = build_report(run)
        findings = diagnose(load_run(run))
    console.print(f"report: [bold]{html}[/bold]\nmarkdown: [bold]{md}[/bold]", highlight=False)
    ordered = [f for f in findings if f.severity == "warning"] + [
        f for f in findings if f.severity != "warning"
    ]
    for f in ordered:
        style = _SEVERITY_STYLE.get(f.severity, "")
        console.print(f"[{style}]{f.severity:<7}[/{style}] {f.rule:<18} {f.message}", highlight=False)
