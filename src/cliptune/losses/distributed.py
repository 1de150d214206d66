"""Gather-with-gradient for contrastive losses whose negatives span every process.

Convention (used by every loss in :mod:`cliptune.losses`):

* each process computes the loss for its *local* query rows against the *global* batch of keys, as the
  mean over its local rows; the mean of these losses over processes is the full-batch loss;
* :func:`gather_with_grad` is an all-gather whose backward *sums* the incoming gradient over processes
  (all-reduce SUM) and keeps the local slice, with no division by the world size;
* the data-parallel wrapper (DDP, Accelerate) then *averages* parameter gradients over processes.

Together, P processes with local batch b give the same loss (averaged over processes) and the same
parameter gradients as one process with batch P * b: the gradient reaching process q's embeddings is
sum_p dloss_p / de_q, and DDP's average over q turns it into d(mean_p loss_p) / dtheta.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["gather_with_grad", "rank_and_world_size"]


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """Return this process's rank and the number of processes, ``(0, 1)`` when not distributed.

    Args:
        group: process group (``None`` is the default group).

    Returns:
        ``(rank, world_size)``; a single process (no ``init_process_group``) is rank 0 of 1, so callers
        need no branch for the single-process case.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        rank, world = rank_and_world_size(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)  # (world * b, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every process's loss depends on our rows: sum their gradients (no 1/world; DDP averages later).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the gradient path to the local shard.

    Rows are ordered by rank, so this process's rows start at ``rank * b``. The backward all-reduces
    (sums) the gradient over processes and returns the local slice; see the module docstring for why
    this, combined with DDP's gradient averaging, reproduces single-process full-batch gradients.
    Every process must call it (and later backward) with the same local batch size ``b``.

    Args:
        x: local tensor, e.g. embeddings.
        group: process group (``None`` is the default group).

    Returns:
        The global tensor; ``x`` itself when torch.distributed is not initialised or has one process.

    Raises:
        ValueError: local batch sizes differ between processes (the mean-of-local-means convention
            would no longer equal the full-batch mean, and all_gather needs equal shapes).

    Shapes:
        x: (b, ...) -> (world_size * b, ...)

    Example:
        >>> gather_with_grad(torch.ones(4, 8)).shape  # single process: identity
        torch.Size([4, 8])
    """
    rank, world = rank_and_world_size(group)
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), group=group)
    counts = [int(s.item()) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(
            f"gather_with_grad: local batch sizes differ across processes {counts} (rank {rank} has "
            f"{x.shape[0]}); use equal per-process batches (drop_last=True)"
        )
    gathered: torch.Tensor = _GatherWithGrad.apply(x, group)  # type: ignore[no-untyped-call]
    return gathered
