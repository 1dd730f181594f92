"""What the benchmark scripts share: the machine a figure was measured on, the contenders (the tutorial's loop,
Keras `fit`, tapeline's stages), the data they train on, timing and ratio helpers, and the worker processes that run
a contender alone. Scripts import this module and never each other; run each as `python -m benchmarks.NAME`."""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tapeline.hardware import cpu

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """{cpu, family, model_number, cores, isa} of this machine (see `tapeline.hardware.cpu`)."""
    found = cpu()
    return {"cpu": found["model"], "family": found["family"], "model_number": found["model_number"],
            "cores": found["cores"], "isa": found["isa"]}


FLOPS_PER_IMAGE = 16.8e6  # forward + backward of the tutorial CNN, per training image


def sgemm_gflops(size: int = 2048, repeats: int = 7) -> float:
    """This machine's fp32 compute ceiling, measured: the median GFLOP/s of a square float32 matmul
    (the kernel convolutions lower to), run as one tf.function so only the GEMM is timed."""

    return matmul_gflops("float32", size, repeats)


def prepare_data(limit: int | None, artifacts: Path):
    """Build tapeline's data cache and return (config, data result, train arrays, validation arrays)."""
    from stages.data.readers import load_split
    from stages.data.sources.base import DEBIAN_FASHION_MNIST
    from stages.pipeline import run_data
    from tapeline.config import load_config
    from tapeline.testing import write_idx_dir

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

    from stages.model import build_model
    from tapeline.config import PRESETS, ModelConfig
    from tapeline.results import InputSpec

    model = build_model(ModelConfig(**PRESETS["tutorial"]["model"]),
                        InputSpec(shape=(28, 28, 1), class_names=tuple("0123456789")))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, y = train

    def epoch() -> None:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    return epoch, lambda split=validation: keras_accuracy(model, split)


def throughput_contender(config, data, validation, artifacts: Path, *overrides: str):
    """(c) tapeline's train-stage loop (Trainer.train_epoch) reading the TFRecord cache."""
    from stages.pipeline import run_model
    from stages.train.environment import precision_policy, resolve_precision
    from stages.train.loop import build_trainer
    from tapeline.config import load_config

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

TARGETS = (0.90, 0.92)


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


def stage_contender(name: str, source: str, overrides: list[str], max_epochs: int) -> dict:
    """tapeline's data, model, train and evaluate stages with `overrides`; the train stage is timed."""
    from stages.pipeline import run_data, run_evaluate, run_model, run_train
    from tapeline.config import load_config

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

TARGET = 0.90
# name: (TensorFlow imported before tapeline, extra environment, tapeline overrides or None for the tutorial loop)
THROUGHPUT = {
    "tutorial_loop": (True, {}, None),
    "tapeline_tutorial_preset": (False, {}, ["preset=tutorial"]),
    "tapeline_tutorial_preset_onednn_off": (False, {"TF_ENABLE_ONEDNN_OPTS": "0"}, ["preset=tutorial"]),
}
STAGES = {
    "tutorial_loop": (True, {}, None),
    # before this work: `v2_precision()` is what auto picked then (bf16 only with AMX tiles), added in stage_part
    "tapeline_v2_defaults": (True, {}, ["preset=v2"]),
    "tapeline_defaults": (False, {}, []),
    # what `train.precision=auto` buys where it picks bf16 (AMX or AVX-512 BF16); equal to the defaults elsewhere
    "tapeline_defaults_float32": (False, {}, ["train.precision=float32"]),
}


def sets_precision(overrides: list[str]) -> bool:
    """Whether `overrides` choose `train.precision` themselves."""
    return any(o.startswith("train.precision=") for o in overrides)


