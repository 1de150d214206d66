"""Early stopping on any logged metric, with state that survives a resume."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cliptune.config import EarlyStoppingConfig

__all__ = ["EarlyStopping"]


@dataclass
class EarlyStopping:
    """Tracks the best value of one metric and says when to stop.

    The same object decides which checkpoint is "best" (it becomes ``model/``), so that the model kept is the
    one the stopping rule judged best. Its state is plain numbers, stored in the checkpoint.

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
        return cls(metric=cfg.metric, mode=cfg.mode, patience=cfg.patience, min_delta=cfg.min_delta)

    def _improves(self, value: float) -> bool:
        if math.isnan(self.best):
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float) -> bool:
        """Record one validation value; returns True when it is the new best."""
        epoch = self.epochs_seen
        self.epochs_seen += 1
        if math.isfinite(value) and self._improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        # Keras' convention: stop once `patience` validations in a row failed to improve.
        return self.bad_epochs >= max(1, self.patience)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
