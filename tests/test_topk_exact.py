"""The exact score (float64 products, fixed summation order) decides every list and rank, whatever kernel.

The reference here is independent of the library: numpy float64 products summed by the same documented
pairwise order (checked against ``math.fsum`` of the exact products), ranked by a Python sort.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import threadpoolctl
import torch

import cliptune.ranking.topk as topk_module
from cliptune.ranking.topk import exact_scores, rank_chunked, topk_chunked


def _ref_scores(queries: torch.Tensor, items: torch.Tensor) -> np.ndarray:
    """(Q, N) float64: products exact in float64, summed pairwise (j + j + w/2, halving) over D padded to 2^L."""
    d = queries.shape[1]
    width = 1 << max(0, (d - 1).bit_length())
    p = np.zeros((queries.shape[0], items.shape[0], width))
    p[:, :, :d] = queries.double().numpy()[:, None, :] * items.double().numpy()[None, :, :]
    while width > 1:
        width //= 2
        p = p[:, :, :width] + p[:, :, width : 2 * width]
    return p[:, :, 0]


def _ref_lists_and_ranks(
    queries: torch.Tensor, items: torch.Tensor, k: int, ids: torch.Tensor
) -> tuple[list[list[int]], list[list[int]]]:
    s = _ref_scores(queries, items).tolist()
    order = [sorted(range(len(row)), key=lambda j: (-row[j], j)) for row in s]
    ranks = [
        [0 if i < 0 else o.index(i) + 1 for i in rel] for o, rel in zip(order, ids.tolist(), strict=True)
    ]
    return [o[:k] for o in order], ranks


def _adversarial(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Near-ties one float32 ulp apart, exact duplicates across block boundaries, a cluster below bf16's
    resolution and a relevant item deep in the ranking."""
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    queries = norm(torch.randn(6, 32, generator=gen), dim=1)
    items = norm(torch.randn(700, 32, generator=gen), dim=1)
    for j, step in ((21, 1), (22, -1), (23, 2)):  # items 20..23 differ from item 20 in the last bit
        items[j] = items[20]
        items[j, 0] = torch.nextafter(items[20, 0], torch.tensor(step * float("inf")))
    for dup in (3, 127, 128, 650):  # duplicates of item 7, on both sides of the 128-item block boundary
        items[dup] = items[7]
    close = torch.randperm(400, generator=gen)[:60] + 200  # 60 items within bf16's resolution of query 1's
    items[close] = queries[1] + 3e-3 * torch.randn(60, 32, generator=gen) / 32**0.5
    queries[0] = items[20]  # a self-match whose score ties the last-bit neighbours'
    queries[2] = items[7]
    ids = torch.tensor(
        [
            [20, 21, 22, 23],
            [int(close[3]), int(close[40]), 7, -1],
            [7, 3, 650, 128],
            [0, 1, 699, -1],  # arbitrary depth
            [-1, -1, -1, -1],
            [127, 128, 5, 6],
        ]
    )
    return queries, items, ids


def test_exact_scores_are_the_documented_sum_and_within_float64_of_exact() -> None:
    queries, items, _ = _adversarial(0)
    rows, cols = torch.arange(6).repeat_interleave(700), torch.arange(700).repeat(6)
    got = exact_scores(queries, items, rows, cols).view(6, 700).numpy()
    assert np.array_equal(got, _ref_scores(queries, items))  # bit for bit
    # the torch code (what GPUs run) gives the same bits as the numpy one CPUs run
    torch_path = topk_module._exact_scores_torch(queries, items, rows, cols, 32).view(6, 700).numpy()
    assert np.array_equal(torch_path, got)
    q64, x64 = queries.double().tolist(), items.double().tolist()
    for i, j in ((0, 20), (0, 21), (2, 650), (1, 5)):
        fsum = math.fsum(a * b for a, b in zip(q64[i], x64[j], strict=True))  # correctly rounded
        assert abs(got[i, j] - fsum) <= 5 * 2.0**-53 * sum(
            abs(a * b) for a, b in zip(q64[i], x64[j], strict=True)
        )
    # golden: 0.1f * 3 in float64 products, then (p0 + p2) + (p1 + 0): not float32's left-to-right sum
    q, x = torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[3.0, 3.0, 3.0]])
    want = (np.float64(np.float32(0.1)) * 3 + np.float64(np.float32(0.3)) * 3) + np.float64(
        np.float32(0.2)
    ) * 3
    assert exact_scores(q, x, torch.tensor([0]), torch.tensor([0])).tolist() == [want]


