"""Wall time from the start of training until validation accuracy first reaches 0.90 on Fashion-MNIST:
the tutorial's loop vs tapeline's train stage (defaults, and a faster preset), same machine, one run.

Each contender trains epoch by epoch and checks the validation split after every epoch (the
tutorial's loop checks its test set; here both use tapeline's validation split so nothing leaks).

    .venv/bin/python benchmarks/time_to_accuracy.py [--target 0.90] [--max-epochs 8] [--fast-set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import prepare_data, tutorial_contender  # noqa: E402

FAST_PRESET = ["data.batch_size=128", "train.learning_rate=0.002", "train.precision=mixed_bfloat16",
               "train.input_pipeline=memory"]


class Reached(Exception):
    """Raised from the epoch callback once the target is reached."""


def tutorial_time(train, validation, target: float, max_epochs: int) -> dict:
    """Seconds (and epochs) the tutorial loop needs to reach the target."""
    started = time.perf_counter()
    epoch, accuracy = tutorial_contender(train, validation)
    for number in range(1, max_epochs + 1):
        with redirect_stdout(io.StringIO()):
            epoch()
        value = accuracy()
        print(f"tutorial epoch {number}: val_accuracy {value:.4f} at {time.perf_counter() - started:.1f} s", flush=True)
        if value >= target:
            return {"seconds": round(time.perf_counter() - started, 1), "epochs": number, "val_accuracy": value}
    return {"seconds": None, "epochs": max_epochs, "val_accuracy": value}


def tapeline_time(source: str, overrides: list[str], target: float, max_epochs: int, finish: bool) -> dict:
    """Seconds (and epochs) tapeline's train stage needs to reach the target; with `finish`, it then trains
    on until early stopping and reports the test accuracy of the result."""
    from stages.config import load_config
    from stages.pipeline import run_data, run_evaluate, run_model, run_train

    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-tta-"))
    limit = [] if finish else [f"train.max_epochs={max_epochs}"]
    config = load_config(None, [f"data.source={source}", *limit, *overrides])
    data = run_data(config, artifacts)
    model = run_model(config, data, artifacts)
    seen: dict = {}
    started = time.perf_counter()

    def check(row: dict, _max: int) -> None:
        print(f"tapeline {overrides or 'defaults'} epoch {row['epoch']}: val_accuracy {row['val_accuracy']:.4f} "
              f"at {time.perf_counter() - started:.1f} s", flush=True)
        if "seconds" not in seen:
            seen.update(epochs=row["epoch"], val_accuracy=row["val_accuracy"])
        if row["val_accuracy"] >= target and "seconds" not in seen:
            seen["seconds"] = round(time.perf_counter() - started, 1)
            if not finish:
                raise Reached

    try:
        train = run_train(config, data, model, artifacts, on_epoch_end=check)
    except Reached:
        return seen
    evaluation = run_evaluate(config, data, train, artifacts)
    return {**seen, "epochs_run": train.epochs_run, "total_seconds": round(time.perf_counter() - started, 1),
            "test_accuracy": evaluation.test_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--fast-set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"overrides of the fast preset (default: {' '.join(FAST_PRESET)})")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import keras

    keras.utils.set_random_seed(0)
    config, data, train, validation = prepare_data(None, Path(tempfile.mkdtemp(prefix="tapeline-tta-data-")))
    fast = args.fast_set or FAST_PRESET
    results = {
        "tutorial": tutorial_time(train, validation, args.target, args.max_epochs),
        "tapeline_defaults": tapeline_time(config.data.source, [], args.target, args.max_epochs, False),
        "tapeline_fast": tapeline_time(config.data.source, fast, args.target, args.max_epochs, True),
    }
    base = results["tutorial"]["seconds"]
    for name in ("tapeline_defaults", "tapeline_fast"):
        mine = results[name]["seconds"]
        results[name]["ratio_vs_tutorial"] = round(mine / base, 3) if mine and base else None
    summary = {"date": time.strftime("%Y-%m-%d"), "target": args.target, "fast_preset": fast, "results": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
