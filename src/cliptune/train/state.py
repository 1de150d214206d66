"""The loop's state, its metrics log, what it writes (checkpoints, the best model) and its guards.

The guards turn the two ways a run ends early from outside into something actionable: Ctrl-C / SIGTERM
become a checkpoint plus ``KeyboardInterrupt`` (:func:`stop_on_signals`), and running out of accelerator
memory becomes a :class:`TrainingError` naming the settings that lower it (:func:`out_of_memory_hint`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cliptune.config import TrainConfig
from cliptune.errors import CliptuneError
from cliptune.rundir import write_text_atomic
from cliptune.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)  # fmt: skip
from cliptune.train.early_stopping import EarlyStopping

__all__ = [
    "LoopState", "MetricsLog", "TrainingError", "save_loop_checkpoint", "restore_loop_checkpoint",
    "save_best_model", "stop_on_signals", "out_of_memory_hint",
]  # fmt: skip


class TrainingError(CliptuneError, RuntimeError):
    """Training cannot go on; the message says why and what to change."""


@dataclass
class LoopState:
    """Where the loop is; everything here is saved in checkpoints so a resume is exact."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # completed batches in the current epoch
    step: int = 0  # completed batches in the run
    bad_steps: int = 0
    best_epoch: int = 0
    best_step: int = 0
    lrs: list[float] = field(default_factory=list)  # lr at start, then after each epoch's scheduling
    epoch_sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    epoch_count: int = 0
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stop_reason: str | None = None

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] += seconds

    def count_bad_step(self, loss: float, max_bad_steps: int, run_dir: Path) -> str:
        """Count a non-finite loss at the coming step; the warning to show, or raise past the allowance.

        Raises:
            TrainingError: More than ``max_bad_steps`` bad steps; names the step and the last good checkpoint.
        """
        self.bad_steps += 1
        where = f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch + 1})"
        if self.bad_steps > max_bad_steps:
            last = latest_checkpoint(run_dir / "checkpoints")
            raise TrainingError(
                f"non-finite loss ({loss}) at {where}; last good checkpoint: {last or 'none'}. Lower train.lr, "
                f"enable train.grad_clip, or allow skipping with train.max_bad_steps (now {max_bad_steps})"
            )
        return f"non-finite loss ({loss}) at {where}: step skipped ({self.bad_steps}/{max_bad_steps} allowed)"

    def train_means(self) -> dict[str, float]:
        """The epoch's mean loss terms as ``train/<term>``: ``loss`` first, then by name, so a run resumed
        mid-epoch (sums restored from JSON) writes its record exactly like an uninterrupted one."""
        names = sorted(self.epoch_sums, key=lambda name: (name != "loss", name))
        return {f"train/{name}": self.epoch_sums[name] / max(1, self.epoch_count) for name in names}

    def add_terms(self, values: dict[str, float]) -> None:
        """Add one step's loss terms to the running epoch sums."""
        for name, value in values.items():
            self.epoch_sums[name] += value
        self.epoch_count += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "bad_steps": self.bad_steps,
            "best_epoch": self.best_epoch, "best_step": self.best_step, "lrs": list(self.lrs), "epoch_sums": dict(self.epoch_sums),
            "epoch_count": self.epoch_count, "timings": dict(self.timings),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "batch", "step", "bad_steps", "best_epoch", "best_step", "lrs", "epoch_count"):
            setattr(self, key, state[key])
        self.epoch_sums = defaultdict(float, state["epoch_sums"])
        self.timings = defaultdict(float, state["timings"])


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only).

    Args:
        path: The run's ``metrics.jsonl``.
        enabled: False on every process but the main one, so a multi-process run writes each line once.
        sink: Also called with every record (experiment trackers, see :mod:`cliptune.train.trackers`).
    """

    def __init__(
        self, path: Path, enabled: bool = True, sink: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.path, self.enabled, self.sink = path, enabled, sink

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()
        if self.sink is not None:
            self.sink(record)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (they are replayed by a resumed run)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers: frozen weights are rebuilt from the config on resume."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in trainable or k in buffers}


def save_loop_checkpoint(
    run_dir: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
    stopper: EarlyStopping | None,
    cfg: TrainConfig,
) -> None:
    """Write ``checkpoints/step-XXXXXXXX`` (main process) and prune old ones, keeping the best."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        directory = run_dir / "checkpoints"
        save_checkpoint(
            directory,
            f"step-{state.step:08d}",
            model_state=_trainable_state(accelerator.unwrap_model(model)),
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state={
                "loop": state.state_dict(),
                "early_stopping": stopper.state_dict() if stopper else None,
                "processes": accelerator.num_processes,
            },
        )
        prune_checkpoints(directory, cfg.keep_last, keep={f"step-{state.best_step:08d}"})
    accelerator.wait_for_everyone()


