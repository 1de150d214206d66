"""Export a catalogue's embeddings to one Parquet file, for users who load vectors into their own store.

The file has one row per catalogue row, in metadata order:

```
file_name        the catalogue's file_name (the id an index uses)
caption          the caption column (``text`` unless another is chosen)
<attributes>     every attribute column of the catalogue, as read
image_embedding  list<float32>, D values, L2-normalised (the image's final embedding)
text_embedding   list<float32>, D values, L2-normalised (only with ``texts=True``)
```

and schema metadata under the key ``cliptune`` (JSON; :func:`read_embeddings_metadata` reads it) naming
the model that produced the vectors (``LoadedModel.name``, where it was loaded from, the dimension).
Vectors come from :func:`cliptune.models.embed.embed_images_with` / ``embed_texts_with``, the path eval,
``cliptune index`` and search use, so the image vectors equal an index's stored vectors bit for bit.
Bad catalogue rows stop the export, named, as they stop an index build. See ``docs/embed.md``.

Example:
    >>> model = load_model("runs/demo-finetuned")  # doctest: +SKIP
    >>> export_embeddings(model, read_catalogue(Path("data/fashion")), Path("fashion.parquet"))  # doctest: +SKIP
    >>> pd.read_parquet("fashion.parquet")["image_embedding"][0].shape  # doctest: +SKIP
    (24,)
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cliptune.data.catalogue import Catalogue
from cliptune.data.check import Rejection, check_catalogue
from cliptune.models.cache import Precision
from cliptune.models.embed import catalogue_paths, embed_texts_with
from cliptune.models.factory import LoadedModel
from cliptune.rundir import write_bytes_atomic
from cliptune.search.index import IndexBadRowsError, SearchIndexError, _embed_rows, _source
from cliptune.search.sharded import SINGLE, Processes, gather_rows, on_every, on_main, shard_rows

__all__ = [
    "EmbedBadRowsError",
    "EmbedError",
    "METADATA_KEY",
    "export_embeddings",
    "read_embeddings_metadata",
]

FORMAT = "cliptune-embeddings"
VERSION = 1
METADATA_KEY = b"cliptune"  # the Parquet schema-metadata key holding the JSON description
CAPTION, IMAGE, TEXT = "caption", "image_embedding", "text_embedding"


class EmbedError(SearchIndexError):
    """A problem exporting embeddings; the message names the file or column and the reason."""


class EmbedBadRowsError(IndexBadRowsError):
    """The catalogue has bad rows, so nothing is exported: the file must not silently miss rows.

    The same policy (and CLI hint) as an index build; the message lists the first ten rows with reasons.

    Attributes:
        catalogue: The catalogue folder.
        metadata_path: Its metadata file.
        rejected: Every bad row (file, row number, reason).
    """

    def __init__(self, catalogue: Path, metadata_path: Path, rejected: list[Rejection]) -> None:
        super().__init__(catalogue, metadata_path, rejected, nothing="embedded")


def export_embeddings(
    model: LoadedModel,
    catalogue: Catalogue,
    out: Path,
    *,
    text_column: str | None = None,
    texts: bool = False,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    batch_size: int = 64,
    progress: bool = True,
    processes: Processes = SINGLE,
) -> dict[str, Any]:
    """Embed every row of a catalogue and write the rows with their vectors to a Parquet file.

    The catalogue is checked first (``cliptune data check`` rules, blank captions included) and any bad row stops the export, named. Each image is embedded once however many rows it has, in the
    order in which images first appear (as an index build does, so the vectors are the same bits), then
    repeated for each of its rows. The file is written atomically: a reader sees the old file or the new.

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        catalogue: From :func:`cliptune.data.catalogue.read_catalogue`.
        out: The Parquet file to write (replaced atomically; its folder is created).
        text_column: The caption column, written as ``caption`` (and embedded with ``texts``); default: the
            catalogue's own (``read_catalogue(..., text_column)``).
        texts: Also embed each row's caption into ``text_embedding``.
        cache_dir: Feature cache folder (default: the shared one).
        precision: ``auto``, ``fp32`` or ``bf16`` for the tower forward.
        batch_size: Images per forward.
        progress: Progress bars.
        processes: This process among several launched together
            (:func:`cliptune.search.sharded.launched_processes`): each embeds a contiguous shard of the
            images, the main process gathers them in catalogue order and writes the file (the 1-process
            file; captions' ``text_embedding`` is computed there); every process returns its description.

    Returns:
        The description written into the file's metadata (see :func:`read_embeddings_metadata`).

    Raises:
        EmbedBadRowsError: Bad catalogue rows (an :class:`~cliptune.search.index.IndexBadRowsError`).
        CatalogueError: An unknown ``text_column``.
        EmbedError: An attribute column named like an output column, an empty
            catalogue, or ``out`` is a folder.

    Shapes:
        ``image_embedding`` and ``text_embedding``: (N rows, D) float32, stored as list<float32>.

    Example:
        >>> info = export_embeddings(load_model("runs/ft"), read_catalogue(Path("data/fashion")),
        ...                          Path("fashion.parquet"), texts=True)  # doctest: +SKIP
        >>> info["n_rows"], info["dim"]  # doctest: +SKIP
        (600, 24)
    """
    out = Path(out)
    if out.is_dir():
        raise EmbedError(f"{out} is a folder; the embeddings are written to one Parquet file")
    if text_column is not None and text_column != catalogue.text_column:
        catalogue = catalogue.with_text_column(text_column)
    text_column = catalogue.text_column
    progress = progress and processes.main  # one set of bars, the main process's
    rows = on_every(processes, lambda: _checked_rows(catalogue, progress))
    names = [str(f) for f in rows["file_name"]]
    unique = list(dict.fromkeys(names))  # first-appearance order, as build_index embeds them
    paths = catalogue_paths(catalogue, unique)
    mine = shard_rows(len(paths), batch_size, processes) if processes.world > 1 else range(len(paths))
    part = on_every(
        processes,
        lambda: _embed_rows(model, [paths[r] for r in mine], cache_dir, precision, batch_size, progress),
    )
    images = gather_rows(processes, part)  # (U, D) float32, L2-normalised, on the main process only

    def write() -> dict[str, Any]:  # runs on the main process only, where the rows were gathered
        assert images is not None
        return _write(
            model, catalogue, out, rows, names, unique, images, texts, cache_dir, precision, progress
        )

    return on_main(processes, write)  # the other processes wait for its outcome and get its description


def _write(
    model: LoadedModel,
    catalogue: Catalogue,
    out: Path,
    rows: pd.DataFrame,
    names: list[str],
    unique: list[str],
    images: np.ndarray,
    texts: bool,
    cache_dir: Path | None,
    precision: Precision,
    progress: bool,
) -> dict[str, Any]:
    """Repeat each image's vector for its rows, embed the captions if asked, and write the Parquet file."""
    text_column = catalogue.text_column
    position = {name: i for i, name in enumerate(unique)}
    vectors = {IMAGE: images[[position[n] for n in names]]}  # (N, D): each image repeated for its rows
    captions = [str(t) for t in rows[text_column]]
    if texts:
        vectors[TEXT] = embed_texts_with(
            model, captions, cache_dir=cache_dir, precision=precision, progress=progress
        ).numpy()  # (N, D)
    info = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.name,
        "model_source": _source(Path(model.source)),
        "dim": int(images.shape[1]),
        "n_rows": len(names),
        "n_images": len(unique),
        "catalogue": str(Path(catalogue.root).resolve()),
        "text_column": text_column,
        "normalised": True,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    table = _table(rows, catalogue, text_column, captions, vectors)
    info["columns"] = table.column_names
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode("utf-8")})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, sink.getvalue().to_pybytes())
    return info


