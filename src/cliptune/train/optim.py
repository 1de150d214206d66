"""Optimiser and learning-rate schedules: AdamW with decay only where it makes sense.

The loop never reads a step's loss on the host to decide whether to step: it hands the optimiser a
device flag (:meth:`SkippingAdamW.skip_if`) and the fused AdamW kernels leave parameters and optimiser
state untouched when it is set, the way they honour a ``GradScaler``'s ``found_inf``.
"""

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
    "SkippingAdamW",
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


# Devices with fused AdamW kernels (torch.utils._foreach_utils lists them; a public name does not exist).
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu")


class SkippingAdamW(torch.optim.AdamW):
    """AdamW whose next step can be skipped by a flag that stays on the device (no host read).

    :meth:`skip_if` takes a 0-dim float tensor (1.0: skip); flags given between two real steps (gradient
    accumulation's micro-batches) are combined, so one bad micro-batch skips its whole window. The fused
    kernels honour the flag as ``found_inf`` (parameters, ``exp_avg``, ``exp_avg_sq`` and the step count
    stay as they were, exactly as if ``step()`` had not been called); a ``GradScaler``'s own ``found_inf``
    (fp16) is combined with it. Without fused kernels (``fused=False``, a device without them) the flag
    is read on the host instead: the same skip, with one sync per step.

    Args:
        params: Parameters or param groups, as for :class:`torch.optim.AdamW`.
        lr: Learning rate.
        fused: Use the fused kernels (required for the skip without a sync).
    """

    def __init__(self, params: Any, lr: float, fused: bool) -> None:
        super().__init__(params, lr=lr, fused=fused)
        self._fused = fused
        self._skip: torch.Tensor | None = None

    def skip_if(self, flag: torch.Tensor) -> None:
        """Skip the next real :meth:`step` when ``flag`` (0-dim float, 0.0 or 1.0) is 1.0."""
        self._skip = flag if self._skip is None else torch.maximum(self._skip, flag)

    @property
    def pending(self) -> torch.Tensor | None:
        """The combined flag for the next real step (None: no flag given since the last one)."""
        return self._skip

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - torch.optim.AdamW.step
        skip, self._skip = self._skip, None
        scaler_inf = getattr(self, "found_inf", None)  # a GradScaler sets it around this call (fp16)
        if skip is None:
            return super().step(closure)
        if not self._fused:  # no kernel to hand the flag to: read it (a sync, only on this path)
            return None if bool(skip) else super().step(closure)
        self.found_inf = skip if scaler_inf is None else torch.maximum(skip, scaler_inf.to(skip))
        try:
            return super().step(closure)
        finally:
            if scaler_inf is None:
                del self.found_inf
            else:  # the GradScaler deletes its own attribute after the step
                self.found_inf = scaler_inf

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint, keeping this optimiser's kernel choice (older checkpoints were not fused)."""
        groups = [{**group, "fused": self._fused} for group in state_dict["param_groups"]]
        super().load_state_dict({**state_dict, "param_groups": groups})


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | None = None) -> SkippingAdamW:
    """AdamW over :func:`param_groups` at ``cfg.lr``; fails clearly when nothing is trainable.

    Args:
        model: The model (its trainable parameters).
        cfg: The ``train`` section (lr, weight decay).
        device: Where the parameters will train (default: where they are); fused kernels when it has them.

    Returns:
        A :class:`SkippingAdamW`.
    """
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: check model.trainable_layers / model.lora")
    for group in groups:
        group.pop("names")
    device = device or groups[0]["params"][0].device
    return SkippingAdamW(groups, lr=cfg.lr, fused=device.type in _FUSED_DEVICES)


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
