"""`cliptune train` on the siamese task logs every seed-000 figure and learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import DataConfig
from cliptune.data.prepare import prepare_data
from cliptune.data.synthetic import render_art
from cliptune.data.triplets import make_triplets

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
        "loss": {"name": "siamese"},
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
