"""Run a behavioural suite with a model: embed, rank, score every query, gate every category.

The ranked images (a run's held-out split, chosen by :func:`cliptune.suites.heldout.ranked_images`, or the
whole catalogue) are embedded once; each query (text or image) is ranked against all of them, its metrics
computed (:func:`cliptune.suites.scoring.query_metrics`), and checked against its thresholds. A category's
metrics are the means over its queries with bootstrap intervals; the category passes when its means meet
the category thresholds, and the suite passes when every measured category does. The result is the
``suite/<name>.json`` document (format in ``docs/suites.md``).

A query whose relevant images are all outside the ranked split cannot be scored (its MRR is undefined, and
calling it 0 would fail a model for the split's size, not its ranking): it is listed under ``skipped``
with its status and left out of every mean and count. A category with no scored query is *unmeasured*
(listed under ``unmeasured``, neither passed nor failed); a suite with no scored query at all is an
:class:`EmptySplitError` naming the split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliptune.data.catalogue import Catalogue
from cliptune.errors import CliptuneError
from cliptune.models.embed import embed_images_with, embed_texts_with
from cliptune.models.factory import LoadedModel
from cliptune.ranking.bootstrap import Interval, bootstrap_ci
from cliptune.suites.heldout import ALL
from cliptune.suites.resolve import ResolvedQuery, ResolvedSuite, resolve_suite
from cliptune.suites.schema import Suite, SuiteError
from cliptune.suites.scoring import METRICS, gate_failures, metric_key, query_metrics

__all__ = [
    "EmptySplitError",
    "embed_queries",
    "embed_suite",
    "run_suite",
    "score_category",
    "score_query",
    "unscored_status",
]


class EmptySplitError(SuiteError):
    """No query of the suite has a relevant image among the ranked images: the suite cannot gate them.

    Attributes:
        split: The ranked split (``all`` or a split name).
        n_items: How many images were ranked.
    """

    def __init__(self, suite: str, split: str, n_items: int, n_queries: int) -> None:
        self.errors = [f"none of its {n_queries} queries has a relevant image {_among(split)}"]
        self.split, self.n_items = split, n_items
        CliptuneError.__init__(
            self, f"suite {suite} on the {n_items} images of split {split}: {self.errors[0]}; nothing to gate"
        )


def _among(split: str) -> str:
    return "among all images" if split == ALL else f"in split {split}"


def unscored_status(split: str) -> str:
    """The status of a query that lost every relevant image: ``no relevant image in split test``."""
    return f"no relevant image {_among(split)}"


def embed_suite(
    resolved: ResolvedSuite,
    model: LoadedModel,
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
    keep: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the catalogue's unique images and of every query (text or image), L2-normalised.

    Args:
        keep: Item indices to embed (default: every item).

    Returns:
        ``(items, queries)``: (N, D) in ``resolved.items.ids`` order (or ``keep`` order) and (Q, D) in
        ``resolved.queries`` order.
    """
    cat = resolved.items.catalogue
    ids = resolved.items.ids if keep is None else [resolved.items.ids[i] for i in keep]
    items = embed_images_with(
        model, [cat.image_path(i) for i in ids], cache_dir=cache_dir, progress=progress
    )  # (N, D)
    return items, embed_queries(resolved, model, items.shape[1], cache_dir=cache_dir, progress=progress)


