"""Exact top-k retrieval and exact ranks in bounded memory: chunked torch, or FAISS ``IndexFlatIP``.

Scores are inner products ``queries @ items.T`` (normalise the embeddings first for cosine). The
ranking rule is the one of :mod:`cliptune.ranking.metrics`: score descending, ties by LOWER item index first,
so every path here returns the same lists as ``rank_items`` on the full matrix, just without ever
holding the (Q, N) matrix: scores are computed one (query chunk x item chunk) block at a time.

Example:
    >>> q, x = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> topk_chunked(q, x, k=2)[1].tolist()  # query 0: items 0 and 2 tie at 1.0; lower index first
    [[0, 2], [1, 0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from rich.progress import Progress

__all__ = ["TIE_PAD", "Ranked", "rank_chunked", "refine_candidates", "topk_chunked", "topk_of_scores"]

# block of 1024 x 16384 float32 scores = 64 MiB: large enough for an efficient GEMM, small enough for a laptop
_ITEM_CHUNK = 16384
_QUERY_CHUNK = 1024
# extra candidates asked of FAISS so that ties at the k-th score are usually seen and ordered exactly
TIE_PAD = 16


class Ranked(NamedTuple):
    """Result of :func:`rank_chunked`: top-k lists and the exact ranks of the relevant items.

    Shapes: scores, indices (Q, K) with K = min(k, N); ranks (Q, R), 0 for padding.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    ranks: torch.Tensor


def _check_inputs(where: str, queries: torch.Tensor, items: torch.Tensor) -> None:
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(
            f"{where}: expected queries (Q, D) and items (N, D) with one D, got "
            f"{tuple(queries.shape)} and {tuple(items.shape)}"
        )
    if items.shape[0] == 0:
        raise ValueError(f"{where}: items is empty (N = 0): nothing to rank")
    if queries.dtype != items.dtype or not queries.is_floating_point():
        raise ValueError(
            f"{where}: queries and items must share one float dtype, got {queries.dtype}, {items.dtype}"
        )


def _check_ids(where: str, relevant_ids: torch.Tensor, n_queries: int, n_items: int) -> None:
    if relevant_ids.dim() != 2 or relevant_ids.shape[0] != n_queries or relevant_ids.is_floating_point():
        raise ValueError(
            f"{where}: relevant_ids must be an integer (Q, R) tensor with Q = {n_queries}, "
            f"got {relevant_ids.dtype} {tuple(relevant_ids.shape)}"
        )
    bad = (relevant_ids < -1) | (relevant_ids >= n_items)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(
            f"{where}: relevant_ids row {row} has an id outside [0, {n_items}) (use -1 for padding)"
        )
    srt = relevant_ids.sort(1).values  # (Q, R)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        row = int(dup.any(1).nonzero()[0])
        raise ValueError(f"{where}: relevant_ids row {row} lists the same item twice")


