"""Seed 001 (an 80/20 split run against a 60/40 one) done honestly by `compare` and splits_analysis.

Two tiny-CLIP runs on one fashion catalogue differ only in ``data.split.ratios``. Their val sets are
different data (and different gallery sizes), so compare must flag the query sets, mark every eval
delta unpaired, give relative changes of training-log values without calling them better or worse
(no verdict) and the training dynamics; the like-for-like comparison is on the groups neither run
trained on, where deltas are paired.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cliptune.config import load_config
from cliptune.data.synthetic import render_fashion
from cliptune.evaluation.run import evaluate_run, write_eval
from cliptune.report import compare_runs
from cliptune.report.compare import metric_deltas
from cliptune.report.splits_analysis import (
    SHARED_SPLIT,
    shared_heldout_eval,
    shared_heldout_groups,
    split_differences,
)
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip

VERDICTS = {"better", "worse", "not distinguishable", "no verdict"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seed001")
    fashion, clip = render_fashion(root / "fashion", n=100, seed=0), make_tiny_clip(root / "clip")
    out = {}
    for name, ratios in (("split80", "{train: 0.8, val: 0.2}"), ("split60", "{train: 0.6, val: 0.4}")):
        cfg = load_config(None, [
            f"name={name}", f"data.catalogue={fashion}", f"data.split.ratios={ratios}", f"model.backbone={clip}",
            "model.trainable_layers=0", f"model.cache_dir={root / 'cache'}", "train.epochs=4",
            "train.batch_size=16", "train.lr=0.05", "train.early_stopping=null", "train.plateau.patience=0",
            "eval.bootstrap=200",
        ])  # fmt: skip
        out[name] = train(cfg, runs_root=root / "runs", quiet=True)
        write_eval(evaluate_run(out[name], ["val"], progress=False)["val"], out[name])
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_compare_flags_different_splits_and_keeps_seed001_wording(runs: dict[str, Path]) -> None:
    a, b = runs["split80"], runs["split60"]
    html, md = compare_runs([a, b], baseline=a)
    data = json.loads((html.parent / "compare.json").read_text())
    text = md.read_text()
    n_a = json.loads((a / "eval" / "val.json").read_text())["n_rows"]
    n_b = json.loads((b / "eval" / "val.json").read_text())["n_rows"]
    assert n_a < n_b  # 20% vs 40% of the groups

    # Different query sets: flagged per direction, and every eval delta is unpaired with a real verdict word.
    for direction in ("t2i", "i2t"):
        assert any(f.startswith(f"split60: val {direction}: the runs were evaluated on different queries") for f in data["flags"])  # fmt: skip
    deltas = data["deltas"]["split60"]["val"]
    assert deltas and all(not d["paired"] for d in deltas if d["interval"] is not None)
    assert {d["verdict"] for d in deltas} <= VERDICTS
    assert "(unpaired)" in text or all(d["verdict"] == "no verdict" for d in deltas)

    # Seed-001 wording from the training log at the best epoch, recomputed by hand: |b - a| / |a|.
    va, vb = _summary(a)["best"]["val/loss"], _summary(b)["best"]["val/loss"]
    pct = 100 * abs(vb - va) / abs(va)
    word = "lower" if vb < va else "higher"  # no per-query values, no verdict: never "better"
    number = f"{pct:.0f}" if pct >= 10 else f"{pct:.2g}"
    assert f"| val/loss | {va:.5g} | {vb:.5g} | {number}% {word} | no verdict |" in text
    ta, tb = _summary(a)["best"]["train/loss"], _summary(b)["best"]["train/loss"]
    assert f"| train/loss | {ta:.5g} | {tb:.5g} |" in text  # a train loss is only "higher"/"lower"
    assert "training-log values below are measured on different data" in text

    # Training dynamics: final LR and plateau cuts (as summary.json counts them), the train-val gap.
    cuts_a, cuts_b = _summary(a)["lr_reductions"], _summary(b)["lr_reductions"]
    lr_a, lr_b = _summary(a)["lr_final"], _summary(b)["lr_final"]
    assert cuts_a + cuts_b > 0  # patience 0 at lr 0.05: the plateau scheduler cut at least once
    word = "a higher" if lr_b > lr_a else "a lower" if lr_b < lr_a else "the same"
    assert f"split60 ended with {word} LR" in text and f"after {cuts_b} plateau cut(s) vs {cuts_a}" in text
    assert "Train-val loss gap: split60 val/train" in text


def test_split_analysis_names_the_differences_and_compares_like_for_like(runs: dict[str, Path]) -> None:
    a, b = runs["split80"], runs["split60"]
    sa, sb = (json.loads((r / "splits.json").read_text()) for r in (a, b))
    lines = split_differences(a, b)
    assert lines[0] == "split ratios differ: split80 {train: 0.8, val: 0.2} vs split60 {train: 0.6, val: 0.4}"
    assert lines[1] == (f"groups per split (split80 vs split60): train {len(sa['train'])} vs {len(sb['train'])}, "
                        f"val {len(sa['val'])} vs {len(sb['val'])}")  # fmt: skip
    assert any(line.startswith("val galleries differ: ") for line in lines)
    assert split_differences(a, a) == []

    # Held out from both = every group minus either train split (a naive set computation as the oracle).
    shared = shared_heldout_groups(a, b)
    every = set(sa["train"]) | set(sa["val"])
    assert set(shared) == every - set(sa["train"]) - set(sb["train"]) and shared
    assert set(shared) <= set(sa["val"]) & set(sb["val"])
    assert f"{len(shared)} group(s) are held out from both runs" in lines[2]

    ev_a, ev_b = shared_heldout_eval(a, b, bootstrap=200)
    assert ev_a["split"] == ev_b["split"] == SHARED_SPLIT and ev_a["n_rows"] == ev_b["n_rows"]
    assert ev_a["per_query"]["t2i"]["query_ids"] == ev_b["per_query"]["t2i"]["query_ids"]
    deltas, flags = metric_deltas(ev_a, ev_b)
    assert flags == [] and deltas and all(d.paired for d in deltas)  # one gallery: paired verdicts
    assert {d.verdict for d in deltas} <= VERDICTS - {"no verdict"}
