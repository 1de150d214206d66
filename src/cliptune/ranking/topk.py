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

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.progress import Progress

__all__ = [
    "TIE_PAD",
    "Ranked",
    "bf16_pays",
    "rank_chunked",
    "refine_candidates",
    "topk_chunked",
    "topk_of_scores",
]

# block of 1024 x 16384 float32 scores = 64 MiB: large enough for an efficient GEMM, small enough for a laptop
_ITEM_CHUNK = 16384
_QUERY_CHUNK = 1024
# extra candidates asked of FAISS so that ties at the k-th score are usually seen and ordered exactly
TIE_PAD = 16
# the bf16 candidate pass of topk_chunked keeps k + this many candidates per query, and runs from this many
# items (below it the fp32 pass is fast anyway). Chosen on synthetic unit vectors (seed 1, not the
# benchmark's seed 0) at 100k x 1k x 512-d, k = 10: queries whose candidates miss the margin (redone in
# fp32) were 64% with 16 extra, 3% with 32, none with 64; 128 was slower again (a busy 2-core box)
_BF16_EXTRA = 64
_BF16_MIN_ITEMS = 50_000
# near items re-scored per (query, relevant item) by the bf16 rank pass; a query with more is done in fp32
_BF16_NEAR_CAP = 1024


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


def _compare(block: torch.Tensor, thr: torch.Tensor, *, strict: bool) -> torch.Tensor:
    """``block > thr`` (strict) or ``block >= thr``, (q, n) vs (q, 1); numpy's compare on CPU (~5x torch's)."""
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        b, t = block.numpy(), thr.numpy()
        return torch.from_numpy(np.greater(b, t) if strict else np.greater_equal(b, t))
    return block > thr if strict else block >= thr


