"""The loop's state, its metrics log and the two things it writes: checkpoints and the best model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cliptune.config import TrainConfig
from cliptune.train.checkpoint import prune_checkpoints, save_checkpoint
from cliptune.train.early_stopping import EarlyStopping

__all__ = ["LoopState", "MetricsLog", "TrainingError", "save_loop_checkpoint", "save_best_model"]


class TrainingError(RuntimeError):
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
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (they are replayed by a resumed run)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, self.path)


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
