"""Everything the loop writes to resume or deploy: checkpoints, the ``latest`` pointer and ``model/``.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding the trainable weights (safetensors), the
optimiser and scheduler state and the RNG states (``state.pt``, loadable with ``weights_only=True``) and
a ``trainer.json`` with the loop position and early-stopping state. It is built beside its final name and
swapped into place (:func:`cliptune.rundir.atomic_folder`), so a run killed at any moment leaves either
the old or the new checkpoint, never a half-written one; ``checkpoints/latest`` names the newest complete
one. The deployable model in ``model/`` is written the same way.

Example:
    >>> path = save_loop_checkpoint(run_dir, accelerator, resumable, keep_last=2)  # doctest: +SKIP
    >>> restore_loop_checkpoint(run_dir, accelerator, resumable, log)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from cliptune.models.backbone import load_state_strict
from cliptune.rundir import RunDir, atomic_folder, write_text_atomic
from cliptune.train.early_stopping import EarlyStopping
from cliptune.train.errors import NothingToResumeError, WorldSizeMismatchError
from cliptune.train.optim import Scheduler
from cliptune.train.state import LoopState, MetricsLog
from cliptune.train.tasks.bundle import TaskBundle

__all__ = [
    "Resumable",
    "save_loop_checkpoint",
    "restore_loop_checkpoint",
    "save_best_model",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_name",
    "prune_checkpoints",
    "rng_state",
    "set_rng_state",
]

WEIGHTS_FILE = "model.safetensors"  # a checkpoint's trainable weights and buffers


@dataclass
class Resumable:
    """What a checkpoint saves and a resume restores, besides the RNGs.

    Attributes:
        model: The (possibly Accelerate-wrapped) model; only trainable weights and buffers are stored.
        optimizer: The optimiser.
        scheduler: The learning-rate schedule.
        state: The loop position and running sums.
        stopper: Early stopping, or None when it is off.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    state: LoopState
    stopper: EarlyStopping | None


# ---------------------------------------------------------------------------------------------------------
# The loop's checkpoints and best model (every process calls these; the main process writes)
# ---------------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step`` steps (``step-00000123``)."""
    return f"step-{step:08d}"


