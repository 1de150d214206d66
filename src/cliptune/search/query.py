"""Query an index: embed a text or an image, restrict to the items matching attribute filters, exact top-k.

Filters apply BEFORE top-k: the candidate set is restricted first and the k best candidates are
returned, so a filter matching 3 items with k = 10 returns those 3. A filter keeping at most 5% of the
items gathers the matching vectors and ranks them exactly with numpy (cheaper than scanning all N);
a broader one (or none) runs FAISS's flat search with an ``IDSelectorBitmap``, so FAISS only scores the
selected items. Results follow the ranking rule of docs/metrics.md: score descending, ties by the lower
item number. FAISS orders tied scores arbitrarily: its candidates go through
:func:`cliptune.ranking.topk.refine_candidates` (k + 16 candidates re-sorted by (score desc, number asc),
a query whose k-th score still ties its last candidate recomputed exactly on the selected vectors), and
the exact path selects with :func:`cliptune.ranking.topk.topk_of_scores`: one ranking rule, one home.

An approximate index (kind ``hnsw`` or ``ivfpq``, :mod:`cliptune.search.ann`) proposes candidates,
restricted by the same ``IDSelectorBitmap`` (HNSW and IVF both honour it in FAISS), which are re-scored
exactly against the stored float vectors and ranked by the same rule; a filter keeping at most 5% of the
items still takes the exact gather path, so selective filters are exact whatever the kind.

Example:
    >>> index, model = load_index("indexes/fashion"), load_model("runs/ft")  # doctest: +SKIP
    >>> search(index, model, text="ripped blue jeans", k=5, where={"garment": "jeans"})[0].id  # doctest: +SKIP
    'images/000123.png'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliptune.models.embed import embed_images_with, embed_texts_with, model_device
from cliptune.models.factory import LoadedModel
from cliptune.ranking.topk import TIE_PAD, refine_candidates, topk_of_scores
from cliptune.search.ann import ann_topk
from cliptune.search.index import ModelMismatchError, SearchIndex, SearchIndexError

__all__ = ["Hit", "hit_at", "search", "search_embeddings", "select"]

# filters keeping at most this share of the items are searched by gathering the matching vectors and an
# exact numpy top-k over them; above it FAISS scans every item with a bitmap selector (see docs/search.md)
_SUBSET_SHARE = 0.05
_SCORE_BLOCK = 1 << 22  # scores held at once by the exact path (16 MiB of float32)


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        rank: 1-based rank among the (filtered) results.
        id: The item id (the catalogue's ``file_name``).
        score: Inner product of the L2-normalised query and image embeddings (cosine similarity).
        caption: The image's first caption.
        attributes: The image's attribute values.
    """

    rank: int
    id: str
    score: float
    caption: str
    attributes: dict[str, Any]


def search(
    index: SearchIndex,
    model: LoadedModel,
    *,
    text: str | None = None,
    image: Path | str | None = None,
    k: int = 10,
    where: Mapping[str, object] | None = None,
    cache_dir: Path | None = None,
) -> list[Hit]:
    """The k images of the index closest to a text or an image query, among those matching ``where``.

    Args:
        index: From :func:`cliptune.search.load_index`.
        model: The model that built the index (same model identity, ``LoadedModel.name``); another one
            is refused.
        text: A text query. Exactly one of ``text`` and ``image``.
        image: An image file as the query.
        k: Results wanted (fewer when fewer items match the filters).
        where: Attribute filters, ANDed: ``{"colour": "blue", "rips": True}``; a list value matches any of
            its values (``{"colour": ["blue", "black"]}``). Values compare as lower-case strings
            (``"Blue"`` matches ``blue``; ``True``/``"true"`` match a boolean true; ``2`` matches ``2.0``);
            missing values match nothing.
        cache_dir: Feature cache folder for the query embedding (default: the shared one).

    Returns:
        Hits, best first.

    Raises:
        ModelMismatchError: ``model`` is not the model that built the index (a :class:`SearchIndexError`).
        SearchIndexError: not exactly one query, ``k < 1``, or an unknown attribute (the
            message lists the index's attributes).

    Example:
        >>> [h.id for h in search(index, model, text="red dress", k=2)]  # doctest: +SKIP
        ['images/000007.png', 'images/000031.png']
    """
    if model.name != index.model:
        raise ModelMismatchError(index.path, index.model, index.model_source, model.name, str(model.source))
    if (text is None) == (image is None):
        raise SearchIndexError("give exactly one query: a text or an image")
    if text is not None and not text.strip():
        raise SearchIndexError("the text query is empty")
    device = model_device(model)  # one query: embed where the model is, moving nothing
    if text is not None:
        query = embed_texts_with(model, [text], cache_dir=cache_dir, progress=False, device=device)  # (1, D)
    else:
        query = embed_images_with(  # (1, D); one image: no decoding workers to start
            model, [Path(str(image))], cache_dir=cache_dir, progress=False, num_workers=0, device=device
        )
    return search_embeddings(index, query.numpy(), k=k, where=where)[0]


