"""`cliptune report`: each diagnostic rule on crafted runs, numbers equal to hand-computed ones; the page.

The helpers here (``write_run``, ``eval_json``, ``suite_json``) build run directories following
/tmp/prompts/contracts.md; test_compare.py and test_report_browser.py reuse them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cliptune.cli.report import register
from cliptune.ranking.bootstrap import bootstrap_ci
from cliptune.report import ReportError, build_report, diagnose, load_run
from cliptune.report.diagnostics import Finding

runner = CliRunner()


# ---------------------------------------------------------------- fixtures following the contract


def write_run(
    run_dir: Path,
    epochs: list[dict[str, Any]],
    summary: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    splits: dict[str, list[str]] | None = None,
) -> Path:
    """A run directory from epoch records (``kind``/``epoch`` filled in) plus summary and config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [{"kind": "epoch", "epoch": i, "step": 10 * i, **e} for i, e in enumerate(epochs)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        best = summary.get("best_epoch", len(epochs) - 1)
        full = {"name": run_dir.name, "task": "retrieval", "epochs_trained": len(epochs) - 1, "best_epoch": best,
                "stop_reason": f"reached train.epochs ({len(epochs) - 1})", "lr_reductions": 0,
                "lr_final": epochs[-1].get("lr"), "final": records[-1], "best": records[best],
                "timings_seconds": {"train": 1.0}, "info": {}} | summary  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(full))
    # these runs watch val/loss (every record has it; the default primary metric is not always there)
    watched = {"early_stopping": None, "plateau": {"metric": "val/loss"}}
    cfg = {"name": run_dir.name, "train": {"lr": epochs[0].get("lr", 1e-3), **watched}}
    for key, value in (config or {}).items():
        cfg[key] = {**cfg.get(key, {}), **value}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    if splits is not None:
        (run_dir / "splits.json").write_text(json.dumps(splits))
    return run_dir


def _block(
    ids: list[str], queries: list[str], values: dict[str, list[float]], top=None, relevant=None
) -> dict:
    n = len(ids)
    return {"query_ids": ids, "queries": queries, "values": values,
            "top": top or [[] for _ in range(n)], "top_scores": [[1.0 - 0.1 * j for j in range(len(t))] for t in (top or [[]] * n)],
            "relevant": relevant or [[] for _ in range(n)]}  # fmt: skip


def eval_json(
    split: str,
    blocks: dict[str, dict[str, Any]],
    catalogue: Path | str = "",
    bootstrap: int = 200,
) -> dict[str, Any]:
    """An eval/<split>.json with metrics (mean + bootstrap interval) computed from the per-query values.

    ``blocks``: direction (``t2i``, ``i2t``, ``triplet``) -> ``{"ids", "queries", "values", "top", "relevant"}``.
    """
    per_query, metrics = {}, {}
    for direction, b in blocks.items():
        per_query[direction] = _block(
            b["ids"], b.get("queries", b["ids"]), b["values"], b.get("top"), b.get("relevant")
        )
        for name, values in b["values"].items():
            metrics[f"{direction}/{name}"] = bootstrap_ci(values, n_resamples=bootstrap).to_dict()
    n_rows = max(len(b["ids"]) for b in blocks.values())
    return {"split": split, "model": "m", "source": "model", "catalogue": str(catalogue), "n_rows": n_rows,
            "ks": [1, 5, 10], "confidence": 0.95, "bootstrap": bootstrap, "seed": 0,
            "metrics": metrics, "per_query": per_query}  # fmt: skip


