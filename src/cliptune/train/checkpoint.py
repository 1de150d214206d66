"""Resumable checkpoints written atomically, and the RNG state that makes a resume exact.

A checkpoint is a folder ``checkpoints/step-000123/`` holding the trainable weights (safetensors), the
optimiser and scheduler state (``torch.save``, loadable with ``weights_only=True``), the RNG states and a
``trainer.json`` with the loop position and early-stopping state. It is written into a temporary folder
and renamed into place, so a run killed at any moment leaves either the old or the new checkpoint, never a
half-written one. ``checkpoints/latest`` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "set_rng_state",
]


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states; numpy's as plain lists so ``weights_only`` loading works."""
    np_state = np.random.get_state()
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")


def save_checkpoint(
    directory: Path,
    name: str,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> Path:
    """Write one checkpoint atomically under ``directory/name`` and point ``latest`` at it.

    Args:
        directory: The run's ``checkpoints/`` folder.
        name: Folder name, e.g. ``step-000120``.
        model_state: Trainable weights (frozen towers are rebuilt from the config, not stored again).
        optimizer: Its ``state_dict`` is saved.
        scheduler: Its ``state_dict`` is saved.
        trainer_state: JSON-serialisable loop position (epoch, step, batch in epoch, early stopping...).

    Returns:
        The checkpoint folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors"
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "state.pt",
        )
        _write_json(tmp / "trainer.json", trainer_state)
        final = directory / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = directory / ".latest.tmp"
    pointer.write_text(name, encoding="utf-8")
    os.replace(pointer, directory / "latest")
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint, or None when there is none."""
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    path = directory / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "trainer.json").exists() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: (model_state, {optimizer, scheduler, rng}, trainer_state)."""
    model_state = load_file(path / "model.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    return model_state, state, trainer_state


def prune_checkpoints(directory: Path, keep_last: int, keep: set[str]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never those named in ``keep`` (the best)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names[:-keep_last] if keep_last else names:
        if name not in keep:
            shutil.rmtree(directory / name, ignore_errors=True)
