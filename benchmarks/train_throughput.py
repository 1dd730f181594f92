"""Training throughput, side by side in one process: the tutorial's loop as written, Keras `fit` with
its defaults, and tapeline's train-stage loop with the `tutorial` preset (the tutorial's CNN, fp32, batch 32,
Adam 1e-3; the input pipeline left to `auto`, which holds the split in memory).

Same data (Fashion-MNIST when installed, else synthetic of the same shape), same CNN, batch 32. All three
share one process, so they share tapeline's kernel choice (oneDNN on: `stages` is imported before TensorFlow);
`benchmarks/cpu_speed.py` runs the tutorial loop in a process of its own, as a user runs it.
Rounds are interleaved (A B C A B C …); round 0 of each contender is its warm-up (tracing) and is
reported apart. Each contender keeps training across rounds, so after the last round all three have
seen the same number of epochs and their validation accuracies can be compared.

    .venv/bin/python benchmarks/train_throughput.py [--rounds 3] [--limit N] [--levers] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.lib import (
    FLOPS_PER_IMAGE,
    fit_contender,
    machine,
    prepare_data,
    sgemm_gflops,
    throughput_contender,
    timed,
    tutorial_contender,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (epochs) after the warm-up round")
    parser.add_argument("--limit", type=int, default=None, help="training examples (default: all 60,000)")
    parser.add_argument("--levers", action="store_true", help="also time tapeline variants (one lever each)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    import keras

    keras.utils.set_random_seed(0)
    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-bench-"))
    config, data, train, validation = prepare_data(args.limit, artifacts)
    images = len(train[1])
    contenders = {
        "tutorial": tutorial_contender(train, validation),
        "keras_fit": fit_contender(train, validation),
        "tapeline": throughput_contender(config, data, validation, artifacts, "preset=tutorial"),
    }
    if args.levers:
        contenders["tapeline_steps_per_execution_1"] = throughput_contender(
            config, data, validation, artifacts, "preset=tutorial", "train.steps_per_execution=1")
        contenders["tapeline_input_stream"] = throughput_contender(
            config, data, validation, artifacts, "preset=tutorial", "train.input_pipeline=stream")
        contenders["tapeline_mixed_bfloat16"] = throughput_contender(
            config, data, validation, artifacts, "preset=tutorial", "train.precision=mixed_bfloat16")
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(args.rounds + 1):
        for name, (epoch, _) in contenders.items():
            seconds[name].append(timed(epoch))
            print(f"round {round_index} {name:<32} {images / seconds[name][-1]:8.0f} img/s"
                  f"{'  (warm-up, tracing)' if round_index == 0 else ''}", flush=True)
    results = {}
    for name, (_, accuracy) in contenders.items():
        rates = [images / s for s in seconds[name][1:]]
        results[name] = {"images_per_second": [round(r, 1) for r in rates],
                          "median": round(statistics.median(rates), 1),
                         "warmup_seconds": round(seconds[name][0], 2), "val_accuracy": round(accuracy(), 4),
                         "epochs": args.rounds + 1}
    tape, tutorial, fit = (results[n]["median"] for n in ("tapeline", "tutorial", "keras_fit"))
    gflops = sgemm_gflops()
    ceiling = gflops * 1e9 / FLOPS_PER_IMAGE
    print(f"measured fp32 sgemm ceiling: {gflops:.1f} GFLOP/s = {ceiling:.0f} img/s for this CNN", flush=True)
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "images_per_round": images, "batch_size": 32, "results": results,
        "ratio_tapeline_vs_tutorial": round(tape / tutorial, 3), "ratio_tapeline_vs_fit": round(tape / fit, 3),
        "sgemm_gflops": round(gflops, 1), "ceiling_images_per_second": round(ceiling),
        "tapeline_fraction_of_measured_ceiling": round(tape / ceiling, 3),
        "tapeline_gflops": round(tape * FLOPS_PER_IMAGE / 1e9, 1),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
