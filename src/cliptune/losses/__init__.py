"""Losses: pure tensor functions plus thin modules returning named terms, the total under ``"loss"``.

See docs/losses.md for formulas, shapes, when to choose which loss, and the distributed convention.
"""

from cliptune.losses.distances import DISTANCES
from cliptune.losses.info_nce import InfoNCELoss, info_nce
from cliptune.losses.margin import (
    ContrastiveLoss,
    TripletLoss,
    contrastive,
    contrastive_triplet,
    triplet_margin,
)
from cliptune.losses.registry import LOSSES, make_loss
from cliptune.losses.siamese import SIAMESE_LOSSES, SiameseLoss, info_nce_triplets, siamese_objective
from cliptune.losses.siglip import SigLIPLoss, siglip
from cliptune.losses.similarity_init import initial_siglip, initial_temperature

__all__ = [
    "DISTANCES",
    "LOSSES",
    "SIAMESE_LOSSES",
    "ContrastiveLoss",
    "InfoNCELoss",
    "SiameseLoss",
    "SigLIPLoss",
    "TripletLoss",
    "contrastive",
    "contrastive_triplet",
    "info_nce",
    "info_nce_triplets",
    "initial_siglip",
    "initial_temperature",
    "make_loss",
    "siamese_objective",
    "siglip",
    "triplet_margin",
]
