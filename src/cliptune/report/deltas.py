"""One metric of two runs, tested against noise: deltas, verdicts and the words that go with them.

Seed 001 reads "val loss 0.07816 vs 0.1148, 32% better" as a win. A relative change means something
only next to a verdict: here each delta of an eval metric gets a paired bootstrap interval over the same
queries (paired by query id) and a verdict, better / worse only when the whole interval is on one side of
zero, and :func:`relative_change` says "better" or "worse" only when the verdict does. Runs evaluated on
different query sets are compared unpaired (:func:`cliptune.ranking.bootstrap.unpaired_bootstrap_delta`)
and flagged; losses of different formulas (InfoNCE vs SigLIP, another temperature) get no verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cliptune.ranking.bootstrap import Interval, paired_bootstrap_delta, unpaired_bootstrap_delta, verdict

__all__ = ["Delta", "VERDICTS", "higher_is_better", "loss_formula", "metric_deltas", "relative_change"]

VERDICTS = ("better", "worse", "not distinguishable", "no verdict")
_LOWER_IS_BETTER = ("loss", "red_flag_rate")
# Loss fields that describe the run, not the formula: they may differ between comparable losses.
_LOSS_BOOKKEEPING = {"temperature_source", "n_triplets", "reason", "batch_size"}


def higher_is_better(metric: str) -> bool:
    """False for losses and red-flag rates (any key naming them), True for every other metric."""
    return not any(word in metric for word in _LOWER_IS_BETTER)


@dataclass(frozen=True)
class Delta:
    """One metric of a candidate against the baseline.

    Attributes:
        split: Eval split (``test``, ``shared-heldout``).
        metric: Metric key (``t2i/mrr``).
        baseline, candidate: The two means.
        interval: Bootstrap interval of ``candidate - baseline``, or None without per-query values.
        paired: Whether the interval pairs the same queries.
        verdict: ``better`` / ``worse`` / ``not distinguishable`` / ``no verdict``.
        note: Why a verdict is missing or unpaired.
    """

    split: str
    metric: str
    baseline: float
    candidate: float
    interval: Interval | None
    paired: bool
    verdict: str
    note: str = ""

    @property
    def higher_is_better(self) -> bool:
        """False for losses and red-flag rates."""
        return higher_is_better(self.metric)

    @property
    def counted(self) -> bool:
        """False on the train split: the data the models were fitted on says nothing about new data."""
        return self.split != "train"

    @property
    def relative(self) -> str:
        """The relative change in the words its verdict allows (:func:`relative_change`)."""
        return relative_change(self.baseline, self.candidate, self.verdict)


def relative_change(baseline: float, candidate: float, verdict: str) -> str:
    """Seed-001 wording, allowed only by a verdict: ``"32% better"`` needs the verdict ``better``.

    A difference the interval cannot tell from noise reads ``"not distinguishable"``, never as an
    improvement; without a verdict (training-log values) the change is neutral: ``"32% lower"``.

    Args:
        baseline, candidate: The two values.
        verdict: The delta's verdict (:data:`VERDICTS`); it alone decides "better" or "worse", so a
            lower-is-better metric needs no direction here.

    Returns:
        ``"32% better"`` / ``"4.1% worse"`` / ``"not distinguishable"`` / ``"32% lower"`` / ``"same"`` /
        ``"n/a"`` (a neutral change from a baseline of 0).

    Example:
        >>> relative_change(0.1148, 0.07816, "better")  # a loss: (0.1148 - 0.07816) / 0.1148 = 31.9% lower
        '32% better'
        >>> relative_change(0.1148, 0.07816, "not distinguishable")
        'not distinguishable'
        >>> relative_change(0.1148, 0.07816, "no verdict")
        '32% lower'
    """
    if verdict == "not distinguishable":
        return verdict
    if candidate == baseline:
        return "same"
    if baseline == 0:
        return "n/a"
    pct = 100 * abs(candidate - baseline) / abs(baseline)
    number = f"{pct:.0f}" if pct >= 10 else f"{pct:.2g}"
    if verdict in ("better", "worse"):
        return f"{number}% {verdict}"
    return f"{number}% {'higher' if candidate > baseline else 'lower'}"


def _per_query(ev: dict[str, Any], metric: str) -> tuple[list[str], list[float]] | None:
    group, _, name = metric.partition("/")
    block = ev.get("per_query", {}).get(group, {})
    values = block.get("values", {})
    # "t2i/mrr" -> per_query.t2i.values.mrr; a bare "loss" -> per_query.loss.values (a list)
    values = values.get(name) if isinstance(values, dict) else (values if not name else None)
    ids = block.get("query_ids")
    if values is None or ids is None or len(ids) != len(values):
        return None
    return [str(i) for i in ids], [float(v) for v in values]


def loss_formula(ev: dict[str, Any]) -> dict[str, Any]:
    """The fields of an eval JSON's ``loss`` block that define its formula (name, temperature, margin...)."""
    loss = ev.get("loss")
    return {k: v for k, v in loss.items() if k not in _LOSS_BOOKKEEPING} if isinstance(loss, dict) else {}


