"""WiSE-FT over a finished run: each alpha's domain and general scores, the plot, and a recommended alpha.

``theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned`` (:mod:`cliptune.models.interpolate`)
where "pretrained" is the run's untrained epoch-0 model (``model_init.safetensors``: for a new projection
head there is no other start) and "fine-tuned" its best model (``model/``). Each alpha's model is evaluated
twice with intervals: on the run's own ``test`` split exactly as ``cliptune eval --splits-from RUN`` does
(same catalogue, ``splits.json``, eval settings), and zero-shot on every row of a general catalogue (the
forgetting guard's, ``train.forgetting.catalogue``, unless another is given).

It lives in ``report`` (not ``models`` or ``evaluation``) because it is a workflow over a run that combines
the two and recommends: ``models`` owns only the weights' arithmetic, ``evaluation`` the evaluator.

The recommendation (:func:`recommend_alpha`): the best domain score among the alphas whose general score
stays within ``tolerance`` (absolute, in the metric's units) of alpha 0's; ``None`` when no alpha above 0
qualifies, said as such rather than falling back to the fine-tuned model.

Example:
    >>> result = run_wise("runs/fashion", [0.0, 0.5, 1.0], general=Path("art"))  # doctest: +SKIP
    >>> result["recommended"]["alpha"]  # doctest: +SKIP
    0.5
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cliptune.config import load_config
from cliptune.data.prepare import PreparedData
from cliptune.data.splits import group_ids
from cliptune.errors import CliptuneError
from cliptune.evaluation.catalogue import ALL_SPLIT, prepare_catalogue
from cliptune.evaluation.run import evaluate_model_on_run
from cliptune.evaluation.split import evaluate_split
from cliptune.models.factory import load_model
from cliptune.models.interpolate import interpolated_backbone
from cliptune.rundir import CONFIG_FILE, MODEL_INIT_FILE, RunDir, write_bytes_atomic, write_text_atomic

__all__ = [
    "WISE_JSON",
    "WISE_PNG",
    "NoGeneralCatalogueError",
    "WiseError",
    "recommend_alpha",
    "run_wise",
    "wise_plot",
    "write_wise",
]

WISE_JSON = "wise.json"
WISE_PNG = "wise.png"
_PREFIX = "backbone."  # model_init holds the training module's state: backbone.* and loss.*


class WiseError(CliptuneError):
    """A WiSE-FT sweep that cannot run: not a retrieval run, no epoch-0 weights, no alphas, an unknown metric."""


class NoGeneralCatalogueError(WiseError):
    """Neither the call nor the run's ``train.forgetting`` names a general catalogue."""


def recommend_alpha(points: Sequence[Mapping[str, Any]], tolerance: float) -> dict[str, Any]:
    """The best domain score whose general score stays within ``tolerance`` of the pretrained (alpha 0) one.

    Args:
        points: One per alpha: ``{"alpha": a, "domain": {"mean": ...}, "general": {"mean": ...}}``; alpha 0
            must be among them (it is the reference).
        tolerance: The general score may fall at most this much (absolute) below alpha 0's.

    Returns:
        ``{"alpha": a or None, "reason": sentence}``; ties in domain score go to the smaller alpha (closer to
        the pretrained model). None when no alpha above 0 keeps the general score within tolerance.

    Raises:
        WiseError: No alpha 0 among the points, or a negative tolerance.

    Example:
        >>> pts = [{"alpha": a, "domain": {"mean": d}, "general": {"mean": g}}
        ...        for a, d, g in [(0, 0.2, 0.5), (0.5, 0.4, 0.49), (1, 0.6, 0.3)]]
        >>> recommend_alpha(pts, 0.02)["alpha"]
        0.5
    """
    if tolerance < 0:
        raise WiseError(f"tolerance must be >= 0, got {tolerance}")
    base = [p for p in points if float(p["alpha"]) == 0.0]
    if not base:
        raise WiseError("alpha 0 (the pretrained model) is the reference of the recommendation; include it")
    floor = float(base[0]["general"]["mean"]) - tolerance
    within = [p for p in points if float(p["general"]["mean"]) >= floor]
    if not any(float(p["alpha"]) > 0 for p in within):
        return {
            "alpha": None,
            "reason": f"none: every alpha above 0 loses more than {tolerance:g} of the general score "
            f"{float(base[0]['general']['mean']):.4f}",
        }
    best = max(within, key=lambda p: (float(p["domain"]["mean"]), -float(p["alpha"])))
    return {
        "alpha": float(best["alpha"]),
        "reason": f"the best domain score ({float(best['domain']['mean']):.4f}) of the alphas whose general "
        f"score stays at or above {floor:.4f} (alpha 0's minus {tolerance:g})",
    }


