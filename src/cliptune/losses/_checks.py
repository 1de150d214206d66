"""Input validation shared by the losses: fail early, naming the argument and its shape."""

from __future__ import annotations

import torch


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
