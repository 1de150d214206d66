"""Retrieval metrics of embedded caption rows and images: both directions ranked exactly, per query.

This is the one evaluator of image-text retrieval. Training validation calls :func:`rank_directions` and
keeps the means; ``cliptune eval`` calls :func:`evaluate_embeddings`, which adds bootstrap intervals and
the per-query records written to ``eval/<split>.json``. What is ranked (see ``docs/evaluation.md``):

* **t2i**: each caption row is a query over the unique images;
* **i2t**: each unique image is a query over the caption rows;
* relevant: a caption's images / an image's captions of the same key: the group (``relevant="group"``)
  or the image file itself (``"item"``);
* ranks are exact over the full ranking (:func:`cliptune.ranking.topk.rank_chunked`, bounded memory), so
  MRR and MAP are exact at any scale; ties go to the lower item index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from cliptune.evaluation.errors import EvalError
from cliptune.evaluation.intervals import metric_summaries
from cliptune.ranking.metrics import retrieval_metrics_from_ranks
from cliptune.ranking.topk import Ranked, rank_chunked

__all__ = ["DIRECTIONS", "Direction", "Relevant", "evaluate_embeddings", "rank_directions"]

Relevant = Literal["group", "item"]
DIRECTIONS = ("t2i", "i2t")


@dataclass(frozen=True)
class Direction:
    """One ranked direction.

    Attributes:
        values: Metric name (``recall@5``, ``mrr``, ... without prefix) -> (Q,) float32 per-query values.
        ranked: Top lists (when asked) and ranks of the relevant items.
        relevant: Per query, the indices of its relevant items.
    """

    values: dict[str, Tensor]
    ranked: Ranked
    relevant: list[list[int]]


def _pad(lists: list[list[int]]) -> Tensor:
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), max(width, 1)), -1, dtype=torch.long)  # (Q, R)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _relevant_lists(
    files: Sequence[str], keys: Sequence[str], images: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Relevant images of each row and relevant rows of each image: those sharing the row's key."""
    index = {f: j for j, f in enumerate(images)}
    image_key = [""] * len(images)
    for i, f in enumerate(files):
        image_key[index[f]] = keys[i]
    images_of: dict[str, list[int]] = {}
    rows_of: dict[str, list[int]] = {}
    for j, key in enumerate(image_key):
        images_of.setdefault(key, []).append(j)
    for i, key in enumerate(keys):
        rows_of.setdefault(key, []).append(i)
    return [images_of[k] for k in keys], [rows_of[k] for k in image_key]


def rank_directions(
    text_emb: Tensor,
    image_emb: Tensor,
    *,
    files: Sequence[str],
    keys: Sequence[str],
    images: Sequence[str],
    ks: Sequence[int],
    top_n: int = 0,
    progress: bool = False,
) -> dict[str, Direction]:
    """Rank t2i and i2t exactly and compute every ranking metric per query.

    Args:
        text_emb: Caption embeddings, one per row (L2-normalised: scores are inner products).
        image_emb: Image embeddings, one per unique image, aligned with ``images``.
        files: Image file of each row; every one is in ``images``.
        keys: Relevance key of each row (its group, or its file for item relevance).
        images: The unique image files.
        ks: Cut-offs of the @k metrics.
        top_n: Length of the top lists kept in :attr:`Direction.ranked` (0: none, ranks only).
        progress: Progress bar while ranking.

    Returns:
        ``{"t2i": Direction, "i2t": Direction}``.

    Shapes:
        text_emb (N, D), image_emb (M, D) -> t2i values (N,), i2t values (M,)
    """
    t2i_rel, i2t_rel = _relevant_lists(files, keys, images)
    out = {}
    for name, queries, items, relevant in (
        ("t2i", text_emb, image_emb, t2i_rel),
        ("i2t", image_emb, text_emb, i2t_rel),
    ):
        ranked = rank_chunked(queries, items, top_n, _pad(relevant), progress=progress)
        values = retrieval_metrics_from_ranks(ranked.ranks, ks=ks, prefix="")
        out[name] = Direction(values, ranked, relevant)
    return out