@pytest.mark.parametrize("kernel", ["bf16", "fp32", "fp64"])
def test_every_kernel_gives_the_reference_lists_and_ranks(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries, items, ids = _adversarial(1)
    if kernel == "fp64":  # a reduced-precision float32 matmul has no fp32 bound: float64 blocks then
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    got = rank_chunked(
        queries, items, k=12, relevant_ids=ids, chunk_size=128, query_chunk_size=4, bf16_pass=kernel == "bf16"
    )
    lists, ranks = _ref_lists_and_ranks(queries, items, 12, ids)
    assert got.indices.tolist() == lists
    assert got.ranks.tolist() == ranks
    ref = _ref_scores(queries, items)
    assert got.scores.tolist() == [[float(np.float32(ref[i, j])) for j in row] for i, row in enumerate(lists)]
    # query 2 is item 7, duplicated at 3, 127, 128 and 650: the five tie at the top, in index order
    r = dict(zip([7, 3, 650, 128], got.ranks[2].tolist(), strict=True))
    assert [r[3], r[7], r[128], r[650]] == [1, 2, 4, 5]


@pytest.mark.parametrize("numpy_faster", [True, False])
def test_fp32_blocks_on_either_blas_give_the_reference_lists_and_ranks(
    numpy_faster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # which BLAS computes the fp32 candidate blocks is a speed choice (_numpy_sgemm_faster): the bound
    # holds for any summation order, so the answers are the reference's either way
    calls: list[tuple[int, ...]] = []
    matmul = np.matmul
    monkeypatch.setattr(topk_module, "_SGEMM_MIN_FLOP", 0)  # every block, however small
    monkeypatch.setattr(topk_module, "_numpy_sgemm_faster", lambda: numpy_faster)
    monkeypatch.setattr(topk_module.np, "matmul", lambda a, b: calls.append(a.shape) or matmul(a, b))
    queries, items, ids = _adversarial(3)
    got = rank_chunked(
        queries, items, k=12, relevant_ids=ids, chunk_size=128, query_chunk_size=4, bf16_pass=False
    )
    lists, ranks = _ref_lists_and_ranks(queries, items, 12, ids)
    assert got.indices.tolist() == lists and got.ranks.tolist() == ranks
    assert bool(calls) is numpy_faster  # the blocks went where the choice said


def test_numpys_blas_runs_on_torchs_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.set_num_threads stays the one knob: NumPy's BLAS pools are capped at it during the block
    seen: list[int] = []
    matmul = np.matmul

    def spy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        seen.extend(
            pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"
        )
        return matmul(a, b)

    monkeypatch.setattr(topk_module, "_SGEMM_MIN_FLOP", 0)
    monkeypatch.setattr(topk_module, "_numpy_sgemm_faster", lambda: True)
    monkeypatch.setattr(topk_module.np, "matmul", spy)
    monkeypatch.setattr(topk_module.torch, "get_num_threads", lambda: 1)
    queries, items, _ = _adversarial(4)
    topk_chunked(queries, items, k=5, chunk_size=128, bf16_pass=False)
    assert seen and set(seen) == {1}


def test_the_blas_choice_is_timed_once_per_process() -> None:
    topk_module._numpy_sgemm_faster.cache_clear()
    first = topk_module._numpy_sgemm_faster()
    assert isinstance(first, bool) and topk_module._numpy_sgemm_faster() is first
    assert topk_module._numpy_sgemm_faster.cache_info().misses == 1


def test_bf16_and_fp32_answers_are_identical_through_every_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    queries, items, ids = _adversarial(2)
    fp32 = rank_chunked(queries, items, k=10, relevant_ids=ids, chunk_size=100, bf16_pass=False)
    # a cap of 3 near items sends queries 1-3 and 5 back to the fp32 kernel for their ranks; query 1's 60
    # near-ties overflow the bf16 margin of 64 - 10 extra candidates only partly: its list takes the
    # targeted second pass when unproven. The answers cannot change
    monkeypatch.setattr(topk_module, "_BF16_NEAR_CAP", 3)
    monkeypatch.setattr(topk_module, "_BF16_EXTRA", 2)
    bf16 = rank_chunked(queries, items, k=10, relevant_ids=ids, chunk_size=100, bf16_pass=True)
    assert torch.equal(bf16.indices, fp32.indices)
    assert torch.equal(bf16.scores, fp32.scores)
    assert torch.equal(bf16.ranks, fp32.ranks)
    assert fp32.indices.tolist() == _ref_lists_and_ranks(queries, items, 10, ids)[0]


def test_unproven_lists_take_the_second_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    second = topk_module._collect_topk
    monkeypatch.setattr(topk_module, "_collect_topk", lambda q, *a: calls.append(q.shape[0]) or second(q, *a))
    gen = torch.Generator().manual_seed(4)
    queries, items = torch.randn(3, 32, generator=gen), torch.randn(900, 32, generator=gen)
    close = torch.randperm(900, generator=gen)[:200]  # 200 near-ties of query 1: more than 10 + 64 candidates
    items[close] = queries[1] + 3e-3 * torch.randn(200, 32, generator=gen)
    _, idx = topk_chunked(queries, items, k=10, chunk_size=128, bf16_pass=True)
    assert idx.tolist() == _ref_lists_and_ranks(queries, items, 10, torch.zeros(3, 0, dtype=torch.long))[0]
    assert calls == [1]  # query 1 alone could not be proven from its bf16 candidates


def test_bf16_and_fp16_inputs_rank_by_the_same_exact_scores() -> None:
    queries, items, ids = _adversarial(5)
    for dtype in (torch.bfloat16, torch.float16):  # exact in float32: the same definition, float64 blocks
        q, x = queries.to(dtype), items.to(dtype)
        got = rank_chunked(q, x, k=8, relevant_ids=ids, chunk_size=100)
        lists, ranks = _ref_lists_and_ranks(q.float(), x.float(), 8, ids)
        assert got.indices.tolist() == lists
        assert got.ranks.tolist() == ranks


def test_non_finite_embeddings_are_refused() -> None:
    items = torch.ones(4, 3)
    items[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        topk_chunked(torch.ones(1, 3), items, k=2)


def test_bf16_residual_norms_follow_torchs_rounding_on_halfway_and_tiny_values() -> None:
    # halfway cases (both parities of the kept bit), just off halfway, negatives, subnormals, zero
    base = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.0, 1e-40, 0.0], dtype=np.float32)
    bits = base.view(np.int32)
    vals = np.concatenate([(bits + off).view(np.float32) for off in (0, 0x7FFF, 0x8000, 0x8001, 0xFFFF)])
    x = np.stack([vals, -vals[::-1], vals * 7.5])  # (3, 30)
    xt = torch.from_numpy(x)
    want = torch.linalg.vector_norm(xt.double() - xt.bfloat16().double(), dim=1)  # torch's own rounding
    assert np.allclose(topk_module._bf16_residual_norms(x), want.numpy(), rtol=1e-6, atol=0)


def test_bf16_input_bound_is_attained_and_never_beaten() -> None:
    """The Cauchy-Schwarz bound is nearly an equality for parallel worst-rounded vectors (the items' rounding
    is bounded a priori by u |x|, attained as delta -> u), and holds on random ones."""
    d, delta = 64, 0.99 * 2.0**-8  # every component 1 + delta rounds down to 1 in bf16: the worst case
    q = torch.full((1, d), 1 + delta)
    err = q.double() @ q.double().T - 1.0 * d  # q.x - q_b.x_b, exact in float64 (tiny integers, 1 + delta)
    bound = topk_module._bf16_input_error(q, q.norm(dim=1).double(), float(q.norm()))
    # by hand: err = d (2 delta + delta^2); bound = d (1 + delta) (u (1 + 2 delta) + delta): 1.01x err
    assert float(err) <= float(bound) <= float(err) * 1.02
    gen = torch.Generator().manual_seed(7)
    queries, items = torch.randn(20, 96, generator=gen), torch.randn(300, 96, generator=gen) * 3
    kern = topk_module._kernel(queries, items, bf16=True)
    exact = _ref_scores(queries, items)  # (20, 300)
    rounded = queries.bfloat16().double() @ items.bfloat16().double().T  # q_b.x_b in float64 (exact here)
    gemm = (queries.bfloat16() @ items.bfloat16().T).double()  # what the kernel returns: rounded to bf16
    assert bool(((rounded - torch.from_numpy(exact)).abs() <= kern.err[:, None]).all())
    assert bool(((gemm - torch.from_numpy(exact)).abs() <= kern.err_out[:, None]).all())
    # the data-driven bound is well inside the data-blind 3u |q| |x|
    blind = topk_module._bf16_error_factor(96) * queries.norm(dim=1).double() * float(items.norm(dim=1).max())
    assert bool((kern.err < 0.5 * blind).all())


def test_bf16_ranks_are_exact_where_bf16_rounding_collapses_a_crowd() -> None:
    """Items whose inputs round to the same bf16 vector (so the bf16 GEMM ties them) but whose exact scores
    differ in the last float32 bits, around worst-case rounding: the band must catch every one."""
    d = 32
    gen = torch.Generator().manual_seed(8)
    q = torch.full((2, d), 1 + 0.99 * 2.0**-8)
    q[0, d // 2 :] = -1.0  # scores near 0 (tiny threshold rounding) with half the worst rounding error
    q[1] = torch.randn(d, generator=gen)
    steps = torch.randint(-300, 300, (400, 1), generator=gen).float()  # offsets near the halfway point
    items = torch.ones(400, d) + (2.0**-9 + steps * 2.0**-23) * torch.rand(400, d, generator=gen).round()
    items[::7] = items[3]  # exact duplicates: ties by index
    order = np.argsort(-_ref_scores(q, items)[0], kind="stable")  # relevant items 10th and 30th: the
    ids = torch.tensor([[int(order[9]), int(order[29]), 399], [0, 200, -1]])  # band decides their ranks
    got = rank_chunked(q, items, k=15, relevant_ids=ids, chunk_size=64, bf16_pass=True)
    lists, ranks = _ref_lists_and_ranks(q, items, 15, ids)
    assert got.indices.tolist() == lists
    assert got.ranks.tolist() == ranks


def test_the_torch_count_gives_the_numpy_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUs count with torch ops, CPUs with numpy's: both are run here (on CPU) and must equal the reference."""
    queries, items, ids = _adversarial(3)
    ranks = _ref_lists_and_ranks(queries, items, 1, ids)[1]
    for bf16 in (False, True):
        assert rank_chunked(queries, items, 0, ids, chunk_size=96, bf16_pass=bf16).ranks.tolist() == ranks
    monkeypatch.setattr(topk_module, "_count_block_np", topk_module._count_block)
    for bf16 in (False, True):
        assert rank_chunked(queries, items, 0, ids, chunk_size=96, bf16_pass=bf16).ranks.tolist() == ranks


def _shallow_and_deep() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 queries x 3000 items (D = 32): queries 0-3 with relevant items ranking 2nd and 5th (a band of ~0-2
    items), 4-7 with the median item and the 1000th (each ~60 items within the bf16 bound of ~4.4e-3:
    score density ~2.2 at the median for D = 32)."""
    gen = torch.Generator().manual_seed(9)
    norm = torch.nn.functional.normalize
    queries, items = (
        norm(torch.randn(8, 32, generator=gen), dim=1),
        norm(torch.randn(3000, 32, generator=gen), dim=1),
    )
    order = np.argsort(-_ref_scores(queries, items), axis=1, kind="stable")  # (8, 3000)
    depth = [(1, 4)] * 4 + [(1500, 999)] * 4
    ids = torch.tensor([[int(order[i, a]), int(order[i, b])] for i, (a, b) in enumerate(depth)])
    ids[2, 1] = -1  # padding counts for nothing
    return queries, items, ids


def _record_routes(monkeypatch: pytest.MonkeyPatch) -> list[list[bool]]:
    """Each pilot's routes (True: fp32), as ``rank_chunked`` on a CPU with native bf16 at scale sees them."""
    routed: list[list[bool]] = []
    route = topk_module._route

    def record(*args: torch.Tensor) -> torch.Tensor:
        deep = route(*args)
        routed.append(deep.tolist())
        return deep

    monkeypatch.setattr(topk_module, "_route", record)
    monkeypatch.setattr(topk_module, "bf16_pays", lambda *a: True)
    return routed


def test_auto_routes_queries_with_deep_relevant_items_to_fp32_and_keeps_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "auto" with ranks: the pilot sends the queries whose relevant items rank deep (thousands of items
    within bf16's bound, at scale) to the fp32 kernel and keeps the shallow ones on bf16; same answer."""
    queries, items, ids = _shallow_and_deep()
    routed = _record_routes(monkeypatch)
    # the cost model at torch's GEMM: which BLAS the machine's timing picks must not move these routes
    monkeypatch.setattr(topk_module, "_gemm_gain", lambda: 1)
    # 4 queries left on bf16 would not pay for its pass over the items (40 per thread do): all take fp32
    assert (
        rank_chunked(queries, items, k=10, relevant_ids=ids, chunk_size=512).ranks.tolist()
        == (_ref_lists_and_ranks(queries, items, 10, ids)[1])
    )
    assert routed == [[True] * 8]
    routed.clear()
    monkeypatch.setattr(topk_module, "_BF16_MIN_QUERIES", 1)  # as if there were hundreds like 0-3
    got = rank_chunked(queries, items, k=10, relevant_ids=ids, chunk_size=512)
    assert routed == [[False] * 4 + [True] * 4]
    lists, ranks = _ref_lists_and_ranks(queries, items, 10, ids)
    assert got.indices.tolist() == lists
    assert got.ranks.tolist() == ranks
    assert [r[0] for r in ranks[4:]] == [1501] * 4  # the reference agrees on the depth built in
    for forced in (True, False):  # every query on one kernel: the very same lists, scores and ranks
        other = rank_chunked(queries, items, k=10, relevant_ids=ids, chunk_size=512, bf16_pass=forced)
        assert torch.equal(other.indices, got.indices) and torch.equal(other.scores, got.scores)
        assert torch.equal(other.ranks, got.ranks)
    assert routed == [[False] * 4 + [True] * 4]  # forcing a kernel runs no pilot
    # lists alone need no pilot: bf16 for every query
    topk_chunked(queries, items, k=10, chunk_size=512)
    assert len(routed) == 1


def test_a_faster_fp32_gemm_needs_more_queries_on_bf16_to_pay_for_its_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 4 shallow queries would stay on bf16 at a minimum of 3 per thread (one thread); with NumPy's GEMM the
    # fp32 pairs are cheaper and the minimum doubles to 6: all 8 queries take fp32. The answer is the same
    queries, items, ids = _shallow_and_deep()
    routed = _record_routes(monkeypatch)
    monkeypatch.setattr(topk_module.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(topk_module, "_BF16_MIN_QUERIES", 3)
    answers = []
    for gain in (1, 2):
        monkeypatch.setattr(topk_module, "_gemm_gain", lambda gain=gain: gain)
        answers.append(rank_chunked(queries, items, k=10, relevant_ids=ids, chunk_size=512).ranks)
    assert routed == [[False] * 4 + [True] * 4, [True] * 8]
    assert torch.equal(answers[0], answers[1])
    monkeypatch.setattr(topk_module, "_numpy_sgemm_faster", lambda: True)
    assert topk_module._gemm_gain() == 2


def test_raw_bf16_bits_select_what_the_keys_select_against_non_negative_thresholds() -> None:
    """The scan skips the key pass where every threshold is >= +0: the raw bits must select the same."""
    gen = torch.Generator().manual_seed(10)
    vals = torch.cat([torch.randn(4000, generator=gen) * 1e-3, torch.tensor([0.0, -0.0, 1e-40, -1e-40])])
    block = vals[torch.randperm(vals.numel(), generator=gen)].view(4, -1).bfloat16()  # (4, 1001)
    raw, keys = block.view(torch.int16).numpy(), topk_module._bf16_keys(block)
    lo = torch.tensor([[1e-30], [1e-40], [3e-4], [2e-3]], dtype=torch.float64)  # tiny ones included
    k_lo = topk_module._key_bounds(lo, lo, torch.bfloat16)[0].numpy()  # (4, 1) keys >= 0
    assert topk_module._raw_keys_do(block, None, torch.from_numpy(k_lo))
    assert np.array_equal(np.flatnonzero(raw >= k_lo), np.flatnonzero(keys >= k_lo))
    assert (raw >= k_lo).sum() > 1000  # many positives pass; -0, +0 and the negatives do not
    kth = torch.tensor([1e-40, 1e-4, 5e-4, 1e-3], dtype=torch.float64)  # positive K-th values: ">" them
    assert topk_module._raw_keys_do(block, kth, None)
    want_vals, want_idx = topk_module._keep_best_np(
        torch.from_numpy(keys), 0, kth[:, None].repeat(1, 3), torch.zeros(4, 3, dtype=torch.long)
    )
    got_vals, got_idx = topk_module._keep_best_np(
        torch.from_numpy(raw.copy()), 0, kth[:, None].repeat(1, 3), torch.zeros(4, 3, dtype=torch.long)
    )
    assert torch.equal(got_vals, want_vals) and torch.equal(got_idx, want_idx)
    assert not topk_module._raw_keys_do(block, -kth, None)  # a negative threshold needs the keys
    assert not topk_module._raw_keys_do(block, None, torch.from_numpy(k_lo - 2))


@pytest.mark.parametrize("dense", [0.0, math.inf])
@pytest.mark.parametrize("scan_entries", [2**18, 200])
def test_dense_and_listed_counts_of_items_ahead_agree(
    dense: float, scan_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items ahead are counted per row (relevant items deep) or from a list of entries (high): both must give
    the reference ranks, on every kernel, whether the block is taken whole or two rows at a time; 0 takes
    the dense count wherever an entry is at or above a band, inf never."""
    monkeypatch.setattr(topk_module, "_DENSE_AHEAD", dense)
    monkeypatch.setattr(topk_module, "_SCAN_ENTRIES", scan_entries)  # 200 entries: 2 rows of 96 items
    queries, items, ids = _adversarial(6)
    lists, ranks = _ref_lists_and_ranks(queries, items, 3, ids)
    for bf16 in (False, True):
        got = rank_chunked(queries, items, 3, ids, chunk_size=96, query_chunk_size=4, bf16_pass=bf16)
        assert got.ranks.tolist() == ranks
        assert got.indices.tolist() == lists


def test_blocks_split_over_threads_give_the_same_lists_and_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block's numpy work runs on row ranges, one per thread: with 3 threads and ranges of a single row
    allowed, the lists and ranks are the reference ones, on both kernels, ranks with and without lists."""
    monkeypatch.setattr(topk_module, "_MIN_RANGE_ROWS", 1)
    queries, items, ids = _adversarial(7)
    lists, ranks = _ref_lists_and_ranks(queries, items, 5, ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for bf16 in (False, True):
            got = rank_chunked(queries, items, 5, ids, chunk_size=128, bf16_pass=bf16)
            assert got.indices.tolist() == lists and got.ranks.tolist() == ranks
            assert (
                rank_chunked(queries, items, 0, ids, chunk_size=128, bf16_pass=bf16).ranks.tolist() == ranks
            )
    finally:
        torch.set_num_threads(threads)


def test_row_ranges_cover_every_row_once_and_pass_errors_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranges tile the rows (none twice, none left out), at most one per thread and at least
    ``_MIN_RANGE_ROWS`` rows each; a worker's error reaches the caller when it waits."""
    monkeypatch.setattr(topk_module, "_MIN_RANGE_ROWS", 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen: list[tuple[int, int]] = []
        for n_rows, n_parts in ((11, 2), (12, 3), (1000, 3), (3, 1)):
            seen.clear()
            topk_module._in_row_ranges(lambda a, b: seen.append((a, b)), n_rows)()  # started, then waited for
            covered = sorted(r for a, b in seen for r in range(a, b))
            assert covered == list(range(n_rows)) and len(seen) == n_parts

        def fail(a: int, b: int) -> None:
            raise ValueError(f"rows {a}-{b}")

        with pytest.raises(ValueError, match="rows"):
            topk_module._in_row_ranges(fail, 1000)()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [10, 2048])
def test_row_counts_and_flat_compares_match_numpy(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-row counts (one count per long row, the axis form for short rows) and the row-chunked flat
    compares give numpy's whole-block answers, chunk edges included."""
    monkeypatch.setattr(topk_module, "_SCAN_ENTRIES", 3 * n)  # 3 rows per chunk: 7 rows end mid-chunk
    rng = np.random.default_rng(n)
    kb = rng.standard_normal((7, n)).astype(np.float32)
    thr = rng.standard_normal((7, 1)).astype(np.float32)
    kb[2, : n // 2] = thr[2, 0]  # ties: kept by >=, dropped by >
    assert np.array_equal(topk_module._row_counts(kb > thr), np.count_nonzero(kb > thr, axis=1))
    for strict, cmp in ((True, np.greater), (False, np.greater_equal)):
        got = topk_module._flat_compare(kb, thr, strict=strict)
        assert np.array_equal(got, np.flatnonzero(cmp(kb, thr)))
