"""Why training stopped, as types that carry the facts.

Every error here is a :class:`TrainingError` (a :class:`~cliptune.errors.CliptuneError`) whose message
states what happened in terms of files, counts and config keys, and whose attributes hold the same facts
for a caller to act on. Messages never name a command-line flag or command: how to launch, resume or
rename a run is for the CLI to say (``cliptune.cli``), which reads the attributes.

:class:`TrainingInterrupted` is the exception: it is a ``KeyboardInterrupt`` (Ctrl-C / SIGTERM stop the
program as usual) that also says where the resumable checkpoint is.
"""

from __future__ import annotations

import math
from pathlib import Path

from cliptune.errors import CliptuneError

__all__ = [
    "TrainingError",
    "MissingRunNameError",
    "RunExistsError",
    "LauncherMismatchError",
    "NothingToResumeError",
    "WorldSizeMismatchError",
    "EmptyEpochError",
    "UnknownMetricError",
    "NonFiniteLossError",
    "DivergenceError",
    "likely_cause",
    "TrainingOutOfMemoryError",
    "TrainingInterrupted",
]


class TrainingError(CliptuneError, RuntimeError):
    """Training cannot go on; the message says why and, as config keys, what to change."""


class MissingRunNameError(TrainingError):
    """A new run was asked for without a name (``name:`` in the config), so it has no run directory."""

    def __init__(self) -> None:
        super().__init__("the run has no name: set `name:` in the config")


