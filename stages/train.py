"""The train stage: the tutorial's GradientTape loop, made correct, resumable, distributed and observable.

Shape of the tutorial (tape inside, gradient and update outside), with its fixes: the loss metric uses
`from_logits=True`; early stopping watches the validation split with Keras's exact semantics; step
functions come from a factory (no globals) and run several steps per `tf.function` call; every epoch
checkpoints model, optimizer, epoch, early-stopping state, history and RNG state so a killed run
resumes and ends where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
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
from typing import Any

import numpy as np

from stages.cache import package_versions
from stages.cluster import Cluster, check_port_free, current_cluster, worker_failure
from stages.config import PipelineConfig, TrainConfig
from stages.data import (
    Augment,
    load_split,
    make_dataset,
    make_memory_dataset,
    make_worker_dataset,
    without_autotune_thread,
)
from stages.early_stopping import EarlyStopping, ReduceLROnPlateau
from stages.errors import ConfigError, TrainingError
from stages.hardware import cpu, cpu_precision, onednn_decision
from stages.model import WEIGHTS_FILE, build_model
from stages.results import DataResult, EpochCallback, ModelResult, StageInputs, TrainResult
from stages.warmstart import describe, warm_start

MEMORY_BUDGET_BYTES = 2 * 1024**3
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds",
                   "images_per_second")
log = logging.getLogger("tapeline.train")


# ---------------------------------------------------------------- metrics and step functions

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

    train: Any
    evaluate: Any
    nonfinite_step: Any


def batch_statistics(per_example_loss: Any, logits: Any, labels: Any) -> tuple[Any, Any, Any]:
    """(summed loss, correct predictions, examples) of one batch on one replica."""
    import tensorflow as tf

    predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return (
        tf.reduce_sum(per_example_loss),
        tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32)),
        tf.cast(tf.size(labels), tf.float32),
    )


def make_step_functions(
    model: Any,
    optimizer: Any,
    loss_fn: Any,
    train_metrics: EpochMetrics,
    val_metrics: EpochMetrics,
    strategy: Any,
    *,
    jit_compile: bool = False,
) -> StepFunctions:
    """Build the train and evaluate functions for this model, optimizer, loss and metrics.

    `loss_fn` must return per-example losses (reduction=None); the step averages them over the
    global batch. Batch shapes are left unknown, so the last partial batch does not retrace.
    """
    import keras
    import tensorflow as tf

    nonfinite_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="nonfinite_step")
    scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def replica_train_step(images: Any, labels: Any) -> tuple[Any, Any, Any]:
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            per_example = loss_fn(labels, logits)
            loss = tf.nn.compute_average_loss(per_example)
            scaled = optimizer.scale_loss(loss) if scales_loss else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return batch_statistics(per_example, logits, labels)

    def replica_eval_step(images: Any, labels: Any) -> tuple[Any, Any, Any]:
        logits = tf.cast(model(images, training=False), tf.float32)
        return batch_statistics(loss_fn(labels, logits), logits, labels)

    def reduced(per_replica: tuple[Any, Any, Any]) -> list[Any]:
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

    def note_nonfinite(loss_sum: Any) -> Any:
        first = tf.logical_and(tf.logical_not(tf.math.is_finite(loss_sum)), nonfinite_step < 0)
        # optimizer.iterations has already advanced past this step
        return tf.cond(first, lambda: nonfinite_step.assign(optimizer.iterations - 1), lambda: nonfinite_step)

    def train_step(batch: tuple[Any, Any]) -> None:
        loss_sum, correct, count = reduced(strategy.run(replica_train_step, batch))
        train_metrics.update_state(loss_sum, correct, count)
        note_nonfinite(loss_sum)

    def eval_step(batch: tuple[Any, Any]) -> None:
        val_metrics.update_state(*reduced(strategy.run(replica_eval_step, batch)))

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


# ---------------------------------------------------------------- environment

def make_strategy(config: TrainConfig, cluster: Cluster | None = None) -> Any:
    """The tf.distribute strategy for `train.strategy`: MultiWorkerMirroredStrategy on a TF_CONFIG cluster (its
    collectives time out after `worker_timeout_seconds`), mirrored over several GPUs, else the default. Created
    before any other TensorFlow op: a multi-worker strategy cannot join a cluster after the runtime started."""
    import tensorflow as tf

    if cluster is not None and config.strategy not in ("auto", "multi_worker"):
        raise ConfigError(f"train.strategy={config.strategy} cannot train on the TF_CONFIG cluster; use auto or "
                          "multi_worker")
    if cluster is not None or config.strategy == "multi_worker":
        if cluster is not None:
            check_port_free(cluster)
            configure_coordination(cluster, config.worker_timeout_seconds)
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=config.worker_timeout_seconds)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    gpus = tf.config.list_logical_devices("GPU")
    name = ("mirrored" if len(gpus) > 1 else "default") if config.strategy == "auto" else config.strategy
    if name == "default":
        return tf.distribute.get_strategy()
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices)


def configure_coordination(cluster: Cluster, timeout: float) -> None:
    """Have TensorFlow's coordination service give up on a worker that never joins after `timeout` seconds
    (its default is an hour) and on one silent for min(timeout, 10 s). The strategy would configure the
    service itself with the defaults; this goes through the runtime's private API, so failing is harmless."""
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
    except ImportError:
        return
    with contextlib.suppress(Exception):
        context.context().configure_coordination_service(
            service_type="standalone", service_leader="/job:worker/replica:0/task:0",
            cluster_register_timeout_in_ms=int(timeout * 1000),
            heartbeat_timeout_in_ms=int(min(timeout, 10) * 1000),
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=cluster.size)],
        )


