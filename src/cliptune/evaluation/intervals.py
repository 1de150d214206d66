"""Per-query values -> the summary ``cliptune eval`` writes per metric: mean, interval and n."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from cliptune.ranking.bootstrap import bootstrap_metrics

__all__ = ["metric_summaries"]


def metric_summaries(
    per_query: Mapping[str, Tensor], bootstrap: int, confidence: float, seed: int
) -> dict[str, dict[str, Any]]:
    """``{"mean", "low", "high", "n", "confidence"}`` per metric, with a bootstrap interval when asked.

    Args:
        per_query: Metric key -> (Q,) per-query values.
        bootstrap: Resamples of the percentile bootstrap; 0 skips it (``low``/``high`` are None), which
            keeps a quick evaluation free of the resampling cost.
        confidence: Interval coverage (recorded even without an interval).
        seed: Bootstrap seed (every metric resamples the same queries).

    Returns:
        Metric key -> JSON-ready summary, in the order of ``per_query``.
    """
    if bootstrap > 0:
        return {k: v.to_dict() for k, v in bootstrap_metrics(per_query, bootstrap, confidence, seed).items()}
    return {  # bootstrap disabled: the mean and n only
        k: {
            "mean": float(v.double().mean()),
            "low": None,
            "high": None,
            "n": int(v.numel()),
            "confidence": confidence,
        }
        for k, v in per_query.items()
    }
