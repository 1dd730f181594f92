"""The graph run without any orchestrator: typed `run_<stage>` functions, every stage plus the promotion
step in order (`run_all`), and the run record that goes into the registry."""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

from stages.graph import GRAPH, Artifacts, run_stage
from stages.promotion import promote
from tapeline.config import PipelineConfig
from tapeline.registry import record_row
from tapeline.results import (
    DataResult,
    EpochCallback,
    EvaluateResult,
    ExportResult,
    ModelResult,
    Promotion,
    StageResult,
    TrainResult,
)
from tapeline.store import open_store, with_lock


def run_data(config: PipelineConfig, artifacts: Artifacts, *, verify: bool = False) -> DataResult:
    """The data stage: source -> split -> sharded TFRecords (or the cached output)."""
    return cast(DataResult, run_stage("data", config, artifacts, {}, verify=verify))


def run_model(config: PipelineConfig, data: DataResult, artifacts: Artifacts, *, verify: bool = False) -> ModelResult:
    """The model stage: the seeded, initialized CNN."""
    return cast(ModelResult, run_stage("model", config, artifacts, {"data": data}, verify=verify))


def run_train(config: PipelineConfig, data: DataResult, model: ModelResult, artifacts: Artifacts, *,
              verify: bool = False, on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """The train stage: the GradientTape loop with early stopping, resuming a killed run."""
    upstream = {"data": data, "model": model}
    return cast(TrainResult, run_stage("train", config, artifacts, upstream, verify=verify, on_epoch_end=on_epoch_end))


def run_evaluate(config: PipelineConfig, data: DataResult, train: TrainResult, artifacts: Artifacts, *,
                 verify: bool = False) -> EvaluateResult:
    """The evaluate stage: test-split metrics and pictures."""
    return cast(EvaluateResult, run_stage("evaluate", config, artifacts, {"data": data, "train": train}, verify=verify))


def run_export(config: PipelineConfig, data: DataResult, train: TrainResult, evaluation: EvaluateResult,
               artifacts: Artifacts, *, verify: bool = False) -> ExportResult:
    """The export stage: SavedModel / .keras / TFLite, verified, and the model card."""
    upstream = {"data": data, "train": train, "evaluate": evaluation}
    return cast(ExportResult, run_stage("export", config, artifacts, upstream, verify=verify))


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def promote_run(config: PipelineConfig, results: dict[str, StageResult], artifacts: Artifacts,
                run_id: str) -> Promotion:
    """The promotion step on a run's stage results."""
    return promote(config, cast(DataResult, results["data"]), cast(TrainResult, results["train"]),
                   cast(EvaluateResult, results["evaluate"]), cast(ExportResult, results["export"]), artifacts, run_id)


def run_all(config: PipelineConfig, artifacts: Artifacts, verify: bool = False, run_id: str | None = None
            ) -> dict[str, Any]:
    """Every stage of the graph in order, then the promotion step, in this process (the Prefect flow
    does the same with tasks)."""
    results: dict[str, StageResult] = {}
    for stage in GRAPH:
        results[stage.name] = run_stage(stage.name, config, artifacts, results, verify=verify)
    return {**results, "promotion": promote_run(config, results, artifacts, run_id or new_run_id())}


def registry_row(run_id: str, config: PipelineConfig, results: dict[str, Any], sweep: str | None = None,
                 trial: int | None = None) -> dict[str, Any]:
    """One registry row from a completed run's stage results and promotion (and, for a sweep's winner, the sweep's
    name and the trial's number)."""
    train, evaluation, promotion = results["train"], results["evaluate"], results["promotion"]
    return {
        "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_fingerprint": results["data"].fingerprint, "model_fingerprint": results["model"].fingerprint,
        "train_fingerprint": train.fingerprint, "source": config.data.source,
        "max_epochs": config.train.max_epochs, "batch_size": config.data.batch_size,
        "learning_rate": config.train.learning_rate, "epochs_run": train.epochs_run,
        "test_accuracy": evaluation.test_accuracy, "champion_accuracy": promotion.champion_accuracy,
        "promoted": promotion.promoted, "decision": promotion.decision, "model_path": str(promotion.model_path),
        "sweep": sweep, "trial": trial,
    }


def record_run(artifacts: Artifacts, row: dict[str, Any], timeout: float = 600) -> None:
    """Add a run to the registry (one writer at a time on a directory; one object per run on a store)."""
    store = open_store(artifacts)
    with with_lock(store, ".registry.lock", timeout, "registry update"):
        record_row(store, row)