def suite_json(name: str, queries: list[dict[str, Any]], catalogue: Path | str = "") -> dict[str, Any]:
    """A suite/<name>.json from per-query results (``id``, ``category``, ``mrr``, ``top``, ``passed``)."""
    cats: dict[str, list[dict]] = {}
    for q in queries:
        cats.setdefault(q["category"], []).append(q)
    categories = {
        cat: {"passed": all(q["passed"] for q in qs), "n_queries": len(qs),
              "metrics": {"mrr": bootstrap_ci([q["mrr"] for q in qs], n_resamples=100).to_dict()},
              "failures": [] if all(q["passed"] for q in qs) else ["mrr below 0.3"]}
        for cat, qs in cats.items()
    }  # fmt: skip
    return {"suite": name, "suite_file": f"{name}.yaml", "model": "m", "catalogue": str(catalogue),
            "passed": all(c["passed"] for c in categories.values()),
            "thresholds": {"mrr": 0.3, "precision": 0.7, "accuracy": 0.8, "recall": 0.6, "red_flag_rate": None},
            "k": 3, "categories": categories,
            "queries": [{"id": q["id"], "category": q["category"], "text": q["text"], "image": None, "k": 3,
                         "passed": q["passed"], "metrics": {"mrr": q["mrr"]},
                         "failures": [] if q["passed"] else [f"mrr {q['mrr']:.2f} < 0.3"],
                         "top": q.get("top", [])} for q in queries]}  # fmt: skip


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _by_rule(findings: list[Finding], rule: str) -> Finding:
    (found,) = [f for f in findings if f.rule == rule]
    return found


# ---------------------------------------------------------------- crafted runs

SIAMESE_CFG = {"train": {"task": "siamese", "lr": 3e-4}}


def overfitting_run(root: Path, name: str = "overfit") -> Path:
    """Siamese run: train loss falls to 0.05, val loss best 0.5 at epoch 3 then 0.6; train acc 0.999 vs val 0.9."""
    train = [None, 1.0, 0.5, 0.3, 0.15, 0.08, 0.05]
    val = [1.2, 0.8, 0.6, 0.5, 0.52, 0.56, 0.6]
    epochs = []
    for e in range(7):
        rec: dict[str, Any] = {"lr": 3e-4, "val/loss": val[e], "val/triplet/accuracy": 0.9,
                               "val/image": 0.02909, "val/text": 0.17994, "val/cross": 0.10576,
                               "val/triplet/accuracy/i2t": 0.95528, "val/triplet/accuracy/t2i": 0.96685}  # fmt: skip
        if train[e] is not None:
            rec |= {"train/loss": train[e], "train/triplet/accuracy": 0.999}
        epochs.append(rec)
    return write_run(root / name, epochs, {"best_epoch": 3, "task": "siamese", "lr_final": 3e-4}, SIAMESE_CFG)


def lr_cuts_run(root: Path) -> Path:
    """LRs 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 1.25e-4 in epochs 1..6, final 1.25e-4: cuts after epochs 2, 4, 5."""
    lrs = [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 1.25e-4]
    val = [1.0, 0.7, 0.6, 0.58, 0.57, 0.569, 0.5689]
    epochs = [
        {"lr": lrs[e], "val/loss": val[e], **({"train/loss": val[e] - 0.01} if e else {})} for e in range(7)
    ]
    return write_run(root / "cuts", epochs, {"lr_reductions": 3, "lr_final": 1.25e-4, "best_epoch": 6})


def undertrained_run(root: Path) -> Path:
    """val/loss 1.0, 0.9, 0.8, 0.7, 0.6 (epochs 0..4), still falling at the end."""
    val = [1.0, 0.9, 0.8, 0.7, 0.6]
    epochs = [
        {"lr": 1e-3, "val/loss": v, **({"train/loss": v + 0.05} if e else {})} for e, v in enumerate(val)
    ]
    return write_run(root / "under", epochs, {"best_epoch": 4})


