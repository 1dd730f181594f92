"""The stages in order, run without any orchestrator: one stage (finding its upstream outputs by
fingerprint) or all of them; and the run record that goes into the registry."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from stages.cache import file_lock, manifest_problem
from stages.config import PipelineConfig
from stages.data import data_dir, data_fingerprint, data_sources, find_data, run_data
from stages.evaluate import champion_key, evaluate_fingerprint, find_evaluate, run_evaluate
from stages.export import export_fingerprint, promote, run_export
from stages.model import find_model, model_fingerprint, run_model
from stages.registry import append_run
from stages.results import StageResult
from stages.train import find_train, run_train, train_fingerprint

STAGES = ("data", "model", "train", "evaluate", "export")


def run_stage(name: str, config: PipelineConfig, artifacts: Path, verify: bool = False) -> StageResult:
    """Run one stage, reusing cached upstream outputs; MissingUpstreamError names the stage to run first."""
    if name == "data":
        return run_data(config, artifacts, verify=verify)
    data = find_data(config, artifacts, verify)
    if name == "model":
        return run_model(config, data, artifacts, verify=verify)
    model = find_model(config, data, artifacts, verify)
    if name == "train":
        return run_train(config, data, model, artifacts, verify=verify)
    train = find_train(config, data, model, artifacts, verify)
    if name == "evaluate":
        return run_evaluate(config, data, train, artifacts, verify=verify)
    evaluation = find_evaluate(config, data, train, artifacts, verify)
    export = run_export(config, data, train, evaluation, artifacts, verify=verify)
    promote(config, data, train, evaluation, export, artifacts)
    return export


def run_all(config: PipelineConfig, artifacts: Path, verify: bool = False) -> dict[str, Any]:
    """Every stage in order and the promotion gate, in this process (the Prefect flow does the same with tasks)."""
    data = run_data(config, artifacts, verify=verify)
    model = run_model(config, data, artifacts, verify=verify)
    train = run_train(config, data, model, artifacts, verify=verify)
    evaluation = run_evaluate(config, data, train, artifacts, verify=verify)
    export = run_export(config, data, train, evaluation, artifacts, verify=verify)
    promotion = promote(config, data, train, evaluation, export, artifacts)
    return {**dict(zip(STAGES, (data, model, train, evaluation, export), strict=True)), "promotion": promotion}


def output_path(stage: str, config: PipelineConfig, artifacts: Path, upstream: dict[str, Any]) -> Path:
    """Where `stage`'s output for this config and these upstream results lives (built or not)."""
    if stage == "data":
        return data_dir(artifacts, data_fingerprint(config, [s.identity() for s in data_sources(config.data)]))
    data = upstream["data"]
    if stage == "model":
        fp = model_fingerprint(config, data)
    elif stage == "train":
        fp = train_fingerprint(config, data, upstream["model"])
    elif stage == "evaluate":
        train = upstream["train"]
        fp = evaluate_fingerprint(config, data, train, champion_key(artifacts, train))
    else:
        fp = export_fingerprint(config, upstream["train"], upstream["evaluate"])
    return artifacts / stage / fp


def output_is_valid(stage: str, config: PipelineConfig, artifacts: Path, upstream: dict[str, Any]) -> bool:
    """Whether the stage's cached output exists and matches its manifest (sizes; cheap)."""
    return manifest_problem(output_path(stage, config, artifacts, upstream)) is None


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def registry_row(run_id: str, config: PipelineConfig, results: dict[str, Any]) -> dict[str, Any]:
    """One registry row from a completed run's stage results and promotion."""
    train, evaluation, promotion = results["train"], results["evaluate"], results["promotion"]
    return {
        "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_fingerprint": results["data"].fingerprint, "model_fingerprint": results["model"].fingerprint,
        "train_fingerprint": train.fingerprint, "source": config.data.source,
        "max_epochs": config.train.max_epochs, "batch_size": config.data.batch_size,
        "learning_rate": config.train.learning_rate, "epochs_run": train.epochs_run,
        "test_accuracy": evaluation.test_accuracy, "champion_accuracy": evaluation.champion_accuracy,
        "promoted": promotion.promoted, "decision": promotion.decision, "model_path": str(promotion.model_path),
    }


def record_run(artifacts: Path, row: dict[str, Any], timeout: float = 600) -> None:
    """Append a run to the registry, one writer at a time."""
    with file_lock(artifacts / ".registry.lock", timeout, "registry update"):
        append_run(artifacts, row)
