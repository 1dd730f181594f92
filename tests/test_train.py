"""The train stage: loss metric from logits, no retracing, early stopping, checkpoints and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.data.readers import load_split
from stages.model import WEIGHTS_FILE
from stages.pipeline import run_data, run_model, run_train
from stages.train.loop import build_trainer, fit, make_early_stopping
from stages.train.outputs import HISTORY_COLUMNS
from tapeline.config import PipelineConfig, load_config
from tapeline.errors import TrainingError
from tapeline.results import DataResult, ModelResult
from tapeline.testing import tiny_config, tiny_overrides
from tests.helpers import Interrupted, interrupt_after

ROOT = Path(__file__).resolve().parents[1]


def upstream(config: PipelineConfig, artifacts: Path) -> tuple[DataResult, ModelResult]:
    data = run_data(config, artifacts)
    return data, run_model(config, data, artifacts)


def history(path: Path) -> list[dict]:
    return pq.read_table(path / "history.parquet").to_pylist()


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    for x, y in zip(keras.models.load_model(a).get_weights(), keras.models.load_model(b).get_weights(), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


def test_logged_val_loss_is_cross_entropy_from_logits(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1")
    result = run_train(config, *upstream(config, tmp_path), tmp_path)
    row = history(result.path)[0]
    model = keras.models.load_model(result.path / "model.keras")
    x, y = load_split(run_data(config, tmp_path).path, "validation", normalize=True)
    logits = model.predict(x, verbose=0)
    from_logits = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits))
    assert row["val_loss"] == pytest.approx(from_logits, rel=1e-4)
    tutorial_metric = keras.metrics.SparseCategoricalCrossentropy()  # the tutorial's: probabilities expected
    tutorial_metric.update_state(y, logits)
    assert abs(float(tutorial_metric.result()) - row["val_loss"]) > 0.05
    assert row["val_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)), abs=1e-6)


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_partial_last_batch_does_not_retrace(tmp_path: Path, idx_dir: Path, pipeline: str) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=3", "train.steps_per_execution=3",
                         f"train.input_pipeline={pipeline}")
    data, model = upstream(config, tmp_path)
    assert data.records["train"] % config.data.batch_size != 0  # 270 = 8 * 32 + 14
    trainer = build_trainer(config, data, model, tmp_path / "ckpt")
    fit(trainer, make_early_stopping(config.train), tmp_path / "run")
    assert trainer.steps.train.experimental_get_tracing_count() == 1
    assert trainer.steps.evaluate.experimental_get_tracing_count() == 1


def test_outputs_history_tensorboard_and_checkpoints(tmp_path: Path, idx_dir: Path) -> None:
    import tensorflow as tf

    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=3", "train.checkpoints_to_keep=2")
    result = run_train(config, *upstream(config, tmp_path), tmp_path)
    rows = history(result.path)
    assert list(rows[0]) == list(HISTORY_COLUMNS)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and result.epochs_run == 3
    assert all(r["learning_rate"] == pytest.approx(1e-3) and r["images_per_second"] > 0 for r in rows)
    assert rows[-1]["val_accuracy"] > 0.5  # the synthetic classes are learnable
    best = json.loads((result.path / "best.json").read_text())
    assert best["best_epoch"] == result.best_epoch
    assert tf.train.CheckpointManager(tf.train.Checkpoint(), str(result.path / "checkpoints"), 2).checkpoints
    assert len(list((result.path / "checkpoints").glob("ckpt-*.index"))) == 2
    events = list((result.path / "tensorboard").glob("events.out.tfevents.*"))
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value}
    assert {"loss", "val_loss", "val_accuracy", "images_per_second"} <= tags
    assert run_train(config, *upstream(config, tmp_path), tmp_path).cached


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path: Path, idx_dir: Path) -> None:
    # A tiny learning rate and a max-mode monitor with a high min_delta: no epoch "improves" after the first.
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=10", "train.patience=2", "train.monitor=val_accuracy",
                         "train.min_delta=0.5")
    result = run_train(config, *upstream(config, tmp_path), tmp_path)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    rows = history(result.path)
    assert result.best_val_accuracy == rows[0]["val_accuracy"]


def test_interrupted_run_resumes_to_the_same_end(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=4", "train.patience=3", "model.dropout=0.2")
    whole = run_train(config, *upstream(config, tmp_path / "a"), tmp_path / "a")
    data, model = upstream(config, tmp_path / "b")
    with pytest.raises(Interrupted):
        run_train(config, data, model, tmp_path / "b", on_epoch_end=interrupt_after(2))
    partial = tmp_path / "b" / "train" / f".partial-{whole.fingerprint}"
    assert (partial / "checkpoints" / "ckpt-2.index").exists()
    assert not (tmp_path / "b" / "train" / whole.fingerprint).exists()
    epochs_seen: list[int] = []
    resumed = run_train(config, data, model, tmp_path / "b", on_epoch_end=lambda r, _: epochs_seen.append(r["epoch"]))
    assert epochs_seen == [3, 4]
    assert resumed.fingerprint == whole.fingerprint
    assert (resumed.epochs_run, resumed.best_epoch) == (whole.epochs_run, whole.best_epoch)
    for a, b in zip(history(whole.path), history(resumed.path), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert_same_weights(whole.path / "model.keras", resumed.path / "model.keras")


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import stages.train.loop
    from tapeline.config import load_config
    from stages.pipeline import run_data
    from stages.pipeline import run_model
    from stages.pipeline import run_train
    artifacts, where = Path(sys.argv[1]), sys.argv[2]
    config = load_config(None, sys.argv[3:])
    if where == "mid-epoch":  # stall inside epoch 3, after its first steps, and say so
        original = stages.train.loop.Trainer.check_finite
        def stalling(self, epoch):
            original(self, epoch)
            if epoch == 2:
                (artifacts / "inside-epoch-3").touch()
                time.sleep(60)
        stages.train.loop.Trainer.check_finite = stalling
    data = run_data(config, artifacts)
    model = run_model(config, data, artifacts)
    run_train(config, data, model, artifacts, on_epoch_end=lambda row, _: time.sleep(1.5))
""")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["between-epochs", "mid-epoch"])
def test_killed_subprocess_resumes_to_the_same_end(tmp_path: Path, idx_dir: Path, where: str) -> None:
    overrides = tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=4", "train.patience=3")
    config = load_config(None, overrides)
    whole = run_train(config, *upstream(config, tmp_path / "a"), tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "b"), where, *overrides], env=env,
                             cwd=ROOT)
    # Between epochs: once the checkpoint manager's state names ckpt-2, i.e. its save is complete (the index
    # file appears a moment before the state is updated; a kill in between resumes from ckpt-1, correctly).
    state = tmp_path / "b" / "train" / f".partial-{whole.fingerprint}" / "checkpoints" / "checkpoint"
    inside = tmp_path / "b" / "inside-epoch-3"

    def reached() -> bool:
        if where == "mid-epoch":
            return inside.exists()
        return state.exists() and 'model_checkpoint_path: "ckpt-2"' in state.read_text()

    deadline = time.monotonic() + 240
    while not reached() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reached(), f"the child never reached the {where} point"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "b" / "train" / whole.fingerprint).exists()
    epochs_seen: list[int] = []
    resumed = run_train(config, *upstream(config, tmp_path / "b"), tmp_path / "b",
                        on_epoch_end=lambda r, _: epochs_seen.append(r["epoch"]))
    assert epochs_seen and epochs_seen[0] >= 3 and epochs_seen[-1] == 4
    if where == "mid-epoch":
        assert epochs_seen == [3, 4]  # epoch 3 was cut short, so it is redone from ckpt-2
    assert (resumed.epochs_run, resumed.best_epoch) == (whole.epochs_run, whole.best_epoch)
    assert_same_weights(whole.path / "model.keras", resumed.path / "model.keras")


