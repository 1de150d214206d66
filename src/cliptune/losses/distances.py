"""Row-wise distances between embedding batches, chosen by name (a parameter, not a branch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DISTANCES", "Distance", "cosine_distance", "euclidean_distance", "get_distance"]

# Squared distances below this are clamped before the square root: the gradient of sqrt at 0 is
# infinite, and a (near-)duplicate pair would otherwise turn the whole backward into NaN.
_EPS_SQ = 1e-12


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine distance ``1 - cos(x_i, y_i)`` per row; in [0, 2], scale-invariant.

    Args:
        x: first batch.
        y: second batch, row i paired with ``x[i]``.

    Returns:
        Distances, one per row.

    Shapes:
        x, y: (B, D) -> (B,)

    Example:
        >>> cosine_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
        tensor([1.])
    """
    return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=1e-12)  # (B,)


def euclidean_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ``||x_i - y_i||`` per row on the raw (not normalised) vectors.

    Args:
        x: first batch.
        y: second batch, row i paired with ``x[i]``.

    Returns:
        Distances, one per row; rows closer than 1e-6 count as 1e-6 apart with zero gradient,
        which keeps the backward finite for identical pairs.

    Shapes:
        x, y: (B, D) -> (B,)

    Example:
        >>> euclidean_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]))
        tensor([5.])
    """
    return (x - y).pow(2).sum(dim=-1).clamp_min(_EPS_SQ).sqrt()  # (B,)


def _cosine_pairwise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.normalize(x, dim=-1, eps=1e-12) @ F.normalize(y, dim=-1, eps=1e-12).T  # (B, M)


def _euclidean_pairwise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The direct (non-matmul) kernel avoids the cancellation of ||x||^2 + ||y||^2 - 2 x.y.
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").clamp_min(_EPS_SQ**0.5)  # (B, M)


@dataclass(frozen=True)
class Distance:
    """A distance with its paired (row i vs row i) and pairwise (every row vs every row) forms.

    Calling the object computes the paired form, so ``DISTANCES["cosine"](a, p)`` reads like a
    function. The pairwise form serves in-batch negatives without materialising (B, M, D).

    Attributes:
        paired: ``(B, D), (B, D) -> (B,)``.
        pairwise: ``(B, D), (M, D) -> (B, M)``.
    """

    paired: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    pairwise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Paired distance, see :attr:`paired`."""
        return self.paired(x, y)


DISTANCES: dict[str, Distance] = {
    "cosine": Distance(cosine_distance, _cosine_pairwise),
    "euclidean": Distance(euclidean_distance, _euclidean_pairwise),
}


def get_distance(name: str) -> Distance:
    """Look a distance up in :data:`DISTANCES`.

    Args:
        name: registered distance name.

    Returns:
        The distance (callable row-wise, with a ``pairwise`` form).

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; known: {sorted(DISTANCES)}") from None