def search_embeddings(
    index: SearchIndex,
    queries: np.ndarray,
    *,
    k: int = 10,
    where: Mapping[str, object] | None = None,
) -> list[list[Hit]]:
    """Filtered top-k for query embeddings already computed (no model involved).

    Exact for a flat index; for an ANN index the candidates it proposes, re-scored exactly (scores are
    exact cosines; an item the index never proposed is missed, as its stored recall@10 measures).

    Args:
        index: The index.
        queries: Query embeddings, L2-normalised like the items (any float dtype; used as float32).
        k: Results per query, >= 1.
        where: Attribute filters, as in :func:`search`.

    Returns:
        One list of hits per query, best first.

    Shapes:
        queries (Q, D) with D = ``index.dim`` -> Q lists of min(k, matching items) hits

    Example:
        >>> search_embeddings(index, np.eye(1, index.dim, dtype=np.float32), k=3)[0][0].rank  # doctest: +SKIP
        1
    """
    queries = np.ascontiguousarray(np.asarray(queries), dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.dim:
        raise SearchIndexError(
            f"{index.path}: queries must be (Q, {index.dim}) embeddings, got {tuple(queries.shape)}"
        )
    if k < 1:
        raise SearchIndexError(f"k must be >= 1, got {k}")
    selected = select(index, where)
    scores, numbers = _topk(index, queries, k, selected)  # (Q, K), (Q, K)
    return [
        [
            hit_at(index, rank, int(n), float(s))
            for rank, (s, n) in enumerate(zip(srow[nrow >= 0], nrow[nrow >= 0], strict=True), start=1)
        ]  # number -1: an ANN search proposed fewer than k items for this query
        for srow, nrow in zip(scores, numbers, strict=True)
    ]


def select(index: SearchIndex, where: Mapping[str, object] | None) -> np.ndarray | None:
    """Sorted numbers of the items matching every filter (None: no filter, every item).

    Raises:
        SearchIndexError: an unknown attribute (the message lists the index's attributes).

    Example:
        >>> select(index, {"colour": ["blue", "black"], "rips": "true"})  # doctest: +SKIP
        array([  3,  17, 120])
    """
    if not where:
        return None
    mask = np.ones(len(index), dtype=bool)  # (N,)
    for attribute, wanted in where.items():
        values = wanted if isinstance(wanted, list | tuple | set | frozenset) else [wanted]
        hit = np.zeros(len(index), dtype=bool)  # (N,)
        for value in values:
            hit[index.positions(attribute, value)] = True
        mask &= hit
    return np.flatnonzero(mask)


def hit_at(index: SearchIndex, rank: int, number: int, score: float) -> Hit:
    """The :class:`Hit` of item ``number`` at ``rank`` with ``score`` (its id, first caption, attributes)."""
    attributes = {a: values[number] for a, values in index.attributes.items()}
    captions = index.captions[number]
    return Hit(rank, index.ids[number], score, captions[0] if captions else "", attributes)


def _topk(
    index: SearchIndex, queries: np.ndarray, k: int, selected: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the selected items under the tie rule; (Q, K) scores and item numbers (-1: none)."""
    import faiss

    n_items = len(index)
    n_sel = n_items if selected is None else len(selected)
    k = min(k, n_sel)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if selected is not None and n_sel <= _SUBSET_SHARE * n_items:
        return _exact(index, queries, k, selected)  # few candidates: gathering them beats scanning all N
    if index.kind != "flat":
        return ann_topk(index.faiss_index, index.kind, index.params, index.vectors(), queries, k, selected)
    params: faiss.SearchParameters | None = None
    if selected is not None and n_sel < n_items:
        bitmap = np.zeros(n_items, dtype=bool)
        bitmap[selected] = True
        bits = np.packbits(bitmap, bitorder="little")  # FAISS reads bit i of byte i // 8, low bit first
        params = faiss.SearchParameters()  # faiss's SearchParameters(sel=...) sets the same attribute
        params.sel = faiss.IDSelectorBitmap(n_items, faiss.swig_ptr(bits))
    n_cand = min(n_sel, k + TIE_PAD)
    scores, numbers = index.faiss_index.search(queries, n_cand, params=params)  # (Q, n_cand) each

    def exact(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one query at a time, as ever: a (1, D) product keeps the scores' bits of the single-query path
        found = [_exact(index, queries[r : r + 1], k, selected) for r in rows.tolist()]  # (1, k) each
        return torch.from_numpy(np.concatenate([f[0] for f in found])), torch.from_numpy(
            np.concatenate([f[1] for f in found])
        )

    top_s, top_n = refine_candidates(torch.from_numpy(scores), torch.from_numpy(numbers), k, n_sel, exact)
    return top_s.numpy(), top_n.numpy().astype(np.int64)


def _exact(
    index: SearchIndex, queries: np.ndarray, k: int, selected: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of (Q, D) queries over the selected vectors, ties by lower item number; (Q, k) each."""
    items = index.vectors() if selected is None else index.vectors()[selected]  # (n, D)
    numbers = np.arange(len(items)) if selected is None else selected  # (n,) sorted
    rows = max(1, _SCORE_BLOCK // len(items))  # queries per block: bounded (rows, n) score matrix
    out_s, out_n = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for q0 in range(0, len(queries), rows):
        scores = queries[q0 : q0 + rows] @ items.T  # (rows, n) numpy's scores, ranked by the shared rule
        vals, pos = topk_of_scores(torch.from_numpy(np.ascontiguousarray(scores)), k)  # (rows, k) each
        out_s[q0 : q0 + rows], out_n[q0 : q0 + rows] = vals.numpy(), numbers[pos.numpy()]
    return out_s, out_n
