"""Siamese triplet evaluation: per-triplet accuracies and objective, for validation and ``cliptune eval``.

The accuracies (seed 000's names) are defined once here; training logs their means each step and
validation epoch, ``cliptune eval`` resamples them per triplet. The per-triplet objective is the loss
itself (:func:`cliptune.losses.siamese_objective` with ``reduction="none"``), never a copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cliptune.data.prepare import PreparedData
from cliptune.data.triplets import make_triplets
from cliptune.evaluation.errors import EvalError
from cliptune.evaluation.loss import LossSettings
from cliptune.losses.siamese import siamese_objective
from cliptune.losses.similarity_init import DEFAULT_TEMPERATURE
from cliptune.models.factory import LoadedModel
from cliptune.ranking.metrics import triplet_accuracy

__all__ = ["triplet_accuracies", "triplet_section", "triplet_values"]


def triplet_accuracies(
    anchor: Mapping[str, Tensor], positive: Mapping[str, Tensor], negative: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Seed 000's triplet accuracies per triplet: fused, image, text, i2t, t2i and cross.

    ``accuracy`` is the fused one; ``accuracy/i2t`` compares the anchor's image with the positive's and
    negative's texts, ``accuracy/t2i`` the reverse; ``accuracy/cross`` is their mean (0, 0.5 or 1).

    Args:
        anchor: ``{"image", "text", "fused"}`` embeddings of the anchors.
        positive: The same for the positives.
        negative: The same for the negatives.

    Returns:
        Name -> (T,) float32 values (1.0 where the positive is strictly closer).

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
    return out


def triplet_values(
    anchor: Mapping[str, Tensor],
    positive: Mapping[str, Tensor],
    negative: Mapping[str, Tensor],
    loss: LossSettings,
) -> dict[str, Tensor]:
    """Per-triplet accuracies (:func:`triplet_accuracies`) and the per-triplet Siamese objective.

    ``loss`` is :func:`cliptune.losses.siamese_objective` with ``reduction="none"`` and the run's settings
    (``loss.siamese_loss``, margin, distance, temperature, weights), over batches of ``loss.batch_size``
    triplets in order, as validation batches them: InfoNCE's negatives are the batch's, so its mean is
    ``val/loss`` of the same triplets (the margin losses do not depend on the batch).

    Shapes:
        each embedding (T, D) -> each value (T,)
    """
    out = triplet_accuracies(anchor, positive, negative)
    n, size = len(anchor["fused"]), max(1, loss.batch_size)
    batches = [slice(s, s + size) for s in range(0, n, size)]
    out["loss"] = torch.cat(
        [
            siamese_objective(
                {k: v[b] for k, v in anchor.items()},
                {k: v[b] for k, v in positive.items()},
                {k: v[b] for k, v in negative.items()},
                loss.weights,
                loss.margin,
                loss.distance,
                reduction="none",
                loss=loss.siamese_loss,
                temperature=loss.temperature or DEFAULT_TEMPERATURE,
            )["loss"]
            for b in batches
        ]
    )
    return out


def _head_outputs(
    model: LoadedModel, data: PreparedData, rows: np.ndarray, **embed: Any
) -> dict[str, Tensor]:
    """The Siamese head's image / text / fused embeddings of catalogue rows, image and text jointly."""
    from cliptune.models.embed import siamese_embeddings

    if not model.backbone.features_frozen:
        raise EvalError(f"{model.source}: a Siamese head needs frozen towers (trainable_layers 0)")
    table = data.rows.iloc[rows]
    paths = [data.catalogue.image_path(f) for f in table["file_name"]]
    return siamese_embeddings(
        model,
        paths,
        table[embed["text_column"]].astype(str).tolist(),
        cache_dir=embed["cache_dir"],
        precision=embed["precision"],
        progress=embed["progress"],
    )  # (U, D) each


def triplet_section(
    model: LoadedModel,
    data: PreparedData,
    split: str,
    group_column: str,
    loss: LossSettings,
    *,
    text_column: str,
    cache_dir: Path | None,
    precision: str,
    progress: bool,
) -> tuple[dict[str, Tensor], list[str]] | None:
    """Per-triplet values of a split's training triplets, and their ids ``anchor|positive|negative``.

    Args:
        model: A model with a Siamese head (None is returned for one without).
        data: Checked rows with their split.
        split: Which split.
        group_column: Group column (triplets from groups when the catalogue has no ``triplets.csv``).
        loss: The objective's settings and the triplet seed.
        text_column: Caption column fed to the head.
        cache_dir: Feature cache.
        precision: Tower precision.
        progress: Progress bars.

    Returns:
        ``(values, ids)`` as from :func:`triplet_values`, or None without a head or without triplets.
    """
    has_explicit = data.check.good_triplets is not None and len(data.check.good_triplets) > 0
    if model.head is None or not (has_explicit or group_column in data.rows.columns):
        return None
    triplets = make_triplets(data, group_column, loss.triplet_seed)[0].get(split)
    if triplets is None or len(triplets) == 0:
        return None
    rows, inverse = np.unique(triplets, return_inverse=True)
    out = _head_outputs(
        model,
        data,
        rows,
        text_column=text_column,
        cache_dir=cache_dir,
        precision=precision,
        progress=progress,
    )
    pos = torch.from_numpy(inverse.reshape(triplets.shape))  # (T, 3) positions into rows
    roles = [{k: v[pos[:, r]] for k, v in out.items()} for r in range(3)]
    names = data.rows["file_name"].to_numpy()
    ids = ["|".join(str(names[i]) for i in t) for t in triplets.tolist()]
    return triplet_values(roles[0], roles[1], roles[2], loss), ids
