"""Approximate (ANN) FAISS indexes for large catalogues: build, query with exact re-scoring, measure recall.

Three kinds (``cliptune index --kind``):

- ``flat``: ``IndexFlatIP``, exact; the default and the reference every ANN kind is measured against.
- ``hnsw``: ``IndexHNSWFlat`` (inner product), a graph over the float vectors; no training.
- ``ivfpq``: ``IndexIVFPQ`` (inner product), ``nlist`` k-means cells, vectors compressed to ``pq_m`` bytes;
  trained on a seeded sample of the vectors. Its codes are lossy, so the float vectors are kept beside it.

An ANN kind only proposes candidates: ``k + TIE_PAD`` of them (more for IVF-PQ, whose code scores are
rough) are re-scored exactly against the stored float vectors and ranked by (exact score desc, item number
asc), the rule of docs/metrics.md. So a reported score is always the exact cosine; what an ANN kind may
lose is an item it never proposed, which is what recall@10 measures (:func:`measure_recall`).

Defaults follow FAISS's guidelines (wiki "Guidelines to choose an index", "Indexing 1M vectors"):
HNSW ``M`` = 32, ``efConstruction`` = 40 (FAISS's default), ``efSearch`` = 64 (above FAISS's 16: we fetch
k + 16 candidates); IVF ``nlist`` = 4 sqrt(N) (the guideline's lower end, capped so each cell gets >= 39
training points), ``nprobe`` = nlist / 16 (at least 1), PQ ``pq_m`` = D / 4 (4 dimensions per byte, 8-bit
codes; the largest divisor of D not above D / 4). See docs/search.md, "Approximate indexes".
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from cliptune.ranking.topk import TIE_PAD, topk_of_scores
from cliptune.search.errors import SearchIndexError

__all__ = [
    "KINDS",
    "IndexKind",
    "IndexParameterError",
    "ann_topk",
    "build_faiss",
    "check_params",
    "exact_topk",
    "flat_vectors",
    "measure_recall",
    "resolve_params",
    "set_search_params",
]

IndexKind = Literal["flat", "hnsw", "ivfpq"]
KINDS: tuple[str, ...] = ("flat", "hnsw", "ivfpq")
_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivfpq": ("nlist", "pq_m", "nprobe"),
}
_PQ_BITS = 8  # 256 centroids per sub-quantizer: FAISS's standard code size
_MIN_PER_CELL = 39  # FAISS's k-means warns below 39 training points per centroid
_IVFPQ_CANDIDATES = 4  # IVF-PQ proposes 4k (at least k + TIE_PAD) candidates for the exact re-scoring
RECALL_K = 10


class IndexParameterError(SearchIndexError):
    """An index kind or parameter that cannot build this index (unknown kind, a parameter of another kind,
    a value < 1, ``pq_m`` not dividing the dimension, too few items for IVF-PQ); typed so that the CLI can
    name the ``cliptune index`` options that fix it."""


def resolve_params(kind: str, n: int, dim: int, given: dict[str, int | None]) -> dict[str, int]:
    """The kind's parameters: those given, the defaults (module docstring) for the rest.

    Raises:
        IndexParameterError: an unknown kind, a parameter of another kind, a value < 1, ``pq_m`` not dividing
            the dimension, or too few items to train an IVF-PQ index.
    """
    check_params(kind, given)
    if kind == "hnsw":
        return {
            "hnsw_m": given.get("hnsw_m") or 32,
            "ef_construction": given.get("ef_construction") or 40,
            "ef_search": given.get("ef_search") or 64,
        }
    if kind == "ivfpq":
        if n < 2**_PQ_BITS:
            raise IndexParameterError(
                f"an ivfpq index trains {2**_PQ_BITS} centroids per sub-quantizer and needs at least "
                f"{2**_PQ_BITS} items; this catalogue has {n}: use kind hnsw or flat"
            )
        nlist = given.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // _MIN_PER_CELL))
        if nlist > n:
            raise IndexParameterError(f"nlist {nlist} exceeds the {n} items to cluster")
        pq_m = given.get("pq_m") or max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
        if dim % pq_m:
            raise IndexParameterError(f"pq_m {pq_m} must divide the embedding dimension {dim}")
        nprobe = given.get("nprobe") or max(1, nlist // 16)
        return {"nlist": nlist, "pq_m": pq_m, "nprobe": min(nprobe, nlist)}
    return {}


def check_params(kind: str, given: dict[str, int | None]) -> None:
    """Refuse an unknown kind, a parameter of another kind, or a value < 1 (before anything is embedded).

    Raises:
        IndexParameterError: naming the kind or the parameter.
    """
    if kind not in KINDS:
        raise IndexParameterError(f"index kind must be one of {', '.join(KINDS)}, got '{kind}'")
    stray = sorted(p for p, v in given.items() if v is not None and p not in _PARAMS[kind])
    if stray:
        raise IndexParameterError(f"parameter(s) {', '.join(stray)} do not apply to index kind {kind}")
    for name, value in given.items():
        if value is not None and value < 1:
            raise IndexParameterError(f"index parameter {name} must be >= 1, got {value}")


def build_faiss(kind: str, vectors: np.ndarray, params: dict[str, int], *, seed: int = 0) -> Any:
    """A FAISS index of ``kind`` over (N, D) L2-normalised float32 vectors (inner product = cosine)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(
            quantizer, d, params["nlist"], params["pq_m"], _PQ_BITS, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = seed  # k-means seeds: a rebuild gives the same cells
        index.pq.cp.seed = seed
        index.pq.cp.min_points_per_centroid = 1  # small catalogues: 256 codes from fewer points, no warning
        n_train = min(len(vectors), 256 * max(params["nlist"], 2**_PQ_BITS))  # k-means needs no more
        sample = np.random.default_rng(seed).choice(len(vectors), n_train, replace=False)
        index.train(vectors[np.sort(sample)])
    index.add(vectors)
    set_search_params(index, kind, params)
    return index


def set_search_params(index: Any, kind: str, params: dict[str, int]) -> None:
    """Apply the stored query-time parameters (``ef_search``, ``nprobe``) to a loaded index."""
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivfpq":
        index.nprobe = params["nprobe"]


def flat_vectors(index: Any) -> np.ndarray:
    """(N, D) float32 view (no copy) of the vectors of a flat index or of an HNSW index's flat storage."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    n, d = index.ntotal, index.d
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


def ann_topk(
    index: Any,
    kind: str,
    params: dict[str, int],
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    selected: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by an ANN index's candidates re-scored exactly; (Q, K) scores and item numbers.

    ``selected`` (sorted item numbers) restricts the search with an ``IDSelectorBitmap`` that HNSW and IVF
    both honour in FAISS, so only selected items are proposed. A row with fewer than ``k`` proposals
    (a tiny or heavily filtered pool) is padded with score -inf and number -1.

    Shapes:
        vectors (N, D), queries (Q, D) -> (Q, K), (Q, K) with K = min(k, pool)
    """
    import faiss

    n_pool = len(vectors) if selected is None else len(selected)
    k = min(k, n_pool)
    factor = _IVFPQ_CANDIDATES if kind == "ivfpq" else 1
    n_cand = min(n_pool, max(k + TIE_PAD, factor * k))
    sel = None
    if selected is not None and n_pool < len(vectors):
        bits = np.zeros(len(vectors), dtype=bool)
        bits[selected] = True
        packed = np.packbits(bits, bitorder="little")  # bit i of byte i // 8, low bit first
        sel = faiss.IDSelectorBitmap(len(vectors), faiss.swig_ptr(packed))
    # explicit parameters: FAISS's SearchParameters carry their own efSearch / nprobe defaults
    untyped: Any = faiss  # its stubs lack SearchParametersHNSW and the keyword constructors
    if kind == "hnsw":
        search_params = untyped.SearchParametersHNSW(efSearch=max(params["ef_search"], n_cand))
    else:
        search_params = untyped.SearchParametersIVF(nprobe=params["nprobe"])
    if sel is not None:
        search_params.sel = sel
    _, numbers = index.search(queries, n_cand, params=search_params)  # (Q, n_cand), -1 where none
    valid = numbers >= 0  # (Q, C)
    safe = np.where(valid, numbers, 0)
    exact = np.einsum("qcd,qd->qc", vectors[safe], queries)  # (Q, C) exact cosines
    exact = np.where(valid, exact, -np.inf).astype(np.float32)
    # rank by (score desc, number asc): sort candidates by number first, then a stable top-k by score
    order = np.argsort(np.where(valid, numbers, np.iinfo(np.int64).max), axis=1, kind="stable")
    by_number_s = np.take_along_axis(exact, order, axis=1)
    by_number_n = np.take_along_axis(np.where(valid, numbers, -1), order, axis=1)
    vals, pos = topk_of_scores(torch.from_numpy(np.ascontiguousarray(by_number_s)), k)  # (Q, k)
    return vals.numpy(), np.take_along_axis(by_number_n, pos.numpy(), axis=1).astype(np.int64)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Item numbers of the exact top-k under the tie rule; (Q, k). The reference recall is measured against."""
    k = min(k, len(vectors))
    out = np.empty((len(queries), k), np.int64)
    rows = max(1, (1 << 22) // max(1, len(vectors)))  # bounded (rows, N) score blocks
    for q0 in range(0, len(queries), rows):
        scores = queries[q0 : q0 + rows] @ vectors.T  # (rows, N)
        out[q0 : q0 + rows] = topk_of_scores(torch.from_numpy(np.ascontiguousarray(scores)), k)[1].numpy()
    return out


def measure_recall(
    index: Any, kind: str, params: dict[str, int], vectors: np.ndarray, queries: np.ndarray
) -> float:
    """recall@10: the mean share of each query's exact top-10 that the ANN search (as queried) returns.

    Each query's ANN result comes from :func:`ann_topk`, the code ``search`` runs, so the number is what
    users get. With fewer than 10 items, k is the item count.
    """
    if len(queries) == 0:
        raise SearchIndexError("recall needs at least one query")
    k = min(RECALL_K, len(vectors))
    truth = exact_topk(vectors, queries, k)  # (Q, k)
    _, found = ann_topk(index, kind, params, vectors, queries, k)  # (Q, k)
    hits = [len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits) / k)
