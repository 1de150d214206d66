"""`cliptune train` on the siamese task logs every seed-000 figure and learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import DataConfig, load_config
from cliptune.data.prepare import prepare_data
from cliptune.data.synthetic import render_art
from cliptune.data.triplets import make_triplets
from cliptune.models.factory import load_backbone
from cliptune.models.siamese import SiameseHead
from cliptune.train.tasks.retrieval import cached_features
from tests.test_losses_siamese import ref_terms

runner = CliRunner()

SEED_000_KEYS = [
    "val/loss", "val/image", "val/text", "val/cross", "val/i2t", "val/t2i",
    "val/triplet/accuracy", "val/triplet/accuracy/image", "val/triplet/accuracy/text",
    "val/triplet/accuracy/cross", "val/triplet/accuracy/i2t", "val/triplet/accuracy/t2i",
    "train/loss", "train/triplet/accuracy", "lr",
]  # fmt: skip


def test_siamese_run_logs_seed_000_metrics(tmp_path: Path) -> None:
    art = render_art(tmp_path / "art", n=24, seed=0)
    cfg = {
        "data": {"catalogue": str(art), "split": {"ratios": {"train": 0.6, "val": 0.4}}},
        "model": {"cache_dir": str(tmp_path / "cache"), "head": {"width": 32, "depth": 1, "heads": 2}},
        "loss": {"name": "triplet"},
        "train": {"task": "siamese", "epochs": 6, "batch_size": 8, "lr": 1e-3, "early_stopping": None},
    }
    path = tmp_path / "siam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path), "--name", "s", "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "s"
    epochs = [
        r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "epoch"
    ]
    for key in SEED_000_KEYS:
        assert key in epochs[-1], key
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    assert epochs[-1]["train/loss"] < epochs[1]["train/loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["info"]["triplets"]["train"] > 0 and summary["info"]["triplets"]["val"] > 0
    assert (run_dir / "model" / "head").is_dir()


def test_triplets_never_cross_splits(tmp_path: Path) -> None:
    art = render_art(tmp_path / "art", n=20, seed=1)
    data = prepare_data(DataConfig(catalogue=art, split={"ratios": {"train": 0.5, "val": 0.5}}))
    triplets, redrawn = make_triplets(data, "group", seed=0)
    split = data.rows["split"].to_numpy()
    groups = data.rows["group"].to_numpy()
    n_explicit = len(data.check.good_triplets)
    for name, t in triplets.items():
        assert (split[t] == name).all()  # all three members in the split
        assert (groups[t[:, 0]] == groups[t[:, 1]]).all()
        assert (groups[t[:, 0]] != groups[t[:, 2]]).all()
    # Every explicit triplet whose anchor and positive share a split is kept (3 derivatives per original).
    assert sum(len(t) for t in triplets.values()) == n_explicit
    assert sum(redrawn.values()) > 0
    assert np.unique(np.concatenate([t[:, 1] for t in triplets.values()])).size == n_explicit


def _epochs(run_dir: Path) -> list[dict[str, float]]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == "epoch"]


def _untrained_val_outputs(run_dir: Path) -> list[dict[str, list[list[float]]]]:
    """Head outputs of the val triplets for the head as built at step 0 (same seed, same features)."""
    cfg = load_config(run_dir / "config.yaml")
    data = prepare_data(cfg.data, run_dir)  # reuses the run's splits.json
    backbone = load_backbone(cfg.model.backbone)
    images, texts = cached_features(backbone, data, cfg, torch.device("cpu"), False)
    val = make_triplets(data, cfg.data.group_column, cfg.data.split.seed)[0]["val"]
    h = cfg.model.head
    torch.manual_seed(cfg.train.seed)  # what build_siamese does right before building the head
    head = SiameseHead(
        images.shape[1], texts.shape[1], width=h.width, depth=h.depth, heads=h.heads, dropout=h.dropout
    ).eval()
    with torch.no_grad():
        return [
            {k: v.double().tolist() for k, v in head(images[val[:, r]], texts[val[:, r]]).as_dict().items()}
            for r in range(3)
        ]


def test_siamese_run_trains_the_configured_contrastive_loss(tmp_path: Path) -> None:
    # Seed 000 trained loss.name: contrastive; the run must train Hadsell's loss, say so, and learn.
    art = render_art(tmp_path / "art", n=24, seed=0)
    cfg = {
        "data": {"catalogue": str(art), "split": {"ratios": {"train": 0.6, "val": 0.4}}},
        "model": {"cache_dir": str(tmp_path / "cache"), "head": {"width": 32, "depth": 1, "heads": 2}},
        "loss": {"name": "contrastive", "margin": 0.5},
        "train": {"task": "siamese", "epochs": 3, "batch_size": 8, "lr": 1e-3, "early_stopping": None},
    }
    path = tmp_path / "siam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path), "--name", "c", "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "c"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["loss"]["name"] == "contrastive" and saved["train"]["task"] == "siamese"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["info"]["loss"]["name"] == "contrastive"
    epochs = _epochs(run_dir)
    for key in SEED_000_KEYS:
        assert key in epochs[-1], key

    # Step 0's val/loss is the untrained head's objective: recompute it with the loop reference.
    a, p, n = _untrained_val_outputs(run_dir)

    def objective(loss: str) -> float:
        def term(ka: str, kp: str) -> list[float]:
            return ref_terms(loss, a[ka], p[kp], n[kp], 0.5, 0.07, "cosine")

        image, text, fused = term("image", "image"), term("text", "text"), term("fused", "fused")
        i2t, t2i = term("image", "text"), term("text", "image")
        per = [x + y + z + (u + v) / 2 for x, y, z, u, v in zip(image, text, fused, i2t, t2i, strict=True)]
        return sum(per) / len(per)

    first = epochs[0]
    assert first["epoch"] == 0 and first["step"] == 0
    assert first["val/loss"] == pytest.approx(objective("contrastive"), rel=1e-4)
    assert abs(first["val/loss"] - objective("triplet")) > 1e-2  # not the triplet margin any more
    # ... and it learns
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    assert epochs[-1]["train/loss"] < epochs[1]["train/loss"]


def test_siamese_loss_task_mismatch_fails_before_any_work(tmp_path: Path) -> None:
    cfg = {
        "data": {"catalogue": str(tmp_path / "missing")},
        "loss": {"name": "siglip"},
        "train": {"task": "siamese"},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path), "--name", "x", "--runs", str(tmp_path / "runs")])
    assert result.exit_code != 0
    assert "loss.name='siglip' does not fit train.task='siamese'" in result.output
    assert not (tmp_path / "runs").exists()  # nothing embedded, no run directory
