"""Validate a catalogue row by row: every bad row is listed with a precise reason, none is dropped silently.

``cliptune data check CATALOGUE [--write-clean OUT]`` is :func:`check_catalogue` followed by
:func:`write_clean`. Every reason text is listed in ``docs/catalogues.md``.

Example:
    >>> result = check_catalogue(read_catalogue(Path("data/fashion")), max_pixels=50_000_000)  # doctest: +SKIP
    >>> [(r.row, r.reason) for r in result.rejected]  # doctest: +SKIP
    [(7, 'file not found'), (9, 'empty text')]
    >>> write_clean(result, catalogue, Path("data/fashion-clean"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
import pandas as pd
from rich.progress import track

from cliptune.data.catalogue import (
    CATALOGUE_JSON,
    METADATA_NAMES,
    TRIPLET_COLUMNS,
    TRIPLET_NAMES,
    Catalogue,
    require_columns,
    required_columns,
)
from cliptune.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, probe_image
from cliptune.data.splits import group_ids
from cliptune.rundir import write_text_atomic

__all__ = ["CheckResult", "Rejection", "check_catalogue", "write_clean"]

_SCALARS = (str, int, float, bool, np.integer, np.floating, np.bool_)


@dataclass(frozen=True)
class Rejection:
    """A rejected row and why.

    Attributes:
        file_name: The row's ``file_name`` as written (``""`` when missing; the anchor for a triplet).
        row: The row number (see :attr:`Catalogue.rows`).
        reason: Every problem found in the row, joined with ``"; "``.
        source: The file the row is from (``metadata.csv``, ``triplets.csv``, ...).
    """

    file_name: str
    row: int
    reason: str
    source: str = "metadata"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`check_catalogue`: ``good`` rows plus ``rejected`` rows are exactly all rows.

    Attributes:
        good: The rows that passed, as in :attr:`Catalogue.rows` (same columns, ``row`` kept).
        rejected: One :class:`Rejection` per bad metadata row, in row order.
        good_triplets: The triplet rows that passed, or None when the catalogue has no triplets file.
        rejected_triplets: One :class:`Rejection` per bad triplet row.
    """

    good: pd.DataFrame
    rejected: list[Rejection]
    good_triplets: pd.DataFrame | None = None
    rejected_triplets: list[Rejection] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was rejected."""
        return not self.rejected and not self.rejected_triplets


def check_catalogue(
    catalogue: Catalogue,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    group_column: str = "group",
) -> CheckResult:
    """Check every row of a catalogue and sort the rows into good and rejected.

    A row is rejected when its ``file_name`` is missing or escapes the catalogue folder (``../x.jpg``, an
    absolute path), its image is missing, empty, unreadable, truncated or larger than ``max_pixels``, its
    caption (the catalogue's ``text_column``, ``text`` by default) is missing or blank, it repeats an
    earlier row's ``file_name`` and caption (the later rows are rejected, naming the first), a cell holds a non-scalar value (list, dict, ...), its image is listed
    in several groups, or its group carries conflicting explicit ``split`` values (every row of the group
    is rejected). Each image file is decoded once, however many caption rows it has.

    Args:
        catalogue: From :func:`~cliptune.data.catalogue.read_catalogue`.
        max_pixels: Largest accepted ``width * height`` per image.
        progress: Show a progress bar while images are probed (useful on big catalogues).
        group_column: Column naming each row's group (``data.group_column`` in the config).

    Returns:
        The :class:`CheckResult`.

    Raises:
        CatalogueError: the rows lack a ``file_name`` or caption column.
    """
    rows, caption = catalogue.rows, catalogue.text_column
    require_columns(rows, required_columns(caption), catalogue.metadata_path)
    reasons: dict[int, list[str]] = defaultdict(list)  # position in rows -> problems
    names = rows["file_name"].tolist()
    texts = rows[caption].tolist()
    numbers = rows["row"].tolist()

    usable: dict[int, str] = {}  # position -> file_name that may name an image
    for i, name in enumerate(names):
        problem = _path_problem(name)
        if problem:
            reasons[i].append(problem)
        else:
            usable[i] = name
    for i, number in enumerate(numbers):
        if number in catalogue.problems:  # a fault of the row's source no column shows (a shard's JSON)
            reasons[i].append(catalogue.problems[number])
    for i, text in enumerate(texts):
        problem = _text_problem(text, caption)
        if problem:
            reasons[i].append(problem)
    for column in rows.columns:
        if column in ("row", "file_name", caption) or rows[column].dtype != object:
            continue
        for i, value in enumerate(rows[column].tolist()):
            if not _is_scalar(value):
                reasons[i].append(f"unknown column type: '{column}' holds a {type(value).__name__}")

    first_seen: dict[tuple[str, str], int] = {}
    for i, name in usable.items():
        if not isinstance(texts[i], str) or not texts[i].strip():
            continue
        first = first_seen.setdefault((name, texts[i].strip()), i)
        if first != i:
            reasons[i].append(f"duplicate of row {numbers[first]} (same file_name and {caption})")

    image_reason: dict[str, str | None] = {}
    unique_names = sorted(set(usable.values()))
    for name in track(unique_names, description="Checking images", disable=not progress):
        try:
            probe_image(catalogue.image_path(name), max_pixels)
            image_reason[name] = None
        except ImageLoadError as exc:
            image_reason[name] = exc.reason
    for i, name in usable.items():
        if image_reason[name]:
            reasons[i].append(str(image_reason[name]))

    _check_groups(rows, usable, reasons, group_column)

    bad = sorted(reasons)
    rejected = [
        Rejection(_name_text(names[i]), int(numbers[i]), "; ".join(reasons[i]), _source(catalogue))
        for i in bad
    ]
    good = rows[~np.isin(np.arange(len(rows)), bad)]
    good_triplets, rejected_triplets = _check_triplets(catalogue, good)
    return CheckResult(good, rejected, good_triplets, rejected_triplets)


def write_clean(result: CheckResult, catalogue: Catalogue, out: Path) -> tuple[Path, Path]:
    """Write the good rows as a clean catalogue and the bad ones as ``rejected.csv``.

    ``out/metadata.csv`` keeps the good rows (every column but ``row``) with their ``file_name`` unchanged;
    ``out/catalogue.json`` points ``image_root`` at the source images, so ``read_catalogue(out)`` finds them
    without copying a byte and the clean catalogue passes :func:`check_catalogue`. Good triplets go to
    ``out/triplets.csv``. ``out/rejected.csv`` has columns ``file_name,row,reason,source``, one line per
    rejected row, ``row`` numbered as in the source file.

    Args:
        result: From :func:`check_catalogue` on ``catalogue``.
        catalogue: The checked catalogue.
        out: Output folder (created); must not be the catalogue folder.

    Returns:
        ``(out/metadata.csv, out/rejected.csv)``.

    Raises:
        ValueError: ``out`` is the catalogue folder, or already holds another metadata or triplets file that
            would make the clean catalogue ambiguous.
    """
    out = Path(out)
    if out.resolve() == catalogue.root.resolve():
        raise ValueError(f"{out}: write the clean catalogue to another folder than the catalogue itself")
    ours = {"metadata.csv", "triplets.csv"} if result.good_triplets is not None else {"metadata.csv"}
    stale = [n for n in METADATA_NAMES + TRIPLET_NAMES if n not in ours and (out / n).exists()]
    if stale:
        raise ValueError(f"{out}: already holds {', '.join(stale)}; remove it or choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    assert catalogue.image_root is not None
    write_text_atomic(
        out / CATALOGUE_JSON, json.dumps({"image_root": str(catalogue.image_root.resolve())}) + "\n"
    )
    metadata = out / "metadata.csv"
    write_text_atomic(metadata, result.good.drop(columns="row").to_csv(index=False))
    if result.good_triplets is not None:
        write_text_atomic(out / "triplets.csv", result.good_triplets.drop(columns="row").to_csv(index=False))
    rejected = out / "rejected.csv"  # the clean catalogue's list, not a run directory's
    table = pd.DataFrame(
        [(r.file_name, r.row, r.reason, r.source) for r in result.rejected + result.rejected_triplets],
        columns=["file_name", "row", "reason", "source"],
    )
    write_text_atomic(rejected, table.to_csv(index=False))
    return metadata, rejected


def _path_problem(name: object) -> str | None:
    if _is_missing(name):
        return "missing file_name"
    if not isinstance(name, str):
        return f"file_name is not text ({type(name).__name__})"
    if not name.strip():
        return "missing file_name"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or PureWindowsPath(name).drive:
        return f"path escapes the catalogue folder (absolute path): {name}"
    normal = posixpath.normpath(unified)
    if normal == ".." or normal.startswith("../"):
        return f"path escapes the catalogue folder: {name}"
    if normal == ".":
        return f"file_name names the catalogue folder, not a file: {name}"
    return None


def _text_problem(text: object, column: str) -> str | None:
    """The caption's problem, named by its column (``missing text``, ``empty title (only whitespace)``)."""
    if _is_missing(text):
        return f"missing {column}"
    if not isinstance(text, str):
        return f"{column} is not text ({type(text).__name__})"
    return None if text.strip() else f"empty {column} (only whitespace)"


def _check_groups(
    rows: pd.DataFrame, usable: dict[int, str], reasons: dict[int, list[str]], group_column: str
) -> None:
    gids = group_ids(rows, group_column).tolist()
    if group_column in rows.columns:
        groups_of: dict[str, set[str]] = defaultdict(set)
        for i, name in usable.items():
            groups_of[name].add(gids[i])
        for i, name in usable.items():
            if len(groups_of[name]) > 1:
                reasons[i].append(f"file_name is in several groups: {', '.join(sorted(groups_of[name]))}")
    if "split" not in rows.columns:
        return
    splits_of: dict[str, set[str]] = defaultdict(set)
    for i, value in enumerate(rows["split"].tolist()):
        if not _is_missing(value) and _is_scalar(value) and str(value).strip():
            splits_of[gids[i]].add(str(value))
    for i, gid in enumerate(gids):
        if len(splits_of[gid]) > 1:
            reasons[i].append(
                f"group '{gid}' has conflicting explicit splits: {', '.join(sorted(splits_of[gid]))}"
            )


def _check_triplets(catalogue: Catalogue, good: pd.DataFrame) -> tuple[pd.DataFrame | None, list[Rejection]]:
    triplets = catalogue.triplets
    if triplets is None:
        return None, []
    assert catalogue.triplets_path is not None
    require_columns(triplets, TRIPLET_COLUMNS, catalogue.triplets_path)
    known = set(good["file_name"])
    rejected, bad = [], []
    for i, record in enumerate(triplets[["row", *TRIPLET_COLUMNS]].itertuples(index=False)):
        problems = []
        for role, name in zip(TRIPLET_COLUMNS, record[1:], strict=True):
            if _is_missing(name) or not isinstance(name, str) or not name.strip():
                problems.append(f"missing {role}")
            elif name not in known:
                problems.append(f"{role} '{name}' is not a good catalogue row")
        if record.negative in (record.anchor, record.positive) and not _is_missing(record.negative):
            problems.append("negative is the same file as the anchor or positive")
        if problems:
            bad.append(i)
            anchor = _name_text(record.anchor)
            row = record.row
            assert isinstance(row, int | np.integer)  # the int64 row number the catalogue reader adds
            rejected.append(Rejection(anchor, int(row), "; ".join(problems), catalogue.triplets_path.name))
    return triplets[~np.isin(np.arange(len(triplets)), bad)], rejected


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _is_scalar(value: object) -> bool:
    return _is_missing(value) or isinstance(value, _SCALARS)


def _name_text(value: object) -> str:
    return "" if _is_missing(value) else str(value)


def _source(catalogue: Catalogue) -> str:
    return catalogue.metadata_path.name
