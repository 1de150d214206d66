"""Read a catalogue: a folder of images plus one metadata file (the Hugging Face ``imagefolder`` convention).

Reading never drops or fixes a row: every data row of the metadata file becomes a row of
:attr:`Catalogue.rows`, numbered so that an error can point the user at it. Judging rows is the job of
:func:`cliptune.data.check.check_catalogue`. The format is described in ``docs/catalogues.md``.

Example:
    >>> from cliptune.data.synthetic.fashion import render_fashion
    >>> cat = read_catalogue(render_fashion(Path("data/fashion"), n=4))
    >>> cat.rows[["row", "file_name", "group"]].head(2)
       row          file_name group
    0    1  images/000000.png  p0000
    1    2  images/000001.png  p0000
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from cliptune.errors import CliptuneError

__all__ = [
    "Catalogue",
    "CatalogueError",
    "MissingCaptionError",
    "image_root",
    "read_catalogue",
    "METADATA_NAMES",
    "TRIPLET_NAMES",
]

METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
TRIPLET_NAMES = ("triplets.csv", "triplets.jsonl", "triplets.parquet")
CATALOGUE_JSON = "catalogue.json"
DEFAULT_TEXT_COLUMN = "text"  # the caption column unless data.text_column names another
TRIPLET_COLUMNS = ("anchor", "positive", "negative")
# Columns with a meaning of their own; every other metadata column (but the caption column) is an attribute.
RESERVED_COLUMNS = ("row", "file_name", "text", "group", "split")
# Read as text from CSV so ids like "007" or "1" keep their spelling and a caption "NA" stays a caption.
_TEXT_COLUMNS = {"file_name": str, "text": str, "group": str, "split": str, "anchor": str, "positive": str}
_TEXT_COLUMNS |= {"negative": str, "anchor_text": str, "positive_text": str, "negative_text": str}


class CatalogueError(CliptuneError, ValueError):
    """A problem with the catalogue as a whole (no metadata file, a missing column, a syntax error)."""


class MissingCaptionError(CatalogueError):
    """The metadata has no column of the caption column's name (``text`` unless ``data.text_column`` says).

    Attributes:
        text_column: The caption column looked for.
    """

    def __init__(self, path: Path, text_column: str, columns: list[str]) -> None:
        super().__init__(f"{path}: no caption column '{text_column}' (columns: {', '.join(columns)})")
        self.path, self.text_column, self.columns = path, text_column, columns

    def __reduce__(self) -> tuple[type[MissingCaptionError], tuple[Path, str, list[str]]]:
        return type(self), (
            self.path,
            self.text_column,
            self.columns,
        )  # picklable despite the custom __init__


@dataclass(frozen=True)
class Catalogue:
    """A catalogue as read from disk, before any validation.

    Attributes:
        root: The catalogue folder (where the metadata file is).
        metadata_path: The one ``metadata.csv`` / ``.jsonl`` / ``.parquet`` file.
        rows: One row per data row of the metadata file, in file order, with an added ``row`` column: the
            1-based data row number (CSV: the record number after the header, i.e. the line number minus 1
            when no caption spans lines; JSONL: the line number; Parquet: the row position + 1).
        attributes: Metadata columns other than ``file_name``, the caption column, ``text``, ``text_*``
            (alternative captions), ``group`` and ``split``, in file order (e.g. ``garment``, ``colour``,
            ``rips``); suites and search filters name them.
        image_root: Folder that ``file_name`` values are relative to: ``root`` unless a ``catalogue.json``
            beside the metadata says otherwise (clean manifests written by ``write_clean`` do).
        triplets: Explicit triplets from ``triplets.csv`` / ``.jsonl`` / ``.parquet`` beside the metadata
            (``anchor``, ``positive``, ``negative`` file names, optional ``*_text`` columns, a ``row``
            column numbered like ``rows``), or None when there is no such file.
        triplets_path: The triplets file, or None.
        text_column: The caption column (``data.text_column``): required, checked for blank captions,
            embedded by the text tower, shown as the caption by search; never an attribute.
        problems: Row number -> a fault the reader found in the row's source that no column shows (a
            WebDataset sample whose JSON member is missing or broken); the check rejects those rows.
    """

    root: Path
    metadata_path: Path
    rows: pd.DataFrame
    attributes: list[str]
    image_root: Path | None = None
    triplets: pd.DataFrame | None = None
    triplets_path: Path | None = None
    text_column: str = DEFAULT_TEXT_COLUMN
    problems: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_root is None:
            object.__setattr__(self, "image_root", self.root)

    @property
    def filters(self) -> list[str]:
        """Columns a filter may name (suite selectors, ``search --where``): attributes, plus ``group``."""
        return [*self.attributes, *(["group"] if "group" in self.rows.columns else [])]

    def with_text_column(self, text_column: str) -> Catalogue:
        """The same catalogue read with another caption column (e.g. ``text_generic``), attributes recomputed.

        Raises:
            CatalogueError: the metadata has no such column.
        """
        _require_caption(self.rows, text_column, self.metadata_path)
        return replace(self, text_column=text_column, attributes=attribute_columns(self.rows, text_column))

    def image_path(self, file_name: str) -> Path:
        """The image file a ``file_name`` value names (no existence or escape check: see ``check``)."""
        assert self.image_root is not None
        return self.image_root / file_name


def read_catalogue(root: Path, text_column: str = DEFAULT_TEXT_COLUMN) -> Catalogue:
    """Read a catalogue folder and its metadata, keeping every row.

    The caption column is part of how a catalogue is read, not of each command: every reader (check,
    train, eval, suites, index, embed) gets it from here, so ``data.text_column: title`` means the same
    thing everywhere and no command requires a ``text`` column beside it.

    Args:
        root: Folder holding the images and exactly one of ``metadata.csv``, ``metadata.jsonl``,
            ``metadata.parquet``; or a pattern of WebDataset shards (``shards/{00000..00099}.tar``, local
            or an fsspec URL), read by :func:`cliptune.data.shards.read_shards`. CSV cells are missing only when empty; ``file_name``, the caption column,
            ``text``, ``group`` and ``split`` are read as text.
        text_column: The caption column (``data.text_column``; default ``text``).

    Returns:
        The :class:`Catalogue`, rows in file order.

    Raises:
        CatalogueError: the folder or metadata file is missing, there are several metadata files, the file
            cannot be parsed (the message names the line), a required column (``file_name``, the caption
            column) is absent, or a column is named ``row`` (reserved for the row number).
    """
    from cliptune.data import shards  # imports this module: imported here

    if shards.is_shard_spec(root):
        return shards.read_shards(root, text_column)
    root = Path(root)
    if not root.is_dir():
        raise CatalogueError(f"{root}: catalogue folder not found")
    metadata_path = _find_one(root, METADATA_NAMES, required=True)
    assert metadata_path is not None
    rows = _read_table(metadata_path, text_column)
    require_columns(rows, ("file_name",), metadata_path)
    _require_caption(rows, text_column, metadata_path)
    attributes = attribute_columns(rows, text_column)
    triplets_path = _find_one(root, TRIPLET_NAMES, required=False)
    triplets = None
    if triplets_path is not None:
        triplets = _read_table(triplets_path)
        require_columns(triplets, TRIPLET_COLUMNS, triplets_path)
    return Catalogue(
        root=root,
        metadata_path=metadata_path,
        rows=rows,
        attributes=attributes,
        image_root=image_root(root),
        triplets=triplets,
        triplets_path=triplets_path,
        text_column=text_column,
    )


def required_columns(text_column: str = DEFAULT_TEXT_COLUMN) -> tuple[str, ...]:
    """The metadata columns every catalogue needs: ``file_name`` and its caption column."""
    return ("file_name", text_column)


def require_columns(table: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    """Raise :class:`CatalogueError` naming ``path`` and every absent column of ``columns``."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        found = [str(c) for c in table.columns if c != "row"]
        raise CatalogueError(
            f"{path}: missing required column(s) {', '.join(missing)} (found: {', '.join(found)})"
        )


