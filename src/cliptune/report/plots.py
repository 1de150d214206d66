"""Training curves as inline PNGs (matplotlib's Agg canvas, no pyplot state, no display needed).

Every plot marks what a reader looks for: the epoch-0 baseline (the untrained model), the best epoch
(the kept model), an early stop, and each LR cut of the plateau scheduler.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from typing import Any

from cliptune.report.document import Plot
from cliptune.report.rundata import RunData

__all__ = ["loss_plot", "metric_plots", "lr_plot", "overlay_plot", "metric_families"]

_FAMILY = re.compile(r"^val/(t2i|i2t)/([a-z_]+)(?:@(\d+))?$")
_TRIPLET = re.compile(r"^val/triplet/accuracy(?:/([a-z0-9]+))?$")
_FAMILY_TITLES = {
    "recall": "Recall@k",
    "precision": "Precision@k",
    "accuracy": "Accuracy@k (hit rate)",
    "mrr": "MRR",
    "ndcg": "nDCG@k",
    "map": "mAP",
    "triplet": "Triplet accuracy",
}


def _figure(width: float = 6.0, height: float = 3.4) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mark_epochs(ax: Any, run: RunData) -> None:
    best = run.summary.get("best_epoch")
    if isinstance(best, int):
        ax.axvline(best, color="#2e9d4b", linestyle="--", linewidth=1, label=f"best (epoch {best})")
    if str(run.summary.get("stop_reason", "")).startswith("early stopping"):
        last = run.epochs[-1]["epoch"]
        ax.axvline(last, color="#d0312d", linestyle=":", linewidth=1.2, label=f"early stop (epoch {last})")
    _epoch_axis(ax)


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = untrained baseline)")
    ax.grid(alpha=0.3)


def _series(run: RunData, key: str) -> tuple[list[int], list[float]]:
    pts = [(e["epoch"], float(e[key])) for e in run.epochs if key in e and e[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_plot(run: RunData) -> Plot | None:
    """Train and val loss per term (one panel per term: ``loss``, ``image``, ``text``, ``i2t`` ...)."""
    last = run.epochs[-1]
    terms = [k.removeprefix("val/") for k in last if k.startswith("val/") and "/" not in k[4:]]
    terms = [t for t in terms if t != "temperature"]
    if not terms:
        return None
    cols = min(3, len(terms))
    rows = (len(terms) + cols - 1) // cols
    fig = _figure(4.0 * cols, 2.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, term in zip(axes, terms, strict=False):
        for split, style in (("train", "-"), ("val", "-")):
            x, y = _series(run, f"{split}/{term}")
            if x:
                ax.plot(x, y, style, marker="o", markersize=3, label=split)
        _mark_epochs(ax, run)
        ax.set_title(f"{term} loss" if term != "loss" else "total loss")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    for ax in axes[len(terms) :]:
        ax.set_visible(False)
    return Plot(
        "plot-loss",
        "Train and validation loss per term",
        _png(fig),
        "Lower is better. Epoch 0 is the untrained model (val only).",
    )


def metric_families(record: dict[str, Any]) -> dict[str, list[str]]:
    """Group ``val/`` metric keys of a record into families (recall, precision, mrr, triplet, ...)."""
    families: dict[str, list[str]] = {}
    for key in record:
        m = _FAMILY.match(key)
        if m:
            family = m.group(2)
            if family == "mrr" and m.group(3):  # mrr@k is shown with plain mrr only when nothing else
                continue
            families.setdefault(family, []).append(key)
        elif _TRIPLET.match(key):
            families.setdefault("triplet", []).append(key)
    return families


def metric_plots(run: RunData) -> list[Plot]:
    """One plot per validation metric family, a line per direction and cut-off (and train triplet accuracy)."""
    plots = []
    for family, keys in metric_families(run.epochs[-1]).items():
        fig = _figure()
        ax = fig.subplots()
        for key in keys:
            x, y = _series(run, key)
            ax.plot(x, y, marker="o", markersize=3, label=key.removeprefix("val/"))
        if family == "triplet":
            x, y = _series(run, "train/triplet/accuracy")
            if x:
                ax.plot(x, y, "--", color="black", linewidth=1, label="train triplet/accuracy")
        _mark_epochs(ax, run)
        title = _FAMILY_TITLES.get(family, family)
        ax.set_title(f"Validation {title}")
        ax.set_ylabel(title)
        ax.legend(fontsize=7, ncol=2)
        plots.append(Plot(f"plot-val-{family}", f"Validation {title}", _png(fig), "Higher is better."))
    return plots


def lr_plot(run: RunData, cut_after: Sequence[int] = ()) -> Plot | None:
    """Learning rate per epoch (and per logged step), with each plateau cut marked."""
    x, y = _series(run, "lr")
    if not x:
        return None
    fig = _figure(6.0, 3.0)
    ax = fig.subplots()
    steps = [(s["step"], float(s["lr"])) for s in run.steps if "lr" in s and "step" in s]
    ax.step(x, y, where="post", marker="o", markersize=3, label="lr (epoch)")
    for i, epoch in enumerate(cut_after):
        ax.axvline(
            epoch + 0.5, color="#e07b00", linestyle="--", linewidth=1, label="LR cut" if i == 0 else None
        )
    if steps and len({v for _, v in steps}) > 1 and run.config.get("train", {}).get("scheduler") == "cosine":
        ax2 = ax.twiny()
        ax2.plot([s for s, _ in steps], [v for _, v in steps], color="grey", linewidth=0.8, alpha=0.6)
        ax2.set_xlabel("step")
    _mark_epochs(ax, run)
    ax.set_yscale("log")
    ax.set_ylabel("learning rate (log)")
    ax.set_title("Learning rate")
    ax.legend(fontsize=7)
    caption = f"{len(cut_after)} plateau cut(s)" + (
        f" after epochs {', '.join(map(str, cut_after))}" if cut_after else ""
    )
    return Plot("plot-lr", "Learning rate", _png(fig), caption + ".")


def overlay_plot(runs: Sequence[RunData], key: str, plot_id: str) -> Plot | None:
    """One metric's validation curve for several runs on the same axes (best epochs marked with a star)."""
    fig = _figure()
    ax = fig.subplots()
    drawn = 0
    for run in runs:
        x, y = _series(run, key)
        if not x:
            continue
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=run.name)
        best = run.summary.get("best_epoch")
        if best in x:
            ax.plot([best], [y[x.index(best)]], "*", markersize=12, color=line.get_color())
        drawn += 1
    if not drawn:
        return None
    _epoch_axis(ax)
    ax.set_ylabel(key)
    ax.set_title(key)
    ax.legend(fontsize=7)
    if key == "lr":
        ax.set_yscale("log")
        caption = "Learning rate per epoch; drops are plateau cuts. A star marks each run's best epoch."
    else:
        better = "Lower" if key.endswith("loss") else "Higher"
        caption = f"{better} is better; a star marks each run's best epoch."
    return Plot(plot_id, f"{key} by run", _png(fig), caption)