def _above(block: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every entry of a (q, n) block strictly above its row's threshold, row-major."""
    if block.device.type == "cpu" and block.dtype == torch.bfloat16 and bool((thr > 0).all()):
        # positive bf16 numbers order like their int16 bit patterns (a negative one has the sign bit:
        # a negative int16), and numpy compares int16 with AVX-512 about 5x faster than torch does bf16
        mask = block.contiguous().view(torch.int16).numpy() > thr.contiguous().view(torch.int16).numpy()
    elif block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        mask = np.greater(block.numpy(), thr.numpy())
    else:
        return (block > thr).nonzero(as_tuple=True)  # type: ignore[return-value]  # a 2-tuple for 2-d
    flat = torch.from_numpy(np.flatnonzero(mask))
    return flat // block.shape[1], flat % block.shape[1]


def _padded(
    rows: torch.Tensor, cols: torch.Tensor, scores: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter row-major (row, col, score) entries into (n_rows, m) matrices, -inf padded."""
    counts = torch.bincount(rows, minlength=n_rows)  # (q,)
    pos = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    vals = torch.full((n_rows, int(counts.max())), -float("inf"), dtype=scores.dtype, device=rows.device)
    idx = torch.zeros(vals.shape, dtype=torch.long, device=rows.device)
    vals[rows, pos], idx[rows, pos] = scores, cols
    return vals, idx


def _merge_block(
    run: tuple[torch.Tensor, torch.Tensor] | None, block: torch.Tensor, n0: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running exact top-k with a new block (items from ``n0``, after every item in ``run``).

    Once ``run`` holds k items only block entries strictly above its k-th score can enter: an equal
    score has a higher index, so the tie rule puts it after. Those few are gathered instead of a top-k
    of the whole block.
    """
    if run is None or run[0].shape[1] < k:
        bv, bi = _block_topk(block, min(k, block.shape[1]))
        return _merge(run, (bv, bi + n0), k)
    rows, cols = _above(block, run[0][:, k - 1 : k])
    if rows.numel() == 0:
        return run
    new_v, new_i = _padded(rows, cols + n0, block[rows, cols], block.shape[0])
    return _merge(run, (new_v, new_i), k)


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


class _NearTies:
    """Counts for one query chunk the items ranked ahead of each relevant item in ONE pass over the blocks.

    The block score ``s`` of a relevant item (the value its own block's matmul gives, which every
    comparison must use) is only known once that block is reached. Any float summation order of a
    D-term inner product is within ``gamma_D * sum_i |q_i x_i|`` of the exact value (Higham, Accuracy
    and Stability, Thm 3.1; ``gamma_D = D u / (1 - D u)``, u the unit roundoff; fused multiply-adds
    only tighten it), so a float64 estimate ``e`` gives ``lo <= s <= hi`` with
    ``lo, hi = e -/+ (gamma_D + D 2^-52) sum|q_i x_i| -/+ D * tiny`` (the float64 error and underflow),
    rounded outwards to the block dtype. A block item scoring above ``hi`` is surely ahead, one below
    ``lo`` surely not; the few in ``[lo, hi]`` (the item itself, exact ties, last-bit near-ties) are kept
    with their block score and compared with ``s`` by the tie rule at the end: the ranks are the same,
    bit for bit, as comparing every block score with ``s``.
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, cap: int) -> None:
        self.lo, self.hi, self.cap = lo, hi, cap  # (q, R) each, block dtype; +inf for padding
        self.sure = torch.zeros(lo.shape, dtype=torch.long, device=lo.device)  # (q, R) surely ahead
        self.kept: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []  # rows, r, cols, scores
        self.n_kept = 0

    @classmethod
    def start(cls, qv: torch.Tensor, items: torch.Tensor, ids: torch.Tensor) -> _NearTies | None:
        """The bounds for these queries' relevant items; None where no bound holds (then two passes)."""
        dtype, d = qv.dtype, qv.shape[1]
        unit = torch.finfo(dtype).eps / 2 if dtype in (torch.float32, torch.float64) else 1.0
        # a reduced-precision float32 matmul (TF32, bf16 "fast math") breaks the bound: not used then
        exact_mm = torch.get_float32_matmul_precision() == "highest" and qv.device.type in ("cpu", "cuda")
        if qv.device.type == "cuda":
            exact_mm = exact_mm and not torch.backends.cuda.matmul.allow_tf32
        if not exact_mm or d * unit >= 0.01:
            return None
        gamma = d * unit / (1 - d * unit) + d * 2.0**-52
        tiny = d * torch.finfo(dtype).tiny * 4
        q64 = qv.double()  # (q, D)
        lo, hi = torch.empty(ids.shape, dtype=dtype), torch.empty(ids.shape, dtype=dtype)
        for r in range(ids.shape[1]):
            x64 = items[ids[:, r].clamp(min=0)].double()  # (q, D)
            est = (q64 * x64).sum(1)  # (q,)
            err = gamma * (q64.abs() * x64.abs()).sum(1) + tiny  # (q,)
            if not bool(torch.isfinite(est).all() and torch.isfinite(err).all()):
                return None
            lo[:, r], hi[:, r] = (
                _round_out(est - err, dtype, down=True),
                _round_out(est + err, dtype, down=False),
            )
        pad = ids < 0
        lo = lo.to(qv.device).masked_fill(pad, float("inf"))  # never >= a finite score: padding keeps nothing
        hi = hi.to(qv.device).masked_fill(pad, float("inf"))
        return cls(lo, hi, cap=64 * ids.numel() + 4096)

    def scan(self, block: torch.Tensor, n0: int) -> _NearTies | None:
        """Count the block's items surely ahead, keep those near; None when too many are near (ties)."""
        for r in range(self.lo.shape[1]):
            above = _row_count(_compare(block, self.hi[:, r, None], strict=True))  # (q,)
            near = _row_count(_compare(block, self.lo[:, r, None], strict=False)) - above  # (q,)
            self.sure[:, r] += above
            rows = (near > 0).nonzero().squeeze(1)  # (t,)
            if rows.numel():
                self.n_kept += int(near.sum())
                if self.n_kept > self.cap:  # e.g. many duplicate items: the two-pass count is cheaper
                    return None
                sub = block[rows]  # (t, n)
                hit = (sub >= self.lo[rows, r, None]) & (sub <= self.hi[rows, r, None])
                rr, cc = hit.nonzero(as_tuple=True)
                self.kept.append((rows[rr], r, cc + n0, sub[rr, cc]))
        return self

    def resolve(self, s_rel: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Items ahead of each relevant item (q, R): the sure ones plus the kept ones the tie rule puts first."""
        ahead = self.sure.clone()
        for rows, r, cols, scores in self.kept:
            s, i = s_rel[rows, r], ids[rows, r]  # (m,), (m,)
            first = (cols != i) & (
                (scores > s) | ((scores == s) & (cols < i))
            )  # the item itself never counts
            ahead[:, r].index_add_(0, rows, first.long())
        return ahead


def _round_out(x: torch.Tensor, dtype: torch.dtype, *, down: bool) -> torch.Tensor:
    """float64 -> dtype rounded towards -inf (down) or +inf, so the interval only widens."""
    y = x.to(dtype)
    wrong = y.double() > x if down else y.double() < x
    step = torch.full_like(y, -float("inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(y, step), y)


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
    bf16_pass: bool = False,
) -> Ranked:
    """One pass over the items giving both the top-k lists and the exact ranks of relevant items.

    Each (query chunk x item chunk) block of scores is computed, its exact top-k merged into a running
    top-k, and, for every relevant item, the block items ranked ahead of it counted: the rank is
    ``1 + count``, exact over the FULL ranking (what MRR and MAP need), in O(block) memory. Every block
    is computed once: a relevant item's score from its own block is not known before that block, so the
    items ahead are counted against a float64 estimate of it with a proven error bound
    (:class:`_NearTies`), and the few items within the bound are compared with the block score at the
    end. The ranks are bit-identical to comparing every block score with the block score of the relevant
    item (no bound for the dtype or device, or too many near-ties: the blocks are computed twice).

    Args:
        queries: query embeddings; score = inner product.
        items: item embeddings, same dtype and D.
        k: list length (clamped to N); 0 skips the lists.
        relevant_ids: per query, the indices of its relevant items, -1 for padding; None skips ranks.
        chunk_size: items per block.
        query_chunk_size: queries per block.
        progress: show a rich progress bar over blocks (not shown by the bf16 pass).
        bf16_pass: with ``relevant_ids``, score in bf16 and re-score the items near each relevant item
            (:func:`_rank_bf16`; float32 on CPU only). Opt-in, as in :func:`topk_chunked`: ranks of items
            whose scores differ only in the last bit can swap against the fp32 pass, so by default every
            machine gives the same ranks, with or without native bf16; :func:`bf16_pays` says where it is
            faster.

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
    usable = queries.device.type == "cpu" and queries.dtype == torch.float32 and n_items > k + _BF16_EXTRA
    if relevant_ids is not None and bf16_pass and usable and n_q > 0:
        ranked = _rank_bf16(queries, items, k, relevant_ids, chunk_size, query_chunk_size)
        if ranked is not None:
            return ranked
    all_vals, all_idx, all_ranks = [], [], []
    n_blocks = -(-n_q // query_chunk_size) * -(-n_items // chunk_size)
    with _progress(progress, n_blocks, "ranking") as bar:
        for q0 in range(0, n_q, query_chunk_size):
            qv = queries[q0 : q0 + query_chunk_size]  # (q, D)
            run: tuple[torch.Tensor, torch.Tensor] | None = None
            if relevant_ids is not None:
                ids = relevant_ids[q0 : q0 + query_chunk_size].long()  # (q, R)
                s_rel = torch.zeros(ids.shape, dtype=queries.dtype, device=queries.device)  # (q, R)
                near = _NearTies.start(qv, items, ids)  # None: no error bound, so two passes
                ahead = torch.zeros(ids.shape, dtype=torch.long, device=queries.device)  # (q, R)
            # One pass: top-k, each relevant item's score taken from the very block that ranks it (an
            # elementwise q.x can differ from the matmul's value in the last bit, which would let two
            # identical relevant items, duplicate captions, both count the other as ahead), and the items
            # surely ahead of it (above an error bound of its score) counted; the few items within the
            # bound are kept and compared with the block score once it is known.
            for n0 in range(0, n_items, chunk_size):
                block = qv @ items[n0 : n0 + chunk_size].T  # (q, n)
                if k > 0:
                    run = _merge_block(run, block, n0, k)
                if relevant_ids is not None:
                    inside = (ids >= n0) & (ids < n0 + block.shape[1])  # (q, R)
                    local = (ids - n0).clamp(0, block.shape[1] - 1)
                    s_rel = torch.where(inside, block.gather(1, local), s_rel)
                    if near is not None:
                        near = near.scan(block, n0)
                if bar is not None:
                    bar.advance(bar.task_ids[0])
            if relevant_ids is not None and near is not None:
                ahead = near.resolve(s_rel, ids)
            elif relevant_ids is not None:  # no usable bound (or too many near-ties): count in a 2nd pass
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


def bf16_pays(items: torch.Tensor, n_items: int, k: int) -> bool:
    """Where the opt-in bf16 candidate pass is faster: a CPU with native bf16 (AVX-512 bf16, AMX), fp32 items,
    at least ``_BF16_MIN_ITEMS`` of them."""
    return (
        items.device.type == "cpu"
        and items.dtype == torch.float32
        and n_items >= _BF16_MIN_ITEMS
        and n_items > k + _BF16_EXTRA
        and _native_bf16()
    )


@functools.cache
def _native_bf16() -> bool:
    """A CPU with bf16 dot-product instructions (AVX-512 bf16 or AMX); oneDNN emulates bf16 on plain
    AVX-512, where the bf16 pass would be slower than fp32. Read from /proc/cpuinfo (Linux); else False."""
    if not bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _bf16_error_factor(d: int) -> float:
    """c with ``|bf16 score - fp32 score| <= c |q| |x|`` for D = d (derivation in :func:`_topk_bf16`)."""
    u, u32 = 2.0**-8, 2.0**-24
    return 3 * u + 4 * u * u + 3 * d * u32 / (1 - d * u32)


def _keep_best(
    block: torch.Tensor, n0: int, vals: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a bf16 block into the running (q, K) best approximate scores; only entries above the K-th."""
    width = vals.shape[1]
    if bool(torch.isinf(vals[:, -1]).all()):  # the first block: its own top-K
        bv, bi = torch.topk(block, min(width, block.shape[1]), dim=1)
        new_v, new_i = bv.float(), bi + n0
    else:  # later blocks: few entries beat the K-th so far; gather them into a (q, m) padded matrix
        rows, cols = _above(block, vals[:, -1:].to(block.dtype))  # the K-th values are bf16 values: exact
        if rows.numel() == 0:
            return vals, idx
        new_v, new_i = _padded(rows, cols + n0, block[rows, cols].float(), block.shape[0])
    all_v, all_i = torch.cat([vals, new_v], 1), torch.cat([idx, new_i], 1)
    top_v, top = torch.topk(all_v, width, dim=1)
    return top_v, all_i.gather(1, top)


def _pair_scores(queries: torch.Tensor, items: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Score of each query with the items ``cols[row]``, fp32, one computation for every pair.

    The scores of the bf16 paths (:func:`_dot32`): the same product-and-sum code for every pair, so
    identical items score identically (what the tie rule needs), within ``gamma_D sum|q_i x_i|`` of exact.

    Shapes:
        queries (q, D), items (N, D), cols (q, m) -> (q, m) float32
    """
    rows = torch.arange(cols.shape[0])[:, None].expand(cols.shape).reshape(-1)  # (q m,)
    return _dot32(queries, items, rows, cols.reshape(-1)).reshape(cols.shape)


def _dot32(
    queries: torch.Tensor, items: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``queries[rows[p]] . items[cols[p]]`` for every pair p: a row-wise product and sum; 16k pairs at a time."""
    out = torch.empty(rows.shape, dtype=queries.dtype)
    for p0 in range(0, rows.numel(), 16384):
        q = queries[rows[p0 : p0 + 16384]]  # (p, D)
        out[p0 : p0 + 16384] = (q * items[cols[p0 : p0 + 16384]]).sum(1)
    return out


def _bf16_keys(block: torch.Tensor) -> np.ndarray:
    """int16 keys ordered like the bf16 values (-0 just below +0): the sign-magnitude bits, negatives flipped."""
    bits = block.contiguous().view(torch.int16).numpy()
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))  # type: ignore[no-any-return]  # numpy's int16 ops


def _bf16_key_bounds(lo: torch.Tensor, hi: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Keys of bf16 values with ``key_lo <= key(lo)`` and ``key_hi >= key(hi)``: the interval only widens.

    float64 bounds go to float32 rounded outwards, then to bf16 and one key step outwards where rounding
    went inwards. A strict ``> key_hi`` never admits +0 against -0, and ``>= key_lo`` never drops -0
    against +0 (keys order -0 below +0, floats call them equal).
    """
    out = []
    for x, down in ((lo, True), (hi, False)):
        x32 = _round_out(x, torch.float32, down=down)
        xb = x32.bfloat16()
        key = torch.from_numpy(_bf16_keys(xb).astype(np.int32))
        inward = xb.float() > x32 if down else xb.float() < x32
        key = key + torch.where(inward, -1 if down else 1, 0)
        key = torch.where(key == (0 if down else -1), -1 if down else 0, key)  # the signed zeros
        out.append(key.clamp(-32768, 32767).to(torch.int16).numpy())
    return out[0], out[1]


def _rank_bf16(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    relevant_ids: torch.Tensor,
    chunk_size: int,
    query_chunk_size: int,
) -> Ranked | None:
    """:func:`rank_chunked` through bf16 GEMMs; the lists as in :func:`_topk_bf16`, the ranks exact.

    The score of a relevant item is :func:`_pair_scores`' (s); a block item whose bf16 score ``a`` is
    above ``s + bound`` is surely ahead, below ``s - bound`` surely not (the bound of
    :func:`_topk_bf16`: ``|a - f| <= c |q| |x|`` for the re-scored f). The items in between are re-scored
    and compared with s by the tie rule, so the ranks are those of the re-scored fp32 scores exactly.
    A query with more than ``_BF16_NEAR_CAP`` items in between for one relevant item (a relevant item
    deep in the ranking, or mass ties) is recomputed in fp32.
    """
    n_q, n_items, d = queries.shape[0], items.shape[0], queries.shape[1]
    ids = relevant_ids.long()
    n_rel = ids.shape[1]
    x_norm = float(items.norm(dim=1).max()) * (1 + 1e-5)
    if not (math.isfinite(x_norm) and bool(torch.isfinite(queries.norm(dim=1)).all())):
        return None  # a NaN or inf anywhere: no bound; the fp32 path ranks it as it always did
    bound = _bf16_error_factor(d) * queries.norm(dim=1).double() * x_norm * (1 + 1e-5) + 4 * d * 2.0**-126
    s_rel = _pair_scores(queries, items, ids.clamp(min=0))  # (Q, R)
    pad = ids < 0
    lo = torch.where(pad, float("inf"), s_rel.double() - bound[:, None])
    hi = torch.where(pad, float("inf"), s_rel.double() + bound[:, None])
    key_lo, key_hi = _bf16_key_bounds(lo, hi)  # (Q, R) each
    sure = np.zeros((n_q, n_rel), dtype=np.int64)
    near_n = np.zeros((n_q, n_rel), dtype=np.int64)
    kept: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # rows, r, cols
    width = k + _BF16_EXTRA
    vals = torch.full((n_q, width), -float("inf"))
    idx = torch.zeros((n_q, width), dtype=torch.long)
    qb = queries.bfloat16()
    for n0 in range(0, n_items, chunk_size):
        xb = items[n0 : n0 + chunk_size].bfloat16()  # (n, D)
        for q0 in range(0, n_q, query_chunk_size):
            sl = slice(q0, q0 + query_chunk_size)
            block = qb[sl] @ xb.T  # (q, n) bf16
            if k > 0:
                vals[sl], idx[sl] = _keep_best(block, n0, vals[sl], idx[sl])
            keys = _bf16_keys(block)  # (q, n)
            for r in range(n_rel):
                lo_r, hi_r = key_lo[sl, r, None], key_hi[sl, r, None]  # (q, 1)
                above = np.count_nonzero(keys > hi_r, axis=1)
                near = np.count_nonzero(keys >= lo_r, axis=1) - above
                sure[sl, r] += above
                near_n[sl, r] += near
                hit = np.flatnonzero((near > 0) & (near_n[sl, r] <= _BF16_NEAR_CAP))
                if hit.size:
                    sub = keys[hit]
                    rr, cc = np.nonzero((sub >= lo_r[hit]) & (sub <= hi_r[hit]))
                    kept.append((torch.from_numpy(hit[rr] + q0), r, torch.from_numpy(cc + n0)))
    ahead = torch.from_numpy(sure)
    for rows, r, cols in kept:
        f = _dot32(queries, items, rows, cols)  # (m,)
        s, i = s_rel[rows, r], ids[rows, r]
        first = (cols != i) & ((f > s) | ((f == s) & (cols < i)))  # the item itself never counts
        ahead[:, r].index_add_(0, rows, first.long())
    ranks = torch.where(pad, 0, ahead + 1)
    out_v, out_i = torch.zeros(n_q, k), torch.zeros(n_q, k, dtype=torch.long)
    redo = torch.from_numpy((near_n > _BF16_NEAR_CAP).any(1))  # (Q,)
    if k > 0:
        cand = idx
        exact = _pair_scores(queries, items, cand)
        ev, ei = _sort_pairs(exact, cand)
        out_v, out_i = ev[:, :k].contiguous(), ei[:, :k].contiguous()
        b32 = bound.float()
        redo |= ~(vals[:, -1] + b32 < out_v[:, k - 1])  # lists not proven exact (also NaN / inf)
    rows = redo.nonzero().squeeze(1)
    if rows.numel():
        r32 = rank_chunked(
            queries[rows],
            items,
            k,
            relevant_ids[rows],
            chunk_size=chunk_size,
            query_chunk_size=query_chunk_size,
            bf16_pass=False,
        )
        out_v[rows], out_i[rows], ranks[rows] = r32.scores, r32.indices, r32.ranks
    return Ranked(out_v, out_i, ranks)


def _topk_bf16(
    queries: torch.Tensor, items: torch.Tensor, k: int, chunk_size: int, query_chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (fp32, tie rule) through a bf16 candidate pass, about 2.4x faster GEMMs on a bf16 CPU.

    Pass 1 scores every item in bf16 (inputs rounded to bf16, products summed in fp32, the result
    rounded to bf16) and keeps the K = k + ``_BF16_EXTRA`` best approximate scores ``a`` per query.
    Pass 2 re-scores those K (:func:`_pair_scores`) and orders them by the tie rule. The bound: for any item,
    ``|a - f| <= c * |q| * |x|`` with f its re-scored fp32 score, ``c = 3 u + 4 u^2 + 3 gamma_D`` (u = 2^-8 the bf16
    unit roundoff: 2u for rounding q and x, u for rounding the result; gamma_D = D 2^-24 / (1 - D 2^-24)
    for the fp32 sums of both passes; Cauchy-Schwarz gives sum |q_i x_i| <= |q| |x|) plus an absolute
    ``4 D * 2^-126`` for flushed subnormals. Every item left out has ``a <= a_K`` (the K-th kept), so
    its fp32 score is below ``a_K + bound``; where that is below the k-th re-scored score, no item left
    out can enter or tie the top k, and the lists are exact. Other rows are recomputed in fp32.
    """
    n_q, n_items = queries.shape[0], items.shape[0]
    width = k + _BF16_EXTRA
    vals = torch.full((n_q, width), -float("inf"))
    idx = torch.zeros((n_q, width), dtype=torch.long)
    qb = queries.bfloat16()  # (Q, D)
    for n0 in range(0, n_items, chunk_size):  # items outside: each block is converted to bf16 once
        xb = items[n0 : n0 + chunk_size].bfloat16()  # (n, D)
        for q0 in range(0, n_q, query_chunk_size):
            sl = slice(q0, q0 + query_chunk_size)
            vals[sl], idx[sl] = _keep_best(qb[sl] @ xb.T, n0, vals[sl], idx[sl])
    d = queries.shape[1]
    c = _bf16_error_factor(d)
    x_norm = float(items.norm(dim=1).max()) * (1 + 1e-5)
    out_v = torch.empty((n_q, k), dtype=queries.dtype)
    out_i = torch.empty((n_q, k), dtype=torch.long)
    for q0 in range(0, n_q, query_chunk_size):
        qv, cand = queries[q0 : q0 + query_chunk_size], idx[q0 : q0 + query_chunk_size]  # (q, D), (q, K)
        exact = _pair_scores(qv, items, cand)  # (q, K) fp32 re-scores
        ev, ei = _sort_pairs(exact, cand)
        out_v[q0 : q0 + qv.shape[0]], out_i[q0 : q0 + qv.shape[0]] = ev[:, :k], ei[:, :k]
    bound = c * queries.norm(dim=1) * x_norm * (1 + 1e-5) + 4 * d * 2.0**-126  # (Q,)
    safe = vals[:, -1] + bound < out_v[:, k - 1]  # False for NaN / inf too
    redo = (~safe).nonzero().squeeze(1)
    if redo.numel():  # near-ties across the margin (or non-finite scores): the fp32 pass for those rows
        r = rank_chunked(queries[redo], items, k, chunk_size=chunk_size, query_chunk_size=query_chunk_size)
        out_v[redo], out_i[redo] = r.scores, r.indices
    return out_v, out_i


def topk_chunked(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    chunk_size: int = _ITEM_CHUNK,
    query_chunk_size: int = _QUERY_CHUNK,
    progress: bool = False,
    bf16_pass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product in bounded memory, ties broken by lower item index.

    On a CPU with native bf16 GEMMs an opt-in bf16 candidate pass (``bf16_pass=True``) with exact fp32
    re-scoring of every item within a proven error bound of the k-th score gives the lists faster
    (``_topk_bf16``); its re-scored scores may differ from a block matmul's in the last bit, so it is off by
    default: one answer on every machine.

    Args:
        queries: query embeddings.
        items: item embeddings (same dtype and D).
        k: list length, >= 1 (clamped to N).
        chunk_size: items per block; memory is about ``query_chunk_size * chunk_size`` scores.
        query_chunk_size: queries per block.
        progress: show a rich progress bar (not shown by the bf16 pass).
        bf16_pass: use the bf16 candidate pass (float32 on CPU only); :func:`bf16_pays` says where it is
            faster (a CPU with native bf16, at least ``_BF16_MIN_ITEMS`` items).

    Returns:
        ``(scores, indices)``, each row sorted by (score desc, index asc); scores are fp32 inner products
        (the re-scored ones may differ from a full matmul's in the last bit).

    Shapes:
        queries (Q, D), items (N, D) -> scores (Q, K) float, indices (Q, K) int64, K = min(k, N)

    Example:
        >>> topk_chunked(torch.tensor([[1.0]]), torch.tensor([[0.5], [2.0], [0.5]]), k=2)[1].tolist()
        [[1, 0]]
    """
    if k < 1:
        raise ValueError(f"topk_chunked: k must be >= 1, got {k}")
    _check_inputs("topk_chunked", queries, items)
    usable = (
        queries.device.type == "cpu" and queries.dtype == torch.float32 and items.shape[0] > k + _BF16_EXTRA
    )
    if bf16_pass and usable and chunk_size >= 1 and query_chunk_size >= 1:
        return _topk_bf16(queries, items, k, chunk_size, query_chunk_size)
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
