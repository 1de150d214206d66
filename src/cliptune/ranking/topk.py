"""Exact top-k retrieval and exact ranks in bounded memory: chunked torch, or FAISS ``IndexFlatIP``.

Scores are inner products (normalise the embeddings first for cosine), defined exactly by
:func:`exact_scores`: float64 products of the inputs summed in one fixed order, the same bits on every
machine. The ranking rule is the one of :mod:`cliptune.ranking.metrics`: score descending, ties by LOWER
item index first. Fast block GEMMs (bf16, fp32) only propose candidates, with proven error bounds; every
item they leave undecided is re-scored exactly, so the answer never depends on the kernel or the CPU, and
the (Q, N) matrix is never held.

Example:
    >>> q, x = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> topk_chunked(q, x, k=2)[1].tolist()  # query 0: items 0 and 2 tie at 1.0; lower index first
    [[0, 2], [1, 0]]
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from rich.progress import Progress
from threadpoolctl import ThreadpoolController

__all__ = [
    "TIE_PAD",
    "Ranked",
    "bf16_pays",
    "exact_scores",
    "rank_chunked",
    "refine_candidates",
    "topk_chunked",
    "topk_of_scores",
]

# block of 1024 x 16384 float32 scores = 64 MiB: large enough for an efficient GEMM, small enough for a laptop
# (two are alive at once on the CPU: one block's numpy work runs beside the next block's GEMM)
_ITEM_CHUNK = 16384
_QUERY_CHUNK = 1024
# extra candidates asked of FAISS so that ties at the k-th score are usually seen and ordered exactly
TIE_PAD = 16
# the bf16 candidate pass keeps k + this many candidates per query, and runs from this many items (below it
# the fp32 pass is fast anyway). Chosen on synthetic unit vectors (seed 1, not the benchmark's seed 0) at
# 100k x 1k x 512-d, k = 10: queries whose candidates miss the margin (a second pass) were 64% with 16 extra,
# 3% with 32, none with 64; 128 was slower again (a busy 2-core box)
_BF16_EXTRA = 64
_BF16_MIN_ITEMS = 50_000
# the fp32 pass's bound is ~100x tighter (gamma_512 = 3e-5 against bf16's ~3.6e-3 for random unit vectors)
_FP_EXTRA = 16
# near items re-scored per (query, relevant item) by the bf16 pass; a query with more is redone in fp32 (a
# safety net: the pilot below sends the queries predicted to pass it to fp32 before the pass)
_BF16_NEAR_CAP = 1024
# The pilot that routes each query of a ranks run ("auto") to the bf16 or the fp32 kernel. Cost model, per
# query: the bf16 pass costs N c16 (its GEMM) + B c_x (B near items re-scored exactly, numpy on one thread),
# the fp32 pass N c32 (its band is ~100x narrower: negligible). So fp32 is cheaper where
# B > N (c32 - c16) / c_x. Costs per pair at D = 512 (1024 x 16384 blocks, random unit vectors from seed 3,
# not any benchmark's data; the 2-core AMD EPYC with avx512_bf16, one thread): c32 = 18.6 ns, c16 = 6.6 ns,
# c_x = 1.8 us (exact_scores). All three grow about linearly with D, so the ratio (c32 - c16) / c_x =
# 1 / 150 holds for other D; the GEMMs use T threads, the re-scoring is counted as one (it is split over
# the threads with the block's other numpy work, _in_row_ranges, which gained ~1.2x from a second thread:
# memory-bound), hence 1 / (150 T) of N.
# Where NumPy's BLAS computes the fp32 blocks (_numpy_sgemm_faster), c32 = 12.4 ns (torch's 16.9 ns and c16
# = 6.7 ns in the same measurement, the same machine): c32 - c16 shrinks from 12.0 to 5.7 ns, and this
# constant and _BF16_MIN_QUERIES double (_gemm_gain)
_ROUTE_RESCORE_PER_GEMM = 150
# items in the pilot: a fixed stride over the catalogue (never the judging data), a ~2% fp32 GEMM at 100k.
# A query at the break-even band expects B * M / N = M / (150 T) of them in its sample (~7 at T = 2);
# mis-routing one near break-even costs little either way, as both routes cost about the same there
_PILOT_ITEMS = 2048
# the bf16 pass also costs a pass of its own over the items (each block converted to bf16: ~0.3-0.5 us per
# item at D = 512, one thread, measured as above), which its queries pay back at c32 - c16 = 12 ns per query
# and item on one thread: from 0.5 us / 12 ns ~ 40 queries per thread. Where fewer queries are left on
# bf16 by the pilot, all go to the fp32 kernel (one pass)
_BF16_MIN_QUERIES = 40
# the counts take the items ahead of a relevant item from a list of the entries at or above its band where,
# in a chunk of rows (_SCAN_ENTRIES), at most this share of the entries is (a few per query where it ranks
# high); else from a count per row of the entries above the band, listing the band alone. Equal near 2% on
# the 2-core AMD EPYC (16 x 16384 uniform float32 chunks, one thread: listed 110-150 us at 1% of the
# entries, 320-400 at 2%, 630-690 at 5%; the count 350-440 us at any share)
_DENSE_AHEAD = 1 / 50
# entries of a block the numpy scans take at a time (~16 rows of a 16384-item block): the compare's masks
# of 2^18 entries stay in the 2 MiB L2 instead of each op's going to memory and back over the whole 64 MiB
# block. On the 2-core AMD EPYC, per 1024 x 16384 float32 block of deep relevant items: 24 ms whole, 13 ms
# in row chunks (the dense count); a compare + flatnonzero 8 -> 7.7 ms
_SCAN_ENTRIES = 2**18
# rows per thread at least when a block's numpy work is split over threads (_in_row_ranges)
_MIN_RANGE_ROWS = 64
# pairs re-scored exactly at a time: 1024 x 512 float64 products = 4 MiB, in cache
_PAIR_CHUNK = 1024
# fp32 candidate blocks on the CPU go to torch's BLAS (MKL in the PyPI wheels) or NumPy's (OpenBLAS),
# whichever ran faster on this machine (_numpy_sgemm_faster, timed once per process). On the 2-core AMD
# EPYC, 1000 x 32768 x 1024: torch 110 GFLOP/s, NumPy 168 (OpenBLAS's AVX-512 kernels; MKL takes a slower
# path on AMD CPUs). Only speed depends on it: the fp32 bound holds for any summation order. Blocks under
# this many flops stay on torch (no timing for small rankings)
_SGEMM_MIN_FLOP = 2**30


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
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64, torch.int16):
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


def exact_scores(
    queries: torch.Tensor, items: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """THE score of each pair ``(queries[rows[p]], items[cols[p]])``: the one every ranking here follows.

    The products are taken in float64 (exact for float32, bf16 and fp16 inputs: 24 + 24 bits fit in 53)
    and summed in one fixed pairwise order (D zero-padded to a power of two; elementwise IEEE adds, no BLAS),
    so the value is the same bit for bit on every machine and device, whatever GEMM found the candidates.
    It is within ``gamma_L sum|q_i x_i|`` of the real inner product (L = ceil(log2 D), float64 u).

    Shapes:
        queries (Q, D), items (N, D), rows, cols (P,) -> (P,) float64

    Example:
        >>> q, x = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.0, 0.0]])
        >>> exact_scores(q, x, torch.tensor([0, 0]), torch.tensor([0, 1])).tolist()
        [6.0, 0.5]
    """
    d = queries.shape[1]
    width = 1 << max(0, (d - 1).bit_length())
    if queries.device.type == "cpu":  # numpy: ~20x faster than torch's gathers and small ops here
        q, x = (t.detach().float() if t.dtype == torch.bfloat16 else t.detach() for t in (queries, items))
        return torch.from_numpy(_exact_scores_np(q.numpy(), x.numpy(), rows.numpy(), cols.numpy(), width))
    return _exact_scores_torch(queries, items, rows, cols, width)


def _exact_scores_torch(
    queries: torch.Tensor, items: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, width: int
) -> torch.Tensor:
    """:func:`exact_scores` in torch (GPUs): the same products and the same order of additions."""
    d = queries.shape[1]
    out = torch.empty(rows.shape, dtype=torch.float64, device=queries.device)
    for p0 in range(0, rows.numel(), _PAIR_CHUNK):
        r, c = rows[p0 : p0 + _PAIR_CHUNK], cols[p0 : p0 + _PAIR_CHUNK]
        prod = torch.zeros((r.numel(), width), dtype=torch.float64, device=queries.device)
        prod[:, :d] = queries[r]
        prod[:, :d] *= items[c]  # float64 products
        w = width
        while w > 1:  # the fixed order: element j plus element j + w/2, halving
            w //= 2
            prod = prod[:, :w] + prod[:, w : 2 * w]
        out[p0 : p0 + r.numel()] = prod[:, 0]
    return out


def _exact_scores_np(
    q: np.ndarray, x: np.ndarray, rows: np.ndarray, cols: np.ndarray, width: int
) -> np.ndarray:
    """:func:`exact_scores` in numpy: the same products and the same order of additions."""
    d = q.shape[1]
    out = np.empty(rows.shape, dtype=np.float64)
    for p0 in range(0, rows.size, _PAIR_CHUNK):
        r, c = rows[p0 : p0 + _PAIR_CHUNK], cols[p0 : p0 + _PAIR_CHUNK]
        prod = np.zeros((r.size, width), dtype=np.float64)
        prod[:, :d] = q[r]
        prod[:, :d] *= x[c]
        w = width
        while w > 1:
            w //= 2
            prod = prod[:, :w] + prod[:, w : 2 * w]
        out[p0 : p0 + r.size] = prod[:, 0]
    return out


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


class _Kernel(NamedTuple):
    """The candidate GEMM of a pass and its bounds, (Q,) float64 each.

    ``err`` bounds ``|y - exact_scores|`` for y the GEMM's score before it is rounded to the block dtype:
    what the key comparisons need, as their thresholds are rounded outwards to block values (rounding is
    monotone: ``y <= t`` gives ``fl(y) <= t`` for a block value t). ``err_out`` bounds ``|fl(y) - exact|``,
    for the comparisons of block values with each other (the lists); equal for fp32 and float64 blocks.
    """

    dtype: torch.dtype  # bfloat16, float32 or float64 blocks
    err: torch.Tensor
    err_out: torch.Tensor
    x_norm: float  # max |x| over the items: another kernel for some of the queries needs no pass over them

    def rows(self, sel: torch.Tensor) -> _Kernel:
        """The kernel of the queries ``sel``."""
        return _Kernel(self.dtype, self.err[sel], self.err_out[sel], self.x_norm)


def _kernel(queries: torch.Tensor, items: torch.Tensor, bf16: bool, x_norm: float | None = None) -> _Kernel:
    """The fastest block GEMM with a proven error bound for these inputs.

    For any summation order ``|fl(q.x) - q.x| <= gamma_D sum|q_i x_i| <= gamma_D |q| |x|`` (Higham, Accuracy
    and Stability, Thm 3.1; fused multiply-adds only tighten it; Cauchy-Schwarz for the last step); the bf16
    GEMM adds the rounding of q and x (:func:`_bf16_input_error`) and of its result; flushed subnormals add at
    most ``4 D tiny``; :func:`exact_scores` adds ``gamma_L`` in float64. fp32 blocks need a float32 matmul at
    full precision (no TF32 / reduced-precision "fast math") and scores far from overflow; else float64 blocks.
    ``x_norm``: max |x| over the items where the caller has it already (a pass over the items).
    """
    d = queries.shape[1]
    q_norm = _norm(queries).double()  # (Q,)
    x_norm = float(_norm(items).max()) if x_norm is None else x_norm  # max |x|
    if not (math.isfinite(x_norm) and bool(torch.isfinite(q_norm).all())):
        raise ValueError("ranking: queries or items hold NaN or inf (or overflow float64): they have no rank")
    # (Q,) >= |q| |x| for every item: a float norm is within gamma_(D+1) of exact (sum of squares, sqrt)
    fudge = 1 + 2 * _gamma(d + 2, 2.0**-24) + 1e-6
    scale = q_norm * x_norm * fudge
    full_fp32 = torch.get_float32_matmul_precision() == "highest" and queries.device.type in ("cpu", "cuda")
    if queries.device.type == "cuda":
        full_fp32 = full_fp32 and not torch.backends.cuda.matmul.allow_tf32
    scale_max = float(scale.max()) if scale.numel() else 0.0
    # no block score near float32's overflow (|score| <= |q| |x| up to rounding)
    fp32_ok = queries.dtype == torch.float32 and full_fp32 and d * 2.0**-24 < 0.01 and scale_max < 1e36
    levels = max(1, (d - 1).bit_length())
    f64_err = _gamma(levels, 2.0**-53)
    if bf16 and fp32_ok and queries.device.type == "cpu":
        u = 2.0**-8
        inputs = _bf16_input_error(queries, q_norm, x_norm) * fudge  # (Q,)
        err = inputs + (_gamma(d, 2.0**-24) * (1 + u) ** 2 + f64_err) * scale + 4 * d * 2.0**-126
        # the result rounded to bf16: |fl(y) - y| <= u |y| <= u (|q| |x| + err)
        return _Kernel(torch.bfloat16, err, err + u * (scale + err) * fudge, x_norm)
    if fp32_ok:
        err = (_gamma(d, 2.0**-24) + f64_err) * scale + 4 * d * 2.0**-126
        return _Kernel(torch.float32, err, err, x_norm)
    err = (_gamma(d, 2.0**-53) + f64_err) * scale + 4 * d * 2.0**-1022
    return _Kernel(torch.float64, err, err, x_norm)


def _bf16_input_error(queries: torch.Tensor, q_norm: torch.Tensor, x_norm: float) -> torch.Tensor:
    """(Q,) float64 bound on ``|q_b.x_b - q.x|`` over every item of norm <= ``x_norm``, q_b, x_b the inputs
    rounded to bf16.

    ``q_b.x_b - q.x = q_b.(x_b - x) + (q_b - q).x``, so by Cauchy-Schwarz it is at most
    ``|q_b| |x_b - x| + |q_b - q| |x|``. The queries' residual norms ``|q_b - q|`` are measured on these very
    inputs (float32 differences are exact; the norms are within the caller's fudge factor): for random data
    about 0.4u |q| (u = 2^-8). The items' are bounded a priori, ``|x_b - x| <= u |x|`` (each component rounds
    to nearest, within u of itself; ``sqrt(D) 2^-126`` more covers subnormals, even flushed), which takes no pass over
    the items. Measuring them too (~0.4u |x|) took a pass of about 1 us per item at D = 512, growing with
    N, to narrow the band of near items re-scored exactly by about a quarter (~14 of ~55 pairs per query at
    100k and 300k x 1k, relevant items in the top 50: ~30 ms), which does not grow with N. Together about
    1.4u |q| |x|, half the data-blind ``3u |q| |x|`` of :func:`_bf16_error_factor`.
    """
    u, d = 2.0**-8, queries.shape[1]
    q_res = torch.from_numpy(_bf16_residual_norms(queries.detach().numpy())).double()  # (Q,) |q_b - q|
    x_res = u * x_norm * (1 + 2.0**-20) + math.sqrt(d) * 2.0**-126  # >= |x_b - x| for every item
    return (q_norm + q_res) * x_res + q_res * x_norm


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """The float32 bits of bf16(x), a fresh int32 array: torch's rounding (c10's round to nearest even: add
    ``0x7FFF`` plus the lowest kept bit, clear the low 16 bits), done in place on one array."""
    bits = x.view(np.int32)
    res = bits >> 16  # in place from here: no fresh (n, D) arrays (~2x faster)
    res &= 1
    res += 0x7FFF
    res += bits
    res &= np.int32(-65536)
    return res


def _bf16_residual_norms(x: np.ndarray) -> np.ndarray:
    """(N,) float32 ``|x - bf16(x)|`` of each row of a float32 (N, D) array (finite, far from overflow).

    bf16(x) is torch's conversion (:func:`_bf16_bits`), done here on the bits: ~3x faster than torch's
    convert, subtract, norm.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    res = _bf16_bits(x).view(np.float32)
    np.subtract(x, res, out=res)  # exact: x and its rounding share all but the low 16 bits
    return np.sqrt(np.einsum("ij,ij->i", res, res))  # type: ignore[no-any-return]  # numpy's float32 ops


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Row norms (N,), in the input dtype, float64 where that overflows; by item blocks, no float64 copy."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for n0 in range(0, x.shape[0], _ITEM_CHUNK):
        part = x[n0 : n0 + _ITEM_CHUNK]
        nrm = torch.linalg.vector_norm(part, dim=1)
        if not bool(torch.isfinite(nrm).all()):
            nrm = torch.linalg.vector_norm(part, dim=1, dtype=torch.float64)
        out[n0 : n0 + part.shape[0]] = nrm
    return out


