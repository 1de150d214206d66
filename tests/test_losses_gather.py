"""gather_with_grad in one process, with torch.distributed replaced by a fake world of three processes.

tests/test_losses_distributed.py runs the real thing (two gloo processes) but in spawned processes, which
mutation testing's coverage does not see; this fake states the same convention in-process: rows ordered by
rank, the backward summing every process's gradient and keeping this process's slice, the group passed on
to every call, unequal local batches refused.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from cliptune.losses import distributed
from cliptune.losses.distributed import gather_with_grad, rank_and_world_size

GROUP = object()  # a process group other than the default
RANK, WORLD, ROWS = 1, 3, 2


def _fake_world(monkeypatch: pytest.MonkeyPatch, counts: list[int], others: dict[int, torch.Tensor]) -> None:
    """Rank 1 of 3 in GROUP; rank r's rows are ``others[r]``; its upstream gradient ``10 * (r + 1)``."""

    def in_group(group: Any) -> None:
        assert group is GROUP, "the group was not passed on"

    def get_rank(group: Any = None) -> int:
        in_group(group)
        return RANK

    def get_world_size(group: Any = None) -> int:
        in_group(group)
        return WORLD

    def all_gather(parts: list[torch.Tensor], x: torch.Tensor, group: Any = None) -> None:
        in_group(group)
        assert len(parts) == WORLD and all(p.shape == x.shape and p.dtype == x.dtype for p in parts)
        for r, part in enumerate(parts):
            if x.dtype == torch.long:  # the batch sizes
                part.fill_(counts[r] if r != RANK else int(x.item()))
            else:
                part.copy_(x if r == RANK else others[r])

    def all_reduce(grad: torch.Tensor, op: Any = None, group: Any = None) -> None:
        in_group(group)
        assert op == dist.ReduceOp.SUM
        grad.add_(sum(torch.full_like(grad, 10.0 * (r + 1)) for r in range(WORLD) if r != RANK))

    fake = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        get_rank=get_rank,
        get_world_size=get_world_size,
        all_gather=all_gather,
        all_reduce=all_reduce,
        ReduceOp=dist.ReduceOp,
    )
    monkeypatch.setattr(distributed, "dist", fake)


def test_not_distributed_is_rank_zero_of_one_and_gather_is_the_identity() -> None:
    x = torch.randn(3, 2)
    assert rank_and_world_size() == (0, 1)
    assert gather_with_grad(x) is x


def test_gather_orders_rows_by_rank_and_backward_sums_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    others = {r: torch.full((ROWS, 3), float(r), dtype=torch.float64) for r in range(WORLD)}
    _fake_world(monkeypatch, [ROWS] * WORLD, others)
    assert rank_and_world_size(GROUP) == (RANK, WORLD)
    x = torch.tensor([[7.0, 8.0, 9.0], [4.0, 5.0, 6.0]], dtype=torch.float64, requires_grad=True)
    gathered = gather_with_grad(x, GROUP)
    assert gathered.shape == (WORLD * ROWS, 3)
    assert torch.equal(gathered.detach(), torch.cat([others[0], x.detach(), others[2]]))
    c = torch.arange(WORLD * ROWS * 3, dtype=torch.float64).reshape(WORLD * ROWS, 3)
    (c * gathered).sum().backward()
    # this process's own gradient c plus ranks 0 and 2's (10 and 30), at this process's rows only
    assert x.grad is not None
    assert torch.equal(x.grad, c[RANK * ROWS : (RANK + 1) * ROWS] + 40.0)


def test_unequal_local_batches_are_refused_naming_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_world(monkeypatch, [2, 0, 5], {})
    with pytest.raises(ValueError) as info:
        gather_with_grad(torch.zeros(ROWS, 3), GROUP)
    assert str(info.value) == (
        "gather_with_grad: local batch sizes differ across processes [2, 2, 5] (rank 1 has 2); use equal "
        "per-process batches (drop_last=True)"
    )