def _sort_pairs(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by (score descending, index ascending)."""
    o = torch.argsort(idx, dim=1)  # indices are distinct within a row
    vals, idx = vals.gather(1, o), idx.gather(1, o)
    o = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, o), idx.gather(1, o)


def _block_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a (q, n) block under the tie rule (torch.topk alone picks ties arbitrarily)."""
    if block.shape[1] <= k:  # the whole block is the answer; only its order matters
        return torch.topk(block, block.shape[1], dim=1)
    vals, idx = torch.topk(block, k + 1, dim=1)  # (q, k + 1)
    # if the (k+1)-th score is below the k-th, every item tied with the k-th is already kept; otherwise
    # topk may have kept the wrong ones among the ties, so redo those (rare) rows with a stable sort
    unsure = vals[:, k] == vals[:, k - 1]  # (q,)
    if unsure.any():
        rows = unsure.nonzero().squeeze(1)
        v, i = torch.sort(block[rows], dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = v[:, : k + 1], i[:, : k + 1]
    return vals[:, :k], idx[:, :k]


def _merge(
    run: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = new if run is None else (torch.cat([run[0], new[0]], 1), torch.cat([run[1], new[1]], 1))
    vals, idx = _sort_pairs(vals, idx)
    return vals[:, :k], idx[:, :k]


def _row_count(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row; numpy's count_nonzero is ~6x faster than torch's bool sum on CPU."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=1).astype(np.int64))
    return mask.sum(1)


def _count_ahead(block: torch.Tensor, n0: int, s_rel: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Items of the block ranked ahead of each relevant item: higher score, or equal and lower index."""
    count = torch.zeros(ids.shape, dtype=torch.long, device=block.device)  # (q, R)
    n = block.shape[1]
    rows = torch.arange(ids.shape[0], device=block.device)  # (q,)
    for r in range(ids.shape[1]):  # R is small (a few relevant items); two passes over the block each
        s, i = s_rel[:, r], ids[:, r]  # (q,), (q,)
        here = (i >= n0) & (i < n0 + n)  # (q,) the relevant item lies in this block
        self_score = block[rows, (i - n0).clamp(0, n - 1)]  # (q,)
        # the item itself never counts, even if its block score and s_rel differ in the last bit
        count[:, r] = _row_count(block > s[:, None]) - (here & (self_score > s)).long()
        # exact ties with other items are rare on float data: find the rows that have any, then
        # count only those tied items with a lower index (the tie rule puts them first)
        others_tied = _row_count(block == s[:, None]) - (here & (self_score == s)).long()  # (q,)
        tied_rows = (others_tied > 0).nonzero().squeeze(1)
        if tied_rows.numel():
            cols = torch.arange(n0, n0 + n, device=block.device)[None, :]  # (1, n)
            sub, s_sub, i_sub = (
                block[tied_rows],
                s[tied_rows, None],
                i[tied_rows, None],
            )  # (t, n), (t, 1), (t, 1)
            count[tied_rows, r] += _row_count((sub == s_sub) & (cols < i_sub))
    return count


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    with Progress(transient=True) as bar:
        bar.add_task(what, total=total)
        yield bar


@torch.no_grad()
def rank_chunked(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    relevant_ids: torch.Tensor | None = None,
    *,
    chunk_size: int = _ITEM_CHUNK,
    query_chunk_size: int = _QUERY_CHUNK,
    progress: bool = False,
) -> Ranked:
    """One pass over the items giving both the top-k lists and the exact ranks of relevant items.

    Each (query chunk x item chunk) block of scores is computed, its exact top-k merged into a running
    top-k, and, for every relevant item, the block items ranked ahead of it counted: the rank is
    ``1 + count``, exact over the FULL ranking (what MRR and MAP need), in O(block) memory. With
    ``relevant_ids`` the blocks are computed twice (relevant scores first, then the counts), so that every
    comparison uses bit-identical matmul scores.

    Args:
        queries: query embeddings; score = inner product.
        items: item embeddings, same dtype and D.
        k: list length (clamped to N); 0 skips the lists.
        relevant_ids: per query, the indices of its relevant items, -1 for padding; None skips ranks.
        chunk_size: items per block.
        query_chunk_size: queries per block.
        progress: show a rich progress bar over blocks.

    Returns:
        :class:`Ranked` ``(scores, indices, ranks)``; lists sorted by (score desc, index asc); ranks 1-based,
        0 where ``relevant_ids`` is -1. Skipped parts are empty tensors.

    Shapes:
        queries (Q, D), items (N, D), relevant_ids (Q, R) -> scores, indices (Q, min(k, N)), ranks (Q, R)

    Example:
        >>> q, x = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> rank_chunked(q, x, k=1, relevant_ids=torch.tensor([[2], [0]])).ranks.tolist()
        [[2], [2]]
    """
    _check_inputs("rank_chunked", queries, items)
    if k < 0 or chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(
            f"rank_chunked: need k >= 0 and chunk sizes >= 1, got {k}, {chunk_size}, {query_chunk_size}"
        )
    n_q, n_items = queries.shape[0], items.shape[0]
    if relevant_ids is not None:
        _check_ids("rank_chunked", relevant_ids, n_q, n_items)
    k = min(k, n_items)
    all_vals, all_idx, all_ranks = [], [], []
    n_blocks = -(-n_q // query_chunk_size) * -(-n_items // chunk_size)
    with _progress(progress, n_blocks, "ranking") as bar:
        for q0 in range(0, n_q, query_chunk_size):
            qv = queries[q0 : q0 + query_chunk_size]  # (q, D)
            run: tuple[torch.Tensor, torch.Tensor] | None = None
            if relevant_ids is not None:
                ids = relevant_ids[q0 : q0 + query_chunk_size].long()  # (q, R)
                s_rel = torch.zeros(ids.shape, dtype=queries.dtype, device=queries.device)  # (q, R)
                ahead = torch.zeros(ids.shape, dtype=torch.long, device=queries.device)  # (q, R)
            # Pass 1: top-k, and each relevant item's score taken from the very block that ranks it: an
            # elementwise q.x can differ from the matmul's value in the last bit, which would let two
            # identical relevant items (duplicate captions) both count the other as ahead.
            for n0 in range(0, n_items, chunk_size):
                block = qv @ items[n0 : n0 + chunk_size].T  # (q, n)
                if k > 0:
                    bv, bi = _block_topk(block, min(k, block.shape[1]))
                    run = _merge(run, (bv, bi + n0), k)
                if relevant_ids is not None:
                    inside = (ids >= n0) & (ids < n0 + block.shape[1])  # (q, R)
                    local = (ids - n0).clamp(0, block.shape[1] - 1)
                    s_rel = torch.where(inside, block.gather(1, local), s_rel)
                if bar is not None:
                    bar.advance(bar.task_ids[0])
            # Pass 2 (ranks only): count the items ranked ahead of each relevant item, block by block.
            if relevant_ids is not None:
                for n0 in range(0, n_items, chunk_size):
                    ahead += _count_ahead(qv @ items[n0 : n0 + chunk_size].T, n0, s_rel, ids)
            if run is not None:
                all_vals.append(run[0])
                all_idx.append(run[1])
            if relevant_ids is not None:
                all_ranks.append(torch.where(ids >= 0, ahead + 1, torch.zeros_like(ahead)))
    n_rel = 0 if relevant_ids is None else relevant_ids.shape[1]
    dev = queries.device
    return Ranked(  # empty parts (k = 0, no relevant_ids, or Q = 0) keep their documented shapes
        torch.cat(all_vals) if all_vals else torch.zeros(n_q, k, dtype=queries.dtype, device=dev),
        torch.cat(all_idx) if all_idx else torch.zeros(n_q, k, dtype=torch.long, device=dev),
        torch.cat(all_ranks) if all_ranks else torch.zeros(n_q, n_rel, dtype=torch.long, device=dev),
    )


def topk_chunked(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    chunk_size: int = _ITEM_CHUNK,
    query_chunk_size: int = _QUERY_CHUNK,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product in bounded memory, ties broken by lower item index.

    Args:
        queries: query embeddings.
        items: item embeddings (same dtype and D).
        k: list length, >= 1 (clamped to N).
        chunk_size: items per block; memory is about ``query_chunk_size * chunk_size`` scores.
        query_chunk_size: queries per block.
        progress: show a rich progress bar.

    Returns:
        ``(scores, indices)``, each row sorted by (score desc, index asc).

    Shapes:
        queries (Q, D), items (N, D) -> scores (Q, K) float, indices (Q, K) int64, K = min(k, N)

    Example:
        >>> topk_chunked(torch.tensor([[1.0]]), torch.tensor([[0.5], [2.0], [0.5]]), k=2)[1].tolist()
        [[1, 0]]
    """
    if k < 1:
        raise ValueError(f"topk_chunked: k must be >= 1, got {k}")
    r = rank_chunked(
        queries, items, k, None, chunk_size=chunk_size, query_chunk_size=query_chunk_size, progress=progress
    )
    return r.scores, r.indices


def topk_of_scores(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a score matrix already computed, under the tie rule (score desc, index asc).

    For callers that score with their own kernel (the search index scores with numpy, and its scores
    must not change) but must rank exactly like :func:`topk_chunked`.

    Args:
        scores: Scores of each query (row) against each item (column); no NaN.
        k: List length, 1 <= k <= N.

    Returns:
        ``(scores, indices)``, each row sorted by (score desc, index asc).

    Shapes:
        scores (Q, N) -> (Q, k), (Q, k)

    Example:
        >>> topk_of_scores(torch.tensor([[0.5, 2.0, 0.5]]), k=2)[1].tolist()
        [[1, 0]]
    """
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"topk_of_scores: k must be in [1, {scores.shape[1]}], got {k}")
    return _merge(None, _block_topk(scores, k), k)


def refine_candidates(
    scores: torch.Tensor,
    ids: torch.Tensor,
    k: int,
    n_pool: int,
    exact: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k under the tie rule from the candidates of an exact search that orders ties arbitrarily.

    FAISS's flat search finds the best scores exactly but orders equal scores however its heap leaves
    them, and may keep any of several items tied at the k-th score. So it is asked for
    ``min(n_pool, k + TIE_PAD)`` candidates, which are re-sorted here by (score desc, id asc); a query whose
    k-th score still equals its last candidate's score may have unseen tied items and is recomputed with
    ``exact``. The result follows the rule of :func:`topk_chunked` wherever the two backends compute the
    same float scores (on general float data two items whose scores differ only by rounding may swap).

    Args:
        scores: Candidate scores per query, from the search.
        ids: Their item ids (distinct within a row).
        k: List length, >= 1, <= the number of candidates.
        n_pool: How many items the search could return (all, or those a filter selects).
        exact: Exact top-k (scores, ids) of the given query rows over the same pool, ties by lower id.

    Returns:
        ``(scores, ids)`` of the k best per query, each row sorted by (score desc, id asc).

    Shapes:
        scores, ids (Q, C) with C = min(n_pool, k + TIE_PAD) -> (Q, k), (Q, k)

    Example:
        >>> refine_candidates(torch.tensor([[1.0, 1.0]]), torch.tensor([[5, 2]]), 1, 2, None)[1].tolist()
        [[2]]
    """
    vals, idx = _sort_pairs(scores, ids.long())  # (Q, C)
    if vals.shape[1] < n_pool:  # a row whose k-th score ties its last candidate may have unseen tied items
        unsure = (vals[:, k - 1] == vals[:, -1]).nonzero().squeeze(1)  # (u,)
        if unsure.numel():
            ev, ei = exact(unsure)
            vals[unsure, :k], idx[unsure, :k] = ev.to(vals.dtype), ei.long()
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()
