"""CLI layer of ``cliptune report`` and ``cliptune compare``: parse, call cliptune.report, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

__all__ = ["register"]

_SEVERITY_STYLE = {"warning": "bold yellow", "info": "dim"}


def register(app: typer.Typer) -> None:
    """Add the ``report`` and ``compare`` commands to the app."""
    app.command("report")(report)
    app.command("compare")(compare)


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
    from cliptune.report import ReportError, build_report, diagnose, load_run

    console, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    try:
        html, md = build_report(run)
        findings = diagnose(load_run(run))
    except ReportError as exc:
        err.print(f"[red]report failed: {exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"report: [bold]{html}[/bold]\nmarkdown: [bold]{md}[/bold]", highlight=False)
    ordered = [f for f in findings if f.severity == "warning"] + [
        f for f in findings if f.severity != "warning"
    ]
    for f in ordered:
        style = _SEVERITY_STYLE.get(f.severity, "")
        console.print(f"[{style}]{f.severity:<7}[/{style}] {f.rule:<18} {f.message}", highlight=False)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
    baseline: Annotated[
        Optional[Path],  # noqa: UP045 (typer needs Optional)
        typer.Option("--baseline", help="The run the others are compared with (default: the first)."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Output folder (default: <parent of the first run>/compare)."),
    ] = None,
) -> None:
    """Compare runs: leaderboard, deltas with paired-bootstrap verdicts, curves, suites, queries that moved.

    Writes compare.html, compare.md and compare.json; prints each candidate's verdicts. Exit 2 for fewer
    than two runs or a baseline that is not among them; exit 1 when a run cannot be read.

    Examples:
        cliptune compare runs/fashion-base runs/fashion-tuned
        cliptune compare runs/base runs/tuned runs/tuned-lora --baseline runs/base --out runs/compare
    """
    import json

    from cliptune.report import ReportError, compare_runs

    console, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    resolved = [p.resolve() for p in runs]
    if len(runs) < 2:
        err.print("[red]compare needs at least two run directories[/red]")
        raise typer.Exit(2)
    if baseline is not None and baseline.resolve() not in resolved:
        err.print(f"[red]--baseline {baseline} is not one of the runs given[/red]", highlight=False)
        raise typer.Exit(2)
    try:
        html, md = compare_runs(list(runs), baseline=baseline, out=out)
    except ReportError as exc:
        err.print(f"[red]compare failed: {exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    data = json.loads((html.parent / "compare.json").read_text(encoding="utf-8"))
    console.print(f"compare: [bold]{html}[/bold]\nmarkdown: [bold]{md}[/bold]", highlight=False)
    for flag in data["flags"]:
        console.print(f"[bold yellow]flag[/bold yellow] {flag}", highlight=False)
    style = {"better": "green", "worse": "red"}
    for cand, splits in data["deltas"].items():
        for split, deltas in splits.items():
            for d in deltas:
                s = style.get(d["verdict"], "dim")
                console.print(
                    f"{cand} {split} {d['metric']:<22} {d['baseline']:.4f} -> {d['candidate']:.4f} "
                    f"[{s}]{d['verdict']}[/{s}]" + ("" if d["paired"] else " (unpaired)"),
                    highlight=False,
                )