def _keys(block: torch.Tensor) -> torch.Tensor:
    """Values to compare thresholds with: bf16 blocks as int16 keys (numpy compares those ~5x faster)."""
    if block.dtype == torch.bfloat16 and block.device.type == "cpu":
        return torch.from_numpy(_bf16_keys(block))
    return block


def _raw_keys_do(block: torch.Tensor, kth: torch.Tensor | None, k_lo: torch.Tensor | None) -> bool:
    """Whether a bf16 block's raw int16 bits compare with the thresholds exactly as its keys would.

    A key equals the bits for every value >= +0 (sign bit clear) and is negative for every value below,
    as the bits are (-0 included). So against thresholds every one of which is a key >= 0 (``k_lo``, for
    ``>=``) or a positive value (``kth``, the running K-th approximate scores, for ``>``; -inf on the first
    block, which takes its own top-K without keys) the bits give the same answers, and the entries they
    select are non-negative, where the key map is the identity: the keys' pass over the block is saved.
    """
    if block.dtype != torch.bfloat16 or block.device.type != "cpu" or not block.is_contiguous():
        return False
    if kth is not None and not bool(torch.isinf(kth).all()) and not bool((kth > 0).all()):
        return False
    return k_lo is None or bool((k_lo >= 0).all())


def _key_bounds(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 bounds as keys of the block dtype, rounded outwards: ``[lo, hi]`` only widens."""
    if dtype == torch.bfloat16 and lo.device.type == "cpu":
        k_lo, k_hi = _bf16_key_bounds(lo, hi)
        return torch.from_numpy(k_lo), torch.from_numpy(k_hi)
    return _round_out(lo, dtype, down=True), _round_out(hi, dtype, down=False)


def _tie_rule_ahead(f: torch.Tensor, cols: torch.Tensor, s: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Item ``cols`` with exact score f ranks ahead of item i with exact score s; an item is never ahead of itself."""
    return (cols != i) & ((f > s) | ((f == s) & (cols < i)))


class _Scan(NamedTuple):
    vals: torch.Tensor  # (Q, K) float64 the K best approximate scores (a superset of the top-k)
    idx: torch.Tensor  # (Q, K) their items
    ahead: torch.Tensor  # (Q, R) items ranked ahead of each relevant item
    overflow: torch.Tensor  # (Q,) bool: more near items than the cap; ranks not counted


def _scan(
    queries: torch.Tensor,
    items: torch.Tensor,
    kern: _Kernel,
    width: int,
    ids: torch.Tensor | None,
    s_rel: torch.Tensor | None,
    cap: int | None,
    chunk_size: int,
    query_chunk_size: int,
    bar: Progress | None,
) -> _Scan:
    """One pass of candidate GEMMs: the ``width`` best approximate scores per query and the exact counts.

    An item whose approximate score is above ``s + err`` (s the relevant item's exact score) is surely ahead
    of it, below ``s - err`` surely not; the few in between are re-scored exactly (:func:`exact_scores`) in
    the same block and compared with s by the tie rule. So the counts are exact whatever the kernel.
    """
    n_q, n_items = queries.shape[0], items.shape[0]
    dev = queries.device
    vals = torch.full((n_q, width), -float("inf"), dtype=torch.float64, device=dev)
    idx = torch.zeros((n_q, width), dtype=torch.long, device=dev)
    n_rel = 0 if ids is None else ids.shape[1]
    ahead = torch.zeros((n_q, n_rel), dtype=torch.long, device=dev)
    near_n = torch.zeros((n_q, n_rel), dtype=torch.long, device=dev)
    counting = ids is not None and s_rel is not None
    if counting:
        k_lo, k_hi = _count_bounds(kern, ids, s_rel)  # (Q, R) each
    qk = queries.to(kern.dtype)  # (Q, D)
    pending: Callable[[], None] = _done
    for n0 in range(0, n_items, chunk_size):  # items outside: each block is converted once
        xk = items[n0 : n0 + chunk_size].to(kern.dtype)  # (n, D)
        for q0 in range(0, n_q, query_chunk_size):
            sl = slice(q0, q0 + query_chunk_size)
            block = _gemm(qk[sl], xk)  # (q, n), while the previous block's numpy work runs
            pending()  # that work done: vals, ahead are current
            if _raw_keys_do(block, vals[sl, -1] if width > 0 else None, k_lo[sl] if counting else None):
                keys = torch.from_numpy(block.view(torch.int16).numpy())  # no conversion pass over the block
            else:
                keys = _keys(block)  # (q, n): int16 keys of a bf16 block on CPU, else the block
            first = width > 0 and bool(torch.isinf(vals[sl, -1]).all())
            if block.device.type == "cpu" and not first:  # numpy on row ranges, one per thread

                def rows_of(a: int, b: int, q0: int = q0, n0: int = n0, keys: torch.Tensor = keys) -> None:
                    if width > 0:
                        v, i = _keep_best_np(keys[a:b], n0, vals[q0 + a : q0 + b], idx[q0 + a : q0 + b])
                        vals[q0 + a : q0 + b], idx[q0 + a : q0 + b] = v, i
                    if ids is not None and s_rel is not None:
                        _count_block_np(
                            queries, items, keys[a:b], n0, q0 + a, ids, s_rel, k_lo, k_hi, ahead, near_n, cap
                        )

                pending = _in_row_ranges(rows_of, keys.shape[0])
            else:
                if width > 0:
                    vals[sl], idx[sl] = _keep_best(block, n0, vals[sl], idx[sl])
                if counting:
                    assert ids is not None and s_rel is not None
                    count = _count_block_np if block.device.type == "cpu" else _count_block
                    count(queries, items, keys, n0, q0, ids, s_rel, k_lo, k_hi, ahead, near_n, cap)
            if bar is not None:
                bar.advance(bar.task_ids[0])
    pending()
    overflow = (near_n > cap).any(1) if cap is not None else torch.zeros(n_q, dtype=torch.bool, device=dev)
    return _Scan(vals, idx, ahead, overflow)


def _in_row_ranges(work: Callable[[int, int], None], n_rows: int) -> Callable[[], None]:
    """Start ``work(a, b)`` over contiguous row ranges covering ``range(n_rows)``, one per thread of torch's
    budget; returns the wait for them (which re-raises a worker's error).

    A block's candidate merge and counts are numpy (one thread each) on independent rows, while the GEMM
    before them used every thread: split, and run while the next block's GEMM runs, they keep the cores
    busy (numpy's large ops and the GEMM release the GIL). Ranges of at least ``_MIN_RANGE_ROWS`` rows; one
    range (one thread, or a small block) runs on the calling thread before this returns.
    """
    threads = torch.get_num_threads()
    parts = min(threads, max(1, n_rows // _MIN_RANGE_ROWS))
    if parts == 1:
        work(0, n_rows)
        return _done
    bounds = [n_rows * p // parts for p in range(parts + 1)]
    pool = _pool(threads)
    futures = [pool.submit(work, a, b) for a, b in itertools.pairwise(bounds)]

    def wait() -> None:
        for future in futures:
            future.result()

    return wait


def _done() -> None:
    """Nothing left to wait for."""


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool for :func:`_in_row_ranges` at torch's thread count (one per count ever set)."""
    return ThreadPoolExecutor(threads, thread_name_prefix=f"cliptune-rank-{threads}")


def _count_bounds(
    kern: _Kernel, ids: torch.Tensor | None, s_rel: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, R) keys of ``s -+ err`` rounded outwards, +inf for padding: below lo surely not ahead, above hi
    surely ahead."""
    assert ids is not None and s_rel is not None
    pad, err = ids < 0, kern.err[:, None]
    lo, hi = (s_rel - err).masked_fill(pad, float("inf")), (s_rel + err).masked_fill(pad, float("inf"))
    return _key_bounds(lo, hi, kern.dtype)


def _count_block(
    queries: torch.Tensor,
    items: torch.Tensor,
    keys: torch.Tensor,
    n0: int,
    q0: int,
    ids: torch.Tensor,
    s_rel: torch.Tensor,
    k_lo: torch.Tensor,
    k_hi: torch.Tensor,
    ahead: torch.Tensor,
    near_n: torch.Tensor,
    cap: int | None,
) -> None:
    """Add the block's items ahead of each relevant item of queries ``q0...`` to ``ahead`` (in place).

    Only entries at or above ``lo`` matter (the items ahead and the near band: a few hundred of the block's
    entries), so one compare finds them all and the rest is done on those few.
    """
    q = keys.shape[0]
    found_r, found_c, found_j = [], [], []
    for r in range(ids.shape[1]):  # R is small (a few relevant items per query)
        lo_r, hi_r = k_lo[q0 : q0 + q, r, None], k_hi[q0 : q0 + q, r, None]  # (q, 1)
        rows, cols, vals = _at_least(keys, lo_r)  # (m,) each
        is_above = _compare(vals, hi_r[rows, 0], strict=True)  # (m,)
        ahead[q0 : q0 + q, r] += torch.bincount(rows[is_above], minlength=q)
        band_r, band_c = rows[~is_above], cols[~is_above]
        near = torch.bincount(band_r, minlength=q)  # (q,)
        near_n[q0 : q0 + q, r] += near
        if cap is not None:  # past the cap the query is redone with another kernel
            keep = (near_n[q0 : q0 + q, r] <= cap)[band_r]
            band_r, band_c = band_r[keep], band_c[keep]
        if band_r.numel():
            found_r.append(band_r + q0)
            found_c.append(band_c + n0)
            found_j.append(torch.full_like(band_r, r))
    if found_r:
        rows, cols, rel = torch.cat(found_r), torch.cat(found_c), torch.cat(found_j)
        f = exact_scores(queries, items, rows, cols)  # (m,)
        first = _tie_rule_ahead(f, cols, s_rel[rows, rel], ids[rows, rel])
        ahead.view(-1).index_add_(0, rows * ids.shape[1] + rel, first.long())


def _count_block_np(
    queries: torch.Tensor,
    items: torch.Tensor,
    keys: torch.Tensor,
    n0: int,
    q0: int,
    ids: torch.Tensor,
    s_rel: torch.Tensor,
    k_lo: torch.Tensor,
    k_hi: torch.Tensor,
    ahead: torch.Tensor,
    near_n: torch.Tensor,
    cap: int | None,
) -> None:
    """:func:`_count_block` in numpy, the same counts (CPU): on these few thousand entries each torch op costs
    milliseconds on a busy 2-core box (thread hand-offs), numpy's microseconds. The block is taken a few
    rows at a time (``_SCAN_ENTRIES``), each chunk read once while in cache: where few of its entries are
    at or above ``lo`` (a relevant item ranking high), ahead and band come from the list of those; where
    many are (deep), from a per-row count of the entries above ``hi`` and the band alone listed.
    ``ahead`` and ``near_n`` are updated in place through their numpy views."""
    kb = np.ascontiguousarray(keys.numpy())
    q, n, n_rel = kb.shape[0], kb.shape[1], ids.shape[1]
    lo, hi = k_lo.numpy()[q0 : q0 + q], k_hi.numpy()[q0 : q0 + q]  # (q, R)
    ahead_np, near_np = ahead.numpy()[q0 : q0 + q], near_n.numpy()[q0 : q0 + q]  # views: in place
    rows_at = _rows_at_once(n)
    found_r, found_c, found_j = [], [], []
    for r in range(n_rel):
        band = []
        for r0 in range(0, q, rows_at):
            kc = kb[r0 : r0 + rows_at]
            lo_c, hi_c = lo[r0 : r0 + rows_at, r, None], hi[r0 : r0 + rows_at, r, None]  # (c, 1)
            at_least = kc >= lo_c
            if np.count_nonzero(at_least) <= _DENSE_AHEAD * at_least.size:  # ahead and band: a few
                flat = np.flatnonzero(at_least)
                is_above = kc.reshape(-1)[flat] > hi_c[flat // n, 0]
                ahead_np[r0 : r0 + rows_at, r] += np.bincount(flat[is_above] // n, minlength=kc.shape[0])
                flat = flat[~is_above]
            else:  # most of the row is ahead: count it per row, list the band alone
                above = kc > hi_c
                ahead_np[r0 : r0 + rows_at, r] += _row_counts(above)
                at_least ^= above  # the band: at least lo, not above hi
                flat = np.flatnonzero(at_least)
            band.append(flat + r0 * n)
        flat = np.concatenate(band)
        band_r, band_c = flat // n, flat % n
        near_np[:, r] += np.bincount(band_r, minlength=q)
        if cap is not None:  # past the cap the query is redone with another kernel
            keep = near_np[band_r, r] <= cap
            band_r, band_c = band_r[keep], band_c[keep]
        found_r.append(band_r)
        found_c.append(band_c + n0)
        found_j.append(np.full(band_r.shape, r))
    rows, cols, rel = np.concatenate(found_r), np.concatenate(found_c), np.concatenate(found_j)
    if rows.size:
        f = exact_scores(queries, items, torch.from_numpy(rows + q0), torch.from_numpy(cols)).numpy()
        s, i = s_rel.numpy()[q0 + rows, rel], ids.numpy()[q0 + rows, rel]
        first = (cols != i) & ((f > s) | ((f == s) & (cols < i)))  # the rule of _tie_rule_ahead
        ahead_np += np.bincount(rows[first] * n_rel + rel[first], minlength=q * n_rel).reshape(q, n_rel)


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """(c,) the True entries of each row of a (c, n) mask: one ``count_nonzero`` per long row (~4x
    ``count_nonzero(axis=1)``, which sums the bools as integers), the axis form for short rows."""
    if mask.shape[1] < 1024:
        return np.count_nonzero(mask, axis=1)  # type: ignore[no-any-return]  # numpy's int array
    return np.fromiter((np.count_nonzero(row) for row in mask), np.int64, mask.shape[0])


def _rows_at_once(n: int) -> int:
    """Rows of an n-column block the numpy scans take at a time: ~``_SCAN_ENTRIES`` entries, at least one."""
    return max(1, _SCAN_ENTRIES // max(1, n))


def _flat_compare(kb: np.ndarray, thr: np.ndarray, *, strict: bool) -> np.ndarray:
    """Flat (row-major) indices of the entries of a (q, n) block ``> thr`` (strict) or ``>= thr``, thr (q, 1):
    a few rows at a time (``_SCAN_ENTRIES``), so each chunk's mask stays in cache."""
    rows_at = _rows_at_once(kb.shape[1])
    cmp = np.greater if strict else np.greater_equal
    parts = [
        np.flatnonzero(cmp(kb[r0 : r0 + rows_at], thr[r0 : r0 + rows_at])) + r0 * kb.shape[1]
        for r0 in range(0, kb.shape[0], rows_at)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _at_least(keys: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column and value of every entry of a (q, n) block at or above its row's ``lo`` (q, 1), row-major.

    numpy on CPU: one compare and a sparse nonzero, ~5x torch's.
    """
    if keys.device.type == "cpu":
        kb = np.ascontiguousarray(keys.numpy())
        flat = _flat_compare(kb, lo.numpy(), strict=False)
        vals = torch.from_numpy(kb.reshape(-1)[flat])
        flat_t = torch.from_numpy(flat)
        return flat_t // kb.shape[1], flat_t % kb.shape[1], vals
    rows, cols = (keys >= lo).nonzero(as_tuple=True)
    return rows, cols, keys[rows, cols]


def _collect_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    kern: _Kernel,
    floor: torch.Tensor,
    k: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of these queries from every item whose approximate score reaches ``floor - err``.

    ``floor`` (Q,) float64 must be at most each query's true k-th exact score; an item of the true top-k
    has exact score >= floor, so approximate score >= floor - err: none is missed. Used for the rare
    queries whose candidates could not prove their lists (near-ties across the margin, mass duplicates).
    """
    thr = _key_bounds(floor - kern.err, floor - kern.err, kern.dtype)[0][:, None]  # (q, 1)
    qk = queries.to(kern.dtype)
    run: tuple[torch.Tensor, torch.Tensor] | None = None
    for n0 in range(0, items.shape[0], chunk_size):
        keys = _keys(_gemm(qk, items[n0 : n0 + chunk_size].to(kern.dtype)))  # (q, n)
        rows, cols = _compare(keys, thr, strict=False).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        f = exact_scores(queries, items, rows, cols + n0)
        new = _padded(rows, cols + n0, f, queries.shape[0])
        run = _merge(run, new, k)
    assert run is not None  # every query's own k-th item passes its floor
    return run


def _run(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    ids: torch.Tensor | None,
    bf16: bool,
    chunk_size: int,
    query_chunk_size: int,
    progress: bool,
    *,
    route: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lists (exact scores float64, items) and ranks by :func:`exact_scores`; any kernel, one answer.

    ``route`` (bf16 with ranks): a pilot (:func:`_deep_queries`) sends the queries whose near band would
    cost more to re-score than the fp32 pass to the fp32 kernel, lists and ranks; the rest stay bf16.
    """
    kern = _kernel(queries, items, bf16)  # its x_norm serves the fp32 kernel of routed queries too
    s_rel = None
    if ids is not None:
        s_rel = exact_scores(queries, items, _row_ids(ids), ids.clamp(min=0).reshape(-1)).view(ids.shape)
    if route and ids is not None and s_rel is not None and kern.dtype == torch.bfloat16:
        deep = _route(queries, items, ids, s_rel, kern)  # (Q,) bool
        if bool(deep.any()):
            n_q, dev = queries.shape[0], queries.device
            out_v = torch.zeros((n_q, k), dtype=torch.float64, device=dev)
            out_i = torch.zeros((n_q, k), dtype=torch.long, device=dev)
            ranks = torch.zeros(ids.shape, dtype=torch.long, device=dev)
            fp = deep.nonzero().squeeze(1)
            fp_kern = _kernel(queries[fp], items, False, kern.x_norm)
            out_v[fp], out_i[fp], ranks[fp] = _pass(
                queries[fp], items, k, ids[fp], fp_kern, s_rel[fp], chunk_size, query_chunk_size, progress
            )
            bf = (~deep).nonzero().squeeze(1)
            if bf.numel():
                sub = kern.rows(bf)
                out_v[bf], out_i[bf], ranks[bf] = _pass(
                    queries[bf], items, k, ids[bf], sub, s_rel[bf], chunk_size, query_chunk_size, progress
                )
            return out_v, out_i, ranks
    return _pass(queries, items, k, ids, kern, s_rel, chunk_size, query_chunk_size, progress)


def _route(
    queries: torch.Tensor, items: torch.Tensor, ids: torch.Tensor, s_rel: torch.Tensor, kern: _Kernel
) -> torch.Tensor:
    """(Q,) bool: the queries that take the fp32 kernel: those :func:`_deep_queries` predicts, or every one
    where too few would stay on bf16 to pay for its pass over the items (``_BF16_MIN_QUERIES``)."""
    deep = _deep_queries(queries, items, ids, s_rel, kern)
    if int((~deep).sum()) < _BF16_MIN_QUERIES * _gemm_gain() * torch.get_num_threads():
        return torch.ones_like(deep)
    return deep


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``, (q, D) x (n, D) -> (q, n): a candidate block, on the faster BLAS for large fp32 blocks."""
    flop = 2 * a.shape[0] * b.shape[0] * a.shape[1]
    if (
        a.device.type == "cpu"
        and a.dtype == torch.float32
        and flop >= _SGEMM_MIN_FLOP
        and _numpy_sgemm_faster()
    ):
        return torch.from_numpy(_numpy_gemm(a.detach().numpy(), b.detach().numpy()))
    return a.detach() @ b.detach().T


def _numpy_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` on NumPy's BLAS, its threads capped at torch's count for the call (torch's thread budget
    stays the one knob): what :func:`_gemm` runs and :func:`_numpy_sgemm_faster` times."""
    with _blas().limit(limits=torch.get_num_threads(), user_api="blas"):
        out: np.ndarray = np.matmul(a, b.T)  # (q, n)
    return out


@functools.cache
def _blas() -> ThreadpoolController:
    """The process's BLAS thread pools (NumPy's among them: imported with this module), looked up once: a
    fresh look-up per block (``threadpool_limits``) cost 0.7 ms, the cached one's ``limit`` 0.02 ms."""
    return ThreadpoolController()


def _gemm_gain() -> int:
    """How much cheaper the fp32 kernel's pairs are, relative to bf16's, than the route's cost model assumes
    (torch's GEMM): 2 where NumPy's GEMM computes the fp32 blocks (c32 - c16 = 5.7 against 12.0 ns)."""
    return 2 if _numpy_sgemm_faster() else 1


@functools.cache
def _numpy_sgemm_faster() -> bool:
    """Whether NumPy's float32 GEMM beats torch's on this machine: each timed 3 times (the best counts) on
    one fixed (512 x 512) x (512 x 4096) block (2 GFLOP: ~15 ms at 2 cores), on torch's thread count."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen), torch.randn(4096, 512, generator=gen)
    an, bn = a.numpy(), b.numpy()

    def best(run: Callable[[], object]) -> float:
        run()  # warm-up: first-call allocations and thread start-up
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            run()
            times.append(time.perf_counter() - tic)
        return min(times)

    numpy_time = best(lambda: _numpy_gemm(an, bn))
    return numpy_time < 0.9 * best(lambda: a @ b.T)  # a clear win only: timings on a busy machine wobble


def _deep_queries(
    queries: torch.Tensor, items: torch.Tensor, ids: torch.Tensor, s_rel: torch.Tensor, kern: _Kernel
) -> torch.Tensor:
    """(Q,) bool: queries whose bf16 near band is predicted to cost more to re-score than the fp32 pass.

    A pilot: the fp32 scores of every query against a fixed stride of ``_PILOT_ITEMS`` items count, per
    query, the sampled items within ``err`` (the bf16 bound) of each relevant item's exact score; scaled to
    N that predicts the band B the bf16 pass would re-score exactly. A query goes to fp32 where
    ``B > N / (_ROUTE_RESCORE_PER_GEMM * threads)`` (the cost model at the constant). Only the speed
    depends on it: both kernels give the same answer.
    """
    n_items = items.shape[0]
    stride = max(1, n_items // _PILOT_ITEMS)
    sample = items[::stride]  # (M, D) a fixed sample, whatever the queries
    lo, hi = (s_rel - kern.err[:, None]).numpy(), (s_rel + kern.err[:, None]).numpy()  # (Q, R) the bands
    pad = ids.numpy() < 0
    band = np.zeros(queries.shape[0])
    for q0 in range(0, queries.shape[0], _QUERY_CHUNK):  # (q, M) scores at a time: bounded memory
        sl = slice(q0, q0 + _QUERY_CHUNK)
        scores = _gemm(queries[sl], sample).numpy()  # float32: a prediction needs no bound
        for r in range(ids.shape[1]):
            near = (scores >= lo[sl, r, None]) & (scores <= hi[sl, r, None])
            band[sl] += np.where(pad[sl, r], 0, near.sum(1))
    predicted = band * n_items / sample.shape[0]
    budget = n_items / (_ROUTE_RESCORE_PER_GEMM * _gemm_gain() * torch.get_num_threads())
    return torch.from_numpy(predicted > budget)


def _pass(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    ids: torch.Tensor | None,
    kern: _Kernel,
    s_rel: torch.Tensor | None,
    chunk_size: int,
    query_chunk_size: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_run` with its kernel chosen and the relevant items' exact scores ``s_rel`` computed."""
    n_q, n_items = queries.shape[0], items.shape[0]
    extra = _BF16_EXTRA if kern.dtype == torch.bfloat16 else _FP_EXTRA
    width = 0 if k == 0 else min(n_items, k + extra)
    cap = _BF16_NEAR_CAP if kern.dtype == torch.bfloat16 else None
    n_blocks = -(-n_q // query_chunk_size) * -(-n_items // chunk_size)
    with _progress(progress, n_blocks, "ranking") as bar:
        scan = _scan(queries, items, kern, width, ids, s_rel, cap, chunk_size, query_chunk_size, bar)
    out_v = torch.zeros((n_q, k), dtype=torch.float64, device=queries.device)
    out_i = torch.zeros((n_q, k), dtype=torch.long, device=queries.device)
    if k > 0:
        # the k best approximate candidates (scan.vals is sorted) are re-scored first: their lowest exact
        # score t is at most the true k-th one, so a candidate can be in the top k only if its exact score
        # reaches t, i.e. its approximate one t - err; only those are re-scored next. (t >= the k-th
        # approximate score - err, so this band is at most the 2 err below it, usually about half of it)
        f = torch.full(scan.idx.shape, -float("inf"), dtype=torch.float64, device=queries.device)
        rows = torch.arange(n_q, device=queries.device).repeat_interleave(k)
        f[:, :k] = exact_scores(queries, items, rows, scan.idx[:, :k].reshape(-1)).view(n_q, k)
        t = f[:, :k].min(1).values  # (Q,)
        need = scan.vals[:, k:] >= (t - kern.err_out)[:, None]  # (Q, K - k)
        rows, cols = need.nonzero(as_tuple=True)
        f[rows, cols + k] = exact_scores(queries, items, rows, scan.idx[rows, cols + k])
        ev, ei = _sort_pairs(f, scan.idx)
        out_v, out_i = ev[:, :k].contiguous(), ei[:, :k].contiguous()
        if width < n_items:  # an item left out has approximate score <= the width-th kept one
            unproven = ~(scan.vals[:, -1] + kern.err_out < out_v[:, k - 1])
            rows = unproven.nonzero().squeeze(1)
            for r0 in range(0, rows.numel(), query_chunk_size):
                rr = rows[r0 : r0 + query_chunk_size]
                sub = kern.rows(rr)
                out_v[rr], out_i[rr] = _collect_topk(queries[rr], items, sub, out_v[rr, k - 1], k, chunk_size)
    ranks = torch.zeros((n_q, 0), dtype=torch.long, device=queries.device)
    if ids is not None:
        ranks = torch.where(ids >= 0, scan.ahead + 1, torch.zeros_like(scan.ahead))
        redo = scan.overflow.nonzero().squeeze(1)
        if redo.numel():  # too many items near a relevant one for bf16's bound: the tighter fp32 bound
            assert s_rel is not None  # computed with the ids
            redo_kern = _kernel(queries[redo], items, False, kern.x_norm)
            ranks[redo] = _pass(
                queries[redo],
                items,
                0,
                ids[redo],
                redo_kern,
                s_rel[redo],
                chunk_size,
                query_chunk_size,
                False,
            )[2]
    return out_v, out_i, ranks


def _row_ids(cols: torch.Tensor) -> torch.Tensor:
    """The row of each entry of a (Q, m) matrix, flattened row-major."""
    return torch.arange(cols.shape[0], device=cols.device).repeat_interleave(cols.shape[1])


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
    bf16_pass: bool | Literal["auto"] = "auto",
) -> Ranked:
    """One pass over the items giving both the top-k lists and the exact ranks of relevant items.

    The ranking follows :func:`exact_scores` (float64 products summed in a fixed order), ties by lower
    item index. Block GEMMs (bf16 where the CPU has native bf16, else fp32, else float64) only find
    candidates: each has a proven error bound, and every item whose place the bound leaves undecided is
    re-scored exactly. So the lists and ranks are the same on every machine, whichever kernel ran, in
    O(block) memory and one pass over the items (the rare queries the candidates cannot prove get a
    second, targeted pass). The rank is ``1 + the items ahead``, exact over the FULL ranking (MRR, MAP).

    Args:
        queries: query embeddings; score = inner product.
        items: item embeddings, same dtype and D. NaN / inf anywhere is refused (no rank).
        k: list length (clamped to N); 0 skips the lists.
        relevant_ids: per query, the indices of its relevant items, -1 for padding; None skips ranks.
        chunk_size: items per block.
        query_chunk_size: queries per block.
        progress: show a rich progress bar over blocks.
        bf16_pass: find candidates with bf16 GEMMs (float32 on CPU only); ``"auto"``: where
            :func:`bf16_pays`, with ranks only for the queries a pilot predicts a narrow band of near items
            (relevant items that rank high; the others take the fp32 kernel, docs/metrics.md); True: bf16
            for every query. It changes the speed, never the answer.

    Returns:
        :class:`Ranked` ``(scores, indices, ranks)``; lists sorted by (score desc, index asc), scores the exact
        scores rounded to the input dtype; ranks 1-based, 0 where ``relevant_ids`` is -1. Skipped parts are
        empty tensors.

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
    n_rel = 0 if relevant_ids is None else relevant_ids.shape[1]
    dev = queries.device
    if n_q == 0 or (k == 0 and relevant_ids is None):
        return Ranked(
            torch.zeros(n_q, k, dtype=queries.dtype, device=dev),
            torch.zeros(n_q, k, dtype=torch.long, device=dev),
            torch.zeros(n_q, n_rel, dtype=torch.long, device=dev),
        )
    # "auto": bf16 where it pays (bf16_pays), for lists and ranks. For ranks its bound (about 5.5e-3 for random
    # unit vectors at D = 512: the queries' rounding measured, the items' a priori) leaves a band of near
    # items to re-score exactly of a few dozen per query for relevant items in the top few dozen, but of
    # thousands for relevant items deep in the ranking (a weak model): with relevant items drawn uniformly,
    # bf16 for every query took 1.3-1.9x the fp32 kernel's time (100k-300k x 1k). So a pilot on a fixed
    # sample of items predicts each query's band and routes the queries whose band would cost more than the
    # fp32 pass to the fp32 kernel (_route, _deep_queries; cost model at _ROUTE_RESCORE_PER_GEMM): with the
    # relevant items drawn uniformly "auto" then takes about the fp32 kernel's time, with them in the top 50
    # about bf16's (docs/benchmarks.md). True forces bf16 for every query, False fp32
    bf16 = bf16_pays(items, n_items, k) if bf16_pass == "auto" else bool(bf16_pass)
    ids = None if relevant_ids is None else relevant_ids.long()
    route = bf16_pass == "auto" and ids is not None
    vals, idx, ranks = _run(queries, items, k, ids, bf16, chunk_size, query_chunk_size, progress, route=route)
    return Ranked(vals.to(queries.dtype), idx, ranks)


def bf16_pays(items: torch.Tensor, n_items: int, k: int) -> bool:
    """Where the bf16 candidate pass is faster: a CPU with native bf16 (AVX-512 bf16, AMX), fp32 items,
    at least ``_BF16_MIN_ITEMS`` of them. What ``bf16_pass="auto"`` uses."""
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
        new_v, new_i = bv.double(), bi + n0
    else:  # later blocks: few entries beat the K-th so far; gather them into a (q, m) padded matrix
        rows, cols = _above(block, vals[:, -1:].to(block.dtype))  # the K-th values are bf16 values: exact
        if rows.numel() == 0:
            return vals, idx
        new_v, new_i = _padded(rows, cols + n0, block[rows, cols].double(), block.shape[0])
    all_v, all_i = torch.cat([vals, new_v], 1), torch.cat([idx, new_i], 1)
    top_v, top = torch.topk(all_v, width, dim=1)
    return top_v, all_i.gather(1, top)


def _keep_best_np(
    keys: torch.Tensor, n0: int, vals: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_keep_best` after the first block, in numpy (CPU): the block's entries above the running K-th
    merged into the (q, K) best by one stable sort on (row, value desc); numpy's ops on these few entries
    cost microseconds where torch's small ops cost milliseconds on a busy box. ``keys`` as :func:`_keys`
    gives them: int16 keys of a bf16 block (an entry equal to the K-th may come in: harmless, any K best
    approximate scores will do), else the float block.
    """
    q, width = vals.shape
    kb = np.ascontiguousarray(keys.numpy())
    if kb.dtype == np.int16:  # keys of bf16 values; the K-th values are bf16 values (exact)
        flat = _flat_compare(kb, _bf16_keys(vals[:, -1:].to(torch.bfloat16)), strict=True)
        bits = kb.reshape(-1)[flat]
        bits = bits ^ ((bits >> 15) & np.int16(0x7FFF))  # the key map is its own inverse
        new_v = (bits.astype(np.int32) << 16).view(np.float32).astype(np.float64)
    else:
        flat = _flat_compare(kb, vals[:, -1:].to(keys.dtype).numpy(), strict=True)
        new_v = kb.reshape(-1)[flat].astype(np.float64)
    if flat.size == 0:
        return vals, idx
    rows = np.concatenate([np.repeat(np.arange(q), width), flat // kb.shape[1]])
    all_v = np.concatenate([vals.numpy().reshape(-1), new_v])
    all_i = np.concatenate([idx.numpy().reshape(-1), flat % kb.shape[1] + n0])
    order = np.lexsort((-all_v, rows))  # by row, then value descending; every row has >= K entries
    counts = np.bincount(rows, minlength=q)
    take = order[((np.cumsum(counts) - counts)[:, None] + np.arange(width)).reshape(-1)]
    return torch.from_numpy(all_v[take].reshape(q, width)), torch.from_numpy(all_i[take].reshape(q, width))


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


def topk_chunked(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    chunk_size: int = _ITEM_CHUNK,
    query_chunk_size: int = _QUERY_CHUNK,
    progress: bool = False,
    bf16_pass: bool | Literal["auto"] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product in bounded memory, ties broken by lower item index.

    :func:`rank_chunked` without ranks: candidates from block GEMMs (bf16 on a CPU with native bf16),
    ordered by :func:`exact_scores`; one answer on every machine.

    Args:
        queries: query embeddings.
        items: item embeddings (same dtype and D).
        k: list length, >= 1 (clamped to N).
        chunk_size: items per block; memory is about ``query_chunk_size * chunk_size`` scores.
        query_chunk_size: queries per block.
        progress: show a rich progress bar.
        bf16_pass: bf16 candidate GEMMs: True, False or ``"auto"`` (:func:`bf16_pays`); same answer.

    Returns:
        ``(scores, indices)``, each row sorted by (score desc, index asc); scores are the exact scores
        (:func:`exact_scores`) rounded to the input dtype.

    Shapes:
        queries (Q, D), items (N, D) -> scores (Q, K) float, indices (Q, K) int64, K = min(k, N)

    Example:
        >>> topk_chunked(torch.tensor([[1.0]]), torch.tensor([[0.5], [2.0], [0.5]]), k=2)[1].tolist()
        [[1, 0]]
    """
    if k < 1:
        raise ValueError(f"topk_chunked: k must be >= 1, got {k}")
    r = rank_chunked(
        queries,
        items,
        k,
        None,
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        progress=progress,
        bf16_pass=bf16_pass,
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
