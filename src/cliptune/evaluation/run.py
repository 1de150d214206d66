"""Evaluate a run directory on its splits with its own config, and write ``eval/<split>.json``.

A bare model (zero-shot, or another run's ``model/``) can borrow a run's splits
(:func:`evaluate_model_on_run`): the same catalogue, ``splits.json`` groups, eval settings and loss
settings, so its queries are the run's own and ``compare`` pairs them. Its results go to a *model
evaluation folder* (:func:`write_model_evaluation`), laid out like a run for ``compare``::

    evals/<name>/
      evaluation.json   the manifest: which model, which run's splits, which catalogue and caption column
      eval/<split>.json as in a run
      suite/<name>.json ``cliptune test --splits-from``

Example:
    >>> result = evaluate_run("runs/demo", ["test"])["test"]  # doctest: +SKIP
    >>> result["metrics"]["t2i/recall@5"]  # doctest: +SKIP
    {'mean': 0.8, 'low': 0.7, 'high': 0.9, 'n': 44, 'confidence': 0.95}
    >>> write_eval(result, Path("runs/demo"))  # doctest: +SKIP
    PosixPath('runs/demo/eval/test.json')
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cliptune.config import Config, load_config
from cliptune.data.prepare import PreparedData, prepare_data
from cliptune.evaluation.catalogue import split_order
from cliptune.evaluation.errors import EvalError
from cliptune.evaluation.loss import LossSettings, loss_settings
from cliptune.evaluation.retrieval import Relevant
from cliptune.evaluation.split import evaluate_split
from cliptune.models.factory import LoadedModel, load_model
from cliptune.rundir import (
    CONFIG_FILE,
    SPLITS_FILE,
    RunDir,
    read_json,
    write_eval_json,
    write_suite_json,
    write_text_atomic,
)

__all__ = [
    "evaluate_model_on_run",
    "evaluate_run",
    "read_manifest",
    "split_files",
    "write_eval",
    "write_model_evaluation",
]


def evaluate_run(
    run_dir: Path | str,
    splits: Sequence[str] | None,
    *,
    catalogue: Path | None = None,
    ks: Sequence[int] | None = None,
    bootstrap: int | None = None,
    relevant: Relevant | None = None,
    cache_dir: Path | None = None,
    text_column: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate a run directory on some of its splits, with its config, its ``splits.json`` and its model.

    The run's ``eval`` section gives the defaults (``k``, ``bootstrap``, ``confidence``, ``seed``,
    ``relevant``); the split is the one training used (``splits.json``), so ``test`` never saw training.

    Args:
        run_dir: ``runs/<name>``.
        splits: Split names, evaluated in order; None: every split of the run (:func:`split_order`).
        catalogue: Another copy of the run's catalogue (default: the run's ``data.catalogue``).
        ks: Override of ``eval.k``.
        bootstrap: Override of ``eval.bootstrap``.
        relevant: Override of ``eval.relevant``.
        cache_dir: Override of ``model.cache_dir``.
        text_column: Caption column of the queries (default ``data.text_column``): evaluate a model trained
            on generic captions on the same rich-caption queries as another model, so the two compare.
        progress: Progress bars.

    Returns:
        Split name -> the :func:`evaluate_split` dict.

    Raises:
        EvalError: Not a run directory, or an unknown split (every split is checked before any work).
        CatalogueError, ConfigError, BackboneError: From loading the data, config or model.
    """
    run_dir = Path(run_dir)
    cfg, data, splits = _open_run(run_dir, catalogue, splits, progress)
    model = load_model(run_dir)
    model.backbone.pixel_cache = cfg.data.pixel_cache  # fast_decode came with the model
    settings = loss_settings(cfg, model.source, model.backbone.similarity_init)
    return _evaluate_splits(
        model, cfg, data, splits, settings, ks, bootstrap, relevant, cache_dir, text_column, progress
    )


