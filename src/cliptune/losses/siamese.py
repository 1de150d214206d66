"""The Siamese objective (seed 000): triplets of artworks seen as image, text and fused embeddings."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cliptune.losses._checks import Reduction
from cliptune.losses.distances import get_distance
from cliptune.losses.margin import triplet_margin

__all__ = ["DEFAULT_SIAMESE_WEIGHTS", "SiameseLoss", "siamese_objective"]

DEFAULT_SIAMESE_WEIGHTS: dict[str, float] = {"image": 1.0, "text": 1.0, "fused": 1.0, "cross": 1.0}
_MODALITIES = ("image", "text", "fused")


def _check_weights(where: str, weights: Mapping[str, float] | None) -> dict[str, float]:
    unknown = sorted(set(weights or {}) - set(DEFAULT_SIAMESE_WEIGHTS))
    if unknown:
        raise ValueError(
            f"{where}: unknown weight key(s) {unknown}; known: {sorted(DEFAULT_SIAMESE_WEIGHTS)}"
        )
    return {**DEFAULT_SIAMESE_WEIGHTS, **(weights or {})}


def _check_item(role: str, item: Mapping[str, torch.Tensor]) -> None:
    missing = [key for key in _MODALITIES if key not in item]
    if missing:
        raise ValueError(f"siamese_objective: {role} lacks key(s) {missing}; it needs {list(_MODALITIES)}")


def siamese_objective(
    anchor: Mapping[str, torch.Tensor],
    positive: Mapping[str, torch.Tensor],
    negative: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
    margin: float = 0.2,
    distance: str = "cosine",
    reduction: Reduction = "mean",
) -> dict[str, torch.Tensor]:
    """Triplet losses per modality and across modalities for a Siamese image-text head.

    Each item (anchor = an original artwork, positive = an AI-generated derivative, negative = an
    unrelated image) carries ``"image"``, ``"text"`` and ``"fused"`` embeddings from the same head.
    Terms, each :func:`triplet_margin` with ``margin`` and ``distance``:

    * ``image``: anchor / positive / negative image embeddings;
    * ``text``: the same on text embeddings;
    * ``fused``: the same on fused embeddings;
    * ``i2t``: anchor *image* vs positive *text* vs negative *text*;
    * ``t2i``: anchor *text* vs positive *image* vs negative *image*;
    * ``cross = (i2t + t2i) / 2``: keeps the two modalities in one space;
    * ``loss = w_image * image + w_text * text + w_fused * fused + w_cross * cross``.

    These names are the seed-000 log keys (val image / text / cross loss).

    Args:
        anchor: ``{"image", "text", "fused"}`` embeddings of the anchors.
        positive: the same for the positives (row i with anchor row i).
        negative: the same for the negatives.
        weights: per-term weights over ``image``, ``text``, ``fused``, ``cross``; missing keys keep
            their default of 1.0 (:data:`DEFAULT_SIAMESE_WEIGHTS`), so ``{"fused": 0}`` drops one term.
        margin: triplet margin.
        distance: a name in ``DISTANCES``.
        reduction: ``"mean"`` (the objective as trained) or ``"none"``: every term per triplet, combined
            with the same weights, so evaluation resamples triplets with training's own formula.

    Returns:
        ``{"image", "text", "fused", "i2t", "t2i", "cross", "loss"}``, 0-d tensors (or (B,) each).

    Raises:
        ValueError: a missing modality key, an unknown weight key, an unknown distance or reduction, or
            shapes that are not all one (B, D).

    Shapes:
        every embedding: (B, D) -> each term () or (B,)

    Example:
        >>> item = {k: torch.randn(4, 8) for k in ("image", "text", "fused")}
        >>> sorted(siamese_objective(item, item, item))
        ['cross', 'fused', 'i2t', 'image', 'loss', 't2i', 'text']
    """
    w = _check_weights("siamese_objective", weights)
    get_distance(distance)
    for role, item in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        _check_item(role, item)

    def term(a: str, p: str) -> torch.Tensor:
        # Anchor from modality a; positive and negative from modality p.
        return triplet_margin(anchor[a], positive[p], negative[p], margin, distance, reduction)

    out = {m: term(m, m) for m in _MODALITIES}
    out["i2t"] = term("image", "text")
    out["t2i"] = term("text", "image")
    out["cross"] = (out["i2t"] + out["t2i"]) / 2
    out["loss"] = w["image"] * out["image"] + w["text"] * out["text"] + w["fused"] * out["fused"]
    out["loss"] = out["loss"] + w["cross"] * out["cross"]
    return out


class SiameseLoss(nn.Module):
    """The Siamese objective as a module; see :func:`siamese_objective` for the terms.

    Call: ``forward(anchor, positive, negative)``, each a mapping with ``"image"``, ``"text"`` and
    ``"fused"`` (B, D) embeddings. Returns ``{"image", "text", "fused", "i2t", "t2i", "cross", "loss"}``.

    Args:
        weights: per-term weights over image, text, fused, cross (missing keys = 1.0).
        margin: triplet margin.
        distance: a name in ``DISTANCES``.

    Example:
        >>> item = {k: torch.randn(4, 8) for k in ("image", "text", "fused")}
        >>> SiameseLoss(weights={"fused": 0.5})(item, item, item)["loss"].shape
        torch.Size([])
    """

    def __init__(
        self, weights: Mapping[str, float] | None = None, margin: float = 0.2, distance: str = "cosine"
    ) -> None:
        super().__init__()
        self.weights = _check_weights("SiameseLoss", weights)
        get_distance(distance)
        self.margin = margin
        self.distance = distance

    def forward(
        self,
        anchor: Mapping[str, torch.Tensor],
        positive: Mapping[str, torch.Tensor],
        negative: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Compute the named terms; see :func:`siamese_objective`.

        Args:
            anchor: ``{"image", "text", "fused"}`` embeddings of the anchors.
            positive: the same for the positives.
            negative: the same for the negatives.

        Returns:
            ``{"image", "text", "fused", "i2t", "t2i", "cross", "loss"}``, 0-d tensors.
        """
        return siamese_objective(anchor, positive, negative, self.weights, self.margin, self.distance)