def precision_decision(name: str) -> dict[str, Any]:
    """`train.precision` resolved for this machine, with the reason and the CPU (model, cores, ISA features) it
    was decided on, as the train manifest and the model card record it."""
    import tensorflow as tf

    resolved = resolve_precision(name)
    if name != "auto":
        reason = "set explicitly"
    elif gpus := tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpus[0])
        reason = (f"GPU {details.get('device_name', gpus[0].name)}, compute capability "
                  f"{details.get('compute_capability')}")
    else:
        reason = cpu_precision()[1]
    return {"requested": name, "resolved": resolved, "reason": reason, "cpu": cpu()}


def resolve_precision(name: str) -> str:
    """`train.precision` with `auto` decided for this machine: mixed_float16 on GPUs with tensor cores
    (compute capability 7.0+), mixed_bfloat16 on CPUs with AMX or AVX-512 BF16, float32 elsewhere."""
    if name != "auto":
        return name
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "mixed_float16" if tuple(capability) >= (7, 0) else "float32"
    return cpu_precision()[0]


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Set Keras's global dtype policy for the block, restoring the previous one after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


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


def epoch_limit(config: TrainConfig) -> int:
    """The last epoch training may run: `max_epochs`, and under the cosine schedule no further than
    `decay_epochs`, where the rate is at its floor."""
    return min(config.max_epochs, config.decay_epochs) if config.lr_schedule == "cosine" else config.max_epochs


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


def make_lr_schedule(config: TrainConfig) -> ReduceLROnPlateau:
    """ReduceLROnPlateau on the early-stopping monitor, from the train config."""
    return ReduceLROnPlateau(monitor=config.monitor, mode=config.mode, factor=config.reduce_lr_factor,
                             patience=config.reduce_lr_patience, min_lr=config.min_learning_rate)


def seed_generator_states(model: Any) -> list[Any]:
    """The RNG state variables of the model's layers (dropout), which Keras does not checkpoint itself."""
    return [v.value for v in model.variables if "seed_generator" in v.path]


# ---------------------------------------------------------------- checkpoints

@dataclass
class TrainingState:
    """Everything a checkpoint restores besides model and optimizer variables."""

    epoch: int
    history: list[dict[str, float]]
    early_stopping: dict[str, Any] | None
    wall_seconds: float
    lr_schedule: dict[str, Any] | None = None


