"""Guards that turn the ways a run fails mid-way into something to act on.

* Ctrl-C / SIGTERM only set a flag (:func:`stop_on_signals`); the loop checkpoints after the current batch
  and raises :class:`~cliptune.train.errors.TrainingInterrupted`.
* Running out of accelerator memory becomes a :class:`~cliptune.train.errors.TrainingOutOfMemoryError`
  naming the step and the settings that lower memory (:func:`out_of_memory_hint`).
* A non-finite loss is skipped with a warning up to ``train.max_bad_steps`` and then becomes a
  :class:`~cliptune.train.errors.NonFiniteLossError` naming the step and the last good checkpoint
  (:func:`count_bad_step`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch

from cliptune.config import TrainConfig
from cliptune.rundir import RunDir
from cliptune.train.checkpoint import latest_checkpoint
from cliptune.train.errors import NonFiniteLossError, TrainingOutOfMemoryError
from cliptune.train.state import LoopState

__all__ = ["stop_on_signals", "out_of_memory_hint", "count_bad_step"]

_Handler = Callable[[int, FrameType | None], object] | int | None


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM only set a flag; yields the function that reads it.

    The loop checks the flag between batches, so the checkpoint is taken at a clean point. SIGTERM is
    what a pre-empted machine, a cluster scheduler or a launcher stopping its workers sends. A second
    signal acts as usual (a stuck run can still be killed); the previous handlers come back on exit.
    Outside the main thread signals cannot be caught and the flag stays False.

    Yields:
        A function returning True once a signal arrived.
    """
    flag = {"stop": False}
    previous: dict[int, _Handler] = {}

    def _handler(signum: int, frame: FrameType | None) -> None:
        flag["stop"] = True
        signal.signal(signum, previous[signum])

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, _handler)
            previous[sig] = old if old is not None else signal.SIG_DFL
    except ValueError:  # not the main thread
        pass
    try:
        yield lambda: flag["stop"]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def out_of_memory_hint(cfg: TrainConfig, state: LoopState) -> Iterator[None]:
    """Re-raise ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) as a typed error.

    Args:
        cfg: The ``train`` section (its batch size and accumulation are named).
        state: The loop state, read when the error happens (the step it names).

    Raises:
        TrainingOutOfMemoryError: From the ``torch.OutOfMemoryError`` raised in the block.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        raise TrainingOutOfMemoryError(
            state.step, state.epoch + 1, detail, cfg.batch_size, cfg.grad_accum
        ) from exc


def count_bad_step(state: LoopState, loss: float, max_bad_steps: int, run_dir: Path) -> str:
    """Count a non-finite loss at the coming step; return the warning to show, or raise past the allowance.

    Args:
        state: The loop state (its ``bad_steps`` grows; its position is named).
        loss: The non-finite loss.
        max_bad_steps: ``train.max_bad_steps``.
        run_dir: The run directory (its newest checkpoint is named).

    Returns:
        A one-line warning for the skipped step.

    Raises:
        NonFiniteLossError: More than ``max_bad_steps`` bad steps.
    """
    state.bad_steps += 1
    step, epoch, batch = state.step + 1, state.epoch + 1, state.batch + 1
    if state.bad_steps > max_bad_steps:
        last = latest_checkpoint(RunDir(run_dir).checkpoints)
        raise NonFiniteLossError(loss, step, epoch, batch, last, max_bad_steps)
    where = f"step {step} (epoch {epoch}, batch {batch})"
    return f"non-finite loss ({loss}) at {where}: step skipped ({state.bad_steps}/{max_bad_steps} allowed)"
