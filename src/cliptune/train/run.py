"""``cliptune train``: config -> run directory (config.yaml, splits.json, metrics.jsonl, model/, summary.json)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from cliptune import __version__
from cliptune.config import Config, load_config, save_config
from cliptune.data.prepare import prepare_data
from cliptune.models.backbone import load_backbone
from cliptune.models.freeze import LoraSpec, count_parameters
from cliptune.train.loop import fit
from cliptune.train.optim import count_lr_reductions
from cliptune.train.state import TrainingError
from cliptune.train.task import TaskBundle

__all__ = ["train", "resolve_precision"]


def resolve_precision(precision: str) -> str:
    """Accelerate's ``mixed_precision`` for a config value.

    ``auto`` is bf16 on a CUDA device that supports it, fp16 on older CUDA devices and fp32 on CPU, where
    exact resumes and bitwise-reproducible tests matter more than speed for the small trainable heads.
    """
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    return {"fp32": "no"}.get(precision, precision)


def _build_task(cfg: Config, run_dir: Path, accelerator: Accelerator, quiet: bool) -> TaskBundle:
    data = prepare_data(cfg.data, run_dir if accelerator.is_main_process else None, progress=not quiet)
    m = cfg.model
    lora = LoraSpec(**m.lora.model_dump()) if m.lora is not None else None
    backbone = load_backbone(
        m.backbone, trainable_layers=m.trainable_layers, lora=lora, embed_dim=m.embed_dim
    )
    if cfg.train.gradient_checkpointing:
        for tower in backbone.towers():
            body = getattr(tower, "body", None)
            if hasattr(body, "gradient_checkpointing_enable"):
                body.gradient_checkpointing_enable()
    if cfg.train.task == "siamese":
        from cliptune.train.siamese import build_siamese

        bundle = build_siamese(cfg, data, backbone, accelerator, progress=not quiet)
    else:
        from cliptune.train.retrieval import build_retrieval

        bundle = build_retrieval(cfg, data, backbone, accelerator, progress=not quiet)
    trainable, total = count_parameters(bundle.model)
    bundle.info |= {"trainable_parameters": trainable, "total_parameters": total}
    return bundle


def train(
    cfg: Config,
    *,
    runs_root: Path = Path("runs"),
    resume: Path | None = None,
    quiet: bool = False,
) -> Path:
    """Train as configured and write the run directory.

    Args:
        cfg: The validated config; ``cfg.name`` names the run (``runs_root/<name>``).
        runs_root: Parent folder of run directories.
        resume: A run directory to continue exactly from its latest checkpoint (its own config.yaml is used).
        quiet: No progress bars.

    Returns:
        The run directory.

    Raises:
        TrainingError: The run directory already holds a run (and no resume was asked), or training failed.
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_config(run_dir / "config.yaml")
    else:
        if not cfg.name:
            raise TrainingError("the run has no name: set `name:` in the config or pass --name")
        run_dir = runs_root / cfg.name
        if (run_dir / "metrics.jsonl").exists():
            raise TrainingError(f"{run_dir} already holds a run: pass --resume {run_dir}, or another --name")
    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.train.precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
    )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)
    tic = time.perf_counter()
    bundle = _build_task(cfg, run_dir, accelerator, quiet)
    setup_seconds = time.perf_counter() - tic
    state = fit(bundle, cfg.train, run_dir, accelerator, resume=resume is not None, quiet=quiet)
    if accelerator.is_main_process:
        _write_summary(run_dir, cfg, state, bundle.info, setup_seconds, accelerator)
    accelerator.end_training()
    return run_dir


def _write_summary(
    run_dir: Path, cfg: Config, state, info: dict[str, Any], setup: float, accelerator
) -> None:
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    best = next((r for r in epochs if r["epoch"] == state.best_epoch), epochs[-1] if epochs else {})
    summary = {
        "name": cfg.name,
        "task": cfg.train.task,
        "epochs_run": len(epochs),
        "best_epoch": state.best_epoch,
        "stop_reason": state.stop_reason,
        "lr_reductions": count_lr_reductions(state.lrs),
        "lr_final": state.lrs[-1] if state.lrs else None,
        "final": {k: v for k, v in (epochs[-1] if epochs else {}).items() if k != "kind"},
        "best": {k: v for k, v in best.items() if k != "kind"},
        "timings_seconds": {"setup": setup, **dict(state.timings)},
        "info": info,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "versions": {
            "cliptune": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    tmp.replace(run_dir / "summary.json")
