"""Deterministic, resumable, process-sharded batching for the training loop, and its per-batch helpers.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a resumed run replays exactly
the same batches; a resume in the middle of an epoch skips the batches already seen. With several
processes each takes every ``world``-th index of the same permutation (equal counts, the tail that does
not fill a global batch is dropped, as contrastive training wants full batches). :func:`to_device` moves a
batch to the accelerator and :func:`step_terms` turns a step's loss terms into the values every process
agrees on, left on the device (the loop reads them every ``train.log_every_steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from accelerate import Accelerator

__all__ = [
    "EpochData",
    "epoch_batches",
    "batches_per_epoch",
    "collate_dicts",
    "shard_indices",
    "to_device",
    "step_terms",
    "any_process",
]


@runtime_checkable
class EpochData(Protocol):
    """Training items that change with the epoch (augmented views): ``for_epoch(e)`` gives epoch e's items.

    ``for_epoch`` must be a pure function of the epoch, so a resumed run replays the same items.
    """

    def __len__(self) -> int: ...

    def for_epoch(self, epoch: int) -> Sequence[dict[str, Any]]: ...


def batches_per_epoch(n_items: int, batch_size: int, world_size: int) -> int:
    """Number of per-process batches in one epoch (full global batches only)."""
    return n_items // (batch_size * world_size)


def epoch_batches(
    dataset: Sequence[dict[str, Any]] | EpochData,
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
        dataset: Indexable items (dicts of tensors / values), or :class:`EpochData` whose epoch's items are
            batched.
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
    # augmented views: this epoch's pick, a pure function of the epoch
    items = dataset.for_epoch(epoch) if isinstance(dataset, EpochData) else dataset
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(items), generator=generator).tolist()
    n_batches = batches_per_epoch(len(items), batch_size, world_size)
    global_batch = batch_size * world_size
    for b in range(start_batch, n_batches):
        chunk = order[b * global_batch : (b + 1) * global_batch]
        yield collate([items[i] for i in chunk[rank::world_size]])


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device`` (other values as they are)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def step_terms(
    accelerator: Accelerator, outputs: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One step's loss terms as every process agrees on them, left on the device, and the agreed total.

    With several processes the terms travel in one all-reduce (asynchronous on GPUs), so every process
    sees the same numbers and makes the same skip decision for a non-finite loss without a host read.
    With one process the terms are only detached (no stack, no copy: a step on cached features takes
    about a millisecond, and each tensor op costs microseconds); :class:`~cliptune.train.state.UnreadSteps`
    stacks them when it reads.

    Args:
        accelerator: Its processes take part.
        outputs: This process's loss terms (scalar tensors), the total under ``"loss"``.

    Returns:
        The terms to keep (one per name in ``outputs``' order, or one vector of them all), each
        ``float()``-able to ``(len(outputs),)`` when concatenated; and the total loss to check.
    """
    if accelerator.num_processes == 1:
        return [t.detach() for t in outputs.values()], outputs["loss"].detach()
    local = torch.stack([outputs[n].detach().float().reshape(()) for n in outputs])  # (len(outputs),)
    mean = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
    return [mean], mean[list(outputs).index("loss")]


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when ``flag`` is True on any process (one small all-reduce; a host read)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return bool(total > 0)
