"""Ranking metrics, one value per query, computed from the ranks of each query's relevant items.

Every metric here is a function of *where the relevant items land* in a query's full ranking, so the
module has one core representation: ``ranks`` (Q, R), the 1-based rank of each relevant item in the
full ranking (0 marks padding), with optional ``gains`` (Q, R) for graded relevance. The dense API
(``recall_at_k(scores, relevance, k)`` ...) turns a (Q, N) score matrix into that representation; the
chunked and FAISS paths in :mod:`cliptune.ranking.topk` produce it without ever holding (Q, N), and
:func:`retrieval_metrics_from_ranks` gives exactly the same numbers from it.

Ranking rule: by score descending, ties broken by the LOWER item index first. It is deterministic and
matches :func:`cliptune.ranking.topk.topk_chunked`. Definitions are in ``docs/metrics.md``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "accuracy_at_k",
    "average_precision",
    "graded_gains",
    "mrr",
    "mrr_at_k",
    "ndcg_at_k",
    "precision_at_k",
    "rank_items",
    "ranks_of_relevant",
    "recall_at_k",
    "red_flag_rate_at_k",
    "retrieval_metrics",
    "retrieval_metrics_from_ranks",
    "triplet_accuracy",
]


# ----------------------------------------------------------------------------------------------
# validation


def _check_scores(where: str, scores: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(
            f"{where}: scores must be a 2-D (Q, N) tensor with N >= 1, got {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"{where}: scores must be floating point, got {scores.dtype}")
    if torch.isnan(scores).any():
        row = int(torch.isnan(scores).any(1).nonzero()[0])
        raise ValueError(f"{where}: scores contain NaN (first in query row {row}); NaN has no rank")


def _check_same_shape(where: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(
            f"{where}: {name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}"
        )


def _check_gains(where: str, name: str, gains: torch.Tensor) -> None:
    """``gains`` (float64) must be finite and >= 0."""
    if not torch.isfinite(gains).all() or (gains < 0).any():
        raise ValueError(f"{where}: {name} must be finite and >= 0")


def _check_relevance(where: str, scores: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Validate and return relevance as float gains (bool True -> 1.0)."""
    _check_scores(where, scores)
    _check_same_shape(where, "relevance", relevance, "scores", scores)
    gains = relevance.double()  # (Q, N) bool True -> 1.0
    _check_gains(where, "relevance gains", gains)
    return gains