class Checkpointer:
    """Per-epoch checkpoints of model, optimizer, RNG state, early-stopping state and history."""

    def __init__(self, directory: Path, model: Any, optimizer: Any, keep: int) -> None:
        import tensorflow as tf

        self.state = tf.Variable("", dtype=tf.string, trainable=False)
        self.best_weights = [tf.Variable(w, trainable=False) for w in model.get_weights()]
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, state=self.state, best_weights=self.best_weights,
            rng=seed_generator_states(model),
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=keep)

    def save(self, state: TrainingState, early_stopping: EarlyStopping) -> str:
        """Write a checkpoint for the epoch just finished."""
        if early_stopping.best_weights is not None:
            for variable, value in zip(self.best_weights, early_stopping.best_weights, strict=True):
                variable.assign(value)
        self.state.assign(json.dumps(state.__dict__))
        return self.manager.save(checkpoint_number=state.epoch)

    def restore_latest(self, early_stopping: EarlyStopping, schedule: ReduceLROnPlateau) -> TrainingState | None:
        """Restore the newest readable checkpoint into the model, optimizer, `early_stopping` and `schedule`.

        A damaged checkpoint is skipped with a warning naming it; the next older one is tried (each
        successful restore overwrites every variable, so a failed attempt leaves nothing behind).
        """
        import tensorflow as tf

        candidates = list(reversed(self.manager.checkpoints))
        for prefix in candidates:
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
                state = TrainingState(**json.loads(self.state.numpy().decode()))
            except (tf.errors.OpError, ValueError, AssertionError, TypeError, KeyError, IndexError, OSError) as exc:
                log.warning("checkpoint %s is unreadable (%s); trying an older one", prefix,
                            str(exc).splitlines()[0][:200])
                continue
            if state.early_stopping is not None:
                early_stopping.load_state(state.early_stopping, [v.numpy() for v in self.best_weights])
            if state.lr_schedule is not None:
                schedule.load_state(state.lr_schedule)
            log.info("resumed from %s after epoch %d", prefix, state.epoch)
            return state
        if candidates:
            raise TrainingError(
                f"no readable checkpoint in {self.manager.directory} ({len(candidates)} damaged); delete that "
                "directory to train from the start"
            )
        return None


# ---------------------------------------------------------------- the loop

def steps_for(records: int, batch_size: int) -> int:
    """Batches in an epoch, the last partial one included."""
    return math.ceil(records / batch_size)


def epoch_log_line(row: dict[str, float]) -> str:
    """One line per epoch, for logs."""
    return (f"epoch {int(row['epoch'])}: loss {row['loss']:.4f} accuracy {row['accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_accuracy {row['val_accuracy']:.4f} "
            f"({row['seconds']:.1f} s, {row['images_per_second']:.0f} img/s)")


def progress_bar(steps: int) -> Any | None:
    """A Keras progress bar on an interactive terminal, else None (logs get one line per epoch)."""
    if not sys.stdout.isatty():
        return None
    import keras

    return keras.utils.Progbar(steps, unit_name="step")


VALIDATION_BATCH = 1024


def release_beside(holder: list[Any]) -> None:
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
    strategy: Any
    model: Any
    optimizer: Any
    steps: StepFunctions
    train_metrics: EpochMetrics
    val_metrics: EpochMetrics
    checkpointer: Checkpointer
    train_in_memory: tuple[Any, Any] | None
    precision: str = "float32"
    cluster: Cluster | None = None
    memory_iterator: Any = field(default=None, repr=False)
    memory_next_epoch: int = -1
    validation_iterator: Any = field(default=None, repr=False)
    stream_iterator: Any = field(default=None, repr=False)

    def replace_stream_iterator(self, new: Any) -> Any:
        """Make `new` the current training iterator and drop the previous one beside training."""
        release_beside([self.stream_iterator])
        self.stream_iterator = new
        return new

    def release_iterators(self) -> None:
        """Drop every tf.data iterator beside the work that follows training (saving, committing): this object's
        references go first, so the last ones are the releasing thread's (the other order raced it, and the
        teardown ran here)."""
        held = [self.memory_iterator, self.validation_iterator, self.stream_iterator]
        self.memory_iterator = self.validation_iterator = self.stream_iterator = None
        release_beside(held)

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
        return self.validation_iterator, steps_for(self.data.records["validation"], VALIDATION_BATCH)

    def check_finite(self, epoch: int) -> None:
        """Raise TrainingError naming the epoch and step of the first non-finite loss."""
        step = int(self.steps.nonfinite_step.numpy())
        if step >= 0:
            per_epoch = steps_for(self.data.records["train"], self.config.data.batch_size)
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, step {step - epoch * per_epoch + 1} "
                f"(global step {step + 1}); the last good checkpoint is "
                f"{self.checkpointer.manager.latest_checkpoint or 'none (it failed in the first epoch)'}. "
                "Lower train.learning_rate, or check the data for corrupt images"
            )

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """One pass over the training split, `steps_per_execution` batches per call; (loss, acc, seconds)."""
        import tensorflow as tf

        total = steps_for(self.data.records["train"], self.config.data.batch_size)
        chunk = self.config.train.steps_per_execution
        bar = progress_bar(total)
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


