"""Multi-process training on CPU (gloo): 2 processes x batch 8 train exactly like 1 process x batch 16;
a resume must use the same number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from cliptune.config import load_config
from cliptune.data.synthetic import render_fashion
from cliptune.train.errors import LauncherMismatchError, TrainingError, WorldSizeMismatchError
from cliptune.train.loop import fit
from cliptune.train.run import _check_processes, train
from tests.tiny_models import make_tiny_clip
from tests.toy_task import make_bundle, toy_train_config


def _config(tmp_path: Path, catalogue: Path, clip: Path, batch_size: int) -> Path:
    cfg = {
        "data": {"catalogue": str(catalogue), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
        "model": {"backbone": str(clip), "cache_dir": str(tmp_path / "cache")},  # frozen towers, cached
        "train": {"epochs": 2, "batch_size": batch_size, "lr": 0.01, "precision": "fp32",
                  "early_stopping": None, "log_every_steps": 1},
    }  # fmt: skip
    path = tmp_path / f"batch{batch_size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    catalogue = render_fashion(tmp_path / "fashion", n=48, seed=0)
    clip = make_tiny_clip(tmp_path / "clip")
    runs = tmp_path / "runs"
    # One process, batch 16, in this process (it also fills the feature cache the other run reads).
    one = train(load_config(_config(tmp_path, catalogue, clip, 16), ["name=one"]), runs_root=runs, quiet=True)
    # Two processes, batch 8 each, launched the way a user would.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cliptune", "train", str(_config(tmp_path, catalogue, clip, 8)), "--name", "two",
           "--runs", str(runs), "-q"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = runs / "two"

    a, b = _records(one), _records(two)
    # One metrics.jsonl, each record once: (kind, epoch, step) never repeats and matches the 1-process run.
    keys = [(r["kind"], r["epoch"], r["step"]) for r in b]
    assert keys == [(r["kind"], r["epoch"], r["step"]) for r in a]
    assert len(set(keys)) == len(keys)
    assert [r["kind"] for r in a].count("epoch") == 3  # baseline + 2 epochs
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if isinstance(value, float):  # train/* averaged over processes, val/* on gathered embeddings
                assert rb[key] == pytest.approx(value, abs=1e-5), (ra["kind"], ra["step"], key)

    # The trained projections are the same (DDP-averaged gradients of the gathered InfoNCE loss).
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in ("visual_projection.weight", "text_projection.weight"):
        assert (wa[key] - wb[key]).abs().max() < 1e-5, key

    # One checkpoint folder per save (end of each epoch), nothing half-written left behind.
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    steps = [r["step"] for r in a if r["kind"] == "epoch"][1:]
    assert names == ["latest", *(f"step-{s:08d}" for s in steps)]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2


def test_launcher_and_accelerate_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. `accelerate launch --cpu --num_processes 2` starts one process; a plain Accelerator() under
    # torchrun on CPU would see one: either way the run must not silently train N separate copies.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        TrainingError, match=r"started 2 processes \(WORLD_SIZE\) but Accelerate sees 1"
    ) as info:
        _check_processes(SimpleNamespace(num_processes=1))
    assert isinstance(info.value, LauncherMismatchError)
    assert (info.value.launched, info.value.seen) == (2, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    _check_processes(SimpleNamespace(num_processes=1))


def test_resume_with_another_process_count_is_refused(tmp_path: Path) -> None:
    cfg = toy_train_config(epochs=1, batch_size=50, early_stopping=None)
    fit(make_bundle(), cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    trainer = tmp_path / "checkpoints" / "step-00000004" / "trainer.json"
    state = json.loads(trainer.read_text())
    assert state["processes"] == 1
    trainer.write_text(json.dumps({**state, "processes": 2}))  # as if written by a 2-process run
    (trainer.parent / "manifest.json").unlink()  # whole, not damaged: a checkpoint from before manifests
    with pytest.raises(TrainingError, match=r"run with 2 process\(es\); this resume has 1") as info:
        fit(make_bundle(), cfg.model_copy(update={"epochs": 2}), tmp_path, Accelerator(cpu=True), resume=True)
    assert isinstance(info.value, WorldSizeMismatchError)
    assert (info.value.saved, info.value.now) == (2, 1)
    assert info.value.checkpoint == trainer.parent
