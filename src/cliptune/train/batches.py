"""Deterministic, resumable, process-sharded batching for the training loop.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a resumed run replays exactly
the same batches; a resume in the middle of an epoch skips the batches already seen. With several
processes each takes every ``world``-th index of the same permutation (equal counts, the tail that does
not fill a global batch is dropped, as contrastive training wants full batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["epoch_batches", "batches_per_epoch", "collate_dicts", "shard_indices"]


def batches_per_epoch(n_items: int, batch_size: int, world_size: int) -> int:
    """Number of per-process batches in one epoch (full global batches only)."""
    return n_items // (batch_size * world_size)


def epoch_batches(
    dataset: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield this process's batches of one epoch, starting at ``start_batch``.

    Args:
        dataset: Indexable items (dicts of tensors / values).
        batch_size: Per-process batch size.
        seed: Run seed; with ``epoch`` it fixes the order.
        epoch: Epoch number (0-based).
        rank: This process's rank.
        world_size: Number of processes.
        start_batch: Batches to skip (resume mid-epoch).
        collate: Turns a list of items into a batch (default :func:`collate_dicts`).

    Yields:
        Batches as dicts.
    """
    collate = collate or collate_dicts
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    n_batches = batches_per_epoch(len(dataset), batch_size, world_size)
    global_batch = batch_size * world_size
    for b in range(start_batch, n_batches):
        chunk = order[b * global_batch : (b + 1) * global_batch]
        yield collate([dataset[i] for i in chunk[rank::world_size]])


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of ``range(n)`` for this rank, padded by repetition so every rank has the same count."""
    per_rank = -(-n // world_size)
    padded = [i % n for i in range(per_rank * world_size)]
    return padded[rank * per_rank : (rank + 1) * per_rank]


def collate_dicts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors key by key; other values become lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
