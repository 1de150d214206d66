"""Bootstrap intervals: golden cases, a naive loop oracle, reproducibility, paired deltas and verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliptune.ranking.bootstrap import (
    Interval,
    bootstrap_ci,
    bootstrap_metrics,
    format_interval,
    paired_bootstrap_delta,
    unpaired_bootstrap_delta,
    verdict,
)


def _bernoulli(n: int, p: float, seed: int) -> torch.Tensor:
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p).double()


def test_matches_naive_loop_with_same_draws() -> None:
    values = np.array([0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75])
    ci = bootstrap_ci(values, n_resamples=300, confidence=0.9, seed=11)
    # oracle: the same PCG64 draws, then a Python loop of means and numpy percentiles 5 / 95
    idx = np.random.Generator(np.random.PCG64(11)).integers(0, 7, size=(300, 7))
    means = [sum(values[j] for j in row) / 7 for row in idx]
    low, high = np.percentile(means, [5, 95])
    assert ci == Interval(float(values.mean()), float(low), float(high), 7, 0.9)
    assert abs(ci.mean - 3.5 / 7) < 1e-12  # (0 + 1 + .5 + .25 + 1 + 0 + .75) / 7 = 0.5


def test_interval_contains_mean_and_is_about_the_normal_width() -> None:
    values = _bernoulli(400, 0.5, seed=0)
    ci = bootstrap_ci(values)
    assert ci.low < ci.mean < ci.high
    # normal approximation: half-width 1.96 * sqrt(p (1 - p) / n) = 1.96 * sqrt(0.25 / 400) = 0.049
    assert 0.040 < (ci.high - ci.low) / 2 < 0.058


def test_narrows_with_more_queries() -> None:
    small = bootstrap_ci(_bernoulli(25, 0.5, seed=1))
    large = bootstrap_ci(_bernoulli(1600, 0.5, seed=1))
    # width scales as 1 / sqrt(n): 1600 queries give an interval about 8x narrower than 25
    assert (large.high - large.low) * 4 < small.high - small.low


def test_reproducible_with_the_seed() -> None:
    values = _bernoulli(50, 0.3, seed=2)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values.numpy(), seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_degenerate_cases() -> None:
    assert bootstrap_ci([0.25]) == Interval(0.25, 0.25, 0.25, 1)  # one query: a point
    assert bootstrap_ci([0.7] * 10).to_dict() == {
        "mean": 0.7,
        "low": 0.7,
        "high": 0.7,
        "n": 10,
        "confidence": 0.95,
    }
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(torch.tensor([]))
    with pytest.raises(ValueError, match="not finite"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([0.1, 0.2], confidence=1.0)


def test_paired_identical_inputs_give_zero_and_not_distinguishable() -> None:
    a = _bernoulli(100, 0.4, seed=3)
    delta = paired_bootstrap_delta(a, a.clone())
    assert (delta.mean, delta.low, delta.high, delta.n) == (0.0, 0.0, 0.0, 100)
    assert verdict(delta) == "not distinguishable"


def test_paired_clear_shift_is_better_and_reverse_is_worse() -> None:
    a = _bernoulli(200, 0.4, seed=4)
    b = a + 0.1 * _bernoulli(200, 0.8, seed=5)  # b never lower, higher on ~80% of queries: +0.08 on average
    delta = paired_bootstrap_delta(a, b)
    assert delta.low > 0 and delta.low < delta.mean < delta.high
    assert abs(delta.mean - float((b - a).mean())) < 1e-12
    assert verdict(delta) == "better"
    assert verdict(paired_bootstrap_delta(b, a)) == "worse"
    assert verdict(delta, higher_is_better=False) == "worse"  # e.g. red-flag rate went up


def test_paired_is_tighter_than_unpaired_and_checks_lengths() -> None:
    base = torch.rand(
        300, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )  # per-query difficulty
    a, b = base, base + 0.01
    delta = paired_bootstrap_delta(a, b)
    assert delta.high - delta.low < 1e-9  # the difficulty cancels: every difference is 0.01
    unpaired = bootstrap_ci(b)  # uniform [0, 1]: half-width about 1.96 * 0.289 / sqrt(300) = 0.033
    assert unpaired.high - unpaired.low > 0.05
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap_delta(a, b[:10])


def test_verdict_golden() -> None:
    assert verdict(Interval(0.05, 0.01, 0.09, 50)) == "better"
    assert verdict(Interval(-0.05, -0.09, -0.01, 50)) == "worse"
    assert verdict(Interval(0.05, 0.0, 0.09, 50)) == "not distinguishable"  # touching 0 is not excluding it


def test_bootstrap_metrics_dict() -> None:
    per_query = {"t2i/recall@1": _bernoulli(40, 0.5, seed=7), "t2i/mrr": _bernoulli(40, 0.6, seed=8)}
    out = bootstrap_metrics(per_query, n_resamples=200)
    assert list(out) == ["t2i/recall@1", "t2i/mrr"]
    assert out["t2i/mrr"] == bootstrap_ci(per_query["t2i/mrr"], n_resamples=200)


def test_unpaired_bootstrap_golden_values() -> None:
    # Constant samples: every resample mean is the constant, so the interval is the point 1.0 - 0.25.
    iv = unpaired_bootstrap_delta([0.25] * 7, [1.0] * 5)
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.75, 0.75, 0.75, 5)
    # Naive reference: the same seed and draws, one resample at a time.
    a, b = np.array([0.0, 1.0, 0.5, 0.2]), np.array([1.0, 0.0, 0.3])
    iv = unpaired_bootstrap_delta(a, b, n_resamples=50, seed=3)
    rng = np.random.Generator(np.random.PCG64(3))
    ia, ib = rng.integers(0, 4, size=(50, 4)), rng.integers(0, 3, size=(50, 3))
    naive = [b[ib[r]].mean() - a[ia[r]].mean() for r in range(50)]
    assert (iv.low, iv.high) == tuple(np.quantile(naive, [0.025, 0.975]))


def test_many_blocks_draw_one_stream_like_a_single_draw() -> None:
    # 8,000 queries: resamples are drawn in blocks of 4,000,000 // 8,000 = 500 rows, so 1,100 resamples
    # take three blocks (500, 500, 100). One PCG64 stream runs through them: the interval equals the one
    # from drawing all 1,100 x 8,000 indices at once (a block that reseeded would repeat resamples).
    n, resamples = 8_000, 1_100
    values = np.random.Generator(np.random.PCG64(21)).random(n)
    ci = bootstrap_ci(values, n_resamples=resamples, seed=5)
    idx = np.random.Generator(np.random.PCG64(5)).integers(0, n, size=(resamples, n))
    means = values[idx].mean(axis=1)
    assert ci == Interval(float(values.mean()), *map(float, np.quantile(means, [0.025, 0.975])), n, 0.95)
    # and the paired delta, which resamples b - a the same way
    other = values + np.random.Generator(np.random.PCG64(22)).normal(0.0, 0.1, n)
    delta = paired_bootstrap_delta(values, other, n_resamples=resamples, seed=5)
    diff_means = (other - values)[idx].mean(axis=1)
    assert (delta.low, delta.high) == tuple(np.quantile(diff_means, [0.025, 0.975]))


def test_unpaired_blocks_continue_one_stream() -> None:
    # max(4,000, 3,000) = 4,000 queries: blocks of 2,000,000 // 4,000 = 500 resamples, each drawing a's
    # indices then b's from the same stream; 1,200 resamples take three blocks (500, 500, 200).
    gen = np.random.Generator(np.random.PCG64(23))
    a, b = gen.random(4_000), gen.random(3_000) + 0.01
    iv = unpaired_bootstrap_delta(a, b, n_resamples=1_200, seed=9)
    rng = np.random.Generator(np.random.PCG64(9))
    diffs = []
    for rows in (500, 500, 200):
        ia = rng.integers(0, a.size, size=(rows, a.size))
        ib = rng.integers(0, b.size, size=(rows, b.size))
        diffs.extend(b[ib].mean(axis=1) - a[ia].mean(axis=1))
    # equal up to summation order (the library's means see other memory layouts)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), rel=1e-12, abs=0)
    assert (iv.mean, iv.n) == (float(b.mean() - a.mean()), 3_000)


def test_errors_name_the_function_the_argument_and_the_index() -> None:
    nan = float("nan")
    cases = [
        (lambda: bootstrap_ci([0.1, 0.2, nan]), "bootstrap_ci: values[2] is not finite"),
        (lambda: bootstrap_ci([0.1], n_resamples=0), "bootstrap_ci: n_resamples must be >= 1, got 0"),
        (lambda: paired_bootstrap_delta([nan], [0.1]), "paired_bootstrap_delta: values_a[0] is not finite"),
        (
            lambda: paired_bootstrap_delta([0.1], [0.2, nan]),
            "paired_bootstrap_delta: values_b[1] is not finite",
        ),
        (
            lambda: paired_bootstrap_delta([0.1], [0.2], confidence=0.0),
            "paired_bootstrap_delta: confidence must",
        ),
        (
            lambda: unpaired_bootstrap_delta([nan], [0.1]),
            "unpaired_bootstrap_delta: values_a[0] is not finite",
        ),
        (
            lambda: unpaired_bootstrap_delta([0.1], [nan]),
            "unpaired_bootstrap_delta: values_b[0] is not finite",
        ),
        (
            lambda: unpaired_bootstrap_delta([0.1], [0.2], n_resamples=0),
            "unpaired_bootstrap_delta: n_resamples",
        ),
        (lambda: bootstrap_metrics({"t2i/mrr": [nan]}), "bootstrap_metrics: t2i/mrr[0] is not finite"),
        (lambda: bootstrap_metrics({"t2i/mrr": [0.1]}, n_resamples=0), "bootstrap_metrics: n_resamples"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(ValueError, match="a paired comparison needs the same queries in the same order"):
        paired_bootstrap_delta([0.1], [0.2, 0.3])


def test_edges_of_the_arguments() -> None:
    # one resample is allowed; so is a confidence just inside (0, 1)
    assert bootstrap_ci([0.0, 1.0], n_resamples=1, seed=0).n == 2
    assert bootstrap_ci([0.0, 1.0], confidence=1e-9).confidence == 1e-9
    # two queries are not one: 200 resamples of {0, 1} include all-0 and all-1 ones (1 in 4 each)
    assert bootstrap_ci([0.0, 1.0], n_resamples=200) == Interval(0.5, 0.0, 1.0, 2)
    # the confidence asked for is reported, also for the point interval and the unpaired delta
    assert bootstrap_ci([0.5], confidence=0.9) == Interval(0.5, 0.5, 0.5, 1, 0.9)
    assert unpaired_bootstrap_delta([0.1, 0.3], [0.2], confidence=0.8).confidence == 0.8
    # per-query values that still carry gradients are read too
    assert bootstrap_ci(torch.tensor([0.25, 0.75], requires_grad=True), n_resamples=10).mean == 0.5


def test_documented_defaults() -> None:
    # continuous values: with 0/1 ones, other seeds or counts can land on the same quantiles
    gen = torch.Generator().manual_seed(9)
    a, b = (
        torch.rand(30, generator=gen, dtype=torch.float64),
        torch.rand(30, generator=gen, dtype=torch.float64),
    )
    assert paired_bootstrap_delta(a, b) == paired_bootstrap_delta(a, b, n_resamples=1000, seed=0)
    assert unpaired_bootstrap_delta(a, b) == unpaired_bootstrap_delta(a, b, n_resamples=1000, seed=0)
    assert bootstrap_metrics({"m": a})["m"] == bootstrap_ci(a, n_resamples=1000, seed=0)
    assert bootstrap_ci(a) == bootstrap_ci(a, n_resamples=1000, confidence=0.95, seed=0)
    assert bootstrap_ci(a) != bootstrap_ci(a, n_resamples=1001)  # so the comparisons above can fail
    assert bootstrap_ci(a) != bootstrap_ci(a, seed=1)


def test_verdict_for_lower_is_better_metrics() -> None:
    assert verdict(Interval(-0.05, -0.09, -0.01, 50), higher_is_better=False) == "better"
    assert verdict(Interval(0.05, 0.01, 0.09, 50), higher_is_better=False) == "worse"
    assert verdict(Interval(0.0, -0.01, 0.01, 50), higher_is_better=False) == "not distinguishable"


def test_format_interval() -> None:
    assert format_interval({"mean": 0.8, "low": 0.7, "high": 0.95}) == "0.800 [0.700, 0.950]"
    assert format_interval({"mean": 0.8, "low": 0.7, "high": 0.95}, digits=1) == "0.8 [0.7, 0.9]"
    assert format_interval({"mean": 0.8125, "low": None, "high": None}) == "0.812"
    assert format_interval(Interval(0.5, 0.25, 0.75, 4).to_dict(), 2) == "0.50 [0.25, 0.75]"
