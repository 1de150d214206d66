"""`cliptune train` on the retrieval task: the embedded backbone learns, a tiny CLIP trains its last layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import load_backbone
from cliptune.report import diagnose, load_run
from cliptune.report.build import report_document
from cliptune.train.checkpoint import latest_checkpoint
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_fashion(tmp_path_factory.mktemp("cat") / "fashion", n=160, seed=0)


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the embedded-backbone runs: the towers run once per module, not per test."""
    return tmp_path_factory.mktemp("embedded-cache")


def _epochs(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


def _config(tmp_path: Path, fashion: Path, **sections: dict) -> Path:
    cfg = {
        "data": {"catalogue": str(fashion), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
        "model": {"cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 6, "batch_size": 16, "lr": 2e-3, "early_stopping": None},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_embedded_backbone_learns_on_cached_features(
    tmp_path: Path, fashion: Path, embedded_cache: Path
) -> None:
    cfg = _config(tmp_path, fashion, model={"cache_dir": str(embedded_cache)})
    result = runner.invoke(app, ["train", str(cfg), "--name", "emb", "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "emb"
    epochs = _epochs(run_dir)
    before, after = epochs[0]["val/t2i/recall@5"], max(e["val/t2i/recall@5"] for e in epochs[1:])
    assert after > before + 0.15, (before, after)  # random projections vs trained: well above
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_trained"] == 6  # epoch 0, the untrained baseline, is validated, not trained
    assert (summary["best_epoch"], summary["best_is_untrained"]) == (6, False)  # no early stopping: the last
    assert summary["info"]["feature_dims"] == [1280, 384]
    # no pretrained similarity on the embedded towers: the documented default, as before
    assert summary["info"]["loss_init"] == {"temperature": 0.07, "source": "default"}
    assert summary["info"]["trainable_parameters"] == (1280 + 1) * 256 + (384 + 1) * 256
    assert set(json.loads((run_dir / "splits.json").read_text())) == {"train", "val"}
    # The best model reloads and embeds like the trained heads did.
    assert load_backbone(run_dir / "model").features_frozen

    # Second run: every feature comes from the cache (the towers never run).
    again = runner.invoke(app, ["train", str(cfg), "--name", "emb2", "--runs", str(tmp_path / "runs"), "-q"])
    assert again.exit_code == 0, again.output
    assert _epochs(tmp_path / "runs" / "emb2") == epochs


def test_tiny_clip_trains_its_last_layer(tmp_path: Path, fashion: Path) -> None:
    clip = make_tiny_clip(tmp_path / "tiny-clip")
    cfg = _config(
        tmp_path, fashion, model={"backbone": str(clip), "trainable_layers": 1}, train={"epochs": 3}
    )
    result = runner.invoke(app, ["train", str(cfg), "--name", "clip", "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    epochs = _epochs(tmp_path / "runs" / "clip")
    assert epochs[-1]["train/loss"] < epochs[1]["train/loss"]
    assert (tmp_path / "runs" / "clip" / "model" / "cliptune_backbone.json").exists()
    # InfoNCE started at CLIP's pretrained temperature 1 / exp(logit_scale); config.yaml keeps "not set"
    summary = json.loads((tmp_path / "runs" / "clip" / "summary.json").read_text())
    scale = load_backbone(clip).similarity_init["logit_scale"]
    assert summary["info"]["loss_init"] == {
        "temperature": pytest.approx(math.exp(-scale)),
        "source": "pretrained",
    }
    assert (
        yaml.safe_load((tmp_path / "runs" / "clip" / "config.yaml").read_text())["loss"]["temperature"]
        is None
    )


def test_existing_run_is_not_overwritten(tmp_path: Path, fashion: Path) -> None:
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "metrics.jsonl").write_text("")
    cfg = _config(tmp_path, fashion)
    result = runner.invoke(app, ["train", str(cfg), "--name", "x", "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 1
    assert "already holds a run" in result.output


def test_the_untrained_model_is_kept_when_training_never_beats_it(
    tmp_path: Path, fashion: Path, embedded_cache: Path
) -> None:
    # Deterministic "training makes the watched metric worse": training raises val/t2i/mrr from the random
    # heads' baseline, and early stopping watches it with mode min. The same run with mode max is the
    # normal case: it keeps its best trained epoch.
    runs, console = tmp_path / "runs", {}
    for mode in ("min", "max"):
        stopping = {"early_stopping": {"metric": "val/t2i/mrr", "mode": mode, "patience": 2}, "epochs": 4}
        cfg = _config(tmp_path, fashion, model={"cache_dir": str(embedded_cache)}, train=stopping)
        result = runner.invoke(app, ["train", str(cfg), "--name", mode, "--runs", str(runs), "-q"])
        assert result.exit_code == 0, result.output
        console[mode] = result.output
    worse, normal = runs / "min", runs / "max"
    mrr = {e["epoch"]: e["val/t2i/mrr"] for e in _epochs(worse)}
    assert list(mrr) == [0, 1, 2] and min(mrr.values()) == mrr[0]  # patience 2 counted from epoch 0
    summary = json.loads((worse / "summary.json").read_text())
    assert (summary["epochs_trained"], summary["best_epoch"], summary["best_is_untrained"]) == (2, 0, True)
    assert summary["best"]["epoch"] == 0 and summary["best"]["val/t2i/mrr"] == mrr[0]
    assert "did not improve for 2 epoch(s)" in summary["stop_reason"]
    assert "no trained epoch beat the untrained model (epoch 0) on val/t2i/mrr" in console["min"]
    # model/ is the untrained model: evaluating it on val gives epoch 0's value, not epoch 2's.
    evaluated = runner.invoke(app, ["eval", str(worse), "--split", "val", "-q"])
    assert evaluated.exit_code == 0, evaluated.output
    val = json.loads((worse / "eval" / "val.json").read_text())["metrics"]["t2i/mrr"]["mean"]
    assert val == pytest.approx(mrr[0], abs=1e-6) and val != pytest.approx(mrr[2], abs=1e-3)
    # The report reads the same summary: its subtitle and the stopping rule say epoch 0, the untrained model.
    run = load_run(worse)
    doc = report_document(run, diagnose(run))
    assert "best epoch 0 (the untrained model: no trained epoch beat it)" in doc.subtitle
    assert "model/ holds the untrained weights" in next(
        f.message for f in diagnose(run) if f.rule == "stopping"
    )

    normal_mrr = {e["epoch"]: e["val/t2i/mrr"] for e in _epochs(normal) if e["epoch"] > 0}
    summary = json.loads((normal / "summary.json").read_text())
    assert summary["best_epoch"] == max(normal_mrr, key=normal_mrr.__getitem__) > 0
    assert summary["best_is_untrained"] is False and "no trained epoch beat" not in console["max"]


def test_resume_loads_exactly_the_saved_keys_of_a_partly_frozen_clip(tmp_path: Path, fashion: Path) -> None:
    # Frozen tower weights are left out of checkpoints on purpose; the resume must load exactly the saved
    # (trainable + buffer) keys: an intact checkpoint resumes, one with a renamed key is refused by name.
    clip = make_tiny_clip(tmp_path / "tiny-clip")
    cfg = _config(
        tmp_path, fashion, model={"backbone": str(clip), "trainable_layers": 1}, train={"epochs": 1}
    )
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["train", str(cfg), "--name", "c", "--runs", str(runs), "-q"]).exit_code == 0
    run_dir = runs / "c"
    weights = latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"
    saved = load_file(weights)
    # trainable_layers 1: the last encoder layer of each tower is stored, the frozen first one and the
    # embeddings are not
    assert any(".encoder.layers.1." in k for k in saved)
    assert not any(".encoder.layers.0." in k or "embeddings." in k for k in saved)
    resumed = runner.invoke(app, ["train", "--resume", str(run_dir), "-q"])
    assert resumed.exit_code == 0, resumed.output

    key = sorted(saved)[0]
    save_file({("renamed." + k if k == key else k): v for k, v in saved.items()}, weights)
    (weights.parent / "manifest.json").unlink()  # a whole checkpoint of another model, not a damaged one
    broken = runner.invoke(app, ["train", "--resume", str(run_dir), "-q"])
    assert broken.exit_code == 1
    assert f"{weights}: weights do not match the architecture" in broken.output
    assert f"1 missing: {key}" in broken.output and f"1 unexpected: renamed.{key}" in broken.output
    assert "Traceback" not in broken.output
