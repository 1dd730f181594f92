"""Image folders (`data.source=images:DIR`) against Keras's `image_dataset_from_directory`, in one run.

1. Fashion-MNIST's 70,000 images written as PNG files in class folders (DIR/train/<class>/, DIR/test/<class>/).
   tapeline's data stage, cold (list, hash, decode on every core, split, write the TFRecord cache), against one
   pass of `keras.utils.image_dataset_from_directory` over the same folders (grayscale, 28x28, batch 256).
2. One training epoch each, the same CNN (tapeline's defaults) and the same precision: tapeline's second epoch
   (from the cache) against a second epoch over the Keras loader (which decodes the PNGs again every epoch).
   Also one input-only epoch of each (no model): the Keras loader over train/ against tapeline's training reader.
3. A bigger-image case: N RGB JPEGs of random sizes (64-512 px a side) resized to 96x96 (`data.image_size`),
   data stage time and peak RSS in a child process, for N, 2N and 4N files, with its RSS before the stage
   (TensorFlow loaded) and the growth (the decoding processes are forked from it and share its pages, so
   only its own peak is reported).

Medians of --rounds interleaved rounds (each round: the Keras pass, the data stage, both input-only epochs,
both training runs).

    .venv/bin/python benchmarks/image_folders.py [--rounds 3] [--jpegs 3000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]

from benchmarks.lib import machine  # noqa: E402

BATCH = 256
CHILD = """
import json, sys, time
from pathlib import Path
import tensorflow  # loaded before the baseline: the data stage's own growth is what is measured
from tapeline.config import load_config
from stages.pipeline import run_data
def status_mb(field):  # VmHWM, not getrusage: ru_maxrss survives exec, so a child reports its parent's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
baseline = status_mb("VmRSS")
started = time.perf_counter()
data = run_data(load_config(None, sys.argv[2:]), Path(sys.argv[1]))
seconds = time.perf_counter() - started
peak = status_mb("VmHWM")
print(json.dumps({"seconds": round(seconds, 2), "records": data.records, "shape": data.input_spec.shape,
                  "rss_before_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
                  "growth_mb": round(peak - baseline, 1)}))
"""


def folder_name(name: str) -> str:
    """A class name usable as a folder name ("T-shirt/top" -> "T-shirt_top")."""
    return re.sub(r"[^\w.-]+", "_", name)


def write_fashion_pngs(directory: Path) -> int:
    """Fashion-MNIST's train and test images as PNG files in class folders; returns how many."""
    from PIL import Image

    from stages.data.sources.base import FASHION_MNIST_CLASSES
    from stages.data.sources.resolve import named_source

    raw = named_source("fashion_mnist").load()
    count = 0
    for split, images, labels in (("train", raw.train_images, raw.train_labels),
                                  ("test", raw.test_images, raw.test_labels)):
        for name in FASHION_MNIST_CLASSES:
            (directory / split / folder_name(name)).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image[..., 0]).save(directory / split / folder_name(FASHION_MNIST_CLASSES[label]) /
                                                f"{i:05d}.png")
            count += 1
    return count


def write_jpegs(directory: Path, count: int, seed: int = 0) -> None:
    """`count` RGB JPEGs of random sizes in 5 class folders (smooth random colour fields, so they compress)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % 5
        height, width = (int(v) for v in rng.integers(64, 513, size=2))
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        small[..., label % 3] = 255
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        folder = directory / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def keras_loader(directory: Path):
    """`image_dataset_from_directory` as a Keras user writes it for these folders."""
    import keras

    return keras.utils.image_dataset_from_directory(directory, color_mode="grayscale", image_size=(28, 28),
                                                    batch_size=BATCH, shuffle=True, seed=0, verbose=False)


def keras_pass_seconds(directory: Path) -> tuple[float, int]:
    """Seconds for one pass over train/ and test/ with the Keras loader (every batch materialized)."""
    started = time.perf_counter()
    images = 0
    for split in ("train", "test"):
        for batch, _ in keras_loader(directory / split):
            images += int(batch.shape[0])
    return time.perf_counter() - started, images


def keras_epoch_seconds(directory: Path, config, spec) -> list[float]:
    """Two epochs of the same CNN over the Keras loader (rescaled to [0, 1] in the input graph); seconds each."""
    import keras
    import tensorflow as tf

    from stages.model import build_model
    from stages.train.environment import precision_policy, resolve_precision

    with precision_policy(resolve_precision(config.train.precision)):
        model = build_model(config.model, spec)
        optimizer = keras.optimizers.Adam(1e-3)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function
        def step(images, labels):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, tf.cast(model(images / 255.0, training=True), tf.float32))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables,
                                          strict=True))

        ds = keras_loader(directory / "train").prefetch(tf.data.AUTOTUNE)
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            for images, labels in ds:
                step(images, labels)
            seconds.append(time.perf_counter() - started)
    return seconds


def keras_train_pass_seconds(directory: Path) -> float:
    """One epoch of the Keras loader over train/ alone, no model: what decoding every epoch costs."""
    started = time.perf_counter()
    for _ in keras_loader(directory / "train"):
        pass
    return time.perf_counter() - started


def tapeline_train_pass_seconds(data, config) -> float:
    """One epoch of tapeline's training reader (the TFRecord cache, shuffled, batched, augmented), no model."""
    from stages.data.readers import Augment, make_dataset

    started = time.perf_counter()
    for _ in make_dataset(data.path, "train", BATCH, training=True, shuffle_buffer=config.data.shuffle_buffer,
                          seed=0, epoch=1, augment=Augment(shift=config.train.random_shift)):
        pass
    return time.perf_counter() - started


