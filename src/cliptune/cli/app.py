"""The ``cliptune`` command line: parses arguments, builds typed objects, calls the library.

This is the only module that wires the layers together; it holds no logic of its own beyond printing.
Heavy imports (torch, transformers) happen inside commands so that ``cliptune --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptune import __version__

app = typer.Typer(
    name="cliptune",
    help="Fine-tune, evaluate, gate and compare CLIP-family image-text models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Show, validate and document run configs.", no_args_is_help=True)
data_app = typer.Typer(help="Render, validate and clean catalogues.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 (typer needs Optional here on Python 3.10)
    typer.Option("--set", help="Override a config field, e.g. --set train.lr=1e-4 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"cliptune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune, evaluate, gate and compare CLIP-family image-text models."""


def _load_config_or_exit(path: Optional[Path], overrides: Optional[list[str]]):  # noqa: UP045
    from cliptune.config import ConfigError, load_config

    try:
        return load_config(path, overrides or [])
    except ConfigError as exc:
        err_console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; omitted: the defaults.")] = None,  # noqa: UP045
    set_: SetOption = None,
) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied).

    Examples:
        cliptune config show
        cliptune config show run.yaml --set train.lr=1e-4 --set data.split.ratios="{train: 0.6, test: 0.4}"
    """
    from cliptune.config import dump_config

    cfg = _load_config_or_exit(config, set_)
    console.print(dump_config(cfg), end="", highlight=False, markup=False)


@config_app.command("schema")
def config_schema() -> None:
    """Print the config's JSON schema (for editors and validation in other tools).

    Example:
        cliptune config schema > cliptune.schema.json
    """
    from cliptune.config import Config

    console.print_json(json.dumps(Config.model_json_schema()))


@config_app.command("docs")
def config_docs(
    out: Annotated[Optional[Path], typer.Option(help="Write to this file instead of stdout.")] = None,  # noqa: UP045
) -> None:
    """Print the config reference in Markdown, generated from the field descriptions.

    Example:
        cliptune config docs --out docs/config.md
    """
    from cliptune.config import config_markdown

    text = config_markdown()
    if out is None:
        console.print(text, end="", highlight=False, markup=False)
    else:
        out.write_text(text, encoding="utf-8")


@data_app.command("synth")
def data_synth(
    kind: Annotated[str, typer.Argument(help="Which catalogue: 'fashion' or 'art'.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the catalogue into.")],
    n: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--n", help="Images (fashion) or originals (art); default 1500 / 200.", min=1),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same bytes.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Render a deterministic synthetic catalogue (images, metadata.csv, contact_sheet.png).

    Examples:
        cliptune data synth fashion data/fashion --n 1500 --seed 0
        cliptune data synth art data/art --n 200
    """
    from cliptune.data.synthetic import CATALOGUES, render_catalogue

    if kind not in CATALOGUES:
        err_console.print(
            f"[red]unknown catalogue '{kind}'; choose one of: {', '.join(sorted(CATALOGUES))}[/red]"
        )
        raise typer.Exit(2)
    path = render_catalogue(kind, out, n=n, seed=seed, progress=not quiet)
    console.print(
        f"wrote {kind} catalogue to [bold]{path}[/bold] (contact sheet: {path / 'contact_sheet.png'})"
    )


@data_app.command("check")
def data_check(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue folder (images + metadata file).")],
    write_clean: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--write-clean", help="Write the good rows to OUT/metadata.csv and the bad to OUT/rejected.csv."
        ),
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Reject images with more pixels than this (decompression-bomb guard).", min=1)
    ] = 89_478_485,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Validate a catalogue; list every bad row (file, row, reason) and exit 1 if there is any.

    Examples:
        cliptune data check data/fashion
        cliptune data check my_catalogue --write-clean my_catalogue_clean
    """
    from cliptune.data.catalogue import CatalogueError, read_catalogue
    from cliptune.data.check import check_catalogue
    from cliptune.data.check import write_clean as write_clean_fn

    try:
        cat = read_catalogue(catalogue)
        result = check_catalogue(cat, max_pixels=max_pixels, progress=not quiet)
    except CatalogueError as exc:
        err_console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    rejected = [*result.rejected, *result.rejected_triplets]
    n_good, n_bad = len(result.good), len(rejected)
    if n_bad:
        table = Table(title=f"{n_bad} bad row(s) in {cat.root}", show_lines=False)
        table.add_column("source")
        table.add_column("row", justify="right")
        table.add_column("file")
        table.add_column("reason")
        for rej in rejected:
            table.add_row(rej.source, str(rej.row), rej.file_name, rej.reason)
        console.print(table)
    console.print(f"{n_good} good row(s), {n_bad} bad row(s) in {catalogue}")
    if write_clean is not None:
        manifest, rejected = write_clean_fn(result, cat, write_clean)
        console.print(f"wrote {manifest} ({n_good} rows) and {rejected} ({n_bad} rows)")
    if n_bad:
        raise typer.Exit(1)


@app.command("train")
def train_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (not needed with --resume).")] = None,  # noqa: UP045
    set_: SetOption = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: the run directory is RUNS/NAME.")] = None,  # noqa: UP045
    resume: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Continue a run exactly from its latest checkpoint (uses its config.yaml)."),
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
        torchrun --standalone --nproc_per_node 2 -m cliptune train run.yaml
    """
    import os

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun every rank runs this command
    from cliptune.data.catalogue import CatalogueError
    from cliptune.models.backbone import BackboneError
    from cliptune.train.errors import TrainingError, TrainingInterrupted
    from cliptune.train.run import train

    if config is None and resume is None:
        err_console.print("[red]give a CONFIG.yaml, or --resume RUN[/red]")
        raise typer.Exit(2)
    cfg = _load_config_or_exit(config, [*(set_ or []), *([f"name={name}"] if name else [])])
    if cfg.name is None and config is not None:
        cfg.name = config.stem
    try:
        run_dir = train(cfg, runs_root=runs, resume=resume, quiet=quiet)
    except KeyboardInterrupt as exc:
        if main_process:
            resume_hint = (
                f"; continue exactly with `cliptune train --resume {exc.run_dir}`"
                if isinstance(exc, TrainingInterrupted)
                else ""
            )
            err_console.print(f"[yellow]{exc or 'interrupted'}{resume_hint}[/yellow]")
        raise typer.Exit(130) from None
    except (TrainingError, CatalogueError, BackboneError, ValueError) as exc:
        err_console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    if main_process:
        console.print(f"run written to [bold]{run_dir}[/bold] (summary: {run_dir / 'summary.json'})")


def _register_commands() -> None:
    """Commands that live in cliptune.cli (one module per command), in --help order."""
    from cliptune.cli import demo as demo_cmd
    from cliptune.cli import eval as eval_cmd
    from cliptune.cli import report as report_cmd
    from cliptune.cli import search as search_cmd
    from cliptune.cli import sweep as sweep_cmd
    from cliptune.cli import test as suite_cmd

    for module in (demo_cmd, eval_cmd, suite_cmd, report_cmd, sweep_cmd, search_cmd):
        module.register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app()