def healthy_run(root: Path) -> Path:
    """Train and val close, val settled, one LR cut, test intervals narrow with n=100."""
    val = [1.0, 0.6, 0.5, 0.442, 0.441, 0.4405, 0.4404]
    train = [None, 0.55, 0.46, 0.43, 0.425, 0.424, 0.423]
    lrs = [1e-3] * 5 + [5e-4] * 2
    epochs = []
    for e in range(7):
        rec = {"lr": lrs[e], "val/loss": val[e], "val/t2i/mrr": 0.8, "val/i2t/mrr": 0.79}
        if train[e] is not None:
            rec["train/loss"] = train[e]
        epochs.append(rec)
    run = write_run(root / "healthy", epochs, {"best_epoch": 6, "lr_final": 5e-4, "lr_reductions": 1})
    ids = [str(i) for i in range(100)]
    ev = eval_json("test", {
        "t2i": {"ids": ids, "values": {"mrr": [0.8] * 50 + [0.9] * 50, "recall@5": [1.0] * 95 + [0.0] * 5}},
        "i2t": {"ids": [f"images/{i}.png" for i in range(100)], "values": {"mrr": [0.85] * 50 + [0.75] * 50}},
    })  # fmt: skip
    write_json(run / "eval" / "test.json", ev)
    return run


# ---------------------------------------------------------------- rules


def test_overfitting_run_numbers(tmp_path: Path) -> None:
    findings = diagnose(load_run(overfitting_run(tmp_path)))
    gap = _by_rule(findings, "generalisation_gap")
    assert gap.severity == "warning"
    assert gap.numbers["train_loss"] == 0.05 and gap.numbers["val_loss"] == 0.6
    assert gap.numbers["ratio"] == pytest.approx(12.0)  # 0.6 / 0.05
    assert gap.numbers["diff"] == pytest.approx(0.55)  # 0.6 - 0.05
    assert gap.numbers["val_loss_best"] == 0.5 and gap.numbers["val_loss_best_epoch"] == 3
    assert gap.numbers["val_loss_rise"] == pytest.approx(0.2)  # (0.6 - 0.5) / 0.5
    acc = _by_rule(findings, "accuracy_gap")
    assert acc.severity == "warning" and acc.numbers["gap"] == pytest.approx(0.099)  # 0.999 - 0.9
    # Seed-000 modality numbers at the best epoch: text hardest, 0.17994 / 0.02909 = 6.1857x the image loss.
    mod = _by_rule(findings, "modality_gap")
    assert (
        mod.severity == "warning" and mod.numbers["hardest"] == "text" and mod.numbers["easiest"] == "image"
    )
    assert mod.numbers["ratio"] == pytest.approx(0.17994 / 0.02909)
    assert "6.186x" in mod.message
    direction = _by_rule(findings, "direction_gap")
    assert direction.numbers["t2i"] == 0.96685 and direction.numbers["i2t"] == 0.95528
    assert direction.numbers["diff"] == pytest.approx(0.01157)  # 0.96685 - 0.95528
    assert direction.numbers["verdict"] == "no interval"
    recs = [f.numbers["from"] for f in findings if f.rule == "recommendation"]
    assert recs == ["generalisation_gap", "modality_gap"]  # accuracy_gap shares the overfitting advice


def test_three_lr_cuts(tmp_path: Path) -> None:
    lr = _by_rule(diagnose(load_run(lr_cuts_run(tmp_path))), "lr_schedule")
    assert lr.severity == "warning"
    assert lr.numbers["cuts"] == 3 and lr.numbers["cut_after_epochs"] == [2, 4, 5]
    assert lr.numbers["lr_initial"] == 1e-3 and lr.numbers["lr_final"] == 1.25e-4
    assert lr.numbers["lr_ratio"] == pytest.approx(0.125)  # 1.25e-4 / 1e-3
    assert "summary_lr_reductions" not in lr.numbers  # agrees with summary.json
    assert "after epochs 2, 4, 5" in lr.message


def test_cut_after_the_last_epoch_comes_from_summary(tmp_path: Path) -> None:
    epochs = [{"lr": 1e-3, "val/loss": 1.0}, {"lr": 1e-3, "val/loss": 0.9, "train/loss": 0.9}]
    run = write_run(tmp_path / "r", epochs, {"lr_final": 5e-4, "lr_reductions": 1, "best_epoch": 1})
    lr = _by_rule(diagnose(load_run(run)), "lr_schedule")
    assert lr.numbers["cut_after_epochs"] == [1] and lr.severity == "info"


