"""Metric-learning losses: triplet margin and Hadsell et al. contrastive, with in-batch modules.

Both exist in two forms: on explicit triplets (``triplet_margin``, ``contrastive_triplet``: the Siamese task's
per-modality terms) and on image-text pairs (``TripletLoss``, ``contrastive``/``ContrastiveLoss``: the
retrieval task). The Hadsell formula itself lives once, in ``_hadsell``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.losses._checks import Reduction, check_same_batch, reduce
from cliptune.losses.distances import DISTANCES, get_distance

__all__ = ["ContrastiveLoss", "TripletLoss", "contrastive", "contrastive_triplet", "triplet_margin"]


def triplet_margin(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.2,
    distance: str = "cosine",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Triplet margin loss: the positive must be closer to the anchor than the negative, by ``margin``.

    ``loss = mean_i relu(d(a_i, p_i) - d(a_i, n_i) + margin)``. Triplets already separated by the
    margin contribute zero (and no gradient), so the loss focuses on the violating ones.

    Args:
        anchor: anchor embeddings.
        positive: embeddings that should be near the anchor (row i with ``anchor[i]``).
        negative: embeddings that should be far from the anchor.
        margin: required gap between the two distances (0.2 suits cosine distance in [0, 2]).
        distance: a name in :data:`DISTANCES`; ``"cosine"`` = 1 - cos, ``"euclidean"`` on raw vectors.
        reduction: ``"mean"`` (the loss) or ``"none"`` (one hinge per triplet, whose mean is the loss).

    Returns:
        The loss, a 0-d tensor, or the (B,) per-triplet terms.

    Raises:
        ValueError: unknown distance name or reduction, or inputs not all (B, D).

    Shapes:
        anchor, positive, negative: (B, D) -> () or (B,)

    Example:
        >>> a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> round(triplet_margin(a, p, n, margin=0.5).item(), 4)  # 0 - (1 - 1/sqrt 2) + 0.5
        0.2071
    """
    dist = get_distance(distance)
    check_same_batch("triplet_margin", anchor=anchor, positive=positive, negative=negative)
    return reduce(
        "triplet_margin", F.relu(dist(anchor, positive) - dist(anchor, negative) + margin), reduction
    )


