"""``cliptune train``: config -> run directory (config.yaml, splits.json, metrics.jsonl, model/, summary.json)."""

from __future__ import annotations

import json
import os
import platform
import shutil
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
from cliptune.rundir import RunDir, clean_stale_temps, read_metrics, write_summary
from cliptune.train import checkpoint
from cliptune.train.errors import (
    LauncherMismatchError,
    MissingRunNameError,
    RunExistsError,
    TrainingError,
)
from cliptune.train.loop import fit
from cliptune.train.optim import count_lr_reductions
from cliptune.train.state import LoopState, MetricsLog
from cliptune.train.tasks.bundle import TaskBundle
from cliptune.train.trackers import check_trackers, start_trackers, tracker_options

__all__ = [
    "RESUMABLE_CHANGES",
    "ResumeChangeError",
    "UnresumableRunError",
    "resume_changes",
    "train",
    "resolve_precision",
]

# What a resume may change, and why each is safe: none of them alters what the checkpointed epochs did,
# so the resumed run is the run an uninterrupted one with the new values from that point would be.
# Everything else (data, model, loss, lr, schedule, seed, eval...) would make a run that is neither the
# old one nor a new one, and is refused.
RESUMABLE_CHANGES: dict[str, str] = {
    "train.epochs": "more epochs (not fewer; not with train.scheduler cosine, whose curve spans the planned epochs)",
    "train.early_stopping.patience": "how many epochs without improvement end the run",
    "train.checkpoint_every": "how often a resumable checkpoint is written",
    "train.keep_last": "how many checkpoints are kept",
    "train.max_bad_steps": "how many non-finite steps are skipped",
    "track.trackers": "the experiment trackers (they start a new run on resume)",
    "track.project": "the trackers' project name",
    "data.num_workers": "how many processes decode images (the same pixels, features and order)",
}

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
    backbone.fast_decode = cfg.data.fast_decode  # saved with the model: later commands decode alike
    backbone.pixel_cache = cfg.data.pixel_cache  # a speed setting for this run only, never saved
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


class ResumeChangeError(TrainingError):
    """A resume asked for config changes a resume cannot make; every differing field is listed.

    Attributes:
        run_dir: The run being resumed.
        refused: ``{field: (the run's value, the asked value)}``.
    """

    def __init__(self, run_dir: Path, refused: dict[str, tuple[Any, Any]], reasons: dict[str, str]) -> None:
        self.run_dir, self.refused = run_dir, refused
        fields = "; ".join(
            f"{k}: {old!r} -> {new!r}" + (f" ({reasons[k]})" if k in reasons else "")
            for k, (old, new) in refused.items()
        )
        super().__init__(
            f"cannot resume {run_dir} with these changes to its config.yaml: {fields}. A resume may change "
            f"only {', '.join(RESUMABLE_CHANGES)}"
        )


