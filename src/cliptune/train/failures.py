"""Guards that turn the ways a run fails mid-way into something to act on.

* Ctrl-C / SIGTERM only set a flag (:func:`stop_on_signals`); the loop checkpoints after the current batch
  and raises :class:`~cliptune.train.errors.TrainingInterrupted`.
* Running out of accelerator memory becomes a :class:`~cliptune.train.errors.TrainingOutOfMemoryError`
  naming the step and the settings that lower memory (:func:`out_of_memory_hint`).
* A non-finite loss (or gradient norm) is skipped on the device; when the loop reads its losses (every
  ``train.log_every_steps``) each skipped step is counted and warned about up to ``train.max_bad_steps``,
  beyond which a :class:`~cliptune.train.errors.NonFiniteLossError` names the step, the first skipped
  step, how many were skipped and the last good checkpoint (:func:`count_bad_steps`).
* A diverged model (collapsed or exploded validation embeddings, non-finite validation values, trainable
  weights beyond :data:`MAX_WEIGHT`) stops the run with a :class:`~cliptune.train.errors.DivergenceError`
  before the epoch is logged or saved, so it never becomes the best model (:func:`checked_validation`).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from torch import nn

from cliptune.config import TrainConfig
from cliptune.evaluation.validation import DegenerateEmbeddingsError
from cliptune.rundir import RunDir
from cliptune.train.checkpoint import latest_checkpoint
from cliptune.train.errors import DivergenceError, NonFiniteLossError, TrainingOutOfMemoryError, likely_cause
from cliptune.train.state import LoopState
from cliptune.train.tasks.bundle import TaskBundle

__all__ = [
    "MAX_WEIGHT",
    "checked_validation",
    "BadStep",
    "count_bad_steps",
    "out_of_memory_hint",
    "stop_on_signals",
    "weight_problems",
]

MAX_WEIGHT = float(torch.finfo(torch.float16).max)
"""Largest magnitude a trainable weight may reach: 65504, the largest float16. A weight beyond it is inf
in a half-precision copy (how models are commonly served), and it is over 10^4 times the scale layers are
initialised at (PyTorch's defaults draw within 1/sqrt(fan_in) <= 1); only a run that diverged gets there."""

_Handler = Callable[[int, FrameType | None], object] | int | None


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM only set a flag; yields the function that reads it.

    The loop checks the flag between batches, so the checkpoint is taken at a clean point: every batch
    with one process (a free host read), at its loss reads (every ``train.log_every_steps``) with several,
    where the processes agree on it in one all-reduce. SIGTERM is
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


@dataclass(frozen=True)
class BadStep:
    """A step skipped for a non-finite loss or gradient norm, as found when the losses were read."""

    loss: float  # the step's loss (finite when only the gradient norm was not)
    step: int  # 1-based global step
    epoch: int  # 1-based
    batch: int  # 1-based, within the epoch


def count_bad_steps(
    state: LoopState, bad: Sequence[BadStep], cfg: TrainConfig, run_dir: Path, warn: Callable[[str], None]
) -> None:
    """Count the skipped steps found at a read; warn about each, or raise once past the allowance.

    The steps were already skipped on the device (weights and optimiser state untouched), so counting
    them late changes nothing but when the run stops: at the read after the step beyond the allowance.

    Args:
        state: The loop state (its ``bad_steps`` and ``first_bad_step`` grow; ``step`` is the read's step).
        bad: The skipped steps since the previous read, oldest first.
        cfg: The ``train`` section (``max_bad_steps``; lr, clipping and precision for the likely cause).
        run_dir: The run directory (its newest checkpoint is named).
        warn: Shows one line per skipped step within the allowance.

    Raises:
        NonFiniteLossError: More than ``max_bad_steps`` bad steps; it names the first step beyond the
            allowance, the run's first bad step and how many were skipped.
    """
    over: BadStep | None = None
    for b in bad:
        state.count_bad_step(b.step)
        if state.bad_steps > cfg.max_bad_steps:
            over = over or b
            continue
        what = f"loss ({b.loss})" if not math.isfinite(b.loss) else f"gradient norm (loss {b.loss})"
        allowed = f"{state.bad_steps}/{cfg.max_bad_steps} allowed"
        warn(
            f"non-finite {what} at step {b.step} (epoch {b.epoch}, batch {b.batch}): step skipped ({allowed})"
        )
    if over is not None:
        last = latest_checkpoint(RunDir(run_dir).checkpoints)
        cause = likely_cause(cfg.lr, cfg.grad_clip, cfg.precision)
        raise NonFiniteLossError(
            over.loss,
            over.step,
            over.epoch,
            over.batch,
            last,
            cfg.max_bad_steps,
            cause,
            bad_steps=state.bad_steps,
            first_bad_step=state.first_bad_step,
            found_at=state.step,
        )


def checked_validation(
    bundle: TaskBundle, model: nn.Module, cfg: TrainConfig, state: LoopState, epoch: int
) -> dict[str, float]:
    """Validate ``model`` and check it is healthy; the validation values, or a divergence error.

    One health check for every task and setting: the task's validation refuses unrankable embeddings
    (:func:`~cliptune.evaluation.validation.embedding_problems`), every validation value must be finite,
    and every trainable weight finite and within :data:`MAX_WEIGHT`. It runs before the epoch is logged,
    scored or saved, so a diverged epoch never becomes the best model.

    Args:
        bundle: The task (its ``validate``).
        model: The model being trained (as the loop holds it).
        cfg: The ``train`` section (lr, clipping and precision name the likely cause).
        state: The loop state (the step and the best epoch are named).
        epoch: The epoch validated; 0 is the untrained model.

    Returns:
        The validation values.

    Raises:
        DivergenceError: Naming the epoch, the step, what was found and the likely cause.
    """
    try:
        values = bundle.validate(model)
        problems = [f"validation {k} is {v}" for k, v in values.items() if not math.isfinite(v)]
    except DegenerateEmbeddingsError as exc:
        problems = [f"validation {p}" for p in exc.problems]
    problems += weight_problems(model)
    if problems:
        untrained = (
            "no training step ran, so the model or the validation data is broken, not the training settings"
        )
        cause = likely_cause(cfg.lr, cfg.grad_clip, cfg.precision) if epoch > 0 else untrained
        raise DivergenceError(epoch, state.step, problems, state.best_epoch if epoch > 0 else None, cause)
    return values


def weight_problems(model: nn.Module) -> list[str]:
    """The trainable weight of largest magnitude, as a sentence, when it is non-finite or beyond :data:`MAX_WEIGHT`."""
    worst, worst_name = 0.0, ""
    for name, param in model.named_parameters():
        if param.requires_grad and param.numel():
            biggest = float(param.detach().abs().max())
            if not biggest <= worst:  # NaN is never <=: it wins, and stays
                worst, worst_name = biggest, name
                if math.isnan(biggest):
                    break
    if worst <= MAX_WEIGHT:
        return []
    return [f"trainable weight {worst_name} reaches {worst:.3g} (bound {MAX_WEIGHT:g}, the largest float16)"]
