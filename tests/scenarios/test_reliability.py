"""Faults and hostile input: kills, corruption, concurrent runs, full disks, degenerate datasets, random bytes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.data.sources.idx import parse_idx
from stages.data.sources.parquet import read_parquet_file
from stages.pipeline import record_run, registry_row, run_all, run_data
from tapeline.cache import file_lock, manifest_problem
from tapeline.errors import CacheError, DataSourceError, LockTimeoutError, TrainingError
from tapeline.registry import POINTER, production, read_runs
from tapeline.testing import idx_bytes, png_bytes, synthetic_images, tiny_config, tiny_overrides, write_idx_dir
from tests.helpers import Interrupted, interrupt_after, reference_test_accuracy

ROOT = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import stages.data.stage, stages.export, stages.promotion
    from tapeline.config import load_config
    from stages.pipeline import run_all
    where = sys.argv[2]

    def stall(original):
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            time.sleep(60)
            return result
        return wrapper

    if where == "data":
        stages.data.stage.write_shards = stall(stages.data.stage.write_shards)
    elif where == "export":
        stages.export.write_saved_model = stall(stages.export.write_saved_model)
    elif where == "promotion":
        stages.promotion.publish = stall(stages.promotion.publish)
    run_all(load_config(None, sys.argv[3:]), Path(sys.argv[1]))
""")


def kill_when(artifacts: Path, where: str, overrides: list[str], ready) -> None:
    """Run a pipeline in a child that stalls at `where`; SIGKILL it once `ready()` is true."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(artifacts), where, *overrides], env=CHILD_ENV,
                             cwd=ROOT)
    deadline = time.monotonic() + 240
    while not ready() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready(), f"the child never reached {where} (exit {child.poll()})"
    child.send_signal(signal.SIGKILL)
    child.wait()


def valid_outputs(artifacts: Path, stage: str) -> list[Path]:
    root = artifacts / stage
    return [p for p in root.iterdir() if not p.name.startswith(".") and manifest_problem(p) is None] \
        if root.exists() else []


# ---------------------------------------------------------------- kills

@pytest.mark.slow
def test_kill_during_tfrecord_write(tmp_path: Path, idx_dir: Path) -> None:
    artifacts = tmp_path / "a"
    overrides = tiny_overrides(f"idx:{idx_dir}")
    kill_when(artifacts, "data", overrides, lambda: any((artifacts / "data").glob(".partial-*/*.tfrecord")))
    assert valid_outputs(artifacts, "data") == []  # the partial directory is not an output
    results = run_all(tiny_config(f"idx:{idx_dir}"), artifacts)
    assert not results["data"].cached and manifest_problem(results["data"].path) is None
    assert not list((artifacts / "data").glob(".partial-*"))


@pytest.mark.slow
def test_kill_during_export_then_rerun(tmp_path: Path, idx_dir: Path) -> None:
    artifacts = tmp_path / "a"
    overrides = tiny_overrides(f"idx:{idx_dir}")
    kill_when(artifacts, "export", overrides, lambda: any((artifacts / "export").glob(".partial-*/saved_model")))
    assert valid_outputs(artifacts, "export") == [] and production(artifacts) is None
    results = run_all(tiny_config(f"idx:{idx_dir}"), artifacts)
    assert [results[s].cached for s in ("data", "model", "train", "evaluate")] == [True] * 4
    assert not results["export"].cached and results["promotion"].promoted


@pytest.mark.slow
def test_kill_during_promotion_keeps_production_complete(tmp_path: Path, idx_dir: Path) -> None:
    artifacts = tmp_path / "a"
    first = run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1"), artifacts)
    assert production(artifacts)["version"] == "v0001"
    overrides = tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=4")
    kill_when(artifacts, "promotion", overrides, lambda: (artifacts / "models" / "v0002").exists())
    pointer = production(artifacts)  # validates the version's files
    assert pointer["version"] == "v0001" and pointer["train_fingerprint"] == first["train"].fingerprint
    again = run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=4"), artifacts)
    assert again["train"].cached and again["promotion"].promoted
    assert production(artifacts)["version"] == "v0003"  # v0002 is complete but was never pointed at


# ---------------------------------------------------------------- corruption

def test_corrupt_manifest_is_rebuilt(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    first = run_data(config, tmp_path)
    (first.path / "manifest.json").write_text('{"fingerprint": "x", "files": [')
    assert "not valid JSON" in manifest_problem(first.path)
    again = run_data(config, tmp_path)
    assert not again.cached and manifest_problem(again.path) is None


def interrupted_checkpoints(tmp_path: Path, idx_dir: Path, epochs: int):
    """Train a tiny model, interrupt it after `epochs` epochs; returns (run again, checkpoints dir)."""
    from stages.graph import output_path
    from stages.pipeline import run_model, run_train

    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=4", "train.patience=3")
    data = run_data(config, tmp_path)
    model = run_model(config, data, tmp_path)
    with pytest.raises(Interrupted):
        run_train(config, data, model, tmp_path, on_epoch_end=interrupt_after(epochs))
    checkpoints = tmp_path / "train" / f".partial-{output_path('train', config, tmp_path).name}" / "checkpoints"
    return (lambda **kwargs: run_train(config, data, model, tmp_path, **kwargs)), checkpoints


def test_damaged_checkpoint_falls_back_to_an_older_one(tmp_path: Path, idx_dir: Path) -> None:
    train_again, checkpoints = interrupted_checkpoints(tmp_path, idx_dir, 3)
    newest = next(checkpoints.glob("ckpt-3.data-*"))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    seen: list[int] = []
    result = train_again(on_epoch_end=lambda r, _: seen.append(r["epoch"]))
    assert seen == [3, 4] and result.epochs_run == 4  # resumed from ckpt-2 and redid epoch 3


def test_all_checkpoints_damaged_says_what_to_do(tmp_path: Path, idx_dir: Path) -> None:
    train_again, checkpoints = interrupted_checkpoints(tmp_path, idx_dir, 2)
    for path in checkpoints.glob("ckpt-*.data-*"):
        path.write_bytes(b"")
    with pytest.raises(TrainingError, match=r"no readable checkpoint in .*\(2 damaged\); delete that directory"):
        train_again()


def test_corrupt_registry_is_reported_and_set_aside(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1")
    results = run_all(config, tmp_path)
    record_run(tmp_path, registry_row("one", config, results))
    (tmp_path / "registry.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(CacheError, match=r"registry.parquet is corrupt .*move it aside"):
        read_runs(tmp_path)
    record_run(tmp_path, registry_row("two", config, results))
    assert [r["run_id"] for r in read_runs(tmp_path)] == ["two"]
    assert list(tmp_path.glob(".invalid-registry.parquet-*"))


def test_damaged_production_model_is_reported(tmp_path: Path, idx_dir: Path) -> None:
    from tapeline.predict import predict

    run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1"), tmp_path)
    tflite = tmp_path / "models" / "v0001" / "model.tflite"
    tflite.write_bytes(tflite.read_bytes()[:100])
    with pytest.raises(CacheError, match=r"production model v0001 is damaged: .*model.tflite has 100 bytes"):
        predict([tmp_path / "x.png"], None, tmp_path)


def test_production_pointer_cannot_escape_the_artifacts(tmp_path: Path, idx_dir: Path) -> None:
    run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1"), tmp_path)
    pointer_path = tmp_path / "models" / POINTER
    pointer = json.loads(pointer_path.read_text())
    pointer_path.write_text(json.dumps({**pointer, "path": "models/../../outside/v0001"}))
    with pytest.raises(CacheError, match="outside"):
        production(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "models" / "v0009").symlink_to(tmp_path / "elsewhere")
    pointer_path.write_text(json.dumps({**pointer, "path": "models/v0009"}))
    with pytest.raises(CacheError, match="outside"):
        production(tmp_path)


# ---------------------------------------------------------------- concurrency and locks

CONCURRENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tapeline.config import load_config
    from stages.pipeline import new_run_id, record_run, registry_row, run_all
    config = load_config(None, sys.argv[2:])
    results = run_all(config, Path(sys.argv[1]))
    record_run(Path(sys.argv[1]), registry_row(new_run_id(), config, results))
    print(results["data"].cached, results["train"].cached, results["promotion"].decision)
""")