def embed_queries(
    resolved: ResolvedSuite,
    model: LoadedModel,
    dim: int,
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Embeddings of every query (text or image), L2-normalised: (Q, ``dim``) in ``resolved.queries`` order.

    ``cliptune serve`` ranks them against an index's stored vectors instead of re-embedding the items (and
    passes the model's own ``device``); None embeds on the accelerator (``embedding_device``).
    """
    texts = [(j, q.query.text) for j, q in enumerate(resolved.queries) if q.query.text is not None]
    images = [(j, q.image_path) for j, q in enumerate(resolved.queries) if q.image_path is not None]
    queries = torch.zeros(len(resolved.queries), dim)  # (Q, D)
    if texts:
        emb = embed_texts_with(
            model, [t for _, t in texts], cache_dir=cache_dir, progress=progress, device=device
        )
        queries[[j for j, _ in texts]] = emb
    if images:
        emb = embed_images_with(
            model, [p for _, p in images], cache_dir=cache_dir, progress=progress, device=device
        )
        queries[[j for j, _ in images]] = emb
    return queries


def _flag(q: ResolvedQuery, i: int) -> str:
    return "relevant" if q.relevant[i] else "yellow" if q.yellow[i] else "red" if q.red[i] else "none"


def score_query(q: ResolvedQuery, scores: torch.Tensor, ids: list[str], yellow_gain: float) -> dict[str, Any]:
    """One query's metrics, verdict, failures and top k with relevant/yellow/red/none flags.

    Args:
        q: The resolved query (masks over ``ids``).
        scores: (N,) the query's score for every item of ``ids``.
        ids: Item ids, in the order of ``q``'s masks.
        yellow_gain: The suite's gain of a yellow item.

    Returns:
        The query's entry of ``suite/<name>.json``'s ``queries`` (``top``: ranked by score, ties by the
        lower item number, the query image itself left out).
    """
    if q.exclude is not None:  # the query image itself: ranked last, in no set
        scores = scores.clone()
        scores[q.exclude] = float("-inf")
    relevant, yellow, red = (torch.from_numpy(m) for m in (q.relevant, q.yellow, q.red))
    values = query_metrics(scores, relevant, yellow, red, q.k, yellow_gain)
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()  # ties: lower index first
    order = [i for i in order if i != q.exclude][: q.k]
    top = [{"id": ids[i], "score": round(float(scores[i]), 6), "flag": _flag(q, i)} for i in order]
    reds = [
        {"id": t["id"], "rank": r, "score": t["score"]} for r, t in enumerate(top, 1) if t["flag"] == "red"
    ]
    failures = gate_failures(values, q.thresholds, q.k)
    passed = not failures  # red items in the top k fail a query only through the red-flag-rate gate
    if failures and reds:
        failures.append(f"red in top {q.k}: " + ", ".join(f"{r['id']} (rank {r['rank']})" for r in reds))
    return {
        "id": q.query.id,
        "category": q.category,
        "text": q.query.text,
        "image": q.query.image,
        "k": q.k,
        "passed": passed,
        "n_relevant": int(q.relevant.sum()),
        "n_yellow": int(q.yellow.sum()),
        "n_red": int(q.red.sum()),
        "metrics": values,
        "thresholds": q.thresholds.model_dump(),
        "failures": failures,
        "red_in_top": reds,
        "top": top,
    }


def _interval(values: list[float], bootstrap: int, confidence: float, seed: int) -> Interval:
    if bootstrap == 0:
        mean = sum(values) / len(values)
        return Interval(mean, mean, mean, len(values), confidence)
    return bootstrap_ci(values, n_resamples=bootstrap, confidence=confidence, seed=seed)


def score_category(
    resolved: ResolvedSuite,
    name: str,
    results: list[dict[str, Any]],
    bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """A category's gate over its scored queries (:func:`score_query` results): metrics, verdict, failures.

    ``bootstrap=0`` gives point values (mean = low = high), which is all a verdict needs: the gate reads
    the means.
    """
    k = resolved.category_k[name]
    thresholds = resolved.category_thresholds[name]
    metrics = {}
    for field in METRICS:
        # a query with its own k contributes its value at its own cut-off (its key names that k)
        values = [r["metrics"][metric_key(field, r["k"])] for r in results]
        metrics[metric_key(field, k)] = _interval(values, bootstrap, confidence, seed).to_dict()
    failures = gate_failures({key: m["mean"] for key, m in metrics.items()}, thresholds, k)
    return {
        "passed": not failures,
        "n_queries": len(results),
        "n_failed_queries": sum(not r["passed"] for r in results),
        "k": k,
        "thresholds": thresholds.model_dump(),
        "metrics": metrics,
        "failures": failures,
    }


def run_suite(
    suite: Suite | ResolvedSuite,
    model: LoadedModel,
    catalogue: Catalogue | None = None,
    *,
    cache_dir: Path | None = None,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    suite_file: Path | None = None,
    progress: bool = False,
    items: Sequence[str] | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Run every query of a suite with a model and gate every category.

    By default every query ranks all the catalogue's images. ``items`` ranks only those (a run's held-out
    split, so a suite measures what training never saw; :func:`cliptune.suites.heldout.ranked_images`
    picks them): each query's relevant, yellow and red sets shrink to them, and a query left with no
    relevant image is not scored but listed under ``skipped`` (status ``no relevant image in split
    test``); a category left with no scored query is listed under ``unmeasured`` and gates nothing.

    Args:
        suite: A loaded suite (checked against ``catalogue`` here) or an already resolved one.
        model: From :func:`cliptune.models.factory.load_model`.
        catalogue: The catalogue to search (not needed with a resolved suite).
        cache_dir: Feature cache folder of the embedding functions.
        bootstrap: Resamples of the category intervals (0: point intervals).
        confidence: Coverage of the intervals.
        seed: Bootstrap seed.
        suite_file: Recorded in the result.
        progress: Progress bars while embedding.
        items: Image ``file_name`` values to rank (default: every catalogue image).
        split: The name of ``items`` recorded in the result and in statuses (default ``all`` without
            ``items``, ``selected`` with them).

    Returns:
        The ``suite/<name>.json`` document: ``suite``, ``split`` and ``n_items`` (which images were
        ranked), ``passed``, ``thresholds``, ``k``, ``categories`` (per-category metrics with intervals,
        verdict, failures and ``n_skipped``), ``queries`` (per-query metrics, verdict, failures and the
        top k with relevant/yellow/red/none flags), ``skipped`` (queries not scored, with their status)
        and ``unmeasured`` (category -> status).

    Raises:
        SuiteError: The suite does not match the catalogue, or ``items`` names an image the catalogue lacks.
        EmptySplitError: No query has a relevant image among ``items``.

    Example:
        >>> result = run_suite(load_suite("suite.yaml"), load_model("runs/a"), read_catalogue(Path("data/fashion")))  # doctest: +SKIP
        >>> result["passed"], result["categories"]["rips"]["metrics"]["mrr"]["mean"]  # doctest: +SKIP
        (False, 0.21)
    """
    if isinstance(suite, ResolvedSuite):
        resolved = suite
    else:
        if catalogue is None:
            raise ValueError("run_suite: give the catalogue to run an unresolved suite on")
        resolved = resolve_suite(suite, catalogue)
    spec = resolved.suite
    label = split if split is not None else (ALL if items is None else "selected")
    keep = None if items is None else _item_indices(resolved, items)
    ids = resolved.items.ids if keep is None else [resolved.items.ids[i] for i in keep]
    kept = resolved.queries if keep is None else [_restrict(q, keep) for q in resolved.queries]
    skipped = [
        {
            "id": q.query.id,
            "category": q.category,
            "text": q.query.text,
            "image": q.query.image,
            "status": unscored_status(label),
        }
        for q in kept
        if not q.relevant.any()
    ]
    if len(skipped) == len(kept):
        raise EmptySplitError(spec.suite, label, len(ids), len(kept))
    emb, queries = embed_suite(resolved, model, cache_dir=cache_dir, progress=progress, keep=keep)
    if emb.shape[1] != queries.shape[1]:
        raise ValueError(f"run_suite: item embeddings are {emb.shape[1]}-d, queries {queries.shape[1]}-d")
    gain = spec.defaults.yellow_gain
    results = [
        score_query(q, emb @ queries[j], ids, gain) for j, q in enumerate(kept) if q.relevant.any()
    ]  # (N,) scores each
    categories, unmeasured = {}, {}
    for name in spec.categories:
        scored = [r for r in results if r["category"] == name]
        n_skipped = sum(s["category"] == name for s in skipped)
        if scored:
            categories[name] = score_category(resolved, name, scored, bootstrap, confidence, seed)
            categories[name]["n_skipped"] = n_skipped
        else:  # nothing left to measure: neither a pass nor a failure
            unmeasured[name] = f"no query with a relevant image {_among(label)} ({n_skipped} skipped)"
    cat = resolved.items.catalogue
    return {
        "suite": spec.suite,
        "suite_file": str(suite_file) if suite_file is not None else None,
        "model": model.name,
        "source": str(model.source),
        "catalogue": str(Path(cat.root).resolve()),
        "split": label,
        "n_items": len(ids),
        "passed": all(c["passed"] for c in categories.values()),
        "thresholds": spec.defaults.thresholds.model_dump(),
        "k": spec.defaults.k,
        "yellow_gain": gain,
        "bootstrap": bootstrap,
        "confidence": confidence,
        "seed": seed,
        "categories": categories,
        "unmeasured": unmeasured,
        "queries": results,
        "skipped": skipped,
    }


def _item_indices(resolved: ResolvedSuite, items: Sequence[str]) -> list[int]:
    index = {name: i for i, name in enumerate(resolved.items.ids)}
    unknown = [name for name in items if name not in index]
    if unknown:
        raise SuiteError([f"items: {len(unknown)} are not catalogue images, e.g. {unknown[0]!r}"])
    return sorted({index[name] for name in items})


def _restrict(q: ResolvedQuery, keep: list[int]) -> ResolvedQuery:
    """The query over the kept items only (masks sliced, the excluded query image re-indexed)."""
    at = np.asarray(keep)
    exclude = keep.index(q.exclude) if q.exclude is not None and q.exclude in set(keep) else None
    return dataclasses.replace(
        q, relevant=q.relevant[at], yellow=q.yellow[at], red=q.red[at], exclude=exclude
    )
