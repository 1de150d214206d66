"""``cliptune report``: one run directory -> ``report.html`` + ``report.md``.

The report answers, from the run's own files, what the seed analyses answered by hand: did it overfit,
how often was the LR cut, which modality and direction are weaker, is it still improving, what do the
final metrics look like with their intervals, which behavioural gates pass, and what the model retrieves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cliptune.ranking.bootstrap import format_interval
from cliptune.report.diagnostics import WIDE_INTERVAL, Finding, diagnose
from cliptune.report.document import Cell, Document, Findings, Grid, Paragraph, Section, Table
from cliptune.report.grids import ImageResolver, retrieval_grid, suite_grid, triplet_grid
from cliptune.report.html import render_html
from cliptune.report.markdown import render_markdown
from cliptune.report.plots import loss_plot, lr_plot, metric_families, metric_plots
from cliptune.report.rundata import RunData, load_run
from cliptune.rundir import RunDir, write_text_atomic

__all__ = ["build_report", "report_document", "interval_text", "resolver_for"]

_SPLITS = ("train", "val", "test")
_SUITE_METRICS = ("mrr", "precision", "recall", "accuracy", "ndcg", "red_flag_rate")


def build_report(run_dir: Path | str) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` into a run directory.

    Args:
        run_dir: ``runs/<name>``; needs ``metrics.jsonl``; uses ``summary.json``, ``config.yaml``,
            ``eval/*.json`` and ``suite/*.json`` when present.

    Returns:
        ``(html_path, md_path)``.

    Raises:
        ReportError: the run directory cannot be read (the message names the file).

    Example:
        >>> html, md = build_report("runs/fashion-tuned")  # doctest: +SKIP
    """
    run = load_run(run_dir)
    doc = report_document(run, diagnose(run))
    html_path, md_path = RunDir(run.path).report, RunDir(run.path).report_md
    write_text_atomic(html_path, render_html(doc))
    write_text_atomic(md_path, render_markdown(doc))
    return html_path, md_path


def report_document(run: RunData, findings: list[Finding]) -> Document:
    """The report of one run as a :class:`Document` (what both renderers draw)."""
    warnings = sum(f.severity == "warning" for f in findings)
    best = "?" if run.best_epoch is None else str(run.best_epoch)
    if run.untrained_best:
        best += " (the untrained model: no trained epoch beat it)"
    subtitle = (
        f"{run.task} run at {run.path} · {run.epochs_trained} epoch(s) trained · best epoch {best} · "
        f"{warnings} warning(s)"
    )
    sections = [
        _diagnostics_section(findings),
        _metrics_section(run),
        _curves_section(run, findings),
        _suites_section(run),
        _grids_section(run),
        _setup_section(run),
    ]
    return Document(f"cliptune report: {run.name}", subtitle, [s for s in sections if s.blocks])


def interval_text(m: dict[str, Any]) -> str:
    """``0.800 [0.700, 0.900] n=44`` for an eval/suite metric dict."""
    return f"{format_interval(m)} n={m.get('n', '?')}"


def _interval_cell(m: dict[str, Any]) -> Cell:
    wide = m["high"] - m["low"] > WIDE_INTERVAL
    return Cell(interval_text(m), "warn" if wide else "")


def resolver_for(run: RunData, doc: dict[str, Any]) -> ImageResolver:
    """Images of an eval/suite JSON: its ``catalogue`` field, else the run's config.yaml catalogue."""
    return ImageResolver(doc.get("catalogue") or run.catalogue)


def _diagnostics_section(findings: list[Finding]) -> Section:
    diag = [f for f in findings if f.rule != "recommendation"]
    recs = [f for f in findings if f.rule == "recommendation"]
    warn = [f for f in diag if f.severity == "warning"]
    banner = (
        Paragraph(
            f"{len(warn)} rule(s) fired: " + ", ".join(f.rule.replace("_", " ") for f in warn) + ".", "warn"
        )
        if warn
        else Paragraph("No diagnostic rule fired: the numbers below show nothing to act on.", "ok")
    )
    blocks: list[Any] = [banner, Findings(warn + [f for f in diag if f.severity != "warning"])]
    if recs:
        blocks += [Paragraph("Recommendations, derived from the warnings above:"), Findings(recs)]
    return Section("diagnostics", "Diagnostics", blocks)


