"""Optimiser and schedules: decay exemptions, cosine with warmup against golden values, resumable state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cliptune.config import PlateauConfig, TrainConfig
from cliptune.train.checkpoint import Resumable, restore_loop_checkpoint, save_loop_checkpoint
from cliptune.train.optim import (
    count_lr_reductions,
    current_lr,
    make_optimizer,
    make_scheduler,
    param_groups,
)
from cliptune.train.state import LoopState, MetricsLog


class _Tower(nn.Module):
    """Names as in the HF / open_clip towers: a projection, a norm, a 2-D bias-like table, scalars."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)  # weight decayed, bias not
        self.layer_norm = nn.LayerNorm(3)  # 1-D weight and bias: not
        self.norm_gain = nn.Parameter(torch.ones(2, 3))  # 2-D, but a norm's gain by name: not
        self.logit_scale = nn.Parameter(torch.tensor(2.0))  # 0-d temperature: not
        self.logit_bias = nn.Parameter(torch.zeros(1, 1))  # SigLIP's bias, 2-D: not
        self.temperature = nn.Parameter(torch.ones(1, 1))  # 2-D temperature: not
        self.pos_bias_table = nn.Parameter(torch.zeros(5, 3))  # a 2-D "bias" table: not
        self.scale = nn.Parameter(torch.ones(3))  # any 1-D parameter: not
        self.embed = nn.Embedding(6, 3)  # 2-D weight: decayed
        self.frozen = nn.Linear(3, 3)  # not trainable: in no group
        self.frozen.requires_grad_(False)


def test_decay_only_on_matrices_never_on_biases_norms_or_temperatures() -> None:
    groups = param_groups(_Tower(), weight_decay=0.05)
    assert [(g["weight_decay"], g["names"]) for g in groups] == [
        (0.05, ["proj.weight", "embed.weight"]),
        (
            0.0,
            [
                "norm_gain",  # a module's own parameters come first (named_parameters order)
                "logit_scale",
                "logit_bias",
                "temperature",
                "pos_bias_table",
                "scale",
                "proj.bias",
                "layer_norm.weight",
                "layer_norm.bias",
            ],
        ),
    ]
    model = _Tower()
    named = dict(model.named_parameters())
    for group in param_groups(model, 0.05):
        assert [id(p) for p in group["params"]] == [id(named[n]) for n in group["names"]]


