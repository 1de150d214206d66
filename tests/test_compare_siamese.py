"""Seed 001 on real Siamese runs: every accuracy and loss term in compare's tables, and `--heldout`.

Two tiny Siamese runs of the synthetic art catalogue differ only in their split ratios (80/20 and 60/40),
as in seed 001. compare's log table and leaderboard must list every line the seed reads (triplet accuracy,
image / text / cross losses, cross / i2t / t2i accuracies); `compare --heldout` re-evaluates both models on
the groups neither trained on, where every delta pairs query by query.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cliptune.cli.report import register
from cliptune.config import load_config
from cliptune.data.synthetic import render_art
from cliptune.evaluation.run import evaluate_run, write_eval
from cliptune.report import compare_runs
from cliptune.report.splits_analysis import SHARED_SPLIT, NoSharedHeldoutError
from cliptune.train.run import train
from tests.test_report import write_run
from tests.tiny_models import make_tiny_clip

runner = CliRunner()

# Seed 001's lines as the training log names them (best epoch), and the eval metrics of its accuracies.
SEED_001_LOG = [
    "train/loss",
    "train/triplet/accuracy",
    "val/loss",
    "val/triplet/accuracy",
    "val/image",
    "val/text",
    "val/cross",
    "val/triplet/accuracy/text",
    "val/triplet/accuracy/cross",
    "val/triplet/accuracy/i2t",
    "val/triplet/accuracy/t2i",
]
ACCURACIES = ["accuracy", "accuracy/image", "accuracy/text", "accuracy/cross", "accuracy/i2t", "accuracy/t2i"]
LOSS_TERMS = ["loss", "image", "text", "fused", "cross", "i2t", "t2i"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("siamese001")
    art, clip = render_art(root / "art", n=30, seed=0), make_tiny_clip(root / "clip")
    out = {}
    for name, ratios in (("split80", "{train: 0.8, val: 0.2}"), ("split60", "{train: 0.6, val: 0.4}")):
        overrides = [
            f"name={name}",
            f"data.catalogue={art}",
            f"data.split.ratios={ratios}",
            f"model.backbone={clip}",
            "model.trainable_layers=0",
            f"model.cache_dir={root / 'cache'}",
            "model.head.width=16",
            "model.head.depth=1",
            "model.head.heads=2",
            "loss.name=contrastive",
            "train.task=siamese",
            "train.epochs=2",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.early_stopping=null",
            "eval.bootstrap=200",
        ]
        out[name] = train(load_config(None, overrides), runs_root=root / "runs", quiet=True)
        for ev in evaluate_run(out[name], None, progress=False).values():  # train and val
            write_eval(ev, out[name])
    return out


def _best(run: Path) -> dict[str, float]:
    best: dict[str, float] = json.loads((run / "summary.json").read_text())["best"]
    return best


def test_log_table_and_leaderboard_list_every_seed001_line(runs: dict[str, Path], tmp_path: Path) -> None:
    a, b = runs["split80"], runs["split60"]
    _, md = compare_runs([a, b], baseline=a, out=tmp_path / "cmp")
    text = md.read_text()
    ba, bb = _best(a), _best(b)
    for key in SEED_001_LOG:  # the training log at the best epoch, with a neutral relative change
        assert f"| {key} | {ba[key]:.5g} | {bb[key]:.5g} |" in text, key
    for term in ("image", "text", "cross", "i2t", "t2i"):  # the loss terms' row in the leaderboard
        assert f"| train/{term} |" in text and f"| val/{term} |" in text
    loss_row = "| split80 | val (log) | " + " | ".join(f"{ba[f'val/{t}']:.4f}" for t in LOSS_TERMS)
    assert loss_row.replace("**", "") in text.replace("**", "")
    # The triplet leaderboard: every accuracy, from eval/val.json, per run and split.
    header = "| run | split | " + " | ".join(ACCURACIES) + " | loss |"
    assert header in text
    val = json.loads((b / "eval" / "val.json").read_text())["metrics"]
    row = "| split60 | val | " + " | ".join(f"{val[f'triplet/{k}']['mean']:.4f}" for k in ACCURACIES)
    assert row in text.replace("**", "")


def test_heldout_gives_paired_verdicts_on_common_groups(runs: dict[str, Path], tmp_path: Path) -> None:
    a, b = runs["split80"], runs["split60"]
    app = typer.Typer()
    register(app)
    plain = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert "different queries" in plain.output and "--heldout" in plain.output

    out = tmp_path / "held"
    result = runner.invoke(
        app, ["compare", str(a), str(b), "--heldout", "--out", str(out)], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    # The common held-out groups, computed naively from both splits.json files.
    sa, sb = (json.loads((r / "splits.json").read_text()) for r in (a, b))
    every = {g for s in (sa, sb) for groups in s.values() for g in groups}
    assert data["heldout"]["groups"] == sorted(every - set(sa["train"]) - set(sb["train"]))
    deltas = data["deltas"]["split60"][SHARED_SPLIT]
    names = {d["metric"] for d in deltas}
    assert {f"triplet/{k}" for k in ACCURACIES} <= names and "t2i/mrr" in names
    assert all(d["paired"] and d["verdict"] in {"better", "worse", "not distinguishable"} for d in deltas)
    # The deltas are those of the held-out evaluations written beside compare.json.
    ev_a, ev_b = (
        json.loads((out / "heldout" / r / f"{SHARED_SPLIT}.json").read_text()) for r in ("split80", "split60")
    )
    assert ev_a["per_query"]["triplet"]["query_ids"] == ev_b["per_query"]["triplet"]["query_ids"]
    assert deltas[0]["baseline"] == ev_a["metrics"][deltas[0]["metric"]]["mean"]
    assert deltas[0]["candidate"] == ev_b["metrics"][deltas[0]["metric"]]["mean"]
    assert f"split60 vs split80 on {SHARED_SPLIT}" in result.output
    assert "(unpaired" not in result.output.split(f"on {SHARED_SPLIT}")[-1]
    assert data["best"]["split"] == SHARED_SPLIT and data["best"]["metric"] == "triplet/accuracy"
    assert data["summary"]["split60"]["splits"] == [SHARED_SPLIT]  # only the like-for-like rows count


def test_heldout_without_common_groups_is_a_typed_error(tmp_path: Path) -> None:
    # Two runs that together train on every group: nothing is held out from both (no model is loaded).
    cfg = {"data": {"catalogue": str(tmp_path / "cat")}}
    a = write_run(tmp_path / "a", [{"lr": 1e-3}], {}, cfg, {"train": ["g0", "g1"], "val": ["g2"]})
    b = write_run(tmp_path / "b", [{"lr": 1e-3}], {}, cfg, {"train": ["g2"], "val": ["g0", "g1"]})
    with pytest.raises(NoSharedHeldoutError, match="no group is held out from every run") as info:
        compare_runs([a, b], heldout=True, out=tmp_path / "o")
    assert info.value.trained == [2, 1]
    app = typer.Typer()
    register(app)
    result = runner.invoke(app, ["compare", str(a), str(b), "--heldout", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no group is held out from every run" in result.output
    assert "compare without --heldout" in result.output  # the CLI's hint names the way out
