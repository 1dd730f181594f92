"""The Prefect flow `training-pipeline`: one task per stage of the graph, cached by stage fingerprint,
then the promotion step, uncached.

Tasks are made from `stages.graph.GRAPH`, so a new stage is a new task without touching this file.
Task bodies only call the stage runner. A task's cache key is its stage's output path (stage +
fingerprint + artifacts directory); before a cache hit is trusted, the flow checks the output's
manifest (SHA-256 with `verify`) and, when it is missing or damaged, runs the task with
`refresh_cache` so it is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from prefect import State, Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.tasks import exponential_backoff

from flows import events
from flows.artifacts import progress_reporter, publish_artifacts, publish_validation_report
from stages.graph import GRAPH, Artifacts, output_is_valid, output_location, run_stage
from stages.model import check_before_work
from stages.pipeline import new_run_id, promote_run, record_run, registry_row
from stages.tracking import track_run
from sweeps.state import SweepFiles, TrialTicket
from sweeps.trial import run_trial
from tapeline.config import PipelineConfig
from tapeline.errors import DownloadError, StoreConnectionError, TapelineError, ValidationError
from tapeline.interrupts import pending_interrupt
from tapeline.results import Promotion, StageResult, ValidateResult
from tapeline.store import is_remote, normalize_root, open_store


def artifacts_dir() -> Artifacts:
    """The artifacts store: $TAPELINE_ARTIFACTS (a directory or an object-store URL), else ./artifacts."""
    return normalize_root(os.environ.get("TAPELINE_ARTIFACTS", "artifacts"))


def _stage_cache_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """A Prefect cache_key_fn: the stage's output location, hashed (so two stores never share a key).

    None (no Prefect caching) on an object store: Prefect keeps cache records and results on the
    worker's own disk, valid on that machine only; there the store's manifests alone decide hits."""
    artifacts = parameters["artifacts"]
    if is_remote(artifacts):
        return None
    location = output_location(parameters["name"], parameters["config"], artifacts)
    parent, _, fp = location.rpartition("/")
    return f"tapeline-{parameters['name']}-{fp}-{hashlib.sha256(parent.encode()).hexdigest()[:12]}"


TRANSIENT = (DownloadError, StoreConnectionError)  # raised, so that Prefect retries them


class NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that ended Failed with `exc_info` even when no exception is being handled, which
    prints a bare `NoneType: None` under the message; this drops that empty part and keeps the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def quiet_expected_failures() -> None:
    """Install `NoEmptyTraceback` on Prefect's run loggers, once."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoEmptyTraceback) for f in logger.filters):
            logger.addFilter(NoEmptyTraceback())


def expected_failure(exc: TapelineError) -> State:
    """The Failed state of a task or flow that met an expected tapeline error (bad input, bad config, a failed
    gate, user code): Prefect records its one-line message and logs no traceback for it."""
    return Failed(message=str(exc), data=exc)


def _stage_or_failure(name: str, config: PipelineConfig, artifacts: Artifacts, upstream: Mapping[str, StageResult],
                     verify: bool) -> StageResult | State:
    """The stage's result, or the Failed state of an expected, non-transient tapeline error."""
    try:
        return run_stage(name, config, artifacts, upstream, verify=verify, on_epoch_end=progress_reporter())
    except TRANSIENT:
        raise
    except TapelineError as exc:
        return expected_failure(exc)
    except Exception as exc:
        interrupt = pending_interrupt()  # a signal that native code turned into another exception on its way out
        if interrupt is None:
            raise
        raise interrupt from exc


def _stage_body(name: str, config: PipelineConfig, artifacts: Artifacts, upstream: Mapping[str, StageResult],
               verify: bool = False) -> StageResult | State:
    """Run one stage of the graph (the body of every stage task)."""
    return _stage_or_failure(name, config, artifacts, upstream, verify)


def is_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry downloads and unexpected errors; bad input and bad config fail at once (a retry cannot fix them)."""
    try:
        state.result()
    except (DownloadError, StoreConnectionError):
        return True
    except TapelineError:
        return False
    except Exception:  # noqa: BLE001 - anything unforeseen may be transient
        return True
    return True


TASKS: dict[str, Task] = {
    stage.name: task(_stage_body, name=stage.name, cache_key_fn=_stage_cache_key, persist_result=True)
    for stage in GRAPH
}


@task(name="promotion", cache_policy=NO_CACHE)
def promotion_task(config: PipelineConfig, results: dict[str, StageResult], artifacts: Artifacts,
                   run_id: str) -> Promotion:
    """The promotion step: compare with production, switch when better, record the run (never cached)."""
    return promote_run(config, results, artifacts, run_id)


def _configured_task(name: str, config: PipelineConfig, refresh: bool) -> Task:
    """The stage's task with the retries and time limit of its config section, refreshing its cache when asked."""
    section = getattr(config, name, None)
    retries = getattr(section, "retries", 0)
    return TASKS[name].with_options(
        refresh_cache=refresh, timeout_seconds=getattr(section, "timeout_seconds", None), retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=5)(retries) if retries else 0,
        retry_condition_fn=is_transient,
    )


