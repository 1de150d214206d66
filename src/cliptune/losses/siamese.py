"""The Siamese objective (seed 000): triplets of artworks seen as image, text and fused embeddings.

One objective, three interchangeable per-term losses (:data:`SIAMESE_LOSSES`, chosen by ``loss.name``):
the triplet margin and Hadsell's contrastive loss (both in :mod:`cliptune.losses.margin`) and InfoNCE over
the triplets (:func:`info_nce_triplets`, here: it exists only for explicit triplets). Each is applied to the
same five anchor/positive/negative combinations (image, text, fused, i2t, t2i), so the logged terms keep
their names whichever loss is trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.losses._checks import Reduction, check_same_batch, reduce
from cliptune.losses.distances import get_distance
from cliptune.losses.margin import contrastive_triplet, triplet_margin
from cliptune.losses.similarity_init import DEFAULT_TEMPERATURE

__all__ = [
    "DEFAULT_SIAMESE_WEIGHTS",
    "SIAMESE_LOSSES",
    "SiameseLoss",
    "info_nce_triplets",
    "siamese_objective",
]

DEFAULT_SIAMESE_WEIGHTS: dict[str, float] = {"image": 1.0, "text": 1.0, "fused": 1.0, "cross": 1.0}
_MODALITIES = ("image", "text", "fused")


def info_nce_triplets(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    distance: str = "cosine",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """InfoNCE over triplets: each anchor must pick its own positive among the batch's positives and negatives.

    Also known as NT-Xent / MultipleNegativesRankingLoss with hard negatives. The candidates of anchor i
    are all B positives and all B negatives of the batch; the logits are ``-d(a_i, c_j) / temperature``
    and the term is ``cross_entropy(logits_i, i)``. With the cosine distance ``-d / T = cos / T - 1 / T``,
    a constant shift, so this is the usual ``cos / T`` softmax; any other distance of :data:`DISTANCES`
    works the same way. One direction only: the anchor queries (the positives and negatives are not
    anchors of anything). The term depends on the batch, so evaluation recomputes it over batches of the
    training batch size.

    Args:
        anchor: anchor embeddings.
        positive: row i is anchor i's positive; every other row is a negative for it.
        negative: explicit negatives; every row is a negative for every anchor.
        temperature: softmax temperature (> 0).
        distance: a name in :data:`DISTANCES`.
        reduction: ``"mean"`` (the loss) or ``"none"`` (one cross-entropy per triplet).

    Returns:
        The loss, a 0-d tensor (``log(2B)`` for uninformative embeddings), or the (B,) per-triplet terms.

    Raises:
        ValueError: a temperature <= 0, an unknown distance or reduction, or inputs not all (B, D).

    Shapes:
        anchor, positive, negative: (B, D) -> () or (B,)

    Example:
        >>> a = torch.tensor([[1.0, 0.0]])
        >>> p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> round(info_nce_triplets(a, p, n, temperature=1.0).item(), 4)  # log(1 + e^-1)
        0.3133
    """
    dist = get_distance(distance)
    check_same_batch("info_nce_triplets", anchor=anchor, positive=positive, negative=negative)
    if temperature <= 0:
        raise ValueError(f"info_nce_triplets: temperature must be > 0, got {temperature}")
    candidates = torch.cat([positive, negative])  # (2B, D): positives first, so anchor i's target is i
    logits = -dist.pairwise(anchor, candidates) / temperature  # (B, 2B)
    labels = torch.arange(anchor.shape[0], device=anchor.device)  # (B,)
    return reduce("info_nce_triplets", F.cross_entropy(logits, labels, reduction="none"), reduction)


class TripletTerm(Protocol):
    """One per-term loss of the Siamese objective: three (B, D) batches -> () or (B,)."""

    def __call__(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negative: torch.Tensor,
        *,
        margin: float,
        temperature: float,
        distance: str,
        reduction: Reduction,
    ) -> torch.Tensor: ...


def _triplet(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float,
    temperature: float,
    distance: str,
    reduction: Reduction,
) -> torch.Tensor:
    return triplet_margin(anchor, positive, negative, margin, distance, reduction)


def _contrastive(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float,
    temperature: float,
    distance: str,
    reduction: Reduction,
) -> torch.Tensor:
    return contrastive_triplet(anchor, positive, negative, margin, distance, reduction)


def _info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float,
    temperature: float,
    distance: str,
    reduction: Reduction,
) -> torch.Tensor:
    return info_nce_triplets(anchor, positive, negative, temperature, distance, reduction)


SIAMESE_LOSSES: dict[str, TripletTerm] = {
    "triplet": _triplet,
    "contrastive": _contrastive,
    "info_nce": _info_nce,
}
"""The per-term losses of the Siamese objective, by ``loss.name`` (``cliptune.config.TASK_LOSSES`` lists the
same names for ``train.task='siamese'``; a test keeps the two equal)."""


def _check_loss(where: str, loss: str) -> TripletTerm:
    if loss not in SIAMESE_LOSSES:
        raise ValueError(f"{where}: unknown Siamese loss {loss!r}; known: {sorted(SIAMESE_LOSSES)}")
    return SIAMESE_LOSSES[loss]


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
    *,
    loss: str = "triplet",
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, torch.Tensor]:
    """Per-modality and cross-modal losses over triplets for a Siamese image-text head.

    Each item (anchor = an original artwork, positive = an AI-generated derivative, negative = an
    unrelated image) carries ``"image"``, ``"text"`` and ``"fused"`` embeddings from the same head.
    Every term is ``L(anchor, positive, negative)`` with ``L = SIAMESE_LOSSES[loss]``:

    * ``image``: anchor / positive / negative image embeddings;
    * ``text``: the same on text embeddings;
    * ``fused``: the same on fused embeddings;
    * ``i2t``: anchor *image* vs positive *text* vs negative *text*;
    * ``t2i``: anchor *text* vs positive *image* vs negative *image*;
    * ``cross = (i2t + t2i) / 2``: keeps the two modalities in one space;
    * ``loss = w_image * image + w_text * text + w_fused * fused + w_cross * cross``.

    These names are the seed-000 log keys (val image / text / cross loss), the same for every ``loss``.

    Args:
        anchor: ``{"image", "text", "fused"}`` embeddings of the anchors.
        positive: the same for the positives (row i with anchor row i).
        negative: the same for the negatives.
        weights: per-term weights over ``image``, ``text``, ``fused``, ``cross``; missing keys keep
            their default of 1.0 (:data:`DEFAULT_SIAMESE_WEIGHTS`), so ``{"fused": 0}`` drops one term.
        margin: margin of ``triplet`` and ``contrastive`` (unused by ``info_nce``).
        distance: a name in ``DISTANCES``, used by every loss.
        reduction: ``"mean"`` (the objective as trained) or ``"none"``: every term per triplet, combined
            with the same weights, so evaluation resamples triplets with training's own formula.
        loss: ``"triplet"`` (:func:`~cliptune.losses.margin.triplet_margin`), ``"contrastive"``
            (:func:`~cliptune.losses.margin.contrastive_triplet`) or ``"info_nce"`` (:func:`info_nce_triplets`).
        temperature: temperature of ``info_nce`` (unused by the others).

    Returns:
        ``{"image", "text", "fused", "i2t", "t2i", "cross", "loss"}``, 0-d tensors (or (B,) each).

    Raises:
        ValueError: a missing modality key, an unknown loss, weight key, distance or reduction, or
            shapes that are not all one (B, D).

    Shapes:
        every embedding: (B, D) -> each term () or (B,)

    Example:
        >>> item = {k: torch.randn(4, 8) for k in ("image", "text", "fused")}
        >>> sorted(siamese_objective(item, item, item, loss="contrastive"))
        ['cross', 'fused', 'i2t', 'image', 'loss', 't2i', 'text']
    """
    fn = _check_loss("siamese_objective", loss)
    w = _check_weights("siamese_objective", weights)
    get_distance(distance)
    for role, item in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        _check_item(role, item)

    def term(a: str, p: str) -> torch.Tensor:
        # Anchor from modality a; positive and negative from modality p.
        return fn(
            anchor[a],
            positive[p],
            negative[p],
            margin=margin,
            temperature=temperature,
            distance=distance,
            reduction=reduction,
        )

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
        loss: the per-term loss, a key of :data:`SIAMESE_LOSSES` (``triplet``, ``contrastive``, ``info_nce``).
        weights: per-term weights over image, text, fused, cross (missing keys = 1.0).
        margin: margin of ``triplet`` and ``contrastive``.
        distance: a name in ``DISTANCES``.
        temperature: temperature of ``info_nce`` (fixed).

    Example:
        >>> item = {k: torch.randn(4, 8) for k in ("image", "text", "fused")}
        >>> SiameseLoss("contrastive", weights={"fused": 0.5})(item, item, item)["loss"].shape
        torch.Size([])
    """

    def __init__(
        self,
        loss: str = "triplet",
        weights: Mapping[str, float] | None = None,
        margin: float = 0.2,
        distance: str = "cosine",
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        super().__init__()
        _check_loss("SiameseLoss", loss)  # fail at construction, not at the first batch
        self.weights = _check_weights("SiameseLoss", weights)
        get_distance(distance)
        if temperature <= 0:
            raise ValueError(f"SiameseLoss: temperature must be > 0, got {temperature}")
        self.loss = loss
        self.margin = margin
        self.distance = distance
        self.temperature = temperature

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
        return siamese_objective(
            anchor,
            positive,
            negative,
            self.weights,
            self.margin,
            self.distance,
            loss=self.loss,
            temperature=self.temperature,
        )