def _check_k(where: str, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{where}: k must be a positive int, got {k!r}")


def _check_ranks(where: str, ranks: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
    """Validate the sparse (ranks, gains) representation; return float64 gains (padding -> 0)."""
    if ranks.dim() != 2 or ranks.is_floating_point() or ranks.dtype == torch.bool:
        raise ValueError(
            f"{where}: ranks must be a 2-D integer (Q, R) tensor, got {ranks.dtype} {tuple(ranks.shape)}"
        )
    if (ranks < 0).any():
        raise ValueError(f"{where}: ranks must be >= 1 (or 0 for padding), got {int(ranks.min())}")
    srt = ranks.sort(dim=1).values  # (Q, R)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] > 0)  # (Q, R-1)
    if dup.any():
        row = int(dup.any(1).nonzero()[0])
        raise ValueError(
            f"{where}: query row {row} has two relevant items at the same rank (duplicate item?)"
        )
    if gains is None:
        return (ranks > 0).double()
    _check_same_shape(where, "gains", gains, "ranks", ranks)
    g = gains.double()
    _check_gains(where, "gains", g)
    return torch.where(ranks > 0, g, torch.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# core: metrics from (ranks, gains); ranks 0 = padding, an item is relevant iff rank > 0 and gain > 0


def _relevant(ranks: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    return (ranks > 0) & (gains > 0)  # (Q, R)


def _hits(ranks: torch.Tensor, gains: torch.Tensor, k: int) -> torch.Tensor:
    return (_relevant(ranks, gains) & (ranks <= k)).sum(1).double()  # (Q,)


def _recall(ranks: torch.Tensor, gains: torch.Tensor, k: int) -> torch.Tensor:
    n_rel = _relevant(ranks, gains).sum(1).double()  # (Q,)
    return torch.where(n_rel > 0, _hits(ranks, gains, k) / n_rel.clamp(min=1), torch.zeros_like(n_rel))


def _precision(ranks: torch.Tensor, gains: torch.Tensor, k: int) -> torch.Tensor:
    return _hits(ranks, gains, k) / k


def _accuracy(ranks: torch.Tensor, gains: torch.Tensor, k: int) -> torch.Tensor:
    return (_hits(ranks, gains, k) > 0).double()


_NOT_RELEVANT = torch.iinfo(torch.int64).max  # the rank given to padding / non-relevant entries


def _relevant_ranks(ranks: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """``ranks`` as int64 at relevant entries, :data:`_NOT_RELEVANT` elsewhere (sorts last); (Q, R)."""
    rel = _relevant(ranks, gains)
    return torch.where(rel, ranks.long(), torch.full_like(ranks, _NOT_RELEVANT, dtype=torch.long))


def _first_rank(ranks: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-ranked relevant item, 0 when the query has none; (Q,) int64."""
    big = _NOT_RELEVANT
    r = _relevant_ranks(ranks, gains)
    first = r.min(1).values if r.shape[1] > 0 else torch.full((r.shape[0],), big, dtype=torch.long)
    return torch.where(first == big, torch.zeros_like(first), first)


def _mrr(ranks: torch.Tensor, gains: torch.Tensor, k: int | None) -> torch.Tensor:
    first = _first_rank(ranks, gains).double()  # (Q,)
    ok = first > 0 if k is None else (first > 0) & (first <= k)
    return torch.where(ok, 1.0 / first.clamp(min=1), torch.zeros_like(first))


def _average_precision(ranks: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    r = _relevant_ranks(ranks, gains).sort(1).values  # (Q, R)
    valid = r != _NOT_RELEVANT
    # the j-th relevant item in rank order (1-based j) sits at rank r_j: precision there is j / r_j
    j = torch.arange(1, r.shape[1] + 1, dtype=torch.float64).expand(r.shape)  # (Q, R)
    prec = torch.where(valid, j / r.clamp(max=2**52).double(), torch.zeros_like(j))
    n_rel = valid.sum(1).double()
    return torch.where(n_rel > 0, prec.sum(1) / n_rel.clamp(min=1), torch.zeros_like(n_rel))


def _ndcg(ranks: torch.Tensor, gains: torch.Tensor, k: int) -> torch.Tensor:
    rel = _relevant(ranks, gains)  # (Q, R)
    in_k = rel & (ranks <= k)
    disc = torch.log2(ranks.double().clamp(min=1) + 1.0)  # (Q, R) log2(rank + 1)
    dcg = torch.where(in_k, gains / disc, torch.zeros_like(gains)).sum(1)  # (Q,)
    # ideal: the same gains sorted descending, placed at ranks 1..min(k, R)
    ideal = torch.where(rel, gains, torch.zeros_like(gains)).sort(1, descending=True).values[:, :k]  # (Q, k')
    ideal_disc = torch.log2(torch.arange(2, ideal.shape[1] + 2, dtype=torch.float64))  # (k',)
    idcg = (ideal / ideal_disc).sum(1)  # (Q,)
    return torch.where(
        idcg > 0, dcg / torch.where(idcg > 0, idcg, torch.ones_like(idcg)), torch.zeros_like(idcg)
    )


def _out(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# ranking


def rank_items(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of every item for every query: score descending, ties by lower item index first.

    The tie rule makes rankings (and so every metric) deterministic; it is the rule used by
    :mod:`cliptune.ranking.topk` too, so dense and chunked paths agree exactly.

    Args:
        scores: similarity of query q to item n; higher is better. NaN is rejected.

    Returns:
        ``ranks[q, n]`` = position of item n in query q's ranking (1 = best), int64.

    Shapes:
        scores: (Q, N) -> (Q, N)

    Example:
        >>> rank_items(torch.tensor([[0.5, 0.9, 0.5]])).tolist()  # item 1, then the tie 0 before 2
        [[2, 1, 3]]
    """
    _check_scores("rank_items", scores)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (Q, N) item at each position
    positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)  # (Q, N)
    return torch.empty_like(order).scatter_(1, order, positions)


def ranks_of_relevant(scores: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a dense (scores, relevance) pair into the sparse ranks of the relevant items.

    This is the representation every metric here is computed from (and the one worth saving per
    query so reports can re-sample): it is small (R = most relevant items of any query) and exact.

    Args:
        scores: similarity of query q to item n (no NaN).
        relevance: bool (relevant or not) or float gains >= 0 (graded, see :func:`graded_gains`);
            an item is relevant iff its gain is > 0.

    Returns:
        ``(ranks, gains)``: ``ranks[q, j]`` the 1-based rank of query q's j-th relevant item (in item
        index order), 0 for padding; ``gains[q, j]`` its gain (float64), 0 for padding. R >= 1.

    Shapes:
        scores, relevance: (Q, N) -> ranks (Q, R) int64, gains (Q, R) float64

    Example:
        >>> r, g = ranks_of_relevant(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[True, False, True]]))
        >>> r.tolist(), g.tolist()
        ([[3, 2]], [[1.0, 1.0]])
    """
    gains_all = _check_relevance("ranks_of_relevant", scores, relevance)  # (Q, N)
    mask = gains_all > 0
    n_max = max(1, int(mask.sum(1).max())) if mask.shape[0] else 1
    # relevant items first (stable: in item index order), then keep the first n_max columns
    idx = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n_max]  # (Q, R)
    keep = mask.gather(1, idx)
    ranks = torch.where(keep, rank_items(scores).gather(1, idx), torch.zeros_like(idx))
    gains = torch.where(keep, gains_all.gather(1, idx), torch.zeros(idx.shape, dtype=torch.float64))
    return ranks, gains


def graded_gains(
    relevant: torch.Tensor, yellow: torch.Tensor | None = None, yellow_gain: float = 0.5
) -> torch.Tensor:
    """Gain matrix for nDCG: relevant items gain 1, "yellow flag" (acceptable) items ``yellow_gain``.

    Args:
        relevant: bool mask of fully relevant items.
        yellow: optional bool mask of yellow-flag items; an item both relevant and yellow gains 1.
        yellow_gain: gain of a yellow-flag item, in [0, 1].

    Returns:
        float32 gains (1, ``yellow_gain`` or 0).

    Shapes:
        relevant, yellow: (Q, N) -> (Q, N)

    Example:
        >>> graded_gains(torch.tensor([[True, False, False]]), torch.tensor([[False, True, False]])).tolist()
        [[1.0, 0.5, 0.0]]
    """
    if not 0.0 <= yellow_gain <= 1.0:
        raise ValueError(f"graded_gains: yellow_gain must be in [0, 1], got {yellow_gain}")
    gains = relevant.bool().float()
    if yellow is not None:
        if yellow.shape != relevant.shape:
            raise ValueError(
                f"graded_gains: yellow shape {tuple(yellow.shape)} != relevant {tuple(relevant.shape)}"
            )
        gains = torch.where(yellow.bool() & ~relevant.bool(), torch.full_like(gains, yellow_gain), gains)
    return gains


# ----------------------------------------------------------------------------------------------
# dense per-metric API: (scores (Q, N), relevance (Q, N)) -> (Q,) float32


def recall_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Recall@k = |R ∩ L[:k]| / |R| per query; 0 for a query with no relevant item.

    Args:
        scores: similarity of query q to item n.
        relevance: bool, or gains (relevant iff > 0).
        k: cut-off (k > N means the whole list).

    Returns:
        One value per query, float32.

    Shapes:
        scores, relevance: (Q, N) -> (Q,)

    Example:
        >>> recall_at_k(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, True, True]]), 2).tolist()
        [0.5]
    """
    _check_k("recall_at_k", k)
    return _out(_recall(*ranks_of_relevant(scores, relevance), k))


def precision_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Precision@k = |R ∩ L[:k]| / k per query (always divided by k, even when k > N).

    Args:
        scores: similarity of query q to item n.
        relevance: bool, or gains (relevant iff > 0).
        k: cut-off.

    Returns:
        One value per query, float32.

    Shapes:
        scores, relevance: (Q, N) -> (Q,)

    Example:
        >>> precision_at_k(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, True, True]]), 2).tolist()
        [0.5]
    """
    _check_k("precision_at_k", k)
    return _out(_precision(*ranks_of_relevant(scores, relevance), k))


def accuracy_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Accuracy@k (hit rate) = 1 if any relevant item is in L[:k], else 0.

    Args:
        scores: similarity of query q to item n.
        relevance: bool, or gains (relevant iff > 0).
        k: cut-off.

    Returns:
        One value per query (0.0 or 1.0), float32.

    Shapes:
        scores, relevance: (Q, N) -> (Q,)

    Example:
        >>> accuracy_at_k(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, True, True]]), 1).tolist()
        [0.0]
    """
    _check_k("accuracy_at_k", k)
    return _out(_accuracy(*ranks_of_relevant(scores, relevance), k))


