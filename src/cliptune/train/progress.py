"""A rich progress bar per epoch (step, loss, lr, ETA) and one summary line per epoch.

The bar advances every step but its loss changes only when the loop reads the losses (every
``train.log_every_steps``): reading a loss every step would make the host wait for the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

__all__ = ["EpochProgress"]

_console = Console(stderr=True, soft_wrap=True)


class EpochProgress:
    """Progress display for the main process; a no-op elsewhere or when disabled (quiet runs)."""

    def __init__(self, total: int, enabled: bool = True, summaries: bool = True) -> None:
        self.total, self.enabled, self.summaries = total, enabled, summaries
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._loss = "loss -"

    @contextmanager
    def epoch(self, epoch: int, epochs: int, start: int = 0) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        columns = (
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), *columns, console=_console, transient=True
        )
        self._task = self._progress.add_task("train", total=self.total, completed=start, info="")
        with self._progress:
            yield
        self._progress = None

    def advance(self, *, lr: float) -> None:
        """One step done, trained at ``lr``; the loss shown is the last one read."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, info=f"{self._loss} lr {lr:.2e}")

    def show_loss(self, loss: float | None) -> None:
        """The loss of the last step read (None: that step was skipped), shown from the next advance."""
        self._loss = f"loss {loss:.4f}" if loss is not None else "loss skipped"

    def warn(self, message: str) -> None:
        """A warning line (skipped steps, dropped rows), shown even in quiet runs: nothing is silent."""
        if self.summaries:
            _console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def summary(self, record: dict[str, Any]) -> None:
        if not self.summaries:
            return
        shown = {k: v for k, v in record.items() if _headline(k) and isinstance(v, (int, float))}
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()]
        _console.print("  ".join(parts), highlight=False)


def _headline(key: str) -> bool:
    """Keys worth a place on the one-line epoch summary (everything is in metrics.jsonl)."""
    if key in ("epoch", "lr") or key.endswith("/loss"):
        return True
    return key.endswith(("/recall@5", "/mrr", "/accuracy")) or "/triplet/accuracy" in key