def _check_inputs(
    text_emb: Tensor,
    image_emb: Tensor,
    row_ids: Sequence[str],
    texts: Sequence[str],
    files: Sequence[str],
    groups: Sequence[str],
    images: Sequence[str],
    relevant: str,
) -> None:
    n, m = len(row_ids), len(images)
    lengths = {"text_emb": text_emb.shape[0], "texts": len(texts), "files": len(files), "groups": len(groups)}
    if any(v != n for v in lengths.values()) or image_emb.shape[0] != m:
        raise EvalError(
            f"evaluate_embeddings: {n} row ids but lengths {lengths}; {m} images but "
            f"{image_emb.shape[0]} image embeddings"
        )
    if n == 0:
        raise EvalError("evaluate_embeddings: no rows to evaluate")
    if relevant not in ("group", "item"):
        raise EvalError(f"evaluate_embeddings: relevant must be 'group' or 'item', got {relevant!r}")
    index = {f: j for j, f in enumerate(images)}
    unknown = [f for f in files if f not in index]
    unused = sorted(set(images) - set(files))
    if unknown or unused or len(index) != m:
        raise EvalError(
            f"evaluate_embeddings: images must be the rows' unique files: rows name files not in images "
            f"{unknown[:3]}, images without rows {unused[:3]}, {m - len(index)} duplicate image(s)"
        )


def _records(
    d: Direction, query_ids: list[str], query_texts: list[str], item_ids: list[str]
) -> dict[str, Any]:
    """The JSON per-query block of one direction: ids, texts, values, top lists and relevant sets."""
    return {
        "query_ids": query_ids,
        "queries": query_texts,
        "values": {k: [float(x) for x in v.tolist()] for k, v in d.values.items()},
        "top": [[item_ids[j] for j in row] for row in d.ranked.indices.tolist()],
        "top_scores": [[float(s) for s in row] for row in d.ranked.scores.float().tolist()],
        "relevant": [[item_ids[j] for j in ids] for ids in d.relevant],
    }


def evaluate_embeddings(
    text_emb: Tensor,
    image_emb: Tensor,
    *,
    row_ids: Sequence[str],
    texts: Sequence[str],
    files: Sequence[str],
    groups: Sequence[str],
    images: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    relevant: Relevant = "group",
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    top_n: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """t2i and i2t metrics, intervals and per-query records of embedded caption rows and images.

    Row i is a caption (``texts[i]``, id ``row_ids[i]``) of image ``files[i]`` in group ``groups[i]``;
    ``images`` lists the unique image files, aligned with ``image_emb``. An image's group is its rows'
    group (``cliptune data check`` rejects an image listed in several groups).

    Args:
        text_emb: Caption embeddings, one per row (L2-normalised: scores are inner products).
        image_emb: Image embeddings, one per unique image.
        row_ids: Stable id of each row (the catalogue row number as text).
        texts: Caption of each row (written as the t2i query text).
        files: Image file of each row.
        groups: Group id of each row.
        images: The unique image files, each used by at least one row.
        ks: Cut-offs of the @k metrics.
        relevant: ``"group"``: a caption's relevant images are all images of its group (and an image's
            relevant captions all captions of its group); ``"item"``: its own image / its own captions.
        bootstrap: Resamples of the percentile bootstrap (0: no interval, ``low``/``high`` are null).
        confidence: Interval coverage.
        seed: Bootstrap seed (every metric resamples the same queries).
        top_n: Length of the saved top lists.
        progress: Progress bar while ranking.

    Returns:
        ``{"metrics": {"t2i/recall@5": {"mean", "low", "high", "n", "confidence"}, ...},
        "per_query": {"t2i": {...}, "i2t": {...}}}`` as in ``docs/evaluation.md``.

    Raises:
        EvalError: Mismatched lengths, an image without rows, a row whose image is not in ``images``.

    Shapes:
        text_emb (N, D), image_emb (M, D)
    """
    _check_inputs(text_emb, image_emb, row_ids, texts, files, groups, images, relevant)
    keys = list(groups) if relevant == "group" else list(files)
    ranked = rank_directions(
        text_emb.float(),
        image_emb.float(),
        files=files,
        keys=keys,
        images=images,
        ks=ks,
        top_n=top_n,
        progress=progress,
    )
    per_metric = {f"{name}/{k}": v for name in DIRECTIONS for k, v in ranked[name].values.items()}
    return {
        "metrics": metric_summaries(per_metric, bootstrap, confidence, seed),
        "per_query": {
            "t2i": _records(ranked["t2i"], list(row_ids), list(texts), list(images)),
            "i2t": _records(ranked["i2t"], list(images), list(images), list(row_ids)),
        },
    }