def uses_memory_pipeline(config: TrainConfig, data: DataResult, replicas: int) -> bool:
    """Whether the training split is held in memory (see `train.input_pipeline`)."""
    if config.input_pipeline != "auto":
        if config.input_pipeline == "memory" and config.workers > 1:
            raise ConfigError("train.input_pipeline=memory holds the whole split in one process; with train.workers "
                              "> 1 use stream or auto")
        return config.input_pipeline == "memory"
    split_bytes = data.records["train"] * int(np.prod(data.input_spec.shape))
    return replicas == 1 and split_bytes <= MEMORY_BUDGET_BYTES


def memory_split(data: DataResult) -> tuple[Any, Any]:
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
        optimizer = make_optimizer(config.train, steps_for(data.records["train"], config.data.batch_size), precision)
        optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    train_metrics, val_metrics = EpochMetrics("train"), EpochMetrics("val")
    steps = make_step_functions(model, optimizer, loss_fn, train_metrics, val_metrics, strategy,
                                jit_compile=config.train.jit_compile)
    checkpointer = Checkpointer(checkpoints, model, optimizer, config.train.checkpoints_to_keep)
    in_memory = memory_split(data) if uses_memory_pipeline(config.train, data, strategy.num_replicas_in_sync) else None
    return Trainer(config, data, strategy, model, optimizer, steps, train_metrics, val_metrics, checkpointer,
                   in_memory, precision, cluster if cluster is not None and cluster.size > 1 else None)


@contextlib.contextmanager
def peers_checked(cluster: Cluster | None, timeout: float) -> Iterator[None]:
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


def report_epoch(writer: Any, row: dict[str, float], on_epoch_end: EpochCallback | None, max_epochs: int) -> None:
    """TensorBoard scalars of the epoch, then the epoch callback."""
    import tensorflow as tf

    with writer.as_default(step=int(row["epoch"])):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second"):
            tf.summary.scalar(key, row[key])
    writer.flush()
    if on_epoch_end is not None:
        on_epoch_end(row, max_epochs)


def fit(trainer: Trainer, early_stopping: EarlyStopping, run_dir: Path,
        on_epoch_end: EpochCallback | None = None) -> TrainingState:
    """Train from the last checkpoint (or the start) until early stopping or the epoch limit."""
    import tensorflow as tf

    config = trainer.config.train
    schedule = make_lr_schedule(config)
    early_stopping.on_train_begin()
    state = trainer.checkpointer.restore_latest(early_stopping, schedule) or TrainingState(0, [], None, 0.0)
    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
    stopped = bool(state.history) and early_stopping.stopped_epoch > 0
    epoch, last = state.epoch, epoch_limit(config)
    side_work = EpochSideWork()
    try:
        while epoch < last and not stopped:
            with peers_checked(trainer.cluster, config.worker_timeout_seconds):
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
            with peers_checked(trainer.cluster, config.worker_timeout_seconds):
                trainer.checkpointer.save(state, early_stopping)
            log.info(epoch_log_line(row))
            side_work.submit(partial(report_epoch, writer, row, on_epoch_end, config.max_epochs))
        side_work.wait()
    finally:
        side_work.close()
    restore = early_stopping.weights_to_restore()
    if restore is not None:
        trainer.model.set_weights(restore)
    return state


# ---------------------------------------------------------------- outputs

