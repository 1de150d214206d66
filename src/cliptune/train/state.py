"""Where the loop is (:class:`LoopState`), the steps it has not read yet (:class:`UnreadSteps`) and what
it has logged (:class:`MetricsLog`).

Both are plain data with no knowledge of files beyond ``metrics.jsonl``: checkpoints save and restore the
state (:mod:`cliptune.train.checkpoint`), and the guards that turn failures into errors live in
:mod:`cliptune.train.failures`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cliptune.rundir import read_jsonl, write_text_atomic
from cliptune.train.errors import TrainingError

# TrainingError lived here before cliptune.train.errors; the alias keeps old imports working.
__all__ = ["LoopState", "MetricsLog", "TrainingError", "UnreadSteps"]

_SAVED_NUMBERS = ("epoch", "batch", "step", "bad_steps", "best_epoch", "best_step", "lrs", "epoch_count")
_SAVED_SINCE_NOSYNC = {"first_bad_step": None}  # added later: older checkpoints lack it


@dataclass
class LoopState:
    """Where the loop is; everything here but ``stop_reason`` is saved in checkpoints so a resume is exact.

    Attributes:
        epoch: Completed epochs.
        batch: Completed batches in the current epoch.
        step: Completed batches in the run (skipped non-finite steps count).
        bad_steps: Steps skipped for a non-finite loss (or gradient norm), counted when read.
        first_bad_step: The first of them (1-based global step), or None.
        best_epoch, best_step: Where the best model (``model/``) was taken; epoch 0 is the untrained model.
        lrs: The learning rate at the start, then after each epoch's scheduling.
        epoch_sums, epoch_count: Running sums of the current epoch's finite loss terms, and their count.
        timings: Seconds per phase (``train``, ``val``, ``checkpoint``).
        stop_reason: Why the loop ended (set at the end).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    bad_steps: int = 0
    first_bad_step: int | None = None
    best_epoch: int = 0
    best_step: int = 0
    lrs: list[float] = field(default_factory=list)
    epoch_sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    epoch_count: int = 0
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stop_reason: str | None = None

    @property
    def untrained_best(self) -> bool:
        """True when epochs were trained and none beat the untrained model, which ``model/`` then holds."""
        return self.best_epoch == 0 and self.epoch > 0

    def add_time(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to the time spent in ``phase``."""
        self.timings[phase] += seconds

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time the block takes to ``phase`` (not when it raises: the run ends then)."""
        tic = time.perf_counter()
        yield
        self.add_time(phase, time.perf_counter() - tic)

    def add_terms(self, values: dict[str, float]) -> None:
        """Add one step's loss terms to the running epoch sums."""
        for name, value in values.items():
            self.epoch_sums[name] += value
        self.epoch_count += 1

    def finish_step(self) -> None:
        """Count one step; its loss terms join the epoch means when read (:meth:`add_terms`).

        A skipped step still counts as a step and a batch, so a resume lands on the same batch.
        """
        self.batch, self.step = self.batch + 1, self.step + 1

    def count_bad_step(self, step: int) -> None:
        """Count a skipped step (1-based global ``step``); the first one is remembered."""
        self.bad_steps += 1
        self.first_bad_step = self.first_bad_step or step

    def finish_epoch(self) -> None:
        """Move to the start of the next epoch, with empty running sums."""
        self.epoch, self.batch, self.epoch_sums, self.epoch_count = self.epoch + 1, 0, defaultdict(float), 0

    def train_means(self) -> dict[str, float]:
        """The epoch's mean loss terms as ``train/<term>``: ``loss`` first, then by name.

        The fixed order makes a run resumed mid-epoch (sums restored from JSON) write its record exactly
        like an uninterrupted one.
        """
        names = sorted(self.epoch_sums, key=lambda name: (name != "loss", name))
        return {f"train/{name}": self.epoch_sums[name] / max(1, self.epoch_count) for name in names}

    def state_dict(self) -> dict[str, Any]:
        """The JSON-serialisable state stored in a checkpoint's ``trainer.json``."""
        saved: dict[str, Any] = {key: getattr(self, key) for key in (*_SAVED_NUMBERS, *_SAVED_SINCE_NOSYNC)}
        return {
            **saved,
            "lrs": list(self.lrs),
            "epoch_sums": dict(self.epoch_sums),
            "timings": dict(self.timings),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for key in _SAVED_NUMBERS:
            setattr(self, key, state[key])
        for key, default in _SAVED_SINCE_NOSYNC.items():
            setattr(self, key, state.get(key, default))
        self.epoch_sums = defaultdict(float, state["epoch_sums"])
        self.timings = defaultdict(float, state["timings"])


class UnreadSteps:
    """The steps trained since the last read: loss terms and skip flags still on the device.

    Reading a tensor on the host waits for the device (a sync); the loop instead keeps each step's terms
    here and reads them all at once every ``train.log_every_steps``, at the end of an epoch and before it
    stops. Keeping the per-step values (not only running sums) lets the read replay the steps in order,
    so epoch means, step records and skipped-step warnings are the numbers a per-step read gave.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._terms: list[torch.Tensor] = []
        self._skipped: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._skipped)

    def add(self, names: list[str], terms: list[torch.Tensor], skipped: torch.Tensor) -> None:
        """Keep one step's loss terms (scalars in ``names``' order, or one ``(len(names),)`` vector) and its
        skip flag (0-dim, 1.0: skipped); nothing is copied or stacked until :meth:`read`."""
        self.names = names
        self._terms.extend(terms)
        self._skipped.append(skipped)

    def read(self) -> list[tuple[dict[str, float], bool]]:
        """Each unread step's terms by name and whether it was skipped, oldest first; then none are unread."""
        if not self._skipped:
            return []
        if all(t.ndim == 0 for t in self._terms):  # one process: scalars, stacked in one op (dtypes promote)
            flat = torch.stack(self._terms).float()
        else:  # several: one all-reduced vector per step
            flat = torch.cat([t.float().reshape(-1) for t in self._terms])
        terms = flat.reshape(len(self._skipped), len(self.names)).tolist()
        skipped = torch.stack(self._skipped).tolist()
        self._terms, self._skipped = [], []
        return [
            (dict(zip(self.names, row, strict=True)), bool(s)) for row, s in zip(terms, skipped, strict=True)
        ]


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only).

    Args:
        path: The run's ``metrics.jsonl``.
        enabled: False on every process but the main one, so a multi-process run writes each line once.
        sink: Also called with every record (experiment trackers, see :mod:`cliptune.train.trackers`).
    """

    def __init__(
        self, path: Path, enabled: bool = True, sink: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.path, self.enabled, self.sink = path, enabled, sink

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and pass it to the sink."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()
        if self.sink is not None:
            self.sink(record)

    def truncate_after(self, step: int) -> int | None:
        """Drop records logged after ``step`` (they are replayed by a resumed run).

        Returns:
            The number of a torn last line (a process killed mid-append) that was dropped too, or None.

        Raises:
            DamagedFileError: A line before the last is not a JSON object (file and line named).
        """
        if not self.enabled or not self.path.exists():
            return None
        records, torn = read_jsonl(self.path, torn_tail=True)
        keep = [r for r in records if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in keep))
        return torn
