"""The training loop: reads top to bottom, knows only ``outputs["loss"]`` and the task's ``evaluate``.

Per epoch: batches -> forward -> backward -> clip -> step -> zero -> log; then validate -> schedule ->
early-stop -> checkpoint. Everything else (which data, which loss terms, which metrics, saving the model)
comes from the :class:`~cliptune.train.tasks.bundle.TaskBundle`; devices, mixed precision, accumulation and
distribution come from Accelerate.

Failures say what to change: a non-finite loss names the step and the last good checkpoint (or is
skipped, up to ``train.max_bad_steps``); out-of-memory names the settings that lower memory; Ctrl-C or
SIGTERM checkpoints after the current batch and raises ``KeyboardInterrupt`` (resume is exact).
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import accelerate.optimizer
import torch
from accelerate import Accelerator

from cliptune.config import TrainConfig
from cliptune.train.batches import batches_per_epoch, epoch_batches
from cliptune.train.early_stopping import EarlyStopping
from cliptune.train.optim import current_lr, make_optimizer, make_scheduler
from cliptune.train.progress import EpochProgress
from cliptune.train.state import (
    LoopState,
    MetricsLog,
    TrainingError,
    out_of_memory_hint,
    restore_loop_checkpoint,
    save_best_model,
    save_loop_checkpoint,
    stop_on_signals,
)  # fmt: skip
from cliptune.train.tasks.bundle import TaskBundle
from cliptune.train.trackers import tracker_sink

__all__ = ["fit"]

# Accelerate's optimizer.step() probes the file system for `lomo_optim` twice a step (~0.5 ms): ask once.
if hasattr(accelerate.optimizer, "is_lomo_available"):
    accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def fit(
    bundle: TaskBundle,
    cfg: TrainConfig,
    run_dir: Path,
    accelerator: Accelerator,
    *,
    resume: bool = False,
    quiet: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> LoopState:
    """Train ``bundle.model`` and write ``metrics.jsonl``, ``checkpoints/`` and ``model/`` in ``run_dir``.

    Args:
        bundle: The task's model, data, evaluation and saving.
        cfg: The ``train`` section of the config.
        run_dir: The run directory (created by the caller).
        accelerator: Devices, precision, accumulation, processes; its started trackers get every record.
        resume: Continue from ``run_dir/checkpoints/latest`` (exactly: same batches, RNG and metrics).
        quiet: No progress bar (one line per epoch is still printed).
        on_epoch: Called on every process with each trained epoch's record once it is logged and saved
            (a sweep reports it to Optuna); what it raises (``optuna.TrialPruned``) propagates.

    Returns:
        The final loop state (best epoch, stop reason, LR history, bad steps, timings).

    Raises:
        TrainingError: Non-finite loss beyond ``train.max_bad_steps``, out of memory, nothing to resume.
        KeyboardInterrupt: Ctrl-C / SIGTERM, raised after a checkpoint of the current step is written.
    """
    state = LoopState()  # created here so the out-of-memory message can name the step
    with stop_on_signals() as stop_requested, out_of_memory_hint(cfg, state):
        _train(bundle, cfg, run_dir, accelerator, state, stop_requested, on_epoch, resume=resume, quiet=quiet)
    return state


def _train(bundle, cfg, run_dir, accelerator, state: LoopState, stop_requested, on_epoch, *, resume, quiet) -> None:  # fmt: skip
    n_batches = batches_per_epoch(len(bundle.train_data), cfg.batch_size, accelerator.num_processes)
    if n_batches == 0:
        raise TrainingError(f"the training split has {len(bundle.train_data)} items, fewer than one global batch "
                            f"({cfg.batch_size} x {accelerator.num_processes} processes): lower train.batch_size")  # fmt: skip
    optimizer = make_optimizer(bundle.model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=cfg.epochs * n_batches // cfg.grad_accum)
    model, optimizer = accelerator.prepare(bundle.model, optimizer)
    stopper = EarlyStopping.from_config(cfg.early_stopping) if cfg.early_stopping else None
    state.lrs = [current_lr(optimizer)]
    main = accelerator.is_main_process
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main, sink=tracker_sink(accelerator))
    if resume:
        restore_loop_checkpoint(run_dir, accelerator, model, optimizer, scheduler, state, stopper, log)
    progress = EpochProgress(n_batches, enabled=main and not quiet, summaries=main)
    checkpoint = partial(save_loop_checkpoint, run_dir, accelerator, model, optimizer, scheduler, state, stopper, cfg)  # fmt: skip

    if state.step == 0:  # the untrained model's values: the baseline every curve starts from
        log.write({"kind": "epoch", "epoch": 0, "step": 0, "lr": current_lr(optimizer), **_evaluate(bundle, model)})  # fmt: skip

    for epoch in range(state.epoch, cfg.epochs):
        model.train()
        tic = time.perf_counter()
        batches = epoch_batches(
            bundle.train_data, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
            start_batch=state.batch, collate=bundle.collate,
        )  # fmt: skip
        with progress.epoch(epoch, cfg.epochs, start=state.batch):
            for batch in batches:
                with accelerator.accumulate(model):
                    outputs = model(_to_device(batch, accelerator.device))
                    # Terms averaged over processes + stop flag in one all-reduce: all take the same branch.
                    values, stop = _global_values(accelerator, outputs, stop_requested())
                    finite = math.isfinite(values["loss"])
                    if finite:
                        accelerator.backward(outputs["loss"])
                        if accelerator.sync_gradients and cfg.grad_clip is not None:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        optimizer.step()
                        if accelerator.sync_gradients and cfg.scheduler == "cosine":
                            scheduler.step()
                    else:
                        progress.warn(state.count_bad_step(values["loss"], cfg.max_bad_steps, run_dir))
                    optimizer.zero_grad(set_to_none=True)
                state.batch, state.step = state.batch + 1, state.step + 1
                if finite:  # a skipped step counts as a step (exact resume) but not in the means
                    state.add_terms(values)
                lr = current_lr(optimizer)
                if state.step % cfg.log_every_steps == 0:
                    log.write({"kind": "step", "epoch": epoch + 1, "step": state.step,
                               "train/loss": values["loss"] if finite else None, "lr": lr})  # fmt: skip
                progress.advance(loss=values["loss"], lr=lr)
                if stop:
                    checkpoint()
                    raise KeyboardInterrupt(f"interrupted at step {state.step}: checkpoint saved; continue "
                                            f"exactly with `cliptune train --resume {run_dir}`")  # fmt: skip
        state.add_time("train", time.perf_counter() - tic)

        tic, val = time.perf_counter(), _evaluate(bundle, model)
        state.add_time("val", time.perf_counter() - tic)
        record = {"kind": "epoch", "epoch": epoch + 1, "step": state.step, "lr": current_lr(optimizer),
                  **state.train_means(), **val}  # fmt: skip
        if cfg.scheduler == "plateau":
            scheduler.step(_metric(val, cfg.plateau.metric))
        state.lrs.append(current_lr(optimizer))
        improved = stopper.update(_metric(record, stopper.metric)) if stopper else True
        log.write(record)
        progress.summary(record)
        state.epoch, state.batch, state.epoch_sums, state.epoch_count = epoch + 1, 0, defaultdict(float), 0

        tic = time.perf_counter()
        if improved:
            state.best_epoch, state.best_step = epoch + 1, state.step
            save_best_model(bundle, accelerator, model, run_dir)
        if state.epoch % cfg.checkpoint_every == 0 or state.epoch == cfg.epochs:
            checkpoint()
        state.add_time("checkpoint", time.perf_counter() - tic)
        if on_epoch is not None:  # last: what it raises leaves the epoch logged and its model saved
            on_epoch(record)
        if stopper and stopper.should_stop:
            state.stop_reason = (f"early stopping: {stopper.metric} did not improve for {stopper.bad_epochs} "
                                 f"epoch(s) (best {stopper.best:.6g} at epoch {stopper.best_epoch + 1})")  # fmt: skip
            break
    state.stop_reason = state.stop_reason or f"reached train.epochs ({cfg.epochs})"


def _evaluate(bundle: TaskBundle, model: torch.nn.Module) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return bundle.evaluate(model)


def _global_values(accelerator: Accelerator, outputs: dict[str, torch.Tensor], stop: bool) -> tuple[dict[str, float], bool]:  # fmt: skip
    names, device = list(outputs), outputs["loss"].device
    local = torch.stack([outputs[n].detach().float().reshape(()) for n in names] + [torch.tensor(float(stop), device=device)])  # fmt: skip
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="sum")
        local[:-1] /= accelerator.num_processes
    *terms, stops = local.tolist()
    return dict(zip(names, terms, strict=True)), stops > 0


def _metric(values: dict[str, Any], name: str) -> float:
    if name not in values:
        raise TrainingError(f"metric '{name}' is not logged; logged: {', '.join(sorted(values))}")
    return float(values[name])


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # fmt: skip