@pytest.mark.slow
def test_two_runs_at_once_share_the_cache_and_promote_one_at_a_time(tmp_path: Path, idx_dir: Path) -> None:
    artifacts = tmp_path / "a"
    overrides = tiny_overrides(f"idx:{idx_dir}")
    children = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(artifacts), *overrides], env=CHILD_ENV,
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=300)[0].strip().splitlines()[-1] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    data_cached = sorted(line.split()[0] for line in outputs)
    assert data_cached == ["False", "True"]  # built once; the other waited on the lock and reused it
    decisions = sorted(line.split(" ", 2)[2] for line in outputs)
    assert decisions[0] == "already production (v0001)" and decisions[1].startswith("promoted")
    assert len(read_runs(artifacts)) == 2
    assert len(valid_outputs(artifacts, "data")) == 1 and not list((artifacts / "data").glob(".invalid-*"))
    assert production(artifacts)["version"] == "v0001"


def test_promotion_lock_times_out_with_a_clear_message(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1", "export.lock_timeout_seconds=0.5")
    with file_lock(tmp_path / "models" / ".promotion.lock", 5, "test"):
        with pytest.raises(LockTimeoutError, match=r"promotion: another tapeline process has held .* raise"):
            run_all(config, tmp_path)


# ---------------------------------------------------------------- disk full

def test_disk_full_leaves_nothing_that_looks_complete(tmp_path: Path, idx_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.data.stage

    original = stages.data.stage.write_shards

    def full_disk(directory: Path, split: str, *args, **kwargs):
        if split == "validation":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(directory, split, *args, **kwargs)

    monkeypatch.setattr(stages.data.stage, "write_shards", full_disk)
    with pytest.raises(CacheError, match=r"disk full while writing .*free space under"):
        run_data(tiny_config(f"idx:{idx_dir}"), tmp_path)
    assert [p.name for p in (tmp_path / "data").iterdir() if not p.name.endswith(".lock")] == []


# ---------------------------------------------------------------- degenerate datasets

def test_single_class_dataset_is_rejected(tmp_path: Path) -> None:
    source = tmp_path / "one"
    source.mkdir()
    images, _ = synthetic_images(100)
    for prefix, n in (("train", 80), ("t10k", 20)):
        (source / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images[:n]))
        (source / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(n, np.uint8)))
    with pytest.raises(DataSourceError, match="needs at least two classes"):
        run_data(tiny_config(f"idx:{source}"), tmp_path / "a")


