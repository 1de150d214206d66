"""One entry point for losses: ``make_loss(name, **kwargs)`` over an explicit registry."""

from __future__ import annotations

from typing import Any

from torch import nn

from cliptune.losses.info_nce import InfoNCELoss
from cliptune.losses.margin import ContrastiveLoss, TripletLoss
from cliptune.losses.siamese import SiameseLoss
from cliptune.losses.siglip import SigLIPLoss

__all__ = ["LOSSES", "make_loss"]

LOSSES: dict[str, type[nn.Module]] = {
    "info_nce": InfoNCELoss,
    "siglip": SigLIPLoss,
    "triplet": TripletLoss,
    "contrastive": ContrastiveLoss,
    "siamese": SiameseLoss,
}


def make_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered loss module.

    Every module's ``forward`` returns ``dict[str, Tensor]`` with the total under ``"loss"``. Call
    signatures: ``info_nce``, ``siglip``: ``(image_emb, text_emb)``; ``triplet``:
    ``(anchor, positive, negative=None)``, i.e. ``(image_emb, text_emb)`` with in-batch negatives;
    ``contrastive``: ``(image_emb, text_emb, label=None)``; ``siamese``: ``(anchor, positive,
    negative)`` mappings of ``"image"``, ``"text"``, ``"fused"`` embeddings.

    Args:
        name: a key of :data:`LOSSES`.
        **kwargs: the module's constructor arguments (e.g. ``temperature=0.05``).

    Returns:
        The loss module.

    Raises:
        ValueError: unknown name (the message lists the known ones) or arguments the loss does not take.

    Example:
        >>> make_loss("info_nce", temperature=0.05, learn_temperature=True).learn_temperature
        True
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    try:
        return LOSSES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"loss {name!r}: bad arguments {sorted(kwargs)}: {err}") from err