def test_undertrained_run(tmp_path: Path) -> None:
    findings = diagnose(load_run(undertrained_run(tmp_path)))
    under = _by_rule(findings, "under_training")
    assert under.severity == "warning"
    assert under.numbers["from_epoch"] == 1 and under.numbers["window"] == 3
    assert under.numbers["relative_gain"] == pytest.approx(1 / 3)  # (0.9 - 0.6) / 0.9
    assert [f.numbers["from"] for f in findings if f.rule == "recommendation"] == ["under_training"]


def test_untrained_best_is_one_story(tmp_path: Path) -> None:
    # The run: epoch-0 val/t2i/mrr 0.672, every trained epoch lower (0.604 at epoch 4); early
    # stopping watched val/t2i/mrr (max), so the kept model is epoch 0 and every section must say so.
    mrr = [0.672, 0.65, 0.63, 0.61, 0.604]
    epochs = [
        {
            "lr": 1e-3,
            "val/loss": 1.0 + e / 10,
            "val/t2i/mrr": m,
            **({"train/loss": 0.9 - e / 10} if e else {}),
        }
        for e, m in enumerate(mrr)
    ]
    stopping = {"early_stopping": {"metric": "val/t2i/mrr", "mode": "max", "patience": 4}}
    run = write_run(
        tmp_path / "worse", epochs, {"best_epoch": 0, "best_is_untrained": True}, {"train": stopping}
    )
    data = load_run(run)
    assert (data.best_epoch, data.epochs_trained, data.untrained_best) == (0, 4, True)
    assert data.best_record["val/t2i/mrr"] == 0.672
    findings = diagnose(data)
    stop = _by_rule(findings, "stopping")
    assert stop.severity == "warning" and stop.numbers["best_epoch"] == 0
    assert (
        "Best epoch 0 by val/t2i/mrr (max)" in stop.message and "model/ holds the untrained" in stop.message
    )
    under = _by_rule(findings, "under_training")
    assert under.numbers["peak_epoch"] == 0 and "best" not in under.message
    assert "never" in " ".join(f.message for f in findings if f.rule == "recommendation")
    _, md_path = build_report(run)
    md = md_path.read_text()
    assert "4 epoch(s) trained · best epoch 0 (the untrained model: no trained epoch beat it)" in md
    # Every "best epoch N" / "best at epoch N" the page prints names epoch 0.
    assert set(re.findall(r"best(?: at)? epoch (\d+)", md, flags=re.IGNORECASE)) == {"0"}
    assert "its best" not in md  # other epochs are named by what they are: "val loss ... its lowest"


def test_healthy_run_triggers_nothing(tmp_path: Path) -> None:
    findings = diagnose(load_run(healthy_run(tmp_path)))
    assert [f for f in findings if f.severity == "warning"] == []
    assert [f for f in findings if f.rule == "recommendation"] == []
    gap = _by_rule(findings, "generalisation_gap")
    assert gap.numbers["ratio"] == pytest.approx(0.4404 / 0.423)
    under = _by_rule(findings, "under_training")
    assert under.numbers["relative_gain"] == pytest.approx((0.442 - 0.4404) / 0.442)  # 0.36% < 1%: settled
    # t2i mrr mean 0.85 vs i2t 0.80: both intervals are about +-0.01 wide and do not overlap.
    direction = _by_rule(findings, "direction_gap")
    assert direction.numbers["t2i"] == pytest.approx(0.85) and direction.numbers["i2t"] == pytest.approx(0.80)
    assert direction.numbers["method"] == "interval overlap"
    assert direction.numbers["verdict"] == "t2i is stronger"
    assert not [f for f in findings if f.rule == "interval_width"]


