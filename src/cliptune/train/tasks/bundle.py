"""What the loop needs from a task (retrieval, siamese), and nothing more.

The loop is task-agnostic: it calls ``model(batch)`` for a dict of named loss terms (total under
``"loss"``) and ``evaluate(model)`` for validation values; everything task-specific (which data, which
terms, which metrics, how the trained model is saved) lives in the task module that builds a
:class:`TaskBundle`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cliptune.train.batches import EpochData

__all__ = ["TaskBundle"]


@dataclass
class TaskBundle:
    """Everything the training loop needs for one task.

    Attributes:
        model: ``forward(batch) -> dict[str, Tensor]`` with the total under ``"loss"``.
        train_data: Indexable training items (dicts), or :class:`EpochData` whose items change each epoch
            (augmented views).
        evaluate: ``evaluate(model) -> dict[str, float]`` with namespaced keys (``val/loss``,
            ``val/t2i/recall@5``); called on every process, which must all take part (it may gather).
        save_model: ``save_model(model, directory)`` writes the deployable model (``model/``).
        collate: Turns a list of items into a batch.
        info: Facts to log once (parameter counts, cache hits, split sizes).
    """

    model: nn.Module
    train_data: Sequence[dict[str, Any]] | EpochData
    evaluate: Callable[[nn.Module], dict[str, float]]
    save_model: Callable[[nn.Module, Path], None]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """:attr:`evaluate` with ``model`` in eval mode and without gradients (as the loop validates)."""
        model.eval()
        with torch.no_grad():
            return self.evaluate(model)
