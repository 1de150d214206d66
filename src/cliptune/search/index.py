"""Build, save and load a search index: a FAISS ``IndexFlatIP`` over image embeddings plus their metadata.

An index folder holds everything a search needs besides the model:

```
OUT/
  index.json    manifest: format version, model identity (LoadedModel.name) and source, catalogue, n, dim
  index.faiss   FAISS index of the manifest's kind over the L2-normalised image embeddings (inner product
                = cosine): IndexFlatIP (flat, exact), IndexHNSWFlat (hnsw) or IndexIVFPQ (ivfpq)
  vectors.npy   (ivfpq only) the (N, D) float32 embeddings, which the PQ codes do not keep, for exact scores
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
from cliptune.models.cache import Precision
from cliptune.models.embed import embed_images_with, embed_texts_with
from cliptune.models.factory import LoadedModel
from cliptune.rundir import atomic_folder, clean_stale_temps, write_text_atomic
from cliptune.search.ann import (
    RECALL_K,
    build_faiss,
    check_params,
    flat_vectors,
    measure_recall,
    resolve_params,
    set_search_params,
)
from cliptune.search.errors import SearchIndexError
from cliptune.search.sharded import SINGLE, Processes, gather_rows, on_every, on_main, shard_rows

__all__ = [
    "index_facts",
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
MANIFEST, FAISS_FILE, ITEMS_FILE, VECTORS_FILE = "index.json", "index.faiss", "items.jsonl", "vectors.npy"
RECALL_IMAGE_QUERIES, RECALL_TEXT_QUERIES, RECALL_SEED = 1000, 200, 0
# attribute value of one image: a scalar, or the distinct values of its rows when they disagree
AttrValue = str | int | float | bool | None | list[Any]


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
        faiss_index: The FAISS index searched (``ntotal`` = number of items): ``IndexFlatIP`` for
            kind ``flat``, else the ANN index (see :mod:`cliptune.search.ann`).
        ids: Item ids (the catalogue's ``file_name`` values), in index order.
        paths: Absolute image paths at build time.
        captions: Every caption of each image, in catalogue row order.
        attributes: Attribute column -> one value per item (a list of distinct values where the image's
            rows disagree; None where missing).
        model: ``LoadedModel.name`` of the model that embedded the images.
        model_source: The folder that model was loaded from.
        manifest: The whole ``index.json``.
        kind: ``flat`` (exact), ``hnsw`` or ``ivfpq``.
        params: The kind's parameters (``hnsw_m``, ``ef_construction``, ``ef_search`` / ``nlist``,
            ``pq_m``, ``nprobe``); empty for flat.
        stored_vectors: The float vectors when the FAISS index does not hold them (ivfpq), else None.
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
    kind: str = "flat"
    params: dict[str, int] = field(default_factory=dict)
    stored_vectors: np.ndarray | None = field(default=None, repr=False)
    _lookup: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.faiss_index.d)

    def vectors(self) -> np.ndarray:
        """(N, D) float32 view of the stored embeddings (no copy; valid while the index lives).

        Every kind keeps the float vectors (flat and HNSW inside the FAISS index, IVF-PQ beside it), so
        scores are exact cosines whatever proposed the candidates.
        """
        if self.stored_vectors is not None:
            return self.stored_vectors
        return flat_vectors(self.faiss_index)

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


def index_facts(index: SearchIndex) -> dict[str, Any]:
    """What an index is: folder, size, model, kind, parameters and stored recall@10 (for ``--info``, /info).

    ``recall`` is the build-time measurement (:func:`build_index`): ``{"recall_at_10", "exact", "k",
    "seed", "image_queries", "text_queries", "at_10_images", "at_10_texts"}``; a flat index is exact
    (``recall_at_10`` 1.0, ``exact`` true). Indexes from before ANN kinds are flat and report the same.
    """
    recall = index.manifest.get("recall") or {"recall_at_10": 1.0, "exact": True}
    return {
        "path": str(Path(index.path).resolve()),
        "n": len(index),
        "dim": index.dim,
        "model": index.model,
        "model_source": index.model_source,
        "catalogue": index.manifest.get("catalogue"),
        "created": index.manifest.get("created"),
        "kind": index.kind,
        "params": dict(index.params),
        "recall_at_10": recall.get("recall_at_10"),
        "recall": recall,
    }


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
    kind: str = "flat",
    params: dict[str, int | None] | None = None,
    processes: Processes = SINGLE,
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
        kind: ``flat`` (exact, the default), ``hnsw`` or ``ivfpq`` (approximate; see
            :mod:`cliptune.search.ann` for what each trades and the defaults of its parameters).
        params: The kind's parameters; None values and missing ones take the defaults. An ANN kind's
            recall@10 against exact search is measured at build time (:func:`_recall`) and stored.
        processes: This process among several launched together
            (:func:`cliptune.search.sharded.launched_processes`): each embeds a contiguous shard of the
            images, the main process gathers them in catalogue order, builds and writes the index (the
            1-process result, bit for bit); the others return ``out`` once it is written.

    Returns:
        ``out``.

    Raises:
        IndexBadRowsError: Bad catalogue rows (a :class:`SearchIndexError`).
        IndexExistsError: ``out`` holds another model's index or something else, without ``overwrite``.
        SearchIndexError: An empty catalogue, an unknown kind or a parameter that does not fit it.
        OtherProcessFailedError: (several processes, not the main one) another process failed; the main
            process raises that failure itself.

    Example:
        >>> build_index(load_model("runs/ft"), read_catalogue(Path("data/fashion")), Path("idx"))  # doctest: +SKIP
    """
    out = Path(out)
    check_params(kind, dict(params or {}))  # a bad kind or parameter fails before any embedding
    progress = progress and processes.main  # one set of bars, the main process's
    # a killed build's leftovers (or its old index, restored): by the one process that writes
    on_main(processes, lambda: clean_stale_temps(out.parent, name=out.name))
    items = on_every(processes, lambda: _checked_items(out, model, overwrite, catalogue, progress))
    paths = [Path(p) for p in items["path"]]
    rows = shard_rows(len(paths), batch_size, processes) if processes.world > 1 else range(len(paths))
    part = on_every(
        processes,
        lambda: _embed_rows(model, [paths[r] for r in rows], cache_dir, precision, batch_size, progress),
    )
    vectors = gather_rows(processes, part)  # (N, D) float32, L2-normalised, on the main process only

    def write() -> Path:  # runs on the main process only, where the rows were gathered
        assert vectors is not None
        return _build_and_write(model, catalogue, out, items, vectors, kind, params, cache_dir, progress)

    return on_main(processes, write)  # the other processes wait for its outcome