def as_on_avx2(contenders: dict[str, tuple[bool, dict[str, str], list[str] | None]]
               ) -> dict[str, tuple[bool, dict[str, str], list[str] | None]]:
    """`contenders` as they would run on an AVX2-only x86 CPU: TensorFlow's choice there (oneDNN off) where it is
    imported first, float32 where no precision is set (what `auto` picks without bf16 instructions). The defaults
    in float32 are then the defaults, and are left out. oneDNN's ISA limit itself is set for every worker by
    `main`."""
    emulated = {}
    for name, (first, environment, overrides) in contenders.items():
        if name == "tapeline_defaults_float32":
            continue
        if first:
            environment = {"TF_ENABLE_ONEDNN_OPTS": "0", **environment}
        if overrides is not None and not sets_precision(overrides):
            overrides = [*overrides, "train.precision=float32"]
        emulated[name] = (first, environment, overrides)
    return emulated


def v2_precision(isa: list[str]) -> str:
    """The `train.precision` that `auto` picked before 2026-12-03 on a CPU with these features: mixed_bfloat16
    with AMX tiles only, float32 elsewhere (AVX-512 BF16 included), so `v2` runs as users had it."""
    from tapeline.hardware import BF16_TILES

    return "train.precision=mixed_bfloat16" if BF16_TILES in isa else "train.precision=float32"


def training_flops(model: Any) -> float:
    """FLOPs of one training image through `model`: forward multiply-adds of its Conv2D and Dense layers x 2,
    and the backward pass counted as twice the forward (the usual 3x)."""
    forward = 0.0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            height, width, filters = layer.output.shape[1:]
            kernel = layer.kernel.shape
            forward += 2 * height * width * filters * kernel[0] * kernel[1] * kernel[2]
        elif kind == "Dense":
            forward += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return 3 * forward


def matmul_gflops(dtype: str, size: int = 2048, repeats: int = 7) -> float:
    """The median GFLOP/s of a square matmul in `dtype`, run as one tf.function so only the GEMM is timed."""
    import tensorflow as tf

    a = tf.cast(tf.random.stateless_uniform((size, size), seed=(1, 2)), dtype)
    b = tf.cast(tf.random.stateless_uniform((size, size), seed=(3, 4)), dtype)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y), tf.float32)))
    matmul(a, b).numpy()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a, b).numpy()
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return statistics.median(rates)


def numpy_gflops(size: int = 2048, repeats: int = 7) -> float:
    """The same fp32 matmul through numpy's BLAS (OpenBLAS): the CPU's ceiling outside TensorFlow."""
    import numpy as np

    a, b = np.random.default_rng(0).random((2, size, size), dtype=np.float32)
    rates = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return statistics.median(rates[1:])


class Worker:
    """A contender's process, driven line by line."""

    def __init__(self, argv: list[str], tensorflow_first: bool, environment: dict[str, str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TAPELINE_SET_ONEDNN")}
        env.update(environment, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cpu_speed", *(["--tensorflow-first"] if tensorflow_first else []),
             *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def ask(self, command: str | None = None) -> dict[str, Any]:
        """Send `command` (if any) and wait for the worker's next result line."""
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError(f"worker {self.process.args} ended with {self.process.wait()}")

    def close(self) -> None:
        """End the worker."""
        self.process.stdin.close()
        self.process.wait()


def overrides_argv(overrides: list[str] | None) -> list[str]:
    """The worker's --set arguments (none: the tutorial loop)."""
    return ["--tutorial-loop"] if overrides is None else [f"--set={o}" for o in overrides]


# an epoch line of a trial log (sweeps/<name>/logs/trial-NNNNN.log): when, which epoch, its seconds
TRIAL_EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) trial tapeline\.train INFO "
                              r"epoch (\d+): .*\(([0-9.]+) s, ")


def epoch_ends(log: Path) -> list[tuple[float, int, float]]:
    """(time the epoch's line was logged, epoch, its seconds) of every epoch line of a trial's log."""
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        if match := TRIAL_EPOCH_LINE.match(line):
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows.append((at, int(match.group(2)), float(match.group(3))))
    return rows
