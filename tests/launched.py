"""Helpers for tests that fork processes joining through a launcher's environment, as under ``torchrun``."""

from __future__ import annotations

import os
import socket

import torch


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
