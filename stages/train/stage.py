"""The train stage: build the trainer, fit with early stopping, write the outputs (`build_train_dir`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stages.train.environment import make_strategy, precision_decision, precision_policy
from stages.train.loop import build_trainer, fit, make_early_stopping
from stages.train.outputs import best_epoch_summary, float32_copy, write_history
from stages.train.warm_start import describe
from tapeline.cache import package_versions
from tapeline.cluster import current_cluster
from tapeline.hardware import onednn_decision
from tapeline.results import StageInputs, TrainResult

log = logging.getLogger("tapeline.train")


def build_train_dir(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Train (resuming from checkpoints left in `staging`) and save the model, history and summary."""
    import keras
    import tensorflow as tf

    config, data, model_result, on_epoch_end = inputs.config, inputs.data, inputs.model, inputs.on_epoch_end
    cluster = current_cluster()
    strategy = make_strategy(config.train, cluster)  # first: a cluster must be joined before any other op
    keras.utils.set_random_seed(config.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    decision = precision_decision(config.train.precision)
    precision = decision["resolved"]
    log.info("training on %s; precision %s (%s)", decision["device"], precision, decision["reason"])
    onednn = onednn_decision()
    log.info("oneDNN kernels %s", onednn["reason"])
    init = inputs.external
    log.info("training %s", describe(init, config.train.init_from))
    with precision_policy(precision):
        trainer = build_trainer(config, data, model_result, staging / "checkpoints", precision, strategy, cluster,
                                None if init is None else (init, inputs.store))
        early_stopping = make_early_stopping(config.train)
        state = fit(trainer, early_stopping, staging, on_epoch_end, inputs.should_stop)
        trainer.release_iterators()
    float32_copy(trainer.model, config, data).save(staging / "model.keras")
    write_history(staging / "history.parquet", state.history)
    summary = best_epoch_summary(state, early_stopping, config.train)
    (staging / "best.json").write_text(json.dumps(summary, indent=2))
    log.info("trained %d epochs (%s); best epoch %d, val_accuracy %.4f", summary["epochs_run"],
             f"stopped early at {summary['stopped_epoch']}" if summary["stopped_early"] else "no early stop",
             summary["best_epoch"], summary["best_val_accuracy"])
    return {
        "stage": "train", "config": config.train.model_dump(mode="json"),
        "batching": {"batch_size": config.data.batch_size, "shuffle_buffer": config.data.shuffle_buffer},
        "workers": cluster.size if cluster is not None else 1, "precision": precision,
        "hardware": {"precision": decision, "onednn": onednn, "input_pipeline": config.train.input_pipeline},
        "input_pipeline": "memory" if trainer.train_in_memory is not None else "stream",
        "seed": config.seed, "upstream": {"data": data.fingerprint, "model": model_result.fingerprint},
        "init_from": {"requested": config.train.init_from, "resolved": init}, "summary": summary,
        "versions": package_versions(),
    }


def train_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> TrainResult:
    """A TrainResult from a train manifest."""
    summary = manifest["summary"]
    return TrainResult(
        stage="train", fingerprint=manifest["fingerprint"], path=path, cached=cached, seconds=seconds,
        epochs_run=summary["epochs_run"], best_epoch=summary["best_epoch"], stopped_early=summary["stopped_early"],
        best_val_accuracy=summary["best_val_accuracy"], train_seconds=summary["train_seconds"],
    )
