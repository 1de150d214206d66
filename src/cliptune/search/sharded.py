"""Several processes embed one catalogue (``accelerate launch`` / ``torchrun``); the main process writes.

Embedding is the slow part of ``cliptune index`` and ``cliptune embed`` and is independent per image, so
each process embeds one contiguous shard of the catalogue's images and the shards are gathered to the main
process in catalogue order. Everything else (the catalogue check, the index build, ANN training, the
recall measurement, the Parquet file) runs once, on the main process, so the output is the 1-process
output: the same ids in the same order and the same vectors bit for bit.

Shards are cut at whole batches (:func:`shard_rows`): every forward sees exactly the images it would see
in one process, so even a kernel whose result depends on the batch composition gives the same bits.

Errors never hang: a step every process runs ends with every process learning whether any of them failed
(one small ``all_gather_object``); the main process then raises the failure itself (an unreadable image on
process 1 is reported, named, by process 0) and the others raise :class:`OtherProcessFailedError`, which
the CLI turns into a quiet exit 1. See ``docs/search.md`` ("Several processes").
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import torch

from cliptune.search.errors import SearchIndexError
from cliptune.train.batches import shard_indices

__all__ = [
    "OtherProcessFailedError",
    "Processes",
    "SINGLE",
    "gather_rows",
    "launched_processes",
    "on_main",
    "on_every",
    "shard_rows",
]

T = TypeVar("T")


class OtherProcessFailedError(SearchIndexError):
    """Another process failed; it (or the main process) reports the error itself, so this one exits quietly.

    Attributes:
        rank: The process that failed.
        message: Its error message.
    """

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"process {rank} failed: {message}")
        self.rank, self.message = rank, message

    def __reduce__(self) -> tuple[type[OtherProcessFailedError], tuple[int, str]]:
        return type(self), (self.rank, self.message)


@dataclass(frozen=True)
class Processes:
    """This process's place among those launched together.

    Attributes:
        rank: This process's number (0 = the main process, the one that writes).
        world: How many processes there are.
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this is the process that builds and writes the output."""
        return self.rank == 0


SINGLE = Processes()  # one process, no communication


@contextmanager
def launched_processes() -> Iterator[Processes]:
    """The processes a launcher started (``WORLD_SIZE``), joined for the command's duration.

    One process (no launcher) needs no communication. Under ``torchrun`` / ``accelerate launch`` the
    process group is started through Accelerate (gloo on CPU, NCCL on GPUs) and torn down on exit.

    Raises:
        SearchIndexError: The launcher's ``WORLD_SIZE`` and the joined group's size disagree.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched <= 1:
        yield SINGLE
        return
    import torch.distributed as dist
    from accelerate import PartialState

    started = not dist.is_initialized()
    state = PartialState(cpu=not _has_accelerator())  # on CPU, a plain one would not join the group
    try:
        if state.num_processes != launched:
            raise SearchIndexError(
                f"the launcher started {launched} processes (WORLD_SIZE) but only {state.num_processes} "
                "joined; launch with torchrun or accelerate launch --multi_gpu"
            )
        yield Processes(rank=state.process_index, world=state.num_processes)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def shard_rows(n: int, batch_size: int, processes: Processes) -> list[int]:
    """This process's rows of ``range(n)``: a contiguous run of whole batches of ``batch_size``.

    Batches are dealt by :func:`cliptune.train.batches.shard_indices` (contiguous, equal counts padded by
    repetition); the padding is dropped, so the last processes may get fewer rows or none.
    """
    n_batches = -(-n // batch_size)
    mine = shard_indices(n_batches, processes.rank, processes.world)
    first = processes.rank * len(mine)  # global position of this shard's first batch
    batches = [b for i, b in enumerate(mine) if first + i < n_batches]  # padding dropped
    return [r for b in batches for r in range(b * batch_size, min((b + 1) * batch_size, n))]


def on_every(processes: Processes, step: Callable[[], T]) -> T:
    """Run ``step`` on every process; if it fails on any, every process raises (none waits forever).

    The main process raises the first failing process's error itself; the others raise
    :class:`OtherProcessFailedError`.
    """
    if processes.world == 1:
        return step()
    import torch.distributed as dist

    failure: BaseException | None = None
    try:
        result = step()
    except Exception as exc:  # every process must hear of it before anyone raises
        failure = _portable(exc)
    failures: list[BaseException | None] = [None] * processes.world
    dist.all_gather_object(failures, failure)
    _raise_first(processes, failures)
    return result


def on_main(processes: Processes, step: Callable[[], T]) -> T:
    """Run ``step`` on the main process only; the others wait for its outcome and receive its result.

    A failure on the main process is raised there and as :class:`OtherProcessFailedError` elsewhere.
    ``step``'s result travels to the others pickled, so it should be small (a path, a summary).
    """
    if processes.world == 1:
        return step()
    import torch.distributed as dist

    box: list[object] = [None, None]  # [failure, result]
    if processes.main:
        try:
            box[1] = step()
        except Exception as exc:
            box[0] = _portable(exc)
    dist.broadcast_object_list(box, src=0)
    failure = box[0]
    _raise_first(processes, [failure if isinstance(failure, BaseException) else None])
    return cast(T, box[1])


def gather_rows(processes: Processes, part: np.ndarray) -> np.ndarray | None:
    """Every process's ``part`` (rows of one matrix) stacked in rank order on the main process, else None.

    Shapes:
        ``part``: (n_r, D), possibly (0, *) on a process without rows; result: (sum n_r, D).
    """
    if processes.world == 1:
        return part
    import torch.distributed as dist

    parts: list[np.ndarray | None] | None = [None] * processes.world if processes.main else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    kept = [p for p in parts if p is not None and len(p)]
    return np.concatenate(kept) if kept else part


def _raise_first(processes: Processes, failures: list[BaseException | None]) -> None:
    for rank, failure in enumerate(failures):
        if failure is not None:
            if processes.main:
                raise failure
            raise OtherProcessFailedError(rank, str(failure))


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (our errors define ``__reduce__``), else an error with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return SearchIndexError(f"{type(exc).__name__}: {exc}")
    return exc


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()
