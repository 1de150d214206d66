"""Chunked and FAISS top-k and exact ranks against the full-matrix oracle and a naive sort with ties."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cliptune.ranking.metrics import (
    rank_items,
    ranks_of_relevant,
    retrieval_metrics,
    retrieval_metrics_from_ranks,
)
from cliptune.ranking.topk import TIE_PAD, rank_chunked, refine_candidates, topk_chunked, topk_of_scores


def _ranks(queries: torch.Tensor, items: torch.Tensor, ids: torch.Tensor, **chunks: int) -> torch.Tensor:
    """Exact ranks of the relevant items alone: rank_chunked without top lists (k = 0)."""
    return rank_chunked(queries, items, 0, ids, **chunks).ranks


def _faiss_topk(queries: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FAISS IndexFlatIP candidates made exact by refine_candidates, as the search index does."""
    import faiss

    k = min(k, items.shape[0])
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items.numpy().astype("float32"))
    d, i = index.search(queries.numpy().astype("float32"), min(items.shape[0], k + TIE_PAD))

    def exact(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_chunked(queries[rows].float(), items.float(), k)

    return refine_candidates(torch.from_numpy(d), torch.from_numpy(i), k, items.shape[0], exact)


def _random(q: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return norm(torch.randn(q, d, generator=gen), dim=1), norm(torch.randn(n, d, generator=gen), dim=1)


def _tied(q: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer embeddings: every score is an exact small integer, so ties are many and real."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(-1, 2, (q, d), generator=gen).float(),
        torch.randint(-1, 2, (n, d), generator=gen).float(),
    )


def _naive_topk(queries: torch.Tensor, items: torch.Tensor, k: int) -> list[list[int]]:
    scores = (queries @ items.T).tolist()
    return [sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in scores]


def _relevant_ids(q: int, n: int, r: int, seed: int) -> torch.Tensor:
    """Up to r distinct relevant ids per query, -1 padded; query 0 has none."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n, generator=gen)[:r] for _ in range(q)])  # (q, r)
    drop = torch.rand(q, r, generator=gen) < 0.3
    ids[drop] = -1
    ids[0] = -1
    return ids


def _dense_relevance(ids: torch.Tensor, n: int) -> torch.Tensor:
    rel = torch.zeros(ids.shape[0], n, dtype=torch.bool)
    for i, row in enumerate(ids.tolist()):
        for j in row:
            if j >= 0:
                rel[i, j] = True
    return rel


@pytest.mark.parametrize(("chunk", "qchunk"), [(7, 3), (64, 100), (1, 1)])
def test_topk_chunked_equals_full_topk_on_random_data(chunk: int, qchunk: int) -> None:
    queries, items = _random(13, 50, 8, seed=chunk)
    scores, idx = topk_chunked(queries, items, k=5, chunk_size=chunk, query_chunk_size=qchunk)
    ref_scores, ref_idx = torch.topk(queries @ items.T, 5, dim=1)  # random floats: no ties
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores)


@pytest.mark.parametrize(("chunk", "qchunk"), [(5, 2), (6, 7), (1000, 1000)])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_topk_chunked_breaks_ties_by_lower_index(chunk: int, qchunk: int, k: int) -> None:
    queries, items = _tied(9, 40, 3, seed=k)  # scores in {-3..3}: about 6 items per value
    _, idx = topk_chunked(queries, items, k=k, chunk_size=chunk, query_chunk_size=qchunk)
    assert idx.tolist() == _naive_topk(queries, items, k)


def test_topk_chunked_golden_and_k_larger_than_n() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    # q0 scores [1, 0, 1, 1]: items 0, 2, 3 tie at 1 -> [0, 2, 3, 1]; q1 scores [0, 1, 0, 1] -> [1, 3, 0, 2]
    scores, idx = topk_chunked(queries, items, k=10, chunk_size=2)
    assert idx.tolist() == [[0, 2, 3, 1], [1, 3, 0, 2]]
    assert scores.tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("data", [_random, _tied])
def test_relevant_ranks_equal_dense_ranks(data: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    queries, items = data(11, 37, 4, seed=5)
    ids = _relevant_ids(11, 37, 3, seed=6)
    ranks = _ranks(queries, items, ids, chunk_size=6, query_chunk_size=4)
    full = rank_items(queries @ items.T)  # (Q, N) oracle
    expected = torch.where(ids >= 0, full.gather(1, ids.clamp(min=0)), torch.zeros_like(ids))
    assert torch.equal(ranks, expected)
    # the first relevant rank (MRR = 1 / it) from the ranks of another chunking
    mrr = retrieval_metrics_from_ranks(_ranks(queries, items, ids, chunk_size=6), ks=())["t2i/mrr"]
    big = 10**9
    ref_first = torch.where(expected > 0, expected, torch.full_like(expected, big)).min(1).values
    assert torch.equal(mrr, torch.where(ref_first == big, 0.0, 1.0 / ref_first.double()).float())
    assert mrr[0] == 0  # query 0 has no relevant item


def test_chunked_metrics_equal_dense_metrics_with_ties() -> None:
    queries, items = _tied(10, 30, 3, seed=8)
    ids = _relevant_ids(10, 30, 4, seed=9)
    ranked = rank_chunked(queries, items, k=5, relevant_ids=ids, chunk_size=7, query_chunk_size=3)
    sparse = retrieval_metrics_from_ranks(ranked.ranks, ks=(1, 5))
    dense = retrieval_metrics(queries @ items.T, _dense_relevance(ids, 30), ks=(1, 5))
    for key in dense:
        assert torch.equal(sparse[key], dense[key]), key
    # one pass gives the same lists as topk_chunked alone
    assert torch.equal(ranked.indices, topk_chunked(queries, items, k=5, chunk_size=4)[1])
    # ranks of the dense relevant items match too (ranks_of_relevant lists them in index order)
    dense_ranks, _ = ranks_of_relevant(queries @ items.T, _dense_relevance(ids, 30))
    for i in range(10):
        assert sorted(r for r in ranked.ranks[i].tolist() if r) == sorted(
            r for r in dense_ranks[i].tolist() if r
        )


def test_relevant_ranks_golden() -> None:
    queries = torch.tensor([[1.0]])
    items = torch.tensor([[0.5], [2.0], [0.5], [0.5], [-1.0]])
    # scores [0.5, 2, 0.5, 0.5, -1] -> order 1, 0, 2, 3, 4: item 3 is behind 1, 0 and 2 (tie, lower index)
    assert _ranks(queries, items, torch.tensor([[3, 4, -1, 0]]), chunk_size=2).tolist() == [[4, 5, 0, 2]]


def test_topk_faiss_equals_torch_on_random_data() -> None:
    queries, items = _random(25, 300, 16, seed=1)  # >= 20 queries: FAISS takes its BLAS path
    scores, idx = _faiss_topk(queries, items, k=10)
    ref_scores, ref_idx = torch.topk(queries @ items.T, 10, dim=1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_queries", [5, 30])
def test_topk_faiss_identical_to_chunked_with_ties(n_queries: int) -> None:
    # exact integer scores: "identical" means the very same index lists, ties by lower index included
    queries, items = _tied(n_queries, 200, 4, seed=n_queries)  # scores in {-4..4}: ~20+ items per value
    f_scores, f_idx = _faiss_topk(queries, items, k=10)
    c_scores, c_idx = topk_chunked(queries, items, k=10, chunk_size=33)
    assert torch.equal(f_idx, c_idx)
    assert torch.equal(f_scores, c_scores)
    assert f_idx.tolist() == _naive_topk(queries, items, 10)


def test_topk_faiss_all_items_tied_falls_back_exactly() -> None:
    items = torch.ones(100, 3)  # every score equal: the tie runs far past the k + 16 candidates
    scores, idx = _faiss_topk(torch.ones(2, 3), items, k=5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert scores.tolist() == [[3.0] * 5] * 2


def test_progress_bar_does_not_change_results() -> None:
    queries, items = _random(4, 20, 3, seed=2)
    assert torch.equal(
        topk_chunked(queries, items, 3, chunk_size=5, progress=True)[1], topk_chunked(queries, items, 3)[1]
    )


def test_validation_errors() -> None:
    q, x = _random(2, 5, 3, seed=0)
    with pytest.raises(ValueError, match="one D"):
        topk_chunked(q, x[:, :2], 2)
    with pytest.raises(ValueError, match="k must be"):
        topk_chunked(q, x, 0)
    with pytest.raises(ValueError, match="N = 0"):
        topk_chunked(q, x[:0], 1)
    with pytest.raises(ValueError, match="outside"):
        _ranks(q, x, torch.tensor([[5], [0]]))
    with pytest.raises(ValueError, match="twice"):
        _ranks(q, x, torch.tensor([[1, 1], [0, -1]]))
    with pytest.raises(ValueError, match="Q = 2"):
        _ranks(q, x, torch.tensor([[1]]))


def test_identical_relevant_items_get_consecutive_ranks() -> None:
    # Two relevant items with identical embeddings (duplicate captions) tie; the tie rule puts the lower
    # index first, so their ranks must differ by exactly one, as the dense ranking says. Scores taken
    # elementwise can differ from the matmul's in the last bit and gave both the same rank before.
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=-1)
    items[6] = items[0]
    queries = torch.nn.functional.normalize(torch.randn(1000, 16, generator=g), dim=-1)
    rel = torch.tensor([[0, 6]]).expand(1000, 2)
    got = rank_chunked(queries, items, k=0, relevant_ids=rel, chunk_size=3).ranks
    dense_rel = torch.zeros(1000, 7, dtype=torch.bool)
    dense_rel[:, [0, 6]] = True
    want, _ = ranks_of_relevant(queries @ items.T, dense_rel)
    assert torch.equal(got.sort(1).values, want.sort(1).values)
    assert ((got[:, 1] - got[:, 0]).abs() >= 1).all()


@pytest.mark.parametrize("k", [1, 3, 30])
def test_topk_of_scores_follows_the_tie_rule(k: int) -> None:
    queries, items = _tied(6, 30, 3, seed=12)
    scores, idx = topk_of_scores(queries @ items.T, k)
    assert idx.tolist() == _naive_topk(queries, items, k)
    assert torch.equal((scores, idx)[1], topk_chunked(queries, items, k, chunk_size=7)[1])
    with pytest.raises(ValueError, match="k must be"):
        topk_of_scores(queries @ items.T, 31)


def test_rank_chunked_many_exact_ties_are_ranked_by_index() -> None:
    items = torch.ones(5000, 4)  # every score ties: every item is near every relevant one
    ids = torch.tensor([[0, 4999], [2500, -1]])
    got = rank_chunked(torch.ones(2, 4), items, k=0, relevant_ids=ids, chunk_size=700).ranks
    assert got.tolist() == [[1, 5000], [2501, 0]]  # ties by lower index: item i has rank i + 1


def test_bf16_error_bound_holds_on_adversarial_vectors() -> None:
    from cliptune.ranking.topk import _bf16_error_factor

    gen = torch.Generator().manual_seed(5)
    d = 512
    q = torch.randn(64, d, generator=gen)
    x = torch.randn(2000, d, generator=gen)
    # worst cases for rounding: every entry just below a bf16 rounding midpoint, aligned signs, a huge range
    x[:500] = (1 + 2.0**-8 - 2.0**-20) * torch.sign(q[0]).repeat(500, 1)
    x[500:1000] *= torch.logspace(-6, 6, d)
    q[1] = x[0]
    exact = q.double() @ x.double().T  # (Q, N)
    fp32 = q @ x.T
    bf16 = (q.bfloat16() @ x.bfloat16().T).float()
    bound = _bf16_error_factor(d) * q.norm(dim=1)[:, None] * x.norm(dim=1)[None, :]
    assert bool(((bf16.double() - fp32.double()).abs() <= bound.double()).all())
    assert bool(((bf16.double() - exact).abs() <= bound.double()).all())


def test_topk_bf16_pass_breaks_ties_by_lower_index() -> None:
    queries, items = _tied(7, 400, 3, seed=2)  # small integers: exact in bf16, ~60 items per score
    _, idx = topk_chunked(queries, items, k=9, chunk_size=50, bf16_pass=True)
    assert idx.tolist() == _naive_topk(queries, items, 9)
