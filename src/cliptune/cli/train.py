"""``cliptune train``: resolve a config, train, and print where the run directory is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.config import SetOption, load_config_or_exit
from cliptune.cli.errors import err_console, exit_on_error

__all__ = ["register"]

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cliptune train`` to ``app``."""
    app.command("train")(train_cmd)


def train_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (not needed with --resume).")] = None,  # noqa: UP045
    set_: SetOption = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: the run directory is RUNS/NAME.")] = None,  # noqa: UP045
    resume: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Continue a run exactly from its newest intact checkpoint. Its config.yaml is the base: "
            "--set (or a CONFIG given too) may change only train.epochs (more), train.early_stopping.patience, "
            "train.checkpoint_every, train.keep_last, train.max_bad_steps and track; other changes are refused."
        ),
    ] = None,
    runs: Annotated[Path, typer.Option(help="Parent folder of run directories.")] = Path("runs"),
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars (one line per epoch).")
    ] = False,
) -> None:
    """Train a model and write its run directory (config, splits, metrics.jsonl, model/, summary.json).

    Examples:
        cliptune train run.yaml --set train.lr=1e-4 --name lr1e-4
        cliptune train --resume runs/lr1e-4
        cliptune train --resume runs/lr1e-4 --set train.epochs=40
        torchrun --standalone --nproc_per_node 2 -m cliptune train run.yaml
    """
    import os

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun every rank runs this command
    from cliptune.rundir import RunDir
    from cliptune.train.errors import TrainingInterrupted
    from cliptune.train.run import ResumeChangeError, UnresumableRunError, train

    if config is None and resume is None:
        err_console.print("[red]give a CONFIG.yaml, or --resume RUN[/red]")
        raise typer.Exit(2)
    # On resume the run's own config.yaml is the base the --set values change (a CONFIG given is compared
    # whole); without a base, every default would read as a change.
    base = config
    if resume is not None and config is None:
        base = RunDir(resume).config
        if not base.is_file():
            err_console.print(f"[red]{resume} is not a run directory: it has no {base.name}[/red]")
            raise typer.Exit(2)
    cfg = load_config_or_exit(base, [*(set_ or []), *([f"name={name}"] if name else [])])
    if cfg.name is None and config is not None:
        cfg.name = config.stem
    try:
        with exit_on_error(1, ValueError):
            try:
                run_dir = train(cfg, runs_root=runs, resume=resume, quiet=quiet)
            except ResumeChangeError as exc:
                err_console.print(
                    f"[red]{exc}[/red]\nstart a new run with these settings (another --name), or resume "
                    f"without them: `cliptune train --resume {exc.run_dir}`",
                    highlight=False,
                )
                raise typer.Exit(2) from None
            except UnresumableRunError as exc:  # RunExistsError's hint (--resume) would not work here
                err_console.print(f"[red]{exc}, or pass another --name[/red]", highlight=False)
                raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        if main_process:
            resume_hint = (
                f"; continue exactly with `cliptune train --resume {exc.run_dir}`"
                if isinstance(exc, TrainingInterrupted)
                else ""
            )
            err_console.print(f"[yellow]{exc or 'interrupted'}{resume_hint}[/yellow]")
        raise typer.Exit(130) from None
    if main_process:
        console.print(f"run written to [bold]{run_dir}[/bold] (summary: {RunDir(run_dir).summary})")
