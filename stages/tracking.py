"""What a training run logs to MLflow (`tracking.mlflow_uri`): an MLflow run per `tapeline run` with the config keys
the stages used as parameters, the epochs as metrics (`step` = epoch) and the test metrics, each stage's fingerprint
and whether it was cached as tags, the Prefect flow run, and the model card, evaluation pictures and validation
report as artifacts. A run whose train stage was a cache hit logs no epochs again: it names the MLflow run that
trained (`tapeline.trained_by`). The exported model becomes a version of the registered model, once per export,
and the alias `champion` moves to it when the promotion step promotes it."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stages.train.outputs import HISTORY_COLUMNS
from stages.validate import CLASS_PLOT, PIXEL_PLOT, REPORT, REPORT_MD
from tapeline.config import PipelineConfig, output_config
from tapeline.results import Promotion, StageResult
from tapeline.tracking import CHAMPION, Tracker, open_tracker

log = logging.getLogger("tapeline.tracking")
HISTORY = "history.parquet"
EPOCH_METRICS = tuple(c for c in HISTORY_COLUMNS if c != "epoch")
MODEL_FOLDER = "model"
TRAINED_HERE, TRAIN_KEY = "tapeline.trained_here", "tapeline.train"


def _run_params(config: PipelineConfig, stages: Mapping[str, StageResult]) -> dict[str, Any]:
    """The config keys the run's stages used (what their fingerprints cover), flat: `train.learning_rate`."""
    from stages.graph import STAGES

    params: dict[str, Any] = {}
    for name in stages:
        if name in STAGES:
            params.update(output_config(config, name, STAGES[name].covers))
    return dict(sorted(params.items()))


def _run_tags(stages: Mapping[str, StageResult], cached: Mapping[str, bool], run_id: str,
             flow_run: str | None) -> dict[str, str]:
    """Each stage's fingerprint and whether it was cached; the registry's run id and the Prefect flow run."""
    tags = {"tapeline.run_id": run_id, TRAIN_KEY: stages["train"].fingerprint}
    for name, result in stages.items():
        tags[f"tapeline.{name}.fingerprint"] = result.fingerprint
        tags[f"tapeline.{name}.cached"] = str(cached.get(name, result.cached)).lower()
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    return tags


def _epoch_metrics(history: Path) -> Iterator[tuple[str, float, int]]:
    """(metric, value, epoch) for every epoch of a train output's history."""
    import pyarrow.parquet as pq

    table = pq.read_table(history).to_pylist()
    for row in table:
        for key in EPOCH_METRICS:
            if row.get(key) is not None:
                yield key, float(row[key]), int(row["epoch"])


def _run_artifacts(stages: Mapping[str, StageResult]) -> dict[str, list[Path]]:
    """Artifact folder -> files: the model card, the evaluation pictures and metrics, the validation report."""
    export, evaluate = stages["export"].path, stages["evaluate"].path
    files = {"model_card": [export / "model_card.md", export / "model_card.json"],
             "evaluation": sorted(evaluate.glob("*.png")) + [evaluate / "metrics.json"]}
    if "validate" in stages:
        report = stages["validate"].path
        files["validation"] = [report / name for name in (REPORT_MD, REPORT, CLASS_PLOT, PIXEL_PLOT)]
    return files


def track_run(config: PipelineConfig, stages: Mapping[str, StageResult], cached: Mapping[str, bool],
              promotion: Promotion, run_id: str, flow_run: str | None = None,
              extra_tags: Mapping[str, str] | None = None) -> str | None:
    """Log one `tapeline run` to MLflow (nothing when tracking is off); its MLflow run id."""
    tracker = open_tracker(config.tracking)
    if tracker is None:
        return None
    tags = {**_run_tags(stages, cached, run_id, flow_run), **(extra_tags or {})}
    trained_here = not cached.get("train", stages["train"].cached)
    trainer = None if trained_here else tracker.find_run({TRAIN_KEY: stages["train"].fingerprint, TRAINED_HERE: "true"})
    tags[TRAINED_HERE] = str(trained_here).lower()
    if not trained_here:
        tags["tapeline.trained_by"] = trainer or "untracked"
        tags["mlflow.note.content"] = (f"Every epoch was a cache hit: the MLflow run {trainer} trained this model."
                                       if trainer else "Trained before MLflow tracking was on.")
    mlflow_run = tracker.start_run(f"tapeline {run_id[:8]}", tags)
    if mlflow_run is None:
        return None
    evaluate = stages["evaluate"]
    metrics = [("test_accuracy", promotion.test_accuracy, 0), ("test_loss", float(evaluate.test_loss), 0)]
    if trained_here:
        metrics += list(_epoch_metrics(stages["train"].path / HISTORY))
    tracker.log(mlflow_run, _run_params(config, stages), metrics,
                {"tapeline.promoted": str(promotion.promoted).lower(), "tapeline.decision": promotion.decision})
    for folder, files in _run_artifacts(stages).items():
        tracker.log_files(mlflow_run, files, folder)
    _register_model(tracker, config, stages, promotion, mlflow_run)
    tracker.finish(mlflow_run)
    if tracker.failed is None:
        log.info("MLflow run %s (%s, experiment %s)", mlflow_run, tracker.uri, config.tracking.experiment)
    return mlflow_run if tracker.failed is None else None


def _register_model(tracker: Tracker, config: PipelineConfig, stages: Mapping[str, StageResult],
                   promotion: Promotion, mlflow_run: str) -> str | None:
    """The export as a version of the registered model (once per export), `champion` moved to it when promoted."""
    name = config.tracking.registered_model
    export = stages["export"]
    marker = {"tapeline.export": export.fingerprint}
    version = tracker.model_version(name, marker)
    if version is None and tracker.failed is None:
        files = [export.path / "saved_model", export.path / "model.keras", export.path / "model_card.json"]
        tracker.log_files(mlflow_run, files, MODEL_FOLDER)
        version = tracker.register(name, mlflow_run, MODEL_FOLDER, marker)
    if version is not None and promotion.promoted:
        tracker.move_alias(name, CHAMPION, version)
    if version is not None:
        tracker.log(mlflow_run, tags={"tapeline.registered_version": f"{name}/{version}"})
    return version
