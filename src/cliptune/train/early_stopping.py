"""Early stopping on any logged metric, with state that survives a resume."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cliptune.config import EarlyStoppingConfig
from cliptune.train.errors import UnknownMetricError

__all__ = ["EarlyStopping", "metric_value", "untrained_best_message"]


def metric_value(values: dict[str, Any], name: str) -> float:
    """The watched metric ``name`` (early stopping, the plateau schedule) in one epoch's logged values.

    Raises:
        UnknownMetricError: ``name`` is not among the logged values (they are listed).
    """
    if name not in values:
        raise UnknownMetricError(name, sorted(values))
    return float(values[name])


@dataclass
class EarlyStopping:
    """Tracks the best value of one metric and says when to stop.

    The same object decides which checkpoint is "best" (it becomes ``model/``), so that the model kept is the
    one the stopping rule judged best. The loop gives it the untrained model's value first (epoch 0), so
    the untrained model is a candidate like any epoch, ``best_epoch`` is a loop epoch (0 = untrained) and
    patience counts from that baseline: a run that never beats it stops after ``patience`` epochs and keeps
    the untrained model. Its state is plain numbers, stored in the checkpoint.

    Example:
        >>> es = EarlyStopping(metric="val/loss", mode="min", patience=2)
        >>> [es.update(v) for v in (1.0, 0.9, 0.95, 0.97)]
        [True, True, False, False]
        >>> es.should_stop, es.best_epoch
        (True, 1)
    """

    metric: str
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    best: float = math.nan
    best_epoch: int = -1
    bad_epochs: int = 0
    epochs_seen: int = 0

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig) -> EarlyStopping:
        """The stopper configured by ``train.early_stopping``."""
        return cls(metric=cfg.metric, mode=cfg.mode, patience=cfg.patience, min_delta=cfg.min_delta)

    def _improves(self, value: float) -> bool:
        if math.isnan(self.best):
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float) -> bool:
        """Record the next epoch's validation value (the first is epoch 0); True when it is the new best."""
        epoch = self.epochs_seen
        self.epochs_seen += 1
        if math.isfinite(value) and self._improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def skip(self) -> None:
        """Pass epoch 0 without judging it: a ``train/`` metric has no value before any training step.

        The untrained model is then no candidate, and patience counts from the first trained epoch.
        """
        self.epochs_seen += 1

    @property
    def should_stop(self) -> bool:
        # Keras' convention: stop once `patience` validations in a row failed to improve.
        return self.bad_epochs >= max(1, self.patience)

    @property
    def stop_reason(self) -> str | None:
        """Why training stops now (for ``summary.json``), or None while it goes on."""
        if not self.should_stop:
            return None
        return (
            f"early stopping: {self.metric} did not improve for {self.bad_epochs} epoch(s) "
            f"(best {self.best:.6g} at epoch {self.best_epoch})"
        )

    def state_dict(self) -> dict[str, Any]:
        """The plain numbers stored in a checkpoint's ``trainer.json``."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for key, value in state.items():
            setattr(self, key, value)


def untrained_best_message(stopper: EarlyStopping | None) -> str:
    """What the run says when no trained epoch beat the untrained model (epoch 0) it keeps in ``model/``."""
    by = f" on {stopper.metric} ({stopper.mode}, best {stopper.best:.6g})" if stopper is not None else ""
    return (
        f"no trained epoch beat the untrained model (epoch 0){by}: model/ holds the untrained weights; "
        "training did not help"
    )
