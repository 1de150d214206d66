"""Evaluate a run directory on its splits with its own config, and write ``eval/<split>.json``.

Example:
    >>> result = evaluate_run("runs/demo", ["test"])["test"]  # doctest: +SKIP
    >>> result["metrics"]["t2i/recall@5"]  # doctest: +SKIP
    {'mean': 0.8, 'low': 0.7, 'high': 0.9, 'n': 44, 'confidence': 0.95}
    >>> write_eval(result, Path("runs/demo"))  # doctest: +SKIP
    PosixPath('runs/demo/eval/test.json')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cliptune.config import load_config
from cliptune.data.prepare import prepare_data
from cliptune.evaluation.catalogue import split_order
from cliptune.evaluation.errors import EvalError
from cliptune.evaluation.loss import loss_settings
from cliptune.evaluation.retrieval import Relevant
from cliptune.evaluation.split import evaluate_split
from cliptune.models.factory import load_model
from cliptune.rundir import CONFIG_FILE, RunDir, write_eval_json

__all__ = ["evaluate_run", "write_eval"]


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
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise EvalError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = load_config(run.config)
    if catalogue is not None:
        cfg.data.catalogue = Path(catalogue)
    data = prepare_data(cfg.data, run_dir, progress=progress)
    splits = split_order(data.splits) if splits is None else list(splits)
    unknown = [s for s in splits if s not in data.splits]
    if unknown:
        raise EvalError(
            f"{run_dir}: no split {', '.join(map(repr, unknown))}; this run has {', '.join(sorted(data.splits))}"
        )
    model = load_model(run_dir)
    settings = loss_settings(cfg, model.source, model.backbone.similarity_init)
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
            progress=progress,
            loss=settings,
        )
        for name in splits
    }


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
    if (run_dir is None) == (out_dir is None):
        raise EvalError("write_eval: give exactly one of run_dir and out_dir")
    folder = Path(out_dir) if out_dir is not None else RunDir(Path(run_dir)).eval_dir  # type: ignore[arg-type]
    return write_eval_json(folder, result)
