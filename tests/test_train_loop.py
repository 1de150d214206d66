"""The training loop on a toy task: learning, plateau LR cuts, early stopping, exact resume after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from cliptune.config import EarlyStoppingConfig, PlateauConfig
from cliptune.models.backbone import WeightsMismatchError
from cliptune.train.checkpoint import latest_checkpoint
from cliptune.train.errors import EmptyEpochError, NothingToResumeError, TrainingError, UnknownMetricError
from cliptune.train.loop import fit
from tests.toy_task import make_bundle, run, toy_train_config

TOY = Path(__file__).with_name("toy_task.py")


def _records(run_dir: Path, kind: str = "epoch") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_loss_goes_down_and_run_dir_is_written(tmp_path: Path) -> None:
    cfg = toy_train_config(epochs=5, batch_size=16, lr=0.01, early_stopping=None)
    state = run(tmp_path, cfg)
    epochs = _records(tmp_path)
    # Epoch 0 is the untrained baseline (validation only, no train terms).
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4, 5]
    assert "train/loss" not in epochs[0]
    assert epochs[-1]["val/loss"] < 0.5 * epochs[0]["val/loss"]
    assert epochs[-1]["train/loss"] < epochs[1]["train/loss"]
    assert (tmp_path / "model" / "toy.safetensors").exists()
    assert latest_checkpoint(tmp_path / "checkpoints") is not None
    assert state.stop_reason == "reached train.epochs (5)"
    # 200 items // 16 = 12 batches per epoch; a step record every 10 steps.
    assert [r["step"] for r in _records(tmp_path, "step")] == [10, 20, 30, 40, 50, 60]


def test_plateau_cuts_lr_and_early_stopping_fires(tmp_path: Path) -> None:
    # Crafted val/loss: improves twice, then flat. patience 0 -> the LR is halved at each flat epoch;
    # early stopping with patience 2 stops after the 2nd flat epoch (epoch 4), best epoch 2.
    values = [2.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9]  # the first is the epoch-0 baseline
    cfg = toy_train_config(
        epochs=6, batch_size=50, lr=0.1,
        plateau=PlateauConfig(metric="val/loss", patience=0, factor=0.5, min_lr=0.0),
        early_stopping=EarlyStoppingConfig(metric="val/loss", mode="min", patience=2),
    )  # fmt: skip
    state = fit(make_bundle(val_values=values), cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    epochs = _records(tmp_path)
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4]
    epochs = epochs[1:]
    # A record's lr is the one the epoch trained with; the cut after epoch 3 shows in epoch 4.
    assert [r["lr"] for r in epochs] == pytest.approx([0.1, 0.1, 0.1, 0.05])
    # lr at start, then after each epoch's scheduling step: cuts after epochs 3 and 4.
    assert state.lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.025])
    assert state.best_epoch == 2
    assert "did not improve for 2 epoch(s)" in state.stop_reason


def test_unknown_metric_is_named(tmp_path: Path) -> None:
    cfg = toy_train_config(
        epochs=1, batch_size=50, plateau=PlateauConfig(metric="val/recall"), early_stopping=None
    )
    with pytest.raises(TrainingError, match="metric 'val/recall' is not logged; logged: val/loss") as info:
        fit(make_bundle(), cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    assert isinstance(info.value, UnknownMetricError)
    assert (info.value.metric, info.value.logged) == ("val/recall", ["val/loss"])


def test_batch_larger_than_data_is_an_error(tmp_path: Path) -> None:
    cfg = toy_train_config(epochs=1, batch_size=500)
    with pytest.raises(TrainingError, match="fewer than one global batch") as info:
        fit(make_bundle(), cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    assert isinstance(info.value, EmptyEpochError)
    assert (info.value.n_items, info.value.batch_size, info.value.processes) == (200, 500, 1)


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, str(TOY), str(full)], check=True)
    # 12 batches per epoch: step 31 is in the middle of epoch 3, after two epoch checkpoints.
    proc = subprocess.run([sys.executable, str(TOY), str(killed), "--kill-at-step", "31"])
    assert proc.returncode == -9
    assert len(_records(killed)) == 3  # baseline + 2 epochs
    subprocess.run([sys.executable, str(TOY), str(killed), "--resume"], check=True)
    assert (killed / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    a = load_file(full / "model" / "toy.safetensors")
    b = load_file(killed / "model" / "toy.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="nothing to resume") as info:
        run(tmp_path, toy_train_config(epochs=1, batch_size=16), resume=True)
    assert isinstance(info.value, NothingToResumeError)
    assert info.value.checkpoints == tmp_path / "checkpoints"


def test_untrained_model_is_kept_when_no_epoch_beats_it(tmp_path: Path) -> None:
    # Crafted val/loss that only gets worse after the baseline: 1.0 (epoch 0), 1.5, 2.0, ... With patience 2
    # counted from the baseline, epochs 1 and 2 fail to beat it and the run stops after epoch 2, keeping
    # the untrained model (the weights changed: lr 0.01 on a real loss, only the judged metric is crafted).
    cfg = toy_train_config(
        epochs=6,
        batch_size=50,
        lr=0.01,
        scheduler="cosine",
        early_stopping=EarlyStoppingConfig(metric="val/loss", mode="min", patience=2),
    )
    untrained = {k: v.clone() for k, v in make_bundle().model.net.state_dict().items()}
    bundle = make_bundle(val_values=[1.0, 1.5, 2.0, 2.5])
    state = fit(bundle, cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    assert [r["epoch"] for r in _records(tmp_path)] == [0, 1, 2]
    assert (state.best_epoch, state.best_step, state.epoch, state.untrained_best) == (0, 0, 2, True)
    assert state.stop_reason == "early stopping: val/loss did not improve for 2 epoch(s) (best 1 at epoch 0)"
    kept = load_file(tmp_path / "model" / "toy.safetensors")
    assert set(kept) == set(untrained) and all(torch.equal(kept[k], untrained[k]) for k in untrained)
    trained = bundle.model.net.state_dict()
    assert not torch.equal(trained["0.weight"], untrained["0.weight"])  # training did move the weights


def test_a_trained_epoch_that_beats_the_baseline_is_kept(tmp_path: Path) -> None:
    # 1.0 (epoch 0), 0.8, 0.9, 0.7, 0.95: epochs 1 and 3 improve; epoch 3 is kept, not the untrained model.
    cfg = toy_train_config(
        epochs=4,
        batch_size=50,
        lr=0.01,
        scheduler="cosine",
        early_stopping=EarlyStoppingConfig(metric="val/loss", mode="min", patience=3),
    )
    bundle = make_bundle(val_values=[1.0, 0.8, 0.9, 0.7, 0.95])
    saved: dict[int, dict[str, torch.Tensor]] = {}
    state = fit(
        bundle,
        cfg,
        tmp_path,
        Accelerator(cpu=True),
        quiet=True,
        on_epoch=lambda r: saved.setdefault(r["epoch"], load_file(tmp_path / "model" / "toy.safetensors")),
    )
    assert (state.best_epoch, state.untrained_best) == (3, False)
    kept = load_file(tmp_path / "model" / "toy.safetensors")
    assert all(torch.equal(kept[k], saved[3][k]) for k in kept)
    assert not torch.equal(kept["0.weight"], saved[1]["0.weight"])


def test_early_stopping_on_a_train_metric_skips_the_untrained_baseline(tmp_path: Path) -> None:
    # train/loss has no value before the first step: epoch 0 is no candidate (it used to raise
    # UnknownMetricError at epoch 0) and patience counts from epoch 1.
    cfg = toy_train_config(
        epochs=3,
        batch_size=25,
        lr=0.01,
        scheduler="cosine",
        early_stopping=EarlyStoppingConfig(metric="train/loss", mode="min", patience=5),
    )
    state = fit(make_bundle(), cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    losses = [r["train/loss"] for r in records[1:]]
    assert losses[2] < losses[0]  # the toy loss goes down, so the best is a trained epoch
    assert state.best_epoch == 1 + losses.index(min(losses)) and not state.untrained_best


def _rewrite_checkpoint(run_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    path = latest_checkpoint(run_dir / "checkpoints")
    assert path is not None
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors")
    (path / "manifest.json").unlink()  # a whole checkpoint of another model, not a damaged one of this
    return path / "model.safetensors"


@pytest.mark.parametrize(
    ("edit", "missing", "unexpected", "mismatched"),
    [
        (
            lambda w: w.__setitem__("net.0.wieght", w.pop("net.0.weight")),
            ["net.0.weight"],
            ["net.0.wieght"],
            [],
        ),
        (lambda w: w.__setitem__("net.9.bias", torch.zeros(1)), [], ["net.9.bias"], []),
        (lambda w: w.__setitem__("net.2.bias", torch.zeros(2)), [], [], [("net.2.bias", (2,), (1,))]),
    ],
    ids=["renamed", "unexpected", "reshaped"],
)
def test_resume_from_a_checkpoint_that_does_not_fit_names_the_keys(
    tmp_path: Path,
    edit: Callable[[dict[str, torch.Tensor]], None],
    missing: list,
    unexpected: list,
    mismatched: list,
) -> None:
    cfg = toy_train_config(epochs=1, batch_size=50, early_stopping=None)
    run(tmp_path, cfg)
    weights_file = _rewrite_checkpoint(tmp_path, edit)
    with pytest.raises(WeightsMismatchError) as info:
        run(tmp_path, cfg.model_copy(update={"epochs": 2}), resume=True)
    err = info.value
    assert (err.source, err.missing, err.unexpected, err.mismatched) == (
        str(weights_file),
        missing,
        unexpected,
        mismatched,
    )
    assert str(weights_file) in str(err) and all(k in str(err) for k in missing + unexpected)