def run_wise(
    run_dir: Path | str,
    alphas: Sequence[float],
    *,
    general: Path | None = None,
    tolerance: float = 0.02,
    metric: str = "t2i/mrr",
    split: str = "test",
    bootstrap: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Interpolate a run's epoch-0 and fine-tuned weights at each alpha; evaluate the domain and general sets.

    Args:
        run_dir: A retrieval run trained by a cliptune that keeps ``model_init.safetensors``.
        alphas: Interpolation weights (0 = pretrained, 1 = fine-tuned); 0 is needed for the recommendation.
        general: The general catalogue (default: the run's ``train.forgetting.catalogue``).
        tolerance: See :func:`recommend_alpha`.
        metric: The metric compared (``t2i/mrr``, ``t2i/recall@5`` ...), read from both evaluations.
        split: The run's domain split.
        bootstrap: Override of the run's ``eval.bootstrap``.
        progress: Progress bars.

    Returns:
        The ``wise.json`` content: run, split, metric, general catalogue, tolerance, one point per alpha
        (domain and general ``{mean, low, high, n}``), and ``recommended``.

    Raises:
        WiseError: Not a retrieval run, no ``model_init.safetensors``, no general catalogue, no alphas, or the
            metric missing from an evaluation.
        EvalError, CatalogueError, BackboneError: From evaluating.
    """
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise WiseError(f"{run.path}: not a run directory (no {CONFIG_FILE})")
    cfg = load_config(run.config)
    if cfg.train.task != "retrieval":
        raise WiseError(f"{run.path}: train.task is {cfg.train.task!r}; WiSE-FT interpolates retrieval runs")
    if not alphas:
        raise WiseError("no alphas to evaluate")
    forgetting = cfg.train.forgetting
    catalogue = general or (forgetting.catalogue if forgetting is not None else None)
    if catalogue is None:
        raise NoGeneralCatalogueError(
            f"{run.path}: no general catalogue: the run has no train.forgetting.catalogue"
        )
    if not run.model_init.is_file():
        raise WiseError(
            f"{run.path}: no {MODEL_INIT_FILE} (the untrained epoch-0 weights); runs trained before cliptune kept "
            "it cannot be interpolated: train the run again"
        )
    from safetensors.torch import load_file

    init = {
        k.removeprefix(_PREFIX): v for k, v in load_file(str(run.model_init)).items() if k.startswith(_PREFIX)
    }
    text_column = forgetting.text_column if forgetting is not None else "text"
    group_column = forgetting.group_column if forgetting is not None else "group"
    relevant = forgetting.relevant if forgetting is not None else "item"
    general_data = _all_rows(
        prepare_catalogue(catalogue, group_column=group_column, text_column=text_column, progress=progress),
        group_column,
    )
    finetuned = load_model(run.path).backbone
    points = []
    with tempfile.TemporaryDirectory(prefix="cliptune-wise-") as tmp:
        for alpha in alphas:
            folder = Path(tmp) / f"alpha-{alpha:g}"
            interpolated_backbone(finetuned, init, float(alpha)).save(folder)
            domain = evaluate_model_on_run(folder, run.path, [split], bootstrap=bootstrap, progress=progress)[
                split
            ]
            general_result = evaluate_split(
                load_model(folder),
                general_data,
                ALL_SPLIT,
                ks=cfg.eval.k,
                relevant=relevant,
                bootstrap=cfg.eval.bootstrap if bootstrap is None else bootstrap,
                confidence=cfg.eval.confidence,
                seed=cfg.eval.seed,
                text_column=text_column,
                group_column=group_column,
                cache_dir=cfg.model.cache_dir,
                precision=cfg.model.embed_precision,
                progress=progress,
            )
            points.append(
                {
                    "alpha": float(alpha),
                    "domain": _summary(domain, metric, f"{run.path} split {split}"),
                    "general": _summary(general_result, metric, str(catalogue)),
                }
            )
    has_zero = any(p["alpha"] == 0.0 for p in points)
    return {
        "run": str(run.path),
        "split": split,
        "metric": metric,
        "general_catalogue": str(catalogue),
        "general_relevant": relevant,
        "tolerance": tolerance,
        "interpolation": "(1 - alpha) * epoch-0 + alpha * model/ over the trainable weights and buffers; "
        "LoRA: A fine-tuned, B scaled by alpha",
        "points": points,
        "recommended": recommend_alpha(points, tolerance)
        if has_zero
        else {"alpha": None, "reason": "alpha 0 was not evaluated: no reference general score"},
    }


def _all_rows(data: PreparedData, group_column: str) -> PreparedData:
    """Every row of a catalogue in the split ``all``: zero-shot retrieval ignores a ``split`` column."""
    rows = data.rows.assign(split=ALL_SPLIT)
    return dataclasses.replace(
        data, rows=rows, splits={ALL_SPLIT: sorted(set(group_ids(rows, group_column)))}
    )


def _summary(result: Mapping[str, Any], metric: str, where: str) -> dict[str, Any]:
    metrics = result["metrics"]
    if metric not in metrics:
        raise WiseError(f"{where}: no metric {metric!r}; available: {', '.join(sorted(metrics))}")
    value = metrics[metric]
    return {k: value[k] for k in ("mean", "low", "high", "n") if k in value}


def wise_plot(result: Mapping[str, Any]) -> bytes:
    """PNG of the domain score against the general score, one labelled point per alpha, with intervals.

    Args:
        result: From :func:`run_wise`.

    Returns:
        The PNG's bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = result["points"]
    xs = [p["general"]["mean"] for p in points]
    ys = [p["domain"]["mean"] for p in points]
    xerr = [
        [p["general"]["mean"] - p["general"].get("low", p["general"]["mean"]) for p in points],
        [p["general"].get("high", p["general"]["mean"]) - p["general"]["mean"] for p in points],
    ]
    yerr = [
        [p["domain"]["mean"] - p["domain"].get("low", p["domain"]["mean"]) for p in points],
        [p["domain"].get("high", p["domain"]["mean"]) - p["domain"]["mean"] for p in points],
    ]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="-o", color="#3b6ea5", ecolor="#b8c8dc", capsize=2)
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    chosen = result["recommended"]["alpha"]
    for p in points:
        if chosen is not None and p["alpha"] == chosen:
            ax.plot(
                [p["general"]["mean"]],
                [p["domain"]["mean"]],
                "*",
                color="#2e9d4b",
                markersize=14,
                label=f"recommended alpha {chosen:g}",
            )
    base = [p for p in points if p["alpha"] == 0.0]
    if base:
        floor = base[0]["general"]["mean"] - result["tolerance"]
        ax.axvline(
            floor, color="#d0312d", linestyle=":", label=f"alpha 0's general - {result['tolerance']:g}"
        )
    metric = result["metric"]
    ax.set_xlabel(f"general {metric} ({Path(result['general_catalogue']).name})")
    ax.set_ylabel(f"domain {metric} ({result['split']})")
    ax.set_title(f"WiSE-FT of {Path(result['run']).name}: alpha 0 = epoch 0, 1 = fine-tuned", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_wise(result: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``wise.json`` and ``wise.png`` into ``out`` (created), atomically.

    Args:
        result: From :func:`run_wise`.
        out: Output folder.

    Returns:
        The two files written.
    """
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_text_atomic(out / WISE_JSON, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return json_path, write_bytes_atomic(out / WISE_PNG, wise_plot(result))
