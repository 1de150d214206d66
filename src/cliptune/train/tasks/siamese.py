"""The ``siamese`` task: a fusion head over frozen tower features, trained on triplets (seed 000).

Each item (an artwork image with its description) is embedded once by the frozen towers through the
feature cache; the :class:`~cliptune.models.siamese.SiameseHead` refines and fuses the two embeddings and
the same head is applied to anchor (an original), positive (a derivative of it) and negative (an unrelated
item). Triplets come from the catalogue's ``triplets.csv`` when it has one, else from groups (the first item
of a group is the anchor, every other item a positive). Triplets never cross splits: a negative from
another split is replaced by a seeded draw from this split, and the count is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from cliptune.config import Config
from cliptune.data.prepare import PreparedData
from cliptune.data.triplets import ROLES as _ROLES
from cliptune.data.triplets import make_triplets
from cliptune.evaluation.loss import loss_settings
from cliptune.evaluation.triplets import triplet_accuracies as per_triplet_accuracies
from cliptune.evaluation.validation import batched_term_means
from cliptune.losses import SiameseLoss
from cliptune.losses.similarity_init import DEFAULT_TEMPERATURE
from cliptune.models.backbone import Backbone
from cliptune.models.factory import BACKBONE_DIR, HEAD_DIR
from cliptune.models.siamese import SiameseHead
from cliptune.train.tasks.bundle import TaskBundle
from cliptune.train.tasks.retrieval import cached_features

__all__ = ["SiameseModel", "build_siamese"]


class SiameseModel(nn.Module):
    """Siamese head + objective; ``forward`` returns loss terms and triplet accuracies (seed-000 names)."""

    def __init__(self, head: SiameseHead, loss: SiameseLoss) -> None:
        super().__init__()
        self.head, self.loss = head, loss

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {role: self.head(batch[f"{role}_image"], batch[f"{role}_text"]).as_dict() for role in _ROLES}
        terms: dict[str, Tensor] = self.loss(out["anchor"], out["positive"], out["negative"])
        with torch.no_grad():
            terms |= triplet_accuracies(out["anchor"], out["positive"], out["negative"])
        return terms


def triplet_accuracies(a: dict[str, Tensor], p: dict[str, Tensor], n: dict[str, Tensor]) -> dict[str, Tensor]:
    """Batch means of seed 000's accuracies (:func:`cliptune.evaluation.triplets.triplet_accuracies`).

    ``cross`` is the mean of the i2t and t2i means, as training has always logged it.
    """
    per = per_triplet_accuracies(a, p, n)
    acc = {f"triplet/{k}": v.mean() for k, v in per.items() if k != "accuracy/cross"}
    acc["triplet/accuracy/cross"] = (acc["triplet/accuracy/i2t"] + acc["triplet/accuracy/t2i"]) / 2
    return acc


def build_siamese(
    cfg: Config, data: PreparedData, backbone: Backbone, accelerator: Accelerator, *, progress: bool = True
) -> TaskBundle:
    """Assemble the Siamese head, triplets of cached features, validation and saving.

    Args:
        cfg: The whole config (``model.head``; ``loss.name`` picks the per-term loss of
            :class:`~cliptune.losses.SiameseLoss`, with ``loss`` weights, margin, distance, temperature).
        data: Checked, split rows (needs ``train``; without ``val``, validation returns nothing).
        backbone: Frozen towers whose features feed the head.
        accelerator: Device and processes.
        progress: Progress bars while features are cached.

    Returns:
        The :class:`TaskBundle`.
    """
    if not backbone.features_frozen:
        raise ValueError(
            "the siamese task trains a head on frozen towers: use model.trainable_layers=0 without lora"
        )
    images, texts = cached_features(
        backbone, data, cfg, accelerator.device, progress and accelerator.is_main_process
    )
    triplets, redrawn = make_triplets(data, cfg.data.group_column, cfg.data.split.seed)
    h = cfg.model.head
    torch.manual_seed(cfg.train.seed)
    head = SiameseHead(
        images.shape[1], texts.shape[1], width=h.width, depth=h.depth, heads=h.heads, dropout=h.dropout
    )
    # The settings eval reports its loss with: loss.name picks the per-term loss, temperature 0.07 if unset.
    s = loss_settings(cfg)
    loss = SiameseLoss(
        s.siamese_loss,
        weights=s.weights,
        margin=s.margin,
        distance=s.distance,
        temperature=s.temperature or DEFAULT_TEMPERATURE,
    )
    model = SiameseModel(head, loss)

    def _items(t: np.ndarray) -> list[dict[str, Tensor]]:
        return [
            {
                f"{role}_{kind}": feats[row]
                for role, row in zip(_ROLES, tri, strict=True)
                for kind, feats in (("image", images), ("text", texts))
            }
            for tri in t.tolist()
        ]

    validates = bool(data.splits.get("val"))  # without val (data.split.ratios has none) nothing is logged
    val_items = _items(triplets["val"]) if validates else []
    if validates and not val_items:
        raise ValueError("the val split has no triplets: it needs groups with two or more items")
    val_batch = {k: torch.stack([it[k] for it in val_items]) for k in val_items[0]} if validates else {}

    def evaluate(m: nn.Module) -> dict[str, float]:
        if not validates:
            return {}
        inner = accelerator.unwrap_model(m)
        return batched_term_means(inner, val_batch, cfg.train.batch_size, accelerator.device)

    def save_model(m: nn.Module, directory: Path) -> None:
        cast(SiameseModel, m).head.save(directory / HEAD_DIR)  # the unwrapped model of this bundle
        backbone.save(directory / BACKBONE_DIR)

    info: dict[str, Any] = {
        "triplets": {k: int(len(v)) for k, v in triplets.items()},
        "negatives_redrawn": redrawn,
        "feature_dims": [int(images.shape[1]), int(texts.shape[1])],
        "loss": {"name": s.siamese_loss, "temperature": s.temperature, "temperature_source": s.source},
    }
    return TaskBundle(
        model=model, train_data=_items(triplets["train"]), evaluate=evaluate, save_model=save_model, info=info
    )
