"""What a run's config says about its data, for commands that take "a run or a model" (test, index, embed).

One home for the defaults a run gives: its catalogue, its feature cache and its caption column
(``data.text_column``), so ``cliptune index RUN`` finds the same catalogue and caption as ``eval RUN`` and
``test RUN`` without ``--data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunData", "run_data"]


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