def mrr(scores: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Reciprocal rank of the first relevant item in the FULL ranking (0 if the query has none).

    The mean over queries is the MRR.

    Args:
        scores: similarity of query q to item n.
        relevance: bool, or gains (relevant iff > 0).

    Returns:
        One value per query, float32.

    Shapes:
        scores, relevance: (Q, N) -> (Q,)

    Example:
        >>> mrr(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, True, True]])).tolist()
        [0.5]
    """
    return _out(_mrr(*ranks_of_relevant(scores, relevance), None))


def mrr_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Reciprocal rank of the first relevant item if it is within L[:k], else 0.

    Args:
        scores: similarity of query q to item n.
        relevance: bool, or gains (relevant iff > 0).
        k: cut-off.

    Returns:
        One value per query, float32.

    Shapes:
        scores, relevance: (Q, N) -> (Q,)

    Example:
        >>> mrr_at_k(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, True, True]]), 1).tolist()
        [0.0]
    """
    _check_k("mrr_at_k", k)
    return _out(_mrr(*ranks_of_relevant(scores, relevance), k))


def ndcg_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """nDCG@k with linear graded gains: DCG@k / IDCG@k, 0 when the query has no relevant item.

    ``DCG@k = sum over ranks i <= k of gain(L[i]) / log2(i + 1)``; ``IDCG@k`` is the same sum over the
    query's gains sorted descending. Gains are used as given (not ``2**g - 1``).

    Args:
        scores: similarity of query q to item n.
        relevance: bool (gain 1) or float gains >= 0, e.g. from :func:`graded_gains`.
        k: cut-off.

    Returns:
        One value per query in [0, 1], float32.

    Shapes:
        scores, relevance: (Q, N) -> (Q,)

    Example:
        >>> ndcg_at_k(torch.tensor([[0.9, 0.5]]), torch.tensor([[0.0, 1.0]]), 2).tolist()  # 1/log2(3)
        [0.6309297680854797]
    """
    _check_k("ndcg_at_k", k)
    return _out(_ndcg(*ranks_of_relevant(scores, relevance), k))