def test_dataset_smaller_than_one_batch_trains(tmp_path: Path) -> None:
    source = write_idx_dir(tmp_path / "src", n_train=20, n_test=10)
    results = run_all(tiny_config(f"idx:{source}", "train.max_epochs=2"), tmp_path / "a")
    assert results["data"].records == {"train": 10, "validation": 10, "test": 10}
    assert results["train"].epochs_run == 2
    assert results["evaluate"].test_accuracy == reference_test_accuracy(results["data"].path, results["train"].path)


def test_class_missing_from_validation_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, labels = synthetic_images(60, classes=3)
    labels[labels == 2] = 0
    labels[0] = 2  # class 2 has a single training example
    table = pa.table({"image": [png_bytes(i) for i in images], "label": pa.array(labels.astype(np.int64))})
    pq.write_table(table, tmp_path / "d.parquet")
    with caplog.at_level("WARNING", logger="tapeline.data"):
        result = run_data(tiny_config(f"parquet:{tmp_path / 'd.parquet'}"), tmp_path / "a")
    assert "classes ['2'] have no validation examples" in caplog.text
    assert result.input_spec.class_names == ("0", "1", "2")


# ---------------------------------------------------------------- random bytes

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_idx_parser_on_random_bytes(data: bytes) -> None:
    try:
        array = parse_idx(data, "random")
    except DataSourceError:
        return
    assert array.size * array.dtype.itemsize == len(data) - 4 - 4 * data[3]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(-3, 3), st.binary(min_size=700, max_size=700))
def test_idx_parser_accepts_exactly_the_consistent_files(dims: list[int], surplus: int, body: bytes) -> None:
    size = max(0, int(np.prod(dims)) + surplus)
    data = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body[:size]
    if size == int(np.prod(dims)):
        array = parse_idx(data, "consistent")
        assert array.shape == tuple(dims) and array.tobytes() == body[:size]
    else:
        with pytest.raises(DataSourceError, match="header declares dims"):
            parse_idx(data, "inconsistent")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000), st.booleans())
def test_parquet_reader_on_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes, valid_head: bool
                                       ) -> None:
    path = tmp_path_factory.mktemp("pq") / "random.parquet"
    path.write_bytes((b"PAR1" + data + b"PAR1") if valid_head else data)
    with pytest.raises(DataSourceError, match="not a readable Parquet file"):
        read_parquet_file(path)


IMAGE_CELLS = st.one_of(
    st.binary(max_size=300).map(lambda raw: ("random", raw)),
    st.integers(0, 2**32 - 1).map(lambda seed: ("png", seed)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(IMAGE_CELLS, min_size=1, max_size=4))
def test_parquet_reader_decodes_good_cells_and_names_bad_ones(tmp_path_factory: pytest.TempPathFactory,
                                                               cells: list[tuple[str, object]]) -> None:
    pixels = {i: np.random.default_rng(v).integers(0, 256, (6, 5), dtype=np.uint8)
              for i, (kind, v) in enumerate(cells) if kind == "png"}
    encoded = [png_bytes(pixels[i]) if i in pixels else raw for i, (_, raw) in enumerate(cells)]
    path = tmp_path_factory.mktemp("pq") / "cells.parquet"
    pq.write_table(pa.table({"image": encoded, "label": list(range(len(cells)))}), path)
    bad = [i for i in range(len(cells)) if i not in pixels]
    if bad:
        with pytest.raises(DataSourceError, match=f"row {bad[0]}: image bytes cannot be decoded"):
            read_parquet_file(path)
        return
    images, labels, splits = read_parquet_file(path)
    assert labels == list(range(len(cells))) and splits == ["train"] * len(cells)
    assert all(np.array_equal(image[..., 0], pixels[i]) for i, image in enumerate(images))
