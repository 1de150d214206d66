"""Everything the loop writes to resume or deploy: checkpoints, the ``latest`` pointer and ``model/``.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding the trainable weights (safetensors), the
optimiser and scheduler state and the RNG states (``state.pt``, loadable with ``weights_only=True``) and
a ``trainer.json`` with the loop position and early-stopping state, and last a ``manifest.json`` with the
size and SHA-256 of each of them. It is built beside its final name and swapped into place
(:func:`cliptune.rundir.atomic_folder`), so a run killed at any moment leaves either the old or the new
checkpoint, never a half-written one; ``checkpoints/latest`` names the newest complete one. The deployable
model in ``model/`` is written the same way.

What a kill cannot do, a disk fault, a full disk or a careless edit can: a resume verifies the newest
checkpoint against its manifest and, when it is damaged, falls back to the newest intact one with a
warning that names the damaged files (``train.keep_last`` keeps older ones for this); when none is intact
it fails with :class:`CheckpointDamagedError`, naming every damaged file.

Example:
    >>> path = save_loop_checkpoint(run_dir, accelerator, resumable, keep_last=2)  # doctest: +SKIP
    >>> restore_loop_checkpoint(run_dir, accelerator, resumable, log)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from cliptune.models.backbone import load_state_strict
from cliptune.rundir import RunDir, atomic_folder, clean_stale_temps, write_bytes_atomic, write_text_atomic
from cliptune.train.early_stopping import EarlyStopping
from cliptune.train.errors import NothingToResumeError, TrainingError, WorldSizeMismatchError
from cliptune.train.optim import Scheduler
from cliptune.train.state import LoopState, MetricsLog
from cliptune.train.tasks.bundle import TaskBundle

__all__ = [
    "CheckpointDamagedError",
    "Resumable",
    "save_loop_checkpoint",
    "restore_loop_checkpoint",
    "save_best_model",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_name",
    "damaged_files",
    "newest_intact_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "set_rng_state",
    "truncate_log",
]

WEIGHTS_FILE = "model.safetensors"  # a checkpoint's trainable weights and buffers
STATE_FILE = "state.pt"  # optimiser, scheduler and RNG states
TRAINER_FILE = "trainer.json"  # loop position and early stopping
MANIFEST_FILE = "manifest.json"  # {file: {"bytes", "sha256"}} of the three above, written last

_console = Console(stderr=True, soft_wrap=True)


class CheckpointDamagedError(TrainingError):
    """No checkpoint of the run is intact: each is named with its damaged files and what is wrong.

    Attributes:
        checkpoints: The run's ``checkpoints/`` folder.
        damaged: ``{checkpoint folder: {file name: reason}}``, newest first.
    """

    def __init__(self, checkpoints: Path, damaged: dict[Path, dict[str, str]]) -> None:
        self.checkpoints, self.damaged = checkpoints, damaged
        super().__init__(f"no intact checkpoint in {checkpoints} to resume from: {_describe(damaged)}")


def _describe(damaged: dict[Path, dict[str, str]]) -> str:
    return "; ".join(
        ", ".join(f"{folder / name} {reason}" for name, reason in files.items())
        for folder, files in damaged.items()
    )


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

    Stale temporary files of interrupted writes are removed first (:func:`cliptune.rundir.clean_stale_temps`);
    a damaged newest checkpoint is skipped for the newest intact one with a warning; a torn last line of
    ``metrics.jsonl`` (a kill mid-append) is dropped with a warning. The early-stopping patience is the
    configured one, not the checkpoint's, so a resume may raise it.

    Raises:
        NothingToResumeError: No complete checkpoint.
        CheckpointDamagedError: Checkpoints exist but none is intact (every damaged file is named).
        DamagedFileError: ``metrics.jsonl`` has a damaged line before its last (named as file:line).
        WorldSizeMismatchError: The checkpoint was written by a run with another number of processes (its
            position in the epoch would mean other batches).
        WeightsMismatchError: The checkpoint's weights are not exactly the trainable weights and buffers of
            this model (a key missing, unexpected or of another shape; all are named); nothing is loaded.
    """
    main = accelerator.is_main_process
    if main:
        clean_stale_temps(run_dir)
    accelerator.wait_for_everyone()
    path, damaged = newest_intact_checkpoint(RunDir(run_dir).checkpoints)
    if main and damaged:
        _console.print(
            f"[yellow]warning:[/yellow] damaged checkpoint(s) skipped: {_describe(damaged)}; "
            f"resuming from {path}",
            highlight=False,
        )
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
        patience = parts.stopper.patience  # configured now: a resume may change it (cliptune.train.run)
        parts.stopper.load_state_dict(trainer["early_stopping"])
        parts.stopper.patience = patience
    set_rng_state(opt_state["rng"])
    truncate_log(log, parts.state.step)


