"""CLI layer of ``cliptune sweep``: parse, call :func:`cliptune.sweep.run_sweep`, print the leaderboard."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptune.cli.config import load_config_or_exit
from cliptune.cli.errors import err_console, exit_on_error

if TYPE_CHECKING:
    from cliptune.sweep import SweepResult

__all__ = ["register"]

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` command to the app."""
    app.command("sweep")(sweep)


def sweep(
    config: Annotated[
        Path, typer.Argument(help="YAML config with a `sweep:` section (objective, space, ...).")
    ],
    trials: Annotated[
        Optional[int],  # noqa: UP045 (typer needs Optional)
        typer.Option(
            "--trials", min=1, help="Finished trials to reach (default sweep.trials); earlier ones count."
        ),
    ] = None,
    storage: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--storage",
            help="Optuna RDB URL shared by several machines (default sqlite:///RUNS/NAME/sweep.db).",
        ),
    ] = None,
    set_: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", help="Override a config field, e.g. --set train.epochs=5 (repeatable)."),
    ] = None,
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Study name: trials are RUNS/NAME/trial-NNNN (default: name: or the file's stem)."),
    ] = None,
    runs: Annotated[Path, typer.Option(help="Parent folder of run directories.")] = Path("runs"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, no Optuna log.")] = False,
) -> None:
    """Search hyper-parameters with Optuna: one run directory per trial, a leaderboard, resumable.

    Trials are RUNS/NAME/trial-NNNN; RUNS/NAME/sweep.json and sweep.md hold the leaderboard and the
    parameter importances. Running the same command again resumes the study (killed trials are re-run).
    Exit 1 when the sweep cannot run (bad space, another study's config, objective not logged), 2 for an
    invalid config, 130 when interrupted.

    Examples:
        cliptune sweep sweep.yaml --trials 20
        cliptune sweep run.yaml --trials 8 --set sweep.space="{train.lr: {type: float, low: 1e-5, high: 1e-2, log: true}}"
        cliptune sweep sweep.yaml --trials 40 --storage postgresql://user:pw@db-host/sweeps --name fashion-lr
    """
    overrides = [*(set_ or []), *([f"name={name}"] if name else [])]
    cfg = load_config_or_exit(config, overrides)
    if cfg.name is None:
        cfg.name = config.stem

    from cliptune.sweep import run_sweep

    try:
        with exit_on_error(1, prefix="sweep failed: "):
            result = run_sweep(cfg, runs_root=runs, trials=trials, storage=storage, quiet=quiet)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: run the same command again to resume the sweep[/yellow]")
        raise typer.Exit(130) from None
    _print(result)


def _print(result: SweepResult) -> None:
    console = Console(soft_wrap=True)
    params = result.params
    table = Table(title=f"sweep {result.name}: {result.objective} ({result.direction}), best first")
    for column in ("trial", *params, result.objective, "state", "note"):
        table.add_column(column, justify="right" if column in ("trial", result.objective) else "left")
    for r in result.trials:
        style = _STATE_STYLE.get(r.state, "dim")
        table.add_row(
            str(r.number),
            *(_short(r.params.get(p, "")) for p in params),
            "" if r.value is None else f"{r.value:.4g}",
            f"[{style}]{r.state}[/{style}]",
            r.note,
        )
    console.print(table)
    if result.importances:
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in result.importances.items())
        console.print(f"parameter importances ({result.importance_note}): {ranked}", highlight=False)
    if result.best is not None:
        console.print(
            f"best: trial {result.best.number}, {result.objective} = {result.best.value:.4g}, "
            f"run [bold]{result.best.run_dir}[/bold]",
            highlight=False,
        )
    else:
        console.print("[yellow]no trial completed[/yellow]")
    console.print(f"leaderboard: {result.md_path} and {result.json_path}", highlight=False)
    sweep_dir = result.json_path.parent
    console.print(f"compare the trials: cliptune compare {sweep_dir}/trial-*", highlight=False)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
