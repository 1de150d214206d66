"""Catalogue -> checked rows with a split label: the data every command that trains or evaluates needs.

Bad rows are never dropped silently: with ``on_bad_row: error`` (the default) the first bad rows are
named and nothing runs; with ``skip`` they are written to ``rejected.csv`` in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console

from cliptune.config import DataConfig
from cliptune.data.catalogue import Catalogue, CatalogueError, read_catalogue
from cliptune.data.check import CheckResult, Rejection, check_catalogue
from cliptune.data.splits import assign_rows, load_splits, make_splits, save_splits
from cliptune.rundir import RunDir, write_text_atomic

__all__ = ["BadRowsError", "PreparedData", "prepare_data"]

_console = Console(stderr=True, soft_wrap=True)


class BadRowsError(CatalogueError):
    """The catalogue has bad rows and ``data.on_bad_row`` is ``error``: nothing may run on it.

    The message lists the first ten rows with their reasons; the CLI adds how to clean the catalogue.

    Attributes:
        metadata_path: The catalogue's metadata file.
        rejected: Every bad row (file, row number, reason).
    """

    def __init__(self, metadata_path: Path, rejected: list[Rejection]) -> None:
        shown = "\n".join(f"  row {r.row} ({r.file_name}): {r.reason}" for r in rejected[:10])
        more = f"\n  ... and {len(rejected) - 10} more" if len(rejected) > 10 else ""
        super().__init__(f"{len(rejected)} bad row(s) in {metadata_path}:\n{shown}{more}")
        self.metadata_path = metadata_path
        self.rejected = rejected

    def __reduce__(self) -> tuple[type[BadRowsError], tuple[Path, list[Rejection]]]:
        return type(self), (self.metadata_path, self.rejected)  # picklable despite the custom __init__


@dataclass(frozen=True)
class PreparedData:
    """Checked catalogue rows, each with its ``split``, and the split itself (group ids per split)."""

    catalogue: Catalogue
    rows: pd.DataFrame
    splits: dict[str, list[str]]
    check: CheckResult

    def split_rows(self, name: str) -> pd.DataFrame:
        """Rows of one split, in catalogue order."""
        if name not in self.splits:
            raise KeyError(f"no split '{name}'; splits: {', '.join(sorted(self.splits))}")
        rows: pd.DataFrame = self.rows[self.rows["split"] == name].reset_index(drop=True)
        return rows


def prepare_data(cfg: DataConfig, run_dir: Path | None = None, *, progress: bool = False) -> PreparedData:
    """Read, check and split the configured catalogue; save ``splits.json`` (and ``rejected.csv``).

    With ``on_bad_row: skip`` one line on stderr says how many rows were skipped and where they are listed.

    Args:
        cfg: The ``data`` section; ``cfg.catalogue`` must be set.
        run_dir: Where ``splits.json`` / ``rejected.csv`` go. An existing ``splits.json`` there is reused,
            so a resumed run or a later ``eval`` sees the very same split.
        progress: Show a progress bar while images are checked.

    Returns:
        The prepared rows.

    Raises:
        BadRowsError: Bad rows with ``on_bad_row: error`` (a :class:`CatalogueError`).
        CatalogueError: No catalogue configured, an unreadable catalogue, or no ``data.text_column``
            column in it (the caption column; ``text`` is not required when another is named).
    """
    if cfg.catalogue is None:
        raise CatalogueError("data.catalogue is not set: point it at a catalogue folder")
    catalogue = read_catalogue(Path(cfg.catalogue), cfg.text_column)
    result = check_catalogue(
        catalogue, max_pixels=cfg.max_pixels, progress=progress, group_column=cfg.group_column
    )
    if result.rejected:
        if cfg.on_bad_row == "error":
            raise BadRowsError(catalogue.metadata_path, list(result.rejected))
        if run_dir is not None:  # None: another process of the same run (a rank > 0) writes and tells
            rejected = RunDir(run_dir).rejected
            _write_rejected(result, rejected)
            # on the console, not only in the file: a user must see that the model trains on fewer rows
            _console.print(
                f"skipped {len(result.rejected)} bad row(s) of {catalogue.metadata_path} "
                f"(data.on_bad_row: skip); they are listed in {rejected}",
                highlight=False,
                markup=False,
            )
    rows = result.good.reset_index(drop=True)
    saved = RunDir(run_dir).splits if run_dir is not None else None
    if saved is not None and saved.exists():
        splits = load_splits(saved)
    else:
        splits = make_splits(
            rows,
            cfg.split.ratios,
            cfg.split.seed,
            cfg.group_column,
            cfg.split.stratify,
            min_groups=cfg.split.min_groups,
            method=cfg.split.method,
        )
        if saved is not None:
            save_splits(splits, saved)
    rows = rows.assign(split=assign_rows(rows, splits, cfg.group_column).to_numpy())
    return PreparedData(catalogue=catalogue, rows=rows, splits=splits, check=result)


def _write_rejected(result: CheckResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        [
            {"file_name": r.file_name, "row": r.row, "reason": r.reason, "source": r.source}
            for r in result.rejected
        ],
        columns=["file_name", "row", "reason", "source"],
    )
    write_text_atomic(path, table.to_csv(index=False))
