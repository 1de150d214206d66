"""Percentile bootstrap confidence intervals over queries, and paired or unpaired comparisons of two models.

A metric reported over Q queries is a mean of Q per-query values; how much it would move on another
sample of queries is what the interval shows. Resampling is over queries (with replacement), seeded
with numpy's PCG64 so the same inputs give the same interval on any machine.

Example:
    >>> ci = bootstrap_ci(torch.tensor([0.0, 1.0, 1.0, 1.0]), n_resamples=200)
    >>> ci.mean, ci.n, ci.low <= ci.mean <= ci.high
    (0.75, 4, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

__all__ = [
    "Interval",
    "bootstrap_ci",
    "bootstrap_metrics",
    "format_interval",
    "paired_bootstrap_delta",
    "unpaired_bootstrap_delta",
    "verdict",
]

Verdict = Literal["better", "worse", "not distinguishable"]

# resample indices are drawn in blocks of about this many int64 (32 MiB), so 1,000 resamples of a
# million queries never materialise at once; the block size depends only on n, so results stay reproducible
_BLOCK_ELEMENTS = 4_000_000
# the unpaired delta draws two index blocks per step (a's, then b's), so its blocks are half as large
_UNPAIRED_BLOCK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval: ``low <= high``, ``n`` values behind it.

    ``mean`` is the plain mean of the values (not of the resamples); ``confidence`` the coverage asked for.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-ready dict: ``{"mean", "low", "high", "n", "confidence"}``."""
        return asdict(self)


def format_interval(summary: Mapping[str, object], digits: int = 3) -> str:
    """``mean [low, high]`` of an :meth:`Interval.to_dict` summary; the mean alone when it has no interval.

    Args:
        summary: ``{"mean", "low", "high", ...}``; ``low`` None (bootstrap disabled) prints the mean only.
        digits: Decimals of every number.

    Example:
        >>> format_interval({"mean": 0.8, "low": 0.7, "high": 0.9}), format_interval({"mean": 0.8, "low": None}, 2)
        ('0.800 [0.700, 0.900]', '0.80')
    """
    mean = f"{summary['mean']:.{digits}f}"
    if summary.get("low") is None:
        return mean
    return f"{mean} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"


def _as_array(
    where: str, values: torch.Tensor | np.ndarray | list[float], name: str = "values"
) -> np.ndarray:
    arr = (
        values.detach().cpu().double().numpy()
        if isinstance(values, torch.Tensor)
        else np.asarray(values, float)
    )
    if arr.ndim != 1:
        raise ValueError(f"{where}: {name} must be 1-D (one value per query), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{where}: {name} is empty: a confidence interval needs at least one query")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: {name}[{int(np.argmin(np.isfinite(arr)))}] is not finite")
    return arr


def _check_args(where: str, n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"{where}: n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{where}: confidence must be in (0, 1), got {confidence}")


def _blocks(n_resamples: int, rows: int) -> list[tuple[int, int]]:
    """``[r0, r1)`` ranges of at most ``rows`` resamples covering ``n_resamples`` (bounded memory)."""
    return [(r0, min(n_resamples, r0 + rows)) for r0 in range(0, n_resamples, rows)]


def _draw_means(rng: np.random.Generator, arr: np.ndarray, count: int) -> np.ndarray:
    """Means of ``count`` resamples of ``arr`` with replacement, drawn from ``rng``; (count,) float64."""
    idx = rng.integers(0, arr.shape[0], size=(count, arr.shape[0]))  # (count, n)
    means: np.ndarray = arr[idx].mean(axis=1)
    return means