def test_interval_too_wide_or_too_few_queries(tmp_path: Path) -> None:
    run = undertrained_run(tmp_path)
    # 10 queries of 0 / 1: the 95% interval of the mean 0.5 spans about 0.2 .. 0.8 (width ~0.6), n < 30.
    write_json(run / "eval" / "test.json", eval_json("test", {"t2i": {"ids": list("abcdefghij"),
                                                                      "values": {"mrr": [0.0, 1.0] * 5}}}))  # fmt: skip
    wide = _by_rule(diagnose(load_run(run)), "interval_width")
    assert wide.severity == "warning"
    assert wide.numbers["widest"]["t2i/mrr"]["n"] == 10
    assert wide.numbers["widest"]["t2i/mrr"]["width"] > 0.2


def test_siamese_direction_is_paired_over_triplets(tmp_path: Path) -> None:
    run = overfitting_run(tmp_path)
    ids = [f"a{i}|p{i}|n{i}" for i in range(40)]
    # t2i right on all 40 triplets, i2t wrong on 10: paired deltas are 0 (x30) and 1 (x10), mean 0.25 > 0.
    ev = eval_json("test", {"triplet": {"ids": ids, "values": {
        "accuracy": [1.0] * 40, "accuracy/t2i": [1.0] * 40, "accuracy/i2t": [1.0] * 30 + [0.0] * 10}}})  # fmt: skip
    write_json(run / "eval" / "test.json", ev)
    direction = _by_rule(diagnose(load_run(run)), "direction_gap")
    assert direction.numbers["method"] == "paired bootstrap"
    assert direction.numbers["diff"] == pytest.approx(0.25)  # 1.0 - 0.75
    assert direction.numbers["verdict"] == "t2i is stronger"
    assert direction.numbers["delta_interval"][0] > 0


