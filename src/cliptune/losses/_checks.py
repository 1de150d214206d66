"""Input validation and reduction shared by the losses: fail early, naming the argument and its shape."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]
"""``"mean"``: the loss as trained (0-d); ``"none"``: one term per pair / triplet, so evaluation can
resample and pair items with the very formula training uses."""


def check_reduction(where: str, reduction: str) -> None:
    """Raise ValueError unless ``reduction`` is ``"mean"`` or ``"none"``."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"{where}: reduction must be 'mean' or 'none', got {reduction!r}")


def reduce(where: str, terms: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Mean of per-item terms (``"mean"``) or the terms themselves (``"none"``); anything else raises."""
    check_reduction(where, reduction)
    return terms.mean() if reduction == "mean" else terms


def check_same_batch(where: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor is a float 2-D with one common (B, D) shape and B >= 1."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    bad = [name for name, shape in shapes.items() if len(shape) != 2 or shape[0] == 0]
    if bad:
        raise ValueError(f"{where}: expected non-empty 2-D (B, D) tensors, got {shapes}")
    not_float = {name: str(t.dtype) for name, t in tensors.items() if not t.is_floating_point()}
    if not_float:
        raise ValueError(f"{where}: embeddings must be floating point, got {not_float}")
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: all inputs must share one (B, D) shape, got {shapes}")


ExtraImages = tuple[torch.Tensor, torch.Tensor]
"""Extra negative images of a batch, L2-normalised (M, D), and which caption may use which, (b, M) bool."""


def extra_negatives(
    extra_image: torch.Tensor | None, extra_mask: torch.Tensor | None, n_rows: int, dim: int, where: str
) -> ExtraImages | None:
    """Checked, normalised extra negatives: every column usable by every row when ``extra_mask`` is None."""
    if extra_image is None:
        if extra_mask is not None:
            raise ValueError(f"{where}: extra_mask given without extra_image")
        return None
    if extra_image.dim() != 2 or extra_image.shape[1] != dim or not extra_image.is_floating_point():
        raise ValueError(
            f"{where}: extra_image must be a float (M, {dim}) tensor, got {tuple(extra_image.shape)}"
        )
    shape = (n_rows, extra_image.shape[0])
    if extra_mask is None:
        extra_mask = torch.ones(shape, dtype=torch.bool, device=extra_image.device)
    if tuple(extra_mask.shape) != shape or extra_mask.dtype != torch.bool:
        raise ValueError(
            f"{where}: extra_mask must be a bool {shape} tensor, got {extra_mask.dtype} {tuple(extra_mask.shape)}"
        )
    return F.normalize(extra_image, dim=-1), extra_mask
