"""The training loop: the optimizer and schedules, the Trainer (datasets, steps, validation) and `fit`."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # for the reader and the type checker; TensorFlow is imported inside the functions that use it
    import keras
    import tensorflow as tf

from stages.data.readers import (
    Augment,
    load_split,
    make_dataset,
    make_memory_dataset,
    make_worker_dataset,
    without_autotune_thread,
)
from stages.model import WEIGHTS_FILE, build_model
from stages.train.checkpoints import Checkpointer, TrainingState
from stages.train.early_stopping import EarlyStopping, ReduceLROnPlateau
from stages.train.environment import make_strategy
from stages.train.outputs import epoch_log_line
from stages.train.step import EpochMetrics, StepFunctions, make_step_functions
from stages.train.warm_start import warm_start
from tapeline.cluster import Cluster, worker_failure
from tapeline.config import PipelineConfig, TrainConfig, epoch_limit
from tapeline.errors import ConfigError, TrainingError, TrainingPaused
from tapeline.results import DataResult, EpochCallback, ModelResult, StopCheck

MEMORY_BUDGET_BYTES = 2 * 1024**3
log = logging.getLogger("tapeline.train")


def learning_rate_for(config: TrainConfig, steps_per_epoch: int) -> Any:
    """The optimizer's learning rate: a float (constant, plateau) or, for `cosine`, a per-step schedule that warms
    up linearly from a tenth of `learning_rate` over `warmup_epochs` and decays to `min_learning_rate` at
    `decay_epochs`."""
    import keras

    if config.lr_schedule != "cosine":
        return config.learning_rate
    warmup = min(config.warmup_epochs, config.decay_epochs - 1) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 10 if warmup else config.learning_rate,
        decay_steps=config.decay_epochs * steps_per_epoch - warmup,
        alpha=min(config.min_learning_rate / config.learning_rate, 1.0),
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int, precision: str) -> Any:
    """Adam with the configured learning rate (schedule), wrapped for loss scaling under mixed_float16."""
    import keras

    optimizer = keras.optimizers.Adam(learning_rate=learning_rate_for(config, steps_per_epoch))
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_early_stopping(config: TrainConfig) -> EarlyStopping:
    """EarlyStopping from the train config."""
    return EarlyStopping(
        monitor=config.monitor, min_delta=config.min_delta, patience=config.patience, mode=config.mode,
        baseline=config.baseline, restore_best_weights=config.restore_best_weights,
        start_from_epoch=config.start_from_epoch,
    )


def _make_lr_schedule(config: TrainConfig) -> ReduceLROnPlateau:
    """ReduceLROnPlateau on the early-stopping monitor, from the train config."""
    return ReduceLROnPlateau(monitor=config.monitor, mode=config.mode, factor=config.reduce_lr_factor,
                             patience=config.reduce_lr_patience, min_lr=config.min_learning_rate)


# ---------------------------------------------------------------- the loop

def _steps_for(records: int, batch_size: int) -> int:
    """Batches in an epoch, the last partial one included."""
    return math.ceil(records / batch_size)


def _progress_bar(steps: int) -> Any | None:
    """A Keras progress bar on an interactive terminal, else None (logs get one line per epoch)."""
    if not sys.stdout.isatty():
        return None
    import keras

    return keras.utils.Progbar(steps, unit_name="step")


VALIDATION_BATCH = 1024


def _release_beside(holder: list[Any]) -> None:
    """Drop the references in `holder` (the caller's last ones) on a short-lived thread: tearing down a tf.data
    iterator waits for its reader threads, which held the training thread for up to 7 s between epochs
    (seen with py-spy under the v1 preset). Not a daemon, so the process still waits for it at exit."""
    threading.Thread(target=holder.clear, name="tapeline-iterator-release").start()


def augmentation(config: TrainConfig) -> Augment:
    """The training augmentation the config asks for."""
    return Augment(shift=config.random_shift, flip=config.random_flip)


@dataclass
class Trainer:
    """The model, optimizer, step functions and checkpointer of one training run."""

    config: PipelineConfig
    data: DataResult
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    steps: StepFunctions
    train_metrics: EpochMetrics
    val_metrics: EpochMetrics
    checkpointer: Checkpointer
    train_in_memory: tuple[tf.Tensor, tf.Tensor] | None  # uint8 images, labels
    precision: str = "float32"
    cluster: Cluster | None = None
    memory_iterator: Any = field(default=None, repr=False)
    memory_next_epoch: int = -1
    validation_iterator: Any = field(default=None, repr=False)
    stream_iterator: Any = field(default=None, repr=False)

    def replace_stream_iterator(self, new: Any) -> Any:
        """Make `new` the current training iterator and drop the previous one beside training."""
        _release_beside([self.stream_iterator])
        self.stream_iterator = new
        return new

    def release_iterators(self) -> None:
        """Drop every tf.data iterator beside the work that follows training (saving, committing): this object's
        references go first, so the last ones are the releasing thread's (the other order raced it, and the
        teardown ran here)."""
        held = [self.memory_iterator, self.validation_iterator, self.stream_iterator]
        self.memory_iterator = self.validation_iterator = self.stream_iterator = None
        _release_beside(held)

    def training_batches(self, epoch: int) -> Any:
        """An iterator over the training split for `epoch` (in memory: one iterator for all epochs)."""
        data, augment = self.config.data, augmentation(self.config.train)
        if self.train_in_memory is not None:
            if self.memory_iterator is None or self.memory_next_epoch != epoch:
                # the epochs training may still run, not train.max_epochs (100 by default), which the cosine
                # schedule never reaches
                ds = make_memory_dataset(*self.train_in_memory, data.batch_size, seed=self.config.seed,
                                         epoch=epoch, epochs=epoch_limit(self.config.train) - epoch, augment=augment)
                self.memory_iterator = iter(without_autotune_thread(ds))
            self.memory_next_epoch = epoch + 1
            return self.memory_iterator
        if self.cluster is not None:
            return self.replace_stream_iterator(iter(self.strategy.distribute_datasets_from_function(
                partial(self.worker_batches, epoch))))
        ds = make_dataset(self.data.path, "train", data.batch_size, training=True, shuffle_buffer=data.shuffle_buffer,
                          seed=self.config.seed, epoch=epoch, augment=augment)
        # one reader per epoch, dropped beside the next: with the autotune thread, 3 of 8 epochs ran at half speed
        return self.replace_stream_iterator(iter(self.strategy.experimental_distribute_dataset(
            without_autotune_thread(ds))))

    def worker_batches(self, epoch: int, context: Any) -> Any:
        """This worker's training batches for `epoch` on a cluster (`context`: its tf.distribute.InputContext)."""
        data = self.config.data
        return without_autotune_thread(make_worker_dataset(
            self.data.path, data.batch_size, context.num_input_pipelines, context.input_pipeline_id,
            shuffle_buffer=data.shuffle_buffer, seed=self.config.seed, epoch=epoch,
            augment=augmentation(self.config.train)))

    def validation_batches(self) -> tuple[Any, int]:
        """One iterator over the validation split repeated, kept for the whole run (a new one per epoch costs a
        reader start-up each time), and the number of batches that make one pass."""
        if self.validation_iterator is None:
            def whole_split(_context: Any = None) -> Any:
                return without_autotune_thread(make_dataset(self.data.path, "validation", VALIDATION_BATCH).repeat())

            # On a cluster every worker evaluates the whole split: the all-reduced sums are then N times one
            # worker's, so the means (and every early-stopping decision) are the same everywhere.
            self.validation_iterator = iter(
                self.strategy.distribute_datasets_from_function(whole_split) if self.cluster is not None
                else self.strategy.experimental_distribute_dataset(whole_split()))
        return self.validation_iterator, _steps_for(self.data.records["validation"], VALIDATION_BATCH)

    def check_finite(self, epoch: int) -> None:
        """Raise TrainingError naming the epoch and step of the first non-finite loss."""
        step = int(self.steps.nonfinite_step.numpy())
        if step >= 0:
            per_epoch = _steps_for(self.data.records["train"], self.config.data.batch_size)
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, step {step - epoch * per_epoch + 1} "
                f"(global step {step + 1}); the last good checkpoint is "
                f"{self.checkpointer.manager.latest_checkpoint or 'none (it failed in the first epoch)'}. "
                "Lower train.learning_rate, or check the data for corrupt images"
            )

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """One pass over the training split, `steps_per_execution` batches per call; (loss, acc, seconds)."""
        import tensorflow as tf

        total = _steps_for(self.data.records["train"], self.config.data.batch_size)
        chunk = self.config.train.steps_per_execution
        bar = _progress_bar(total)
        started = time.perf_counter()
        iterator = self.training_batches(epoch)
        self.train_metrics.reset_state()
        done = 0
        while done < total:
            steps = min(chunk, total - done)
            self.steps.train(iterator, tf.constant(steps, tf.int64))
            done += steps
            self.check_finite(epoch)
            if bar is not None:
                bar.update(done, values=[("loss", self.train_metrics.result()[0])])
        loss, accuracy = self.train_metrics.result()
        return loss, accuracy, time.perf_counter() - started

    def validate(self) -> tuple[float, float]:
        """(val_loss, val_accuracy) over the whole validation split."""
        import tensorflow as tf

        self.val_metrics.reset_state()
        iterator, steps = self.validation_batches()
        if steps:
            self.steps.evaluate(iterator, tf.constant(steps, tf.int64))
        return self.val_metrics.result()

    def learning_rate(self) -> float:
        """The optimizer's current learning rate."""
        return float(np.asarray(self.optimizer.learning_rate))