def _resample_means(arr: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples of ``arr`` (with replacement); (R,) float64."""
    rng = np.random.Generator(np.random.PCG64(seed))
    means = np.empty(n_resamples)
    for r0, r1 in _blocks(n_resamples, max(1, _BLOCK_ELEMENTS // arr.shape[0])):
        means[r0:r1] = _draw_means(rng, arr, r1 - r0)
    return means


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    """The ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of resampled statistics."""
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def _interval(arr: np.ndarray, n_resamples: int, confidence: float, seed: int) -> Interval:
    mean = float(arr.mean())
    if arr.shape[0] == 1:  # one query: every resample is that query; the interval is a point
        return Interval(mean, mean, mean, 1, confidence)
    low, high = _percentiles(_resample_means(arr, n_resamples, seed), confidence)
    return Interval(mean, low, high, int(arr.shape[0]), confidence)


def bootstrap_ci(
    values: torch.Tensor | np.ndarray | list[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean of per-query values.

    Draws ``n_resamples`` samples of n queries with replacement (numpy PCG64 seeded with ``seed``),
    takes each sample's mean, and reports the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles (numpy's linear interpolation) of those means.

    Args:
        values: one metric value per query (e.g. ``retrieval_metrics(...)["t2i/recall@5"]``).
        n_resamples: number of bootstrap samples; 1000 gives stable 95% bounds to about +-0.005 on [0, 1].
        confidence: coverage of the interval.
        seed: PCG64 seed; same seed and values give the same interval anywhere.

    Returns:
        :class:`Interval`; ``n == 1`` gives the point interval ``[v, v]``.

    Raises:
        ValueError: when ``values`` is empty, not 1-D or not finite.

    Shapes:
        values: (Q,) -> Interval

    Example:
        >>> bootstrap_ci([0.5]).to_dict()
        {'mean': 0.5, 'low': 0.5, 'high': 0.5, 'n': 1, 'confidence': 0.95}
    """
    _check_args("bootstrap_ci", n_resamples, confidence)
    return _interval(_as_array("bootstrap_ci", values), n_resamples, confidence, seed)


def paired_bootstrap_delta(
    values_a: torch.Tensor | np.ndarray | list[float],
    values_b: torch.Tensor | np.ndarray | list[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of ``mean(b - a)`` over the same queries, resampled together.

    Each resample draws one set of query indices and uses it for both models, so the per-query
    difficulty cancels out: this is far tighter than comparing two separate intervals. (Resampling
    the pair with shared indices equals resampling the per-query differences ``b - a``.)

    Args:
        values_a: per-query values of the baseline.
        values_b: per-query values of the candidate, on the same queries in the same order.
        n_resamples: number of bootstrap samples.
        confidence: coverage of the interval.
        seed: PCG64 seed.

    Returns:
        :class:`Interval` of the difference; positive means b is higher.

    Shapes:
        values_a, values_b: (Q,) -> Interval

    Example:
        >>> paired_bootstrap_delta([0.0, 1.0], [0.0, 1.0]).to_dict()
        {'mean': 0.0, 'low': 0.0, 'high': 0.0, 'n': 2, 'confidence': 0.95}
    """
    _check_args("paired_bootstrap_delta", n_resamples, confidence)
    a = _as_array("paired_bootstrap_delta", values_a, "values_a")
    b = _as_array("paired_bootstrap_delta", values_b, "values_b")
    if a.shape != b.shape:
        raise ValueError(
            f"paired_bootstrap_delta: values_a has {a.shape[0]} queries, values_b {b.shape[0]}: a paired "
            "comparison needs the same queries in the same order"
        )
    return _interval(b - a, n_resamples, confidence, seed)


def unpaired_bootstrap_delta(
    values_a: torch.Tensor | np.ndarray | list[float],
    values_b: torch.Tensor | np.ndarray | list[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``mean(b) - mean(a)`` with a and b resampled independently.

    For two runs evaluated on different queries no pairing exists; the interval covers the sampling
    noise of both means (wider than a paired one). It does not separate model from data: the two query
    sets may differ in difficulty, which is why such deltas are always flagged. Each block of resamples
    draws a's indices, then b's, from one PCG64 stream, so the result depends only on the inputs and seed.

    Args:
        values_a: per-query values of the baseline.
        values_b: per-query values of the candidate, on other queries (any count).
        n_resamples: number of bootstrap samples.
        confidence: coverage of the interval.
        seed: PCG64 seed.

    Returns:
        :class:`Interval` of the difference (``n`` = the smaller query count); positive means b is higher.

    Raises:
        ValueError: a run without queries, values that are not 1-D or not finite, or bad arguments.

    Shapes:
        values_a: (Qa,), values_b: (Qb,) -> Interval

    Example:
        >>> unpaired_bootstrap_delta([0.25] * 7, [1.0] * 5).to_dict()
        {'mean': 0.75, 'low': 0.75, 'high': 0.75, 'n': 5, 'confidence': 0.95}
    """
    _check_args("unpaired_bootstrap_delta", n_resamples, confidence)
    a = _as_array("unpaired_bootstrap_delta", values_a, "values_a")
    b = _as_array("unpaired_bootstrap_delta", values_b, "values_b")
    rng = np.random.Generator(np.random.PCG64(seed))
    diffs = np.empty(n_resamples)
    for r0, r1 in _blocks(n_resamples, max(1, _UNPAIRED_BLOCK_ELEMENTS // max(a.size, b.size))):
        ma = _draw_means(rng, a, r1 - r0)
        diffs[r0:r1] = _draw_means(rng, b, r1 - r0) - ma
    low, high = _percentiles(diffs, confidence)
    return Interval(float(b.mean() - a.mean()), low, high, int(min(a.size, b.size)), confidence)


def verdict(interval: Interval, higher_is_better: bool = True) -> Verdict:
    """Read a paired delta interval: "better" / "worse" only when the whole interval excludes 0.

    Args:
        interval: from :func:`paired_bootstrap_delta` (b - a).
        higher_is_better: False for metrics where lower wins (red-flag rate, loss).

    Returns:
        "better" if b beats a at this confidence, "worse" if a beats b, else "not distinguishable".

    Example:
        >>> verdict(Interval(0.1, 0.02, 0.2, 100)), verdict(Interval(0.1, 0.02, 0.2, 100), higher_is_better=False)
        ('better', 'worse')
    """
    if interval.low > 0:
        return "better" if higher_is_better else "worse"
    if interval.high < 0:
        return "worse" if higher_is_better else "better"
    return "not distinguishable"


def bootstrap_metrics(
    per_query: Mapping[str, torch.Tensor],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """:func:`bootstrap_ci` for every entry of a metric dict (e.g. from ``retrieval_metrics``).

    Every metric uses the same seed, so with equal query counts they share the resampled queries.

    Args:
        per_query: metric key -> (Q,) per-query values.
        n_resamples: number of bootstrap samples.
        confidence: coverage of the intervals.
        seed: PCG64 seed.

    Returns:
        metric key -> :class:`Interval`, in the same key order.

    Shapes:
        per_query: dict of (Q,) -> dict of Interval

    Example:
        >>> bootstrap_metrics({"t2i/mrr": torch.tensor([1.0, 0.5])}, n_resamples=10)["t2i/mrr"].mean
        0.75
    """
    _check_args("bootstrap_metrics", n_resamples, confidence)
    return {
        key: _interval(_as_array("bootstrap_metrics", v, key), n_resamples, confidence, seed)
        for key, v in per_query.items()
    }
