"""``cliptune compare``: runs side by side, with every difference tested against noise.

Seed 002 is a leaderboard; seed 001 reads "val loss 0.07816 vs 0.1148, 32% better" as a win. Both are
right only when the difference is larger than what another sample of queries would give. Here each
delta of an eval metric comes with a paired bootstrap interval over the same queries (paired by query
id), and a verdict: better / worse only when the whole interval is on one side of zero, and a relative
change says "better" only next to that verdict (:mod:`cliptune.report.deltas`). Runs evaluated on
different query sets are flagged and compared unpaired; ``heldout=True`` re-evaluates every run on the
groups none of them trained on (:mod:`cliptune.report.splits_analysis`), where deltas pair. Values from
the training log have no per-query values, so they are shown without a verdict. Verdicts are counted,
and the best run named, on held-out splits only (:mod:`cliptune.report.recommend`).

Model evaluation folders (``cliptune eval MODEL --splits-from RUN``) sit beside runs: a zero-shot
baseline evaluated on a run's own queries pairs with it query by query; it has no training log, so it
has no curves and no training-dynamics rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cliptune.ranking.bootstrap import paired_bootstrap_delta, verdict
from cliptune.report.build import interval_text, resolver_for
from cliptune.report.deltas import Delta, metric_deltas, relative_change
from cliptune.report.document import Block, Cell, Document, Grid, Paragraph, Section, Table
from cliptune.report.grids import query_rows
from cliptune.report.html import render_html
from cliptune.report.markdown import render_markdown
from cliptune.report.plots import overlay_plot
from cliptune.report.recommend import PRIMARY_METRIC, best_run, loss_kind, verdict_summary
from cliptune.report.rundata import ReportError, RunData, load_compared
from cliptune.report.splits_analysis import SHARED_SPLIT, shared_heldout_eval
from cliptune.rundir import RunDir, read_json, write_text_atomic

__all__ = ["Delta", "compare_runs", "metric_deltas", "relative_change"]

LEADERBOARD = {
    "text → image": ["t2i/recall@1", "t2i/recall@5", "t2i/recall@10", "t2i/mrr", "t2i/precision@5"],
    "image → text": ["i2t/recall@1", "i2t/recall@5", "i2t/recall@10", "i2t/mrr", "i2t/precision@5"],
    "triplets": [
        "triplet/accuracy",
        "triplet/accuracy/image",
        "triplet/accuracy/text",
        "triplet/accuracy/cross",
        "triplet/accuracy/i2t",
        "triplet/accuracy/t2i",
    ],
}
OVERLAY_KEYS = ["val/loss", "val/t2i/mrr", "val/t2i/recall@5", "val/i2t/mrr", "val/triplet/accuracy", "lr"]
MOVERS = 4
"""Queries shown as most improved and most regressed (by per-query t2i MRR delta)."""
LOSS_TERMS = ["loss", "image", "text", "fused", "cross", "i2t", "t2i"]
"""Loss terms of the training log shown in the leaderboard (a Siamese run logs one per modality)."""
SPLITS = ("train", "val", "test", SHARED_SPLIT)


def compare_runs(
    run_dirs: list[Path | str],
    baseline: Path | str | None = None,
    out: Path | str | None = None,
    *,
    heldout: bool = False,
    bootstrap: int | None = None,
    progress: bool = False,
) -> tuple[Path, Path]:
    """Write ``compare.html`` (self-contained), ``compare.md`` and ``compare.json`` for several runs.

    Args:
        run_dirs: Two or more run directories or model evaluation folders (``evaluation.json``).
        baseline: The run or evaluation every other one is compared with (one of ``run_dirs``); default
            the first.
        out: Output folder; default ``<parent of the first run>/compare``.
        heldout: Also evaluate every run's model on the groups held out from all of them (split
            ``shared-heldout``; written to ``<out>/heldout/<run>/shared-heldout.json``), so runs trained on different
            splits get paired verdicts there; the best run is then named on that split.
        bootstrap: Resamples of the held-out evaluation (default: the first run's ``eval.bootstrap``).
        progress: Progress bars while embedding for ``heldout``.

    Returns:
        ``(html_path, md_path)``.

    Raises:
        ReportError: fewer than two runs, a run listed twice, a baseline not among the runs, or a run
            that cannot be read; with ``heldout``, an evaluation folder among the runs.
        NoSharedHeldoutError: ``heldout`` and every group is in some run's train split.

    Example:
        >>> compare_runs(["runs/base", "runs/tuned"], baseline="runs/base", out="runs/compare")  # doctest: +SKIP
    """
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise ReportError(f"compare needs at least two runs, got {len(paths)}")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise ReportError("compare: a run is listed twice: " + ", ".join(map(str, paths)))
    base_index = 0
    if baseline is not None:
        if Path(baseline).resolve() not in resolved:
            raise ReportError(
                f"compare: baseline {baseline} is not one of the runs ({', '.join(map(str, paths))})"
            )
        base_index = resolved.index(Path(baseline).resolve())
    runs = [load_compared(p) for p in paths]
    out_dir = Path(out) if out is not None else paths[0].parent / "compare"
    heldout_info = _add_heldout(runs, out_dir, bootstrap, progress) if heldout else None
    base = runs[base_index]
    others = [r for i, r in enumerate(runs) if i != base_index]
    out_dir.mkdir(parents=True, exist_ok=True)
    doc, data = _compare_document(base, others, heldout_info)
    html_path, md_path = out_dir / "compare.html", out_dir / "compare.md"
    write_text_atomic(html_path, render_html(doc))
    write_text_atomic(md_path, render_markdown(doc))
    write_text_atomic(out_dir / "compare.json", json.dumps(data, indent=2, default=str))
    return html_path, md_path


def _add_heldout(runs: list[RunData], out_dir: Path, bootstrap: int | None, progress: bool) -> dict[str, Any]:
    # Every run's model on the groups none of them trained on: written beside compare.json, never into a run.
    from cliptune.evaluation.run import write_eval
    from cliptune.report.splits_analysis import shared_heldout_groups

    folders = [r for r in runs if not r.trained]
    if folders:
        raise ReportError(
            f"{folders[0].path}: an evaluation folder has no splits.json of its own; the groups held out "
            "from every run can be found only for run directories"
        )
    evals = shared_heldout_eval(*[r.path for r in runs], bootstrap=bootstrap, progress=progress)
    for run, ev in zip(runs, evals, strict=True):
        write_eval(ev, out_dir=out_dir / "heldout" / run.name)
        run.evals[SHARED_SPLIT] = ev
    groups = shared_heldout_groups(*[r.path for r in runs])
    return {"split": SHARED_SPLIT, "groups": groups, "n_rows": evals[0].get("n_rows")}


def _compare_document(
    base: RunData, others: list[RunData], heldout: dict[str, Any] | None = None
) -> tuple[Document, dict[str, Any]]:
    runs = [base, *others]
    data: dict[str, Any] = {
        "baseline": str(base.path),
        "runs": [str(r.path) for r in runs],
        "heldout": heldout,
        "deltas": {},
        "flags": [],
        "summary": {},
    }
    all_deltas: dict[str, dict[str, list[Delta]]] = {}
    deltas_section = Section("deltas", f"Deltas against the baseline ({base.name})")
    if heldout is not None:
        deltas_section.blocks.append(
            Paragraph(
                f"{SHARED_SPLIT}: every model re-evaluated on the {len(heldout['groups'])} group(s) no run "
                f"trained on ({heldout['n_rows']} rows): one gallery, the same queries, paired verdicts.",
                "ok",
            )
        )
    for cand in others:
        for split in [s for s in SPLITS if s in base.evals and s in cand.evals]:
            deltas, flags = metric_deltas(base.evals[split], cand.evals[split])
            all_deltas.setdefault(cand.name, {})[split] = deltas
            data["deltas"].setdefault(cand.name, {})[split] = [_delta_json(d) for d in deltas]
            data["flags"] += [f"{cand.name}: {f}" for f in flags]
            deltas_section.blocks += [Paragraph(f"{cand.name}: {f}.", "warn") for f in flags]
            deltas_section.blocks.append(_delta_table(base, cand, split, deltas))
        flat = [d for ds in all_deltas.get(cand.name, {}).values() for d in ds]
        data["summary"][cand.name] = verdict_summary(base, cand, flat)
        if not set(base.evals) & set(cand.evals):
            deltas_section.blocks.append(
                Paragraph(
                    f"{cand.name} and {base.name} share no eval split: run `cliptune eval` on both for deltas "
                    "with intervals; only training-log values are compared below.",
                    "warn",
                )
            )
    best = best_run(base, others, all_deltas)
    data["best"] = best.to_dict()
    data["primary_metric"] = PRIMARY_METRIC
    data["loss_kinds"] = {r.name: loss_kind(r) for r in runs}
    trained = [r for r in runs if r.trained]  # the baseline first when it is a run
    sections = [
        _summary_section(data),
        _leaderboard_section(runs),
        deltas_section,
        _dynamics_section(trained[0], trained[1:]) if trained else Section("dynamics", "", []),
        _curves_section(trained),
        _suite_section(base, others),
        _movers_section(base, others),
    ]
    subtitle = (
        f"{len(runs)} models · baseline {base.name} · verdicts from paired bootstrap intervals over queries"
    )
    doc = Document(
        "cliptune compare: " + " vs ".join(r.name for r in runs), subtitle, [s for s in sections if s.blocks]
    )
    return doc, data


def _delta_json(d: Delta) -> dict[str, Any]:
    return {
        "metric": d.metric,
        "counted": d.counted,
        "relative": d.relative,
        "baseline": d.baseline,
        "candidate": d.candidate,
        "paired": d.paired,
        "interval": d.interval.to_dict() if d.interval else None,
        "verdict": d.verdict,
        "note": d.note,
    }


_VERDICT_CSS = {"better": "better", "worse": "worse", "not distinguishable": "same", "no verdict": "same"}


def _delta_table(base: RunData, cand: RunData, split: str, deltas: list[Delta]) -> Table:
    rows: list[list[str | Cell]] = []
    for d in deltas:
        iv = d.interval
        diff = d.candidate - d.baseline
        interval = f"{diff:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]" if iv else f"{diff:+.3f}"
        label = d.verdict + ("" if d.paired or d.verdict == "no verdict" else " (unpaired)")
        rows.append(
            [
                d.metric,
                f"{d.baseline:.4f}",
                f"{d.candidate:.4f}",
                interval,
                d.relative,
                Cell(label, _VERDICT_CSS.get(d.verdict, "")),
                d.note,
            ]
        )
    conf = base.evals[split].get("confidence", 0.95)
    cols = ["metric", base.name, cand.name, f"delta [{conf:.0%} interval]", "relative", "verdict", "note"]
    caption = f"{cand.name} vs {base.name} on {split}"
    if split == "train":
        caption += " (the data the models were fitted on: shown, not counted in the verdict summary)"
    return Table(cols, rows, caption)


def _summary_section(data: dict[str, Any]) -> Section:
    best = data["best"]
    lines: list[Block] = [Paragraph(best["sentence"], "ok" if best["run"] else "note")]
    for summary in data["summary"].values():
        css = "warn" if summary["worse"] else "ok" if summary["better"] else "note"
        lines.append(Paragraph(summary["sentence"], css))
    lines += [Paragraph(f, "warn") for f in data["flags"]]
    primary = ", ".join(f"{metric} ({task})" for task, metric in data["primary_metric"].items())
    lines.append(
        Paragraph(
            "How to read: a verdict is 'better' or 'worse' only when the whole 95% paired bootstrap interval of the "
            "difference (same queries resampled together) lies on one side of zero; otherwise the difference is "
            "'not distinguishable' from what another sample of queries could give, and no relative change is "
            "called an improvement. Only held-out splits (val, test, shared-heldout) are counted; the best run is "
            f"named by the primary metric, {primary}, on {SHARED_SPLIT}, else test, else val."
        )
    )
    return Section("summary", "Verdict summary", lines)


def _leaderboard_section(runs: list[RunData]) -> Section:
    kinds = {r.name: loss_kind(r) for r in runs}
    mixed = len(set(kinds.values())) > 1
    blocks: list[Any] = []
    if mixed:
        blocks.append(
            Paragraph(
                "Losses of different kinds are not comparable ("
                + ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
                + "): each loss is labelled with its kind, no loss is highlighted as best, and loss deltas get "
                "no verdict. Compare these runs by their retrieval or triplet metrics.",
                "warn",
            )
        )
    for title, keys in LEADERBOARD.items():
        present = [
            k
            for k in keys
            if any(k in ev.get("metrics", {}) for r in runs for ev in r.evals.values())
            or any(f"val/{k}" in (r.summary.get("best") or {}) for r in runs)
        ]
        if not present:
            continue
        rows: list[list[Any]] = []
        for r in runs:
            for split, values, loss in _leaderboard_rows(r, present):
                rows.append([r.name, split, *values, f"{loss} ({kinds[r.name]})" if mixed and loss else loss])
        _bold_best(rows, present)
        cols = ["run", "split", *[k.split("/", 1)[1] for k in present], "loss"]
        blocks.append(Table(cols, rows, f"Leaderboard: {title}"))
    terms = _loss_terms_table(runs, kinds, mixed)
    if terms is not None:
        blocks.append(terms)
    if blocks:
        blocks.append(
            Paragraph(
                "Eval rows show the mean of eval/<split>.json, loss included (the run's InfoNCE or "
                "Siamese objective on that split); a loss marked (log) comes from the training log at the "
                "best epoch, as do 'val (log)' rows and the loss terms. Bold green: best in its column and "
                "held-out split (train rows, the data the models were fitted on, are never highlighted).",
                "note",
            )
        )
        blocks += [
            Paragraph(
                f"{r.name}: {r.manifest.get('model')} evaluated on the splits of "
                f"{r.manifest.get('run_name') or r.manifest.get('splits_from')} (no training).",
                "note",
            )
            for r in runs
            if r.manifest is not None
        ]
    return Section("leaderboard", "Leaderboard", blocks)


def _loss_terms_table(runs: list[RunData], kinds: dict[str, str], mixed: bool) -> Table | None:
    # The loss and its terms (a Siamese run: image, text, fused, cross, i2t, t2i) at each run's best epoch.
    best = {r.name: r.summary.get("best") or (r.epochs[-1] if r.epochs else {}) for r in runs}
    terms = [t for t in LOSS_TERMS if any(f"{s}/{t}" in b for b in best.values() for s in ("train", "val"))]
    if not terms or terms == ["loss"]:
        return None  # the plain loss is already in every leaderboard table
    rows: list[list[Any]] = []
    for r in runs:
        for split in ("train", "val"):
            values = [best[r.name].get(f"{split}/{t}") for t in terms]
            if all(v is None for v in values):
                continue
            cells = [f"{v:.4f}" if isinstance(v, int | float) else "" for v in values]
            rows.append([r.name, f"{split} (log)", *cells, kinds[r.name]])
    if not mixed:
        _bold_best(rows, terms, lower=True)
    cols = ["run", "split", *terms, "loss kind"]
    return Table(cols, rows, "Leaderboard: loss terms (training log at the best epoch; lower is better)")


def _leaderboard_rows(run: RunData, keys: list[str]) -> list[tuple[str, list[str], str]]:
    best = run.summary.get("best") or (run.epochs[-1] if run.epochs else {})
    logged = {"train": best.get("train/loss"), "val": best.get("val/loss")}
    rows: list[tuple[str, list[str], str]] = []
    splits: list[str] = [s for s in SPLITS if s in run.evals]
    splits = splits or (["val (log)"] if best else [])
    for split in splits:
        if split == "val (log)":
            values = [f"{best[f'val/{k}']:.4f}" if f"val/{k}" in best else "" for k in keys]
            loss = best.get("val/loss")
            rows.append((split, values, f"{loss:.4f}" if isinstance(loss, int | float) else ""))
            continue
        metrics = run.evals[split].get("metrics", {})
        values = [f"{metrics[k]['mean']:.4f}" if k in metrics else "" for k in keys]
        log = logged.get(split)
        if "loss" in metrics:  # the eval's loss: the same formula and queries for every model
            loss_text = f"{float(metrics['loss']['mean']):.4f}"
        else:
            loss_text = f"{log:.4f} (log)" if isinstance(log, int | float) else ""
        rows.append((split, values, loss_text))
    return rows


def _bold_best(rows: list[list[Any]], keys: list[str], lower: bool = False) -> None:
    for col in range(2, 2 + len(keys)):
        for split in {r[1] for r in rows if not str(r[1]).startswith("train")}:
            cells = [r for r in rows if r[1] == split and r[col] != ""]
            if len(cells) < 2:
                continue
            values = [float(r[col]) for r in cells]
            top = min(values) if lower else max(values)
            if min(values) == max(values):
                continue  # a tie everywhere: nothing to point out
            for r in cells:
                if float(r[col]) == top:
                    r[col] = Cell(r[col], "better")


def _dynamics(run: RunData) -> dict[str, Any]:
    from cliptune.report.diagnostics import diagnose

    found = {f.rule: f.numbers for f in diagnose(run) if f.rule in {"lr_schedule", "generalisation_gap"}}
    return {"lr": found.get("lr_schedule", {}), "gap": found.get("generalisation_gap", {})}


def _dynamics_section(base: RunData, others: list[RunData]) -> Section:
    runs = [base, *others]
    dyn = {r.name: _dynamics(r) for r in runs}
    rows = []
    for r in runs:
        lr, gap = dyn[r.name]["lr"], dyn[r.name]["gap"]
        cuts = lr.get("cut_after_epochs")
        rows.append(
            [
                r.name,
                str(max(e["epoch"] for e in r.epochs)),
                str(r.summary.get("best_epoch", "")),
                str(r.summary.get("stop_reason", "not finished")),
                f"{lr.get('lr_initial', math.nan):.3g} -> {lr.get('lr_final', math.nan):.3g}",
                ""
                if cuts is None
                else f"{len(cuts)}" + (f" (after {', '.join(map(str, cuts))})" if cuts else ""),
                _f(gap.get("train_loss")),
                _f(gap.get("val_loss")),
                _f(gap.get("ratio")),
            ]
        )
    cols = [
        "run",
        "epochs",
        "best epoch",
        "stop reason",
        "lr initial -> final",
        "LR cuts",
        "train loss (final)",
        "val loss (final)",
        "val / train loss",
    ]
    blocks: list[Any] = [Table(cols, rows, "Training dynamics (from metrics.jsonl and summary.json)")]
    for cand in others:
        blocks += _dynamics_sentences(base, cand, dyn)
        blocks.append(_log_table(base, cand))
    return Section("dynamics", "Training dynamics and validation log", blocks)


def _f(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, int | float) else ""


def _dynamics_sentences(base: RunData, cand: RunData, dyn: dict[str, Any]) -> list[Paragraph]:
    out = []
    lb, lc = dyn[base.name]["lr"], dyn[cand.name]["lr"]
    if "cuts" in lb and "cuts" in lc:
        word = (
            "a higher"
            if lc["lr_final"] > lb["lr_final"]
            else "a lower"
            if lc["lr_final"] < lb["lr_final"]
            else "the same"
        )
        out.append(
            Paragraph(
                f"{cand.name} ended with {word} LR {'as' if word == 'the same' else 'than'} {base.name} "
                f"({lc['lr_final']:.3g} vs {lb['lr_final']:.3g}) "
                f"after {lc['cuts']} plateau cut(s) vs {lb['cuts']}: "
                + (
                    "fewer plateaus."
                    if lc["cuts"] < lb["cuts"]
                    else "more plateaus."
                    if lc["cuts"] > lb["cuts"]
                    else "as many plateaus."
                )
            )
        )
    gb, gc = dyn[base.name]["gap"], dyn[cand.name]["gap"]
    if "ratio" in gb and "ratio" in gc:
        smaller = gc["ratio"] < gb["ratio"]
        out.append(
            Paragraph(
                f"Train-val loss gap: {cand.name} val/train {gc['ratio']:.3g}x vs {base.name} {gb['ratio']:.3g}x "
                f"({'smaller: better generalisation' if smaller else 'larger: more overfitting'}; losses of "
                "different runs are comparable only with the same loss and temperature)."
            )
        )
    if not _same_val_groups(base, cand):
        out.append(
            Paragraph(
                f"{cand.name} and {base.name} were validated on different groups (splits.json differ, e.g. another "
                "split ratio): training-log values below are measured on different data.",
                "warn",
            )
        )
    return out


def _same_val_groups(a: RunData, b: RunData) -> bool:
    def groups(r: RunData) -> Any:
        path = RunDir(r.path).splits
        return read_json(path).get("val") if path.is_file() else None

    ga, gb = groups(a), groups(b)
    return ga is None or gb is None or sorted(map(str, ga)) == sorted(map(str, gb))


_LOG_HEADLINE = ("recall@1", "recall@5", "recall@10", "precision@5", "mrr")


def _log_key(key: str) -> bool:
    # train/val loss terms (val/loss, val/cross), every triplet accuracy, the headline ranking metrics.
    split, _, rest = key.partition("/")
    if split not in ("train", "val") or not rest or "temperature" in rest:
        return False
    return "/" not in rest or rest.startswith("triplet/") or rest.split("/", 1)[-1].startswith(_LOG_HEADLINE)


def _log_table(base: RunData, cand: RunData) -> Table:
    bb, bc = base.summary.get("best") or base.epochs[-1], cand.summary.get("best") or cand.epochs[-1]
    keys = [k for k in bb if k in bc and isinstance(bb[k], int | float) and _log_key(k)]
    # No per-query values, so no verdict: the relative change is neutral ("32% lower"), never "better".
    rows = [
        [
            k,
            f"{bb[k]:.5g}",
            f"{bc[k]:.5g}",
            relative_change(bb[k], bc[k], "no verdict"),
            Cell("no verdict", "same"),
        ]
        for k in keys
    ]
    cols = ["value (best epoch)", base.name, cand.name, "relative", "verdict"]
    caption = (
        f"{cand.name} vs {base.name}: training log at the best epoch (no per-query values: no intervals)"
    )
    return Table(cols, rows, caption)


def _curves_section(runs: list[RunData]) -> Section:
    plots = [
        overlay_plot(runs, key, "overlay-" + key.replace("/", "-").replace("@", "at")) for key in OVERLAY_KEYS
    ]
    return Section("curves", "Validation curves", [p for p in plots if p is not None])


def _suite_section(base: RunData, others: list[RunData]) -> Section:
    blocks: list[Any] = []
    for cand in others:
        for name in [n for n in base.suites if n in cand.suites]:
            blocks.append(_suite_table(base, cand, name))
    return Section("suites", "Behavioural suites: per-category changes", blocks)


def _suite_table(base: RunData, cand: RunData, name: str) -> Table:
    sa, sb = base.suites[name], cand.suites[name]
    qa = {q["id"]: q for q in sa.get("queries", [])}
    qb = {q["id"]: q for q in sb.get("queries", [])}
    rows = []
    for cat, ca in sa.get("categories", {}).items():
        cb = sb.get("categories", {}).get(cat)
        if cb is None:
            rows.append(
                [cat, _status(ca), Cell("missing", "warn"), "", "", "", "", "category absent in " + cand.name]
            )
            continue
        ids_a = sorted(i for i, q in qa.items() if q.get("category") == cat)
        ids_b = sorted(i for i, q in qb.items() if q.get("category") == cat)
        ma, mb = ca.get("metrics", {}).get("mrr"), cb.get("metrics", {}).get("mrr")
        note, delta_text, word = "", "", "no verdict"
        if (
            ids_a
            and ids_a == ids_b
            and all("mrr" in qa[i].get("metrics", {}) and "mrr" in qb[i].get("metrics", {}) for i in ids_a)
        ):
            iv = paired_bootstrap_delta(
                [qa[i]["metrics"]["mrr"] for i in ids_a],
                [qb[i]["metrics"]["mrr"] for i in ids_a],
                n_resamples=1000,
                seed=0,
            )
            word = verdict(iv)
            delta_text = f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"
        elif ids_a != ids_b:
            note = "different queries in this category: not paired"
        rows.append(
            [
                cat,
                _status(ca),
                _status(cb),
                interval_text(ma) if ma else "",
                interval_text(mb) if mb else "",
                delta_text,
                Cell(word, _VERDICT_CSS.get(word, "")),
                note,
            ]
        )
    cols = [
        "category",
        base.name,
        cand.name,
        f"mrr {base.name}",
        f"mrr {cand.name}",
        "mrr delta [95%]",
        "verdict",
        "note",
    ]
    return Table(cols, rows, f"Suite {sa.get('suite', name)}: {cand.name} vs {base.name}")


def _status(c: dict[str, Any]) -> Cell:
    return Cell("pass", "pass") if c.get("passed") else Cell("FAIL", "fail")


def _movers_section(base: RunData, others: list[RunData]) -> Section:
    blocks: list[Any] = []
    for cand in others:
        split = next((s for s in (SHARED_SPLIT, "test", "val") if s in base.evals and s in cand.evals), None)
        if split is None:
            continue
        ba, bb = (
            base.evals[split].get("per_query", {}).get("t2i"),
            cand.evals[split].get("per_query", {}).get("t2i"),
        )
        if not ba or not bb or "mrr" not in ba.get("values", {}) or "mrr" not in bb.get("values", {}):
            continue
        index_b = {q: i for i, q in enumerate(bb["query_ids"])}
        pairs = [(i, index_b[q]) for i, q in enumerate(ba["query_ids"]) if q in index_b]
        moves = sorted(
            ((bb["values"]["mrr"][j] - ba["values"]["mrr"][i], i, j) for i, j in pairs), key=lambda m: m[0]
        )
        improved = [m for m in reversed(moves) if m[0] > 0][:MOVERS]
        regressed = [m for m in moves if m[0] < 0][:MOVERS]
        for title, chosen in (("improved", improved), ("regressed", regressed)):
            rows = []
            for d, i, j in chosen:
                rows += query_rows(ba, [i], resolver_for(base, base.evals[split]), prefix=f"{base.name}: ")
                rows += query_rows(
                    bb, [j], resolver_for(cand, cand.evals[split]), prefix=f"{cand.name} ({d:+.3f}): "
                )
            if rows:
                blocks.append(
                    Grid(
                        f"movers-{cand.name}-{title}",
                        f"{cand.name}: queries that {title} most "
                        f"(t2i mrr on {split}; baseline row, then candidate row)",
                        rows,
                    )
                )
        if not improved and not regressed:
            blocks.append(Paragraph(f"{cand.name}: no query's t2i mrr changed on {split}.", "note"))
    return Section("movers", "Queries that moved most", blocks)
