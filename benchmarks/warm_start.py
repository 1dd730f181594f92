"""Warm start for scheduled retraining (`train.init_from=production`), on Fashion-MNIST, in one run.

1. The champion: the defaults trained on the training images less a held-back 10 % (`data.limit=54000`),
   promoted to production.
2. All the training images, cold: the defaults from scratch.
3. All the training images, warm: `train.init_from=production` with a short schedule (4 epochs, peak rate 1e-3,
   no warm-up).

Reported: the champion's validation accuracy on the full run's validation split (the target), the seconds from
the start of training until each of cold and warm first reaches it (and their ratio), and every test accuracy.
The full run's validation split is a random 10 % of all 60,000 images, so about 81 % of it was in the
champion's training data: the target and the warm run's validation figures are optimistic; the test split
(Fashion-MNIST's own 10,000 test images) was seen by no run, so the test accuracies are the fair comparison.

    .venv/bin/python benchmarks/warm_start.py [--json benchmarks/results/warm_start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine  # noqa: E402

HELD_BACK_LIMIT = 54_000
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from stages.config import load_config
    from stages.data import load_split
    from stages.evaluate import classification_metrics, model_logits
    from stages.pipeline import run_all, run_data, run_evaluate, run_model

    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-warm-"))
    champion = run_all(load_config(None, [f"data.limit={HELD_BACK_LIMIT}"]), artifacts)
    assert champion["promotion"].promoted

    cold_config = load_config()
    data = run_data(cold_config, artifacts)
    images, labels = load_split(data.path, "validation", normalize=True)
    champion_logits = model_logits(champion["train"].path / "model.keras", images)
    target = classification_metrics(labels, champion_logits, data.input_spec.class_names)["test_accuracy"]
    print(f"champion: validation accuracy {target:.4f} on the full run's validation split", flush=True)

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
        "champion": {"data_limit": HELD_BACK_LIMIT, "test_accuracy": champion["evaluate"].test_accuracy,
                     "best_val_accuracy_own_split": champion["train"].best_val_accuracy,
                     "val_accuracy_full_split": round(target, 4),
                     "train_stage_seconds": round(champion["train"].seconds, 1)},
        "results": results,
        "warm_vs_cold_seconds_to_champion": round(warm / cold, 3) if warm and cold else None,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