def _checked_items(
    out: Path, model: LoadedModel, overwrite: bool, catalogue: Catalogue, progress: bool
) -> dict[str, Any]:
    _refuse_foreign(out, model, overwrite)
    return _items(catalogue, progress)


def _embed_rows(
    model: LoadedModel,
    paths: list[Path],
    cache_dir: Path | None,
    precision: Precision,
    batch_size: int,
    progress: bool,
) -> np.ndarray:
    """(n, D) float32 L2-normalised embeddings of ``paths``; (0, 0) for a process given no rows."""
    if not paths:
        return np.zeros((0, 0), dtype=np.float32)
    return embed_images_with(
        model, paths, cache_dir=cache_dir, precision=precision, batch_size=batch_size, progress=progress
    ).numpy()


def _build_and_write(
    model: LoadedModel,
    catalogue: Catalogue,
    out: Path,
    items: dict[str, Any],
    vectors: np.ndarray,
    kind: str,
    params: dict[str, int | None] | None,
    cache_dir: Path | None,
    progress: bool,
) -> Path:
    """The FAISS index, recall and manifest of the embedded items, written atomically to ``out``."""
    resolved = resolve_params(kind, len(vectors), int(vectors.shape[1]), dict(params or {}))
    faiss_index = build_faiss(kind, vectors, resolved, seed=RECALL_SEED)
    recall = _recall(model, faiss_index, kind, resolved, vectors, items["captions"], cache_dir, progress)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.name,
        "model_source": _source(Path(model.source)),
        "catalogue": str(Path(catalogue.root).resolve()),
        "n_items": len(vectors),
        "dim": int(vectors.shape[1]),
        "metric": "inner_product",
        "kind": kind,
        "params": resolved,
        "recall_at_10": recall["recall_at_10"],
        "recall": recall,
        "attributes": list(items["attributes"]),
        "text_column": catalogue.text_column,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomically(out, manifest, faiss_index, vectors if kind == "ivfpq" else None, items)
    return out


