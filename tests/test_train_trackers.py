"""Experiment trackers: TensorBoard, W&B (offline) and MLflow (SQLite) get the records of metrics.jsonl."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import pytest

from cliptune.config import Config, TrackConfig, load_config
from cliptune.data.synthetic import render_fashion
from cliptune.train import trackers
from cliptune.train.errors import TrainingError
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip


def _epochs(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


def _wandb_summary(run_file: Path) -> dict[str, float]:
    """Final summary of an offline W&B run, read from its ``run-*.wandb`` log (LevelDB-style records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, buf, summary = run_file.read_bytes(), 7, b"", {}
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768  # records never straddle a block header; < 7 bytes left is padding
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        buf, pos = buf + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "summary":
                for u in record.summary.update:
                    summary[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return summary


def test_flatten_config_gives_flat_scalars() -> None:
    cfg = load_config(None, ["name=x", "train.lr=0.001", "train.grad_clip=null"])
    flat = trackers.flatten_config(cfg)
    assert flat["name"] == "x"
    assert flat["train.lr"] == 0.001
    assert flat["train.grad_clip"] == "null"  # TensorBoard hparams reject None
    assert flat["eval.k"] == "[1, 5, 10]"  # lists as JSON
    assert flat["train.early_stopping.patience"] == 5
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_missing_tracker_package_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trackers, "_is_installed", lambda module: module != "wandb")
    cfg = load_config(None, ["name=t", "track=[tensorboard, wandb]", f"data.catalogue={tmp_path / 'none'}"])
    with pytest.raises(TrainingError, match=r"'wandb' package is not installed: pip install wandb"):
        train(cfg, runs_root=tmp_path)
    assert not (tmp_path / "t").exists()  # nothing was started or written


def test_skinny_mlflow_cannot_use_the_local_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(trackers, "_has_full_mlflow", lambda: False)
    with pytest.raises(TrainingError, match="needs the full 'mlflow' package"):
        trackers.check_trackers(TrackConfig(trackers=["mlflow"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    trackers.check_trackers(TrackConfig(trackers=["mlflow"]))  # a server needs only mlflow-skinny


def test_trackers_receive_the_metrics_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cat = render_fashion(tmp_path / "fashion", n=40, seed=0)
    cfg = Config.model_validate(
        {
            "name": "tracked",
            "data": {"catalogue": str(cat), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
            "model": {
                "backbone": str(make_tiny_clip(tmp_path / "clip")),
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", "early_stopping": None},
            "track": {"trackers": ["tensorboard", "wandb", "mlflow"], "project": "demo"},
        }
    )
    run_dir = train(cfg, runs_root=tmp_path / "runs", quiet=True)
    epochs = _epochs(run_dir)
    steps = [r["step"] for r in epochs]  # epoch 0 at step 0, then each epoch's last step
    recall = [r["val/t2i/recall@5"] for r in epochs]

    # TensorBoard: the same values at the same steps, under the project's folder in the run directory.
    acc = EventAccumulator(str(run_dir / "tensorboard" / "demo"))
    acc.Reload()
    scalars = acc.Scalars("val/t2i/recall@5")
    assert [s.step for s in scalars] == steps
    assert [s.value for s in scalars] == pytest.approx(recall, abs=1e-6)  # float32 in the event file
    assert [s.value for s in acc.Scalars("train/loss")] == pytest.approx(
        [r["train/loss"] for r in epochs[1:]]
    )

    # W&B: an offline run inside the run directory whose summary holds the last epoch's values.
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    summary = _wandb_summary(run_file)
    assert summary["val/loss"] == pytest.approx(epochs[-1]["val/loss"])
    assert summary["val/t2i/recall@5"] == pytest.approx(recall[-1])
    assert summary["epoch"] == 2

    # MLflow: a SQLite store in the run directory, '@' spelt '_at_' (MLflow forbids it), config as params.
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        rows = db.execute(
            "SELECT step, value FROM metrics WHERE key = 'val/t2i/recall_at_5' ORDER BY step"
        ).fetchall()
        params = dict(db.execute("SELECT key, value FROM params").fetchall())
    assert [step for step, _ in rows] == steps
    assert [value for _, value in rows] == pytest.approx(recall)
    assert params["train.batch_size"] == "8"