def _require_caption(rows: pd.DataFrame, text_column: str, path: Path) -> None:
    if text_column not in rows.columns:
        raise MissingCaptionError(path, text_column, [str(c) for c in rows.columns if c != "row"])


def attribute_columns(rows: pd.DataFrame, text_column: str) -> list[str]:
    """The attribute columns of catalogue rows: all but the reserved ones, the caption and ``text_*``."""
    # `text_<variant>` columns are alternative captions (e.g. `text_generic`), selectable as
    # data.text_column; they are free text, not attributes to filter on. Nor is the caption column.
    free_text = {*RESERVED_COLUMNS, text_column}
    return [str(c) for c in rows.columns if c not in free_text and not str(c).startswith("text_")]


def _find_one(root: Path, names: tuple[str, ...], required: bool) -> Path | None:
    found = [root / n for n in names if (root / n).is_file()]
    if len(found) > 1:
        raise CatalogueError(
            f"{root}: several files found ({', '.join(p.name for p in found)}); keep exactly one"
        )
    if not found and required:
        raise CatalogueError(f"{root}: no metadata file; expected one of {', '.join(names)}")
    return found[0] if found else None


def _read_table(path: Path, text_column: str = DEFAULT_TEXT_COLUMN) -> pd.DataFrame:
    numbers: Sequence[int]
    try:
        if path.suffix == ".csv":
            dtypes = _TEXT_COLUMNS | {text_column: str}
            table = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])
            numbers = range(1, len(table) + 1)
        elif path.suffix == ".jsonl":
            table, numbers = _read_jsonl(path)
        else:
            table = pd.read_parquet(path)
            numbers = range(1, len(table) + 1)
    except CatalogueError:
        raise
    except UnicodeDecodeError as exc:  # its position counts from a read buffer, not the file: locate it
        raise _not_utf8(path) from exc
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"{path}: cannot be read ({exc})") from exc
    if "row" in table.columns:
        raise CatalogueError(f"{path}: column 'row' is reserved for the row number; rename it")
    numbered: pd.DataFrame = table.reset_index(drop=True)  # annotated: see _read_jsonl
    numbered.insert(0, "row", pd.Series(list(numbers), dtype="int64"))
    return numbered


