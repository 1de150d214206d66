"""What to evaluate when there is no run: a catalogue's rows and splits, and the reading order of splits.

A bare model has no ``splits.json``: the catalogue's own ``split`` column says which rows form which split;
without that column every row is in the split :data:`ALL_SPLIT`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cliptune.config import DataConfig
from cliptune.data.catalogue import CatalogueError, read_catalogue
from cliptune.data.check import check_catalogue
from cliptune.data.prepare import PreparedData
from cliptune.data.splits import group_ids
from cliptune.evaluation.errors import RejectedRowsError

__all__ = ["ALL_SPLIT", "prepare_catalogue", "split_order"]

ALL_SPLIT = "all"  # split name of a catalogue evaluated whole (bare model, no `split` column)


def prepare_catalogue(
    catalogue: Path,
    *,
    group_column: str = "group",
    text_column: str = "text",
    max_pixels: int | None = None,
    progress: bool = False,
) -> PreparedData:
    """Checked rows of a catalogue evaluated without a run: split from its ``split`` column, else ``all``.

    A bare model has no ``splits.json``: the catalogue's own ``split`` column says which rows form which
    split; without that column every row is in the split ``all``. Bad rows are an error (listed), never
    dropped: clean the catalogue first.

    Args:
        catalogue: Catalogue folder.
        group_column: Column of groups (relevance by group; triplets).
        text_column: Caption column (required; its blank cells are bad rows).
        max_pixels: Decompression-bomb limit (default: the data config's default).
        progress: Progress bar while images are checked.

    Returns:
        The :class:`~cliptune.data.prepare.PreparedData` with a ``split`` column.

    Raises:
        RejectedRowsError: Rows the check rejects (listed; a CatalogueError too).
        CatalogueError: Unreadable catalogue, no caption column, or rows without a split value
            in a catalogue that has a ``split`` column (named).
    """
    cat = read_catalogue(Path(catalogue), text_column)
    limit = max_pixels if max_pixels is not None else DataConfig().max_pixels
    result = check_catalogue(cat, max_pixels=limit, progress=progress, group_column=group_column)
    if result.rejected:
        raise RejectedRowsError(cat.metadata_path, [(r.row, r.file_name, r.reason) for r in result.rejected])
    rows = result.good.reset_index(drop=True)
    if "split" in rows.columns:
        labels = rows["split"].astype("string").str.strip()
        missing = rows.loc[labels.isna() | (labels == ""), "row"].tolist()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise CatalogueError(
                f"{cat.metadata_path}: column 'split' is empty in {len(missing)} row(s) (rows {shown}); "
                "give every row a split, or drop the column to evaluate the whole catalogue as 'all'"
            )
        labels = labels.astype(str)
    else:
        labels = pd.Series([ALL_SPLIT] * len(rows))
    rows = rows.assign(split=labels.to_numpy())
    gids = group_ids(rows, group_column)
    splits = {str(name): sorted(set(gids[rows["split"] == name])) for name in sorted(set(rows["split"]))}
    return PreparedData(catalogue=cat, rows=rows, splits=splits, check=result)


def split_order(splits: Mapping[str, Any]) -> list[str]:
    """Split names in reading order: train, val, test, then the others alphabetically."""
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(splits, key=lambda s: (order.get(s, 3), s))
