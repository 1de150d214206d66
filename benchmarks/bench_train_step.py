"""Overhead of cliptune's training loop over a hand-written PyTorch loop, per training step, on CPU.

Both loops train the same model (two linear projection heads on cached tower features, the retrieval
task with frozen towers) with the same InfoNCE loss, the same optimiser (``make_optimizer``: AdamW, fused
where the device has the kernels, with cliptune's parameter groups), the same gradient clipping, the same
device-side skip of a step whose loss or gradient norm is not finite (``SkippingAdamW.skip_if``, as ``fit``
does), a loss read every ``log_every_steps`` and the very same batch at every step; they end with identical
weights (checked). The time of a
step is the time between consecutive ``forward`` calls, so it covers everything a loop does per step
(accumulation context, loss bookkeeping, clipping, optimiser, logging) and nothing done once per epoch.
Reported: the median over ``--steps`` steps (after ``--warmup``), alternating the two loops ``--repeats``
times, and the overhead ``ours / hand - 1``.

On CUDA the step times are taken the same way; a loop that never synchronises runs ahead of the GPU only
until the launch queue is full, so in the steady state both medians measure real step throughput.

Usage:
    python benchmarks/bench_train_step.py --batch-size 64 --steps 200
    python benchmarks/bench_train_step.py --device cuda --batch-size 1024 --steps 300
    python benchmarks/bench_train_step.py --batch-size 256 --image-dim 1280 --text-dim 384 --dim 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from cliptune.config import PlateauConfig, TrainConfig
from cliptune.losses import make_loss
from cliptune.train.loop import fit
from cliptune.train.optim import make_optimizer
from cliptune.train.tasks.bundle import TaskBundle

_CLOCK = [time.perf_counter]  # --clock cpu: this thread's CPU time, steadier on a shared machine


class _Heads(nn.Module):
    """Projection heads + InfoNCE: ``forward(batch)`` returns the named loss terms, as the tasks do."""

    def __init__(self, image_dim: int, text_dim: int, dim: int) -> None:
        super().__init__()
        self.image_proj, self.text_proj = nn.Linear(image_dim, dim), nn.Linear(text_dim, dim)
        self.loss = make_loss("info_nce", temperature=0.07)
        self.stamps: list[float] = []
        self.logged: list[float] = []  # the losses a loop read (hand-written and plain Accelerate)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.stamps.append(_CLOCK[0]())
        return self.loss(self.image_proj(batch["image_features"]), self.text_proj(batch["text_features"]))


def _step_times(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]


def _ours(model: _Heads, batch: dict[str, torch.Tensor], steps: int, cfg: TrainConfig) -> list[float]:
    bundle = TaskBundle(
        model=model,
        train_data=[{}] * (steps * cfg.batch_size),
        evaluate=lambda m: {"val/loss": 0.0},
        save_model=lambda m, d: None,
        collate=lambda items: batch,  # the same batch every step, as in the hand-written loop
    )
    with tempfile.TemporaryDirectory() as run_dir:
        fit(
            bundle,
            cfg,
            Path(run_dir),
            Accelerator(cpu=batch["text_features"].device.type == "cpu"),
            quiet=True,
        )
    return model.stamps


def _hand(model: _Heads, batch: dict[str, torch.Tensor], steps: int, cfg: TrainConfig) -> list[float]:
    """The loop a careful user writes for the same job: the step is skipped on the device when the loss or
    the gradient norm is not finite (as ``fit`` does; no host read), and the loss is read every
    ``log_every_steps`` for logging."""
    model.to(batch["text_features"].device)
    optimizer = make_optimizer(model, cfg)
    model.train()
    for step in range(1, steps + 1):
        loss = model(batch)["loss"]
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.skip_if((torch.isfinite(loss) & torch.isfinite(norm)).logical_not().float())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every_steps == 0:
            model.logged.append(loss.item())
    if loss.is_cuda:
        torch.cuda.synchronize()
    return model.stamps


def _accelerate(model: _Heads, batch: dict[str, torch.Tensor], steps: int, cfg: TrainConfig) -> list[float]:
    """The canonical Accelerate loop (prepare, accumulate, backward, clip, step, zero): what part of the
    overhead is Accelerate's wrappers rather than cliptune's own bookkeeping."""
    accelerator = Accelerator(cpu=batch["text_features"].device.type == "cpu")
    inner = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, inner)
    model.train()
    for step in range(1, steps + 1):
        with accelerator.accumulate(model):
            loss = model(batch)["loss"]
            accelerator.backward(loss)
            finite = torch.isfinite(loss)
            if accelerator.sync_gradients:
                finite = finite & torch.isfinite(
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                )
            inner.skip_if(finite.logical_not().float())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every_steps == 0:
            model.logged.append(loss.item())
    if loss.is_cuda:
        torch.cuda.synchronize()
    return model.stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-dim", type=int, default=1280, help="image tower feature size")
    parser.add_argument("--text-dim", type=int, default=384, help="text tower feature size")
    parser.add_argument("--dim", type=int, default=256, help="shared embedding size")
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="first steps left out of the median")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: the main thread's CPU time (with --threads 1 all the work; other jobs' "
                             "time slices are not counted, so it is steadier on a loaded machine)")  # fmt: skip
    args = parser.parse_args()
    if args.clock == "cpu":
        _CLOCK[0] = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    batch = {
        "image_features": torch.randn(args.batch_size, args.image_dim, generator=gen),  # (B, Fi)
        "text_features": torch.randn(args.batch_size, args.text_dim, generator=gen),  # (B, Ft)
    }
    batch = {k: v.to(args.device) for k, v in batch.items()}
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-3, grad_clip=1.0, early_stopping=None,
                      scheduler="plateau", plateau=PlateauConfig(metric="val/loss"),
                      log_every_steps=10, precision="fp32")  # fmt: skip
    torch.manual_seed(0)
    template = _Heads(args.image_dim, args.text_dim, args.dim)
    loops = {"hand-written": _hand, "accelerate": _accelerate, "cliptune fit": _ours}
    times: dict[str, list[float]] = {name: [] for name in loops}
    final: dict[str, _Heads] = {}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            model = copy.deepcopy(template)
            stamps = loop(model, batch, args.steps, cfg)
            times[name] += _step_times(stamps, args.warmup)  # fit's baseline evaluation never calls forward
            final[name] = model
    diff = max(
        (a - b).abs().max().item()
        for other in ("accelerate", "cliptune fit")
        for a, b in zip(final["hand-written"].parameters(), final[other].parameters(), strict=True)
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    hand, ours = medians["hand-written"], medians["cliptune fit"]
    print(f"batch {args.batch_size}, features {args.image_dim}/{args.text_dim} -> {args.dim}, "
          f"{args.steps} steps x {args.repeats} runs, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock")  # fmt: skip
    print(f"{'loop':<14} {'median ms/step':>15}")
    for name, median in medians.items():
        print(f"{name:<14} {median * 1e3:>15.3f}")
    print(f"overhead: {100 * (ours / hand - 1):+.1f}% over hand-written, "
          f"{100 * (ours / medians['accelerate'] - 1):+.1f}% over the plain Accelerate loop "
          f"(same final weights: max |diff| {diff:.2e})")  # fmt: skip


if __name__ == "__main__":
    main()