def _uses_memory_pipeline(config: TrainConfig, data: DataResult, replicas: int) -> bool:
    """Whether the training split is held in memory (see `train.input_pipeline`)."""
    if config.input_pipeline != "auto":
        if config.input_pipeline == "memory" and config.workers > 1:
            raise ConfigError("train.input_pipeline=memory holds the whole split in one process; with train.workers "
                              "> 1 use stream or auto")
        return config.input_pipeline == "memory"
    split_bytes = data.records["train"] * int(np.prod(data.input_spec.shape))
    return replicas == 1 and split_bytes <= MEMORY_BUDGET_BYTES


def _memory_split(data: DataResult) -> tuple[tf.Tensor, tf.Tensor]:
    """The uint8 training split as tensors, read once from the TFRecord cache."""
    import tensorflow as tf

    images, labels = load_split(data.path, "train")
    return tf.constant(images), tf.constant(labels)


def build_trainer(config: PipelineConfig, data: DataResult, model_result: ModelResult, checkpoints: Path,
                  precision: str = "float32", strategy: Any = None, cluster: Cluster | None = None,
                  init: tuple[dict[str, Any], Any] | None = None) -> Trainer:
    """Model (from the model stage's seeded weights, or the weights of `init`'s exported model: a warm start),
    optimizer and step functions under the strategy. A checkpoint restored later overrides both."""
    import keras

    strategy = strategy or make_strategy(config.train, cluster)
    with strategy.scope():
        model = build_model(config.model, data.input_spec)
        model.load_weights(model_result.path / WEIGHTS_FILE)
        if init is not None:
            warm_start(model, init[0], init[1], data.input_spec)
        optimizer = make_optimizer(config.train, _steps_for(data.records["train"], config.data.batch_size), precision)
        optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    train_metrics, val_metrics = EpochMetrics("train"), EpochMetrics("val")
    steps = make_step_functions(model, optimizer, loss_fn, train_metrics, val_metrics, strategy,
                                jit_compile=config.train.jit_compile)
    checkpointer = Checkpointer(checkpoints, model, optimizer, config.train.checkpoints_to_keep)
    replicas = strategy.num_replicas_in_sync
    in_memory = _memory_split(data) if _uses_memory_pipeline(config.train, data, replicas) else None
    return Trainer(config, data, strategy, model, optimizer, steps, train_metrics, val_metrics, checkpointer,
                   in_memory, precision, cluster if cluster is not None and cluster.size > 1 else None)


