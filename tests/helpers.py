"""Synthetic data the tests write: learnable class patterns as IDX and Parquet files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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

    from stages.data.readers import load_split

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


def no_classes(input_shape, width=8):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))


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


class Doubled(keras.layers.Layer):
    """A custom layer nobody registered for serialization."""

    def call(self, x):
        return x * 2.0


def unregistered_layer(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(Doubled()(keras.layers.Flatten()(inputs))))
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


def sweep_processes(artifacts: Path) -> list[int]:
    """The trial processes and warm workers working on `artifacts` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (b"sweeps.trial" in cmdline or b"sweeps.worker" in cmdline) and str(artifacts).encode() in cmdline:
            pids.append(int(entry.name))
    return pids