def _metrics_section(run: RunData) -> Section:
    blocks: list[Any] = []
    splits = [s for s in _SPLITS if s in run.evals] + sorted(s for s in run.evals if s not in _SPLITS)
    best = run.best_record
    if splits:
        keys: list[str] = []
        for s in splits:
            keys += [k for k in run.evals[s].get("metrics", {}) if k not in keys]
        rows = []
        for key in keys:
            row: list[Any] = [key]
            for s in splits:
                m = run.evals[s].get("metrics", {}).get(key)
                row.append(_interval_cell(m) if m else "")
            row.append(f"{best[f'val/{key}']:.3f}" if f"val/{key}" in best else "")
            rows.append(row)
        conf = run.evals[splits[0]].get("confidence", 0.95)
        blocks.append(
            Table(
                ["metric"] + [f"{s} (eval)" for s in splits] + ["val (training log, best epoch)"],
                rows,
                f"Final metrics: mean [{conf:.0%} bootstrap interval] n=queries",
            )
        )
    else:
        blocks.append(
            Paragraph(
                "No eval/*.json yet: run `cliptune eval RUN --split test` for intervals and "
                "retrieval grids. Values below are from the training log.",
                "note",
            )
        )
        blocks.append(_log_metrics_table(best, metric_families(best)))
    blocks.append(_loss_table(run))
    return Section("metrics", "Final metrics", blocks)


def _log_metrics_table(best: dict[str, Any], families: dict[str, list[str]]) -> Table:
    # One row per metric name (recall@5, mrr, accuracy/image), one column per direction (t2i, i2t, triplet).
    cells: dict[str, dict[str, float]] = {}
    for key in (k for keys in families.values() for k in keys):
        direction, name = key.removeprefix("val/").split("/", 1)
        cells.setdefault(name, {})[direction] = float(best[key])
    directions = [d for d in ("t2i", "i2t", "triplet") if any(d in v for v in cells.values())]
    rows = [[name, *(f"{v[d]:.4f}" if d in v else "" for d in directions)] for name, v in cells.items()]
    return Table(
        ["metric", *directions],
        rows,
        f"Validation metrics at the best epoch {best.get('epoch', '?')} (no intervals)",
    )


def _loss_table(run: RunData) -> Table:
    last, first = run.epochs[-1], run.epochs[0]
    best = run.best_record
    terms = [k[4:] for k in last if k.startswith("val/") and "/" not in k[4:] and k != "val/temperature"]
    rows = []
    for t in terms:
        row = [t]
        for rec, split in ((first, "val"), (best, "train"), (best, "val"), (last, "train"), (last, "val")):
            v = rec.get(f"{split}/{t}")
            row.append(f"{v:.4g}" if isinstance(v, int | float) else "")
        rows.append(row)
    cols = ["loss term", "val epoch 0", "train best", "val best", "train final", "val final"]
    return Table(cols, rows, f"Losses (best epoch {best.get('epoch', '?')}, final epoch {last['epoch']})")


def _curves_section(run: RunData, findings: list[Finding]) -> Section:
    lr = next((f for f in findings if f.rule == "lr_schedule"), None)
    cuts = lr.numbers.get("cut_after_epochs", []) if lr else []
    plots = [loss_plot(run), *metric_plots(run), lr_plot(run, cuts)]
    return Section("curves", "Training curves", [p for p in plots if p is not None])


