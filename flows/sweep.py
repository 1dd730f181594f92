"""The Prefect flow `sweep`: a hyperparameter search whose trials are runs of the stage graph up to train, each
in its own process, then the winner's evaluate, export and promotion as tasks, exactly as in `training-pipeline`
(its model is the trial's model, not a retrain), a registry row naming the sweep and the trial, and the sweep's
table and pictures as artifacts."""

from __future__ import annotations

from typing import Any

from prefect import State, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.artifacts import png_data_markdown
from flows.pool import pool_launcher
from flows.training import TRANSIENT, artifacts_dir, expected_failure, graph_and_gate, quiet_expected_failures
from stages.model import check_before_work
from stages.pipeline import new_run_id
from sweeps.driver import SweepOutcome, local_launcher, new_invocation, run_sweep
from sweeps.report import PICTURES, format_table, table_rows, trial_line, trial_summary, write_pictures
from sweeps.state import SweepFiles, TrialRecord
from sweeps.tensorboard import write_sweep_tensorboard
from sweeps.tracking import track_sweep
from tapeline.config import PipelineConfig, validate_config
from tapeline.errors import TapelineError
from tapeline.store import open_store


@flow(name="sweep", description="hyperparameter search: trials are cached, resumable, pruned runs of the stage "
      "graph; the best trial goes through evaluate, export and promotion")
def sweep(config: PipelineConfig = PipelineConfig(), verify: bool = False  # noqa: B008 - frozen model
          ) -> dict[str, Any] | State:
    """Run the sweep of `config.sweep` on the base `config`, then the winner's gate; return the sweep summary
    (the `tapeline sweep --json` contract). With `verify`, the shared inputs and the winner's outputs are checked
    by SHA-256 before they are reused. An expected tapeline error fails the run with its one-line message."""
    quiet_expected_failures()
    try:
        return sweep_run(config, verify)
    except TRANSIENT:
        raise
    except TapelineError as exc:
        return expected_failure(exc)


def sweep_run(config: PipelineConfig, verify: bool = False) -> dict[str, Any]:
    """The flow's work: the trials, the winner's gate, the artifacts."""
    logger = get_run_logger()
    check_before_work(config)
    artifacts = artifacts_dir()
    invocation = new_invocation()

    def announce(record: TrialRecord) -> None:
        logger.info(trial_line(record, config.sweep.metric, invocation))

    outcome = run_sweep(config, artifacts, announce, invocation,
                        pool_launcher if config.sweep.deployment else local_launcher, verify)
    best = outcome.best
    parent = track_sweep(config, outcome.name, outcome.records, best)
    gate = None
    if best is not None:
        run_id = str(flow_run.id) if flow_run.id else new_run_id()
        winner = validate_config(best.config).model_copy(update={"tracking": config.tracking})
        gate = graph_and_gate(winner, artifacts, run_id, verify, outcome.name, best.number, parent)
    summary = {**_sweep_summary(outcome, gate, config.sweep.metric), "mlflow_run": parent}
    _publish_sweep(config, outcome)
    logger.info("sweep %s: %d trials; %s", outcome.name, len(outcome.records), summary["decision"])
    return summary


def _sweep_summary(outcome: SweepOutcome, gate: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    """The flow's return value and `tapeline sweep --json`: every trial, the best one, the gate's decision."""
    best = outcome.best
    return {
        "sweep": outcome.name, "location": outcome.location,
        "trials": [trial_summary(r, outcome.invocation) for r in outcome.records],
        "best": None if best is None else {"number": best.number, "params": best.params, "value": best.value,
                                           "config": outcome.best_config},
        "promoted": bool(gate and gate["promoted"]),
        "decision": gate["decision"] if gate else "no trial completed: nothing to evaluate or promote",
        "test_accuracy": gate["test_accuracy"] if gate else None,
        "model_path": gate["model_path"] if gate else None,
        "table": format_table(outcome.records, metric, outcome.invocation, best.number if best else None),
    }


def _publish_sweep(config: PipelineConfig, outcome: SweepOutcome) -> None:
    """The trials table and the pictures as Prefect artifacts (the PNGs also in the sweep's directory); the
    sweep's HParams and curves for TensorBoard in its `tensorboard/` folder."""
    create_table_artifact(table_rows(outcome.records, outcome.invocation), key="sweep-trials",
                          description=f"sweep {outcome.name}: every trial")
    store = open_store(artifacts_dir())
    files = SweepFiles(store, outcome.name)
    images = write_pictures(files, config, outcome.records)
    try:  # bookkeeping: a store that refuses these files must not fail a sweep whose trials are done
        write_sweep_tensorboard(files, store, config, outcome.records)
    except (OSError, TapelineError) as exc:
        get_run_logger().warning("the sweep's TensorBoard files were not written: %s", exc)
    if images:
        create_markdown_artifact("\n".join(png_data_markdown(title, images[name]) for title, name in PICTURES),
                                 key="sweep-pictures", description=f"sweep {outcome.name}: history and parameters")
