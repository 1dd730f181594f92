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
import numpy as np  # noqa: E402

from benchmarks.machine import machine  # noqa: E402

FLOPS_PER_IMAGE = 16.8e6  # forward + backward of the tutorial CNN, per training image


def sgemm_gflops(size: int = 2048, repeats: int = 7) -> float:
    """This machine's fp32 compute ceiling, measured: the median GFLOP/s of a square float32 matmul
    (the kernel convolutions lower to), run as one tf.function so only the GEMM is timed."""
    from benchmarks.cpu_speed import matmul_gflops

    return matmul_gflops("float32", size, repeats)


def prepare_data(limit: int | None, artifacts: Path):
    """Build tapeline's data cache and return (config, data result, train arrays, validation arrays)."""
    from stages.config import load_config
    from stages.data import load_split
    from stages.pipeline import run_data
    from stages.sources import DEBIAN_FASHION_MNIST
    from tests.helpers import write_idx_dir

    source = "fashion_mnist"
    if not DEBIAN_FASHION_MNIST.is_dir() and not os.environ.get("TAPELINE_DATA_DIR"):
        source = f"idx:{write_idx_dir(artifacts / 'synthetic', n_train=60000, n_test=10000)}"
    overrides = [f"data.source={source}"] + ([f"data.limit={limit}"] if limit else [])
    config = load_config(None, overrides)
    data = run_data(config, artifacts)
    train = load_split(data.path, "train", normalize=True)
    validation = load_split(data.path, "validation", normalize=True)
    return config, data, train, validation


def tutorial_contender(train, validation):
    """(a) The tutorial's code as written: its model, metrics, train_step, pipeline and ver02 loop."""
    import tensorflow as tf
    from tensorflow.keras import Model  # noqa: F401
    from tensorflow.keras.layers import Conv2D, Dense, Flatten, MaxPooling2D

    x_train, y_train = train
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(10000).batch(32)

    inputs = tf.keras.layers.Input(shape=(28, 28, 1))
    x = Conv2D(32, 3, activation='relu')(inputs)
    x = MaxPooling2D((2, 2))(x)
    x = Conv2D(64, 3, activation='relu')(x)
    x = MaxPooling2D((2, 2))(x)
    x = Conv2D(64, 3, activation='relu')(x)
    x = Flatten()(x)
    x = Dense(64, activation='relu')(x)
    outputs = Dense(10)(x)
    model = tf.keras.models.Model(inputs, outputs)

    loss_object = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = tf.keras.optimizers.Adam()
    train_loss_metric = tf.keras.metrics.SparseCategoricalCrossentropy()
    train_acc_metric = tf.keras.metrics.SparseCategoricalAccuracy()

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss_value = loss_object(y, logits)
        grads = tape.gradient(loss_value, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        train_acc_metric.update_state(y, logits)
        train_loss_metric.update_state(y, logits)
        return loss_value

    def epoch() -> None:
        for step, (x_batch_train, y_batch_train) in enumerate(train_ds):
            loss_value = train_step(x_batch_train, y_batch_train)
            if step % 200 == 0:
                print("Training loss at step %d: %.4f" % (step, loss_value.numpy()))
                print("Seen so far: %s samples" % ((step + 1) * 128))
        train_acc_metric.reset_state()
        train_loss_metric.reset_state()

    return epoch, lambda split=validation: keras_accuracy(model, split)


def keras_accuracy(model, validation) -> float:
    """Validation accuracy of a model that outputs logits."""
    x, y = validation
    return float(np.mean(np.argmax(model.predict(x, batch_size=1024, verbose=0), axis=1) == y))


def fit_contender(train, validation):
    """(b) Keras `model.fit` with its defaults on the same model, data and batch size."""
    import keras

    from stages.config import PRESETS, ModelConfig
    from stages.model import build_model
    from stages.results import InputSpec

    model = build_model(ModelConfig(**PRESETS["tutorial"]["model"]),
                        InputSpec(shape=(28, 28, 1), class_names=tuple("0123456789")))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, y = train

    def epoch() -> None:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    return epoch, lambda split=validation: keras_accuracy(model, split)


def tapeline_contender(config, data, validation, artifacts: Path, *overrides: str):
    """(c) tapeline's train-stage loop (Trainer.train_epoch) reading the TFRecord cache."""
    from stages.config import load_config
    from stages.pipeline import run_model
    from stages.train import build_trainer, precision_policy, resolve_precision

    config = load_config(None, [f"data.source={config.data.source}"]
                         + ([f"data.limit={config.data.limit}"] if config.data.limit else []) + list(overrides))
    model = run_model(config, data, artifacts)
    precision = resolve_precision(config.train.precision)
    with precision_policy(precision):
        trainer = build_trainer(config, data, model, Path(tempfile.mkdtemp()) / "ckpt", precision)
    counter = {"epoch": 0}

    def epoch() -> None:
        with precision_policy(precision):
            trainer.train_epoch(counter["epoch"])
        counter["epoch"] += 1

    return epoch, lambda: trainer.validate()[1]


def timed(epoch: Callable[[], None]) -> float:
    """Seconds one epoch takes (tutorial prints go to a sink)."""
    started = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        epoch()
    return time.perf_counter() - started


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
        "tapeline": tapeline_contender(config, data, validation, artifacts, "preset=tutorial"),
    }
    if args.levers:
        contenders["tapeline_steps_per_execution_1"] = tapeline_contender(
            config, data, validation, artifacts, "preset=tutorial", "train.steps_per_execution=1")
        contenders["tapeline_input_stream"] = tapeline_contender(
            config, data, validation, artifacts, "preset=tutorial", "train.input_pipeline=stream")
        contenders["tapeline_mixed_bfloat16"] = tapeline_contender(
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