def _run_stage_task(name: str, config: PipelineConfig, artifacts: Artifacts, upstream: dict[str, StageResult],
                   verify: bool) -> tuple[StageResult, dict[str, Any]]:
    """Run one stage's task; returns its result and its summary row (fingerprint, cached, seconds, path)."""
    refresh = not output_is_valid(name, config, artifacts, verify)
    started = time.perf_counter()
    state = _configured_task(name, config, refresh)(name=name, config=config, artifacts=artifacts, upstream=upstream,
                                                   verify=verify, return_state=True)
    try:
        result: StageResult = state.result()
    except ValidationError as exc:
        _report_validation(exc.result)
        raise
    except TapelineError:
        raise  # its message is the task's state message already
    except Exception as exc:
        get_run_logger().error("stage %s failed: %s", name, exc)
        raise
    if isinstance(result, ValidateResult):
        _report_validation(result)
    cached = state.name == "Cached" or result.cached
    return result, {"fingerprint": result.fingerprint, "cached": cached, "state": state.name,
                    "seconds": round(time.perf_counter() - started, 3), "path": str(result.path)}


def _report_validation(result: ValidateResult | None) -> None:
    """Publish the validation report; when it failed, say so in the log and as an event."""
    if result is None:
        return
    publish_validation_report(result)
    if not result.passed:
        get_run_logger().error("data validation failed: %s; report %s", result.errors, result.location)
        events.validation_failed(result, flow_run.id)
    elif result.warnings:
        get_run_logger().warning("data validation warnings: %s", result.warnings)


def _run_summary(run_id: str, stages: dict[str, dict[str, Any]], promotion: Promotion) -> dict[str, Any]:
    """The flow's return value (and `tapeline run --json`)."""
    all_cached = all(s["cached"] for s in stages.values())
    return {
        "run_id": run_id, "stages": stages, "test_accuracy": promotion.test_accuracy,
        "champion_accuracy": promotion.champion_accuracy, "promoted": promotion.promoted,
        "decision": promotion.decision, "model_path": str(promotion.model_path), "all_cached": all_cached,
        "record": str(promotion.record), "message": "nothing changed since the last run: every stage was a cache hit"
        if all_cached else f"ran {', '.join(n for n, s in stages.items() if not s['cached'])}",
    }


@flow(name="training-pipeline", description="data -> validate -> model -> train -> evaluate -> export -> "
      "promotion, cached by fingerprint")
def training_pipeline(config: PipelineConfig = PipelineConfig(), verify: bool = False,  # noqa: B008 - frozen model
                      trial: TrialTicket | None = None) -> dict[str, Any] | State:
    """Run every stage of the graph as a Prefect task, then the promotion step; return the run summary.
    With `verify`, every cached output is checked by SHA-256 before it is reused. An expected tapeline error
    fails the run with its one-line message (a Failed state: no traceback in the logs). With `trial` (set by a
    sweep on a work pool), run that sweep trial instead: its stages up to train, pruned or complete, its outcome
    in its record in the sweep's store."""
    quiet_expected_failures()
    try:
        if trial is not None:
            return _sweep_trial(trial)
        return _pipeline_run(config, verify)
    except TRANSIENT:
        raise
    except TapelineError as exc:
        return expected_failure(exc)


def _sweep_trial(ticket: TrialTicket) -> dict[str, Any]:
    """A sweep's trial as this flow run: the trial's record says its config (the run's `config` shows it)."""
    store = open_store(ticket.artifacts)
    record = run_trial(store, SweepFiles(store, ticket.sweep), ticket.number, ticket.invocation)
    get_run_logger().info("sweep %s trial %d %s", ticket.sweep, record.number, record.state)
    return record.model_dump(mode="json")


def _pipeline_run(config: PipelineConfig, verify: bool) -> dict[str, Any]:
    """The flow's work: every stage's task in graph order, the promotion, the registry row, the artifacts."""
    check_before_work(config)  # on the worker: its copy of the user's code must import, before any work
    run_id = str(flow_run.id) if flow_run.id else new_run_id()
    return graph_and_gate(config, artifacts_dir(), run_id, verify)


def graph_and_gate(config: PipelineConfig, artifacts: Artifacts, run_id: str, verify: bool,
                   sweep: str | None = None, trial: int | None = None, sweep_run: str | None = None
                   ) -> dict[str, Any]:
    """Every stage's task in graph order, the promotion, the registry row (naming the sweep and trial of a
    sweep's winner), MLflow when tracking is on, the artifacts; returns the run summary."""
    logger = get_run_logger()
    results: dict[str, StageResult] = {}
    stages: dict[str, dict[str, Any]] = {}
    for stage in GRAPH:
        results[stage.name], stages[stage.name] = _run_stage_task(stage.name, config, artifacts, results, verify)
        logger.info("%s: %s (%s)", stage.name, stages[stage.name]["fingerprint"],
                    "cached" if stages[stage.name]["cached"] else "ran")
    promotion = promotion_task(config, results, artifacts, run_id)
    events.promotion_decided(promotion, flow_run.id)
    summary = _run_summary(run_id, stages, promotion)
    try:  # bookkeeping never fails a run that trained and exported a model
        record_run(artifacts, registry_row(run_id, config, {**results, "promotion": promotion}, sweep, trial),
                   timeout=config.export.lock_timeout_seconds)
    except (TapelineError, OSError) as exc:
        logger.warning("the run was not added to the registry: %s", exc)
    sweep_tags = {} if sweep is None else {"tapeline.sweep": sweep, "tapeline.trial": str(trial),
                                           **({"tapeline.sweep_run": sweep_run} if sweep_run else {})}
    summary["mlflow_run"] = track_run(config, results, {n: s["cached"] for n, s in stages.items()}, promotion, run_id,
                                      str(flow_run.id) if flow_run.id else None, sweep_tags)
    publish_artifacts(summary, results["evaluate"].path)
    logger.info("%s; test accuracy %.4f; %s", summary["message"], summary["test_accuracy"], summary["decision"])
    return summary
