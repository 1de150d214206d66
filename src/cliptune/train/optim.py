"""Optimiser and learning-rate schedules: AdamW with decay only where it makes sense."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import accelerate.optimizer
import torch
from torch import nn

from cliptune.config import TrainConfig

__all__ = [
    "Scheduler",
    "param_groups",
    "make_optimizer",
    "make_scheduler",
    "current_lr",
    "count_lr_reductions",
]

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
"""What :func:`make_scheduler` returns: stepped per optimiser step (cosine) or per validation (plateau)."""

# Accelerate's optimizer.step() probes the file system for `lomo_optim` twice a step (~0.5 ms): ask once.
if hasattr(accelerate.optimizer, "is_lomo_available"):
    accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and non-decayed groups.

    Biases, norm weights and scalar parameters (temperatures, SigLIP's logit bias) are not decayed:
    decaying them pulls temperatures and norm gains towards 0, which only hurts (open_clip does the same).
    The rule is by shape (``ndim < 2``) plus names containing ``norm``/``logit_``/``temperature``, so it
    holds for any backbone without a per-model list.

    Args:
        model: The module whose ``requires_grad`` parameters are optimised.
        weight_decay: Decay of the decayed group.

    Returns:
        Two param groups (the empty one is dropped), each with a ``names`` list for logging.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay_names: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        exempt = param.ndim < 2 or any(t in lowered for t in ("norm", "logit_", "temperature", "bias"))
        (no_decay if exempt else decay).append(param)
        (no_decay_names if exempt else decay_names).append(name)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` at ``cfg.lr``; fails clearly when nothing is trainable."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: check model.trainable_layers / model.lora")
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Scheduler:
    """The configured schedule.

    ``plateau`` steps once per validation with the watched metric (the seeds' setting); ``cosine`` steps
    once per optimiser step: linear warmup over ``warmup_steps`` then cosine decay to 0 at ``total_steps``.
    """
    if cfg.scheduler == "plateau":
        p = cfg.plateau
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=p.mode, factor=p.factor, patience=p.patience, min_lr=p.min_lr, cooldown=p.cooldown
        )
    warmup = cfg.warmup_steps

    def _lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first param group (all groups share it)."""
    return float(optimizer.param_groups[0]["lr"])


def count_lr_reductions(lrs: Iterable[float]) -> int:
    """How many times a sequence of per-epoch learning rates went down."""
    values = list(lrs)
    return sum(1 for a, b in zip(values, values[1:], strict=False) if b < a * (1 - 1e-9))