def save_best_model(bundle, accelerator: Accelerator, model: torch.nn.Module, run_dir: Path) -> None:
    """Write the deployable model to ``model/`` atomically (temp folder, then rename)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=run_dir))
        bundle.save_model(accelerator.unwrap_model(model), tmp)
        final = run_dir / "model"
        old = run_dir / ".model.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def restore_loop_checkpoint(
    run_dir: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
    stopper: EarlyStopping | None,
    log: MetricsLog,
) -> None:
    """Load ``checkpoints/latest`` into the model, optimiser, scheduler, loop state and RNGs.

    Records logged after the checkpoint's step are dropped from ``metrics.jsonl``: the resumed run logs
    them again, so an interrupted-and-resumed run leaves the very file an uninterrupted one would.

    Raises:
        TrainingError: No checkpoint, one that lacks trainable weights of this model, or one written by a
            run with another number of processes (its position in the epoch would mean other batches).
    """
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise TrainingError(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}")
    model_state, opt_state, trainer = load_checkpoint(path)
    saved = trainer.get("processes", 1)
    if saved != accelerator.num_processes:
        raise TrainingError(
            f"{path} was written by a run with {saved} process(es); this resume has "
            f"{accelerator.num_processes}: launch it the same way (e.g. torchrun --nproc_per_node {saved}) "
            "so the remaining batches are the same, or start a new run"
        )
    model = accelerator.unwrap_model(model)
    params = dict(model.named_parameters())
    missing = [k for k in model.load_state_dict(model_state, strict=False).missing_keys
               if k in params and params[k].requires_grad]  # fmt: skip
    if missing:
        raise TrainingError(f"checkpoint {path} lacks trainable weights: {missing[:5]}")
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    state.load_state_dict(trainer["loop"])
    if stopper is not None and trainer.get("early_stopping"):
        stopper.load_state_dict(trainer["early_stopping"])
    set_rng_state(opt_state["rng"])
    log.truncate_after(state.step)


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM only set a flag; yields the function that reads it.

    The loop checks the flag between batches, so the checkpoint is taken at a clean point. SIGTERM is
    what a pre-empted machine, a cluster scheduler or ``torchrun`` stopping its workers sends. A second
    signal acts as usual (a stuck run can still be killed); the previous handlers come back on exit.
    Outside the main thread signals cannot be caught and the flag stays False.
    """
    flag, previous = {"stop": False}, {}

    def _handler(signum: int, frame: Any) -> None:
        flag["stop"] = True
        signal.signal(signum, previous[signum])

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, _handler)
            previous[sig] = old if old is not None else signal.SIG_DFL
    except ValueError:  # not the main thread
        pass
    try:
        yield lambda: flag["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def out_of_memory_hint(cfg: TrainConfig, state: LoopState) -> Iterator[None]:
    """Re-raise ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) as a :class:`TrainingError`
    that names the step and the settings to change."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        raise TrainingError(
            f"out of accelerator memory after step {state.step} (epoch {state.epoch + 1}): {detail}. Lower "
            f"train.batch_size (now {cfg.batch_size}) and raise train.grad_accum (now {cfg.grad_accum}) to "
            "keep the effective batch, or set train.gradient_checkpointing: true"
        ) from exc