def contrastive_triplet(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.2,
    distance: str = "cosine",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Hadsell et al. (2006) contrastive loss on the two pairs of each triplet.

    A triplet holds one similar pair (anchor, positive) and one dissimilar pair (anchor, negative):
    ``term_i = (d(a_i, p_i)^2 + max(0, margin - d(a_i, n_i))^2) / 2``, the mean of the two pairs' Hadsell
    terms, so the mean over triplets is the contrastive loss over all 2B pairs (as :func:`contrastive`
    averages over pairs). Unlike the triplet margin, the positive is pulled all the way in (not just closer
    than the negative) and the negative is pushed only until ``margin``, whatever the positive does.

    Args:
        anchor: anchor embeddings.
        positive: embeddings similar to the anchor (row i with ``anchor[i]``).
        negative: embeddings dissimilar to the anchor.
        margin: distance beyond which a negative stops contributing (cosine distance lies in [0, 2]).
        distance: a name in :data:`DISTANCES` (the same ``d`` in both terms).
        reduction: ``"mean"`` (the loss) or ``"none"`` (one term per triplet, whose mean is the loss).

    Returns:
        The loss, a 0-d tensor, or the (B,) per-triplet terms.

    Raises:
        ValueError: unknown distance name or reduction, or inputs not all (B, D).

    Shapes:
        anchor, positive, negative: (B, D) -> () or (B,)

    Example:
        >>> a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
        >>> round(contrastive_triplet(a, p, n, margin=0.5).item(), 4)  # (1^2 + (0.5 - 0)^2) / 2
        0.625
    """
    dist = get_distance(distance)
    check_same_batch("contrastive_triplet", anchor=anchor, positive=positive, negative=negative)
    pairs = torch.stack([dist(anchor, positive), dist(anchor, negative)])  # (2, B): similar, dissimilar
    label = torch.tensor([[1.0], [0.0]], dtype=pairs.dtype, device=pairs.device)  # (2, 1)
    return reduce("contrastive_triplet", _hadsell(pairs.pow(2), label, margin).mean(dim=0), reduction)


def contrastive(
    x: torch.Tensor, y: torch.Tensor, label: torch.Tensor, margin: float = 0.5, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Contrastive loss of Hadsell, Chopra and LeCun (2006) on L2-normalised embeddings.

    ``loss = mean_i label_i * d_i^2 + (1 - label_i) * relu(margin - d_i)^2`` with ``d_i`` the
    Euclidean distance between normalised ``x_i`` and ``y_i`` (so d is in [0, 2]). Similar pairs
    (label 1) are pulled together; dissimilar pairs (label 0) are pushed apart until ``margin``.
    Note the label convention: 1 means *similar* (Hadsell's paper uses Y = 0 for similar).

    Args:
        x: first embeddings (any scale; normalised here).
        y: second embeddings, row i paired with ``x[i]``.
        label: 1 for similar pairs, 0 for dissimilar (floats in between weight the two terms).
        margin: distance beyond which dissimilar pairs stop contributing.
        reduction: ``"mean"`` (the loss) or ``"none"`` (one term per pair, whose mean is the loss).

    Returns:
        The loss, a 0-d tensor, or the (B,) per-pair terms.

    Shapes:
        x, y: (B, D); label: (B,) -> () or (B,)

    Example:
        >>> x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> round(contrastive(x, y, torch.tensor([1.0])).item(), 4)  # d^2 = 2
        2.0
    """
    check_same_batch("contrastive", x=x, y=y)
    if label.shape != (x.shape[0],):
        raise ValueError(f"contrastive: label must have shape ({x.shape[0]},), got {tuple(label.shape)}")
    diff = F.normalize(x, dim=-1) - F.normalize(y, dim=-1)  # (B, D)
    return reduce("contrastive", _hadsell(diff.pow(2).sum(dim=-1), label.to(diff.dtype), margin), reduction)


def _hadsell(dist_sq: torch.Tensor, label: torch.Tensor, margin: float) -> torch.Tensor:
    # d from d^2 with a floor: sqrt has an infinite gradient at 0 (identical dissimilar pairs).
    dist = dist_sq.clamp_min(1e-12).sqrt()
    return label * dist_sq + (1 - label) * F.relu(margin - dist).pow(2)


class TripletLoss(nn.Module):
    """Triplet margin loss with explicit or in-batch negatives.

    Call: ``forward(anchor, positive, negative=None)`` with (B, D) tensors. For image-text pairs call
    it as ``forward(image_emb, text_emb)``: images are anchors and their captions positives. With
    ``negative=None`` every other positive of the batch is a negative of anchor i ("batch-all"):
    ``loss = mean over i != j of relu(d(a_i, p_i) - d(a_i, p_j) + margin)`` (needs B >= 2).
    Returns ``{"loss"}``.

    Args:
        margin: required distance gap.
        distance: a name in :data:`DISTANCES`.

    Example:
        >>> TripletLoss(margin=0.2)(torch.randn(4, 8), torch.randn(4, 8))["loss"].shape
        torch.Size([])
    """

    def __init__(self, margin: float = 0.2, distance: str = "cosine") -> None:
        super().__init__()
        get_distance(distance)  # fail at construction, not at the first batch
        self.margin = margin
        self.distance = distance

    def forward(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute ``{"loss"}``; see the class docstring.

        Args:
            anchor: anchors (e.g. image embeddings).
            positive: positives, row i with ``anchor[i]`` (e.g. text embeddings).
            negative: explicit negatives, or None for in-batch negatives.

        Returns:
            ``{"loss"}``, a 0-d tensor.

        Shapes:
            anchor, positive, negative: (B, D).
        """
        if negative is not None:
            return {"loss": triplet_margin(anchor, positive, negative, self.margin, self.distance)}
        check_same_batch("TripletLoss", anchor=anchor, positive=positive)
        rows = anchor.shape[0]
        if rows < 2:
            raise ValueError("TripletLoss: in-batch negatives need a batch of at least 2 pairs")
        dist = DISTANCES[self.distance].pairwise(anchor, positive)  # (B, B): d(a_i, p_j)
        hinge = F.relu(dist.diagonal()[:, None] - dist + self.margin)  # (B, B)
        off_diag = ~torch.eye(rows, dtype=torch.bool, device=dist.device)
        return {"loss": hinge[off_diag].mean()}


class ContrastiveLoss(nn.Module):
    """Hadsell contrastive loss with explicit labels or every in-batch pair.

    Call: ``forward(image_emb, text_emb, label=None)`` with (B, D) tensors. With a (B,) ``label`` it is
    :func:`contrastive` on the rows. With ``label=None`` all B x B (image i, text j) pairs are scored,
    matching pairs (i == j) similar and all others dissimilar, and the loss is their mean.
    Returns ``{"loss"}``.

    Args:
        margin: distance beyond which dissimilar pairs stop contributing.

    Example:
        >>> ContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8))["loss"].shape
        torch.Size([])
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute ``{"loss"}``; see the class docstring.

        Args:
            image_emb: image embeddings.
            text_emb: text embeddings, row i paired with ``image_emb[i]``.
            label: per-row labels (1 similar, 0 dissimilar), or None for all in-batch pairs.

        Returns:
            ``{"loss"}``, a 0-d tensor.

        Shapes:
            image_emb, text_emb: (B, D); label: (B,).
        """
        if label is not None:
            return {"loss": contrastive(image_emb, text_emb, label, self.margin)}
        check_same_batch("ContrastiveLoss", image_emb=image_emb, text_emb=text_emb)
        img = F.normalize(image_emb, dim=-1)  # (B, D)
        txt = F.normalize(text_emb, dim=-1)  # (B, D)
        # Unit vectors: ||x - y||^2 = 2 - 2 cos, exact enough and one matmul for all B^2 pairs.
        dist_sq = (2 - 2 * img @ txt.T).clamp_min(0)  # (B, B)
        same = torch.eye(img.shape[0], dtype=dist_sq.dtype, device=dist_sq.device)  # (B, B)
        return {"loss": _hadsell(dist_sq, same, self.margin).mean()}