class RunExistsError(TrainingError):
    """A new run would write into a run directory that already holds a run.

    Attributes:
        run_dir: The existing run directory (resume it, or choose another name).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        super().__init__(f"{run_dir} already holds a run")


class LauncherMismatchError(TrainingError):
    """The launcher started another number of processes than Accelerate sees (each would train alone).

    Attributes:
        launched: Processes the launcher started (``WORLD_SIZE``).
        seen: Processes Accelerate sees.
    """

    def __init__(self, launched: int, seen: int) -> None:
        self.launched, self.seen = launched, seen
        super().__init__(f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate sees {seen}")


class NothingToResumeError(TrainingError):
    """A resume was asked for but the run has no complete checkpoint.

    Attributes:
        checkpoints: The run's ``checkpoints/`` folder.
    """

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = checkpoints
        super().__init__(f"nothing to resume: no checkpoint in {checkpoints}")


class WorldSizeMismatchError(TrainingError):
    """A checkpoint written by a run with ``saved`` processes is resumed with ``now`` processes.

    The position inside the epoch would then mean other batches, so the resume would not be exact.

    Attributes:
        checkpoint: The checkpoint folder.
        saved: Processes of the run that wrote it (launch the resume the same way).
        now: Processes of this resume.
    """

    def __init__(self, checkpoint: Path, saved: int, now: int) -> None:
        self.checkpoint, self.saved, self.now = checkpoint, saved, now
        super().__init__(
            f"{checkpoint} was written by a run with {saved} process(es); this resume has {now}, so the "
            "remaining batches would not be the same"
        )


class EmptyEpochError(TrainingError):
    """The training split does not fill one global batch, so an epoch would have no step.

    Attributes:
        n_items: Items in the training split.
        batch_size: ``train.batch_size`` (per process).
        processes: Number of processes.
    """

    def __init__(self, n_items: int, batch_size: int, processes: int) -> None:
        self.n_items, self.batch_size, self.processes = n_items, batch_size, processes
        super().__init__(
            f"the training split has {n_items} items, fewer than one global batch "
            f"({batch_size} x {processes} processes): lower train.batch_size"
        )


class UnknownMetricError(TrainingError):
    """A setting watches a metric that the task does not log.

    Attributes:
        metric: The watched name.
        logged: The names that are logged.
    """

    def __init__(self, metric: str, logged: list[str]) -> None:
        self.metric, self.logged = metric, logged
        super().__init__(f"metric '{metric}' is not logged; logged: {', '.join(logged)}")


def likely_cause(lr: float, grad_clip: float | None, precision: str = "auto") -> str:
    """The usual cause of a diverging run and what to change, given the settings it ran with.

    With clipping already on, "enable train.grad_clip" would be no advice: the step size (or the data)
    is what is left. fp16 overflows above 65504, which bf16 and fp32 do not.
    """
    if grad_clip is None:
        advice = (
            f"likely cause: learning rate too high (train.lr={lr:g}) with unclipped gradients "
            "(train.grad_clip: null): lower train.lr or enable train.grad_clip"
        )
    else:
        advice = (
            f"likely cause: learning rate too high (train.lr={lr:g}); gradients are already clipped "
            f"(train.grad_clip={grad_clip:g}), so lower train.lr, or check the data for extreme or broken values"
        )
    if precision == "fp16":
        advice += "; train.precision=fp16 overflows above 65504: bf16 or fp32 does not"
    return advice


class NonFiniteLossError(TrainingError):
    """More non-finite losses (or gradient norms) than ``train.max_bad_steps`` allows.

    The loop reads losses every ``train.log_every_steps`` (not every step, which would wait for the
    device), so the error comes at that read; every non-finite step up to it was skipped on the device,
    and the weights are those of the last good step.

    Attributes:
        loss: The loss value at ``step`` (nan or inf; finite when the gradient norm was not).
        step: The 1-based step beyond the allowance (``epoch`` and ``batch`` in it, also 1-based).
        last_checkpoint: The newest checkpoint, or None.
        max_bad_steps: The allowance.
        cause: The likely cause and what to change (:func:`likely_cause` of the run's settings).
        bad_steps: Non-finite steps skipped by the read, ``step`` included.
        first_bad_step: The first of them (1-based global step).
        found_at: The step at which the losses were read.
    """

    def __init__(
        self,
        loss: float,
        step: int,
        epoch: int,
        batch: int,
        last_checkpoint: Path | None,
        max_bad_steps: int,
        cause: str,
        *,
        bad_steps: int = 1,
        first_bad_step: int | None = None,
        found_at: int | None = None,
    ) -> None:
        self.loss, self.step, self.epoch, self.batch = loss, step, epoch, batch
        self.last_checkpoint, self.max_bad_steps, self.cause = last_checkpoint, max_bad_steps, cause
        self.bad_steps = bad_steps
        self.first_bad_step = first_bad_step if first_bad_step is not None else step
        self.found_at = found_at if found_at is not None else step
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm (loss {loss})"
        plural = "s" if bad_steps != 1 else ""
        super().__init__(
            f"non-finite {what} at step {step} (epoch {epoch}, batch {batch}); read at step "
            f"{self.found_at}: {bad_steps} non-finite step{plural} skipped, the first at step "
            f"{self.first_bad_step}; last good checkpoint: {last_checkpoint or 'none'}. "
            f"{cause[0].upper()}{cause[1:]}; or allow skipping with train.max_bad_steps (now {max_bad_steps})"
        )


class DivergenceError(TrainingError):
    """Validation found the model diverged: embeddings collapsed or exploded, or weights out of range.

    Raised before the epoch is logged, scored or saved, so it never becomes the best model.

    Attributes:
        epoch: The epoch validated (0: the untrained model).
        step: Completed steps.
        problems: What the health check found, one sentence each (counts, values, thresholds).
        best_epoch: The epoch ``model/`` holds, the last healthy best (None: nothing was saved).
        cause: The likely cause and what to change.
    """

    def __init__(
        self, epoch: int, step: int, problems: list[str], best_epoch: int | None, cause: str
    ) -> None:
        self.epoch, self.step, self.problems = epoch, step, problems
        self.best_epoch, self.cause = best_epoch, cause
        kept = (
            "no model was saved"
            if best_epoch is None
            else f"model/ keeps epoch {best_epoch}, the last healthy best"
        )
        where = "the untrained model (epoch 0)" if epoch == 0 else f"epoch {epoch} (step {step})"
        super().__init__(
            f"training diverged at {where}: {'; '.join(problems)}. {kept}. {cause[0].upper()}{cause[1:]}"
        )


class TrainingOutOfMemoryError(TrainingError):
    """The accelerator ran out of memory; the message names the settings that lower it.

    Attributes:
        step: Completed steps when it happened.
        batch_size: ``train.batch_size`` now.
        grad_accum: ``train.grad_accum`` now.
    """

    def __init__(self, step: int, epoch: int, detail: str, batch_size: int, grad_accum: int) -> None:
        self.step, self.batch_size, self.grad_accum = step, batch_size, grad_accum
        super().__init__(
            f"out of accelerator memory after step {step} (epoch {epoch}): {detail}. Lower "
            f"train.batch_size (now {batch_size}) and raise train.grad_accum (now {grad_accum}) to "
            "keep the effective batch, or set train.gradient_checkpointing: true"
        )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a resumable checkpoint was written.

    A ``KeyboardInterrupt``, so code that lets Ctrl-C through still does; not a :class:`TrainingError`.

    Attributes:
        step: Completed steps (the checkpoint's position).
        run_dir: The run directory to resume.
        checkpoint: The checkpoint folder just written.
    """

    def __init__(self, step: int, run_dir: Path, checkpoint: Path) -> None:
        self.step, self.run_dir, self.checkpoint = step, run_dir, checkpoint
        super().__init__(f"interrupted at step {step}: checkpoint saved in {checkpoint}; resume is exact")
