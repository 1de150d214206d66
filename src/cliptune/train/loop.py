"""The training loop: reads top to bottom, knows only ``outputs["loss"]`` and the task's ``evaluate``.

Per epoch: batches -> forward -> backward -> clip -> step -> zero -> log; then validate -> schedule ->
early-stop -> checkpoint. Everything else (which data, which loss terms, which metrics, saving the model)
comes from the :class:`~cliptune.train.task.TaskBundle`; devices, mixed precision, accumulation and
distribution come from Accelerate.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cliptune.config import TrainConfig
from cliptune.train.checkpoint import latest_checkpoint, load_checkpoint, set_rng_state
from cliptune.train.data import batches_per_epoch, epoch_batches
from cliptune.train.early_stopping import EarlyStopping
from cliptune.train.optim import current_lr, make_optimizer, make_scheduler
from cliptune.train.progress import EpochProgress
from cliptune.train.state import LoopState, MetricsLog, TrainingError, save_best_model, save_loop_checkpoint
from cliptune.train.task import TaskBundle

__all__ = ["fit"]


def fit(
    bundle: TaskBundle,
    cfg: TrainConfig,
    run_dir: Path,
    accelerator: Accelerator,
    *,
    resume: bool = False,
    quiet: bool = False,
) -> LoopState:
    """Train ``bundle.model`` and write ``metrics.jsonl``, ``checkpoints/`` and ``model/`` in ``run_dir``.

    Args:
        bundle: The task's model, data, evaluation and saving.
        cfg: The ``train`` section of the config.
        run_dir: The run directory (created by the caller).
        accelerator: Devices, precision, accumulation and processes.
        resume: Continue from ``run_dir/checkpoints/latest`` (exactly: same batches, RNG and metrics).
        quiet: No progress bar (one line per epoch is still printed).

    Returns:
        The final loop state (best epoch, stop reason, LR history, timings).
    """
    n_batches = batches_per_epoch(len(bundle.train_data), cfg.batch_size, accelerator.num_processes)
    if n_batches == 0:
        raise TrainingError(
            f"the training split has {len(bundle.train_data)} items, fewer than one global batch "
            f"({cfg.batch_size} x {accelerator.num_processes} processes): lower train.batch_size"
        )
    optimizer = make_optimizer(bundle.model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=cfg.epochs * n_batches // cfg.grad_accum)
    model, optimizer = accelerator.prepare(bundle.model, optimizer)
    stopper = EarlyStopping.from_config(cfg.early_stopping) if cfg.early_stopping else None
    state = LoopState(lrs=[current_lr(optimizer)])
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    if resume:
        _restore(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, state, stopper, log)
    stop_requested = _install_sigint_flag()
    main = accelerator.is_main_process
    progress = EpochProgress(n_batches, enabled=main and not quiet, summaries=main)

    if state.step == 0:  # the untrained model's values: the baseline every curve starts from
        model.eval()
        with torch.no_grad():
            log.write(
                {
                    "kind": "epoch",
                    "epoch": 0,
                    "step": 0,
                    "lr": current_lr(optimizer),
                    **bundle.evaluate(model),
                }
            )

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
                    loss = outputs["loss"]
                    loss_value = float(loss.detach())
                    if not torch.isfinite(loss):
                        _skip_bad_step(state, cfg, run_dir, loss, optimizer)
                        continue
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.grad_clip is not None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    if accelerator.sync_gradients and cfg.scheduler == "cosine":
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batch += 1
                state.step += 1
                for name, value in outputs.items():
                    state.epoch_sums[name] += float(value.detach())
                state.epoch_count += 1
                lr = current_lr(optimizer)
                if state.step % cfg.log_every_steps == 0:
                    log.write(
                        {
                            "kind": "step",
                            "epoch": epoch + 1,
                            "step": state.step,
                            "train/loss": loss_value,
                            "lr": lr,
                        }
                    )
                progress.advance(loss=loss_value, lr=lr)
                if stop_requested():
                    save_loop_checkpoint(
                        run_dir, accelerator, model, optimizer, scheduler, state, stopper, cfg
                    )
                    raise KeyboardInterrupt(f"interrupted at step {state.step}; resume with --resume")
        state.add_time("train", time.perf_counter() - tic)

        tic = time.perf_counter()
        model.eval()
        with torch.no_grad():
            val = bundle.evaluate(model)
        state.add_time("val", time.perf_counter() - tic)
        train_means = {f"train/{k}": v / max(1, state.epoch_count) for k, v in state.epoch_sums.items()}
        record = {"kind": "epoch", "epoch": epoch + 1, "step": state.step, "lr": current_lr(optimizer),
                  **train_means, **val}  # fmt: skip
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
            save_loop_checkpoint(run_dir, accelerator, model, optimizer, scheduler, state, stopper, cfg)
        state.add_time("checkpoint", time.perf_counter() - tic)
        if stopper and stopper.should_stop:
            state.stop_reason = (
                f"early stopping: {stopper.metric} did not improve for {stopper.bad_epochs} epoch(s) "
                f"(best {stopper.best:.6g} at epoch {stopper.best_epoch + 1})"
            )
            break
    state.stop_reason = state.stop_reason or f"reached train.epochs ({cfg.epochs})"
    return state


def _metric(values: dict[str, Any], name: str) -> float:
    if name not in values:
        raise TrainingError(f"metric '{name}' is not logged; logged: {', '.join(sorted(values))}")
    return float(values[name])


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _skip_bad_step(state: LoopState, cfg: TrainConfig, run_dir: Path, loss: torch.Tensor, optimizer) -> None:
    state.bad_steps += 1
    optimizer.zero_grad(set_to_none=True)
    if state.bad_steps > cfg.max_bad_steps:
        last = latest_checkpoint(run_dir / "checkpoints")
        raise TrainingError(
            f"non-finite loss ({float(loss)}) at step {state.step + 1} (epoch {state.epoch + 1}, batch "
            f"{state.batch + 1}); last good checkpoint: {last or 'none'}. Lower train.lr, enable "
            f"train.grad_clip, or allow skipping with train.max_bad_steps"
        )


def _restore(run_dir, model, optimizer, scheduler, state: LoopState, stopper, log: MetricsLog) -> None:
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise TrainingError(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}")
    model_state, opt_state, trainer = load_checkpoint(path)
    missing = [k for k in model.load_state_dict(model_state, strict=False).missing_keys
               if dict(model.named_parameters()).get(k) is not None and model.get_parameter(k).requires_grad]  # fmt: skip
    if missing:
        raise TrainingError(f"checkpoint {path} lacks trainable weights: {missing[:5]}")
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    state.load_state_dict(trainer["loop"])
    if stopper is not None and trainer.get("early_stopping"):
        stopper.load_state_dict(trainer["early_stopping"])
    set_rng_state(opt_state["rng"])
    log.truncate_after(state.step)


def _install_sigint_flag():
    """Ctrl-C sets a flag checked between batches, so the checkpoint is taken at a clean point."""
    flag = {"stop": False}
    try:
        previous = signal.getsignal(signal.SIGINT)

        def _handler(signum, frame):  # second Ctrl-C: default behaviour
            flag["stop"] = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, _handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass
    return lambda: flag["stop"]