def average_precision(scores: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Average precision over the full ranking: mean of precision@rank(r) over relevant items r.

    The mean over queries is the MAP. 0 for a query with no relevant item.

    Args:
        scores: similarity of query q to item n.
        relevance: bool, or gains (relevant iff > 0).

    Returns:
        One value per query, float32.

    Shapes:
        scores, relevance: (Q, N) -> (Q,)

    Example:
        >>> average_precision(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, True, True]])).tolist()
        [0.5833333134651184]
    """
    return _out(_average_precision(*ranks_of_relevant(scores, relevance)))


def red_flag_rate_at_k(scores: torch.Tensor, red: torch.Tensor, k: int) -> torch.Tensor:
    """Share of L[:k] that is red-flagged: |Red ∩ L[:k]| / k (lower is better).

    Args:
        scores: similarity of query q to item n.
        red: bool mask of items that must not be shown for the query.
        k: cut-off (divided by k even when k > N, like precision).

    Returns:
        One value per query, float32.

    Shapes:
        scores, red: (Q, N) -> (Q,)

    Example:
        >>> red_flag_rate_at_k(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[True, False, False]]), 2).tolist()
        [0.5]
    """
    _check_k("red_flag_rate_at_k", k)
    return _out(_precision(*ranks_of_relevant(scores, red.bool()), k))


def triplet_accuracy(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """1.0 where cos(anchor, positive) > cos(anchor, negative), strictly; ties count as wrong.

    Args:
        anchor: anchor embeddings (any scale; cosine similarity is used).
        positive: the item that should be closer to the anchor.
        negative: the item that should be farther.

    Returns:
        One value per triplet (0.0 or 1.0), float32; its mean is the triplet accuracy.

    Shapes:
        anchor, positive, negative: (B, D) -> (B,)

    Example:
        >>> a = torch.tensor([[1.0, 0.0]])
        >>> triplet_accuracy(a, a, torch.tensor([[0.0, 1.0]])).tolist(), triplet_accuracy(a, a, a).tolist()
        ([1.0], [0.0])
    """
    shapes = {
        n: tuple(t.shape) for n, t in (("anchor", anchor), ("positive", positive), ("negative", negative))
    }
    if len(set(shapes.values())) != 1 or len(shapes["anchor"]) != 2:
        raise ValueError(f"triplet_accuracy: expected three 2-D (B, D) tensors of one shape, got {shapes}")
    a = F.normalize(anchor.float(), dim=-1)  # (B, D)
    sim_pos = (a * F.normalize(positive.float(), dim=-1)).sum(-1)  # (B,)
    sim_neg = (a * F.normalize(negative.float(), dim=-1)).sum(-1)  # (B,)
    return (sim_pos > sim_neg).float()


# ----------------------------------------------------------------------------------------------
# metric dicts


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def retrieval_metrics_from_ranks(
    ranks: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    prefix: str = "t2i",
    gains: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every ranking metric, per query, from the ranks of each query's relevant items.

    This is what the chunked / FAISS paths use (:func:`cliptune.ranking.topk.rank_chunked` gives the
    ranks without a (Q, N) matrix); the numbers equal :func:`retrieval_metrics` on the dense matrix.

    Args:
        ranks: 1-based rank of each relevant item in its query's FULL ranking, 0 for padding. A
            query whose row is all 0 has no relevant item (all its metrics are 0).
        ks: cut-offs.
        prefix: namespace of the keys (``"t2i"``, ``"val/i2t"``, ``""`` for none).
        gains: graded gains of those items (default 1 for every non-padding entry); gain 0 means
            "not relevant".

    Returns:
        ``{prefix}/recall@k``, ``precision@k``, ``accuracy@k``, ``mrr@k``, ``ndcg@k`` for each k, plus
        ``{prefix}/mrr`` and ``{prefix}/map`` (per-query average precision): (Q,) float32 each.

    Shapes:
        ranks, gains: (Q, R) -> dict of (Q,)

    Example:
        >>> m = retrieval_metrics_from_ranks(torch.tensor([[2, 0], [1, 3]]), ks=(1,))
        >>> m["t2i/recall@1"].tolist(), m["t2i/mrr"].tolist()
        ([0.0, 0.5], [0.5, 1.0])
    """
    g = _check_ranks("retrieval_metrics_from_ranks", ranks, gains)
    for k in ks:
        _check_k("retrieval_metrics_from_ranks", k)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        out[_key(prefix, f"recall@{k}")] = _out(_recall(ranks, g, k))
        out[_key(prefix, f"precision@{k}")] = _out(_precision(ranks, g, k))
        out[_key(prefix, f"accuracy@{k}")] = _out(_accuracy(ranks, g, k))
        out[_key(prefix, f"mrr@{k}")] = _out(_mrr(ranks, g, k))
        out[_key(prefix, f"ndcg@{k}")] = _out(_ndcg(ranks, g, k))
    out[_key(prefix, "mrr")] = _out(_mrr(ranks, g, None))
    out[_key(prefix, "map")] = _out(_average_precision(ranks, g))
    return out


def retrieval_metrics(
    scores: torch.Tensor,
    relevance: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    prefix: str = "t2i",
) -> dict[str, torch.Tensor]:
    """Every ranking metric, per query, from a dense score matrix, under stable namespaced keys.

    Args:
        scores: similarity of query q to item n (no NaN).
        relevance: bool, or graded gains >= 0 (nDCG uses the gains, the others "gain > 0").
        ks: cut-offs.
        prefix: namespace of the keys.

    Returns:
        See :func:`retrieval_metrics_from_ranks`; (Q,) float32 per key.

    Shapes:
        scores, relevance: (Q, N) -> dict of (Q,)

    Example:
        >>> m = retrieval_metrics(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, True, True]]), ks=(2,))
        >>> m["t2i/recall@2"].tolist(), m["t2i/mrr"].tolist()
        ([0.5], [0.5])
    """
    ranks, gains = ranks_of_relevant(scores, relevance)
    return retrieval_metrics_from_ranks(ranks, ks=ks, prefix=prefix, gains=gains)