def metric_deltas(
    base: dict[str, Any], cand: dict[str, Any], n_resamples: int | None = None, seed: int | None = None
) -> tuple[list[Delta], list[str]]:
    """Deltas of every metric two eval JSONs share, with intervals and verdicts.

    Args:
        base: The baseline's ``eval/<split>.json``.
        cand: The candidate's ``eval/<split>.json`` (same split).
        n_resamples: Bootstrap resamples (default: the baseline eval's ``bootstrap``, else 1000).
        seed: Bootstrap seed (default: the baseline eval's ``seed``, else 0).

    Returns:
        ``(deltas, flags)``: one :class:`Delta` per shared metric; ``flags`` are sentences about query
        sets that differ (those deltas are unpaired), or losses of different formulas (no verdict).

    Example:
        >>> deltas, flags = metric_deltas(json.load(open("a/eval/test.json")), json.load(open("b/eval/test.json")))  # doctest: +SKIP
    """
    n_resamples = int(n_resamples or base.get("bootstrap") or 1000)
    seed = int(seed if seed is not None else base.get("seed", 0))
    conf = float(base.get("confidence", 0.95))
    split = str(base.get("split", cand.get("split", "")))
    deltas, flags = [], []
    flagged: set[str] = set()
    cand_metrics = cand.get("metrics", {})
    fa, fb = loss_formula(base), loss_formula(cand)
    for metric, m in base.get("metrics", {}).items():
        if metric not in cand_metrics:
            continue
        a_mean, b_mean = float(m["mean"]), float(cand_metrics[metric]["mean"])
        if metric == "loss" and fa and fb and fa != fb:
            flags.append(f"{split} loss: different formulas ({_formula_text(fa)} vs {_formula_text(fb)})")
            note = "different loss formulas: not comparable"
            deltas.append(Delta(split, metric, a_mean, b_mean, None, False, "no verdict", note))
            continue
        pa, pb = _per_query(base, metric), _per_query(cand, metric)
        higher = higher_is_better(metric)
        if pa is None or pb is None:
            deltas.append(
                Delta(split, metric, a_mean, b_mean, None, False, "no verdict", "no per-query values")
            )
            continue
        (ids_a, va), (ids_b, vb) = pa, pb
        group = metric.split("/")[0]
        if sorted(ids_a) == sorted(ids_b) and len(set(ids_a)) == len(ids_a):
            order = {q: i for i, q in enumerate(ids_b)}
            vb_aligned = [vb[order[q]] for q in ids_a]
            iv = paired_bootstrap_delta(va, vb_aligned, n_resamples, conf, seed)
            deltas.append(Delta(split, metric, a_mean, b_mean, iv, True, verdict(iv, higher)))
            continue
        if group not in flagged:
            flagged.add(group)
            shared = len(set(ids_a) & set(ids_b))
            flags.append(
                f"{split} {group}: the runs were evaluated on different queries ({len(ids_a)} vs {len(ids_b)}, "
                f"{shared} shared): deltas are unpaired and mix model and data differences"
            )
        iv = unpaired_bootstrap_delta(va, vb, n_resamples, conf, seed)
        note = "different query sets: unpaired bootstrap"
        deltas.append(Delta(split, metric, a_mean, b_mean, iv, False, verdict(iv, higher), note))
    return deltas, flags


def _formula_text(formula: dict[str, Any]) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in formula.items() if k != "name")
    return str(formula.get("name")) + (f" ({rest})" if rest else "")