def test_nonfinite_loss_names_epoch_and_step(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    data, model = upstream(config, tmp_path)
    poisoned = keras.models.load_model(model.path / "model.keras")
    poisoned.set_weights([np.full_like(w, np.nan) for w in poisoned.get_weights()])
    poisoned.save_weights(model.path / WEIGHTS_FILE)
    message = r"non-finite loss at epoch 1, step 1 .*none \(it failed in the first epoch\)"
    with pytest.raises(TrainingError, match=message):
        run_train(config, data, model, tmp_path)
    assert not (tmp_path / "train" / "manifest.json").exists()


def test_same_seed_same_history(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=2")
    a = run_train(config, *upstream(config, tmp_path / "a"), tmp_path / "a")
    b = run_train(config, *upstream(config, tmp_path / "b"), tmp_path / "b")
    for x, y in zip(history(a.path), history(b.path), strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains(tmp_path: Path, idx_dir: Path, precision: str) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=2", f"train.precision={precision}")
    result = run_train(config, *upstream(config, tmp_path), tmp_path)
    rows = history(result.path)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["val_accuracy"] > 0.3
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the stage


MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pathlib import Path
    import pyarrow.parquet as pq
    from tapeline.config import load_config
    from stages.pipeline import run_data
    from stages.pipeline import run_model
    from stages.pipeline import run_train
    out = {}
    for strategy in ("default", "mirrored"):
        config = load_config(None, sys.argv[2:] + [f"train.strategy={strategy}"])
        artifacts = Path(sys.argv[1]) / strategy
        data = run_data(config, artifacts)
        result = run_train(config, data, run_model(config, data, artifacts), artifacts)
        out[strategy] = pq.read_table(result.path / "history.parquet").to_pylist()[0]
    out["replicas"] = len(tf.config.list_logical_devices("CPU"))
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path: Path, idx_dir: Path) -> None:
    # Both read the TFRecord stream: the in-memory pipeline is single-replica only.
    overrides = ["preset=v1", f"data.source=idx:{idx_dir}", "data.shards=2", "model.conv_filters=[8, 16]",
                 "model.dense_units=16", "train.max_epochs=1", "train.steps_per_execution=4",
                 "train.input_pipeline=stream"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(tmp_path), *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    # Same global batch, same data order, gradients averaged over the global batch: the only difference
    # is float summation order in the all-reduce, so the epoch losses agree to ~1e-5 relative.
    assert out["mirrored"]["loss"] == pytest.approx(out["default"]["loss"], rel=1e-3)
    assert out["mirrored"]["val_loss"] == pytest.approx(out["default"]["val_loss"], rel=1e-3)


def test_memory_pipeline_matches_the_stream_reader(tmp_path: Path, idx_dir: Path) -> None:
    import tensorflow as tf

    from stages.data.readers import make_dataset, make_memory_dataset

    config = tiny_config(f"idx:{idx_dir}")
    data = run_data(config, tmp_path)
    images, labels = load_split(data.path, "train")
    memory = list(make_memory_dataset(tf.constant(images), tf.constant(labels), 32, seed=0, epoch=3))
    stream = list(make_dataset(data.path, "train", 32, training=True, epoch=3))
    assert [len(b[1]) for b in memory] == [len(b[1]) for b in stream] == [32] * 8 + [14]

    def rows(batches) -> list[bytes]:
        return sorted(x.numpy().tobytes() + bytes([int(y)]) for b in batches for x, y in zip(*b, strict=True))

    assert rows(memory) == rows(stream)  # the same normalized examples, each exactly once per epoch
    again = list(make_memory_dataset(tf.constant(images), tf.constant(labels), 32, seed=0, epoch=3))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(memory, again, strict=True))


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_both_input_pipelines_train(tmp_path: Path, idx_dir: Path, pipeline: str) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=2", f"train.input_pipeline={pipeline}")
    data, model = upstream(config, tmp_path)
    trainer = build_trainer(config, data, model, tmp_path / "ckpt")
    assert (trainer.train_in_memory is not None) == (pipeline == "memory")
    fit(trainer, make_early_stopping(config.train), tmp_path / "run")
    assert trainer.val_metrics.result()[1] > 0.3


def test_training_and_validation_iterators_have_no_autotune_thread(tmp_path: Path, idx_dir: Path) -> None:
    # tf.data's autotune thread makes deleting an iterator wait for its next wake (5.11 s and 10.23 s after the
    # iterator started, measured; later wakes inferred): a finished run's process waited 20-30 s to exit with the
    # full defaults, and
    # stream epochs ran at half speed beside the previous epoch's teardown.
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=2", "train.input_pipeline=memory")
    data, model = upstream(config, tmp_path)
    trainer = build_trainer(config, data, model, tmp_path / "ckpt")
    training = trainer.training_batches(0)
    validation, steps = trainer.validation_batches()
    assert training._dataset.options().autotune.enabled is False
    assert validation._dataset.options().autotune.enabled is False
    streamed = build_trainer(tiny_config(f"idx:{idx_dir}", "train.input_pipeline=stream"), data, model,
                             tmp_path / "ckpt-stream").training_batches(0)
    assert streamed._dataset.options().autotune.enabled is False
    import tensorflow as tf

    on_a_cluster = trainer.worker_batches(0, tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1))
    assert on_a_cluster.options().autotune.enabled is False
    # the same batches as with the thread: only how the pipeline is tuned changes
    first = next(training)[1].numpy()
    images, labels = trainer.train_in_memory
    from stages.data.readers import make_memory_dataset

    with_thread = make_memory_dataset(images, labels, config.data.batch_size, seed=config.seed)
    assert with_thread.options().autotune.enabled is not False  # TensorFlow's default: the trainer chose
    assert np.array_equal(first, next(iter(with_thread))[1].numpy()) and steps == 1