def save_loop_checkpoint(run_dir: Path, accelerator: Accelerator, parts: Resumable, keep_last: int) -> Path:
    """Write ``checkpoints/step-XXXXXXXX`` (main process) and prune old ones, keeping the best.

    Args:
        run_dir: The run directory.
        accelerator: Which process writes; all wait for it.
        parts: What is saved.
        keep_last: The newest checkpoints to keep (``train.keep_last``); the best one is kept too.

    Returns:
        The checkpoint folder (on every process).
    """
    directory = RunDir(run_dir).checkpoints
    name = checkpoint_name(parts.state.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(
            directory,
            name,
            model_state=_trainable_state(accelerator.unwrap_model(parts.model)),
            optimizer=parts.optimizer,
            scheduler=parts.scheduler,
            trainer_state={
                "loop": parts.state.state_dict(),
                "early_stopping": parts.stopper.state_dict() if parts.stopper else None,
                "processes": accelerator.num_processes,
            },
        )
        prune_checkpoints(directory, keep_last, keep={checkpoint_name(parts.state.best_step)})
    accelerator.wait_for_everyone()
    return directory / name


def restore_loop_checkpoint(
    run_dir: Path, accelerator: Accelerator, parts: Resumable, log: MetricsLog
) -> None:
    """Load ``checkpoints/latest`` into the model, optimiser, scheduler, loop state and RNGs.

    Records logged after the checkpoint's step are dropped from ``metrics.jsonl``: the resumed run logs
    them again, so an interrupted-and-resumed run leaves the very file an uninterrupted one would.

    Args:
        run_dir: The run directory.
        accelerator: Its process count must be the one the checkpoint was written with.
        parts: Filled in place.
        log: The run's metrics log, truncated to the checkpoint's step.

    Raises:
        NothingToResumeError: No complete checkpoint.
        WorldSizeMismatchError: The checkpoint was written by a run with another number of processes (its
            position in the epoch would mean other batches).
        WeightsMismatchError: The checkpoint's weights are not exactly the trainable weights and buffers of
            this model (a key missing, unexpected or of another shape; all are named); nothing is loaded.
    """
    path = latest_checkpoint(RunDir(run_dir).checkpoints)
    if path is None:
        raise NothingToResumeError(RunDir(run_dir).checkpoints)
    model_state, opt_state, trainer = load_checkpoint(path)
    saved = trainer.get("processes", 1)
    if saved != accelerator.num_processes:
        raise WorldSizeMismatchError(path, saved, accelerator.num_processes)
    # Strict on exactly the saved keys: a missing, unexpected or reshaped one is an error, never skipped.
    model = accelerator.unwrap_model(parts.model)
    load_state_strict(model, model_state, path / WEIGHTS_FILE, keys=_saved_keys(model))
    parts.optimizer.load_state_dict(opt_state["optimizer"])
    parts.scheduler.load_state_dict(opt_state["scheduler"])
    parts.state.load_state_dict(trainer["loop"])
    if parts.stopper is not None and trainer.get("early_stopping"):
        parts.stopper.load_state_dict(trainer["early_stopping"])
    set_rng_state(opt_state["rng"])
    log.truncate_after(parts.state.step)


def save_best_model(bundle: TaskBundle, accelerator: Accelerator, model: nn.Module, run_dir: Path) -> None:
    """Write the deployable model to ``run_dir/model`` atomically with the task's ``save_model``."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_folder(RunDir(run_dir).model) as tmp:
            bundle.save_model(accelerator.unwrap_model(model), tmp)
    accelerator.wait_for_everyone()


def _saved_keys(model: nn.Module) -> set[str]:
    """What a checkpoint stores: trainable parameters and all buffers. Frozen weights are left out on
    purpose: the resumed run rebuilds them from the config exactly as the first run did."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k for k in model.state_dict() if k in trainable or k in buffers}


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    keys = _saved_keys(model)
    return {k: v for k, v in model.state_dict().items() if k in keys}


# ---------------------------------------------------------------------------------------------------------
# One checkpoint folder, the latest pointer, pruning and RNG state
# ---------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states; numpy's as plain lists so ``weights_only`` loading works."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path,
    name: str,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    trainer_state: dict[str, Any],
) -> Path:
    """Write one checkpoint atomically under ``directory/name`` and point ``latest`` at it.

    Args:
        directory: The run's ``checkpoints/`` folder (created if missing).
        name: Folder name, e.g. ``step-00000120``.
        model_state: Trainable weights (frozen towers are rebuilt from the config, not stored again).
        optimizer: Its ``state_dict`` is saved.
        scheduler: Its ``state_dict`` is saved.
        trainer_state: JSON-serialisable loop position (epoch, step, batch in epoch, early stopping...).

    Returns:
        The checkpoint folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    with atomic_folder(final) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(weights, tmp / WEIGHTS_FILE)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "state.pt",
        )
        trainer_json = json.dumps(trainer_state, indent=2, sort_keys=True)
        write_text_atomic(tmp / "trainer.json", trainer_json)
    write_text_atomic(directory / "latest", name)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None when there is none."""
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    path = directory / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "trainer.json").exists() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: ``(model_state, {optimizer, scheduler, rng}, trainer_state)``."""
    model_state = load_file(path / WEIGHTS_FILE)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    return model_state, state, trainer_state


def prune_checkpoints(directory: Path, keep_last: int, keep: set[str]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never those named in ``keep`` (the best)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names[:-keep_last] if keep_last else names:
        if name not in keep:
            shutil.rmtree(directory / name, ignore_errors=True)
