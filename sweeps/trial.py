"""One trial, in its own process (`python -m sweeps.trial ARTIFACTS SWEEP NUMBER INVOCATION`): the trial's config
through the stage graph up to train, the pruner asked after each epoch, the outcome written to its record. A
process per trial keeps memory from growing across trials and lets several run at once."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from stages.floor import did_not_learn
from stages.graph import find_output_by_fingerprint, known_fingerprint, run_stage
from sweeps.state import SweepFiles, TrialClaim, TrialClaimedError, TrialRecord
from sweeps.study import prune_decision
from tapeline.cache import read_manifest
from tapeline.config import PipelineConfig, validate_config
from tapeline.errors import MissingUpstreamError, TapelineError, TrainingPaused
from tapeline.results import StopCheck, TrainResult
from tapeline.store import Store, open_store

log = logging.getLogger("tapeline.sweep")
UP_TO_TRAIN = ("data", "validate", "model", "train")
CLAIMED = 75  # the trial process's exit status when another live copy holds the trial (EX_TEMPFAIL)


def read_history(train_dir: Path) -> list[dict[str, float]]:
    """The train output's history.parquet as rows."""
    import pyarrow.parquet as pq

    return pq.read_table(train_dir / "history.parquet").to_pylist()


def _model_epoch(history: list[dict[str, float]], summary: dict[str, Any]) -> dict[str, float]:
    """The history row of the epoch whose weights the trained model holds (the best one when restored)."""
    if summary.get("restored_best_weights"):
        return history[int(summary["best_epoch"]) - 1]
    return history[-1]


def intermediate_values(history: list[dict[str, float]], metric: str) -> dict[int, float]:
    """Epoch -> the sweep's metric, as reported to the pruner."""
    return {int(row["epoch"]): float(row[metric]) for row in history}


def _validation_counts(store: Store, train: TrainResult) -> list[int]:
    """The class counts of the validation split the trial's model was trained against."""
    data_fp = read_manifest(train.path)["upstream"]["data"]
    data = find_output_by_fingerprint("data", data_fp, store.root)
    return list(read_manifest(data.path)["splits"]["validation"]["class_counts"])


def _failure_reason(config: PipelineConfig, row: dict[str, float], value: float, counts: list[int]) -> str | None:
    """Why a trained trial failed (its metric is not a number, or its model did not learn), None when complete."""
    if not math.isfinite(value):
        return f"{config.sweep.metric} is {value}"
    return did_not_learn(config, float(row["val_accuracy"]), float(row["val_loss"]), counts, "validation")


def completed(store: Store, record: TrialRecord, train: TrainResult, invocation: str) -> TrialRecord:
    """The record of a trial whose train output exists (trained now, or found in the cache): complete, or failed
    when its model did not learn (below the promotion floor on the validation split: never the best)."""
    config = validate_config(record.config)
    metric = config.sweep.metric
    history = read_history(train.path)
    summary = json.loads((train.path / "best.json").read_text())
    row = _model_epoch(history, summary)
    value = float(row[metric])
    trained = dict(record.trained)
    if not train.cached:
        trained[invocation] = trained.get(invocation, 0) + len(history) - record.epochs
    reason = _failure_reason(config, row, value, _validation_counts(store, train))
    return record.model_copy(update={
        "state": "complete" if reason is None else "failed", "value": value,
        "intermediate": intermediate_values(history, metric), "train_fingerprint": train.fingerprint,
        "cached": train.cached and not trained.get(invocation), "epochs": len(history), "trained": trained,
        "reason": reason,
    })


def _pruning_check(files: SweepFiles, config: PipelineConfig, invocation: str, holder: list[TrialRecord]
                  ) -> StopCheck:
    """The train stage's stop check: report the epoch's metric to the record, then ask the pruner. `holder`
    keeps the newest record for the caller."""
    sweep = config.sweep

    def should_stop(history: list[dict[str, float]]) -> bool:
        current = holder[-1]
        trained = {**current.trained, invocation: current.trained.get(invocation, 0) + 1}
        current = current.model_copy(update={"intermediate": intermediate_values(history, sweep.metric),
                                             "epochs": len(history), "trained": trained})
        pruned, attrs = prune_decision(sweep, files.trials(), current)
        current = current.model_copy(update={"system_attrs": attrs})
        if pruned:
            value = history[-1][sweep.metric]
            current = current.model_copy(update={"state": "pruned", "value": float(value),
                                                 "reason": f"pruned after epoch {len(history)} ({sweep.metric} "
                                                 f"{value:.4f})"})
        files.save(current)
        holder.append(current)
        return pruned

    return should_stop


def run_trial(store: Store, files: SweepFiles, number: int, invocation: str) -> TrialRecord:
    """Run trial `number` from its record: the stages up to train, pruned or complete, failed with its reason on a
    tapeline error (a non-finite loss, a config the model cannot build). Returns the final record (also saved)."""
    record = files.trial(number)
    if record is None:
        raise TapelineError(f"sweep {files.name} has no trial {number}")
    config = validate_config(record.config)
    with TrialClaim(files, number, config.sweep.lease_seconds):  # TrialClaimedError: another copy trains it
        record = files.trial(number) or record  # as the last holder left it
        if record.state != "running":
            return record  # finished by the copy that held it before
        return _train_trial(store, files, record, config, invocation)


def _train_trial(store: Store, files: SweepFiles, record: TrialRecord, config: PipelineConfig,
                 invocation: str) -> TrialRecord:
    """The claimed trial's stages up to train; its final record, saved."""
    started = time.perf_counter()
    holder = [record.model_copy(update={"attempts": record.attempts + 1})]
    files.save(holder[-1])
    try:
        results: dict[str, Any] = {}
        for name in UP_TO_TRAIN[:-1]:
            results[name] = run_stage(name, config, store.root, results)
        train = run_stage("train", config, store.root, results,
                          should_stop=_pruning_check(files, config, invocation, holder))
        final = completed(store, holder[-1], train, invocation)  # type: ignore[arg-type]
    except TrainingPaused:
        final = holder[-1]
    except TapelineError as exc:
        final = holder[-1].model_copy(update={"state": "failed", "reason": str(exc).splitlines()[0]})
    final = final.model_copy(update={"seconds": holder[0].seconds + time.perf_counter() - started})
    files.save(final)
    return final


def cached_outcome(store: Store, record: TrialRecord, invocation: str) -> TrialRecord | None:
    """The record of a trial whose config was already trained (by this sweep, another one, or `tapeline run`),
    without starting a process; None when it has to train."""
    config = validate_config(record.config)
    try:
        fp = known_fingerprint("train", config, store.root)
    except MissingUpstreamError:  # its data differs from the shared inputs' (data.* searched) and is not built yet
        return None
    if store.problem("train", fp) is not None:
        return None
    train = find_output_by_fingerprint("train", fp, store.root)
    return completed(store, record, train, invocation)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    """The trial process: exit 0 once the record holds the outcome."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trial %(name)s %(levelname)s %(message)s")
    artifacts, name, number, invocation = argv
    store = open_store(artifacts)
    try:
        record = run_trial(store, SweepFiles(store, name), int(number), invocation)
    except TrialClaimedError as exc:
        log.info("%s; leaving it to that process", exc)
        return CLAIMED
    log.info("trial %d %s", record.number, record.state)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