def tapeline_epochs(config, data, artifacts: Path) -> list[float]:
    """Two epochs of tapeline's train stage on the cached data; each epoch's training seconds."""
    import pyarrow.parquet as pq

    from stages.pipeline import run_model, run_train

    trained = run_train(config, data, run_model(config, data, artifacts), artifacts)
    return [row["seconds"] for row in pq.read_table(trained.path / "history.parquet").to_pylist()]


def child_data_stage(directory: Path, artifacts: Path) -> dict:
    """The data stage on JPEG folders in a fresh process: seconds and peak RSS."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(artifacts), f"data.source=images:{directory}",
                           "data.image_size=[96, 96]"], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--jpegs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from stages.pipeline import run_data
    from tapeline.config import load_config

    work = Path(tempfile.mkdtemp(prefix="tapeline-images-"))
    started = time.perf_counter()
    written = write_fashion_pngs(work / "fashion")
    print(f"wrote {written} PNG files in {time.perf_counter() - started:.1f} s", flush=True)

    from stages.data.sources.images import forget_hashes

    rounds: list[dict] = []
    for number in range(1, args.rounds + 1):  # interleaved: each round runs every contender once
        keras_seconds, keras_images = keras_pass_seconds(work / "fashion")
        forget_hashes()  # cold: every round hashes the files again
        config = load_config(None, [f"data.source=images:{work / 'fashion'}", "train.max_epochs=2",
                                    "train.decay_epochs=2"])
        started = time.perf_counter()
        data = run_data(config, work / f"artifacts-{number}")
        data_seconds = time.perf_counter() - started
        passes = {"keras_loader": keras_train_pass_seconds(work / "fashion"),
                  "tapeline_reader": tapeline_train_pass_seconds(data, config)}
        ours = tapeline_epochs(config, data, work / f"artifacts-{number}")
        theirs = keras_epoch_seconds(work / "fashion", config, data.input_spec)
        rounds.append({"keras_pass": keras_seconds, "data_stage": data_seconds, "keras_epochs": theirs,
                       "tapeline_epochs": ours, **{f"input_only_{k}": v for k, v in passes.items()}})
        print(f"round {number}: {json.dumps(rounds[-1])}", flush=True)

    bigger = {}
    counts = (args.jpegs, 2 * args.jpegs, 4 * args.jpegs)
    for count in counts:
        write_jpegs(work / f"jpegs{count}", count)
        bigger[str(count)] = child_data_stage(work / f"jpegs{count}", work / f"artifacts-jpegs{count}")
        print(f"{count} JPEGs: {bigger[str(count)]}", flush=True)

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    keras_pass, data_stage = median([r["keras_pass"] for r in rounds]), median([r["data_stage"] for r in rounds])
    keras_epoch = median([r["keras_epochs"][1] for r in rounds])
    tapeline_epoch = median([r["tapeline_epochs"][1] for r in rounds])
    keras_input = median([r["input_only_keras_loader"] for r in rounds])
    tapeline_input = median([r["input_only_tapeline_reader"] for r in rounds])
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "files": written, "rounds": rounds,
        "median": {"keras_pass_seconds": keras_pass, "tapeline_data_stage_seconds": data_stage,
                   "keras_second_epoch_seconds": keras_epoch, "tapeline_second_epoch_seconds": tapeline_epoch,
                   "keras_input_only_epoch_seconds": keras_input, "tapeline_input_only_epoch_seconds": tapeline_input},
        "data_stage_vs_keras_pass": round(data_stage / keras_pass, 3),
        "keras_epoch_vs_tapeline_epoch": round(keras_epoch / tapeline_epoch, 2),
        "keras_input_only_vs_tapeline_input_only": round(keras_input / tapeline_input, 2),
        "jpegs_96x96": bigger,
        # the slope between the smallest and largest case: what each further file costs in memory
        "jpegs_growth_kb_per_file": round((bigger[str(counts[-1])]["growth_mb"] - bigger[str(counts[0])]["growth_mb"])
                                          * 1024 / (counts[-1] - counts[0]), 2),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