def _not_utf8(path: Path) -> CatalogueError:
    """The error for a metadata file that is not UTF-8, naming the line and column of the first bad byte."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[start : exc.start].decode("utf-8", errors="replace")) + 1  # in characters
        return CatalogueError(
            f"{path} line {line}, column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            "save the file as UTF-8"
        )
    return CatalogueError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CatalogueError(f"{path} line {number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise CatalogueError(
                    f"{path} line {number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
            numbers.append(number)
    # Annotated: pandas-stubs returns typing.Self here, which is Any for mypy's python_version 3.10.
    table: pd.DataFrame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    return table, numbers


def image_root(root: Path) -> Path:
    """The folder a catalogue's ``file_name`` values are relative to: ``root``, or its ``catalogue.json``'s.

    For readers that need only the images (report thumbnails), not the rows nor their caption column.

    Raises:
        CatalogueError: an unreadable ``catalogue.json``.
    """
    from cliptune.data import shards  # imports this module: imported here

    if shards.is_shard_spec(root):  # file_name values are <shard>/<member>, relative to the shards' folder
        return Path(shards.expand_pattern(root)[0].rpartition("/")[0] or ".")
    pointer = root / CATALOGUE_JSON
    if not pointer.is_file():
        return root
    try:
        info = json.loads(pointer.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogueError(f"{pointer}: cannot be read ({exc})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("image_root"), str):
        raise CatalogueError(f'{pointer}: expected {{"image_root": "<folder>"}}')
    folder: str = info["image_root"]
    return root / folder  # an absolute image_root replaces root
