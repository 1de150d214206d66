"""``cliptune compare``: compare runs against a baseline, print each candidate's verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import err_console, exit_on_error

__all__ = ["compare", "register"]


def register(app: typer.Typer) -> None:
    """Add ``cliptune compare`` to ``app``, once (``cliptune.cli.report.register`` adds it too, for now)."""
    if all(c.name != "compare" for c in app.registered_commands):
        app.command("compare")(compare)


def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more run directories or evaluation folders (cliptune eval --splits-from)."
        ),
    ],
    baseline: Annotated[
        Optional[Path],  # noqa: UP045 (typer needs Optional)
        typer.Option(
            "--baseline", help="The run or evaluation the others are compared with (default: the first)."
        ),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Output folder (default: <parent of the first run>/compare)."),
    ] = None,
) -> None:
    """Compare runs: leaderboard, deltas with paired-bootstrap verdicts, curves, suites, queries that moved.

    A model evaluation folder (`cliptune eval MODEL --splits-from RUN`) stands beside runs, e.g. a zero-shot
    baseline measured on a run's own queries, so its deltas are paired query by query.

    Writes compare.html, compare.md and compare.json; prints each candidate's verdicts. Exit 2 for fewer
    than two runs or a baseline that is not among them; exit 1 when a run cannot be read.

    Examples:
        cliptune compare runs/fashion-base runs/fashion-tuned
        cliptune compare runs/base runs/tuned runs/tuned-lora --baseline runs/base --out runs/compare
        cliptune compare runs/tuned evals/base --baseline evals/base
    """
    from cliptune.report import compare_runs
    from cliptune.rundir import read_json

    console = Console(soft_wrap=True)
    resolved = [p.resolve() for p in runs]
    if len(runs) < 2:
        err_console.print("[red]compare needs at least two run directories or evaluation folders[/red]")
        raise typer.Exit(2)
    if baseline is not None and baseline.resolve() not in resolved:
        err_console.print(f"[red]--baseline {baseline} is not one of the runs given[/red]", highlight=False)
        raise typer.Exit(2)
    with exit_on_error(1, prefix="compare failed: "):
        html, md = compare_runs(list(runs), baseline=baseline, out=out)
    data = read_json(html.parent / "compare.json")
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
