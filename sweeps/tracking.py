"""A sweep in MLflow (`tracking.mlflow_uri`): a parent run for the sweep (its sampler, pruner, metric and best
trial) and one child run per finished trial (MLflow's convention for searches: the `mlflow.parentRunId` tag), with
the trial's parameters, its metric per epoch as the pruner saw it, its state and reason. Logged when the driver
has finished; a trial already logged (the sweep run again) is not logged twice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sweeps.state import TrialRecord
from tapeline.config import PipelineConfig
from tapeline.tracking import open_tracker

PARENT, SWEEP, TRIAL = "tapeline.sweep_parent", "tapeline.sweep", "tapeline.trial"
RUN_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


def _trial_metrics(record: TrialRecord, metric: str) -> list[tuple[str, float, int]]:
    """A trial's metric per epoch (as the pruner saw it) and its final value."""
    rows = [(metric, float(v), int(epoch)) for epoch, v in sorted(record.intermediate.items())]
    return rows + ([("value", float(record.value), 0)] if record.value is not None else [])


def _trial_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters as MLflow parameters (values as text where they are not scalars)."""
    return {str(k): v if isinstance(v, str | int | float | bool) else str(v) for k, v in params.items()}


def _trial_tags(record: TrialRecord, sweep: str, parent: str) -> dict[str, str]:
    """The child run's tags: its parent, the sweep, the trial's number, state and reason, its train output."""
    tags = {"mlflow.parentRunId": parent, SWEEP: sweep, TRIAL: str(record.number), "tapeline.trial_state": record.state,
            "tapeline.cached": str(record.cached).lower()}
    if record.reason:
        tags["tapeline.trial_reason"] = record.reason[:5000]
    if record.train_fingerprint:
        tags["tapeline.train"] = record.train_fingerprint
    return tags


def track_sweep(config: PipelineConfig, sweep: str, records: list[TrialRecord], best: TrialRecord | None
                ) -> str | None:
    """Log the sweep as a parent run and each finished trial as its child; the parent's MLflow run id."""
    tracker = open_tracker(config.tracking)
    if tracker is None:
        return None
    parent = tracker.find_run({SWEEP: sweep, PARENT: "true"}) or tracker.start_run(
        f"sweep {sweep}", {SWEEP: sweep, PARENT: "true"})
    if parent is None:
        return None
    logged = {tags.get(TRIAL) for _, tags in tracker.find_runs({"mlflow.parentRunId": parent})}
    metric = config.sweep.metric
    for record in records:
        if record.state not in RUN_STATUS or str(record.number) in logged:
            continue
        child = tracker.start_run(f"{sweep} trial {record.number}", _trial_tags(record, sweep, parent))
        if child is None:
            break
        tracker.log(child, _trial_params(record.params), _trial_metrics(record, metric))
        tracker.finish(child, RUN_STATUS[record.state])
    finished = [r for r in records if r.state in RUN_STATUS]
    tracker.log(parent, {"sweep.sampler": config.sweep.sampler, "sweep.pruner": config.sweep.pruner,
                         "sweep.metric": metric, "sweep.trials": config.sweep.trials},
                [("best_value", float(best.value), 0)] if best is not None and best.value is not None else [],
                {"tapeline.best_trial": str(best.number) if best is not None else "none",
                 "tapeline.trials_finished": str(len(finished))})
    tracker.finish(parent)
    return parent if tracker.failed is None else None
