"""EarlyStopping: modes, min_delta, patience, epoch 0 as a candidate, and state that survives a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cliptune.config import EarlyStoppingConfig
from cliptune.train.checkpoint import Resumable, restore_loop_checkpoint, save_loop_checkpoint
from cliptune.train.early_stopping import EarlyStopping, metric_value, untrained_best_message
from cliptune.train.errors import UnknownMetricError
from cliptune.train.state import LoopState, MetricsLog


def _run(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    return [stopper.update(v) for v in values]


def test_epoch_zero_is_a_candidate_and_patience_counts_from_it() -> None:
    # The untrained model's value is epoch 0: it is the best until an epoch beats it.
    es = EarlyStopping(metric="val/loss", mode="min", patience=2)
    assert _run(es, [1.0]) == [True]
    assert (es.best, es.best_epoch, es.bad_epochs, es.should_stop) == (1.0, 0, 0, False)
    assert _run(es, [1.5, 1.2]) == [False, False]
    assert (es.best, es.best_epoch, es.bad_epochs, es.should_stop) == (1.0, 0, 2, True)
    assert es.stop_reason == "early stopping: val/loss did not improve for 2 epoch(s) (best 1 at epoch 0)"


def test_min_mode_needs_a_drop_of_more_than_min_delta() -> None:
    es = EarlyStopping(metric="val/loss", mode="min", patience=10, min_delta=0.1)
    # 1.0 -> 0.95 (a drop of 0.05 <= 0.1: no), 0.91 (0.09: no), 0.85 (0.15: yes), 0.85 (a tie: no),
    # 1.2 (worse: no, though within best + delta of nothing), 0.7 (0.15: yes)
    assert _run(es, [1.0, 0.95, 0.91, 0.85, 0.85, 1.2, 0.7]) == [True, False, False, True, False, False, True]
    assert (es.best, es.best_epoch, es.bad_epochs) == (0.7, 6, 0)


def test_max_mode_needs_a_rise_of_more_than_min_delta() -> None:
    es = EarlyStopping(metric="val/recall@1", mode="max", patience=10, min_delta=0.1)
    # 0.2 -> 0.25 (+0.05: no), 0.1 (lower: no), 0.35 (+0.15: yes), 0.35 (a tie: no), 0.44 (+0.09: no), 0.5
    assert _run(es, [0.2, 0.25, 0.1, 0.35, 0.35, 0.44, 0.5]) == [True, False, False, True, False, False, True]
    assert (es.best, es.best_epoch, es.bad_epochs) == (0.5, 6, 0)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_without_min_delta_any_strict_improvement_counts_and_ties_do_not(mode: str) -> None:
    sign = 1.0 if mode == "max" else -1.0  # the direction of an improvement
    es = EarlyStopping(metric="m", mode=mode, patience=3)
    assert _run(es, [0.0, sign * 1e-9, sign * 1e-9, -sign * 5.0, sign * 2.0]) == [
        True,
        True,
        False,
        False,
        True,
    ]
    assert (es.best, es.best_epoch) == (sign * 2.0, 4)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_wrong_direction_never_improves(mode: str) -> None:
    worse = [1.0, 2.0, 3.0, 4.0] if mode == "min" else [4.0, 3.0, 2.0, 1.0]
    es = EarlyStopping(metric="m", mode=mode, patience=3)
    assert _run(es, worse) == [True, False, False, False]
    assert (es.best, es.best_epoch, es.should_stop) == (worse[0], 0, True)


def test_non_finite_values_never_improve_and_count_as_bad_epochs() -> None:
    es = EarlyStopping(metric="val/loss", mode="min", patience=3)
    assert _run(es, [math.nan, math.inf, -math.inf, 2.0, math.nan]) == [False, False, False, True, False]
    assert (es.best, es.best_epoch, es.bad_epochs) == (2.0, 3, 1)


def test_patience_zero_stops_after_one_bad_epoch_and_patience_is_consecutive() -> None:
    es = EarlyStopping(metric="m", mode="min", patience=0)
    _run(es, [1.0])
    assert not es.should_stop and es.stop_reason is None
    _run(es, [1.0])
    assert es.should_stop
    es = EarlyStopping(metric="m", mode="min", patience=2)
    _run(es, [1.0, 1.1, 0.9, 1.1])  # the improvement at epoch 2 resets the count
    assert (es.bad_epochs, es.should_stop) == (1, False)


def test_skip_passes_epoch_zero_so_the_first_trained_epoch_is_epoch_one() -> None:
    es = EarlyStopping(metric="train/loss", mode="min", patience=1)
    es.skip()
    assert (es.epochs_seen, es.best_epoch, es.bad_epochs, math.isnan(es.best)) == (1, -1, 0, True)
    assert _run(es, [3.0, 3.0]) == [True, False]
    assert (es.best_epoch, es.should_stop) == (1, True)


def test_from_config_and_messages() -> None:
    cfg = EarlyStoppingConfig(metric="val/recall@5", mode="max", patience=4, min_delta=0.01)
    es = EarlyStopping.from_config(cfg)
    assert (es.metric, es.mode, es.patience, es.min_delta) == ("val/recall@5", "max", 4, 0.01)
    _run(es, [0.5])
    assert untrained_best_message(es) == (
        "no trained epoch beat the untrained model (epoch 0) on val/recall@5 (max, best 0.5): "
        "model/ holds the untrained weights; training did not help"
    )
    assert untrained_best_message(None).startswith("no trained epoch beat the untrained model (epoch 0): ")
    assert metric_value({"val/loss": 2, "val/recall@5": 0.25}, "val/recall@5") == 0.25
    with pytest.raises(UnknownMetricError) as err:
        metric_value({"val/loss": 2.0}, "val/recall@5")
    assert "val/recall@5" in str(err.value) and "val/loss" in str(err.value)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_state_dict_round_trip_through_json_continues_exactly(mode: str) -> None:
    values = [0.5, 0.4, 0.6, 0.3, 0.3, 0.7, 0.2, 0.2, 0.25]
    if mode == "max":
        values = [1 - v for v in values]
    whole = EarlyStopping(metric="m", mode=mode, patience=2, min_delta=0.05)
    first = EarlyStopping(metric="m", mode=mode, patience=2, min_delta=0.05)
    assert _run(first, values[:5]) == _run(whole, values[:5])
    # trainer.json holds the state as JSON: a resumed stopper starts from it, not from scratch
    resumed = EarlyStopping(metric="m", mode=mode, patience=2, min_delta=0.05)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed == first
    assert _run(resumed, values[5:]) == _run(whole, values[5:])
    assert resumed == whole


def _parts(stopper: EarlyStopping | None) -> Resumable:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
    return Resumable(model, optimizer, scheduler, LoopState(), stopper)


def test_resume_restores_early_stopping_and_plateau_state(tmp_path: Path) -> None:
    # A run that saw 4 validations (best at epoch 1, two bad epochs since) is checkpointed and resumed:
    # the resumed stopper and plateau schedule must continue from where it stood, not start afresh.
    accelerator = Accelerator(cpu=True)
    saved = _parts(EarlyStopping(metric="val/loss", mode="min", patience=3))
    assert saved.stopper is not None
    for value in (1.0, 0.5, 0.6, 0.7):
        saved.stopper.update(value)
        saved.scheduler.step(value)  # type: ignore[arg-type]  # ReduceLROnPlateau takes the metric
    saved.state.epoch, saved.state.step, saved.state.best_epoch, saved.state.best_step = 3, 6, 1, 2
    assert saved.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # cut once after 2 bad epochs
    save_loop_checkpoint(tmp_path, accelerator, saved, keep_last=2)

    resumed = _parts(EarlyStopping(metric="val/loss", mode="min", patience=3))
    restore_loop_checkpoint(tmp_path, accelerator, resumed, MetricsLog(tmp_path / "metrics.jsonl"))
    assert resumed.stopper == saved.stopper
    assert resumed.stopper is not None
    assert (resumed.stopper.best, resumed.stopper.best_epoch, resumed.stopper.bad_epochs) == (0.5, 1, 2)
    assert resumed.scheduler.state_dict() == saved.scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert resumed.state.state_dict() == saved.state.state_dict()
    # one more bad epoch: the restored stopper stops (3 in a row); the schedule, whose count restarted at
    # the cut, cuts again after two more (a fresh one would take 0.8 as its first best and not cut)
    resumed.stopper.update(0.8)
    assert resumed.stopper.should_stop
    for value in (0.8, 0.9):
        resumed.scheduler.step(value)  # type: ignore[arg-type]
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
