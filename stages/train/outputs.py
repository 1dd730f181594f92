"""What the train stage writes besides its checkpoints: the history, the best-epoch summary, a float32 copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.model import build_model
from stages.train.checkpoints import TrainingState
from stages.train.early_stopping import EarlyStopping
from tapeline.config import PipelineConfig, TrainConfig
from tapeline.results import DataResult

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds",
                   "images_per_second")


def epoch_log_line(row: dict[str, float]) -> str:
    """One line per epoch, for logs."""
    return (f"epoch {int(row['epoch'])}: loss {row['loss']:.4f} accuracy {row['accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_accuracy {row['val_accuracy']:.4f} "
            f"({row['seconds']:.1f} s, {row['images_per_second']:.0f} img/s)")


# ---------------------------------------------------------------- outputs

def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """history.parquet: one row per epoch with HISTORY_COLUMNS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {c: [row[c] for row in history] for c in HISTORY_COLUMNS}
    columns["epoch"] = pa.array(columns["epoch"], pa.int32())
    pq.write_table(pa.table(columns), path)


def best_epoch_summary(state: TrainingState, early_stopping: EarlyStopping, config: TrainConfig) -> dict[str, Any]:
    """Epochs run, stop and best epochs (1-based) and the best monitored value."""
    history = state.history
    best = history[early_stopping.best_epoch] if history else {}
    return {
        "epochs_run": len(history),
        "stopped_early": early_stopping.stopped_epoch > 0,
        "stopped_epoch": early_stopping.stopped_epoch + 1 if early_stopping.stopped_epoch > 0 else None,
        "best_epoch": early_stopping.best_epoch + 1,
        "monitor": config.monitor,
        "best_value": early_stopping.best,
        "restored_best_weights": early_stopping.weights_to_restore() is not None,
        "best_val_accuracy": best.get("val_accuracy", 0.0),
        "train_seconds": state.wall_seconds,
    }


def float32_copy(model: Any, config: PipelineConfig, data: DataResult) -> Any:
    """The trained model rebuilt under the float32 policy with the same weights (mixed-precision training keeps
    float32 variables): what is saved, evaluated and exported never carries a bf16/fp16 compute policy, which
    TFLite cannot convert and serving hardware may not have."""
    copy = build_model(config.model, data.input_spec)
    copy.set_weights(model.get_weights())
    return copy
