"""``cliptune train``: config -> run directory (config.yaml, splits.json, metrics.jsonl, model/, summary.json)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from cliptune import __version__
from cliptune.config import Config, load_config, save_config
from cliptune.data.images import ImageLoadError
from cliptune.data.prepare import PreparedData, prepare_data
from cliptune.data.split_health import SplitError, check_trainable, judge_rows, suggest_split
from cliptune.data.splits import carved_groups
from cliptune.data.triplets import make_triplets
from cliptune.models.factory import load_backbone
from cliptune.models.freeze import LoraSpec, count_parameters
from cliptune.rundir import RunDir, read_metrics, write_summary
from cliptune.train.errors import (
    LauncherMismatchError,
    MissingRunNameError,
    RunExistsError,
    TrainingError,
)
from cliptune.train.loop import fit
from cliptune.train.optim import count_lr_reductions
from cliptune.train.state import LoopState
from cliptune.train.tasks.bundle import TaskBundle
from cliptune.train.trackers import check_trackers, start_trackers, tracker_options

__all__ = ["train", "resolve_precision"]

_console = Console(stderr=True, soft_wrap=True)


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


def _build_task(cfg: Config, run_dir: Path, accelerator: Accelerator, quiet: bool, fresh: bool) -> TaskBundle:
    main = accelerator.is_main_process
    data = prepare_data(cfg.data, run_dir if main else None, progress=not quiet)
    try:
        splits_info = _check_splits(cfg, data, announce=main)  # before any embedding
    except SplitError:
        if fresh and main:  # else a rerun with the fix would reuse the unusable splits.json
            RunDir(run_dir).splits.unlink(missing_ok=True)
        raise
    m = cfg.model
    lora = LoraSpec(**m.lora.model_dump()) if m.lora is not None else None
    extra = {"image_size": m.image_size} if m.image_size is not None else {}
    backbone = load_backbone(
        m.backbone, trainable_layers=m.trainable_layers, lora=lora, embed_dim=m.embed_dim, **extra
    )
    if cfg.train.gradient_checkpointing:
        for tower in backbone.towers():
            enable = getattr(getattr(tower, "body", None), "gradient_checkpointing_enable", None)
            if enable is not None:
                enable()
    if cfg.train.task == "siamese":
        from cliptune.train.tasks.siamese import build_siamese

        bundle = build_siamese(cfg, data, backbone, accelerator, progress=not quiet)
    else:
        from cliptune.train.tasks.retrieval import build_retrieval

        bundle = build_retrieval(cfg, data, backbone, accelerator, progress=not quiet)
    trainable, total = count_parameters(bundle.model)
    bundle.info |= {"trainable_parameters": trainable, "total_parameters": total, "splits": splits_info}
    if bundle.collate is not None:  # images decoded while training: a row can still fail to load
        bundle.collate = _BadRowGuard(bundle.collate, data, cfg.data.on_bad_row, run_dir)
    return bundle


def _check_splits(cfg: Config, data: PreparedData, *, announce: bool) -> dict[str, Any]:
    """Fail on a split that cannot train; say where val came from and which splits cannot judge models.

    Returns ``summary.json``'s ``info.splits``: groups per split, carved groups, whether training
    validates, and each held-out split's health (:mod:`cliptune.data.split_health`).
    """
    source = data.catalogue.metadata_path.name
    check_trainable(data.splits, cfg.data.split.ratios, source)
    if cfg.train.task == "siamese":  # triplets are cheap to draw: check them before the towers embed
        triplets, _ = make_triplets(data, cfg.data.group_column, cfg.data.split.seed)
        for name in ("train", "val"):
            if data.splits.get(name) and not len(triplets.get(name, [])):
                raise SplitError(
                    f"the {name} split has no triplets ({len(data.splits[name])} group(s)): the siamese task "
                    f"needs {name} groups with two or more items and at least two groups; give {name} more "
                    "groups (data.split.ratios, data.split.min_groups) or add a triplets file",
                    name,
                    {n: len(g) for n, g in sorted(data.splits.items())},
                )
    counts = {name: len(gids) for name, gids in sorted(data.splits.items())}
    lines: list[str] = []
    carved = carved_groups(data.check.good, data.splits, cfg.data.group_column)
    carved_info = {}
    ratios = cfg.data.split.ratios
    for name, gids in carved.items():
        rows = int((data.rows["split"] == name).sum())
        share = ratios.get(name, 0.0) / (ratios.get(name, 0.0) + ratios["train"])
        carved_info[name] = {"groups": len(gids), "rows": rows, "from": "train", "share": share}
        lines.append(
            f"{name}: {len(gids)} group(s) ({rows} rows) carved from the train rows of {source}, which names no "
            f"{name} split ({share:.0%} of them by data.split.ratios, at least data.split.min_groups="
            f"{cfg.data.split.min_groups} groups while train keeps half; seed {cfg.data.split.seed})"
        )
    validates = bool(data.splits.get("val"))
    if not validates:
        lines.append(
            "no validation: data.split.ratios has no val share; epochs log train metrics only and model/ "
            "holds the last epoch"
        )
    held_out = [n for n in data.splits if n != "train" and data.splits[n]]
    health = [judge_rows(data.rows, n, cfg.eval.relevant, cfg.data.group_column) for n in held_out]
    n_groups = sum(counts.values())
    wanted = [n for n, share in cfg.data.split.ratios.items() if n != "train" and share > 0]
    explicit = data.check.good.get("split")
    named = set(explicit.dropna().astype(str)) if explicit is not None else set()
    warnings = []
    for h in health:
        if h.warning:
            fixed = h.split if h.split in named and h.split not in carved else None
            warnings.append(f"{h.warning}; {suggest_split(n_groups, wanted, len(data.rows), fixed)}")
    lines += [f"warning: {w}" for w in warnings]
    if announce:
        for line in lines:
            _console.print(line, highlight=False, markup=False)
    return {
        "groups": counts,
        "carved": carved_info,
        "validation": validates,
        "fixed": sorted(n for n in named if n in data.splits and n not in carved),
        "health": [h.as_dict() for h in health],
        "warnings": warnings,
    }


class _BadRowGuard:
    """Wraps a collate that loads images: a row that fails mid-training stops the run naming the file
    (``on_bad_row: error``) or is dropped from its batch and appended to ``rejected.csv`` (``skip``)."""

    def __init__(
        self,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        data: PreparedData,
        on_bad_row: str,
        run_dir: Path,
    ) -> None:
        self.collate, self.on_bad_row, self.rejected_csv = collate, on_bad_row, RunDir(run_dir).rejected
        self.source = data.catalogue.metadata_path.name
        paths = [str(data.catalogue.image_path(f)) for f in data.rows["file_name"]]
        self.rows = dict(zip(paths, zip(data.rows["file_name"], data.rows["row"], strict=True), strict=True))
        self.seen: set[str] = set()
        if self.rejected_csv.exists():  # a resumed run does not list a row twice
            self.seen = {
                str(data.catalogue.image_path(f)) for f in pd.read_csv(self.rejected_csv)["file_name"]
            }

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        items = list(items)
        while True:
            try:
                return self.collate(items)
            except ImageLoadError as exc:
                bad = str(exc.path)
                file_name, row = self.rows.get(bad, (Path(bad).name, -1))
                if self.on_bad_row == "error" or not any(it.get("path") == bad for it in items):
                    raise TrainingError(
                        f"{bad} (row {row} of {self.source}, file_name {file_name}) failed to load during "
                        f"training: {exc.reason}. It passed the check at the start of the run, so it changed "
                        "since; fix it, or set data.on_bad_row=skip to drop such rows (listed in rejected.csv)"
                    ) from exc
                items = [it for it in items if it.get("path") != bad]
                self._reject(bad, file_name, row, exc.reason)
                if not items:
                    raise TrainingError(
                        f"every item of a training batch failed to load (last: {bad})"
                    ) from exc

    def _reject(self, path: str, file_name: str, row: int, reason: str) -> None:
        if path in self.seen:
            return
        self.seen.add(path)
        _console.print(
            f"[yellow]warning:[/yellow] dropped {file_name} (row {row}) from training: {reason}; "
            f"listed in {self.rejected_csv}",
            highlight=False,
        )
        reason = f"failed during training: {reason}"
        entry = {"file_name": file_name, "row": row, "reason": reason, "source": self.source}
        line = pd.DataFrame([entry]).to_csv(index=False)
        try:  # "x": exactly one process writes the header, even when several reject rows at once
            with self.rejected_csv.open("x", encoding="utf-8") as fh:
                fh.write(line)
        except FileExistsError:
            with self.rejected_csv.open("a", encoding="utf-8") as fh:
                fh.write(line.split("\n", 1)[1])


def train(
    cfg: Config,
    *,
    runs_root: Path = Path("runs"),
    resume: Path | None = None,
    quiet: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train as configured and write the run directory.

    Works unchanged when a launcher (torchrun, Accelerate) starts several processes: each trains a shard
    of every batch and only the main process writes files.

    Args:
        cfg: The validated config; ``cfg.name`` names the run (``runs_root/<name>``).
        runs_root: Parent folder of run directories.
        resume: A run directory to continue exactly from its latest checkpoint (its own config.yaml is used).
        quiet: No progress bars.
        on_epoch: Called on every process with each trained epoch's ``metrics.jsonl`` record (epochs 1..,
            not the untrained baseline), after it is logged and the checkpoint written. An exception it
            raises (a sweep's ``optuna.TrialPruned``) stops training and propagates; ``summary.json`` is
            then not written, and trackers are still closed.

    Returns:
        The run directory.

    Raises:
        MissingRunNameError: A new run without ``cfg.name``.
        RunExistsError: The run directory already holds a run (and no resume was asked).
        LauncherMismatchError: The launcher and Accelerate disagree on the number of processes.
        TrainingError: A tracker's package is missing, an unsupported setting, or training failed (the
            subclasses raised by :func:`cliptune.train.loop.fit`).
        TrainingInterrupted: Ctrl-C / SIGTERM during training, after a resumable checkpoint was written.
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_config(RunDir(run_dir).config)
    else:
        if not cfg.name:
            raise MissingRunNameError()
        run_dir = runs_root / cfg.name
        if RunDir(run_dir).metrics.exists():
            raise RunExistsError(run_dir)
    if cfg.train.val_every_steps is not None:  # a setting that silently did nothing would mislead
        raise TrainingError("train.val_every_steps is not supported yet: validation runs after every epoch")
    check_trackers(cfg.track)
    accelerator = Accelerator(
        cpu=not _has_accelerator(),  # without it, torchrun on a CPU machine starts N unaware single runs
        mixed_precision=resolve_precision(cfg.train.precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        **tracker_options(cfg.track, run_dir),
    )
    try:
        _check_processes(accelerator)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, RunDir(run_dir).config)
        accelerator.wait_for_everyone()
        start_trackers(accelerator, cfg, run_dir)
        set_seed(cfg.train.seed)
        tic = time.perf_counter()
        bundle = _build_task(cfg, run_dir, accelerator, quiet, fresh=resume is None)
        setup_seconds = time.perf_counter() - tic
        state = fit(
            bundle, cfg.train, run_dir, accelerator, resume=resume is not None, quiet=quiet, on_epoch=on_epoch
        )
        if accelerator.is_main_process:
            _write_summary(run_dir, cfg, state, bundle.info, setup_seconds, accelerator)
    finally:  # trackers flushed and the process group torn down on every exit (else gloo aborts at exit)
        accelerator.end_training()
    return run_dir


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def _check_processes(accelerator: Accelerator) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LauncherMismatchError(launched, accelerator.num_processes)


def _write_summary(
    run_dir: Path, cfg: Config, state: LoopState, info: dict[str, Any], setup: float, accelerator: Accelerator
) -> None:
    records = read_metrics(run_dir)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    best = next((r for r in epochs if r["epoch"] == state.best_epoch), epochs[-1] if epochs else {})
    summary = {
        "name": cfg.name,
        "task": cfg.train.task,
        "epochs_trained": state.epoch,  # epoch 0, the untrained baseline, is validated but not trained
        "best_epoch": state.best_epoch,  # the epoch model/ holds; 0 = the untrained model
        "best_is_untrained": state.untrained_best,
        "stop_reason": state.stop_reason,
        "bad_steps": state.bad_steps,
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
    write_summary(run_dir, summary)