def _recall(
    model: LoadedModel,
    faiss_index: Any,
    kind: str,
    params: dict[str, int],
    vectors: np.ndarray,
    captions: list[list[str]],
    cache_dir: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """recall@10 of an ANN index against exact search, on a seeded sample of the catalogue's own queries.

    Queries: up to ``RECALL_IMAGE_QUERIES`` of the indexed images (image-to-image search, as a "more like
    this" query) and the first captions of up to ``RECALL_TEXT_QUERIES`` images (text-to-image), drawn
    without replacement with seed ``RECALL_SEED``. ``recall_at_10`` pools both. A flat index is exact:
    1.0 by construction, nothing measured.
    """
    if kind == "flat":
        return {"recall_at_10": 1.0, "exact": True}
    rng = np.random.default_rng(RECALL_SEED)
    n = len(vectors)
    image_rows = np.sort(rng.choice(n, min(n, RECALL_IMAGE_QUERIES), replace=False))
    text_rows = np.sort(rng.choice(n, min(n, RECALL_TEXT_QUERIES), replace=False))
    texts = [captions[i][0] for i in text_rows if captions[i]]
    text_queries = embed_texts_with(model, texts, cache_dir=cache_dir, progress=progress).numpy()
    image_queries = np.ascontiguousarray(vectors[image_rows])
    at_images = measure_recall(faiss_index, kind, params, vectors, image_queries)
    at_texts = measure_recall(faiss_index, kind, params, vectors, text_queries) if texts else None
    pooled = (
        at_images
        if at_texts is None
        else (at_images * len(image_rows) + at_texts * len(texts)) / (len(image_rows) + len(texts))
    )
    return {
        "recall_at_10": round(pooled, 4),
        "exact": False,
        "k": RECALL_K,
        "seed": RECALL_SEED,
        "image_queries": len(image_rows),
        "text_queries": len(texts),
        "at_10_images": round(at_images, 4),
        "at_10_texts": None if at_texts is None else round(at_texts, 4),
    }


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
    kind = str(manifest.get("kind", "flat"))  # indexes from before ANN kinds are flat
    params = {str(p): int(v) for p, v in (manifest.get("params") or {}).items()}
    for name in (FAISS_FILE, ITEMS_FILE, *([VECTORS_FILE] if kind == "ivfpq" else [])):
        if not (path / name).is_file():
            raise SearchIndexError(f"{path}: {name} is missing; rebuild the index")
    try:
        flat = faiss.read_index(str(path / FAISS_FILE))
    except RuntimeError as exc:
        raise SearchIndexError(f"{path / FAISS_FILE}: unreadable FAISS index ({exc})") from None
    set_search_params(flat, kind, params)
    stored = None
    if kind == "ivfpq":
        stored = np.load(path / VECTORS_FILE, mmap_mode="r")  # (N, D) float32, paged in on demand
        if stored.shape != (flat.ntotal, flat.d):
            raise SearchIndexError(
                f"{path / VECTORS_FILE}: shape {stored.shape} is not ({flat.ntotal}, {flat.d}); rebuild the index"
            )
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
        kind=kind,
        params=params,
        stored_vectors=stored,
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
    out: Path,
    manifest: dict[str, Any],
    faiss_index: Any,
    vectors: np.ndarray | None,
    items: dict[str, Any],
) -> None:
    """Write the folder; ``vectors`` (saved as ``vectors.npy``) only where the FAISS index lacks them."""
    import faiss

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        faiss.write_index(faiss_index, str(tmp / FAISS_FILE))
        if vectors is not None:
            np.save(tmp / VECTORS_FILE, np.ascontiguousarray(vectors, dtype=np.float32))
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
