"""Early stopping with the exact semantics of Keras 3's `keras.callbacks.EarlyStopping`.

Framework-free so the train loop can checkpoint its state (Keras's callback cannot be resumed).
See ../shared/reference/early-stopping-semantics.md; tests compare it with Keras on value sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Weights = list[np.ndarray]


def _resolve_mode(monitor: str, mode: str) -> str:
    """`auto` is `min` for losses and `max` for accuracies, as Keras decides for these metrics."""
    if mode != "auto":
        return mode
    return "min" if monitor.removeprefix("val_") == "loss" else "max"


@dataclass
class EarlyStopping:
    """Keras-exact early stopping; `on_epoch_end` returns True when training should stop."""

    monitor: str = "val_loss"
    min_delta: float = 0.0
    patience: int = 0
    mode: str = "auto"
    baseline: float | None = None
    restore_best_weights: bool = False
    start_from_epoch: int = 0
    wait: int = 0
    stopped_epoch: int = 0
    best: float | None = None
    best_epoch: int = 0
    best_weights: Weights | None = field(default=None, repr=False)

    def on_train_begin(self) -> None:
        """Reset the state, as Keras does at the start of every `fit`."""
        self.wait, self.stopped_epoch, self.best, self.best_weights, self.best_epoch = 0, 0, None, None, 0

    def is_improvement(self, value: float, reference: float | None) -> bool:
        """`value` beats `reference` by more than |min_delta|; compared in float32, as Keras's ops do."""
        if reference is None:
            return True
        if _resolve_mode(self.monitor, self.mode) == "min":
            return bool(np.float32(value + abs(self.min_delta)) < np.float32(reference))
        return bool(np.float32(value - abs(self.min_delta)) > np.float32(reference))

    def on_epoch_end(self, epoch: int, logs: dict[str, float], get_weights: Callable[[], Weights]) -> bool:
        """Update the state after 0-based `epoch`; True means stop now."""
        current = logs.get(self.monitor)
        if current is None or epoch < self.start_from_epoch:
            return False
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = get_weights()
            self.best_epoch = epoch
        self.wait += 1
        if self.is_improvement(current, self.best):
            self.best = float(current)
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = get_weights()
            if self.baseline is None or self.is_improvement(current, self.baseline):
                self.wait = 0
            return False
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return True
        return False

    def weights_to_restore(self) -> Weights | None:
        """The best weights when restoring is on (Keras 3 restores whether or not training stopped early)."""
        return self.best_weights if self.restore_best_weights else None

    def state(self) -> dict[str, Any]:
        """The resumable state, without the weights (checkpointed as variables)."""
        return {"wait": self.wait, "stopped_epoch": self.stopped_epoch, "best": self.best,
                "best_epoch": self.best_epoch, "has_best_weights": self.best_weights is not None}

    def load_state(self, state: dict[str, Any], best_weights: Weights | None) -> None:
        """Restore what `state()` returned, with the checkpointed best weights."""
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_weights = best_weights if state["has_best_weights"] else None


@dataclass
class ReduceLROnPlateau:
    """Keras's `ReduceLROnPlateau` rule (no cooldown): after `patience` epochs without an improvement
    of more than `min_delta`, multiply the learning rate by `factor`, not below `min_lr`."""

    monitor: str = "val_loss"
    factor: float = 0.5
    patience: int = 2
    mode: str = "auto"
    min_delta: float = 1e-4
    min_lr: float = 0.0
    wait: int = 0
    best: float | None = None

    def on_epoch_end(self, logs: dict[str, float], learning_rate: float) -> float:
        """The learning rate for the next epoch."""
        current = logs.get(self.monitor)
        if current is None or self.patience == 0:
            return learning_rate
        minimize = _resolve_mode(self.monitor, self.mode) == "min"
        improved = self.best is None or (
            current < self.best - self.min_delta if minimize else current > self.best + self.min_delta
        )
        if improved:
            self.best, self.wait = float(current), 0
            return learning_rate
        self.wait += 1
        if self.wait < self.patience or learning_rate <= self.min_lr:
            return learning_rate
        self.wait = 0
        return max(learning_rate * self.factor, self.min_lr)

    def state(self) -> dict[str, Any]:
        """The resumable state."""
        return {"wait": self.wait, "best": self.best}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state()` returned."""
        self.wait, self.best = state["wait"], state["best"]
