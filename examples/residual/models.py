"""A small residual network for 28x28 images: an example of a team's own model for tapeline.

tapeline calls `build(input_shape=(H, W, C), num_classes=N, **model.params)`; the model takes float32
images in [0, 1] and returns logits (no softmax: tapeline's loss and exports apply it).
"""

from __future__ import annotations

import keras
from blocks import residual_block


def build(input_shape: tuple[int, int, int], num_classes: int, width: int = 32, dropout: float = 0.2,
          batch_norm: bool = False) -> keras.Model:
    """Stem conv, a residual block at half resolution, a wider one at quarter resolution, global average pooling;
    `batch_norm` normalizes each block's convolutions."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = residual_block(x, width, "block1", batch_norm)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = residual_block(x, 2 * width, "block2", batch_norm)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="residual_net")
