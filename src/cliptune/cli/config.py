"""``cliptune config``: show (and so validate), describe and document run configs; the shared config options.

``--set`` and :func:`load_config_or_exit` live here because a config is this group's subject; ``train``
uses them too, so an invalid config reads and exits the same (2) everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import fail
from cliptune.errors import CliptuneError

if TYPE_CHECKING:
    from cliptune.config import Config

__all__ = ["SetOption", "load_config_or_exit", "register"]

console = Console(soft_wrap=True)

SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 (typer needs Optional here on Python 3.10)
    typer.Option("--set", help="Override a config field, e.g. --set train.lr=1e-4 (repeatable)."),
]

config_app = typer.Typer(
    help="Run configs: `show` resolves and validates one (exit 2 if invalid), `schema` prints the JSON "
    "schema, `docs` the reference.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``config`` group to ``app``."""
    app.add_typer(config_app, name="config")


def load_config_or_exit(path: Path | None, overrides: list[str] | None) -> Config:
    """Load and validate a config; an invalid one is printed (file and field) and exits 2.

    Args:
        path: The YAML file; None: the defaults.
        overrides: ``--set`` values, ``field.path=value``.

    Returns:
        The validated config.

    Raises:
        typer.Exit: 2, after printing the error.
    """
    from cliptune.config import load_config

    try:
        return load_config(path, overrides or [])
    except CliptuneError as exc:
        fail(exc, 2)


@config_app.command("show")
def config_show(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; omitted: the defaults.")] = None,  # noqa: UP045
    set_: SetOption = None,
) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied).

    Examples:
        cliptune config show
        cliptune config show run.yaml --set train.lr=1e-4 --set data.split.ratios="{train: 0.6, val: 0.4}"
    """
    from cliptune.config import dump_config

    cfg = load_config_or_exit(config, set_)
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
    from cliptune.rundir import write_text_atomic

    text = config_markdown()
    if out is None:
        console.print(text, end="", highlight=False, markup=False)
    else:
        write_text_atomic(out, text)
