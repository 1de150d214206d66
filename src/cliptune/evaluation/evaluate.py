"""Evaluate a model on one split: rank both directions, every metric with n and a bootstrap interval.

``cliptune eval`` writes what this module returns as ``eval/<split>.json``: the means with their intervals
(so a table can be printed) *and* every query's values, top-10 list and relevant set (so ``report`` and
``compare`` can re-sample, pair queries of two models, and draw retrieval grids). Query ids are stable
across models (caption rows: the catalogue row number; images: their ``file_name``).

What is ranked (see ``docs/evaluation.md``):

* **t2i**: each caption row of the split is a query over the split's unique images;
* **i2t**: each unique image of the split is a query over the split's caption rows;
* relevant: a caption's images / an image's captions of the same group (``relevant="group"``) or of the
  same image file only (``"item"``);
* ranks are exact over the full ranking (:func:`cliptune.ranking.topk.rank_chunked`, bounded memory), so
  MRR and MAP are exact at any scale;
* ``loss``: symmetric InfoNCE per pair within batches of the split's pairs (dual encoders), or the
  Siamese objective per triplet (Siamese runs); absent for a bare model (no temperature to use);
* Siamese runs (a head and triplets) also get seed 000's triplet accuracies per modality.

Example:
    >>> model = load_model("runs/demo")  # doctest: +SKIP
    >>> result = evaluate_run("runs/demo", ["test"])["test"]  # doctest: +SKIP
    >>> result["metrics"]["t2i/recall@5"]  # doctest: +SKIP
    {'mean': 0.8, 'low': 0.7, 'high': 0.9, 'n': 44, 'confidence': 0.95}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from cliptune.config import Config, DataConfig, load_config
from cliptune.data.catalogue import CatalogueError, read_catalogue
from cliptune.data.check import check_catalogue
from cliptune.data.prepare import PreparedData, prepare_data
from cliptune.data.splits import group_ids
from cliptune.errors import CliptuneError
from cliptune.losses.distances import get_distance
from cliptune.losses.siamese import DEFAULT_SIAMESE_WEIGHTS
from cliptune.models.embed import catalogue_paths, embed_images_with, embed_texts_with
from cliptune.models.factory import LoadedModel, load_model
from cliptune.ranking.bootstrap import bootstrap_metrics
from cliptune.ranking.metrics import retrieval_metrics_from_ranks, triplet_accuracy
from cliptune.ranking.topk import rank_chunked
from cliptune.rundir import write_text_atomic

__all__ = [
    "EvalError",
    "LossSettings",
    "evaluate_embeddings",
    "evaluate_run",
    "evaluate_split",
    "info_nce_per_pair",
    "loss_settings",
    "prepare_catalogue",
    "split_order",
    "triplet_values",
    "write_eval",
]

Relevant = Literal["group", "item"]
ALL_SPLIT = "all"  # split name of a catalogue evaluated whole (bare model, no `split` column)


class EvalError(CliptuneError, ValueError):
    """An evaluation that cannot run as asked (unknown split, empty split, inconsistent inputs)."""


@dataclass(frozen=True)
class LossSettings:
    """How the split's ``loss`` is computed; from the run's config with :func:`loss_settings`.

    Attributes:
        temperature: InfoNCE temperature for dual encoders; None reports no loss (a bare model has none).
        batch_size: Pairs per InfoNCE batch (the run's ``train.batch_size``): in-batch negatives, as in
            training, so the number is comparable with ``val/loss`` in ``metrics.jsonl``.
        margin: Siamese objective's triplet margin.
        distance: Siamese objective's distance (``cosine`` or ``euclidean``).
        weights: Siamese objective's term weights (image, text, fused, cross).
        triplet_seed: Seed of the negative draws of :func:`cliptune.train.tasks.siamese.make_triplets` (the run's
            ``data.split.seed``, so eval sees the training triplets of the split).
        source: Where the settings came from, written to the JSON (``config``, ``learned`` or ``none``).
    """

    temperature: float | None = None
    batch_size: int = 32
    margin: float = 0.2
    distance: str = "cosine"
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SIAMESE_WEIGHTS))
    triplet_seed: int = 0
    source: str = "none"


def loss_settings(cfg: Config, model_folder: Path | None = None) -> LossSettings:
    """The loss settings of a run: its ``loss`` section, and a learned temperature when it has one.

    A run trained with ``loss.learn_temperature`` saved the learned ``logit_scale`` in
    ``model/loss_state.pt``; its temperature ``exp(-logit_scale)`` is used then (clamped like training:
    scale <= 100). Every other run uses ``loss.temperature`` as configured, whatever its objective, so the
    InfoNCE of runs trained with different losses stays comparable.

    Args:
        cfg: The run's config.
        model_folder: ``RUN/model`` (for ``loss_state.pt``), or None.

    Returns:
        The :class:`LossSettings`.
    """
    temperature, source = cfg.loss.temperature, "config"
    state_file = model_folder / "loss_state.pt" if model_folder is not None else None
    if cfg.loss.learn_temperature and state_file is not None and state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if "logit_scale" in state:
            scale = min(math.exp(float(state["logit_scale"])), 100.0)
            temperature, source = 1.0 / scale, "learned"
    return LossSettings(
        temperature=temperature,
        batch_size=cfg.train.batch_size,
        margin=cfg.loss.margin,
        distance=cfg.loss.distance,
        weights={**DEFAULT_SIAMESE_WEIGHTS, **cfg.loss.weights},
        triplet_seed=cfg.data.split.seed,
        source=source,
    )


# ----------------------------------------------------------------------------------------------
# data


def prepare_catalogue(
    catalogue: Path,
    *,
    group_column: str = "group",
    text_column: str = "text",
    max_pixels: int | None = None,
    progress: bool = False,
) -> PreparedData:
    """Checked rows of a catalogue evaluated without a run: split from its ``split`` column, else ``all``.

    A bare model has no ``splits.json``: the catalogue's own ``split`` column says which rows form which
    split; without that column every row is in the split ``all``. Bad rows are an error (listed), never
    dropped: clean the catalogue with ``cliptune data check --write-clean`` first.

    Args:
        catalogue: Catalogue folder.
        group_column: Column of groups (relevance by group; triplets).
        text_column: Caption column.
        max_pixels: Decompression-bomb limit (default: the data config's default).
        progress: Progress bar while images are checked.

    Returns:
        The :class:`~cliptune.data.prepare.PreparedData` with a ``split`` column.

    Raises:
        CatalogueError: Unreadable catalogue, bad rows, no caption column, or rows without a split value
            in a catalogue that has a ``split`` column (named).
    """
    cat = read_catalogue(Path(catalogue))
    limit = max_pixels if max_pixels is not None else DataConfig().max_pixels
    result = check_catalogue(cat, max_pixels=limit, progress=progress, group_column=group_column)
    if result.rejected:
        shown = "\n".join(f"  row {r.row} ({r.file_name}): {r.reason}" for r in result.rejected[:10])
        more = f"\n  ... and {len(result.rejected) - 10} more" if len(result.rejected) > 10 else ""
        raise CatalogueError(
            f"{len(result.rejected)} bad row(s) in {cat.metadata_path}:\n{shown}{more}\n"
            "Fix them or clean the catalogue with `cliptune data check --write-clean` before evaluating."
        )
    rows = result.good.reset_index(drop=True)
    if text_column not in rows.columns:
        raise CatalogueError(f"{cat.metadata_path}: no column '{text_column}' (the caption column)")
    if "split" in rows.columns:
        labels = rows["split"].astype("string").str.strip()
        missing = rows.loc[labels.isna() | (labels == ""), "row"].tolist()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise CatalogueError(
                f"{cat.metadata_path}: column 'split' is empty in {len(missing)} row(s) (rows {shown}); "
                "give every row a split, or drop the column to evaluate the whole catalogue as 'all'"
            )
        labels = labels.astype(str)
    else:
        labels = pd.Series([ALL_SPLIT] * len(rows))
    rows = rows.assign(split=labels.to_numpy())
    gids = group_ids(rows, group_column)
    splits = {str(name): sorted(set(gids[rows["split"] == name])) for name in sorted(set(rows["split"]))}
    return PreparedData(catalogue=cat, rows=rows, splits=splits, check=result)


# ----------------------------------------------------------------------------------------------
# ranking metrics from embeddings


def _pad(lists: list[list[int]]) -> Tensor:
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), max(width, 1)), -1, dtype=torch.long)  # (Q, R)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _interval_dicts(
    per_query: Mapping[str, Tensor], bootstrap: int, confidence: float, seed: int
) -> dict[str, dict[str, Any]]:
    if bootstrap > 0:
        return {k: v.to_dict() for k, v in bootstrap_metrics(per_query, bootstrap, confidence, seed).items()}
    return {  # bootstrap disabled: the mean and n only
        k: {"mean": float(v.double().mean()), "low": None, "high": None, "n": int(v.numel()),
            "confidence": confidence}
        for k, v in per_query.items()
    }  # fmt: skip


def _direction(
    queries: Tensor,
    items: Tensor,
    relevant: list[list[int]],
    *,
    query_ids: list[str],
    query_texts: list[str],
    item_ids: list[str],
    ks: Sequence[int],
    top_n: int,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    ids = _pad(relevant)  # (Q, R)
    ranked = rank_chunked(queries, items, top_n, ids, progress=progress)
    values = retrieval_metrics_from_ranks(ranked.ranks, ks=ks, prefix="")
    per_query = {
        "query_ids": query_ids,
        "queries": query_texts,
        "values": {k: [float(x) for x in v.tolist()] for k, v in values.items()},
        "top": [[item_ids[j] for j in row] for row in ranked.indices.tolist()],
        "top_scores": [[float(s) for s in row] for row in ranked.scores.float().tolist()],
        "relevant": [[item_ids[j] for j in ids] for ids in relevant],
    }
    return values, per_query


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
    row_key = list(groups) if relevant == "group" else list(files)
    image_key = [""] * m
    for i, f in enumerate(files):
        image_key[index[f]] = row_key[i]
    images_of: dict[str, list[int]] = {}
    rows_of: dict[str, list[int]] = {}
    for j, key in enumerate(image_key):
        images_of.setdefault(key, []).append(j)
    for i, key in enumerate(row_key):
        rows_of.setdefault(key, []).append(i)

    text_emb, image_emb = text_emb.float(), image_emb.float()
    common = {"ks": ks, "top_n": top_n, "progress": progress}
    t2i_values, t2i = _direction(
        text_emb, image_emb, [images_of[k] for k in row_key], query_ids=list(row_ids),
        query_texts=list(texts), item_ids=list(images), **common,
    )  # fmt: skip
    i2t_values, i2t = _direction(
        image_emb, text_emb, [rows_of[k] for k in image_key], query_ids=list(images),
        query_texts=list(images), item_ids=list(row_ids), **common,
    )  # fmt: skip
    per_metric = {f"t2i/{k}": v for k, v in t2i_values.items()} | {
        f"i2t/{k}": v for k, v in i2t_values.items()
    }
    return {
        "metrics": _interval_dicts(per_metric, bootstrap, confidence, seed),
        "per_query": {"t2i": t2i, "i2t": i2t},
    }


# ----------------------------------------------------------------------------------------------
# losses and triplets


def info_nce_per_pair(image: Tensor, text: Tensor, temperature: float, batch_size: int) -> Tensor:
    """Symmetric InfoNCE of each pair against the other pairs of its batch (batches in row order).

    The mean over a batch is :func:`cliptune.losses.info_nce` of that batch; the mean over all pairs is
    the batch losses' mean weighted by batch size (equal to the plain mean when every batch is full).

    Shapes:
        image, text: (N, D) paired rows -> (N,)
    """
    out = []
    for start in range(0, len(image), batch_size):
        img = F.normalize(image[start : start + batch_size].float(), dim=-1)  # (b, D)
        txt = F.normalize(text[start : start + batch_size].float(), dim=-1)  # (b, D)
        logits = img @ txt.T / temperature  # (b, b)
        labels = torch.arange(len(img))
        i2t = F.cross_entropy(logits, labels, reduction="none")  # (b,)
        t2i = F.cross_entropy(logits.T, labels, reduction="none")  # (b,)
        out.append((i2t + t2i) / 2)
    return torch.cat(out)


def _head_outputs(
    model: LoadedModel, data: PreparedData, rows: np.ndarray, **embed: Any
) -> dict[str, Tensor]:
    """The Siamese head's image / text / fused embeddings of catalogue rows, image and text jointly."""
    from cliptune.models.embed import tower_features

    assert model.head is not None
    backbone = model.backbone
    if not backbone.features_frozen:
        raise EvalError(f"{model.source}: a Siamese head needs frozen towers (trainable_layers 0)")
    table = data.rows.iloc[rows]
    paths = [data.catalogue.image_path(f) for f in table["file_name"]]
    with torch.inference_mode():
        img, txt = tower_features(
            backbone, paths, table[embed["text_column"]].astype(str).tolist(), cache_dir=embed["cache_dir"],
            precision=embed["precision"], progress=embed["progress"],
        )  # fmt: skip
        parts = [
            model.head(img[i : i + 1024].float(), txt[i : i + 1024].float()) for i in range(0, len(img), 1024)
        ]
    return {k: torch.cat([getattr(p, k) for p in parts]) for k in ("image", "text", "fused")}  # (U, D) each


def triplet_values(
    anchor: Mapping[str, Tensor], positive: Mapping[str, Tensor], negative: Mapping[str, Tensor],
    loss: LossSettings,
) -> dict[str, Tensor]:  # fmt: skip
    """Per-triplet accuracies (seed 000's names) and the per-triplet Siamese objective.

    ``accuracy`` is the fused one; ``accuracy/i2t`` compares the anchor's image with the positive's and
    negative's texts, ``accuracy/t2i`` the reverse, ``accuracy/cross`` is their mean (0, 0.5 or 1 per
    triplet). ``loss`` is the weighted sum of the triplet margin terms, per triplet, so its mean equals
    :func:`cliptune.losses.siamese_objective` on the same triplets.

    Shapes:
        each embedding (T, D) -> each value (T,)
    """
    a, p, n = anchor, positive, negative
    out = {
        "accuracy": triplet_accuracy(a["fused"], p["fused"], n["fused"]),
        "accuracy/image": triplet_accuracy(a["image"], p["image"], n["image"]),
        "accuracy/text": triplet_accuracy(a["text"], p["text"], n["text"]),
        "accuracy/i2t": triplet_accuracy(a["image"], p["text"], n["text"]),
        "accuracy/t2i": triplet_accuracy(a["text"], p["image"], n["image"]),
    }
    out["accuracy/cross"] = (out["accuracy/i2t"] + out["accuracy/t2i"]) / 2
    dist = get_distance(loss.distance)

    def term(x: str, y: str) -> Tensor:
        return F.relu(dist(a[x], p[y]) - dist(a[x], n[y]) + loss.margin)  # (T,)

    w = {**DEFAULT_SIAMESE_WEIGHTS, **loss.weights}
    cross = (term("image", "text") + term("text", "image")) / 2
    out["loss"] = sum(w[m] * term(m, m) for m in ("image", "text", "fused")) + w["cross"] * cross
    return out


def _triplet_section(
    model: LoadedModel, data: PreparedData, split: str, group_column: str, loss: LossSettings, **embed: Any
) -> tuple[dict[str, Tensor], list[str]] | None:
    from cliptune.train.tasks.siamese import make_triplets

    has_explicit = data.check.good_triplets is not None and len(data.check.good_triplets) > 0
    if model.head is None or not (has_explicit or group_column in data.rows.columns):
        return None
    triplets = make_triplets(data, group_column, loss.triplet_seed)[0].get(split)
    if triplets is None or len(triplets) == 0:
        return None
    rows, inverse = np.unique(triplets, return_inverse=True)
    out = _head_outputs(model, data, rows, **embed)
    pos = torch.from_numpy(inverse.reshape(triplets.shape))  # (T, 3) positions into rows
    roles = [{k: v[pos[:, r]] for k, v in out.items()} for r in range(3)]
    names = data.rows["file_name"].to_numpy()
    ids = ["|".join(str(names[i]) for i in t) for t in triplets.tolist()]
    return triplet_values(*roles, loss=loss), ids


# ----------------------------------------------------------------------------------------------
# one split, one run


def evaluate_split(
    model: LoadedModel,
    data: PreparedData,
    split: str,
    *,
    ks: Sequence[int] = (1, 5, 10),
    relevant: Relevant = "group",
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    text_column: str = "text",
    group_column: str = "group",
    cache_dir: Path | None = None,
    precision: str = "auto",
    progress: bool = True,
    top_n: int = 10,
    loss: LossSettings | None = None,
) -> dict[str, Any]:
    """Embed one split, rank both directions, and return the ``eval/<split>.json`` object.

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        data: Checked rows with their split (:func:`prepare_data` for a run, :func:`prepare_catalogue`).
        split: Which split (a key of ``data.splits``).
        ks: Cut-offs of the @k metrics.
        relevant: ``"group"`` or ``"item"`` (see :func:`evaluate_embeddings`).
        bootstrap: Bootstrap resamples (0: no intervals).
        confidence: Interval coverage.
        seed: Bootstrap seed.
        text_column: Caption column.
        group_column: Group column (an absent column or empty cell makes each image its own group).
        cache_dir: Feature cache (default ``~/.cache/cliptune/features``).
        precision: Tower precision (``auto``, ``fp32``, ``bf16``).
        progress: Progress bars.
        top_n: Length of the saved top lists.
        loss: How to compute ``loss`` (None or ``temperature=None`` for a dual encoder: no loss).

    Returns:
        The JSON-ready dict of ``docs/evaluation.md``: ``split``, ``model``, ``source``, ``catalogue``,
        ``n_rows``, ``n_images``, ``ks``, ``relevant``, ``confidence``, ``bootstrap``, ``seed``, ``loss``
        (how it was computed, or why it is absent), ``triplets`` (count, Siamese runs), ``metrics``,
        ``per_query``.

    Raises:
        EvalError: Unknown or empty split.
    """
    if split not in data.splits:
        raise EvalError(f"no split '{split}' in this data; splits: {', '.join(sorted(data.splits))}")
    rows = data.split_rows(split)
    if rows.empty:
        raise EvalError(f"split '{split}' has no rows in {data.catalogue.metadata_path}")
    if text_column not in rows.columns:
        raise EvalError(f"{data.catalogue.metadata_path}: no caption column '{text_column}'")
    ks = sorted({int(k) for k in ks})
    files = rows["file_name"].astype(str).tolist()
    texts = rows[text_column].astype(str).tolist()
    images = list(dict.fromkeys(files))
    embed = {"cache_dir": cache_dir, "precision": precision, "progress": progress}
    image_emb = embed_images_with(model, catalogue_paths(data.catalogue, images), **embed)
    text_emb = embed_texts_with(model, texts, **embed)
    result = evaluate_embeddings(
        text_emb, image_emb, row_ids=[str(r) for r in rows["row"]], texts=texts, files=files,
        groups=group_ids(rows, group_column).astype(str).tolist(), images=images, ks=ks, relevant=relevant,
        bootstrap=bootstrap, confidence=confidence, seed=seed, top_n=top_n, progress=progress,
    )  # fmt: skip
    extra: dict[str, Tensor] = {}
    loss = loss or LossSettings()
    loss_info: dict[str, Any]
    if model.head is not None:
        found = _triplet_section(model, data, split, group_column, loss, text_column=text_column, **embed)
        if found is None:
            loss_info = {"name": None, "reason": f"no triplets in split '{split}'"}
        else:
            values, ids = found
            extra["loss"] = values.pop("loss")
            triplet_metrics = {f"triplet/{k}": v for k, v in values.items()}
            result["metrics"] |= _interval_dicts(triplet_metrics, bootstrap, confidence, seed)
            result["per_query"]["triplet"] = {
                "query_ids": ids, "values": {k: [float(x) for x in v.tolist()] for k, v in values.items()},
            }  # fmt: skip
            loss_info = {"name": "siamese", "margin": loss.margin, "distance": loss.distance,
                         "weights": dict(loss.weights), "n_triplets": len(ids)}  # fmt: skip
    elif loss.temperature is None:
        loss_info = {"name": None, "reason": "no temperature: a bare model has no training config"}
    else:
        index = {f: j for j, f in enumerate(images)}
        paired = image_emb[[index[f] for f in files]]  # (N, D) the image of each caption row
        extra["loss"] = info_nce_per_pair(paired, text_emb, loss.temperature, loss.batch_size)
        loss_info = {"name": "info_nce", "temperature": loss.temperature, "temperature_source": loss.source,
                     "batch_size": loss.batch_size}  # fmt: skip
    if "loss" in extra:
        result["metrics"] = _interval_dicts(extra, bootstrap, confidence, seed) | result["metrics"]
        # one loss value per caption row (retrieval) or per triplet (siamese): the same ids pair them
        owner = "triplet" if model.head is not None else "t2i"
        result["per_query"]["loss"] = {
            "query_ids": list(result["per_query"][owner]["query_ids"]),
            "values": [float(x) for x in extra["loss"].tolist()],
        }
    return {
        "split": split,
        "model": model.name,
        "source": str(model.source),
        "catalogue": str(Path(data.catalogue.root).resolve()),
        "n_rows": len(rows),
        "text_column": text_column,
        "n_images": len(images),
        "ks": ks,
        "relevant": relevant,
        "confidence": confidence,
        "bootstrap": bootstrap,
        "seed": seed,
        "loss": loss_info,
        **result,
    }


def split_order(splits: Mapping[str, Any]) -> list[str]:
    """Split names in reading order: train, val, test, then the others alphabetically."""
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(splits, key=lambda s: (order.get(s, 3), s))


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
    if not (run_dir / "config.yaml").is_file():
        raise EvalError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
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
    settings = loss_settings(cfg, model.source)
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
        )  # fmt: skip
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
        ValueError: Neither or both folders given, or a non-finite number in ``result``.
    """
    if (run_dir is None) == (out_dir is None):
        raise ValueError("write_eval: give exactly one of run_dir and out_dir")
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"  # type: ignore[arg-type]
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / f"{result['split']}.json", json.dumps(result, allow_nan=False) + "\n")