def evaluate_model_on_run(
    model: Path | str,
    run_dir: Path | str,
    splits: Sequence[str] | None,
    *,
    catalogue: Path | None = None,
    ks: Sequence[int] | None = None,
    bootstrap: int | None = None,
    relevant: Relevant | None = None,
    cache_dir: Path | None = None,
    text_column: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate any model on a run's own splits: the baseline that pairs query by query with the run.

    Everything but the model comes from the run, exactly as :func:`evaluate_run` takes it: the catalogue
    (``data.catalogue``), the groups of ``splits.json``, the ``eval`` settings and the loss settings (the
    configured temperature and batch size: a learned temperature belongs to the run's model, not this one;
    a model without a head on a Siamese run gets no loss, since that objective needs the head).
    So the query ids equal the run's ``eval/<split>.json`` and the loss is the same formula. The run is only
    read: a run without ``splits.json`` is an error, never given a fresh split.

    Args:
        model: What :func:`cliptune.models.factory.load_model` accepts: a saved model folder (``RUN/model``),
            a run directory, ``embedded`` or a hub id.
        run_dir: The run whose splits are borrowed.
        splits: Split names; None: every split of the run.
        catalogue: Another copy of the run's catalogue (default: the run's ``data.catalogue``).
        ks: Override of the run's ``eval.k``.
        bootstrap: Override of ``eval.bootstrap``.
        relevant: Override of ``eval.relevant``.
        cache_dir: Override of the run's ``model.cache_dir``.
        text_column: Caption column of the queries (default: the run's ``data.text_column``).
        progress: Progress bars.

    Returns:
        Split name -> the :func:`evaluate_split` dict.

    Raises:
        EvalError: Not a run directory, no ``splits.json``, or an unknown split.
        CatalogueError, ConfigError, BackboneError: From loading the data, config or model.

    Example:
        >>> results = evaluate_model_on_run("embedded", "runs/tuned", ["test"])  # doctest: +SKIP
        >>> write_model_evaluation("evals/base", results, "embedded", "runs/tuned")  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if RunDir(run_dir).config.is_file() and not RunDir(run_dir).splits.is_file():
        raise EvalError(f"{run_dir}: no {SPLITS_FILE}: this run has no splits to borrow")
    cfg, data, splits = _open_run(run_dir, catalogue, splits, progress)
    loaded = load_model(model)
    loaded.backbone.fast_decode = cfg.data.fast_decode  # decoded as the run's own model was
    loaded.backbone.pixel_cache = cfg.data.pixel_cache
    # A Siamese run's loss is the objective of its head: a model without one has no comparable loss.
    siamese_only = cfg.train.task == "siamese" and loaded.head is None
    # The run's loss section, and (no temperature set) the baseline's pretrained one: for the zero-shot
    # model the run was fine-tuned from, that is exactly where the run's training started.
    settings = LossSettings() if siamese_only else loss_settings(cfg, None, loaded.backbone.similarity_init)
    results = _evaluate_splits(
        loaded, cfg, data, splits, settings, ks, bootstrap, relevant, cache_dir, text_column, progress
    )
    if siamese_only:
        for result in results.values():
            result["loss"]["reason"] = "the run's loss is the Siamese objective, which needs a head"
    return results


def split_files(
    run_dir: Path | str, split: str, *, catalogue: Path | None = None, progress: bool = False
) -> list[str]:
    """The images (``file_name`` values, in catalogue order) of one split of a run.

    Args:
        run_dir: The run whose ``splits.json`` says which groups form the split.
        split: Split name.
        catalogue: Another copy of the run's catalogue.
        progress: Progress bar while the catalogue is checked.

    Returns:
        The split's unique image files.

    Raises:
        EvalError: Not a run directory, no ``splits.json``, or an unknown split.
    """
    run_dir = Path(run_dir)
    if RunDir(run_dir).config.is_file() and not RunDir(run_dir).splits.is_file():
        raise EvalError(f"{run_dir}: no {SPLITS_FILE}: this run has no splits to borrow")
    _, data, _ = _open_run(run_dir, catalogue, [split], progress)
    return list(dict.fromkeys(data.split_rows(split)["file_name"].astype(str)))


def _open_run(
    run_dir: Path, catalogue: Path | None, splits: Sequence[str] | None, progress: bool
) -> tuple[Config, PreparedData, list[str]]:
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise EvalError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = load_config(run.config)
    if catalogue is not None:
        cfg.data.catalogue = Path(catalogue)
    data = prepare_data(cfg.data, run_dir, progress=progress)
    names = split_order(data.splits) if splits is None else list(splits)
    unknown = [s for s in names if s not in data.splits]
    if unknown:
        raise EvalError(
            f"{run_dir}: no split {', '.join(map(repr, unknown))}; this run has {', '.join(sorted(data.splits))}"
        )
    return cfg, data, names


def _evaluate_splits(
    model: LoadedModel,
    cfg: Config,
    data: PreparedData,
    splits: list[str],
    settings: LossSettings,
    ks: Sequence[int] | None,
    bootstrap: int | None,
    relevant: Relevant | None,
    cache_dir: Path | None,
    text_column: str | None,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    return {
        name: evaluate_split(
            model,
            data,
            name,
            ks=ks or cfg.eval.k,
            relevant=relevant or cfg.eval.relevant,
            bootstrap=cfg.eval.bootstrap if bootstrap is None else bootstrap,
            confidence=cfg.eval.confidence,
            seed=cfg.eval.seed,
            text_column=text_column or cfg.data.text_column,
            group_column=cfg.data.group_column,
            cache_dir=cache_dir or cfg.model.cache_dir,
            precision=cfg.model.embed_precision,
            num_workers=cfg.data.num_workers,
            progress=progress,
            loss=settings,
        )
        for name in splits
    }


def read_manifest(folder: Path | str) -> dict[str, Any] | None:
    """The manifest of a model evaluation folder, or None when ``folder`` holds none."""
    path = RunDir(Path(folder)).evaluation
    if not path.is_file():
        return None
    value = read_json(path)
    if not isinstance(value, dict):
        raise EvalError(f"{path}: expected a JSON object")
    return value


def write_model_evaluation(
    folder: Path | str,
    model: str,
    splits_from: Path | str,
    *,
    evals: Mapping[str, Mapping[str, Any]] | None = None,
    suite: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write a model's results on a run's splits into a model evaluation folder, and its manifest.

    The folder holds ``evaluation.json`` (the model, the run whose splits it borrowed, and what was
    written), ``eval/<split>.json`` and ``suite/<name>.json``, as a run does, so ``compare`` reads it
    beside runs. Later calls add splits and suites; a folder of another model or another run's splits is
    refused, so one folder never mixes two evaluations.

    Args:
        folder: The evaluation folder (created).
        model: The model as given to :func:`evaluate_model_on_run` (``embedded``, ``runs/a/model``).
        splits_from: The run whose splits were used.
        evals: Split name -> :func:`evaluate_split` dict.
        suite: A ``run_suite`` result.

    Returns:
        The files written, the manifest last.

    Raises:
        EvalError: The folder holds an evaluation of another model or of another run's splits.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = Path(splits_from).resolve()
    model_text = str(Path(model).resolve()) if Path(model).exists() else str(model)
    manifest = read_manifest(folder) or {
        "kind": "model evaluation",
        "name": folder.name,
        "model": model_text,
        "splits_from": str(run),
        "run_name": run.name,
        "evals": [],
        "suites": [],
    }
    if (manifest.get("model"), manifest.get("splits_from")) != (model_text, str(run)):
        raise EvalError(
            f"{RunDir(folder).evaluation}: holds {manifest.get('model')} on the splits of "
            f"{manifest.get('splits_from')}, not {model_text} on {run}: use another folder"
        )
    written: list[Path] = []
    for result in (evals or {}).values():
        written.append(write_eval_json(RunDir(folder).eval_dir, result))
        manifest["model_identity"] = result.get("model")
        manifest["catalogue"] = result.get("catalogue")
        manifest["text_column"] = result.get("text_column")
        manifest["evals"] = sorted({*manifest.get("evals", []), str(result["split"])})
    if suite is not None:
        written.append(write_suite_json(RunDir(folder).suite_dir, suite))
        manifest["suites"] = sorted({*manifest.get("suites", []), str(suite["suite"])})
    written.append(write_text_atomic(RunDir(folder).evaluation, json.dumps(manifest, indent=2) + "\n"))
    return written


def write_eval(
    result: Mapping[str, Any], run_dir: Path | None = None, *, out_dir: Path | None = None
) -> Path:
    """Write ``run_dir/eval/<split>.json`` (or ``out_dir/<split>.json``) atomically.

    Args:
        result: From :func:`evaluate_split`.
        run_dir: A run directory.
        out_dir: Folder to write into instead (bare models); exactly one of the two.

    Returns:
        The file written.

    Raises:
        EvalError: Neither or both folders given.
        ValueError: A non-finite number in ``result``.
    """
    if run_dir is not None and out_dir is None:
        return write_eval_json(RunDir(Path(run_dir)).eval_dir, result)
    if out_dir is not None and run_dir is None:
        return write_eval_json(Path(out_dir), result)
    raise EvalError("write_eval: give exactly one of run_dir and out_dir")
