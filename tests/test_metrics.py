"""Ranking metrics: hand-computed golden values, a naive Python oracle with ties, torchmetrics without ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchmetrics.functional.retrieval as tmr
from torchmetrics.retrieval import RetrievalMAP, RetrievalMRR

from cliptune.ranking.metrics import (
    accuracy_at_k,
    average_precision,
    graded_gains,
    mrr,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    rank_items,
    ranks_of_relevant,
    recall_at_k,
    red_flag_rate_at_k,
    retrieval_metrics,
    retrieval_metrics_from_ranks,
    triplet_accuracy,
)

# ---------------------------------------------------------------------------------------------
# golden example: 3 queries x 5 items, with ties, the last query has no relevant item
#
# q0 scores [0.9, 0.5, 0.5, 0.1, 0.7] -> order 0, 4, 1, 2, 3 (1 before 2: tie, lower index first)
#    ranks of items 0..4 = [1, 3, 4, 5, 2]; relevant {2 (gain 1), 3 (yellow, gain 0.5)} -> ranks 4, 5
# q1 scores [0.2, 0.8, 0.8, 0.8, 0.4] -> order 1, 2, 3, 4, 0; ranks = [5, 1, 2, 3, 4]
#    relevant {0, 2} (gain 1 each) -> ranks 5, 2
# q2 scores all 0.3 -> order 0..4 by index; ranks = [1, 2, 3, 4, 5]; no relevant item
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.5, 0.1, 0.7],
        [0.2, 0.8, 0.8, 0.8, 0.4],
        [0.3, 0.3, 0.3, 0.3, 0.3],
    ]
)
RELEVANT = torch.tensor(
    [
        [False, False, True, False, False],
        [True, False, True, False, False],
        [False, False, False, False, False],
    ]
)
YELLOW = torch.tensor(
    [
        [False, False, False, True, False],
        [False, False, False, False, False],
        [False, False, False, False, False],
    ]
)
GAINS = graded_gains(RELEVANT, YELLOW)  # q0: item2 1.0, item3 0.5; q1: items 0, 2 1.0
# binary metrics count an item as relevant when its gain > 0, so yellow item 3 of q0 counts
BINARY = GAINS > 0
RED = torch.tensor(
    [
        [True, False, False, False, False],  # q0: red item 0 at rank 1
        [False, True, False, False, True],  # q1: red items at ranks 1 and 4
        [False, False, False, False, True],  # q2: red item at rank 5
    ]
)


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=1e-6)


def test_rank_items_golden_with_ties() -> None:
    assert rank_items(SCORES).tolist() == [[1, 3, 4, 5, 2], [5, 1, 2, 3, 4], [1, 2, 3, 4, 5]]


def test_ranks_of_relevant_golden() -> None:
    ranks, gains = ranks_of_relevant(SCORES, GAINS)
    assert ranks.tolist() == [[4, 5], [5, 2], [0, 0]]
    assert gains.tolist() == [[1.0, 0.5], [1.0, 1.0], [0.0, 0.0]]


def test_recall_golden() -> None:
    _close(recall_at_k(SCORES, BINARY, 1), [0.0, 0.0, 0.0])  # no relevant item at rank 1
    _close(recall_at_k(SCORES, BINARY, 3), [0.0, 0.5, 0.0])  # q1: rank 2 of {5, 2} -> 1/2
    _close(recall_at_k(SCORES, BINARY, 5), [1.0, 1.0, 0.0])  # q2 has none: 0, not NaN
    _close(recall_at_k(SCORES, BINARY, 50), [1.0, 1.0, 0.0])  # k > N: the whole list


def test_precision_golden() -> None:
    _close(precision_at_k(SCORES, BINARY, 3), [0.0, 1 / 3, 0.0])  # q1: 1 hit / 3
    _close(precision_at_k(SCORES, BINARY, 5), [0.4, 0.4, 0.0])  # 2 hits / 5
    _close(precision_at_k(SCORES, BINARY, 10), [0.2, 0.2, 0.0])  # k > N still divides by k: 2 / 10


def test_accuracy_golden() -> None:
    _close(accuracy_at_k(SCORES, BINARY, 1), [0.0, 0.0, 0.0])
    _close(accuracy_at_k(SCORES, BINARY, 3), [0.0, 1.0, 0.0])
    _close(accuracy_at_k(SCORES, BINARY, 4), [1.0, 1.0, 0.0])  # q0: rank 4


def test_mrr_golden() -> None:
    _close(mrr(SCORES, BINARY), [0.25, 0.5, 0.0])  # first relevant at rank 4, rank 2, none
    _close(mrr_at_k(SCORES, BINARY, 3), [0.0, 0.5, 0.0])  # rank 4 > 3 -> 0
    _close(mrr_at_k(SCORES, BINARY, 1), [0.0, 0.0, 0.0])


def test_average_precision_golden() -> None:
    # q0: relevant at ranks 4, 5 -> (1/4 + 2/5) / 2 = 0.325; q1: ranks 2, 5 -> (1/2 + 2/5) / 2 = 0.45
    _close(average_precision(SCORES, BINARY), [0.325, 0.45, 0.0])


def test_ndcg_golden_graded() -> None:
    # q0 @5: DCG = 1/log2(5) + 0.5/log2(6) = 0.430677 + 0.193426 = 0.624103
    #        IDCG = 1/log2(2) + 0.5/log2(3) = 1 + 0.315465 = 1.315465 -> 0.474435
    # q1 @5: DCG = 1/log2(3) + 1/log2(6) = 0.630930 + 0.386853 = 1.017783
    #        IDCG = 1 + 1/log2(3) = 1.630930 -> 0.624050
    q0 = (1 / math.log2(5) + 0.5 / math.log2(6)) / (1 + 0.5 / math.log2(3))
    q1 = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert abs(q0 - 0.474435) < 1e-6 and abs(q1 - 0.624050) < 1e-6
    _close(ndcg_at_k(SCORES, GAINS, 5), [q0, q1, 0.0])
    # @3: q0 has nothing in the top 3 -> 0; q1: (1/log2(3)) / (1 + 1/log2(3)) = 0.386853
    _close(ndcg_at_k(SCORES, GAINS, 3), [0.0, 0.386853, 0.0])
    # a yellow gain of 1.0 makes q0 @5: (1/log2(5) + 1/log2(6)) / (1 + 1/log2(3)) = 0.817530 / 1.630930 = 0.501266
    _close(ndcg_at_k(SCORES, graded_gains(RELEVANT, YELLOW, yellow_gain=1.0), 5), [0.501266, q1, 0.0])


def test_red_flag_rate_golden() -> None:
    _close(red_flag_rate_at_k(SCORES, RED, 1), [1.0, 1.0, 0.0])
    _close(red_flag_rate_at_k(SCORES, RED, 3), [1 / 3, 1 / 3, 0.0])
    _close(red_flag_rate_at_k(SCORES, RED, 5), [0.2, 0.4, 0.2])


def test_triplet_accuracy_golden() -> None:
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
    # cos: 0.707 > 0 yes; 0 > -1 yes; 1 vs 1 tie -> wrong; 0 > 1 no  => [1, 1, 0, 0], mean 0.5
    _close(triplet_accuracy(anchor, positive, negative), [1.0, 1.0, 0.0, 0.0])


def test_retrieval_metrics_keys_and_values() -> None:
    m = retrieval_metrics(SCORES, GAINS, ks=(1, 5), prefix="val/t2i")
    expected = {
        f"val/t2i/{n}@{k}" for n in ("recall", "precision", "accuracy", "mrr", "ndcg") for k in (1, 5)
    }
    assert set(m) == expected | {"val/t2i/mrr", "val/t2i/map"}
    _close(m["val/t2i/mrr"], [0.25, 0.5, 0.0])
    _close(m["val/t2i/map"], [0.325, 0.45, 0.0])
    _close(m["val/t2i/precision@5"], [0.4, 0.4, 0.0])
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in m.values())
    assert "recall@1" in retrieval_metrics(SCORES, BINARY, ks=(1,), prefix="")


# ---------------------------------------------------------------------------------------------
# naive oracle: a plain Python loop over a list sorted by (-score, index)


def _naive(scores: list[float], gains: list[float], k: int) -> dict[str, float]:
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    rel = {j for j, g in enumerate(gains) if g > 0}
    top = order[:k]
    hits = sum(1 for j in top if j in rel)
    ranks = [r + 1 for r, j in enumerate(order) if j in rel]
    first = ranks[0] if ranks else 0
    ap = sum((n + 1) / r for n, r in enumerate(ranks)) / len(ranks) if ranks else 0.0
    dcg = sum(gains[j] / math.log2(r + 2) for r, j in enumerate(top))
    ideal = sorted(gains, reverse=True)[:k]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    return {
        "recall": hits / len(rel) if rel else 0.0,
        "precision": hits / k,
        "accuracy": float(hits > 0),
        "mrr": 1 / first if first else 0.0,
        "mrr@k": 1 / first if first and first <= k else 0.0,
        "map": ap,
        "ndcg": dcg / idcg if idcg > 0 else 0.0,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_metrics_match_naive_loop_with_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, n = 7, 12
    scores = torch.randint(0, 4, (q, n), generator=gen).float()  # few distinct values: many ties
    gains = torch.randint(0, 3, (q, n), generator=gen).float() / 2  # 0, 0.5, 1
    gains[gains < 0.5] = 0.0
    gains[0] = 0.0  # a query with no relevant item
    for k in (1, 3, 12, 15):
        m = retrieval_metrics(scores, gains, ks=(k,), prefix="")
        for i in range(q):
            ref = _naive(scores[i].tolist(), gains[i].tolist(), k)
            got = {
                "recall": m[f"recall@{k}"][i],
                "precision": m[f"precision@{k}"][i],
                "accuracy": m[f"accuracy@{k}"][i],
                "mrr": m["mrr"][i],
                "mrr@k": m[f"mrr@{k}"][i],
                "map": m["map"][i],
                "ndcg": m[f"ndcg@{k}"][i],
            }
            for name, value in got.items():
                assert abs(float(value) - ref[name]) < 1e-6, (seed, k, i, name, float(value), ref[name])


def test_rank_items_matches_naive_sort_with_ties() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (5, 9), generator=gen).float()
    for i in range(5):
        order = sorted(range(9), key=lambda j: (-float(scores[i, j]), j))
        assert [order.index(j) + 1 for j in range(9)] == rank_items(scores)[i].tolist()


# ---------------------------------------------------------------------------------------------
# torchmetrics as an independent oracle; it breaks ties its own way, so scores here are tie-free


def _tie_free(q: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # distinct per row and > 0: torchmetrics' average precision treats items scored <= 0 as irrelevant
    return (torch.stack([torch.randperm(n, generator=gen) for _ in range(q)]).float() + 1) / n


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_metrics_match_torchmetrics_without_ties(seed: int) -> None:
    q, n = 8, 16
    scores = _tie_free(q, n, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    rel = torch.rand(q, n, generator=gen) < 0.2
    rel[1] = False  # empty target: torchmetrics' functional API returns 0 like ours
    for k in (1, 5, 10):
        m = retrieval_metrics(scores, rel, ks=(k,), prefix="")
        for i in range(q):
            p, t = scores[i], rel[i]
            expected = {
                f"recall@{k}": tmr.retrieval_recall(p, t, top_k=k),
                f"precision@{k}": tmr.retrieval_precision(p, t, top_k=k),
                f"accuracy@{k}": tmr.retrieval_hit_rate(p, t, top_k=k),
                f"mrr@{k}": tmr.retrieval_reciprocal_rank(p, t, top_k=k),
                f"ndcg@{k}": tmr.retrieval_normalized_dcg(p, t.float(), top_k=k),
                "mrr": tmr.retrieval_reciprocal_rank(p, t),
                "map": tmr.retrieval_average_precision(p, t),
            }
            for key, value in expected.items():
                assert abs(float(m[key][i]) - float(value)) < 1e-6, (seed, k, i, key)


def test_graded_ndcg_matches_torchmetrics_without_ties() -> None:
    scores = _tie_free(6, 10, 7)
    gains = graded_gains(
        torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) < 0.3,
        torch.rand(6, 10, generator=torch.Generator().manual_seed(2)) < 0.3,
    )
    for k in (3, 10):
        got = ndcg_at_k(scores, gains, k)
        for i in range(6):
            assert (
                abs(float(got[i]) - float(tmr.retrieval_normalized_dcg(scores[i], gains[i], top_k=k))) < 1e-6
            )


def test_means_match_torchmetrics_modules() -> None:
    q, n = 10, 12
    scores = _tie_free(q, n, 4)
    rel = torch.rand(q, n, generator=torch.Generator().manual_seed(5)) < 0.25
    rel[3] = False
    indexes = torch.arange(q)[:, None].expand(q, n)
    for metric, key in (
        (RetrievalMRR(empty_target_action="neg"), "mrr"),
        (RetrievalMAP(empty_target_action="neg"), "map"),
    ):
        expected = metric(scores.flatten(), rel.flatten(), indexes=indexes.flatten())
        assert (
            abs(float(retrieval_metrics(scores, rel, ks=(1,), prefix="")[key].mean()) - float(expected))
            < 1e-6
        )


# ---------------------------------------------------------------------------------------------
# the sparse (ranks) API and input validation


def test_from_ranks_equals_dense() -> None:
    ranks, gains = ranks_of_relevant(SCORES, GAINS)
    sparse = retrieval_metrics_from_ranks(ranks, ks=(1, 3, 5), prefix="t2i", gains=gains)
    dense = retrieval_metrics(SCORES, GAINS, ks=(1, 3, 5), prefix="t2i")
    assert sparse.keys() == dense.keys()
    for key in dense:
        assert torch.equal(sparse[key], dense[key]), key


def test_from_ranks_default_gains_and_padding() -> None:
    m = retrieval_metrics_from_ranks(torch.tensor([[3, 1, 0], [0, 0, 0]]), ks=(2,), prefix="i2t")
    _close(m["i2t/recall@2"], [0.5, 0.0])  # ranks {1, 3}: one of two within 2
    _close(m["i2t/map"], [(1 / 1 + 2 / 3) / 2, 0.0])  # 0.833333


def test_validation_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[0.1, float("nan")]]), torch.tensor([[True, False]]), 1)
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(SCORES, RELEVANT[:, :3], 1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(SCORES, RELEVANT, 0)
    with pytest.raises(ValueError, match=">= 0"):
        ndcg_at_k(SCORES, -GAINS, 2)
    with pytest.raises(ValueError, match="same rank"):
        retrieval_metrics_from_ranks(torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics_from_ranks(torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match="one shape"):
        triplet_accuracy(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# input checks at their edges, and messages that name the function, the argument and the facts
# (each of these was a surviving mutant of `make mutation MUTATE=metrics`, docs/reliability.md). The dense
# metrics check their scores and relevance inside `ranks_of_relevant`, whose name their messages carry.


def test_scores_must_be_a_non_empty_2d_float_matrix_and_the_message_says_what_came() -> None:
    rel = torch.tensor([[True]])
    with pytest.raises(ValueError) as err:
        recall_at_k(torch.tensor([0.1, 0.2]), torch.tensor([True, False]), 1)  # 1-D
    assert str(err.value) == "ranks_of_relevant: scores must be a 2-D (Q, N) tensor with N >= 1, got (2,)"
    with pytest.raises(
        ValueError,
        match=r"^ranks_of_relevant: scores must be a 2-D \(Q, N\) tensor with N >= 1, got \(2, 0\)$",
    ):
        mrr(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool))  # 2-D but no item
    with pytest.raises(ValueError, match=r"^rank_items: scores must be a 2-D .*got \(1, 1, 1\)$"):
        rank_items(torch.zeros(1, 1, 1))
    with pytest.raises(ValueError) as err:
        precision_at_k(torch.tensor([[1, 2]]), torch.tensor([[True, False]]), 1)
    assert str(err.value) == "ranks_of_relevant: scores must be floating point, got torch.int64"
    # one item and no query are both fine: N >= 1 is the only size rule
    _close(accuracy_at_k(torch.tensor([[0.3]]), rel, 1), [1.0])
    assert average_precision(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool)).shape == (0,)


def test_relevance_shape_message_names_both_shapes() -> None:
    with pytest.raises(ValueError) as err:
        ndcg_at_k(SCORES, GAINS[:, :3], 2)
    assert str(err.value) == "ranks_of_relevant: relevance shape (3, 3) must equal scores shape (3, 5)"
    with pytest.raises(ValueError, match=r"^ranks_of_relevant: relevance shape \(2, 5\) must equal"):
        average_precision(SCORES, RELEVANT[:2])  # fewer queries, same items


@pytest.mark.parametrize("bad", [-0.5, float("inf"), float("nan")])
def test_relevance_gains_must_be_finite_and_non_negative(bad: float) -> None:
    gains = GAINS.clone()
    gains[1, 4] = bad  # one bad entry is enough
    with pytest.raises(ValueError) as err:
        ndcg_at_k(SCORES, gains, 3)
    assert str(err.value) == "ranks_of_relevant: relevance gains must be finite and >= 0"


@pytest.mark.parametrize("k", [0, -1, True, 1.0, 2.5, "3", None])
def test_k_must_be_a_positive_int_and_the_message_repeats_it(k: object) -> None:
    for fn, name in (
        (recall_at_k, "recall_at_k"),
        (precision_at_k, "precision_at_k"),
        (accuracy_at_k, "accuracy_at_k"),
        (mrr_at_k, "mrr_at_k"),
        (ndcg_at_k, "ndcg_at_k"),
        (red_flag_rate_at_k, "red_flag_rate_at_k"),
    ):
        with pytest.raises(ValueError) as err:
            fn(SCORES, RELEVANT, k)
        assert str(err.value) == f"{name}: k must be a positive int, got {k!r}"


def test_k_accepts_any_integral_type_and_one() -> None:
    _close(recall_at_k(SCORES, BINARY, np.int64(3)), [0.0, 0.5, 0.0])  # numpy ints are Integral
    _close(mrr_at_k(SCORES, BINARY, 1), [0.0, 0.0, 0.0])
    m = retrieval_metrics_from_ranks(torch.tensor([[1]]), ks=(np.int32(1),), prefix="")
    _close(m["recall@1"], [1.0])


def test_every_k_of_ks_is_checked_not_only_the_first() -> None:
    with pytest.raises(ValueError) as err:
        retrieval_metrics_from_ranks(torch.tensor([[1, 2]]), ks=(1, 5, 0))
    assert str(err.value) == "retrieval_metrics_from_ranks: k must be a positive int, got 0"
    with pytest.raises(ValueError, match=r"^retrieval_metrics_from_ranks: k must be .*got -2$"):
        retrieval_metrics(SCORES, RELEVANT, ks=(-2, 3))


@pytest.mark.parametrize(
    ("ranks", "shown"),
    [
        (torch.tensor([1, 2]), "torch.int64 (2,)"),  # 1-D
        (torch.tensor([[[1]]]), "torch.int64 (1, 1, 1)"),  # 3-D
        (torch.tensor([[1.0, 2.0]]), "torch.float32 (1, 2)"),
        (torch.tensor([[True, False]]), "torch.bool (1, 2)"),
    ],
)
def test_ranks_must_be_a_2d_integer_matrix(ranks: torch.Tensor, shown: str) -> None:
    with pytest.raises(ValueError) as err:
        retrieval_metrics_from_ranks(ranks)
    assert str(err.value) == (
        f"retrieval_metrics_from_ranks: ranks must be a 2-D integer (Q, R) tensor, got {shown}"
    )


def test_other_integer_rank_dtypes_give_the_same_metrics() -> None:
    ranks = torch.tensor([[4, 5], [5, 2], [0, 0]])
    ref = retrieval_metrics_from_ranks(ranks, ks=(3,))
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = retrieval_metrics_from_ranks(ranks.to(dtype), ks=(3,))
        assert all(torch.equal(got[key], ref[key]) for key in ref), dtype


def test_negative_ranks_are_rejected_naming_the_smallest() -> None:
    with pytest.raises(ValueError) as err:
        retrieval_metrics_from_ranks(torch.tensor([[3, -1], [-4, 0]]))
    assert str(err.value) == "retrieval_metrics_from_ranks: ranks must be >= 1 (or 0 for padding), got -4"


def test_duplicate_ranks_name_the_first_row_and_padding_may_repeat() -> None:
    # unsorted rows: the duplicate is found after sorting, in the right row, and only among ranks > 0
    with pytest.raises(ValueError) as err:
        retrieval_metrics_from_ranks(torch.tensor([[1, 2, 0], [0, 0, 0], [7, 3, 7], [5, 5, 0]]))
    assert str(err.value) == (
        "retrieval_metrics_from_ranks: query row 2 has two relevant items at the same rank (duplicate item?)"
    )
    with pytest.raises(ValueError, match="query row 0 has two"):
        retrieval_metrics_from_ranks(torch.tensor([[3, 9, 3]]))  # equal neighbours only once sorted
    with pytest.raises(ValueError, match="query row 1 has two"):
        retrieval_metrics_from_ranks(torch.tensor([[2, 0], [1, 1]]))  # rank 1 twice is a duplicate too
    # padding zeros repeat freely, and distinct ranks in any order are fine
    m = retrieval_metrics_from_ranks(torch.tensor([[0, 3, 0, 1, 0], [0, 0, 0, 0, 0]]), ks=(1,), prefix="")
    _close(m["recall@1"], [0.5, 0.0])
    _close(m["map"], [(1 / 1 + 2 / 3) / 2, 0.0])


def test_gains_beside_ranks_are_checked_and_padding_gains_ignored() -> None:
    ranks = torch.tensor([[2, 0], [1, 3]])
    with pytest.raises(ValueError) as err:
        retrieval_metrics_from_ranks(ranks, gains=torch.ones(2, 3))
    assert str(err.value) == "retrieval_metrics_from_ranks: gains shape (2, 3) must equal ranks shape (2, 2)"
    with pytest.raises(ValueError) as err:
        retrieval_metrics_from_ranks(ranks, gains=torch.tensor([[1.0, 0.0], [float("inf"), 1.0]]))
    assert str(err.value) == "retrieval_metrics_from_ranks: gains must be finite and >= 0"
    with pytest.raises(ValueError, match="gains must be finite and >= 0"):
        retrieval_metrics_from_ranks(ranks, gains=torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    # a gain at a padding entry (rank 0) counts for nothing; gain 0 at a real rank means "not relevant"
    m = retrieval_metrics_from_ranks(
        ranks, ks=(1, 3), prefix="", gains=torch.tensor([[1.0, 9.0], [0.0, 2.0]])
    )
    _close(m["recall@1"], [0.0, 0.0])  # q1's rank-1 entry has gain 0
    _close(m["mrr"], [0.5, 1 / 3])
    _close(m["map"], [0.5, 1 / 3])  # q1: its one relevant item at rank 3 -> precision 1/3
    _close(m["ndcg@3"], [1 / math.log2(3), 1 / math.log2(4)])
    _close(m["precision@3"], [1 / 3, 1 / 3])


def test_no_relevant_columns_at_all() -> None:
    # R = 0: nothing is relevant anywhere; every metric is 0, not an error or NaN
    m = retrieval_metrics_from_ranks(torch.zeros(2, 0, dtype=torch.long), ks=(1, 2), prefix="")
    assert all(v.tolist() == [0.0, 0.0] for v in m.values()), m
    # the dense side keeps one (padding) column so R >= 1, as documented
    ranks, gains = ranks_of_relevant(SCORES, torch.zeros_like(SCORES))
    assert ranks.tolist() == [[0], [0], [0]] and gains.tolist() == [[0.0], [0.0], [0.0]]
    assert gains.dtype == torch.float64 and ranks.dtype == torch.int64
    r0, g0 = ranks_of_relevant(torch.zeros(0, 3), torch.zeros(0, 3))
    assert r0.shape == (0, 1) and g0.shape == (0, 1)


def test_ranks_of_relevant_keeps_item_order_and_pads_to_the_widest_query() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    rel = torch.tensor([[0.0, 0.5, 0.0, 2.0], [1.0, 1.0, 1.0, 0.0]])
    ranks, gains = ranks_of_relevant(scores, rel)
    assert ranks.tolist() == [[1, 2, 0], [1, 2, 3]]  # q0: items 1, 3 (in item order) at ranks 1, 2
    assert gains.tolist() == [[0.5, 2.0, 0.0], [1.0, 1.0, 1.0]]


def test_metrics_of_only_red_flags_use_the_red_mask_as_bool() -> None:
    # a float "red" mask with values other than 0/1 still counts items, not weights
    red = torch.tensor([[0.0, 3.0, 0.0, 0.5]])
    _close(red_flag_rate_at_k(torch.tensor([[0.9, 0.8, 0.7, 0.6]]), red, 2), [0.5])
    _close(red_flag_rate_at_k(torch.tensor([[0.9, 0.8, 0.7, 0.6]]), red, 8), [0.25])  # k > N divides by k


def test_graded_gains_bounds_and_messages() -> None:
    rel = torch.tensor([[True, False, False]])
    yellow = torch.tensor([[True, True, False]])  # item 0 both: gains 1, not yellow_gain
    assert graded_gains(rel, yellow, 0.0).tolist() == [[1.0, 0.0, 0.0]]
    assert graded_gains(rel, yellow, 1.0).tolist() == [[1.0, 1.0, 0.0]]
    assert graded_gains(rel, yellow, 0.25).tolist() == [[1.0, 0.25, 0.0]]
    assert graded_gains(rel).tolist() == [[1.0, 0.0, 0.0]] and graded_gains(rel).dtype == torch.float32
    assert graded_gains(torch.tensor([[2, 0, 1]]), torch.tensor([[0, 5, 0]])).tolist() == [[1.0, 0.5, 1.0]]
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError) as err:
            graded_gains(rel, yellow, bad)
        assert str(err.value) == f"graded_gains: yellow_gain must be in [0, 1], got {bad}"
    with pytest.raises(ValueError) as err:
        graded_gains(rel, torch.tensor([[True, False]]))
    assert str(err.value) == "graded_gains: yellow shape (1, 2) != relevant (1, 3)"


def test_triplet_accuracy_shapes_and_scale() -> None:
    for args in (
        (torch.zeros(3), torch.zeros(3), torch.zeros(3)),  # one shape, but 1-D
        (torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3)),
    ):
        with pytest.raises(ValueError) as err:
            triplet_accuracy(*args)
        shapes = {n: tuple(t.shape) for n, t in zip(("anchor", "positive", "negative"), args, strict=True)}
        assert (
            str(err.value)
            == f"triplet_accuracy: expected three 2-D (B, D) tensors of one shape, got {shapes}"
        )
    # cosine, not dot product: a long negative does not beat a short aligned positive; integer input works
    anchor = torch.tensor([[3, 4], [1, 0]])
    positive = torch.tensor([[3, 4], [1, 1]])
    negative = torch.tensor([[300, -400], [100, 200]])
    _close(triplet_accuracy(anchor, positive, negative), [1.0, 1.0])
    # compare against a direct cosine computation on random triplets
    gen = torch.Generator().manual_seed(11)
    a, p, n = (torch.randn(20, 5, generator=gen) * 10 for _ in range(3))
    cos = torch.nn.functional.cosine_similarity
    expected = [
        1.0 if float(cos(a[i], p[i], dim=0)) > float(cos(a[i], n[i], dim=0)) else 0.0 for i in range(20)
    ]
    _close(triplet_accuracy(a, p, n), expected)


def test_default_keys_and_cut_offs() -> None:
    m = retrieval_metrics(SCORES, BINARY)
    names = ("recall", "precision", "accuracy", "mrr", "ndcg")
    assert set(m) == {f"t2i/{n}@{k}" for n in names for k in (1, 5, 10)} | {"t2i/mrr", "t2i/map"}
    s = retrieval_metrics_from_ranks(torch.tensor([[4, 5], [5, 2], [0, 0]]))
    assert s.keys() == m.keys()
    for key in m:
        assert torch.equal(s[key], m[key]), key


def test_tie_rule_holds_for_long_rows() -> None:
    # torch's default (unstable) sort keeps index order for a dozen items but not for hundreds: the tie
    # rule (lower item index first) and the item order of ranks_of_relevant must not depend on the length
    gen = torch.Generator().manual_seed(12)
    q, n = 3, 300
    scores = torch.randint(0, 3, (q, n), generator=gen).float()
    rel = torch.rand(q, n, generator=gen) < 0.5
    ranks = rank_items(scores)
    ranks_rel, _ = ranks_of_relevant(scores, rel)
    for i in range(q):
        order = sorted(range(n), key=lambda j: (-float(scores[i, j]), j))
        expected = [order.index(j) + 1 for j in range(n)]
        assert ranks[i].tolist() == expected
        relevant = [expected[j] for j in range(n) if rel[i, j]]  # in item index order
        assert ranks_rel[i, : len(relevant)].tolist() == relevant
        assert not ranks_rel[i, len(relevant) :].any()


def test_single_relevant_item_and_deep_ranks() -> None:
    # one relevant item (R = 1): recall is 0 or 1, MRR and AP are 1 / rank, even far down the list
    m = retrieval_metrics_from_ranks(torch.tensor([[1], [2], [200], [0]]), ks=(1, 2), prefix="")
    _close(m["recall@1"], [1.0, 0.0, 0.0, 0.0])
    _close(m["recall@2"], [1.0, 1.0, 0.0, 0.0])
    _close(m["mrr"], [1.0, 0.5, 1 / 200, 0.0])
    _close(m["mrr@2"], [1.0, 0.5, 0.0, 0.0])
    _close(m["map"], [1.0, 0.5, 1 / 200, 0.0])
    _close(m["ndcg@2"], [1.0, 1 / math.log2(3), 0.0, 0.0])
