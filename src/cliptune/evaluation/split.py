"""Evaluate a model on one split: embed it, rank both directions, add the loss, build the eval JSON.

``cliptune eval`` writes what :func:`evaluate_split` returns as ``eval/<split>.json``: the means with their
intervals (so a table can be printed) *and* every query's values, top-10 list and relevant set (so
``report`` and ``compare`` can re-sample, pair queries of two models, and draw retrieval grids). Query ids
are stable across models (caption rows: the catalogue row number; images: their ``file_name``).

* ``loss``: symmetric InfoNCE per pair within batches of the split's pairs (dual encoders), or the
  Siamese objective per triplet (Siamese runs); absent for a bare model (no temperature to use);
* Siamese runs (a head and triplets) also get seed 000's triplet accuracies per modality.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from cliptune.data.prepare import PreparedData
from cliptune.data.splits import group_ids
from cliptune.evaluation.errors import EvalError, NonFiniteEmbeddingsError
from cliptune.evaluation.intervals import metric_summaries
from cliptune.evaluation.loss import LossSettings, info_nce_per_pair
from cliptune.evaluation.retrieval import Relevant, evaluate_embeddings
from cliptune.evaluation.triplets import triplet_section
from cliptune.models.embed import Workers, catalogue_paths, embed_images_with, embed_texts_with
from cliptune.models.factory import LoadedModel

__all__ = ["evaluate_split"]


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
    num_workers: Workers = "auto",
    progress: bool = True,
    top_n: int = 10,
    loss: LossSettings | None = None,
) -> dict[str, Any]:
    """Embed one split, rank both directions, and return the ``eval/<split>.json`` object.

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        data: Checked rows with their split (:func:`cliptune.data.prepare.prepare_data` for a run,
            :func:`cliptune.evaluation.catalogue.prepare_catalogue` for a bare model).
        split: Which split (a key of ``data.splits``).
        ks: Cut-offs of the @k metrics.
        relevant: ``"group"`` or ``"item"`` (see :func:`cliptune.evaluation.retrieval.evaluate_embeddings`).
        bootstrap: Bootstrap resamples (0: no intervals).
        confidence: Interval coverage.
        seed: Bootstrap seed.
        text_column: Caption column.
        group_column: Group column (an absent column or empty cell makes each image its own group).
        cache_dir: Feature cache (default ``~/.cache/cliptune/features``).
        precision: Tower precision (``auto``, ``fp32``, ``bf16``).
        num_workers: Image-decoding workers (``data.num_workers``; see
            :func:`cliptune.models.embed.decode_workers`).
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
        NonFiniteEmbeddingsError: The model embeds some of the split's images or captions as NaN / inf.
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
    embed: dict[str, Any] = {"cache_dir": cache_dir, "precision": precision, "progress": progress}
    image_emb = embed_images_with(
        model, catalogue_paths(data.catalogue, images), num_workers=num_workers, **embed
    )
    text_emb = embed_texts_with(model, texts, **embed)
    for tower, emb, names in (("image", image_emb, images), ("text", text_emb, texts)):
        _check_finite(emb, names, tower, split, model, precision)
    result = evaluate_embeddings(
        text_emb,
        image_emb,
        row_ids=[str(r) for r in rows["row"]],
        texts=texts,
        files=files,
        groups=group_ids(rows, group_column).astype(str).tolist(),
        images=images,
        ks=ks,
        relevant=relevant,
        bootstrap=bootstrap,
        confidence=confidence,
        seed=seed,
        top_n=top_n,
        progress=progress,
    )
    extra: dict[str, Tensor] = {}
    loss = loss or LossSettings()
    loss_info: dict[str, Any]
    if model.head is not None:
        found = triplet_section(model, data, split, group_column, loss, text_column=text_column, **embed)
        if found is None:
            loss_info = {"name": None, "reason": f"no triplets in split '{split}'"}
        else:
            values, ids = found
            extra["loss"] = values.pop("loss")
            triplet_metrics = {f"triplet/{k}": v for k, v in values.items()}
            result["metrics"] |= metric_summaries(triplet_metrics, bootstrap, confidence, seed)
            result["per_query"]["triplet"] = {
                "query_ids": ids,
                "values": {k: [float(x) for x in v.tolist()] for k, v in values.items()},
            }
            loss_info = {
                "name": "siamese",
                "siamese_loss": loss.siamese_loss,
                "temperature": loss.temperature if loss.siamese_loss == "info_nce" else None,
                "margin": loss.margin,
                "distance": loss.distance,
                "weights": dict(loss.weights),
                "n_triplets": len(ids),
            }
    elif loss.temperature is None:
        loss_info = {"name": None, "reason": "no temperature: a bare model has no training config"}
    else:
        index = {f: j for j, f in enumerate(images)}
        paired = image_emb[[index[f] for f in files]]  # (N, D) the image of each caption row
        extra["loss"] = info_nce_per_pair(paired, text_emb, loss.temperature, loss.batch_size)
        loss_info = {
            "name": "info_nce",
            "temperature": loss.temperature,
            "temperature_source": loss.source,
            "batch_size": loss.batch_size,
        }
    if "loss" in extra:
        result["metrics"] = metric_summaries(extra, bootstrap, confidence, seed) | result["metrics"]
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


def _check_finite(
    emb: Tensor, names: list[str], tower: str, split: str, model: LoadedModel, precision: str
) -> None:
    """NaN embeddings would fail deep in ranking with no context: name the split, model and tower here."""
    bad = (~emb.isfinite()).any(dim=1)  # (N,) one flag per embedding
    if bool(bad.any()):
        first = names[int(bad.nonzero()[0])]
        count, total = int(bad.sum()), len(names)
        raise NonFiniteEmbeddingsError(
            split, model.name, str(model.source), tower, count, total, first, precision
        )