class UnresumableRunError(RunExistsError):
    """The run directory holds a run stopped before its first checkpoint: nothing to resume, and its
    metrics are not deleted behind the user's back (a run that failed early may be worth reading)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.args = (
            f"{run_dir} already holds a run, stopped before its first checkpoint, so it cannot be resumed; "
            f"remove {run_dir} to start it again",
        )


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict) and values:
        out: dict[str, Any] = {}
        for key, value in values.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: values}


def resume_changes(run_dir: Path, saved: Config, wanted: Config) -> dict[str, tuple[Any, Any]]:
    """The differences between a run's config and the one asked on resume, when all are safe to make.

    ``name`` is not compared (the run directory is the run). The safe changes are :data:`RESUMABLE_CHANGES`.

    Args:
        run_dir: The run (named in the error).
        saved: Its ``config.yaml``.
        wanted: The config asked for the rest of the run.

    Returns:
        ``{field: (old, new)}``, empty when nothing changes.

    Raises:
        ResumeChangeError: Any other difference, or fewer epochs, or other epochs with a cosine schedule.

    Example:
        >>> old = Config.model_validate({"train": {"epochs": 2}})
        >>> resume_changes(Path("runs/x"), old, Config.model_validate({"train": {"epochs": 5}}))
        {'train.epochs': (2, 5)}
    """
    before = _flatten(saved.model_dump(mode="json", exclude={"name"}))
    after = _flatten(wanted.model_dump(mode="json", exclude={"name"}))
    absent = "(absent)"
    changed = {
        k: (before.get(k, absent), after.get(k, absent))
        for k in sorted(before.keys() | after.keys())
        if before.get(k, absent) != after.get(k, absent)
    }
    reasons: dict[str, str] = {}
    if "train.epochs" in changed:
        old, new = changed["train.epochs"]
        if new < old:
            reasons["train.epochs"] = "fewer epochs than planned; the schedule and checkpoints assumed more"
        elif saved.train.scheduler == "cosine":
            reasons["train.epochs"] = "the cosine schedule spans the planned epochs; its curve would jump"
    refused = {
        k: v
        for k, v in changed.items()
        if k in reasons or k not in RESUMABLE_CHANGES or absent in v  # a section turned on or off
    }
    if refused:
        raise ResumeChangeError(run_dir, refused, reasons)
    return changed


def _note_resume_changes(run_dir: Path, changed: dict[str, tuple[Any, Any]]) -> None:
    """Log a ``{"kind": "resume", ...}`` record at the checkpoint's step and say what changes.

    ``metrics.jsonl`` is the record: the note has the checkpoint's step, so it survives later resumes, and
    :func:`_write_summary` collects every note into ``summary.json``'s ``resume_changes``.
    """
    try:
        path, _ = checkpoint.newest_intact_checkpoint(RunDir(run_dir).checkpoints)
        loop = json.loads((path / checkpoint.TRAINER_FILE).read_text(encoding="utf-8"))["loop"]
    except (TrainingError, OSError, ValueError, KeyError):
        return  # the resume itself reports what is wrong with the checkpoints
    log = MetricsLog(RunDir(run_dir).metrics)
    checkpoint.truncate_log(log, loop["step"])
    changes = {k: [old, new] for k, (old, new) in changed.items()}
    log.write({"kind": "resume", "epoch": loop["epoch"], "step": loop["step"], "changes": changes})
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
    _console.print(f"resuming {run_dir} from step {loop['step']} with {listed}", highlight=False)


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
        resume: A run directory to continue exactly from its newest intact checkpoint; ``cfg`` is then the
            config wanted for the rest of the run: compared with the run's ``config.yaml``, its safe changes
            (:data:`RESUMABLE_CHANGES`) are applied, written to ``config.yaml`` and logged, any other is
            refused.
        quiet: No progress bars.
        on_epoch: Called on every process with each trained epoch's ``metrics.jsonl`` record (epochs 1..,
            not the untrained baseline), after it is logged and the checkpoint written. An exception it
            raises (a sweep's ``optuna.TrialPruned``) stops training and propagates; ``summary.json`` is
            then not written, and trackers are still closed.

    Returns:
        The run directory.

    Raises:
        MissingRunNameError: A new run without ``cfg.name``.
        RunExistsError: The run directory already holds a run (and no resume was asked);
            :class:`UnresumableRunError` when that run has no checkpoint to resume from.
        ResumeChangeError: A resume asked for a change that is not safe (every differing field named).
        LauncherMismatchError: The launcher and Accelerate disagree on the number of processes.
        TrainingError: A tracker's package is missing, an unsupported setting, or training failed (the
            subclasses raised by :func:`cliptune.train.loop.fit`).
        TrainingInterrupted: Ctrl-C / SIGTERM during training, after a resumable checkpoint was written.
    """
    changed: dict[str, tuple[Any, Any]] = {}
    if resume is not None:
        run_dir = Path(resume)
        saved = load_config(RunDir(run_dir).config)
        changed = resume_changes(run_dir, saved, cfg)
        cfg = cfg.model_copy(update={"name": saved.name})
    else:
        if not cfg.name:
            raise MissingRunNameError()
        run_dir = runs_root / cfg.name
        if RunDir(run_dir).metrics.exists():
            raise RunExistsError(run_dir) if _resumable(run_dir) else UnresumableRunError(run_dir)
    if cfg.train.val_every_steps is not None:  # a setting that silently did nothing would mislead
        raise TrainingError("train.val_every_steps is not supported yet: validation runs after every epoch")
    check_trackers(cfg.track)
    accelerator = Accelerator(
        cpu=not _has_accelerator(),  # without it, torchrun on a CPU machine starts N unaware single runs
        mixed_precision=resolve_precision(cfg.train.precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        **tracker_options(cfg.track, run_dir),
    )
    made = _made_by_a_fresh_start(run_dir) if resume is None else []
    try:
        _check_processes(accelerator)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(run_dir)  # what killed writes of this run left (a resume cleans its own)
            save_config(cfg, RunDir(run_dir).config)
            if changed:
                _note_resume_changes(run_dir, changed)
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
    except BaseException:
        if accelerator.is_main_process and made and not RunDir(run_dir).metrics.exists():
            _remove_unstarted(made)  # failed before its first record: a rerun must start afresh
        raise
    finally:  # trackers flushed and the process group torn down on every exit (else gloo aborts at exit)
        accelerator.end_training()
    return run_dir


def _resumable(run_dir: Path) -> bool:
    """Whether a run has something to resume or show: a checkpoint or a finished ``summary.json``."""
    run = RunDir(run_dir)
    return run.summary.exists() or (run.checkpoints.is_dir() and any(run.checkpoints.glob("step-*")))


def _made_by_a_fresh_start(run_dir: Path) -> list[Path]:
    """What a fresh start creates before training: the run folder itself, or its files in a folder that
    was already there (the user's, or one a failed start left)."""
    if not run_dir.exists():
        return [run_dir]
    run = RunDir(run_dir)
    return [p for p in (run.config, run.splits, run.rejected) if not p.exists()]


def _remove_unstarted(made: list[Path]) -> None:
    for path in made:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
        "resume_changes": [
            {"epoch": r["epoch"], "step": r["step"], "changes": r["changes"]}
            for r in records
            if r.get("kind") == "resume"
        ],
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
