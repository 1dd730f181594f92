"""The Prefect flow `batch-scoring`: the production model (or a given version) scores a source, a shard per task,
on this machine's threads or on a Dask cluster (prefect-dask), cached per file by content; then the drift report as
an artifact and, when the batch drifted from the model's training data, the event `tapeline.drift.detected` that
the `training-pipeline/on-drift` deployment is triggered by. Task bodies only call `stages.score`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import State, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import events
from flows.artifacts import png_data_markdown
from flows.training import TRANSIENT, artifacts_dir, expected_failure, quiet_expected_failures
from stages.score.drift import batch_statistics, drift_figures, drift_report, training_baseline
from stages.score.inputs import ScoreInput, list_source, read_plan, shard_plan
from stages.score.model import ModelRef, model_ref, resolve
from stages.score.shards import (
    OUTPUTS,
    newly_scored,
    score_shard,
    scored_members,
    scores_stage,
    shard_groups,
    snapshot_fingerprint,
    stored_shards,
    to_score,
    write_snapshot,
)
from tapeline.config import PipelineConfig
from tapeline.errors import TapelineError
from tapeline.store import open_store


@task(name="score-shard", cache_policy=NO_CACHE, retries=1)
def shard_task(ref: ModelRef, root: str, members: list[ScoreInput], batch_size: int) -> dict[str, Any]:
    """Score one shard of new inputs and commit its rows (the store's manifest is the cache, not Prefect's)."""
    return score_shard(ref, root, members, batch_size)


@flow(name="score-shards", description="the shards of a scoring run, on the task runner the run chose")
def score_shards(ref: ModelRef, root: str, plan: str, batch_size: int) -> list[dict[str, Any]]:
    """Every shard of the plan file as a task, at once on the flow's task runner; their manifests. The plan is a
    file, not a parameter: a flow run's parameters go to the Prefect API, which refuses more than 512 KB (about
    5,000 inputs)."""
    futures = [shard_task.submit(ref, root, members, batch_size) for members in read_plan(Path(plan))]
    return [future.result() for future in futures]


def _shard_runner(config: PipelineConfig, dask_address: str | None) -> Any:
    """Threads of this process (the model loaded once, decoding and inference overlapping), or the Dask cluster at
    `dask_address` through prefect-dask."""
    address = dask_address or config.score.dask_address
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=config.score.workers)


@flow(name="batch-scoring", description="score a source with the production model (or a version), per file and "
      "by content; drift against the training data, and an event that triggers retraining")
def batch_scoring(source: str, model: str | None = None,
                  config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen model
                  dask_address: str | None = None) -> dict[str, Any] | State:
    """Score `source` (images:DIR, on disk or a bucket) with `model` (production by default; models/vNNNN,
    serving/N or an export directory); return the run summary (the `tapeline score --json` contract). An expected
    tapeline error fails the run with its one-line message."""
    quiet_expected_failures()
    try:
        return scoring_run(source, model, config, dask_address)
    except TRANSIENT:
        raise
    except TapelineError as exc:
        return expected_failure(exc)


def scoring_run(source: str, wanted: str | None, config: PipelineConfig, dask_address: str | None) -> dict[str, Any]:
    """The flow's work: list, score what is new, gather the output, drift, report."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = open_store(artifacts_dir())
    model = resolve(model_ref(wanted, store))
    version = model.ref.label
    listing = list_source(source, model.spec.class_names)
    fp = snapshot_fingerprint(model, listing)
    committed = store.manifest(scores_stage(version, OUTPUTS), fp)
    if committed is not None:
        logger.info("%s: nothing new since the last scoring with %s: %d rows", source, version, committed["images"])
        return summary(committed, store.location(scores_stage(version, OUTPUTS), fp), 0, started)
    done = scored_members(stored_shards(store, version))
    groups = shard_groups(to_score(listing, done), config.score.shard_size)
    logger.info("%s: %d inputs, %d new or changed for %s, in %d shard(s)", source, len(listing.inputs),
                sum(map(len, groups)), version, len(groups))
    scored = []
    if groups:
        with shard_plan(groups) as plan:
            scored = score_shards.with_options(task_runner=_shard_runner(config, dask_address))(
                model.ref, listing.root, str(plan), config.score.batch_size)
    done.update(newly_scored(groups, scored))
    stats = batch_statistics(store, version, scored, len(model.spec.class_names))
    baseline = training_baseline(store, model)
    figures = drift_figures(stats, baseline, model, config.score)
    report = drift_report(figures, stats, baseline, model, source)
    manifest, _cached, location = write_snapshot(store, model, listing, done, fp, source, figures, report)
    create_markdown_artifact(report["drift.md"].decode() + "\n" + png_data_markdown("The batch against the training "
                             "data", report["drift.png"]), key="drift-report", description=f"drift of {source}")
    if figures["detected"]:
        logger.warning("drift detected: %s", "; ".join(figures["reasons"]))
        events.drift_detected(figures, source, version, location, flow_run.id)
    return summary(manifest, location, sum(s["rows"] for s in scored), started)


def summary(manifest: dict[str, Any], location: str, scored: int, started: float) -> dict[str, Any]:
    """The flow's return value and `tapeline score --json`: where the output is, its rows, the rows this run
    computed, the skipped inputs, the drift figures."""
    output = location
    if manifest.get("root"):  # on a bucket, the files of a committed output lie in its attempt's directory
        output = f"{output}/{manifest['root']}"
    return {"output": output, "model_version": manifest["model_version"], "images": manifest["images"],
            "scored": scored, "skipped": manifest["skipped"], "drift": manifest["drift"],
            "seconds": round(time.perf_counter() - started, 3)}