def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """history.parquet: one row per epoch with HISTORY_COLUMNS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {c: [row[c] for row in history] for c in HISTORY_COLUMNS}
    columns["epoch"] = pa.array(columns["epoch"], pa.int32())
    pq.write_table(pa.table(columns), path)


def best_epoch_summary(state: TrainingState, early_stopping: EarlyStopping, config: TrainConfig) -> dict[str, Any]:
    """Epochs run, stop and best epochs (1-based) and the best monitored value."""
    history = state.history
    best = history[early_stopping.best_epoch] if history else {}
    return {
        "epochs_run": len(history),
        "stopped_early": early_stopping.stopped_epoch > 0,
        "stopped_epoch": early_stopping.stopped_epoch + 1 if early_stopping.stopped_epoch > 0 else None,
        "best_epoch": early_stopping.best_epoch + 1,
        "monitor": config.monitor,
        "best_value": early_stopping.best,
        "restored_best_weights": early_stopping.weights_to_restore() is not None,
        "best_val_accuracy": best.get("val_accuracy", 0.0),
        "train_seconds": state.wall_seconds,
    }


def float32_copy(model: Any, config: PipelineConfig, data: DataResult) -> Any:
    """The trained model rebuilt under the float32 policy with the same weights (mixed-precision training keeps
    float32 variables): what is saved, evaluated and exported never carries a bf16/fp16 compute policy, which
    TFLite cannot convert and serving hardware may not have."""
    copy = build_model(config.model, data.input_spec)
    copy.set_weights(model.get_weights())
    return copy


def build_train_dir(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Train (resuming from checkpoints left in `staging`) and save the model, history and summary."""
    import keras
    import tensorflow as tf

    config, data, model_result, on_epoch_end = inputs.config, inputs.data, inputs.model, inputs.on_epoch_end
    cluster = current_cluster()
    strategy = make_strategy(config.train, cluster)  # first: a cluster must be joined before any other op
    keras.utils.set_random_seed(config.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    decision = precision_decision(config.train.precision)
    precision = decision["resolved"]
    log.info("precision %s (%s)", precision, decision["reason"])
    onednn = onednn_decision()
    log.info("oneDNN kernels %s", onednn["reason"])
    init = inputs.external
    log.info("training %s", describe(init, config.train.init_from))
    with precision_policy(precision):
        trainer = build_trainer(config, data, model_result, staging / "checkpoints", precision, strategy, cluster,
                                None if init is None else (init, inputs.store))
        early_stopping = make_early_stopping(config.train)
        state = fit(trainer, early_stopping, staging, on_epoch_end)
        trainer.release_iterators()
    float32_copy(trainer.model, config, data).save(staging / "model.keras")
    write_history(staging / "history.parquet", state.history)
    summary = best_epoch_summary(state, early_stopping, config.train)
    (staging / "best.json").write_text(json.dumps(summary, indent=2))
    log.info("trained %d epochs (%s); best epoch %d, val_accuracy %.4f", summary["epochs_run"],
             f"stopped early at {summary['stopped_epoch']}" if summary["stopped_early"] else "no early stop",
             summary["best_epoch"], summary["best_val_accuracy"])
    return {
        "stage": "train", "config": config.train.model_dump(mode="json"),
        "batching": {"batch_size": config.data.batch_size, "shuffle_buffer": config.data.shuffle_buffer},
        "workers": cluster.size if cluster is not None else 1, "precision": precision,
        "hardware": {"precision": decision, "onednn": onednn, "input_pipeline": config.train.input_pipeline},
        "input_pipeline": "memory" if trainer.train_in_memory is not None else "stream",
        "seed": config.seed, "upstream": {"data": data.fingerprint, "model": model_result.fingerprint},
        "init_from": {"requested": config.train.init_from, "resolved": init}, "summary": summary,
        "versions": package_versions(),
    }


def train_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> TrainResult:
    """A TrainResult from a train manifest."""
    summary = manifest["summary"]
    return TrainResult(
        stage="train", fingerprint=manifest["fingerprint"], path=path, cached=cached, seconds=seconds,
        epochs_run=summary["epochs_run"], best_epoch=summary["best_epoch"], stopped_early=summary["stopped_early"],
        best_val_accuracy=summary["best_val_accuracy"], train_seconds=summary["train_seconds"],
    )
