"""What a run's config says about its data, for commands that take "a run or a model" (test, index, embed).

One home for the defaults a run gives: its catalogue, its feature cache and its caption column
(``data.text_column``), so ``cliptune index RUN`` finds the same catalogue and caption as ``eval RUN`` and
``test RUN`` without ``--data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from cliptune.cli.errors import err_console, exit_on_error

__all__ = ["RunData", "run_data", "data_for"]


@dataclass(frozen=True)
class RunData:
    """The data settings of a run's ``config.yaml``.

    Attributes:
        catalogue: ``data.catalogue`` (None when the config names none).
        cache_dir: ``model.cache_dir``.
        text_column: ``data.text_column``, the caption column.
    """

    catalogue: Path | None
    cache_dir: Path | None
    text_column: str


def run_data(path: Path | str) -> RunData | None:
    """The data settings of the run at ``path``, or None when ``path`` is not a run directory."""
    from cliptune.config import load_config
    from cliptune.rundir import RunDir, is_run

    if not is_run(path):
        return None
    cfg = load_config(RunDir(Path(path)).config)
    return RunData(cfg.data.catalogue, cfg.model.cache_dir, cfg.data.text_column)


def data_for(
    target: str, data: Path | None, text_column: str | None, cache_dir: Path | None
) -> tuple[Path, str, Path | None]:
    """``(catalogue, caption column, cache dir)`` for a command on ``target``: the flags, else the run's.

    A bare model (folder, hub id, ``embedded``) has no run to default from: without ``data`` the command
    exits 2 naming ``--data``; its caption column defaults to ``text``.
    """
    with exit_on_error(2):
        run = run_data(target)
    catalogue = data or (run.catalogue if run is not None else None)
    if catalogue is None:
        what = "its config has no data.catalogue" if run is not None else "not a run directory"
        err_console.print(
            f"[red]{target}: {what}; give the catalogue with --data CATALOGUE[/red]", highlight=False
        )
        raise typer.Exit(2)
    if run is None:
        return catalogue, text_column or "text", cache_dir
    return catalogue, text_column or run.text_column, cache_dir or run.cache_dir
