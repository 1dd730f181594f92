"""What a sweep shows: one line per trial as it ends, the final table, the `--json` contract, and the pictures
(optimization history, each parameter against the metric) written as PNGs into the sweep's directory."""

from __future__ import annotations

import json
import math
from typing import Any

from stages.graph import Artifacts, fingerprints
from sweeps.space import planned_trials
from sweeps.state import SweepFiles, TrialRecord, sweep_name
from sweeps.study import direction, study_of
from tapeline.config import PipelineConfig, validate_config
from tapeline.store import Store, open_store

PICTURES = (("Optimization history", "optimization_history.png"), ("Parameters against the metric", "slices.png"))


def _param_text(params: dict[str, Any]) -> str:
    """`key=value` pairs, floats to four significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={json.dumps(v)}" for k, v in params.items())


def _value_text(value: float | None) -> str:
    """The metric's value, or a dash when there is none."""
    return "-" if value is None else f"{value:.4f}" if math.isfinite(value) else str(value)


def _came_from_store(record: TrialRecord, invocation: str) -> bool:
    """Whether this invocation took the trial's outcome from the store without training (a cache hit, or a trial
    an earlier invocation finished)."""
    return record.cached or (record.state in ("complete", "pruned") and record.epochs_trained_in(invocation) == 0)


def trial_line(record: TrialRecord, metric: str, invocation: str) -> str:
    """One trial as it ends: number, state, metric, epochs (trained now), cached, parameters, reason."""
    cached = " cached" if _came_from_store(record, invocation) else ""
    reason = f"  ({record.reason})" if record.state == "failed" and record.reason else ""
    return (f"trial {record.number:>3} {record.state:<8} {metric} {_value_text(record.value):>7}  epochs "
            f"{record.epochs:>3} (trained {record.epochs_trained_in(invocation)}){cached}  "
            f"{_param_text(record.params)}{reason}")


def trial_summary(record: TrialRecord, invocation: str) -> dict[str, Any]:
    """One trial in the `--json` contract."""
    value = record.value if record.value is not None and math.isfinite(record.value) else None
    return {"number": record.number, "params": record.params, "value": value, "state": record.state,
            "cached": _came_from_store(record, invocation), "epochs_trained": record.epochs_trained_in(invocation),
            "reason": record.reason}


def format_table(records: list[TrialRecord], metric: str, invocation: str, best: int | None) -> str:
    """Every trial as an aligned table, the best marked with `*`."""
    keys = list(records[0].params) if records else []
    header = ["", "trial", "state", metric, "epochs", "trained", "cached", *keys]
    rows = [["*" if r.number == best else "", str(r.number), r.state, _value_text(r.value), str(r.epochs),
             str(r.epochs_trained_in(invocation)), "yes" if _came_from_store(r, invocation) else "no",
             *(f"{r.params[k]:.4g}" if isinstance(r.params.get(k), float) else json.dumps(r.params.get(k))
               for k in keys)] for r in records]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def table_rows(records: list[TrialRecord], invocation: str) -> list[dict[str, Any]]:
    """The trials as flat rows (the Prefect table artifact): parameters as columns."""
    return [{**{k: v for k, v in trial_summary(r, invocation).items() if k != "params"},
             **{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.params.items()}} for r in records]


def pictures(config: PipelineConfig, records: list[TrialRecord]) -> dict[str, bytes]:
    """The optimization history and every parameter against the metric, as PNG bytes by file name (nothing until
    a trial completed)."""
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_slice

    if not any(r.state == "complete" for r in records):
        return {}
    study = study_of(config.sweep, records, len(records))
    target_name = f"{config.sweep.metric} ({direction(config.sweep)})"
    out: dict[str, bytes] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for (_title, name), plot in zip(PICTURES, (plot_optimization_history, plot_slice), strict=True):
            axes = plot(study, target_name=target_name)
            figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
            figure.set_size_inches(max(6.0, 3.5 * len(config.sweep.space)) if name == "slices.png" else 8.0, 4.5)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
            plt.close(figure)
            out[name] = buffer.getvalue()
    return out


def write_pictures(files: SweepFiles, config: PipelineConfig, records: list[TrialRecord]) -> dict[str, bytes]:
    """The pictures, written into the sweep's directory; returned by file name."""
    images = pictures(config, records)
    for name, data in images.items():
        files.write(data, name)
    return images


def _train_cached(store: Store, record: TrialRecord) -> bool:
    """Whether a valid train output for the trial's config is in the store (a rerun takes it, training nothing)."""
    if not record.config:
        return False
    fp = fingerprints(validate_config(record.config), store.root)["train"]
    return fp is not None and store.problem("train", fp) is None


def _plan_row(store: Store, record: TrialRecord) -> dict[str, Any]:
    """One recorded trial in `tapeline plan`: its state, whether its training is cached, what a rerun does."""
    cached = _train_cached(store, record)
    if record.state == "running" and not cached:
        next_step = f"resumes from epoch {record.epochs}" if record.epochs else "trains"
    else:
        next_step = "nothing (finished)" if record.state != "running" else "nothing (cached)"
    return {"number": record.number, "params": record.params, "state": record.state, "cached": cached,
            "epochs": record.epochs, "rerun": next_step}


def sweep_plan(config: PipelineConfig, artifacts: Artifacts) -> dict[str, Any]:
    """The `sweep` section of `tapeline plan`: the sweep's name and place, its recorded trials (which are cached)
    and how many are still to be proposed. Runs nothing, imports no TensorFlow."""
    store = open_store(artifacts)
    files = SweepFiles(store, sweep_name(config))
    records = files.trials()
    planned = planned_trials(config)
    return {"name": files.name, "location": files.location(), "planned": planned, "recorded": len(records),
            "to_propose": max(0, planned - len(records)), "trials": [_plan_row(store, r) for r in records]}


SHARED_STAGES = ("data", "validate")  # built once before any trial; each trial's other stages are its own


def sweep_would_run(stages: dict[str, dict[str, Any]], section: dict[str, Any]) -> list[str]:
    """What `tapeline sweep` would run: the shared stages not cached, the recorded trials that would train or
    resume, and the trials still to propose (the winner's evaluate, export and promotion run on every sweep)."""
    shared = [name for name in SHARED_STAGES if not stages[name]["cached"]]
    trials = [f"trial {t['number']}" for t in section["trials"] if not t["rerun"].startswith("nothing")]
    fresh = [f"{section['to_propose']} new trial(s)"] if section["to_propose"] else []
    return [*shared, *trials, *fresh]


def format_sweep_plan(section: dict[str, Any]) -> str:
    """The sweep section as text: one line per recorded trial."""
    lines = [f"sweep {section['name']}: {section['recorded']} of {section['planned']} trials recorded, "
             f"{section['to_propose']} to propose ({section['location']})"]
    lines += [f"  trial {t['number']:>3} {t['state']:<8} {'cached' if t['cached'] else 'not cached':<10} "
              f"rerun: {t['rerun']:<22} {_param_text(t['params'])}" for t in section["trials"]]
    return "\n".join(lines)
