"""Backward, clip, optimiser step and zero of one training step, without Accelerate's per-step wrappers where
they would do nothing but cost time.

On head-only training a step takes 1-4 ms and Accelerate's wrappers cost a fixed 0.2-0.3 ms of it
(docs/benchmarks.md, "Training-step overhead of our loop"): ``clip_grad_norm_`` re-checks the torch version
and sorts gradients by DTensor mesh every call, ``AcceleratedOptimizer.zero_grad`` inspects the optimiser's
signature every call, ``backward`` divides the loss by the accumulation count even when it is 1. Where the
setting needs none of what they add, which :func:`direct_steps` decides once from Accelerate 1.x's own
branches, :class:`StepOps` makes the torch calls they come down to, in the same order with the same
arguments, so weights are bit-identical either way (tests/test_train_stepping.py):

* no fp16 ``GradScaler`` (nothing to scale or unscale) and no LOMO optimiser;
* one process or DDP (``NO``, ``MULTI_CPU``, ``MULTI_GPU``): DDP all-reduces inside ``loss.backward()``
  and the loop keeps ``accelerator.accumulate``'s ``no_sync`` for accumulation windows, so nothing is lost;
  DeepSpeed, FSDP, XLA, Megatron and tensor/context parallelism keep Accelerate's calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from cliptune.train.optim import SkippingAdamW

__all__ = ["StepOps", "direct_steps"]

_DIRECT_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
_FOREACH_DEVICES = ("cpu", "cuda")  # where torch's clipping takes its foreach branch


def direct_steps(accelerator: Accelerator) -> bool:
    """True when Accelerate's backward, clip, step and zero_grad wrappers reduce to plain torch calls here."""
    return (
        accelerator.distributed_type in _DIRECT_TYPES
        and accelerator.scaler is None
        and accelerator.mixed_precision != "fp16"
        and not getattr(accelerator, "has_lomo_optimizer", False)
        and getattr(accelerator, "parallelism_config", None) is None  # tensor/context parallel: DTensors
    )


@dataclass(frozen=True)
class StepOps:
    """The per-step optimiser calls of ``fit``, through Accelerate or straight to torch (``direct``).

    Attributes:
        accelerator: Devices, processes and the accumulation window (``sync_gradients``).
        model: The model as prepared (FSDP's clipping wants all of its parameters).
        optimizer: The optimiser as prepared (Accelerate's wrapper).
        inner: The :class:`SkippingAdamW` inside it.
        params: The trainable parameters, listed once (what clipping sees).
        direct: Skip Accelerate's wrappers (see :func:`direct_steps`).
        foreach: All trainable parameters share one dtype and a device with foreach kernels (CPU, CUDA):
            clipping is then torch's foreach clipping without its per-call grouping by device and dtype.
    """

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    inner: SkippingAdamW
    params: list[nn.Parameter]
    direct: bool
    foreach: bool

    @classmethod
    def build(cls, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepOps:
        """The step's calls for a prepared ``model`` and ``optimizer`` (a :class:`SkippingAdamW` inside)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, SkippingAdamW):
            raise TypeError(f"fit needs make_optimizer's SkippingAdamW, not {type(inner).__name__}")
        params = [p for p in model.parameters() if p.requires_grad]  # frozen ones never have a gradient
        kinds = {(p.device.type, p.device.index, p.dtype) for p in params}
        foreach = len(kinds) == 1 and next(iter(kinds))[0] in _FOREACH_DEVICES
        return cls(accelerator, model, optimizer, inner, params, direct_steps(accelerator), foreach)

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward``: the loss divided by the accumulation count (skipped at 1: x / 1 == x)."""
        if not self.direct:
            self.accelerator.backward(loss)
            return
        accum = self.accelerator.gradient_accumulation_steps
        (loss / accum if accum != 1 else loss).backward()

    def clip(self, max_norm: float) -> torch.Tensor | None:
        """Clip the gradients to ``max_norm``; their total norm before clipping (None: DeepSpeed clips itself)."""
        if not self.direct:
            wrapped = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
            return wrapped if isinstance(wrapped, torch.Tensor) else None
        if not self.foreach:
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # torch.nn.utils.clip_grad_norm_'s foreach branch for its one (device, dtype) group, op for op
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        norm: torch.Tensor = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        torch._foreach_mul_(grads, torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0))
        return norm

    def step(self) -> None:
        """The optimiser step at the end of an accumulation window (a no-op inside one)."""
        if not self.direct:
            self.optimizer.step()
        elif self.accelerator.sync_gradients:
            self.inner.step()

    def zero_grad(self) -> None:
        """Drop the gradients at the end of an accumulation window (kept inside one, to accumulate)."""
        if not self.direct:
            self.optimizer.zero_grad(set_to_none=True)
        elif self.accelerator.sync_gradients:
            self.inner.zero_grad(set_to_none=True)