def test_unreadable_runs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="metrics.jsonl: not found"):
        load_run(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "epoch", "epoch": 0}\n{oops\n{"kind": "epoch", "epoch": 1}\n')
    with pytest.raises(ReportError) as info:  # rundir's reader: file and line, the parser's reason
        load_run(tmp_path)
    assert str(info.value) == (
        f"{metrics}:2 is damaged: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    )
    # A half-written last line is what a kill mid-append leaves (a resume drops it): the report skips it.
    metrics.write_text('{"kind": "epoch", "epoch": 0}\n{"kind": "epoch", "epoch": 1}\n{"kind": "ep')
    assert [r["epoch"] for r in load_run(tmp_path).epochs] == [0, 1]
    metrics.write_text('{"kind": "epoch", "epoch": "one"}\n')
    with pytest.raises(
        ReportError, match=r"metrics.jsonl: an epoch record needs an integer 'epoch', got 'one'"
    ):
        load_run(tmp_path)


def test_cli_report_names_the_damaged_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cliptune.cli.app import app

    run = overfitting_run(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-3]  # a damaged line inside the file, not the last one
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{run / 'metrics.jsonl'}:2 is damaged: not valid JSON" in result.output


# ---------------------------------------------------------------- the page


def _fashion_images(root: Path, n: int = 8) -> Path:
    from cliptune.data.synthetic import render_fashion

    return render_fashion(root / "fashion", n=n, seed=0)


def full_run(root: Path, catalogue: Path, name: str = "overfit", shift: int = 0) -> Path:
    """The overfitting siamese run plus a retrieval eval with top-k grids and a suite, on real images.

    ``shift`` moves each query's own image to another rank, so two runs differ query by query.
    """
    run = overfitting_run(root, name)
    files = sorted(p.relative_to(catalogue).as_posix() for p in (catalogue / "images").glob("*.png"))
    # Query i's own image sits at rank (i + shift) % 6 + 1 among 5 results (rank 6: not retrieved, mrr 0).
    ranks = [(i + shift) % 6 + 1 for i in range(len(files))]
    others = [[f for f in files[i + 1 :] + files[:i]][:5] for i in range(len(files))]
    top = [
        (o[: r - 1] + [files[i]] + o[r - 1 :])[:5] for i, (o, r) in enumerate(zip(others, ranks, strict=True))
    ]
    ids = [str(i) for i in range(len(files))]
    ev = eval_json("test", {
        "t2i": {"ids": ids, "queries": [f"caption {i}" for i in ids], "top": top,
                "relevant": [[files[i]] for i in range(len(files))],
                "values": {"mrr": [1 / r if r <= 5 else 0.0 for r in ranks],
                           "recall@5": [1.0 if r <= 5 else 0.0 for r in ranks]}},
        "triplet": {"ids": [f"{files[0]}|{files[1]}|{files[2]}", f"{files[3]}|{files[4]}|missing.png"],
                    "values": {"accuracy": [0.0, 0.0], "accuracy/t2i": [1.0, 0.0], "accuracy/i2t": [0.0, 0.0]}},
    }, catalogue=catalogue)  # fmt: skip
    write_json(run / "eval" / "test.json", ev)
    suite = suite_json("fashion-behaviour", [
        {"id": "rips-01", "category": "rips", "text": "ripped jeans", "mrr": 0.25, "passed": False,
         "top": [{"id": files[0], "score": 0.4, "flag": "red"}, {"id": files[1], "score": 0.3, "flag": "yellow"},
                 {"id": files[2], "score": 0.2, "flag": "relevant"}]},
        {"id": "colour-01", "category": "colours", "text": "a red dress", "mrr": 1.0, "passed": True,
         "top": [{"id": files[3], "score": 0.5, "flag": "relevant"}]},
    ], catalogue=catalogue)  # fmt: skip
    write_json(run / "suite" / "fashion-behaviour.json", suite)
    return run


PLOT_IDS = ["plot-loss", "plot-val-triplet", "plot-lr"]


def test_report_page_is_self_contained_and_complete(tmp_path: Path) -> None:
    run = full_run(tmp_path, _fashion_images(tmp_path))
    html_path, md_path = build_report(run)
    html = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "http://" not in html and "https://" not in html
    for plot_id in PLOT_IDS:
        assert f'id="{plot_id}"' in html, plot_id
    # Grids: 8 t2i rows (first 3 + worst 3 of 8, and 5 thumbnails each), wrong triplets, the suite.
    assert 'id="grid-test-t2i"' in html and 'id="grid-test-triplets"' in html
    assert 'id="grid-suite-fashion-behaviour"' in html
    assert html.count("data:image/jpeg;base64,") >= 6 * 5
    assert "missing.png" in html and 'class="missing"' in html  # an unreadable image is shown, not dropped
    md = md_path.read_text()
    assert "## Diagnostics" in md and "generalisation gap" in md and "| rips |" in md
    assert "🔴`images/000000.png`" in md


def test_report_command_prints_paths_and_findings(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    run = lr_cuts_run(tmp_path)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output and "lr_schedule" in result.output
    assert result.output.index("warning") < result.output.index("info")
    bad = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "run directory not found" in bad.output


def test_real_training_run_end_to_end(tmp_path: Path) -> None:
    from cliptune.config import load_config
    from cliptune.train.run import train
    from tests.tiny_models import make_tiny_clip

    catalogue = _fashion_images(tmp_path, n=40)
    cfg = {
        "name": "tiny",
        "data": {"catalogue": str(catalogue), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
        "model": {"backbone": str(make_tiny_clip(tmp_path / "clip")), "trainable_layers": 1,
                  "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 3, "batch_size": 16, "lr": 2e-3, "early_stopping": None},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = train(load_config(tmp_path / "cfg.yaml"), runs_root=tmp_path / "runs", quiet=True)
    html_path, _ = build_report(run)
    html = html_path.read_text()
    for plot_id in ["plot-loss", "plot-val-recall", "plot-val-mrr", "plot-lr"]:
        assert f'id="{plot_id}"' in html, plot_id
    lr = _by_rule(diagnose(load_run(run)), "lr_schedule")
    assert lr.numbers["cuts"] == json.loads((run / "summary.json").read_text())["lr_reductions"]
