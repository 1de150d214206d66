"""``cliptune compare``: compare runs against a baseline, print each candidate's verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cliptune.cli.errors import err_console, exit_on_error

__all__ = ["compare", "print_comparison", "register"]


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
    heldout: Annotated[
        bool,
        typer.Option(
            "--heldout",
            help="Re-evaluate every run on the groups none of them trained on (one common held-out set), "
            "for paired verdicts between runs trained on different splits (e.g. 80/20 vs 60/40).",
        ),
    ] = False,
    bootstrap: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--bootstrap", min=1, help="Bootstrap resamples of the --heldout evaluation."),
    ] = None,
) -> None:
    """Compare runs: best run, leaderboard, deltas with paired-bootstrap verdicts, curves, suites, movers.

    A model evaluation folder (`cliptune eval MODEL --splits-from RUN`) stands beside runs, e.g. a zero-shot
    baseline measured on a run's own queries, so its deltas are paired query by query.

    Verdicts are counted, and the best run is named, on held-out splits only (shared-heldout, else test,
    else val; train rows are shown, never counted), by t2i/mrr (retrieval) or triplet/accuracy (siamese).

    Writes compare.html, compare.md and compare.json; prints the best run and each candidate's verdicts.
    Exit 2 for fewer than two runs or a baseline that is not among them; exit 1 when a run cannot be read
    or, with --heldout, when no group is held out from every run.

    Examples:
        cliptune compare runs/fashion-base runs/fashion-tuned
        cliptune compare runs/split80 runs/split60 --heldout
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
        html, md = compare_runs(
            list(runs), baseline=baseline, out=out, heldout=heldout, bootstrap=bootstrap, progress=False
        )
    data = read_json(html.parent / "compare.json")
    console.print(f"compare: [bold]{html}[/bold]\nmarkdown: [bold]{md}[/bold]", highlight=False)
    print_comparison(console, data)


def print_comparison(console: Console, data: dict[str, Any]) -> None:
    """The best run, the flags, each candidate's verdict summary and one delta table per held-out split.

    Tables keep numbers whole at 80 columns: short headers (the run names are in the title), numbers never
    wrap, only the metric name folds and the verdict wraps between words. Train rows are not printed (they
    are in compare.md, labelled as not counted).
    """
    for flag in data["flags"]:
        console.print(f"[bold yellow]flag[/bold yellow] {flag}", highlight=False, soft_wrap=False)
    if any("different queries" in f for f in data["flags"]) and not data.get("heldout"):
        console.print(
            "[yellow]hint[/yellow] the runs were evaluated on different queries (another split?): rerun with "
            "--heldout to compare them on the groups every run held out, with paired verdicts",
            highlight=False,
            soft_wrap=False,
        )
    best = data["best"]
    style = "green" if best["run"] else "yellow"
    console.print(f"[bold {style}]{best['sentence']}[/bold {style}]", highlight=False, soft_wrap=False)
    for summary in data["summary"].values():
        console.print(summary["sentence"], highlight=False, soft_wrap=False)
    base = Path(data["baseline"]).name
    for cand, splits in data["deltas"].items():
        for split, deltas in splits.items():
            if split == "train":
                continue
            console.print(_delta_table(base, cand, split, deltas), soft_wrap=False)


_STYLE = {"better": "green", "worse": "red"}


def _delta_table(base: str, cand: str, split: str, deltas: list[dict[str, Any]]) -> Table:
    # 80 columns: metric names lose their group prefix (t2i/, i2t/, triplet/), which heads its rows instead.
    unpaired = any(not d["paired"] and d["interval"] for d in deltas)
    title = f"{cand} vs {base} on {split}" + (" (unpaired: different queries)" if unpaired else "")
    table = Table(
        title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, title_justify="left"
    )
    table.add_column("metric", overflow="fold")
    table.add_column("base", justify="right", no_wrap=True)
    table.add_column("cand", justify="right", no_wrap=True)
    table.add_column("delta [95% interval]", justify="right", no_wrap=True)
    table.add_column("verdict")
    group = None
    for d in deltas:
        head, _, name = d["metric"].partition("/")
        if name and head != group:
            table.add_row(f"[bold]{head}[/bold]", "", "", "", "")
        group = head if name else None
        iv = d["interval"]
        diff = d["candidate"] - d["baseline"]
        delta = f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]" if iv else f"{diff:+.3f}"
        s = _STYLE.get(d["verdict"], "dim")
        word = d["relative"] if d["verdict"] in _STYLE else d["verdict"]
        label = f"  {name}" if name else head
        table.add_row(label, f"{d['baseline']:.4f}", f"{d['candidate']:.4f}", delta, f"[{s}]{word}[/{s}]")
    return table