def truncate_log(log: MetricsLog, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step``; warn when a torn last line (a kill) was dropped too."""
    torn = log.truncate_after(step)
    if torn is not None:
        _console.print(
            f"[yellow]warning:[/yellow] {log.path}:{torn} was cut short by an interrupted write; dropped "
            "(the resumed run logs it again)",
            highlight=False,
        )


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
    # Every file is fsync'd before its rename (unlike other run files, which are cheap to recompute): right
    # after this checkpoint is written, `prune_checkpoints` deletes older ones, so after a power cut the
    # newest may be the only one left, and a rename that reached the disk before the data would leave it
    # empty or short (ext4's delayed allocation). The manifest would name the damage, but nothing intact
    # would remain to fall back to. A few milliseconds per checkpoint.
    with atomic_folder(final) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        write_bytes_atomic(tmp / WEIGHTS_FILE, safetensors_bytes(weights), fsync=True)
        state = io.BytesIO()
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            state,
        )
        write_bytes_atomic(tmp / STATE_FILE, state.getvalue(), fsync=True)
        trainer_json = json.dumps(trainer_state, indent=2, sort_keys=True)
        write_text_atomic(tmp / TRAINER_FILE, trainer_json, fsync=True)
        manifest = {f: _fingerprint(tmp / f) for f in (WEIGHTS_FILE, STATE_FILE, TRAINER_FILE)}
        write_text_atomic(
            tmp / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n", fsync=True
        )
    write_text_atomic(directory / "latest", name, fsync=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (the ``latest`` pointer), or None when there is none.

    Complete means written to the end; whether its files are still intact is :func:`damaged_files`'s
    question.
    """
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    path = directory / pointer.read_text(encoding="utf-8").strip()
    return path if (path / TRAINER_FILE).exists() else None


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def damaged_files(path: Path) -> dict[str, str]:
    """``{file name: what is wrong}`` for one checkpoint folder; empty when it matches its manifest.

    A checkpoint from before manifests (no ``manifest.json`` but a ``trainer.json``) cannot be verified
    and passes here; :func:`newest_intact_checkpoint` still catches a file that fails to load.
    """
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return {} if (path / TRAINER_FILE).is_file() else {MANIFEST_FILE: "is missing"}
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in manifest.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return {MANIFEST_FILE: f"is unreadable ({exc})"}
    problems: dict[str, str] = {}
    for name, (size, sha) in expected.items():
        file = path / name
        if not file.is_file():
            problems[name] = "is missing"
            continue
        now = file.stat().st_size
        if now != size:
            problems[name] = f"has {now} bytes, {size} written"
        elif _fingerprint(file)["sha256"] != sha:
            problems[name] = "has other contents than were written (SHA-256 differs)"
    return problems


def newest_intact_checkpoint(directory: Path) -> tuple[Path, dict[Path, dict[str, str]]]:
    """The newest checkpoint that verifies and loads, and the damaged newer ones (newest first).

    Raises:
        NothingToResumeError: ``directory`` holds no checkpoint.
        CheckpointDamagedError: Every checkpoint is damaged.
    """
    found = (
        sorted((p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)
        if directory.is_dir()
        else []
    )
    if not found:
        raise NothingToResumeError(directory)
    damaged: dict[Path, dict[str, str]] = {}
    for path in found:
        problems = damaged_files(path)
        if not problems and not (path / MANIFEST_FILE).is_file():
            problems = _load_problems(path)
        if not problems:
            return path, damaged
        damaged[path] = problems
    raise CheckpointDamagedError(directory, damaged)


def _load_problems(path: Path) -> dict[str, str]:
    """What fails to load in a checkpoint that has no manifest to verify it against."""
    problems: dict[str, str] = {}
    loaders: dict[str, Any] = {
        WEIGHTS_FILE: load_file,
        STATE_FILE: lambda f: torch.load(f, map_location="cpu", weights_only=True),
        TRAINER_FILE: lambda f: json.loads(f.read_text(encoding="utf-8")),
    }
    for name, loader in loaders.items():
        try:
            loader(path / name)
        except Exception as exc:  # noqa: BLE001 - any failure to read is damage, reported by file
            problems[name] = f"fails to load ({type(exc).__name__}: {str(exc)[:120]})"
    return problems


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: ``(model_state, {optimizer, scheduler, rng}, trainer_state)``."""
    model_state = load_file(path / WEIGHTS_FILE)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / TRAINER_FILE).read_text(encoding="utf-8"))
    return model_state, state, trainer_state


def prune_checkpoints(directory: Path, keep_last: int, keep: set[str]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never those named in ``keep`` (the best)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names[:-keep_last] if keep_last else names:
        if name not in keep:
            shutil.rmtree(directory / name, ignore_errors=True)
