"""Diagnostics of a training run by explicit rules, each finding carrying the numbers behind it.

The seed analyses (a train/val loss gap read as overfitting, "the scheduler cut the LR several times",
"text is harder than image", "t2i beats i2t") are written here as rules with documented thresholds, so
the same run always gets the same reading, and a reader can check every claim against its numbers.
Model-quality rules (modality, direction) read the best epoch (the kept model); training-dynamics rules
(gap, LR, under-training) read the last epoch. docs/reports.md lists every rule.

Example:
    >>> findings = diagnose(load_run("runs/art-siamese"))  # doctest: +SKIP
    >>> [(f.rule, f.severity) for f in findings][:2]  # doctest: +SKIP
    [('generalisation_gap', 'warning'), ('lr_schedule', 'info')]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from cliptune.data.split_health import judge_eval, suggest_split
from cliptune.ranking.bootstrap import Interval, paired_bootstrap_delta, verdict
from cliptune.report.rundata import RunData, watched_metric

__all__ = ["Finding", "diagnose"]

Severity = Literal["info", "warning"]

OVERFIT_LOSS_RATIO = 2.0
"""Final val loss / final train loss above this (and the difference above OVERFIT_MIN_DIFF): overfitting."""
OVERFIT_MIN_DIFF = 0.01
"""Smallest val - train loss difference that counts, so that 0.001 vs 0.003 is not called overfitting."""
VAL_LOSS_RISE = 0.05
"""Final val loss this much (relative) above its best while train loss kept falling: overfitting."""
ACCURACY_GAP = 0.05
"""Train minus held-out accuracy (triplet accuracy, recall@5) above this: overfitting."""
LR_CUTS_WARN = 3
"""The plateau scheduler cutting the LR this many times means the watched metric plateaued early and often."""
UNDERTRAINED_WINDOW = 3
"""Epochs at the end over which the watched metric is checked for still improving."""
UNDERTRAINED_GAIN = 0.01
"""Relative improvement of the watched metric over the last window above which the run is under-trained."""
MODALITY_RATIO = 3.0
"""Hardest / easiest modality loss (siamese: image, text, cross) above this: a weak modality."""
WIDE_INTERVAL = 0.2
"""A 95% interval wider than this (on a [0, 1] metric) is too wide to trust."""
MIN_QUERIES = 30
"""Fewer queries than this behind a metric: the interval itself is unreliable."""
WIDEST_SHOWN = 3
"""The interval-width finding names this many of the widest metrics (the rest are counted)."""

# Loss terms whose train/val ratio is not a loss (a learned temperature is logged beside the terms).
_NOT_LOSSES = {"temperature"}
_ACCURACY_KEYS = ("triplet/accuracy", "t2i/recall@5", "i2t/recall@5")


@dataclass(frozen=True)
class Finding:
    """One diagnostic: which rule, how serious, what it means, and the numbers it was computed from.

    Attributes:
        rule: Stable rule id (``generalisation_gap``, ``lr_schedule``, ... ``recommendation``).
        severity: ``warning`` when it asks for action, ``info`` when it states a fact.
        message: One or two sentences for a person, quoting the key numbers.
        numbers: The values behind the message (plain JSON types, unrounded).
    """

    rule: str
    severity: Severity
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)


def diagnose(run: RunData) -> list[Finding]:
    """Apply every rule to a run and derive recommendations from what fired.

    Args:
        run: From :func:`cliptune.report.rundata.load_run`.

    Returns:
        Findings in a fixed rule order; rules without the data they need (e.g. the modality rule on a
        retrieval run) return nothing. Recommendations (rule ``recommendation``) come last; a run where
        no warning fired gets none.
    """
    findings: list[Finding] = []
    for rule in (
        _generalisation_gap,
        _accuracy_gap,
        _lr_schedule,
        _stopping,
        _under_training,
        _modality_gap,
        _direction_gap,
        _interval_width,
        _split_health,
    ):
        findings.extend(rule(run))
    return findings + _recommendations(findings)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _trained(run: RunData) -> list[dict[str, Any]]:
    return [e for e in run.epochs if e["epoch"] > 0]


def _best(run: RunData) -> dict[str, Any]:
    return run.best_record


def _loss_terms(record: dict[str, Any]) -> list[str]:
    terms = []
    for key in record:
        name = key.removeprefix("train/")
        if (
            key.startswith("train/")
            and "/" not in name
            and name not in _NOT_LOSSES
            and f"val/{name}" in record
        ):
            terms.append(name)
    return terms


def _generalisation_gap(run: RunData) -> list[Finding]:
    trained = _trained(run)
    if not trained or "train/loss" not in trained[-1] or "val/loss" not in trained[-1]:
        return []
    last = trained[-1]
    train, val = float(last["train/loss"]), float(last["val/loss"])
    ratio = val / train if train > 0 else math.inf
    diff = val - train
    best = min(trained, key=lambda e: float(e.get("val/loss", math.inf)))
    val_best = float(best["val/loss"])
    rise = (val - val_best) / abs(val_best) if val_best != 0 else 0.0
    train_fell = float(last["train/loss"]) < float(best.get("train/loss", math.inf))
    gap = ratio > OVERFIT_LOSS_RATIO and diff > OVERFIT_MIN_DIFF
    rising = rise > VAL_LOSS_RISE and train_fell
    numbers = {
        "epoch": last["epoch"],
        "train_loss": train,
        "val_loss": val,
        "ratio": ratio,
        "diff": diff,
        "val_loss_best": val_best,
        "val_loss_best_epoch": best["epoch"],
        "val_loss_rise": rise,
    }
    parts = [
        f"final train loss {_fmt(train)} vs val loss {_fmt(val)} (val/train {_fmt(ratio)}x, "
        f"difference {_fmt(diff)}) at epoch {last['epoch']}"
    ]
    if rising:
        parts.append(
            f"val loss rose {rise:.1%} above its lowest ({_fmt(val_best)} at epoch {best['epoch']}) while "
            "train loss kept falling"
        )
    if gap or rising:
        return [Finding("generalisation_gap", "warning", "Overfitting: " + "; ".join(parts) + ".", numbers)]
    return [
        Finding("generalisation_gap", "info", "No overfitting by the loss rules: " + parts[0] + ".", numbers)
    ]


def _accuracy_gap(run: RunData) -> list[Finding]:
    out = []
    last = _trained(run)[-1] if _trained(run) else {}
    if "train/triplet/accuracy" in last and "val/triplet/accuracy" in last:
        out.append(
            _gap_finding(
                "triplet/accuracy",
                float(last["train/triplet/accuracy"]),
                float(last["val/triplet/accuracy"]),
                "val",
                f"training log, epoch {last['epoch']}",
            )
        )
    held_out = next((s for s in ("test", "val") if s in run.evals), None)
    if "train" in run.evals and held_out is not None:
        train_m, held_m = run.evals["train"].get("metrics", {}), run.evals[held_out].get("metrics", {})
        for key in _ACCURACY_KEYS:
            if key == "triplet/accuracy" and out:
                continue  # already read from the training log
            if key in train_m and key in held_m:
                finding = _gap_finding(
                    key,
                    float(train_m[key]["mean"]),
                    float(held_m[key]["mean"]),
                    held_out,
                    f"eval/train.json vs eval/{held_out}.json",
                )
                out.append(_with_gallery_note(finding, run, held_out))
    return out


def _gap_finding(metric: str, train: float, held: float, split: str, source: str) -> Finding:
    gap = train - held
    numbers = {"metric": metric, "train": train, split: held, "gap": gap, "source": source}
    text = f"{metric}: train {_fmt(train)} vs {split} {_fmt(held)} (gap {_fmt(gap)}; {source})"
    if gap > ACCURACY_GAP:
        return Finding("accuracy_gap", "warning", f"Overfitting by accuracy: {text}.", numbers)
    return Finding("accuracy_gap", "info", f"Accuracy gap within {ACCURACY_GAP}: {text}.", numbers)


def _with_gallery_note(finding: Finding, run: RunData, held_out: str) -> Finding:
    # Retrieval among more candidates is harder: recall on a large train gallery is not comparable as is.
    if finding.numbers["metric"].startswith("triplet/"):
        return finding
    n_train, n_held = run.evals["train"].get("n_rows"), run.evals[held_out].get("n_rows")
    if not n_train or not n_held or n_train == n_held:
        return finding
    note = (
        f" Retrieval metrics depend on the gallery size ({n_train} train rows vs {n_held} {held_out} rows): "
        "part of this gap is the gallery, not the model."
    )
    numbers = finding.numbers | {"n_rows_train": n_train, f"n_rows_{held_out}": n_held}
    return Finding(finding.rule, finding.severity, finding.message + note, numbers)


def _lr_cuts(run: RunData) -> list[int]:
    # Epoch records carry the LR used in that epoch; the scheduler steps after validation, so a lower LR in
    # epoch e+1 is a cut decided after epoch e. summary.lr_final shows a cut after the last epoch.
    trained = _trained(run)
    lrs = [float(e["lr"]) for e in trained if "lr" in e]
    if run.summary.get("lr_final") is not None and lrs:
        lrs.append(float(run.summary["lr_final"]))
    cut_epochs = [int(e["epoch"]) for e in trained if "lr" in e]
    return [cut_epochs[i] for i in range(len(lrs) - 1) if lrs[i + 1] < lrs[i] * (1 - 1e-9)]


def _lr_schedule(run: RunData) -> list[Finding]:
    train_cfg = run.config.get("train", {})
    initial = float(train_cfg.get("lr") or run.epochs[0].get("lr", math.nan))
    trained = _trained(run)
    if not trained:
        return []
    final = float(run.summary.get("lr_final") or trained[-1].get("lr", math.nan))
    scheduler = train_cfg.get("scheduler", "plateau")
    numbers: dict[str, Any] = {
        "scheduler": scheduler,
        "lr_initial": initial,
        "lr_final": final,
        "lr_ratio": final / initial if initial else math.nan,
    }
    if scheduler != "plateau":
        msg = f"{scheduler} schedule: LR {_fmt(initial)} -> {_fmt(final)}."
        return [Finding("lr_schedule", "info", msg, numbers)]
    cuts = _lr_cuts(run)
    min_lr = float(train_cfg.get("plateau", {}).get("min_lr", 0.0))
    numbers |= {"cuts": len(cuts), "cut_after_epochs": cuts, "min_lr": min_lr}
    if "lr_reductions" in run.summary and run.summary["lr_reductions"] != len(cuts):
        numbers["summary_lr_reductions"] = run.summary["lr_reductions"]
    where = f" (after epoch{'s' if len(cuts) > 1 else ''} {', '.join(map(str, cuts))})" if cuts else ""
    msg = (
        f"The plateau scheduler cut the LR {len(cuts)} time{'s' if len(cuts) != 1 else ''}{where}: "
        f"{_fmt(initial)} -> {_fmt(final)} ({_fmt(numbers['lr_ratio'])}x the initial LR)."
        if cuts
        else f"The plateau scheduler never cut the LR ({_fmt(initial)} throughout)."
    )
    at_floor = bool(cuts) and final <= min_lr * (1 + 1e-9)
    if at_floor:
        msg += f" It reached plateau.min_lr ({_fmt(min_lr)}): later epochs barely moved the weights."
    severity: Severity = "warning" if len(cuts) >= LR_CUTS_WARN or at_floor else "info"
    return [Finding("lr_schedule", severity, msg, numbers)]


def _stopping(run: RunData) -> list[Finding]:
    if not run.summary:
        return [
            Finding(
                "stopping",
                "warning",
                "No summary.json: training did not finish (or is running).",
                {"epochs_logged": len(run.epochs) - 1},
            )
        ]
    best_epoch, trained_epochs = run.best_epoch, run.epochs_trained
    reason = str(run.summary.get("stop_reason") or "unknown")
    metric, mode = watched_metric(run)
    numbers = {
        "stop_reason": reason,
        "epochs_trained": trained_epochs,
        "best_epoch": best_epoch,
        "watched_metric": metric,
        "mode": mode,
    }
    by = (
        f"by {metric} ({mode})"
        if run.config.get("train", {}).get("early_stopping")
        else "(the last: no early stopping)"
    )
    msg = f"Trained {trained_epochs} epoch(s); stopped by: {reason}. Best epoch {best_epoch} {by}."
    if not any(metric in e for e in run.epochs):  # trained without validation: nothing was watched
        numbers["watched_metric"] = None
        msg = (
            f"Trained {trained_epochs} epoch(s); stopped by: {reason}. No validation ({metric} was never "
            f"logged): the kept model is epoch {best_epoch}."
        )
    if run.untrained_best:
        msg += (
            " The untrained baseline (epoch 0) was never beaten: training did not help, and model/ holds "
            "the untrained weights."
        )
        return [Finding("stopping", "warning", msg, numbers)]
    return [Finding("stopping", "info", msg, numbers)]


def _under_training(run: RunData) -> list[Finding]:
    metric, mode = watched_metric(run)
    series = [(e["epoch"], float(e[metric])) for e in run.epochs if metric in e]
    if len(series) < 3:
        return []
    sign = 1.0 if mode == "max" else -1.0
    end_epoch, end = series[-1]
    start_epoch, start = series[max(0, len(series) - 1 - UNDERTRAINED_WINDOW)]
    gain = sign * (end - start) / abs(start) if start != 0 else 0.0
    peak_epoch = max(series, key=lambda s: sign * s[1])[0]  # of this metric, not the kept model's epoch
    early = str(run.summary.get("stop_reason", "")).startswith("early stopping")
    numbers = {
        "metric": metric,
        "mode": mode,
        "window": end_epoch - start_epoch,
        "from_epoch": start_epoch,
        "from": start,
        "to": end,
        "relative_gain": gain,
        "peak_epoch": peak_epoch,
    }
    if peak_epoch == end_epoch and gain > UNDERTRAINED_GAIN and not early:
        msg = (
            f"Under-trained: {metric} still improving at the end, {_fmt(start)} (epoch {start_epoch}) -> "
            f"{_fmt(end)} (epoch {end_epoch}), {gain:.1%} better over the last {end_epoch - start_epoch} epochs."
        )
        return [Finding("under_training", "warning", msg, numbers)]
    msg = (
        f"{metric} is no longer improving: {gain:+.1%} over the last {end_epoch - start_epoch} epochs "
        f"(its {'highest' if mode == 'max' else 'lowest'} value at epoch {peak_epoch})."
    )
    return [Finding("under_training", "info", msg, numbers)]


def _modality_gap(run: RunData) -> list[Finding]:
    best = _best(run)
    losses = {m: float(best[f"val/{m}"]) for m in ("image", "text", "cross") if f"val/{m}" in best}
    if run.task != "siamese" or len(losses) < 2:
        return []
    hardest = max(losses, key=losses.__getitem__)
    easiest = min(losses, key=losses.__getitem__)
    ratio = losses[hardest] / losses[easiest] if losses[easiest] > 0 else math.inf
    accs = {
        m: float(best[f"val/triplet/accuracy/{m}"]) for m in losses if f"val/triplet/accuracy/{m}" in best
    }
    numbers = {
        "epoch": best["epoch"],
        "losses": losses,
        "accuracies": accs,
        "hardest": hardest,
        "easiest": easiest,
        "ratio": ratio,
    }
    listing = ", ".join(f"{m} {_fmt(v)}" for m, v in losses.items())
    msg = (
        f"Val losses by modality at epoch {best['epoch']}: {listing}. {hardest.capitalize()} is the hardest, "
        f"{_fmt(ratio)}x the {easiest} loss."
    )
    return [Finding("modality_gap", "warning" if ratio >= MODALITY_RATIO else "info", msg, numbers)]


def _direction_keys(run: RunData) -> tuple[str, str]:
    # Siamese runs log i2t / t2i as loss terms; their direction metric is the cross-modal triplet accuracy.
    if run.task == "siamese":
        return "triplet/accuracy/t2i", "triplet/accuracy/i2t"
    return "t2i/mrr", "i2t/mrr"


def _direction_gap(run: RunData) -> list[Finding]:
    t2i_key, i2t_key = _direction_keys(run)
    split = next((s for s in ("test", "val") if s in run.evals), None)
    metrics = run.evals[split].get("metrics", {}) if split else {}
    if split and t2i_key in metrics and i2t_key in metrics:
        return [_direction_from_eval(run, split, t2i_key, i2t_key)]
    best = _best(run)
    if f"val/{t2i_key}" not in best or f"val/{i2t_key}" not in best:
        return []
    t2i, i2t = float(best[f"val/{t2i_key}"]), float(best[f"val/{i2t_key}"])
    stronger = "t2i" if t2i > i2t else "i2t" if i2t > t2i else "neither"
    numbers = {
        "metric": t2i_key.split("/")[-1] if run.task != "siamese" else "triplet/accuracy",
        "t2i": t2i,
        "i2t": i2t,
        "diff": t2i - i2t,
        "source": f"training log, epoch {best['epoch']}",
        "verdict": "no interval",
    }
    msg = (
        f"t2i {_fmt(t2i)} vs i2t {_fmt(i2t)} ({t2i_key.removeprefix('t2i/')}, val, epoch {best['epoch']}): "
        f"{stronger} is higher, but the training log has no intervals: run `cliptune eval` to tell "
        "whether it is more than noise."
    )
    return [Finding("direction_gap", "info", msg, numbers)]


def _direction_from_eval(run: RunData, split: str, t2i_key: str, i2t_key: str) -> Finding:
    ev = run.evals[split]
    t2i, i2t = ev["metrics"][t2i_key], ev["metrics"][i2t_key]
    numbers: dict[str, Any] = {
        "metric": t2i_key,
        "split": split,
        "t2i": t2i["mean"],
        "i2t": i2t["mean"],
        "diff": t2i["mean"] - i2t["mean"],
        "t2i_interval": [t2i["low"], t2i["high"]],
        "i2t_interval": [i2t["low"], i2t["high"]],
    }
    triplet = ev.get("per_query", {}).get("triplet", {}).get("values", {})
    a, b = triplet.get(i2t_key.removeprefix("triplet/")), triplet.get(t2i_key.removeprefix("triplet/"))
    if a is not None and b is not None and len(a) == len(b) and len(a) > 0:
        # The same triplets scored both ways: a paired comparison is valid and much tighter.
        delta: Interval = paired_bootstrap_delta(
            a, b, n_resamples=int(ev.get("bootstrap", 1000)), seed=int(ev.get("seed", 0))
        )
        word = verdict(delta)
        call = {"better": "t2i is stronger", "worse": "i2t is stronger"}.get(word, "not distinguishable")
        numbers |= {"method": "paired bootstrap", "delta_interval": [delta.low, delta.high], "verdict": call}
        how = (
            f"paired bootstrap of t2i - i2t over {delta.n} triplets: [{_fmt(delta.low)}, {_fmt(delta.high)}]"
        )
    else:
        # Different query sets (texts vs images): only the two intervals can be set side by side.
        overlap = t2i["low"] <= i2t["high"] and i2t["low"] <= t2i["high"]
        call = (
            "not distinguishable"
            if overlap
            else ("t2i is stronger" if t2i["mean"] > i2t["mean"] else "i2t is stronger")
        )
        numbers |= {"method": "interval overlap", "verdict": call}
        how = "the 95% intervals " + ("overlap" if overlap else "do not overlap")
    msg = (
        f"t2i {_fmt(t2i['mean'])} [{_fmt(t2i['low'])}, {_fmt(t2i['high'])}] vs i2t {_fmt(i2t['mean'])} "
        f"[{_fmt(i2t['low'])}, {_fmt(i2t['high'])}] ({t2i_key.removeprefix('t2i/')}, {split}): {call} ({how})."
    )
    return Finding("direction_gap", "info", msg, numbers)


def _interval_width(run: RunData) -> list[Finding]:
    out = []
    for split, ev in run.evals.items():
        metrics = ev.get("metrics", {})
        wide = {}
        for key, m in metrics.items():
            width = float(m["high"]) - float(m["low"])
            if width > WIDE_INTERVAL or int(m.get("n", 0)) < MIN_QUERIES:
                wide[key] = {"width": width, "n": int(m.get("n", 0))}
        if not wide:
            continue
        # a sentence a person reads: how many, the widest few, and the query counts; the numbers keep
        # the widest metrics structured (every metric's interval is in eval/<split>.json)
        ranked = sorted(wide.items(), key=lambda kv: (-kv[1]["width"], kv[0]))
        widest = dict(ranked[:WIDEST_SHOWN])
        ns = sorted({v["n"] for v in wide.values()})
        queries = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]} to {ns[-1]}"
        listing = ", ".join(f"{k} ({_fmt(v['width'])})" for k, v in widest.items())
        msg = (
            f"eval/{split}.json: {len(wide)} of {len(metrics)} metrics have intervals too wide to trust "
            f"(wider than {WIDE_INTERVAL}, or under {MIN_QUERIES} queries; {queries}); widest: {listing}."
        )
        numbers = {
            "split": split,
            "wide": len(wide),
            "metrics": len(metrics),
            "min_n": ns[0],
            "widest": widest,
        }
        out.append(Finding("interval_width", "warning", msg, numbers))
    return out


def _split_health(run: RunData) -> list[Finding]:
    """Held-out splits whose metrics cannot tell models apart (:mod:`cliptune.data.split_health`).

    Reads each ``eval/<split>.json`` (its queries' relevant images), and for splits without one (val,
    usually) what training judged (``summary.json`` ``info.splits.health``).
    """
    judged: dict[str, dict[str, Any]] = {}
    for split, ev in run.evals.items():
        health = judge_eval({"split": split, **ev})
        if health is not None and split != "train":
            judged[split] = health.as_dict()
    splits_info = run.summary.get("info", {}).get("splits", {})
    for record in splits_info.get("health", []):
        judged.setdefault(str(record.get("split")), record)
    groups = splits_info.get("groups", {})
    n_groups = sum(int(v) for v in groups.values()) if groups else None
    out = []
    for _, h in sorted(judged.items()):
        if not h.get("warning"):
            continue
        msg = f"{h['warning']}."
        if n_groups is not None:
            held_out = [n for n in groups if n != "train"]
            fixed = h["split"] if h["split"] in splits_info.get("fixed", []) else None
            msg += f" Suggested: {suggest_split(n_groups, held_out, fixed=fixed)}."
        numbers = {
            k: h[k] for k in ("split", "classes", "queries", "gallery", "mostly_relevant", "chance_mrr")
        }
        out.append(Finding("split_health", "warning", msg, numbers))
    return out


_ADVICE = {
    "generalisation_gap": (
        "overfitting",
        "Overfitting: add training data (or give train a larger share of the split), regularise more "
        "(train.weight_decay, model.head.dropout), train fewer layers (model.trainable_layers), or stop "
        "earlier (train.early_stopping).",
    ),
    "accuracy_gap": ("overfitting", ""),
    "lr_schedule": (
        "lr",
        "The LR was cut often or hit its floor: the watched metric plateaued early; start from a lower "
        "train.lr, or stop earlier (train.early_stopping.patience).",
    ),
    "under_training": (
        "longer",
        "Still improving at the end: train longer (train.epochs), or keep the LR higher for longer.",
    ),
    "stopping": (
        "never",
        "Training never beat the untrained model: check the learning rate (train.lr), the loss and the data "
        "(cliptune data check).",
    ),
    "interval_width": (
        "queries",
        "Intervals are too wide to tell models apart: evaluate on more queries (a larger held-out share in "
        "data.split.ratios, or more groups) before trusting differences.",
    ),
    "split_health": (
        "split",
        "A held-out split has too few groups for its metrics to tell models apart: give it more groups "
        "(data.split.ratios, data.split.min_groups) or rank each image on its own (eval.relevant: item).",
    ),
}


def _recommendations(findings: list[Finding]) -> list[Finding]:
    out: list[Finding] = []
    seen: set[str] = set()
    for f in findings:
        if f.severity != "warning":
            continue
        if f.rule == "modality_gap":
            hardest = f.numbers["hardest"]
            text = f"{hardest.capitalize()} is the weak modality: " + (
                "richer, more consistent descriptions help most; or unfreeze text-tower layers "
                "(model.trainable_layers)."
                if hardest == "text"
                else "weight it more in the loss (loss.weights) or unfreeze more layers (model.trainable_layers)."
            )
            out.append(Finding("recommendation", "info", text, {"from": f.rule}))
            continue
        key, text = _ADVICE.get(f.rule, ("", ""))
        if key and key not in seen:
            seen.add(key)
            text = text or _ADVICE["generalisation_gap"][1]
            out.append(Finding("recommendation", "info", text, {"from": f.rule}))
    return out