@contextlib.contextmanager
def _peers_checked(cluster: Cluster | None, timeout: float) -> Iterator[None]:
    """On a cluster, turn TensorFlow's errors about a dead or silent peer into one TrainingError naming it."""
    import tensorflow as tf

    lost_peer = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                 tf.errors.CancelledError, tf.errors.InternalError)
    try:
        yield
    except lost_peer as exc:
        if cluster is None:
            raise
        raise worker_failure(cluster, exc, timeout) from exc


class EpochSideWork:
    """Work after an epoch that the next epoch need not wait for: TensorBoard events (their flush syncs to disk),
    the epoch callback (a Prefect API call, an upload of the checkpoint to the store). It runs on one background
    thread, one epoch deep: the next epoch trains meanwhile, and the next checkpoint is written only once this
    work is done (an upload must not see the checkpoint files rotate under it). Its errors surface there."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tapeline-epoch-end")
        self.pending: Future[None] | None = None

    def wait(self) -> None:
        """Block until the previous epoch's work is done; re-raise its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` in the background, in a copy of this thread's context (Prefect's run context lives there)."""
        self.wait()
        self.pending = self.executor.submit(contextvars.copy_context().run, work)

    def close(self) -> None:
        """Stop the thread once its work is done (errors of unfinished work were already raised by `wait`)."""
        self.executor.shutdown(wait=True)


def _report_epoch(writer: Any, row: dict[str, float], on_epoch_end: EpochCallback | None, max_epochs: int) -> None:
    """TensorBoard scalars of the epoch, then the epoch callback."""
    import tensorflow as tf

    with writer.as_default(step=int(row["epoch"])):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second"):
            tf.summary.scalar(key, row[key])
    writer.flush()
    if on_epoch_end is not None:
        on_epoch_end(row, max_epochs)


def fit(trainer: Trainer, early_stopping: EarlyStopping, run_dir: Path,
        on_epoch_end: EpochCallback | None = None, should_stop: StopCheck | None = None) -> TrainingState:
    """Train from the last checkpoint (or the start) until early stopping or the epoch limit. After each epoch's
    checkpoint (and its callback, which saves it to the store), `should_stop(history)` may end training with
    TrainingPaused; the same config trained again resumes from that checkpoint, as after a kill."""
    import tensorflow as tf

    config = trainer.config.train
    schedule = _make_lr_schedule(config)
    early_stopping.on_train_begin()
    state = trainer.checkpointer.restore_latest(early_stopping, schedule) or TrainingState(0, [], None, 0.0)
    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
    stopped = bool(state.history) and early_stopping.stopped_epoch > 0
    epoch, last = state.epoch, epoch_limit(config)
    side_work = EpochSideWork()
    try:
        while epoch < last and not stopped:
            with _peers_checked(trainer.cluster, config.worker_timeout_seconds):
                loss, accuracy, seconds = trainer.train_epoch(epoch)
                val_loss, val_accuracy = trainer.validate()
            row = {"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "val_loss": val_loss,
                   "val_accuracy": val_accuracy, "learning_rate": trainer.learning_rate(), "seconds": seconds,
                   "images_per_second": trainer.data.records["train"] / seconds}
            stopped = early_stopping.on_epoch_end(epoch, row, trainer.model.get_weights)
            if config.lr_schedule == "plateau":
                trainer.optimizer.learning_rate = schedule.on_epoch_end(row, row["learning_rate"])
            epoch += 1
            state = TrainingState(epoch, [*state.history, row], early_stopping.state(),
                                  state.wall_seconds + seconds, schedule.state())
            side_work.wait()
            with _peers_checked(trainer.cluster, config.worker_timeout_seconds):
                trainer.checkpointer.save(state, early_stopping)
            log.info(epoch_log_line(row))
            side_work.submit(partial(_report_epoch, writer, row, on_epoch_end, config.max_epochs))
            if should_stop is not None and not stopped and epoch < last:
                side_work.wait()
                if should_stop(state.history):
                    raise TrainingPaused(epoch)
        side_work.wait()
    finally:
        side_work.close()
        writer.close()  # flushed and its file closed now, not whenever the garbage collector gets to it
    restore = early_stopping.weights_to_restore()
    if restore is not None:
        trainer.model.set_weights(restore)
    return state
