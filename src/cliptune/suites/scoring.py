"""Per-query suite metrics and the gate rules; every definition here is spelled out in ``docs/suites.md``.

Acceptable results A = relevant ∪ yellow. With L the query's ranking and R its relevant set:

- ``mrr``: 1 / rank of the first relevant item in the full ranking (yellow does not count);
- ``precision@k``: |A ∩ L[:k]| / min(k, |A|): the share of the slots that could hold an acceptable item
  that do (so a query with 3 acceptable images can still reach 1.0 at k = 5);
- ``recall@k``: |R ∩ L[:k]| / min(|R|, k): a broad relevant set (60 ripped jeans) cannot exceed k / |R|
  with the plain definition, so the denominator is what k results could hold;
- ``accuracy@k``: 1 if a relevant item is in L[:k] (yellow does not count: the user did not find it);
- ``ndcg@k``: graded gains, relevant 1 and yellow ``yellow_gain``;
- ``red_flag_rate@k``: |Red ∩ L[:k]| / k.

A perfect ranking (relevant, then yellow, then the rest, red last) scores 1 on the first five and 0 on
the red-flag rate, whatever the sizes of the sets.
"""

from __future__ import annotations

import torch

from cliptune.ranking.metrics import (
    graded_gains,
    ranks_of_relevant,
    red_flag_rate_at_k,
    retrieval_metrics_from_ranks,
)
from cliptune.suites.schema import Thresholds

__all__ = ["METRICS", "gate_failures", "metric_key", "query_metrics"]

# threshold field -> metric name (without @k) and whether higher is better
METRICS: dict[str, tuple[str, bool]] = {
    "mrr": ("mrr", True),
    "precision": ("precision", True),
    "recall": ("recall", True),
    "accuracy": ("accuracy", True),
    "ndcg": ("ndcg", True),
    "red_flag_rate": ("red_flag_rate", False),
}
_DECIMALS = 6  # per-query values are stored rounded: float32 noise must not decide a gate


def metric_key(field: str, k: int) -> str:
    """Output key of a gated metric: ``mrr`` (no cut-off) or ``precision@5`` etc."""
    return "mrr" if field == "mrr" else f"{METRICS[field][0]}@{k}"


def _hits(scores: torch.Tensor, mask: torch.Tensor, k: int) -> int:
    ranks, _ = ranks_of_relevant(scores, mask)  # (1, R)
    return int(((ranks > 0) & (ranks <= k)).sum())


def query_metrics(
    scores: torch.Tensor,
    relevant: torch.Tensor,
    yellow: torch.Tensor,
    red: torch.Tensor,
    k: int,
    yellow_gain: float = 0.5,
) -> dict[str, float]:
    """The six suite metrics of one query (definitions in the module docstring).

    Args:
        scores: similarity of the query to every item (higher first; ties: lower index first).
        relevant: bool mask of the relevant items (at least one).
        yellow: bool mask of acceptable near misses (disjoint from ``relevant``).
        red: bool mask of wrong items.
        k: cut-off.
        yellow_gain: nDCG gain of a yellow item.

    Returns:
        ``{"mrr", "precision@k", "recall@k", "accuracy@k", "ndcg@k", "red_flag_rate@k"}``, floats rounded
        to 6 decimals.

    Shapes:
        scores, relevant, yellow, red: (N,) -> dict of floats

    Example:
        >>> s = torch.tensor([0.9, 0.8, 0.1])
        >>> query_metrics(s, torch.tensor([False, True, False]), torch.tensor([True, False, False]),
        ...               torch.tensor([False, False, True]), k=2)["precision@2"]
        1.0
    """
    s = scores.reshape(1, -1).float()  # (1, N)
    rel, yel, bad = (m.reshape(1, -1).bool() for m in (relevant, yellow, red))  # (1, N) each
    acceptable = rel | yel
    n_rel, n_acc = int(rel.sum()), int(acceptable.sum())
    if n_rel == 0:
        raise ValueError("query_metrics: the query has no relevant item")
    ranks, _ = ranks_of_relevant(s, rel)
    binary = retrieval_metrics_from_ranks(ranks, ks=(k,), prefix="")  # mrr and accuracy@k
    g_ranks, g_gains = ranks_of_relevant(s, graded_gains(rel, yel, yellow_gain))
    graded = retrieval_metrics_from_ranks(g_ranks, ks=(k,), prefix="", gains=g_gains)  # ndcg@k
    values = {
        "mrr": float(binary["mrr"][0]),
        f"precision@{k}": _hits(s, acceptable, k) / min(k, n_acc),
        f"recall@{k}": _hits(s, rel, k) / min(k, n_rel),
        f"accuracy@{k}": float(binary[f"accuracy@{k}"][0]),
        f"ndcg@{k}": float(graded[f"ndcg@{k}"][0]),
        f"red_flag_rate@{k}": float(red_flag_rate_at_k(s, bad, k)[0]),
    }
    return {key: round(v, _DECIMALS) for key, v in values.items()}


def gate_failures(values: dict[str, float], thresholds: Thresholds, k: int) -> list[str]:
    """Which gates ``values`` miss, as messages like ``mrr 0.210 <= 0.3`` or ``precision@5 0.400 < 0.7``.

    MRR must be strictly greater than its threshold, red-flag rate at most its maximum, every other
    metric at least its threshold; a null threshold is not gated. Values are compared after rounding to
    9 decimals, so a mean that is 0.7 up to floating-point noise meets 0.7.

    Args:
        values: metric key -> value (per-query values or category means).
        thresholds: the gates.
        k: the cut-off the ``@k`` keys were computed at.

    Returns:
        One message per missed gate, in the order mrr, precision, recall, accuracy, ndcg, red-flag rate.
    """
    failures = []
    for field, (_, higher) in METRICS.items():
        limit = getattr(thresholds, field)
        if limit is None:
            continue
        key = metric_key(field, k)
        v = round(values[key], 9)
        if field == "mrr" and not v > limit:
            failures.append(f"{key} {v:.3f} <= {limit:g}")
        elif field != "mrr" and higher and v < limit:
            failures.append(f"{key} {v:.3f} < {limit:g}")
        elif not higher and v > limit:
            failures.append(f"{key} {v:.3f} > {limit:g}")
    return failures