def test_make_optimizer_uses_the_groups_and_refuses_a_frozen_model() -> None:
    opt = make_optimizer(_Tower(), TrainConfig(lr=0.002, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (0.002, 0.1, 2),
        (0.002, 0.0, 9),
    ]
    assert all("names" not in g for g in opt.param_groups)
    assert current_lr(opt) == 0.002
    only_biases = nn.Linear(2, 2)
    only_biases.weight.requires_grad_(False)
    assert [g["weight_decay"] for g in make_optimizer(only_biases, TrainConfig()).param_groups] == [0.0]
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(nn.Linear(2, 2).requires_grad_(False), TrainConfig())


def test_decayed_weights_shrink_and_exempt_ones_do_not() -> None:
    # With a zero gradient AdamW's only change is the decay: w <- w * (1 - lr * wd).
    model = _Tower()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, param in model.named_parameters():
        factor = 0.95 if name in ("proj.weight", "embed.weight") else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def _lrs(cfg: TrainConfig, total_steps: int, steps: int) -> list[float]:
    """The learning rate each optimiser step trains with: before step 0, then after each ``step()``."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    scheduler = make_scheduler(opt, cfg, total_steps)
    lrs = [current_lr(opt)]
    for _ in range(steps):
        opt.step()
        scheduler.step()  # type: ignore[call-arg]  # LambdaLR: once per optimiser step
        lrs.append(current_lr(opt))
    return lrs


def test_cosine_with_warmup_golden_values() -> None:
    # lr 1, warmup 2, 10 steps: warmup (k + 1) / 2 for k < 2, then 0.5 (1 + cos(pi (k - 2) / 8)),
    # held at 0 from step 10 on (the clamp: without it the cosine would climb back up).
    lrs = _lrs(TrainConfig(lr=1.0, scheduler="cosine", warmup_steps=2), total_steps=10, steps=14)
    c = math.sqrt(2) / 2  # cos(pi / 4)
    golden = [
        0.5,  # k 0: warmup 1 / 2
        1.0,  # k 1: warmup 2 / 2
        1.0,  # k 2: cosine starts at its peak
        0.5 * (1 + math.cos(math.pi / 8)),  # k 3
        0.5 * (1 + c),  # k 4: 0.853553
        0.5 * (1 + math.cos(3 * math.pi / 8)),  # k 5
        0.5,  # k 6: half way
        0.5 * (1 - math.cos(3 * math.pi / 8)),  # k 7
        0.5 * (1 - c),  # k 8: 0.146447
        0.5 * (1 - math.cos(math.pi / 8)),  # k 9
        0.0,  # k 10: the end
        0.0,  # k 11..14: clamped
        0.0,
        0.0,
        0.0,
    ]
    assert lrs == pytest.approx(golden, abs=1e-12)
    assert lrs[4] == pytest.approx(0.8535533905932737)


def test_cosine_without_warmup_starts_at_the_peak_and_scales_with_lr() -> None:
    lrs = _lrs(TrainConfig(lr=0.3, scheduler="cosine", warmup_steps=0), total_steps=4, steps=6)
    assert lrs == pytest.approx(
        [0.3, 0.3 * (0.5 + 0.5 * math.sqrt(0.5)), 0.15, 0.3 * (0.5 - 0.5 * math.sqrt(0.5)), 0, 0, 0]
    )


def test_plateau_is_built_from_its_config() -> None:
    cfg = TrainConfig(
        lr=0.1, plateau=PlateauConfig(mode="max", factor=0.25, patience=0, min_lr=0.004, cooldown=1)
    )
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    scheduler = make_scheduler(opt, cfg, total_steps=100)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    lrs = []
    for value in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6):  # mode max: 0.6 improves, then flat
        scheduler.step(value)  # type: ignore[arg-type]
        lrs.append(current_lr(opt))
    # patience 0: cut by 0.25 at each flat epoch but the one after a cut (cooldown 1), down to min_lr
    assert lrs == pytest.approx([0.1, 0.1, 0.025, 0.025, 0.00625, 0.00625, 0.004, 0.004, 0.004])
    assert count_lr_reductions([0.1, *lrs]) == 3


def test_count_lr_reductions_ignores_float_noise_and_rises() -> None:
    assert count_lr_reductions([]) == 0
    assert count_lr_reductions([0.1, 0.1 * (1 - 1e-12), 0.2, 0.05, 0.05, 0.01]) == 2


def _resumable(cfg: TrainConfig, total_steps: int) -> Resumable:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, cfg)
    return Resumable(model, opt, make_scheduler(opt, cfg, total_steps), LoopState(), None)


def test_resume_continues_the_cosine_schedule(tmp_path: Path) -> None:
    # Checkpointed after 5 of 10 steps, the resumed schedule goes on at step 5, not back at warmup.
    cfg = TrainConfig(lr=1.0, scheduler="cosine", warmup_steps=2, early_stopping=None)
    accelerator = Accelerator(cpu=True)
    saved = _resumable(cfg, total_steps=10)
    for _ in range(5):
        saved.optimizer.step()
        saved.scheduler.step()  # type: ignore[call-arg]
    saved.state.step = 5
    save_loop_checkpoint(tmp_path, accelerator, saved, keep_last=1)
    resumed = _resumable(cfg, total_steps=10)
    restore_loop_checkpoint(tmp_path, accelerator, resumed, MetricsLog(tmp_path / "metrics.jsonl"))
    assert resumed.scheduler.state_dict() == saved.scheduler.state_dict()
    assert current_lr(resumed.optimizer) == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 8)))
    resumed.optimizer.step()
    resumed.scheduler.step()  # type: ignore[call-arg]
    assert current_lr(resumed.optimizer) == pytest.approx(0.5)  # step 6: half way down
