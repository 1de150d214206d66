"""The ``cliptune`` command line: builds the app and registers one module per command, in --help order.

Each command lives in ``cliptune.cli.<command>`` (``data`` and ``config`` are groups) and parses its
arguments, builds typed objects, calls the library and prints; library errors become exit codes in
:mod:`cliptune.cli.errors` only. Heavy imports (torch, transformers) happen inside commands so that
``cliptune --help`` stays instant.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cliptune import __version__
from cliptune.cli import (
    compare,
    config,
    data,
    demo,
    embed,
    eval,  # noqa: A004 (the module of `cliptune eval`)
    index,
    report,
    search,
    sweep,
    test,
    train,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="cliptune",
    help="Fine-tune, evaluate, gate and compare CLIP-family image-text models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

console = Console(soft_wrap=True)

# --help order: commands in this order, then the groups (typer lists groups after commands)
COMMANDS = (train, demo, eval, test, report, compare, sweep, index, embed, search, config, data)


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


for _module in COMMANDS:
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