def _ranked_text(suite: dict[str, Any]) -> str:
    """Which images a suite ranked (split, count) and what it could not score there."""
    split = suite.get("split", "all (an older result: every catalogue image)")
    text = f"Ranked: split {split}, {suite.get('n_items', '?')} images."
    lost, unmeasured = suite.get("skipped", []), suite.get("unmeasured", {})
    if lost:
        text += f" Not scored: {len(lost)} quer{'y' if len(lost) == 1 else 'ies'} ({lost[0].get('status')})."
    if unmeasured:
        text += f" Not measured: {', '.join(unmeasured)}."
    return text


def _suites_section(run: RunData) -> Section:
    blocks: list[Any] = []
    for name, suite in run.suites.items():
        passed = bool(suite.get("passed"))
        k = suite.get("k", 5)
        th = ", ".join(f"{m} {v}" for m, v in (suite.get("thresholds") or {}).items() if v is not None)
        blocks.append(
            Paragraph(
                f"Suite {suite.get('suite', name)}: {'PASSED' if passed else 'FAILED'} "
                f"(k={k}; thresholds: {th or 'none'}). {_ranked_text(suite)}",
                "ok" if passed else "warn",
            )
        )
        rows = []
        for cat, c in suite.get("categories", {}).items():
            metrics = c.get("metrics", {})
            cat_k = c.get("k", k)  # a category may set its own cut-off
            cells: list[Any] = [
                cat,
                Cell("pass" if c.get("passed") else "FAIL", "pass" if c.get("passed") else "fail"),
                str(c.get("n_queries", "")),
                str(cat_k),
            ]
            for m in _SUITE_METRICS:
                key = m if m == "mrr" else f"{m}@{cat_k}"
                cells.append(interval_text(metrics[key]) if key in metrics else "")
            cells.append("; ".join(c.get("failures", [])))
            rows.append(cells)
        cols = (
            ["category", "status", "queries", "k"]
            + [m if m == "mrr" else f"{m}@k" for m in _SUITE_METRICS]
            + ["failures"]
        )
        keep = [
            i for i, _ in enumerate(cols) if i < 4 or any(r[i] for r in rows)
        ]  # drop metrics no category has
        blocks.append(
            Table(
                [cols[i] for i in keep],
                [[r[i] for i in keep] for r in rows],
                f"Suite {suite.get('suite', name)} by category: mean [95% interval] n=queries",
            )
        )
    return Section("suites", "Behavioural suites", blocks)


def _grids_section(run: RunData) -> Section:
    grids: list[Grid | None] = []
    split = next((s for s in ("test", "val") if s in run.evals), None)
    if split:
        ev = run.evals[split]
        resolver = resolver_for(run, ev)
        grids += [retrieval_grid(ev, resolver), triplet_grid(ev, resolver)]
    for suite in run.suites.values():
        grids.append(suite_grid(suite, resolver_for(run, suite)))
    return Section("grids", "Retrieval grids", [g for g in grids if g is not None])


def _setup_section(run: RunData) -> Section:
    cfg, s = run.config, run.summary
    model, train, loss, data = (
        cfg.get("model", {}),
        cfg.get("train", {}),
        cfg.get("loss", {}),
        cfg.get("data", {}),
    )
    ratios = data.get("split", {}).get("ratios", {})
    rows = [
        ["task", run.task],
        ["backbone", str(model.get("backbone"))],
        ["trainable layers", str(model.get("trainable_layers"))],
        ["loss", f"{loss.get('name')} (temperature {loss.get('temperature')})"],
        [
            "lr / batch size / epochs",
            f"{train.get('lr')} / {train.get('batch_size')} / {train.get('epochs')}",
        ],
        ["scheduler", str(train.get("scheduler"))],
        ["catalogue", str(data.get("catalogue"))],
        ["split", ", ".join(f"{k} {v:g}" for k, v in ratios.items())],
        ["stop reason", str(s.get("stop_reason", "not finished"))],
        ["timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in (s.get("timings_seconds") or {}).items())],
    ]
    return Section("setup", "Run setup", [Table(["setting", "value"], rows, numeric=False)])
