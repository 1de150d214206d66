"""Read a run directory into plain Python values: the one place the report reads files from.

Everything the report and the comparison show comes from these files (see PRODUCT.md): ``config.yaml``,
``metrics.jsonl``, ``summary.json``, ``eval/<split>.json`` and ``suite/<name>.json``. Only
``metrics.jsonl`` is required; a run that was never evaluated or gated simply has no eval or suite
sections. A file that exists but cannot be read is an error naming the file (and line), never skipped.

``compare`` also reads *model evaluation folders* (``cliptune eval MODEL --splits-from RUN``): an
``evaluation.json`` manifest beside ``eval/`` and ``suite/``, no training log (:func:`load_compared`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cliptune.errors import CliptuneError
from cliptune.rundir import DamagedFileError, RunDir, read_jsonl

__all__ = ["ReportError", "RunData", "load_compared", "load_run", "watched_metric"]


class ReportError(CliptuneError, ValueError):
    """A run directory cannot be reported on; the message names the file and the reason."""


@dataclass
class RunData:
    """What a run directory holds, as read from disk.

    Attributes:
        path: The run directory.
        name: The run's name (``summary.json`` ``name``, else the folder name).
        config: ``config.yaml`` as a dict with the current defaults filled in (``{}`` sections when absent).
        epochs: ``kind == "epoch"`` records sorted by epoch; epoch 0 is the untrained baseline.
        steps: ``kind == "step"`` records in file order.
        summary: ``summary.json`` (``{}`` when training did not finish).
        evals: split -> ``eval/<split>.json``.
        suites: suite name -> ``suite/<name>.json``.
        manifest: ``evaluation.json`` of a model evaluation folder (no training: ``epochs`` is empty);
            None for a run.
    """

    path: Path
    name: str
    config: dict[str, Any]
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    suites: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None

    @property
    def trained(self) -> bool:
        """True for a run directory, False for a model evaluation folder (no training log)."""
        return self.manifest is None

    @property
    def epochs_trained(self) -> int:
        """Trained epochs (``summary.json``, else the log's last epoch); epoch 0 is not one."""
        return int(self.summary.get("epochs_trained", max((e["epoch"] for e in self.epochs), default=0)))

    @property
    def best_epoch(self) -> int | None:
        """The epoch ``model/`` holds (0: the untrained model), from ``summary.json``; None before it exists.

        The one place the report reads "best epoch" from, so no two sections can disagree about it.
        """
        value = self.summary.get("best_epoch")
        return int(value) if value is not None else None

    @property
    def best_record(self) -> dict[str, Any]:
        """The training log's record of :attr:`best_epoch` (the last epoch while there is no summary)."""
        found = [e for e in self.epochs if e["epoch"] == self.best_epoch]
        return found[0] if found else (self.epochs[-1] if self.epochs else {})

    @property
    def untrained_best(self) -> bool:
        """Epochs were trained and none beat the untrained model, so ``model/`` is the untrained model."""
        return self.best_epoch == 0 and self.epochs_trained > 0

    @property
    def task(self) -> str:
        """``retrieval`` or ``siamese``."""
        return str(self.summary.get("task") or self.config.get("train", {}).get("task") or "retrieval")

    @property
    def catalogue(self) -> Path | None:
        """The catalogue the run trained on (``data.catalogue`` of config.yaml), or None."""
        value = self.config.get("data", {}).get("catalogue")
        return Path(value) if value else None


def load_run(path: Path | str) -> RunData:
    """Read a run directory.

    Args:
        path: ``runs/<name>``; it must hold ``metrics.jsonl``.

    Returns:
        The :class:`RunData`.

    Raises:
        ReportError: the folder or ``metrics.jsonl`` is missing, a JSON line / file does not parse (the
            message names the file and line), or ``metrics.jsonl`` has no epoch record.

    Example:
        >>> run = load_run("runs/fashion-tuned")  # doctest: +SKIP
        >>> run.epochs[0]["epoch"], sorted(run.evals)  # doctest: +SKIP
        (0, ['test'])
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: run directory not found")
    run = RunDir(run_dir)
    metrics = run.metrics
    if not metrics.is_file():
        raise ReportError(f"{metrics}: not found; is {run_dir} a run directory written by `cliptune train`?")
    records = _read_metrics(metrics)
    epochs = sorted((r for r in records if r.get("kind") == "epoch"), key=lambda r: int(r["epoch"]))
    if not epochs:
        raise ReportError(f"{metrics}: no epoch record (kind: epoch); training wrote nothing to report on")
    summary = _read_json(run.summary) if run.summary.is_file() else {}
    return RunData(
        path=run_dir,
        name=str(summary.get("name") or run_dir.name),
        config=_read_config(run.config),
        epochs=epochs,
        steps=[r for r in records if r.get("kind") == "step"],
        summary=summary,
        evals=_read_folder(run.eval_dir),
        suites=_read_folder(run.suite_dir),
    )


def load_compared(path: Path | str) -> RunData:
    """Read what ``compare`` takes: a run directory, or a model evaluation folder (``evaluation.json``).

    Args:
        path: ``runs/<name>``, or the ``--out`` folder of ``cliptune eval MODEL --splits-from RUN``.

    Returns:
        The :class:`RunData`; for an evaluation folder ``manifest`` is set, ``epochs`` empty and
        ``config`` holds only ``data.catalogue``.

    Raises:
        ReportError: Neither a run directory nor an evaluation folder, or a file does not parse.

    Example:
        >>> load_compared("evals/base").manifest["splits_from"]  # doctest: +SKIP
        '/home/me/runs/tuned'
    """
    folder = Path(path)
    manifest_file = RunDir(folder).evaluation
    if RunDir(folder).metrics.is_file() or not manifest_file.is_file():
        return load_run(folder)
    manifest = _read_json(manifest_file)
    run = RunDir(folder)
    return RunData(
        path=folder,
        name=str(manifest.get("name") or folder.name),
        config={"data": {"catalogue": manifest.get("catalogue")}},
        epochs=[],
        evals=_read_folder(run.eval_dir),
        suites=_read_folder(run.suite_dir),
        manifest=manifest,
    )


def watched_metric(run: RunData) -> tuple[str, str]:
    """The metric training watched and its mode: early stopping's, else the plateau scheduler's.

    Returns:
        ``(metric, "min" | "max")``; ``("val/loss", "min")`` when neither is configured.
    """
    train = run.config.get("train", {})
    stopping = train.get("early_stopping")
    if isinstance(stopping, dict) and stopping.get("metric"):
        return str(stopping["metric"]), str(stopping.get("mode", "min"))
    plateau = train.get("plateau")
    if train.get("scheduler", "plateau") == "plateau" and isinstance(plateau, dict) and plateau.get("metric"):
        return str(plateau["metric"]), str(plateau.get("mode", "min"))
    return "val/loss", "min"


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` through rundir's reader; a half-written last line (a killed run) is left out."""
    try:
        records, _ = read_jsonl(path, torn_tail=True)
    except DamagedFileError as exc:
        raise ReportError(str(exc)) from None
    for record in records:
        if record.get("kind") == "epoch" and not isinstance(record.get("epoch"), int):
            raise ReportError(
                f"{path}: an epoch record needs an integer 'epoch', got {record.get('epoch')!r}"
            )
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_folder(folder: Path) -> dict[str, dict[str, Any]]:
    if not folder.is_dir():
        return {}
    return {p.stem: _read_json(p) for p in sorted(folder.glob("*.json"))}


def _read_config(path: Path) -> dict[str, Any]:
    # The raw YAML over the current defaults: an old run whose config no longer validates still reports.
    from pydantic import ValidationError

    from cliptune.config import Config

    merged: dict[str, Any] = Config().model_dump(mode="json")
    if not path.is_file():
        return merged
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: expected a mapping at the top level")
    try:  # validated, the defaults that follow other fields (a watched metric's mode) are filled in right
        return Config.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return _merge(merged, raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
