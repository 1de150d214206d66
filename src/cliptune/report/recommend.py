"""Which run to pick: verdicts counted on held-out data only, and the best run by one primary metric.

After ``eval --all-splits`` a comparison holds train rows too; a model that memorised its training data
wins every train metric, so counting them ("better on 34 metrics", all train rows) recommends the wrong
run. Here the verdict summary counts only held-out splits (val, test, and the groups held out from every
run), shows train rows as not counted, and the best run is named by one primary metric
(:data:`PRIMARY_METRIC`) on one held-out split (:data:`HELDOUT_PREFERENCE`), with its interval, or the
summary says that no run is distinguishable from the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cliptune.report.deltas import Delta, metric_deltas
from cliptune.report.rundata import RunData
from cliptune.report.splits_analysis import SHARED_SPLIT

__all__ = [
    "HELDOUT_PREFERENCE",
    "PRIMARY_METRIC",
    "BestRun",
    "best_run",
    "heldout_split",
    "loss_kind",
    "verdict_summary",
]

PRIMARY_METRIC = {"retrieval": "t2i/mrr", "siamese": "triplet/accuracy"}
"""The metric a run is chosen by, per task: text-to-image MRR (the search users run), fused triplet accuracy."""

HELDOUT_PREFERENCE = (SHARED_SPLIT, "test", "val")
"""Held-out splits in the order the best run is chosen on: the groups no run trained on (the only like-for-
like data when the runs' splits differ), then test (never watched by training), then val."""


def heldout_split(base: RunData, others: list[RunData]) -> str | None:
    """The first split of :data:`HELDOUT_PREFERENCE` the baseline and every other run were evaluated on
    (else the first the baseline shares with any of them); None when they share no held-out split."""
    for require_all in (True, False):
        for split in HELDOUT_PREFERENCE:
            shared = [split in r.evals for r in others]
            if split in base.evals and (all(shared) if require_all else any(shared)):
                return split
    return None


def loss_kind(run: RunData) -> str:
    """The loss a run trained with (``loss.name`` of config.yaml); for an evaluation folder, its eval's."""
    if run.trained:
        return str(run.config.get("loss", {}).get("name") or "?")
    names = {
        str(ev.get("loss", {}).get("name")) for ev in run.evals.values() if ev.get("loss", {}).get("name")
    }
    return names.pop() if len(names) == 1 else "?"


def verdict_summary(base: RunData, cand: RunData, deltas: list[Delta]) -> dict[str, Any]:
    """Counts of verdicts on held-out splits, and train-split counts kept apart (shown, never counted).

    Held-out means val and test, or only ``shared-heldout`` when the comparison has it (runs trained on
    different splits were validated on different data; only those groups are common to every run).

    Returns:
        ``{"splits": held-out splits counted, "better": ["val t2i/mrr", ...], "worse": [...],
        "not distinguishable": int, "train": {"better": int, "worse": int}, "sentence": str}``.
    """
    # With the groups no run trained on, only they compare like for like: val/test are shown, not counted.
    like_for_like = any(d.split == SHARED_SPLIT for d in deltas)
    counted = [d for d in deltas if d.counted and (d.split == SHARED_SPLIT or not like_for_like)]
    better = [f"{d.split} {d.metric}" for d in counted if d.verdict == "better"]
    worse = [f"{d.split} {d.metric}" for d in counted if d.verdict == "worse"]
    same = sum(d.verdict == "not distinguishable" for d in counted)
    splits = list(dict.fromkeys(d.split for d in counted))
    train = [d for d in deltas if not d.counted]
    train_counts = {w: sum(d.verdict == w for d in train) for w in ("better", "worse")}
    if not splits:
        sentence = f"{cand.name} vs {base.name}: no held-out split evaluated for both; no verdicts."
    else:
        sentence = (
            f"{cand.name} vs {base.name} on {', '.join(splits)}: better on {len(better)} metric(s)"
            + _some(better)
            + f", worse on {len(worse)}"
            + _some(worse)
            + f", not distinguishable from noise on {same}."
        )
    if like_for_like and any(d.counted and d.split != SHARED_SPLIT for d in deltas):
        sentence += f" Val/test rows are shown but not counted: only {SHARED_SPLIT} holds the same data for every run."
    if train:
        sentence += (
            f" Train rows (the data the models were fitted on) are shown but not counted "
            f"(there: better on {train_counts['better']}, worse on {train_counts['worse']})."
        )
    return {
        "splits": splits,
        "better": better,
        "worse": worse,
        "not distinguishable": same,
        "train": train_counts,
        "sentence": sentence,
    }


def _some(items: list[str]) -> str:
    return f" ({', '.join(items[:4])}{'...' if len(items) > 4 else ''})" if items else ""


@dataclass
class BestRun:
    """The run to pick, by the primary metric on one held-out split.

    Attributes:
        split, metric: Where and by what it was chosen (None when no held-out split is shared).
        name: The best run's name, or None when no run is distinguishable from the baseline.
        mean, low, high: The best run's value of ``metric`` on ``split`` and its interval.
        delta: The best run's delta against the baseline (None when the baseline is best).
        sentence: What the console and the reports print.
    """

    split: str | None
    metric: str | None
    name: str | None
    sentence: str
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    delta: Delta | None = None
    ties: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for compare.json."""
        iv = self.delta.interval if self.delta else None
        return {
            "split": self.split,
            "metric": self.metric,
            "run": self.name,
            "mean": self.mean,
            "interval": None if self.low is None else [self.low, self.high],
            "delta_vs_baseline": iv.to_dict() if iv else None,
            "paired": self.delta.paired if self.delta else None,
            "not_distinguishable_from": self.ties,
            "sentence": self.sentence,
        }


def best_run(base: RunData, others: list[RunData], deltas: dict[str, dict[str, list[Delta]]]) -> BestRun:
    """The best run by :data:`PRIMARY_METRIC` on :func:`heldout_split`, or why none can be named.

    A candidate is best only when its delta against the baseline is ``better`` (its interval above zero);
    among several such, the highest mean, tested against each runner-up (``ties`` lists those it cannot be
    told from). The baseline is best when every candidate is ``worse``. Otherwise no run is distinguishable
    from the baseline, and the sentence says so.

    Args:
        base: The baseline.
        others: The candidates.
        deltas: candidate name -> split -> its deltas against the baseline.
    """
    split = heldout_split(base, others)
    if split is None:
        text = "No held-out split (val/test) was evaluated for the baseline and a candidate: no run is named."
        return BestRun(None, None, None, text)
    metric = next(
        (
            m
            for m in (PRIMARY_METRIC.get(base.task), *PRIMARY_METRIC.values())
            if m in base.evals[split]["metrics"]
        ),
        None,
    )
    if metric is None:
        wanted = ", ".join(PRIMARY_METRIC.values())
        text = f"The baseline's {split} evaluation has no primary metric ({wanted}): no run is named."
        return BestRun(split, None, None, text)
    found = {
        c.name: d
        for c in others
        for d in deltas.get(c.name, {}).get(split, [])
        if d.metric == metric and d.verdict != "no verdict"
    }
    unpaired = any(not d.paired for d in found.values())
    caveat = (
        " (unpaired: the runs were evaluated on different queries, so model and data differences mix; "
        "compare them on the groups every run held out for a paired verdict)"
        if unpaired
        else ""
    )
    where = f"{metric} on {split}"
    better = sorted((n for n, d in found.items() if d.verdict == "better"), key=lambda n: -found[n].candidate)
    if better:
        name, d = better[0], found[better[0]]
        m = _summary_of(next(c for c in others if c.name == name), split, metric)
        ties = _ties(name, better[1:], others, split, metric)
        iv = d.interval  # a better verdict always has one
        delta = (
            f"{iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]" if iv else f"{d.candidate - d.baseline:+.4f}"
        )
        text = (
            f"Best run by {where}: {name}, {_value(m)}; {delta} vs the baseline {base.name}: better{caveat}."
        )
        if ties:
            text += f" It is not distinguishable from {', '.join(ties)}, also better than the baseline."
        return BestRun(split, metric, name, text, m.get("mean"), m.get("low"), m.get("high"), d, ties)
    m = _summary_of(base, split, metric)
    if found and all(d.verdict == "worse" for d in found.values()):
        text = (
            f"Best run by {where}: the baseline {base.name}, {_value(m)}; every other run is worse{caveat}."
        )
        return BestRun(split, metric, base.name, text, m.get("mean"), m.get("low"), m.get("high"))
    worse = [n for n, d in found.items() if d.verdict == "worse"]
    text = (
        f"No run is distinguishable from the baseline {base.name} by {where} ({_value(m)})"
        + (f"; worse: {', '.join(worse)}" if worse else "")
        + f"{caveat}."
    )
    return BestRun(split, metric, None, text)


def _summary_of(run: RunData, split: str, metric: str) -> dict[str, Any]:
    value: dict[str, Any] = run.evals[split]["metrics"].get(metric, {})
    return value


def _value(m: dict[str, Any]) -> str:
    if "low" in m and "high" in m:
        return f"{m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]"
    return f"{m.get('mean', float('nan')):.4f}"


def _ties(name: str, rest: list[str], others: list[RunData], split: str, metric: str) -> list[str]:
    by_name = {r.name: r for r in others}
    ties = []
    for other in rest:
        found, _ = metric_deltas(by_name[other].evals[split], by_name[name].evals[split])
        if any(d.metric == metric and d.verdict != "better" for d in found):
            ties.append(other)
    return ties
