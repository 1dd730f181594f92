"""The sweep in TensorBoard: HParams summaries (the HParams plugin's table and parallel-coordinates views) and each
trial's per-epoch curves, under `<artifacts>/sweeps/<name>/tensorboard/`, so that `tensorboard --logdir
<artifacts>/sweeps/<name>/tensorboard` shows the search. Written as event files locally and put into the sweep's
directory through the store (TensorFlow's file system cannot write to s3://), whole after every sweep: a trial's
directory holds its parameters, its state, its metric per epoch and, when its train output is in the store, every
column of its history."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from stages.train.outputs import HISTORY_COLUMNS
from sweeps.state import SweepFiles, TrialRecord
from sweeps.trial import read_history
from tapeline.config import PipelineConfig, SweepConfig
from tapeline.store import Store

FOLDER = "tensorboard"
STATES = ("complete", "pruned", "failed", "running")
HISTORY_METRICS = tuple(c for c in HISTORY_COLUMNS if c not in ("epoch", "seconds", "images_per_second"))


def hparam_domains(records: list[TrialRecord]) -> dict[str, Any]:
    """Each searched key's HParams domain from the values the trials drew: numbers as an interval, the rest as a
    discrete set (TensorBoard's parallel-coordinates view draws either)."""
    from tensorboard.plugins.hparams import api as hp

    values: dict[str, list[Any]] = {}
    for record in records:
        for key, value in record.params.items():
            values.setdefault(key, []).append(value)
    domains = {}
    for key, seen in sorted(values.items()):
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in seen):
            domains[key] = hp.HParam(key, hp.RealInterval(float(min(seen)), float(max(seen))))
        else:
            domains[key] = hp.HParam(key, hp.Discrete(sorted({str(v) for v in seen})))
    return domains


def hparam_value(value: Any) -> Any:
    """A parameter's value as the HParams plugin takes it (numbers, strings, booleans)."""
    return value if isinstance(value, int | float | str | bool) else str(value)


def trial_history(store: Store, record: TrialRecord) -> list[dict[str, Any]]:
    """The rows of the trial's train history when its train output is in the store, else none."""
    if record.train_fingerprint is None or store.problem("train", record.train_fingerprint) is not None:
        return []
    return read_history(store.fetch("train", record.train_fingerprint)[1])


def write_trial(directory: Path, record: TrialRecord, sweep: SweepConfig, domains: dict[str, Any],
                history: list[dict[str, Any]]) -> None:
    """One trial's run directory: its HParams (parameters, trial id), its final metric and state, its curves."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    with tf.summary.create_file_writer(str(directory)).as_default():
        hp.hparams({domains[k]: hparam_value(v) for k, v in record.params.items() if k in domains},
                   trial_id=f"trial {record.number}")
        if record.value is not None:
            tf.summary.scalar(f"final/{sweep.metric}", record.value, step=max(record.intermediate, default=0))
        tf.summary.scalar("final/state", float(STATES.index(record.state)), step=0)
        for epoch, value in sorted(record.intermediate.items()):
            tf.summary.scalar(f"epoch/{sweep.metric}", value, step=epoch)
        for row in history:
            for key in HISTORY_METRICS:
                if row.get(key) is not None and key != sweep.metric:
                    tf.summary.scalar(f"epoch/{key}", row[key], step=int(row["epoch"]))


def write_sweep_tensorboard(files: SweepFiles, store: Store, config: PipelineConfig,
                            records: list[TrialRecord]) -> list[str]:
    """The sweep's HParams experiment and every trial's directory, written locally and put into the sweep's
    `tensorboard/` folder; the names written (relative to it)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    sweep = config.sweep
    if not records:
        return []
    domains = hparam_domains(records)
    metrics = [hp.Metric(f"final/{sweep.metric}", display_name=sweep.metric),
               hp.Metric("final/state", display_name="state (0 complete, 1 pruned, 2 failed, 3 running)")]
    with tempfile.TemporaryDirectory(prefix="tapeline-hparams-") as tmp:
        root = Path(tmp)
        with tf.summary.create_file_writer(str(root)).as_default():
            hp.hparams_config(hparams=list(domains.values()), metrics=metrics)
        for record in records:
            write_trial(root / f"trial-{record.number:04d}", record, sweep, domains, trial_history(store, record))
        files.remove(FOLDER)  # each sweep writes the whole picture again: old event files would double the curves
        written = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            files.write(path.read_bytes(), FOLDER, *relative.split("/"))
            written.append(relative)
    return written
