"""The ``loss`` that ``cliptune eval`` reports: its settings (from the run) and its per-pair values.

Evaluation never re-derives a loss: per-pair InfoNCE is :func:`cliptune.losses.info_nce` with
``reduction="none"`` over the training batch size, and the Siamese objective per triplet is
:func:`cliptune.losses.siamese_objective` with ``reduction="none"`` (see :mod:`cliptune.evaluation.triplets`),
so the eval number is the training formula and compares with ``val/loss`` in ``metrics.jsonl``. The Siamese
task builds its training loss from these same settings (:func:`loss_settings`), so the two cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from cliptune.config import Config
from cliptune.losses import info_nce, initial_temperature
from cliptune.losses.siamese import DEFAULT_SIAMESE_WEIGHTS

__all__ = ["LossSettings", "info_nce_per_pair", "loss_settings"]


@dataclass(frozen=True)
class LossSettings:
    """How the split's ``loss`` is computed; from the run's config with :func:`loss_settings`.

    Attributes:
        temperature: InfoNCE temperature for dual encoders; None reports no loss (a bare model has none).
        batch_size: Pairs per InfoNCE batch (the run's ``train.batch_size``): in-batch negatives, as in
            training, so the number is comparable with ``val/loss`` in ``metrics.jsonl``.
        siamese_loss: Siamese objective's per-term loss (``triplet``, ``contrastive`` or ``info_nce``: the
            run's ``loss.name``).
        margin: Siamese objective's margin (triplet, contrastive).
        distance: Siamese objective's distance (``cosine`` or ``euclidean``).
        weights: Siamese objective's term weights (image, text, fused, cross).
        triplet_seed: Seed of the negative draws of :func:`cliptune.data.triplets.make_triplets` (the run's
            ``data.split.seed``, so eval sees the training triplets of the split).
        source: Where the settings came from, written to the JSON (``config``, ``learned`` or ``none``).
    """

    temperature: float | None = None
    batch_size: int = 32
    siamese_loss: str = "triplet"
    margin: float = 0.2
    distance: str = "cosine"
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SIAMESE_WEIGHTS))
    triplet_seed: int = 0
    source: str = "none"


def loss_settings(
    cfg: Config, model_folder: Path | None = None, similarity_init: Mapping[str, float] | None = None
) -> LossSettings:
    """The loss settings of a run: its ``loss`` section, and a learned temperature when it has one.

    A run trained with ``loss.learn_temperature`` saved the learned ``logit_scale`` in
    ``model/loss_state.pt``; its temperature ``exp(-logit_scale)`` is used then (clamped like training:
    scale <= 100). Every other run starts where training started (``loss.temperature`` when set, else the
    backbone's pretrained ``logit_scale``, else 0.07: :func:`cliptune.losses.initial_temperature`), whatever
    its objective, so the InfoNCE of runs trained with different losses stays comparable. A Siamese run scores
    its own head's embeddings, which have no pretrained similarity: its temperature is ``loss.temperature``
    or 0.07, whatever the backbone.

    Args:
        cfg: The run's config.
        model_folder: ``RUN/model`` (for ``loss_state.pt``), or None.
        similarity_init: The loaded backbone's pretrained similarity (``logit_scale``, ``logit_bias``).

    Returns:
        The :class:`LossSettings`.
    """
    siamese = cfg.train.task == "siamese"
    pretrained = {} if siamese else similarity_init or {}
    temperature, source = initial_temperature(cfg.loss.temperature, pretrained)
    state_file = model_folder / "loss_state.pt" if model_folder is not None else None
    if cfg.loss.learn_temperature and state_file is not None and state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if "logit_scale" in state:
            scale = min(math.exp(float(state["logit_scale"])), 100.0)
            temperature, source = 1.0 / scale, "learned"
    weights: dict[str, float] = dict(DEFAULT_SIAMESE_WEIGHTS)
    weights.update(cfg.loss.weights.items())
    return LossSettings(
        temperature=temperature,
        batch_size=cfg.train.batch_size,
        siamese_loss=cfg.loss.name if siamese else "triplet",
        margin=cfg.loss.margin,
        distance=cfg.loss.distance,
        weights=weights,
        triplet_seed=cfg.data.split.seed,
        source=source,
    )


def info_nce_per_pair(image: Tensor, text: Tensor, temperature: float, batch_size: int) -> Tensor:
    """Symmetric InfoNCE of each pair against the other pairs of its batch (batches in row order).

    The mean over a batch is :func:`cliptune.losses.info_nce` of that batch; the mean over all pairs is
    the batch losses' mean weighted by batch size (equal to the plain mean when every batch is full).

    Args:
        image: Image embedding of each pair.
        text: Caption embedding of each pair.
        temperature: The run's (or its learned) temperature.
        batch_size: Pairs per batch: the in-batch negatives of training.

    Returns:
        One loss value per pair, float32.

    Shapes:
        image, text: (N, D) paired rows -> (N,)
    """
    return torch.cat(
        [
            info_nce(image[s : s + batch_size].float(), text[s : s + batch_size].float(), temperature, "none")
            for s in range(0, len(image), batch_size)
        ]
    )
