"""``cliptune demo``: run the offline demo step by step and summarise what it showed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)


def _run_step(app: typer.Typer, args: list[str]) -> int:
    """Run one CLI command in this process; return its exit code."""
    import click

    try:
        app(args, standalone_mode=False)
    except SystemExit as exc:  # typer.Exit inside commands
        return int(exc.code or 0)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


def _load(path: Path) -> dict[str, Any] | None:
    from cliptune.rundir import read_json

    data: dict[str, Any] | None = read_json(path) if path.exists() else None
    return data


def _fmt(m: dict[str, Any] | None) -> str:
    from cliptune.ranking.bootstrap import format_interval

    return "-" if m is None else format_interval(m)


def _summary(out: Path) -> list[str]:
    """The demo's conclusions, computed from the files it wrote (no number is typed in here)."""
    from cliptune.rundir import RunDir

    runs = out / "runs"
    lines: list[str] = []
    # no vertical borders and short headers: the table fits 80 columns without wrapping an interval
    table = Table(
        title="Fashion: base vs fine-tuned on the same held-out test queries",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("run", "t2i recall@5", "t2i mrr", "suite", "rips"):
        table.add_column(col, no_wrap=True)
    evals = {}
    for name in ("fashion-base", "fashion-finetuned"):
        run = RunDir(runs / name)
        ev = _load(run.eval("test"))
        suites = sorted(run.suite_dir.glob("*.json")) if run.suite_dir.exists() else []
        suite = _load(suites[0]) if suites else None
        evals[name] = ev
        rips = (suite or {}).get("categories", {}).get("rips", {})
        table.add_row(
            name,
            _fmt((ev or {}).get("metrics", {}).get("t2i/recall@5")),
            _fmt((ev or {}).get("metrics", {}).get("t2i/mrr")),
            "-" if suite is None else ("PASS" if suite["passed"] else "FAIL"),
            "-" if not rips else ("PASS" if rips["passed"] else "FAIL"),
        )
    console.print(table)
    base, tuned = evals.get("fashion-base"), evals.get("fashion-finetuned")
    if base and tuned:
        for key in ("t2i/recall@5", "t2i/mrr"):
            b, t = base["metrics"][key], tuned["metrics"][key]
            if t["low"] > b["high"]:
                lines.append(
                    f"fine-tuned beats base on {key}: intervals do not overlap ({_fmt(t)} vs {_fmt(b)})"
                )
            elif t["mean"] > b["mean"]:
                lines.append(
                    f"fine-tuned is ahead on {key} but the intervals overlap ({_fmt(t)} vs {_fmt(b)})"
                )
            else:
                lines.append(f"fine-tuned does NOT beat base on {key} ({_fmt(t)} vs {_fmt(b)})")
    for line in lines:
        console.print(f"  - {line}")
    console.print("\nOpen:")
    for path in (
        RunDir(runs / "fashion-finetuned").report,
        out / "compare" / "compare.html",
        RunDir(runs / "art-siamese").report,
        out / "data" / "fashion" / "contact_sheet.png",
    ):
        console.print(f"  {path}{'' if path.exists() else '  (not written)'}")
    return lines


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""

    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option(help="Folder for catalogues, configs, runs, index.")] = Path(
            "runs/demo"
        ),
        fast: Annotated[
            bool, typer.Option(help="Smaller catalogues and fewer epochs (about a minute).")
        ] = False,
    ) -> None:
        """Run the offline end-to-end demo on the embedded default, printing each command as it runs.

        Examples:
            cliptune demo
            cliptune demo --out /tmp/demo --fast
        """
        from cliptune.cli.demo_steps import demo_steps, write_demo_configs

        write_demo_configs(out, fast=fast)
        timings = []
        started = time.perf_counter()
        for i, step in enumerate(demo_steps(out, fast=fast), start=1):
            console.rule(f"[bold]{i}. {step.title}")
            console.print(f"[dim]$ {step.command}[/dim]", highlight=False)
            tic = time.perf_counter()
            code = _run_step(app, step.args)
            timings.append((step.title, time.perf_counter() - tic, code))
            if code != 0 and not (step.may_fail and code == 1):
                console.print(f"[red]step {i} failed with exit code {code}: {step.command}[/red]")
                raise typer.Exit(code)
            if code == 1:
                console.print("[yellow]a behavioural gate failed (see above): the demo goes on[/yellow]")
        console.rule("[bold]Summary")
        _summary(out)
        console.print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
