"""Building blocks of the example's residual net (a helper module: its code is in the model fingerprint too)."""

from __future__ import annotations

import keras


def residual_block(x: keras.KerasTensor, filters: int, name: str, batch_norm: bool = False) -> keras.KerasTensor:
    """Two 3x3 convolutions with a skip connection; a 1x1 projection when the width changes; with `batch_norm`,
    each convolution is batch-normalized before its activation (and the sum)."""
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, name=f"{name}_project")(x)
    y = _conv(x, filters, f"{name}_conv1", batch_norm, "relu")
    y = _conv(y, filters, f"{name}_conv2", batch_norm, None)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.Activation("relu", name=f"{name}_relu")(y)


def _conv(x: keras.KerasTensor, filters: int, name: str, batch_norm: bool, activation: str | None
          ) -> keras.KerasTensor:
    """A 3x3 same-padded convolution, batch-normalized (its bias then redundant) before `activation` if asked."""
    if not batch_norm:
        return keras.layers.Conv2D(filters, 3, padding="same", activation=activation, name=name)(x)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn")(y)
    return keras.layers.Activation(activation, name=f"{name}_act")(y) if activation else y
