"""Synthetic data the tests write: learnable class patterns as IDX and Parquet files."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

from stages.config import PipelineConfig, load_config


def idx_bytes(array: np.ndarray) -> bytes:
    """An array in MNIST IDX format (uint8 only)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def synthetic_images(n: int, classes: int = 10, shape: tuple[int, ...] = (28, 28), seed: int = 0,
                     brightness: int = 0):
    """Images whose class is a bright horizontal band at a class-specific height, plus noise (raised by
    `brightness` grey levels)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(brightness, 60 + brightness, size=(n, *shape), dtype=np.uint8)
    band = max(1, shape[0] // classes)
    for i, label in enumerate(labels):
        images[i, label * band : (label + 1) * band] = 220
    return images, labels.astype(np.uint8)


def write_idx_dir(directory: Path, n_train: int = 300, n_test: int = 100, gz: bool = False, seed: int = 0,
                  classes: int = 10, brightness: int = 0) -> Path:
    """The four MNIST-format files of a synthetic dataset."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_images(n_train, classes, seed=seed, brightness=brightness)
    test_x, test_y = synthetic_images(n_test, classes, seed=seed + 1, brightness=brightness)
    files = {
        "train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x, "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in files.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return directory


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image (H, W) or (H, W, 3) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_overrides(source: str, *more: str) -> list[str]:
    """`--set` overrides of a fast config: a small CNN, small batches, few epochs, and the v1 training recipe (no
    augmentation, plateau schedule, float32) that these tests were written against; tests of the current defaults
    drop the preset."""
    return ["preset=v1", f"data.source={source}", "data.batch_size=32", "data.shards=2", "data.shuffle_buffer=256",
            "model.conv_filters=[8, 16]", "model.dense_units=16", "train.max_epochs=3", "train.patience=2",
            "train.steps_per_execution=4", *more]


def tiny_config(source: str, *overrides: str) -> PipelineConfig:
    """The fast config of `tiny_overrides`."""
    return load_config(None, tiny_overrides(source, *overrides))


class Interrupted(Exception):
    """Raised by `interrupt_after` to stop training as a crash would."""


def interrupt_after(epochs: int):
    """An epoch callback that interrupts training after `epochs` epochs (1-based)."""

    def callback(row: dict, _max_epochs: int) -> None:
        if row["epoch"] == epochs:
            raise Interrupted

    return callback


def reference_test_accuracy(data_path: Path, train_path: Path) -> float:
    """The trained model's accuracy on the test split, computed here independently of the evaluate stage."""
    import keras

    from stages.data import load_split

    images, labels = load_split(data_path, "test")
    model = keras.models.load_model(train_path / "model.keras", compile=False)
    predicted = np.asarray(model(images.astype(np.float32) / 255.0, training=False)).argmax(axis=1)
    return float((predicted == labels).mean())


USER_MODELS = '''
"""A team's own models (a test fixture outside the repository)."""

import keras
from tapeline_helpers import residual_block

NOT_CALLABLE = 42


def build(input_shape, num_classes, width=8, dropout=0.0):
    """A stem conv, one residual block, global average pooling, logits."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = residual_block(x, width)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def raises(input_shape, num_classes):
    raise ValueError("width must be even")


def not_a_model(input_shape, num_classes):
    return keras.layers.Dense(num_classes)


def wrong_input(input_shape, num_classes):
    inputs = keras.Input(shape=(32, 32, 1))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs)))


def wrong_output(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes + 1)(keras.layers.Flatten()(inputs)))


def softmax_output(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(keras.layers.Flatten()(inputs)))


def softmax_layer(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    logits = keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Softmax()(logits))
'''

USER_HELPERS = '''
"""Layers shared by a team's models, in a directory of its own (on PYTHONPATH)."""

import keras


def residual_block(x, filters):
    """Two 3x3 convolutions and a skip connection."""
    y = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(filters, 3, padding="same")(y)
    return keras.layers.Activation("relu")(keras.layers.Add()([x, y]))
'''


def write_user_project(root: Path) -> tuple[Path, Path]:
    """A user's project outside the repository: `project/usermodels.py` (builders, good and bad) importing
    `helpers/tapeline_helpers.py` from a second directory; also `project/lonely.py`, whose import is missing.
    Returns (project directory, helper directory)."""
    project, helpers = root / "project", root / "helpers"
    project.mkdir(parents=True)
    helpers.mkdir(parents=True)
    (project / "usermodels.py").write_text(USER_MODELS)
    (helpers / "tapeline_helpers.py").write_text(USER_HELPERS)
    (project / "lonely.py").write_text("import tapeline_missing_helpers\n\n\ndef build(input_shape, num_classes):\n"
                                       "    return None\n")
    return project, helpers
