"""Time to accuracy on Fashion-MNIST, every contender in one run on the same machine: seconds from the start of
training until validation accuracy first reaches 0.90 and 0.92, the final test accuracy, and for tapeline the
train stage's wall time. Contenders: the tutorial's loop as written, Keras `fit` on the tutorial's model,
tapeline with the `tutorial` preset (the seed's settings), tapeline `v1` (the defaults before the speed work,
kept as a preset so this comparison can be rerun), tapeline's defaults and the `fast` preset.

Each contender checks the validation split after every epoch (tapeline's split for all, so nothing leaks).
The tutorial loop and Keras fit train --max-epochs epochs; tapeline contenders train to their own end (early
stopping, or the end of the cosine schedule), capped at --max-epochs for the constant-rate `tutorial` preset.

    .venv/bin/python benchmarks/time_to_accuracy.py [--max-epochs 15] [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine  # noqa: E402
from benchmarks.train_throughput import fit_contender, prepare_data, tutorial_contender  # noqa: E402

TARGETS = (0.90, 0.92)
TAPELINE_CONTENDERS = {
    "tapeline_tutorial_preset": ["preset=tutorial"],
    "tapeline_v1": ["preset=v1"],
    "tapeline_defaults": [],
    "tapeline_fast_preset": ["preset=fast"],
}


class Crossings:
    """Seconds since `started` at which validation accuracy first reached each target."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float | None] = {f"{t:.2f}": None for t in TARGETS}
        self.epochs: dict[str, int | None] = {f"{t:.2f}": None for t in TARGETS}

    def record(self, epoch: int, accuracy: float, label: str) -> None:
        """Note the epoch's accuracy (and print it)."""
        now = round(time.perf_counter() - self.started, 1)
        print(f"{label} epoch {epoch}: val_accuracy {accuracy:.4f} at {now:.1f} s", flush=True)
        for target in TARGETS:
            key = f"{target:.2f}"
            if accuracy >= target and self.seconds[key] is None:
                self.seconds[key], self.epochs[key] = now, epoch

    def summary(self) -> dict:
        """Seconds and epochs to each target."""
        return {"seconds_to": self.seconds, "epochs_to": self.epochs}


def loop_contender(name: str, make: Callable, train, validation, test, max_epochs: int,
                   stop_at: float | None = None) -> dict:
    """A contender with an `epoch()` function (the tutorial loop, Keras fit): `max_epochs` epochs, or until
    validation accuracy reaches `stop_at`."""
    epoch, accuracy = make(train, validation)
    crossings = Crossings()
    rates = []
    for number in range(1, max_epochs + 1):
        started = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            epoch()
        rates.append(len(train[1]) / (time.perf_counter() - started))
        reached = accuracy()
        crossings.record(number, reached, name)
        if stop_at is not None and reached >= stop_at:
            break
    total = round(time.perf_counter() - crossings.started, 1)
    return {**crossings.summary(), "epochs_run": number, "train_seconds": total,
            "median_images_per_second": round(statistics.median(rates), 1), "test_accuracy": round(accuracy(test), 4)}


def tapeline_contender(name: str, source: str, overrides: list[str], max_epochs: int) -> dict:
    """tapeline's data, model, train and evaluate stages with `overrides`; the train stage is timed."""
    from stages.config import load_config
    from stages.pipeline import run_data, run_evaluate, run_model, run_train

    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-tta-"))
    cap = [f"train.max_epochs={max_epochs}"] if "preset=tutorial" in overrides else []
    config = load_config(None, [f"data.source={source}", *overrides, *cap])
    data = run_data(config, artifacts)
    model = run_model(config, data, artifacts)
    crossings = Crossings()
    rates: list[float] = []

    def on_epoch_end(row: dict, _max_epochs: int) -> None:
        rates.append(row["images_per_second"])
        crossings.record(int(row["epoch"]), row["val_accuracy"], name)

    train = run_train(config, data, model, artifacts, on_epoch_end=on_epoch_end)
    evaluation = run_evaluate(config, data, train, artifacts)
    return {**crossings.summary(), "epochs_run": train.epochs_run, "best_epoch": train.best_epoch,
            "train_seconds": round(train.seconds, 1), "median_images_per_second": round(statistics.median(rates), 1),
            "test_accuracy": evaluation.test_accuracy}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return round(a / b, 3) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--only", action="append", help="run only these contenders")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import keras

    from stages.data import load_split

    keras.utils.set_random_seed(0)
    config, data, train, validation = prepare_data(None, Path(tempfile.mkdtemp(prefix="tapeline-tta-data-")))
    test = load_split(data.path, "test", normalize=True)
    loops = {"tutorial_loop": tutorial_contender, "keras_fit": fit_contender}
    wanted = args.only or [*loops, *TAPELINE_CONTENDERS]
    results: dict[str, dict] = {}
    for name in wanted:
        if name in loops:
            results[name] = loop_contender(name, loops[name], train, validation, test, args.max_epochs)
        else:
            results[name] = tapeline_contender(name, config.data.source, TAPELINE_CONTENDERS[name], args.max_epochs)
        print(name, json.dumps(results[name]), flush=True)
    tutorial, v1, defaults = (results.get(n, {}) for n in ("tutorial_loop", "tapeline_v1", "tapeline_defaults"))
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "max_epochs": args.max_epochs, "results": results,
        "defaults_seconds_to_0.90_vs_tutorial_loop": ratio(defaults.get("seconds_to", {}).get("0.90"),
                                                           tutorial.get("seconds_to", {}).get("0.90")),
        "defaults_train_stage_vs_v1": ratio(defaults.get("train_seconds"), v1.get("train_seconds")),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
