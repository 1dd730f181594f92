"""Warm start for scheduled retraining (`train.init_from=production`), on Fashion-MNIST, in one run.

The full data set is split as tapeline splits it (54,000 train, 6,000 validation, 10,000 test). The 6,000
validation images are the held-back 10 %:

1. The champion: the defaults trained on the other 54,000 training images only (written as IDX files and read
   through `$TAPELINE_DATA_DIR/fashion_mnist`, so the class names are the same), promoted to production.
2. All the training images, cold: the defaults from scratch.
3. All the training images, warm: `train.init_from=production` with a short schedule (4 epochs, peak rate 1e-3,
   no warm-up).

Both full runs watch the same 6,000 validation images, which the champion never saw. Reported: the champion's
accuracy on them (the target), the seconds from the start of training until cold and warm first reach it
(and their ratio), and the test accuracy of all three (Fashion-MNIST's own test images, seen by no run).

    .venv/bin/python benchmarks/warm_start.py [--json benchmarks/results/warm_start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.lib import machine

WARM = ["train.init_from=production", "train.decay_epochs=4", "train.warmup_epochs=0", "train.learning_rate=1e-3"]


def accuracy_curve(config, data, model, artifacts: Path, label: str):
    """Train; return the train result and [(seconds since training started, val_accuracy)] per epoch."""
    from stages.pipeline import run_train

    started = time.perf_counter()
    curve: list[tuple[float, float]] = []

    def record(row: dict, _max: int) -> None:
        curve.append((round(time.perf_counter() - started, 1), row["val_accuracy"]))
        print(f"{label} epoch {int(row['epoch'])}: val_accuracy {row['val_accuracy']:.4f} at {curve[-1][0]} s",
              flush=True)

    return run_train(config, data, model, artifacts, on_epoch_end=record), curve


def seconds_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """When the curve first reaches `target` (None: never)."""
    return next((seconds for seconds, accuracy in curve if accuracy >= target), None)


def idx_bytes(array) -> bytes:
    """An array in MNIST's IDX format (uint8)."""
    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_champion_source(data_path: Path, directory: Path) -> Path:
    """Fashion-MNIST less the held-back validation split, as the four IDX files under directory/fashion_mnist."""
    from stages.data.readers import load_split

    target = directory / "fashion_mnist"
    target.mkdir(parents=True)
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, labels = load_split(data_path, split)
        (target / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(images[..., 0]))
        (target / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from stages.data.readers import load_split
    from stages.evaluate import classification_metrics, model_logits
    from stages.pipeline import run_all, run_data, run_evaluate, run_model
    from tapeline.config import load_config

    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-warm-"))
    cold_config = load_config()
    data = run_data(cold_config, artifacts)
    os.environ["TAPELINE_DATA_DIR"] = str(write_champion_source(data.path, artifacts / "champion-source"))
    try:
        champion = run_all(load_config(), artifacts)
    finally:
        del os.environ["TAPELINE_DATA_DIR"]
    assert champion["promotion"].promoted and champion["data"].records["train"] + \
        champion["data"].records["validation"] == data.records["train"]
    images, labels = load_split(data.path, "validation", normalize=True)
    champion_logits = model_logits(champion["train"].path / "model.keras", images)
    target = classification_metrics(labels, champion_logits, data.input_spec.class_names)["test_accuracy"]
    print(f"champion: accuracy {target:.4f} on the held-back validation split", flush=True)

    results = {}
    for label, config in (("cold", cold_config), ("warm", load_config(None, WARM))):
        model = run_model(config, data, artifacts)
        trained, curve = accuracy_curve(config, data, model, artifacts, label)
        evaluation = run_evaluate(config, data, trained, artifacts)
        results[label] = {"overrides": [] if label == "cold" else WARM, "curve": curve,
                          "seconds_to_champion": seconds_to(curve, target), "epochs_run": trained.epochs_run,
                          "train_stage_seconds": round(trained.seconds, 1), "test_accuracy": evaluation.test_accuracy}
    cold, warm = results["cold"]["seconds_to_champion"], results["warm"]["seconds_to_champion"]
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "champion": {"records": champion["data"].records, "test_accuracy": champion["evaluate"].test_accuracy,
                     "best_val_accuracy_own_split": champion["train"].best_val_accuracy,
                     "val_accuracy_held_back": round(target, 4),
                     "train_stage_seconds": round(champion["train"].seconds, 1)},
        "results": results,
        "full_records": data.records,
        "warm_vs_cold_seconds_to_champion": round(warm / cold, 3) if warm and cold else None,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