def read_embeddings_metadata(path: Path | str) -> dict[str, Any]:
    """The description :func:`export_embeddings` stored in a Parquet file's schema (model, dim, counts).

    Reads only the file's footer.

    Raises:
        EmbedError: The file is missing or not Parquet, or carries no cliptune description.

    Example:
        >>> read_embeddings_metadata("fashion.parquet")["model"]  # doctest: +SKIP
    """
    path = Path(path)
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise EmbedError(f"{path}: not a readable Parquet file ({exc})") from None
    if METADATA_KEY not in metadata:
        raise EmbedError(f"{path}: no cliptune description; not written by `cliptune embed`")
    info: dict[str, Any] = json.loads(metadata[METADATA_KEY])
    return info


def _attributes(rows: pd.DataFrame, catalogue: Catalogue) -> list[str]:
    return [a for a in catalogue.attributes if a in rows.columns]


def _checked_rows(catalogue: Catalogue, progress: bool) -> pd.DataFrame:
    """The catalogue's rows once every one passed the checks; bad rows, and bad column names, raise."""
    taken = [a for a in _attributes(catalogue.rows, catalogue) if a in (CAPTION, IMAGE, TEXT)]
    if taken:
        raise EmbedError(
            f"{catalogue.metadata_path}: attribute column(s) {', '.join(taken)} would clash with the "
            f"output columns {CAPTION}, {IMAGE}, {TEXT}; rename them"
        )
    checked = check_catalogue(catalogue, progress=progress)  # blank captions of the caption column too
    rejected = list(checked.rejected)
    if rejected:
        raise EmbedBadRowsError(catalogue.root, catalogue.metadata_path, rejected)
    if checked.good.empty:
        raise EmbedError(f"{catalogue.metadata_path}: no rows to embed")
    return checked.good


def _table(
    rows: pd.DataFrame,
    catalogue: Catalogue,
    text_column: str,
    captions: list[str],
    vectors: dict[str, np.ndarray],
) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "file_name": pa.array([str(f) for f in rows["file_name"]], type=pa.string()),
        CAPTION: pa.array(captions, type=pa.string()),
    }
    for name in _attributes(rows, catalogue):
        if name != text_column:
            columns[name] = _column(rows[name])
    for name, matrix in vectors.items():
        n, d = matrix.shape
        offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
        values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
        columns[name] = pa.ListArray.from_arrays(offsets, values)
    return pa.table(columns)


def _column(values: pd.Series) -> pa.Array:
    """An attribute as Arrow infers it; text (missing stays null) when its cells mix types."""
    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if _missing(v) else str(v) for v in values], type=pa.string())


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))
