"""Helpers for tests that fork processes joining through a launcher's environment, as under ``torchrun``."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp

if TYPE_CHECKING:
    from cliptune.search.sharded import Processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the gloo rendezvous of one test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def become_rank(rank: int, port: int, world: int) -> None:
    """Make a forked child process ``rank`` of ``world``: fresh Accelerate state, launcher variables, 1 thread.

    A fork inherits the parent's single-process Accelerate singletons, which would make every child think
    it is the only process; resetting them lets :func:`cliptune.search.sharded.launched_processes` read the
    variables set here.
    """
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def rank_result(root: Path | str, job: str, rank: int) -> Path:
    """Where rank ``rank`` of ``job`` writes its result (JSON) for the parent test to read."""
    return Path(root) / f"{job}-rank{rank}.json"


def run_rank(
    rank: int, port: int, world: int, root: Path | str, job: str, work: Callable[[Processes], dict[str, Any]]
) -> None:
    """In a forked child: become ``rank``, run ``work`` inside ``launched_processes`` and write its result.

    The result holds ``rank``, ``processes`` (``[rank, world]`` as ``launched_processes`` saw them) and what
    ``work`` returned; an exception becomes ``error`` = ``[type name, message]`` instead, so the parent test
    asserts on it (a child's traceback would only fail ``start_processes`` without saying which rank).
    """
    from cliptune.search.sharded import launched_processes

    become_rank(rank, port, world)
    result: dict[str, Any] = {"rank": rank}
    try:
        with launched_processes() as processes:
            result["processes"] = [processes.rank, processes.world]
            result.update(work(processes))
    except Exception as exc:
        result["error"] = [type(exc).__name__, str(exc)]
    rank_result(root, job, rank).write_text(json.dumps(result))


def launch(worker: Callable[..., None], world: int, root: Path, job: str, *args: Any) -> list[dict[str, Any]]:
    """Fork ``world`` children running ``worker(rank, port, str(root), job, *args)``; their results by rank.

    ``worker`` is a module-level function that ends in :func:`run_rank` (forked children run it directly).
    """
    port = free_port()
    mp.start_processes(worker, args=(port, str(root), job, *args), nprocs=world, start_method="fork")
    return [json.loads(rank_result(root, job, r).read_text()) for r in range(world)]
