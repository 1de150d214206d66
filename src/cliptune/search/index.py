"""Build, save and load a search index: a FAISS ``IndexFlatIP`` over image embeddings plus their metadata.

An index folder holds everything a search needs besides the model:

```
OUT/
  index.json    manifest: format version, model identity (LoadedModel.name) and source, catalogue, n, dim
  index.faiss   FAISS IndexFlatIP: exact inner product on L2-normalised image embeddings (= cosine)
  items.jsonl   one line per indexed image, in index order: id (file name), path, captions, attributes
```

The folder is written atomically (:func:`cliptune.rundir.atomic_folder`): everything goes into a hidden
temporary folder next to ``OUT`` that is renamed into place only when complete, so an interrupted build
leaves either no index or the previous one.
An index remembers the model that embedded it and refuses to be rebuilt or queried by another one: scores
of two models live in different spaces. See ``docs/search.md``.

Example:
    >>> model = load_model("runs/demo-finetuned")  # doctest: +SKIP
    >>> build_index(model, read_catalogue(Path("data/fashion")), Path("indexes/fashion"))  # doctest: +SKIP
    >>> index = load_index("indexes/fashion")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cliptune.data.catalogue import Catalogue
from cliptune.data.check import Rejection, check_catalogue
from cliptune.errors import CliptuneError
from cliptune.models.cache import Precision
from cliptune.models.embed import embed_images_with
from cliptune.models.factory import LoadedModel
from cliptune.rundir import atomic_folder, write_text_atomic

__all__ = [
    "read_manifest",
    "IndexBadRowsError",
    "IndexExistsError",
    "ModelMismatchError",
    "SearchIndex",
    "SearchIndexError",
    "build_index",
    "load_index",
]

FORMAT = "cliptune-index"
VERSION = 1
MANIFEST, FAISS_FILE, ITEMS_FILE = "index.json", "index.faiss", "items.jsonl"
# attribute value of one image: a scalar, or the distinct values of its rows when they disagree
AttrValue = str | int | float | bool | None | list[Any]


class SearchIndexError(CliptuneError, ValueError):
    """A problem building, loading or querying an index; the message names the folder and the reason."""


class IndexExistsError(SearchIndexError):
    """``OUT`` holds something a build must not replace without ``overwrite=True``.

    That is a file, a non-empty folder that is not an index, or another model's index (whose users would
    silently get scores from a different space). The CLI adds how to go on (``--overwrite``).

    Attributes:
        out: The index folder that was asked for.
        reason: What is in the way, as a sentence naming ``out`` (the message).
    """

    def __init__(self, out: Path, reason: str) -> None:
        super().__init__(reason)
        self.out = out
        self.reason = reason

    def __reduce__(self) -> tuple[type[IndexExistsError], tuple[Path, str]]:
        return type(self), (self.out, self.reason)  # picklable despite the custom __init__


class ModelMismatchError(SearchIndexError):
    """A query model whose model identity is not the index's: its embeddings live in another space.

    Scores between them would be numbers without meaning (even for two heads-only runs on one tower), so
    nothing is searched. The message names both identities and where each model came from.

    Attributes:
        index: The index folder.
        index_model: Model identity recorded by the index (``LoadedModel.name`` of its builder).
        index_source: The folder or spec that model was loaded from.
        query_model: Model identity of the model offered for the query.
        query_source: The folder or spec it was loaded from.
    """

    def __init__(
        self, index: Path, index_model: str, index_source: str, query_model: str, query_source: str
    ) -> None:
        super().__init__(
            f"index {index} was built with model {index_model} (from {index_source}); the query model is "
            f"{query_model} (from {query_source}): query with the index's model or rebuild the index"
        )
        self.index, self.index_model, self.index_source = index, index_model, index_source
        self.query_model, self.query_source = query_model, query_source

    def __reduce__(self) -> tuple[type[ModelMismatchError], tuple[Path, str, str, str, str]]:
        return type(self), (
            self.index,
            self.index_model,
            self.index_source,
            self.query_model,
            self.query_source,
        )


class IndexBadRowsError(SearchIndexError):
    """The catalogue has bad rows, so nothing is indexed: an index must not silently miss images.

    The message lists the first ten rows with their reasons; the CLI adds how to index a clean copy.

    Attributes:
        catalogue: The catalogue folder.
        metadata_path: Its metadata file.
        rejected: Every bad row (file, row number, reason).
    """

    def __init__(
        self, catalogue: Path, metadata_path: Path, rejected: list[Rejection], *, nothing: str = "indexed"
    ) -> None:
        shown = "\n".join(f"  row {r.row} ({r.file_name}): {r.reason}" for r in rejected[:10])
        more = f"\n  ... and {len(rejected) - 10} more" if len(rejected) > 10 else ""
        super().__init__(f"{metadata_path}: {len(rejected)} bad row(s), nothing {nothing}:\n{shown}{more}")
        self.catalogue = catalogue
        self.metadata_path = metadata_path
        self.rejected = rejected

    def __reduce__(self) -> tuple[type[IndexBadRowsError], tuple[Path, Path, list[Rejection]]]:
        return type(self), (self.catalogue, self.metadata_path, self.rejected)


@dataclass
class SearchIndex:
    """A loaded index: the FAISS index, the items' metadata and the identity of the model that built it.

    Items are numbered in index order, which is the order in which images first appear in the catalogue;
    equal scores rank the lower number first (docs/metrics.md).

    Attributes:
        path: The index folder.
        faiss_index: The ``faiss.IndexFlatIP`` (``ntotal`` = number of items).
        ids: Item ids (the catalogue's ``file_name`` values), in index order.
        paths: Absolute image paths at build time.
        captions: Every caption of each image, in catalogue row order.
        attributes: Attribute column -> one value per item (a list of distinct values where the image's
            rows disagree; None where missing).
        model: ``LoadedModel.name`` of the model that embedded the images.
        model_source: The folder that model was loaded from.
        manifest: The whole ``index.json``.
    """

    path: Path
    faiss_index: Any
    ids: list[str]
    paths: list[str]
    captions: list[list[str]]
    attributes: dict[str, list[AttrValue]]
    model: str
    model_source: str
    manifest: dict[str, Any]
    _lookup: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.faiss_index.d)

    def vectors(self) -> np.ndarray:
        """(N, D) float32 view of the stored embeddings (no copy; valid while the index lives)."""
        import faiss

        n, d = self.faiss_index.ntotal, self.faiss_index.d
        if n == 0:
            return np.zeros((0, d), dtype=np.float32)
        return faiss.rev_swig_ptr(self.faiss_index.get_xb(), n * d).reshape(n, d)

    def positions(self, attribute: str, value: object) -> np.ndarray:
        """Sorted item numbers whose ``attribute`` equals ``value`` under the filter rules (see ``search``).

        Raises:
            SearchIndexError: ``attribute`` is not an attribute of this index (the message lists them).
        """
        table = self._values(attribute)
        return table.get(normalise_value(value), np.zeros(0, dtype=np.int64))

    def values(self, attribute: str) -> list[str]:
        """The distinct (normalised) values of an attribute, sorted: what a filter can match."""
        return sorted(self._values(attribute))

    def _values(self, attribute: str) -> dict[str, np.ndarray]:
        if attribute not in self.attributes:
            known = ", ".join(self.attributes) or "none"
            raise SearchIndexError(f"{self.path}: unknown attribute '{attribute}'; attributes: {known}")
        if attribute not in self._lookup:  # inverted list value -> item numbers, built on first use
            groups: dict[str, list[int]] = {}
            for i, value in enumerate(self.attributes[attribute]):
                for v in value if isinstance(value, list) else [value]:
                    if v is not None:
                        groups.setdefault(normalise_value(v), []).append(i)
            self._lookup[attribute] = {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in groups.items()}
        return self._lookup[attribute]


def normalise_value(value: object) -> str:
    """How attribute and filter values compare: as lower-case strings; ``True`` is ``"true"``, ``2.0`` is ``"2"``."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value).strip().lower()


def build_index(
    model: LoadedModel,
    catalogue: Catalogue,
    out: Path,
    *,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    batch_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Embed a catalogue's images and save them, with their metadata, as a search index in ``out``.

    The catalogue is checked first (``cliptune data check`` rules) and any bad row stops the build, named:
    an index must not silently miss images. Each image is embedded once, however many captions it has
    (through the feature cache, batched, bf16 where the CPU supports it). Rebuilding an existing index
    with the same model replaces it; with another model it is refused unless ``overwrite``, because the
    old index's users would silently get scores from a different space.

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        catalogue: From :func:`cliptune.data.catalogue.read_catalogue`.
        out: The index folder to write (replaced atomically).
        cache_dir: Feature cache folder (default: the shared one).
        precision: ``auto``, ``fp32`` or ``bf16`` for the tower forward.
        batch_size: Images per forward.
        overwrite: Replace an existing index even if another model built it, or a non-index folder.
        progress: Progress bars.

    Returns:
        ``out``.

    Raises:
        IndexBadRowsError: Bad catalogue rows (a :class:`SearchIndexError`).
        IndexExistsError: ``out`` holds another model's index or something else, without ``overwrite``.
        SearchIndexError: An empty catalogue.

    Example:
        >>> build_index(load_model("runs/ft"), read_catalogue(Path("data/fashion")), Path("idx"))  # doctest: +SKIP
    """
    out = Path(out)
    _refuse_foreign(out, model, overwrite)
    items = _items(catalogue, progress)
    paths = [Path(p) for p in items["path"]]
    vectors = embed_images_with(
        model, paths, cache_dir=cache_dir, precision=precision, batch_size=batch_size, progress=progress
    ).numpy()  # (N, D) float32, L2-normalised
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.name,
        "model_source": _source(Path(model.source)),
        "catalogue": str(Path(catalogue.root).resolve()),
        "n_items": len(paths),
        "dim": int(vectors.shape[1]),
        "metric": "inner_product",
        "attributes": list(items["attributes"]),
        "text_column": catalogue.text_column,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomically(out, manifest, vectors, items)
    return out


def load_index(path: Path | str) -> SearchIndex:
    """Load an index folder written by :func:`build_index`.

    Args:
        path: The index folder.

    Returns:
        The :class:`SearchIndex`.

    Raises:
        SearchIndexError: a missing or unreadable file, another format version, or files that disagree
            (item count, dimension).

    Example:
        >>> index = load_index("indexes/fashion")  # doctest: +SKIP
        >>> len(index), index.model  # doctest: +SKIP
    """
    import faiss

    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise SearchIndexError(
            f"{path}: not a cliptune index (no {MANIFEST}); build one with `cliptune index`"
        )
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SearchIndexError(
            f"{path / MANIFEST}: format {manifest.get('format')} v{manifest.get('version')} is not "
            f"{FORMAT} v{VERSION}; rebuild the index with this cliptune"
        )
    for name in (FAISS_FILE, ITEMS_FILE):
        if not (path / name).is_file():
            raise SearchIndexError(f"{path}: {name} is missing; rebuild the index")
    try:
        flat = faiss.read_index(str(path / FAISS_FILE))
    except RuntimeError as exc:
        raise SearchIndexError(f"{path / FAISS_FILE}: unreadable FAISS index ({exc})") from None
    records = _read_items(path / ITEMS_FILE)
    names = list(manifest["attributes"])
    if flat.ntotal != len(records) or flat.d != manifest["dim"]:
        raise SearchIndexError(
            f"{path}: {FAISS_FILE} holds {flat.ntotal} vectors of dim {flat.d} but {ITEMS_FILE} lists "
            f"{len(records)} items and {MANIFEST} says dim {manifest['dim']}; rebuild the index"
        )
    return SearchIndex(
        path=path,
        faiss_index=flat,
        ids=[r["id"] for r in records],
        paths=[r["path"] for r in records],
        captions=[r["captions"] for r in records],
        attributes={a: [r["attributes"].get(a) for r in records] for a in names},
        model=manifest["model"],
        model_source=manifest["model_source"],
        manifest=manifest,
    )


def _source(source: Path) -> str:
    """An absolute folder when the model came from one; a spec such as ``embedded`` or a hub id as is."""
    return str(source.resolve()) if source.exists() else str(source)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The index folder's ``index.json`` (model, dim, item count), or None when the folder holds no index.

    Raises:
        SearchIndexError: The manifest is not valid JSON.
    """
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise SearchIndexError(f"{path / MANIFEST}: not valid JSON ({exc})") from None
    return manifest


def _read_items(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SearchIndexError(f"{path}: line {number} is not valid JSON ({exc})") from None
    return records


def _refuse_foreign(out: Path, model: LoadedModel, overwrite: bool) -> None:
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise IndexExistsError(out, f"{out} exists and is not a folder")
    manifest = read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise IndexExistsError(out, f"{out} is not empty and holds no index")
        return
    if manifest.get("model") != model.name:
        raise IndexExistsError(
            out,
            f"index {out} was built with model {manifest.get('model')} (from {manifest.get('model_source')}); "
            f"this is {model.name} (from {model.source})",
        )


def _items(catalogue: Catalogue, progress: bool) -> dict[str, Any]:
    """Unique images in first-appearance order, each with all its captions and its attribute values."""
    checked = check_catalogue(catalogue, progress=progress)
    if checked.rejected:
        raise IndexBadRowsError(catalogue.root, catalogue.metadata_path, list(checked.rejected))
    rows = checked.good
    if rows.empty:
        raise SearchIndexError(f"{catalogue.metadata_path}: no rows to index")
    names = [a for a in catalogue.filters if a in rows.columns]  # `group` too, as suites allow
    by_image = rows.groupby("file_name", sort=False)  # groups in first-appearance order
    ids, paths, captions = [], [], []
    attributes: dict[str, list[AttrValue]] = {a: [] for a in names}
    for file_name, group in by_image:
        ids.append(str(file_name))
        paths.append(str(catalogue.image_path(str(file_name)).resolve()))
        captions.append([str(t) for t in group[catalogue.text_column]])
        for a in names:
            attributes[a].append(_merge_values(group[a]))
    return {"id": ids, "path": paths, "captions": captions, "attributes": attributes}


def _merge_values(column: pd.Series) -> AttrValue:
    values: list[Any] = []
    for v in column:
        v = _plain(v)
        if v not in values:
            values.append(v)
    present = [v for v in values if v is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else present


def _plain(value: Any) -> Any:
    """A JSON-able Python scalar; NaN / None / NA become None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _write_atomically(
    out: Path, manifest: dict[str, Any], vectors: np.ndarray, items: dict[str, Any]
) -> None:
    import faiss

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(flat, str(tmp / FAISS_FILE))
        with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as f:
            for i, item_id in enumerate(items["id"]):
                record = {
                    "id": item_id,
                    "path": items["path"][i],
                    "captions": items["captions"][i],
                    "attributes": {a: vals[i] for a, vals in items["attributes"].items()},
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        # the manifest goes last: a folder with index.json is a complete index
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
