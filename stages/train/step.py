"""The tape step: forward under a GradientTape, loss, gradients, apply, as in the keras-io guide, built by a
factory from the model, optimizer, loss and metrics (no globals)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the reader and the type checker; TensorFlow is imported inside the functions that use it
    import keras
    import tensorflow as tf


def _replica_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn: keras.losses.Loss,
                        images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One training step on one replica: forward under the tape, loss, gradients, apply (the tutorial's step).

    Returns the batch's (summed loss, correct predictions, examples) for the epoch metrics."""
    import keras
    import tensorflow as tf

    with tf.GradientTape() as tape:
        logits = tf.cast(model(images, training=True), tf.float32)  # float32 logits under mixed precision too
        per_example = loss_fn(labels, logits)
        loss = tf.nn.compute_average_loss(per_example)  # the mean over the global batch, across replicas
        scaled = optimizer.scale_loss(loss) if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else loss
    gradients = tape.gradient(scaled, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    return batch_statistics(per_example, logits, labels)


def _replica_eval_step(model: keras.Model, loss_fn: keras.losses.Loss, images: tf.Tensor, labels: tf.Tensor
                       ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One validation step on one replica: (summed loss, correct predictions, examples) of the batch."""
    import tensorflow as tf

    logits = tf.cast(model(images, training=False), tf.float32)
    return batch_statistics(loss_fn(labels, logits), logits, labels)


class EpochMetrics:
    """Loss (mean per-example cross-entropy from logits) and accuracy over an epoch.

    Keras-like `update_state` / `result` / `reset_state`, fed with sums already reduced across
    replicas, so it behaves the same under every tf.distribute strategy.
    """

    def __init__(self, name: str) -> None:
        import tensorflow as tf

        self.name = name
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name=f"{name}_loss_sum")
        self.correct = tf.Variable(0.0, dtype=tf.float64, trainable=False, name=f"{name}_correct")
        self.count = tf.Variable(0.0, dtype=tf.float64, trainable=False, name=f"{name}_count")

    def update_state(self, loss_sum: Any, correct: Any, count: Any) -> None:
        """Add a batch's summed loss, correct predictions and example count."""
        import tensorflow as tf

        self.loss_sum.assign_add(tf.cast(loss_sum, tf.float64))
        self.correct.assign_add(tf.cast(correct, tf.float64))
        self.count.assign_add(tf.cast(count, tf.float64))

    def result(self) -> tuple[float, float]:
        """(mean loss, accuracy) so far."""
        count = max(float(self.count.numpy()), 1.0)
        return float(self.loss_sum.numpy()) / count, float(self.correct.numpy()) / count

    def reset_state(self) -> None:
        """Zero the sums for a new epoch."""
        for variable in (self.loss_sum, self.correct, self.count):
            variable.assign(0.0)


@dataclass
class StepFunctions:
    """Compiled multi-step functions: each runs `steps` batches from an iterator in one call."""

    train: Callable[[Any, tf.Tensor], None]  # (iterator, steps)
    evaluate: Callable[[Any, tf.Tensor], None]
    nonfinite_step: tf.Variable


def batch_statistics(per_example_loss: tf.Tensor, logits: tf.Tensor, labels: tf.Tensor
                     ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(summed loss, correct predictions, examples) of one batch on one replica."""
    import tensorflow as tf

    predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return (
        tf.reduce_sum(per_example_loss),
        tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32)),
        tf.cast(tf.size(labels), tf.float32),
    )


def make_step_functions(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: keras.losses.Loss,
    train_metrics: EpochMetrics,
    val_metrics: EpochMetrics,
    strategy: tf.distribute.Strategy,
    *,
    jit_compile: bool = False,
) -> StepFunctions:
    """Build the train and evaluate functions for this model, optimizer, loss and metrics.

    `loss_fn` must return per-example losses (reduction=None); the step averages them over the
    global batch. Batch shapes are left unknown, so the last partial batch does not retrace.
    """
    import tensorflow as tf

    nonfinite_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="nonfinite_step")
    train_on_replica = tf.function(partial(_replica_train_step, model, optimizer, loss_fn), jit_compile=jit_compile,
                                   autograph=False)
    eval_on_replica = partial(_replica_eval_step, model, loss_fn)

    def reduced(per_replica: tuple[Any, Any, Any]) -> list[Any]:
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

    def note_nonfinite(loss_sum: Any) -> Any:
        first = tf.logical_and(tf.logical_not(tf.math.is_finite(loss_sum)), nonfinite_step < 0)
        # optimizer.iterations has already advanced past this step
        return tf.cond(first, lambda: nonfinite_step.assign(optimizer.iterations - 1), lambda: nonfinite_step)

    def train_step(batch: tuple[Any, Any]) -> None:
        loss_sum, correct, count = reduced(strategy.run(train_on_replica, batch))
        train_metrics.update_state(loss_sum, correct, count)
        note_nonfinite(loss_sum)

    def eval_step(batch: tuple[Any, Any]) -> None:
        val_metrics.update_state(*reduced(strategy.run(eval_on_replica, batch)))

    train, evaluate = steps_in_one_call(train_step), steps_in_one_call(eval_step)
    return StepFunctions(train=train, evaluate=evaluate, nonfinite_step=nonfinite_step)


def steps_in_one_call(step: Callable[[Any], None]) -> Any:
    """A compiled function `(iterator, steps)` that runs `step` on the next `steps` batches of the iterator."""
    import tensorflow as tf

    # autograph off (here and in the step): nothing branches on a tensor, and converting tapeline's step code took
    # half the tracing (0.70 s -> 0.35 s for the default CNN). Keras's fit does not convert its steps either.
    @tf.function(autograph=False)
    def run(iterator: Any, steps: Any) -> None:
        def one(count: Any) -> Any:
            step(next(iterator))
            return count + 1

        tf.while_loop(lambda count: count < steps, one, [tf.zeros([], steps.dtype)])

    return run
