"""The training loop: reads top to bottom, knows only ``outputs["loss"]`` and the task's ``evaluate``.

First the untrained model is validated as epoch 0 and saved as the first best-model candidate; then per
batch: forward -> backward -> clip -> step (and lr) -> zero -> log; per epoch: validate -> schedule ->
early-stop -> checkpoint. Nothing in a step waits for the device: a non-finite loss or gradient norm
skips the optimiser step on the device, and the loss terms are read (one host sync) every
``train.log_every_steps``, at the end of an epoch and before stopping. The task comes from a :class:`~cliptune.train.tasks.bundle.TaskBundle`, devices,
precision and processes from Accelerate, checkpoints and failure guards from their modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cliptune.config import TrainConfig
from cliptune.rundir import RunDir
from cliptune.train import checkpoint
from cliptune.train.batches import any_process, batches_per_epoch, epoch_batches, step_terms, to_device
from cliptune.train.early_stopping import EarlyStopping, metric_value, untrained_best_message
from cliptune.train.errors import EmptyEpochError, TrainingInterrupted
from cliptune.train.failures import (
    BadStep,
    checked_validation,
    count_bad_steps,
    out_of_memory_hint,
    stop_on_signals,
)
from cliptune.train.grad_cache import GradCache
from cliptune.train.optim import current_lr, make_optimizer, make_scheduler
from cliptune.train.progress import EpochProgress
from cliptune.train.state import LoopState, MetricsLog, UnreadSteps
from cliptune.train.stepping import StepOps
from cliptune.train.tasks.bundle import TaskBundle
from cliptune.train.trackers import tracker_sink

__all__ = ["fit"]


@dataclass
class _Run:
    """What every phase of one ``fit`` call shares, built once before the first batch."""

    bundle: TaskBundle
    cfg: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    parts: checkpoint.Resumable  # model, optimizer, scheduler, state, stopper: what a checkpoint holds
    log: MetricsLog
    progress: EpochProgress
    stop_requested: Callable[[], bool]
    on_epoch: Callable[[dict[str, Any]], None]
    grad_cache: GradCache | None  # train.grad_cache: the step's forward and backward in two passes
    unread: UnreadSteps  # the loss terms of steps not read yet, on the device
    ops: StepOps  # backward, clip, step, zero: Accelerate's wrappers only where they do something


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
        TrainingError: Too little data, an unlogged metric, nothing (or a mismatched run) to resume, a
            non-finite loss beyond ``train.max_bad_steps``, a diverged model (collapsed or exploded
            embeddings or weights, before it is saved), out of memory (subclasses say which).
        TrainingInterrupted: Ctrl-C / SIGTERM, raised after a checkpoint of the current step is written.
    """
    state = LoopState()  # created here so the out-of-memory error can name the step
    with stop_on_signals() as stop_requested, out_of_memory_hint(cfg, state):
        n_batches = batches_per_epoch(len(bundle.train_data), cfg.batch_size, accelerator.num_processes)
        if n_batches == 0:
            raise EmptyEpochError(len(bundle.train_data), cfg.batch_size, accelerator.num_processes)
        optimizer = make_optimizer(bundle.model, cfg, accelerator.device)
        scheduler = make_scheduler(optimizer, cfg, total_steps=cfg.epochs * n_batches // cfg.grad_accum)
        model, optimizer = accelerator.prepare(bundle.model, optimizer)
        stopper = EarlyStopping.from_config(cfg.early_stopping) if cfg.early_stopping else None
        state.lrs = [current_lr(optimizer)]
        parts = checkpoint.Resumable(model, optimizer, scheduler, state, stopper)
        main = accelerator.is_main_process
        log = MetricsLog(RunDir(run_dir).metrics, enabled=main, sink=tracker_sink(accelerator))
        if resume:  # same weights, optimiser, schedule, RNGs and position; later log lines dropped
            checkpoint.restore_loop_checkpoint(run_dir, accelerator, parts, log)
        progress = EpochProgress(n_batches, enabled=main and not quiet, summaries=main)
        report = on_epoch or (lambda record: None)  # a sweep reports to Optuna; a plain run to no one
        cache = GradCache(cfg.grad_cache.chunk_size, accelerator) if cfg.grad_cache else None
        run = _Run(
            bundle,
            cfg,
            run_dir,
            accelerator,
            parts,
            log,
            progress,
            stop_requested,
            report,
            cache,
            UnreadSteps(),
            StepOps.build(accelerator, model, optimizer),
        )
        _train(run)
    return state


def _train(run: _Run) -> None:
    cfg, state, model = run.cfg, run.parts.state, run.parts.model
    if state.step == 0:  # the untrained model: where every curve starts and the first best-model candidate
        _baseline(run)

    for epoch in range(state.epoch, cfg.epochs):
        # train: this process's shard of every batch, from state.batch when resuming mid-epoch
        model.train()
        with state.timed("train"), run.progress.epoch(epoch, cfg.epochs, start=state.batch):
            for batch in epoch_batches(
                run.bundle.train_data,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                epoch=epoch,
                rank=run.accelerator.process_index,
                world_size=run.accelerator.num_processes,
                start_batch=state.batch,
                collate=run.bundle.collate,
            ):
                _train_step(run, epoch, batch)
            _read(run)  # the epoch's last losses: its means, and its skipped steps counted

        # validate -> schedule (plateau) -> early stopping -> log
        record, improved = _validate(run, epoch)

        # checkpoint: the best model to model/, the resumable state every train.checkpoint_every epochs
        with state.timed("checkpoint"):
            _checkpoint_epoch(run, improved)

        # report (a sweep's pruner), last: what it raises leaves the epoch logged and its model saved
        run.on_epoch(record)
        state.stop_reason = run.parts.stopper.stop_reason if run.parts.stopper else None
        if state.stop_reason:
            break
    state.stop_reason = state.stop_reason or f"reached train.epochs ({cfg.epochs})"
    if state.untrained_best:
        run.progress.warn(untrained_best_message(run.parts.stopper))


def _baseline(run: _Run) -> None:
    """Validate the untrained model as epoch 0; it is the best model (``model/``) until an epoch beats it."""
    state, stopper = run.parts.state, run.parts.stopper
    lr = current_lr(run.parts.optimizer)
    # an untrained model that fails the health check stops here, before anything is saved
    val = checked_validation(run.bundle, run.parts.model, run.cfg, state, epoch=0)
    record = {"kind": "epoch", "epoch": 0, "step": 0, "lr": lr, **val}
    if stopper is not None and stopper.metric.startswith("train/"):  # nothing trained yet: nothing to judge
        stopper.skip()
    elif stopper is not None:  # patience counts from this baseline: trained epochs must beat it
        stopper.update(metric_value(record, stopper.metric))
    run.log.write(record)
    with state.timed("checkpoint"):
        checkpoint.save_best_model(run.bundle, run.accelerator, run.parts.model, run.run_dir)
        checkpoint.save_initial_state(run.accelerator, run.parts.model, run.run_dir)  # WiSE-FT's start


def _train_step(run: _Run, epoch: int, batch: dict[str, Any]) -> None:
    """One batch: forward -> backward -> clip -> step -> zero -> log; on Ctrl-C/SIGTERM checkpoint, stop."""
    cfg, accelerator, state, optimizer = run.cfg, run.accelerator, run.parts.state, run.parts.optimizer
    with accelerator.accumulate(run.parts.model):
        # forward; the loss terms stay on the device (all-reduced over processes, so all skip alike)
        model, cache, batch = run.parts.model, run.grad_cache, to_device(batch, accelerator.device)
        outputs = cache.forward(model, batch) if cache else model(batch)
        names = list(outputs)
        terms, total = step_terms(accelerator, outputs)
        # backward -> clip -> step (-> lr); a non-finite loss or gradient norm makes the step a no-op
        if cache:  # pass 2 of gradient caching: the cached embedding gradients into the towers
            cache.backward(model)
        else:
            run.ops.backward(outputs["loss"])
        skipped = _clip_and_step(run, total)
        # zero
        run.ops.zero_grad()

    # log: a skipped step counts as a step (exact resume) but not in the epoch means (counted when read)
    state.finish_step()
    run.unread.add(names, terms, skipped)
    run.progress.advance(lr=current_lr(optimizer))
    # one process reads its own stop flag every step (free); several agree on it at the reads
    stop = accelerator.num_processes == 1 and run.stop_requested()
    if stop or state.step % cfg.log_every_steps == 0:
        loss = _read(run)
        if state.step % cfg.log_every_steps == 0:
            record = {"kind": "step", "epoch": epoch + 1, "step": state.step, "train/loss": loss}
            run.log.write({**record, "lr": current_lr(optimizer)})
        stop = any_process(accelerator, run.stop_requested())
    if stop:  # checked after the batch, so the checkpoint is taken at a clean point
        path = checkpoint.save_loop_checkpoint(run.run_dir, accelerator, run.parts, cfg.keep_last)
        raise TrainingInterrupted(state.step, run.run_dir, path)


def _read(run: _Run) -> float | None:
    """Read the unread steps (one host sync): epoch sums, skipped steps counted; the last step's loss.

    Raises:
        NonFiniteLossError: More skipped steps than ``train.max_bad_steps`` (see ``count_bad_steps``).
    """
    state, rows = run.parts.state, run.unread.read()
    bad: list[BadStep] = []
    for i, (values, skipped) in enumerate(rows, start=1):
        if skipped:  # the skipped steps' batches: the last len(rows) of this epoch
            back = len(rows) - i
            bad.append(BadStep(values["loss"], state.step - back, state.epoch + 1, state.batch - back))
        else:
            state.add_terms(values)
    count_bad_steps(state, bad, run.cfg, run.run_dir, run.progress.warn)
    loss = None if not rows or rows[-1][1] else rows[-1][0]["loss"]
    run.progress.show_loss(loss)
    return loss


def _clip_and_step(run: _Run, loss: torch.Tensor) -> torch.Tensor:
    """Clip and step, skipped on the device when ``loss`` or the gradient norm is non-finite; the flag.

    The cosine lr follows optimiser steps (clip and lr only when gradients sync); a skipped step still
    moves the schedule on, as the host cannot know it was skipped without waiting for the device.
    """
    accelerator, ops = run.accelerator, run.ops
    skipping = ops.inner
    earlier = skipping.pending  # this accumulation window's earlier batches skipped (or None: none yet)
    finite = torch.isfinite(loss)
    if accelerator.sync_gradients and run.cfg.grad_clip is not None:
        norm = ops.clip(run.cfg.grad_clip)
        if norm is not None:  # DeepSpeed clips inside its own step and returns None
            # a norm made non-finite by an earlier skipped batch of the window is not a new bad step
            finite_norm = torch.isfinite(norm) if earlier is None else torch.isfinite(norm) | (earlier > 0)
            finite = finite & finite_norm
    skipped = finite.logical_not().float()
    skipping.skip_if(skipped)  # combined over an accumulation window until the real step
    ops.step()
    if accelerator.sync_gradients and run.cfg.scheduler == "cosine":
        run.parts.scheduler.step()  # type: ignore[call-arg]
    return skipped


def _validate(run: _Run, epoch: int) -> tuple[dict[str, Any], bool]:
    """Validate, step a plateau schedule, update early stopping, log; the record, and if it is the best."""
    cfg, state, optimizer, stopper = run.cfg, run.parts.state, run.parts.optimizer, run.parts.stopper
    with state.timed("val"):  # a diverged model stops here: never logged, scored or saved as the best
        val = checked_validation(run.bundle, run.parts.model, cfg, state, epoch=epoch + 1)
    lr = current_lr(optimizer)  # the lr the epoch trained with, before the plateau schedule moves it
    record = {"kind": "epoch", "epoch": epoch + 1, "step": state.step, "lr": lr, **state.train_means(), **val}
    if cfg.scheduler == "plateau":
        run.parts.scheduler.step(metric_value(val, cfg.plateau.metric))  # type: ignore[arg-type]
    state.lrs.append(current_lr(optimizer))
    improved = stopper.update(metric_value(record, stopper.metric)) if stopper else True
    run.log.write(record)
    run.progress.summary(record)
    state.finish_epoch()
    return record, improved


def _checkpoint_epoch(run: _Run, improved: bool) -> None:
    """The best model to ``model/``; a resumable checkpoint every ``checkpoint_every`` epochs and the last."""
    state, cfg = run.parts.state, run.cfg
    if improved:
        state.best_epoch, state.best_step = state.epoch, state.step
        checkpoint.save_best_model(run.bundle, run.accelerator, run.parts.model, run.run_dir)
    if state.epoch % cfg.checkpoint_every == 0 or state.epoch == cfg.epochs:
        checkpoint.save_loop_checkpoint(run.run_dir, run.accelerator, run.parts, cfg.keep_last)
