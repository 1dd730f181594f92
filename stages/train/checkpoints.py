"""Epoch checkpoints of model, optimizer, epoch, early-stopping state and RNG state: a killed run resumes and
ends where an uninterrupted one would."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.train.early_stopping import EarlyStopping, ReduceLROnPlateau
from tapeline.errors import TrainingError

log = logging.getLogger("tapeline.train")


def _seed_generator_states(model: Any) -> list[Any]:
    """The RNG state variables of the model's layers (dropout), which Keras does not checkpoint itself."""
    return [v.value for v in model.variables if "seed_generator" in v.path]


# ---------------------------------------------------------------- checkpoints

@dataclass
class TrainingState:
    """Everything a checkpoint restores besides model and optimizer variables."""

    epoch: int
    history: list[dict[str, float]]
    early_stopping: dict[str, Any] | None
    wall_seconds: float
    lr_schedule: dict[str, Any] | None = None


class Checkpointer:
    """Per-epoch checkpoints of model, optimizer, RNG state, early-stopping state and history."""

    def __init__(self, directory: Path, model: Any, optimizer: Any, keep: int) -> None:
        import tensorflow as tf

        self.state = tf.Variable("", dtype=tf.string, trainable=False)
        self.best_weights = [tf.Variable(w, trainable=False) for w in model.get_weights()]
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, state=self.state, best_weights=self.best_weights,
            rng=_seed_generator_states(model),
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=keep)

    def save(self, state: TrainingState, early_stopping: EarlyStopping) -> str:
        """Write a checkpoint for the epoch just finished."""
        if early_stopping.best_weights is not None:
            for variable, value in zip(self.best_weights, early_stopping.best_weights, strict=True):
                variable.assign(value)
        self.state.assign(json.dumps(state.__dict__))
        return self.manager.save(checkpoint_number=state.epoch)

    def restore_latest(self, early_stopping: EarlyStopping, schedule: ReduceLROnPlateau) -> TrainingState | None:
        """Restore the newest readable checkpoint into the model, optimizer, `early_stopping` and `schedule`.

        A damaged checkpoint is skipped with a warning naming it; the next older one is tried (each
        successful restore overwrites every variable, so a failed attempt leaves nothing behind).
        """
        import tensorflow as tf

        candidates = list(reversed(self.manager.checkpoints))
        for prefix in candidates:
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
                state = TrainingState(**json.loads(self.state.numpy().decode()))
            except (tf.errors.OpError, ValueError, AssertionError, TypeError, KeyError, IndexError, OSError) as exc:
                log.warning("checkpoint %s is unreadable (%s); trying an older one", prefix,
                            str(exc).splitlines()[0][:200])
                continue
            if state.early_stopping is not None:
                early_stopping.load_state(state.early_stopping, [v.numpy() for v in self.best_weights])
            if state.lr_schedule is not None:
                schedule.load_state(state.lr_schedule)
            log.info("resumed from %s after epoch %d", prefix, state.epoch)
            return state
        if candidates:
            raise TrainingError(
                f"no readable checkpoint in {self.manager.directory} ({len(candidates)} damaged); delete that "
                "directory to train from the start"
            )
        return None
