"""The Prefect flow `training-pipeline`: one task per stage, cached across runs by stage fingerprint.

Task bodies only call the stage function. A task's cache key is its stage's output path (stage +
fingerprint + artifacts directory); before a cache hit is trusted, the flow checks the output's
manifest and, when it is missing or damaged, runs the task with `refresh_cache` so it is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows.artifacts import progress_reporter, publish_artifacts
from stages.config import PipelineConfig
from stages.data import run_data
from stages.errors import DownloadError, TapelineError
from stages.evaluate import run_evaluate
from stages.export import promote, run_export
from stages.model import run_model
from stages.pipeline import STAGES, new_run_id, output_is_valid, output_path, record_run, registry_row
from stages.results import DataResult, EvaluateResult, ExportResult, ModelResult, Promotion, StageResult, TrainResult
from stages.train import run_train

TASK_INPUTS = {"data": (), "model": ("data",), "train": ("data", "model"), "evaluate": ("data", "train"),
               "export": ("data", "train", "evaluate")}
PARAMETER_NAMES = {"evaluate": "evaluation"}


def artifacts_dir() -> Path:
    """The artifacts directory: $TAPELINE_ARTIFACTS, else ./artifacts."""
    return Path(os.environ.get("TAPELINE_ARTIFACTS", "artifacts")).resolve()


def stage_cache_key(stage: str):
    """A Prefect cache_key_fn: the stage's output path, hashed (so two artifacts dirs never share a key)."""

    def key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
        upstream = {k: parameters[PARAMETER_NAMES.get(k, k)] for k in TASK_INPUTS[stage]}
        path = output_path(stage, parameters["config"], Path(parameters["artifacts"]), upstream)
        return f"tapeline-{stage}-{path.name}-{hashlib.sha256(str(path.parent).encode()).hexdigest()[:12]}"

    return key


@task(name="data", cache_key_fn=stage_cache_key("data"), persist_result=True)
def data_task(config: PipelineConfig, artifacts: Path) -> DataResult:
    """Data stage: source -> sharded TFRecords."""
    return run_data(config, artifacts)


@task(name="model", cache_key_fn=stage_cache_key("model"), persist_result=True)
def model_task(config: PipelineConfig, data: DataResult, artifacts: Path) -> ModelResult:
    """Model stage: the seeded, initialized CNN."""
    return run_model(config, data, artifacts)


@task(name="train", cache_key_fn=stage_cache_key("train"), persist_result=True)
def train_task(config: PipelineConfig, data: DataResult, model: ModelResult, artifacts: Path) -> TrainResult:
    """Train stage: the GradientTape loop with early stopping, resuming from checkpoints."""
    return run_train(config, data, model, artifacts, on_epoch_end=progress_reporter())


@task(name="evaluate", cache_key_fn=stage_cache_key("evaluate"), persist_result=True)
def evaluate_task(config: PipelineConfig, data: DataResult, train: TrainResult, artifacts: Path) -> EvaluateResult:
    """Evaluate stage: test-split metrics and pictures, with the champion's figures."""
    return run_evaluate(config, data, train, artifacts)


@task(name="export", cache_key_fn=stage_cache_key("export"), persist_result=True)
def export_task(config: PipelineConfig, data: DataResult, train: TrainResult, evaluation: EvaluateResult,
                artifacts: Path) -> ExportResult:
    """Export stage: SavedModel / .keras / TFLite, each reloaded and verified, and the model card."""
    return run_export(config, data, train, evaluation, artifacts)


def is_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry downloads and unexpected errors; bad input and bad config fail at once (a retry cannot fix them)."""
    try:
        state.result()
    except DownloadError:
        return True
    except TapelineError:
        return False
    except Exception:  # noqa: BLE001 - anything unforeseen may be transient
        return True
    return True


TASKS = {"data": data_task, "model": model_task, "train": train_task, "evaluate": evaluate_task,
         "export": export_task}


def configured_task(stage: str, config: PipelineConfig, refresh: bool) -> Any:
    """The stage's task with retries and timeouts from the config, refreshing its cache when asked."""
    section = {"data": config.data, "train": config.train, "evaluate": config.evaluate,
               "export": config.export}.get(stage)
    options: dict[str, Any] = {"refresh_cache": refresh}
    if section is not None:
        options["timeout_seconds"] = section.timeout_seconds
    if stage in ("data", "train"):
        retries = section.retries
        options["retries"] = retries
        options["retry_delay_seconds"] = exponential_backoff(backoff_factor=5)(retries) if retries else 0
        options["retry_condition_fn"] = is_transient
    return TASKS[stage].with_options(**options)


def run_stage_task(stage: str, config: PipelineConfig, artifacts: Path, upstream: dict[str, StageResult]
                   ) -> tuple[StageResult, dict[str, Any]]:
    """Run one stage's task; returns its result and its summary row (fingerprint, cached, seconds, path)."""
    refresh = not output_is_valid(stage, config, artifacts, upstream)
    arguments = {PARAMETER_NAMES.get(k, k): upstream[k] for k in TASK_INPUTS[stage]}
    started = time.perf_counter()
    state = configured_task(stage, config, refresh)(config=config, artifacts=artifacts, **arguments,
                                                     return_state=True)
    try:
        result: StageResult = state.result()
    except Exception as exc:
        get_run_logger().error("stage %s failed: %s", stage, exc)
        raise
    cached = state.name == "Cached" or result.cached
    return result, {"fingerprint": result.fingerprint, "cached": cached, "state": state.name,
                    "seconds": round(time.perf_counter() - started, 3), "path": str(result.path)}


def run_summary(run_id: str, stages: dict[str, dict[str, Any]], evaluation: EvaluateResult,
                promotion: Promotion) -> dict[str, Any]:
    """The flow's return value (and `tapeline run --json`)."""
    all_cached = all(s["cached"] for s in stages.values())
    return {
        "run_id": run_id, "stages": stages, "test_accuracy": evaluation.test_accuracy,
        "champion_accuracy": evaluation.champion_accuracy, "promoted": promotion.promoted,
        "decision": promotion.decision, "model_path": str(promotion.model_path), "all_cached": all_cached,
        "message": "nothing changed since the last run: every stage was a cache hit" if all_cached
        else f"ran {', '.join(n for n, s in stages.items() if not s['cached'])}",
    }


@flow(name="training-pipeline", description="data -> model -> train -> evaluate -> export, cached by fingerprint")
def training_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 - frozen model
    """Run every stage in order as Prefect tasks and return the run summary."""
    logger = get_run_logger()
    artifacts = artifacts_dir()
    run_id = str(flow_run.id) if flow_run.id else new_run_id()
    results: dict[str, StageResult] = {}
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        results[stage], stages[stage] = run_stage_task(stage, config, artifacts, results)
        logger.info("%s: %s (%s)", stage, stages[stage]["fingerprint"], "cached" if stages[stage]["cached"] else "ran")
    # The gate runs every time, outside the cached export task: production may have changed since.
    promotion = promote(config, results["data"], results["train"], results["evaluate"], results["export"], artifacts)
    summary = run_summary(run_id, stages, results["evaluate"], promotion)
    record_run(artifacts, registry_row(run_id, config, {**results, "promotion": promotion}),
               timeout=config.export.lock_timeout_seconds)
    publish_artifacts(summary, results["evaluate"].path)
    logger.info("%s; test accuracy %.4f; %s", summary["message"], summary["test_accuracy"], summary["decision"])
    return summary
