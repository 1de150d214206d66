"""Experiment trackers (TensorBoard, W&B, MLflow) through Accelerate, offline by default.

``metrics.jsonl`` is always written and is the source of truth; trackers receive the very same records
(numbers only) at the same steps, so a curve in TensorBoard or W&B is the curve in the run directory.
Nothing here needs the network unless the user asks for it:

* TensorBoard writes event files under ``run_dir/tensorboard/<project>/``;
* W&B runs in offline mode (``run_dir/wandb/offline-run-*``, upload later with ``wandb sync``) unless
  ``WANDB_MODE`` is set;
* MLflow logs to a SQLite store ``run_dir/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set (the full
  ``mlflow`` package is needed for SQLite; ``mlflow-skinny`` can only talk to a tracking server). MLflow
  forbids ``@`` in metric names, so ``val/t2i/recall@5`` is logged there as ``val/t2i/recall_at_5``.

A tracker whose package is missing is an error before any work starts (Accelerate would drop it quietly).

Example:
    >>> cfg, run_dir = Config.model_validate({"track": {"trackers": ["tensorboard"]}}), Path("run")
    >>> check_trackers(cfg.track)  # raises TrainingError if tensorboard is not installed
    >>> accelerator = Accelerator(**tracker_options(cfg.track, run_dir))
    >>> start_trackers(accelerator, cfg, run_dir)
    >>> accelerator.end_training()
    >>> [p.name for p in (run_dir / "tensorboard").iterdir()]
    ['cliptune']
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from cliptune.config import Config, TrackConfig
from cliptune.train.errors import TrainingError

__all__ = ["check_trackers", "tracker_options", "start_trackers", "tracker_sink", "flatten_config"]

# tracker -> (module that must import, pip package that provides it)
_PACKAGES = {name: (name, name) for name in ("tensorboard", "wandb", "mlflow")}


def _is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_full_mlflow() -> bool:
    try:
        importlib.metadata.version("mlflow")  # mlflow-skinny provides the module but not this distribution
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_trackers(track: TrackConfig) -> None:
    """Fail before training when a configured tracker cannot run, naming the package to install.

    Args:
        track: The ``track`` section.

    Raises:
        TrainingError: A tracker's package is not installed (or only ``mlflow-skinny`` for a local store).
    """
    for name in track.trackers:
        module, package = _PACKAGES[name]
        if not _is_installed(module):
            raise TrainingError(
                f"track.trackers includes '{name}' but the '{package}' package is not installed: "
                f"pip install {package} (or pip install 'cliptune[track]'), or remove it from track.trackers"
            )
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") and not _has_full_mlflow():
            raise TrainingError(
                "track.trackers includes 'mlflow' with the default local SQLite store, which needs the full "
                "'mlflow' package (mlflow-skinny cannot use sqlite:///): pip install mlflow, or set "
                "MLFLOW_TRACKING_URI to a tracking server"
            )


def tracker_options(track: TrackConfig, run_dir: Path) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator(...)``: which trackers, and their folders inside ``run_dir``."""
    if not track.trackers:
        return {}
    return {
        "log_with": list(track.trackers),
        "project_config": ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    }


def start_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path) -> None:
    """Start the configured trackers with the flattened resolved config as their hyper-parameters.

    Call it on every process (Accelerate starts trackers on the main process only).

    Args:
        accelerator: Built with :func:`tracker_options`.
        cfg: The resolved config (``cfg.track`` says which trackers; ``cfg.name`` names the run).
        run_dir: The run directory (W&B files and the MLflow store go inside it).
    """
    if not cfg.track.trackers:
        return
    init: dict[str, dict[str, Any]] = {}
    if "wandb" in cfg.track.trackers:
        init["wandb"] = {"dir": str(run_dir), "name": cfg.name}
        if not os.environ.get("WANDB_MODE"):
            init["wandb"]["mode"] = "offline"
    if "mlflow" in cfg.track.trackers:
        if accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        init["mlflow"] = {"run_name": cfg.name, "logging_dir": str((run_dir / "mlflow-artifacts").resolve())}
    accelerator.init_trackers(cfg.track.project, config=flatten_config(cfg), init_kwargs=init)


def flatten_config(cfg: Config) -> dict[str, str | int | float | bool]:
    """The resolved config as ``{"train.lr": 3e-4, ...}``: scalars kept, lists as JSON, None as ``"null"``.

    Trackers take flat scalar hyper-parameters (TensorBoard's hparams reject None and lists).
    """
    out: dict[str, str | int | float | bool] = {}

    def _walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                _walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif node is None:
            out[prefix] = "null"
        elif isinstance(node, (str, int, float, bool)):
            out[prefix] = node
        else:  # lists, empty dicts
            out[prefix] = json.dumps(node)

    _walk(cfg.model_dump(mode="json"), "")
    return out


def tracker_sink(accelerator: Accelerator) -> Callable[[dict[str, Any]], None] | None:
    """A function sending one metrics record to every started tracker, or None when there are none.

    Numbers only (``kind`` is dropped, ``step`` becomes the tracker step); MLflow names get ``@`` -> ``_at_``.
    """
    if not accelerator.trackers:
        return None

    def _sink(record: dict[str, Any]) -> None:
        values = {
            k: v for k, v in record.items() if k not in ("kind", "step") and isinstance(v, (int, float))
        }
        for tracker in accelerator.trackers:
            named = (
                {k.replace("@", "_at_"): v for k, v in values.items()} if tracker.name == "mlflow" else values
            )
            tracker.log(named, step=int(record.get("step", 0)))

    return _sink
