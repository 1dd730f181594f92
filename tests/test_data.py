"""The data stage: sources, splits, TFRecord cache, manifests, readers and bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.data.readers import load_split, make_dataset
from stages.data.sources.base import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES
from stages.data.sources.idx import parse_idx
from stages.data.sources.resolve import resolve_source
from stages.graph import find_output
from stages.pipeline import run_data
from tapeline.cache import manifest_problem, read_manifest
from tapeline.errors import DataSourceError, MissingUpstreamError
from tapeline.testing import idx_bytes, png_bytes, synthetic_images, tiny_config, write_idx_dir


def sorted_rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Order-free comparison key of (image, label) pairs."""
    return sorted(img.tobytes() + bytes([int(lab)]) for img, lab in zip(images, labels, strict=True))


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_equals_the_source(tmp_path: Path, gz: bool) -> None:
    source = write_idx_dir(tmp_path / "src", gz=gz)
    result = run_data(tiny_config(f"idx:{source}"), tmp_path / "artifacts")
    assert result.records == {"train": 270, "validation": 30, "test": 100}
    assert result.input_spec.shape == (28, 28, 1)
    assert result.input_spec.class_names == tuple(str(i) for i in range(10))
    train_x, train_y = synthetic_images(300)
    test_x, test_y = synthetic_images(100, seed=1)
    got_train = [load_split(result.path, s) for s in ("train", "validation")]
    got_x = np.concatenate([x for x, _ in got_train])[..., 0]
    got_y = np.concatenate([y for _, y in got_train])
    assert sorted_rows(got_x, got_y) == sorted_rows(train_x, train_y)
    x, y = load_split(result.path, "test")
    np.testing.assert_array_equal(x[..., 0], test_x)
    np.testing.assert_array_equal(y, test_y)


def test_validation_split_is_stratified_and_deterministic(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    first = run_data(config, tmp_path / "a")
    second = run_data(config, tmp_path / "b")
    assert first.fingerprint == second.fingerprint
    manifest = read_manifest(first.path)
    assert manifest["splits"]["validation"]["class_counts"] == [3] * 10
    assert manifest["splits"]["train"]["class_counts"] == [27] * 10
    _, val_a = load_split(first.path, "validation")
    _, val_b = load_split(second.path, "validation")
    np.testing.assert_array_equal(val_a, val_b)


def test_manifest_lists_shards_with_sizes_and_checksums(artifacts: Path, idx_dir: Path) -> None:
    result = run_data(tiny_config(f"idx:{idx_dir}", "data.shards=3"), artifacts)
    manifest = read_manifest(result.path)
    names = [f["name"] for f in manifest["splits"]["train"]["files"]]
    assert names == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    for entry in manifest["files"]:
        assert (result.path / entry["name"]).stat().st_size == entry["bytes"]
        assert len(entry["sha256"]) == 64
    assert manifest["encoding"] == "uint8"
    assert manifest["input_spec"] == {"shape": [28, 28, 1], "class_names": [str(i) for i in range(10)]}
    assert manifest["source"]["identity"][0]["kind"] == "idx"
    assert not any(p.name.startswith(".partial") for p in (artifacts / "data").iterdir())


def test_cache_hit_does_not_rewrite(artifacts: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    first = run_data(config, artifacts)
    mtimes = {p: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = run_data(config, artifacts)
    assert (first.cached, second.cached) == (False, True)
    assert second.fingerprint == first.fingerprint
    assert {p: p.stat().st_mtime_ns for p in second.path.iterdir()} == mtimes


def test_fingerprint_changes_with_config_and_source(tmp_path: Path) -> None:
    source = write_idx_dir(tmp_path / "src")
    artifacts = tmp_path / "artifacts"
    base = run_data(tiny_config(f"idx:{source}"), artifacts).fingerprint
    assert run_data(tiny_config(f"idx:{source}", "seed=1"), artifacts).fingerprint != base
    assert run_data(tiny_config(f"idx:{source}", "data.limit=200"), artifacts).fingerprint != base
    # Reader-only settings do not change the stored data.
    assert run_data(tiny_config(f"idx:{source}", "data.batch_size=8"), artifacts).fingerprint == base
    write_idx_dir(source, seed=5)
    changed = run_data(tiny_config(f"idx:{source}"), artifacts)
    assert changed.fingerprint != base and not changed.cached
    assert len([p for p in (artifacts / "data").iterdir() if not p.name.startswith(".")]) == 4


def test_limit_caps_training_examples(artifacts: Path, idx_dir: Path) -> None:
    result = run_data(tiny_config(f"idx:{idx_dir}", "data.limit=100"), artifacts)
    assert result.records["train"] + result.records["validation"] == 100
    assert 8 <= result.records["validation"] <= 12  # per-class rounding of 10 %
    assert result.records["test"] == 100


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shard_is_detected_and_rebuilt(artifacts: Path, idx_dir: Path, damage: str) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    first = run_data(config, artifacts)
    shard = first.path / "train-00000-of-00002.tfrecord"
    if damage == "truncate":
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    else:
        shard.unlink()
    assert manifest_problem(first.path) is not None
    again = run_data(config, artifacts)
    assert not again.cached and again.fingerprint == first.fingerprint
    assert manifest_problem(again.path) is None
    assert any(p.name.startswith(".invalid-") for p in (artifacts / "data").iterdir())


def test_flipped_byte_needs_verify(artifacts: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    first = run_data(config, artifacts)
    shard = first.path / "test-00000-of-00002.tfrecord"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run_data(config, artifacts).cached  # sizes still match
    assert manifest_problem(first.path, verify=True) == f"{shard} does not match its sha256 checksum"
    rebuilt = run_data(config, artifacts, verify=True)
    assert not rebuilt.cached and manifest_problem(rebuilt.path, verify=True) is None


def test_staging_directory_without_manifest_is_never_used(artifacts: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    fp = run_data(config, artifacts).fingerprint
    final = artifacts / "data" / fp
    (final / "manifest.json").unlink()
    with pytest.raises(MissingUpstreamError, match="run `tapeline stage data`"):
        find_output("data", config, artifacts)
    assert not run_data(config, artifacts).cached


def test_training_reader_normalizes_and_is_seeded_per_epoch(artifacts: Path, idx_dir: Path) -> None:
    result = run_data(tiny_config(f"idx:{idx_dir}"), artifacts)

    def labels(epoch: int, seed: int = 0) -> list[int]:
        ds = make_dataset(result.path, "train", 32, training=True, shuffle_buffer=64, seed=seed, epoch=epoch)
        return [int(v) for _, y in ds for v in y]

    images, _ = next(iter(make_dataset(result.path, "train", 32, training=True)))
    assert images.dtype.name == "float32" and images.shape == (32, 28, 28, 1)
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 1.0
    assert labels(0) == labels(0)
    assert labels(0) != labels(1)
    assert sorted(labels(0)) == sorted(labels(1))
    assert len(labels(0)) == 270


# ---------------------------------------------------------------- bad IDX input

def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    source = write_idx_dir(tmp_path / "src")
    (source / "train-labels-idx1-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(300))
    with pytest.raises(DataSourceError, match=r"train-labels-idx1-ubyte: bad IDX magic number 12345678"):
        run_data(tiny_config(f"idx:{source}"), tmp_path / "a")


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    source = write_idx_dir(tmp_path / "src", gz=True)
    path = source / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-50]))
    with pytest.raises(DataSourceError, match=r"t10k-images-idx3-ubyte.gz: header declares dims \[100, 28, 28\]"):
        run_data(tiny_config(f"idx:{source}"), tmp_path / "a")


def test_lying_header_does_not_allocate() -> None:
    huge = bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") + (2**16).to_bytes(4, "big") * 2 + bytes(10)
    with pytest.raises(DataSourceError, match="the file is truncated or corrupt"):
        parse_idx(huge, "huge")


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    source = write_idx_dir(tmp_path / "src")
    (source / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(299, np.uint8)))
    with pytest.raises(DataSourceError, match=r"holds 300 images but .*train-labels-idx1-ubyte holds 299 labels"):
        run_data(tiny_config(f"idx:{source}"), tmp_path / "a")


def test_wrong_dims_are_rejected(tmp_path: Path) -> None:
    source = write_idx_dir(tmp_path / "src")
    (source / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(300, np.uint8)))
    with pytest.raises(DataSourceError, match="expected uint8 images of 3 or 4 dims"):
        run_data(tiny_config(f"idx:{source}"), tmp_path / "a")


def test_missing_files_and_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="directory does not exist"):
        resolve_source(f"idx:{tmp_path / 'nowhere'}")
    source = write_idx_dir(tmp_path / "src")
    (source / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataSourceError, match=r"missing t10k-labels-idx1-ubyte \(raw or .gz\)"):
        run_data(tiny_config(f"idx:{source}"), tmp_path / "a")


# ---------------------------------------------------------------- named sources

def test_named_source_prefers_tapeline_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_dir(tmp_path / "data" / "mnist", gz=True)
    monkeypatch.setenv("TAPELINE_DATA_DIR", str(tmp_path / "data"))
    result = run_data(tiny_config("mnist"), tmp_path / "a")
    assert result.records["test"] == 100
    assert read_manifest(result.path)["source"]["identity"][0]["kind"] == "idx"


def test_offline_without_local_copy_names_both_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    monkeypatch.setenv("TAPELINE_DATA_DIR", str(tmp_path / "empty"))

    def offline() -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DataSourceError) as info:
        run_data(tiny_config("mnist"), tmp_path / "a")
    message = str(info.value)
    assert "$TAPELINE_DATA_DIR/mnist/" in message and "connect to the internet" in message
    assert "network is unreachable" in message
    assert not (tmp_path / "a" / "data").exists() or not any((tmp_path / "a" / "data").glob("[!.]*"))


def test_keras_download_path_with_a_local_mock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    train = synthetic_images(200)
    test = synthetic_images(50, seed=1)
    monkeypatch.setenv("TAPELINE_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", lambda: (train, test))
    result = run_data(tiny_config("mnist"), tmp_path / "a")
    assert result.records == {"train": 180, "validation": 20, "test": 50}
    assert read_manifest(result.path)["source"]["identity"] == [{"kind": "keras", "name": "mnist"}]


# ---------------------------------------------------------------- TFDS

def test_tfds_source_on_mock_data(tmp_path: Path) -> None:
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=60):
        # TFDS mock data repeats the same images in every split: keep them, this test is about reading TFDS
        result = run_data(tiny_config("tfds:cifar10", "data.drop_test_duplicates=false"), tmp_path / "a")
    assert result.input_spec.shape == (32, 32, 3)
    assert len(result.input_spec.class_names) == 10
    assert result.records["train"] + result.records["validation"] == 60
    assert result.records["test"] == 60
    identity = read_manifest(result.path)["source"]["identity"][0]
    assert identity["kind"] == "tfds" and identity["name"] == "cifar10" and identity["version"]


# ---------------------------------------------------------------- Parquet

def parquet_table(n: int = 120, png: bool = True, split: bool = True, seed: int = 0) -> pa.Table:
    images, labels = synthetic_images(n, classes=4, seed=seed)
    columns = {
        "image": [png_bytes(img) for img in images] if png else [img.reshape(-1).tolist() for img in images],
        "label": pa.array(labels.astype(np.int64)),
    }
    if split:
        columns["split"] = ["test" if i % 5 == 0 else "train" for i in range(n)]
    return pa.table(columns)


@pytest.mark.parametrize("png", [True, False])
def test_parquet_source_png_and_list(tmp_path: Path, png: bool) -> None:
    pq.write_table(parquet_table(png=png), tmp_path / "images.parquet")
    result = run_data(tiny_config(f"parquet:{tmp_path / 'images.parquet'}"), tmp_path / "a")
    assert result.records["test"] == 24
    assert result.records["train"] + result.records["validation"] == 96
    assert result.input_spec.class_names == ("0", "1", "2", "3")
    x, y = load_split(result.path, "test")
    images, labels = synthetic_images(120, classes=4)
    np.testing.assert_array_equal(x[..., 0], images[::5])
    np.testing.assert_array_equal(y, labels[::5])


def test_parquet_directory_without_split_carves_a_test_split(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    pq.write_table(parquet_table(60, split=False), tmp_path / "drop" / "a.parquet")
    pq.write_table(parquet_table(60, split=False, seed=3), tmp_path / "drop" / "b.parquet")
    result = run_data(tiny_config(f"parquet:{tmp_path / 'drop'}"), tmp_path / "a")
    assert sum(result.records.values()) == 120
    assert result.records["test"] == 12


def test_extra_parquet_data_is_added_and_changes_the_fingerprint(tmp_path: Path, idx_dir: Path) -> None:
    base = run_data(tiny_config(f"idx:{idx_dir}"), tmp_path / "a")
    images, labels = synthetic_images(40, seed=9)
    (tmp_path / "extra").mkdir()
    pq.write_table(pa.table({"image": [png_bytes(i) for i in images], "label": pa.array(labels.astype(np.int64))}),
                   tmp_path / "extra" / "new.parquet")
    more = run_data(tiny_config(f"idx:{idx_dir}", f"data.extra={tmp_path / 'extra'}"), tmp_path / "a")
    assert more.fingerprint != base.fingerprint
    assert more.records["train"] + more.records["validation"] == 340


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"image": [b"x"], "split": ["train"]}), "missing column(s) label"),
        (pa.table({"image": [b"x"], "label": ["cat"]}), "column 'label' must be integers"),
        (pa.table({"image": [b"not a png"], "label": [1]}), "row 0: image bytes cannot be decoded"),
        (pa.table({"image": [png_bytes(np.zeros((28, 28), np.uint8)), png_bytes(np.zeros((20, 20), np.uint8))],
                   "label": [0, 1]}), "mixed image sizes: image 1 is [20, 20, 1]"),
        (pa.table({"image": [[1, 2, 3]], "label": [0]}), "a list of 3 pixels is not square"),
        (pa.table({"image": [png_bytes(np.zeros((4, 4), np.uint8))], "label": [0], "split": ["dev"]}),
         "column 'split' must be 'train' or 'test'"),
        (pa.table({"image": [png_bytes(np.zeros((4, 4), np.uint8))], "label": [-1]}), "label values must be in"),
    ],
)
def test_bad_parquet_input_is_named(tmp_path: Path, table: pa.Table, message: str) -> None:
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataSourceError) as info:
        run_data(tiny_config(f"parquet:{tmp_path / 'bad.parquet'}"), tmp_path / "a")
    assert message in str(info.value) and "bad.parquet" in str(info.value)


def test_parquet_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="no Parquet files found"):
        resolve_source(f"parquet:{tmp_path}/*.parquet")


# ---------------------------------------------------------------- real data

@pytest.mark.slow
def test_real_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is not installed: apt-get install dataset-fashion-mnist")
    monkeypatch.delenv("TAPELINE_DATA_DIR", raising=False)
    result = run_data(tiny_config("fashion_mnist", "data.shards=4"), tmp_path / "a")
    assert result.records == {"train": 54000, "validation": 6000, "test": 10000}
    assert result.input_spec.class_names == FASHION_MNIST_CLASSES
    manifest = read_manifest(result.path)
    assert manifest["splits"]["validation"]["class_counts"] == [600] * 10
    assert sum(f["bytes"] for f in manifest["files"]) > 70000 * 784
    assert run_data(tiny_config("fashion_mnist", "data.shards=4"), tmp_path / "a").cached


def test_hand_encoded_examples_are_tensorflow_examples() -> None:
    import tensorflow as tf

    from stages.data.records import serialize_example

    rng = np.random.default_rng(0)
    for shape, label in (((28, 28, 1), 0), ((5, 7, 3), 9), ((96, 96, 3), 300), ((1, 1, 1), 127)):
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        parsed = tf.train.Example.FromString(serialize_example(image, label))
        expected = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}))
        assert parsed == expected


def test_framed_records_equal_hand_encoded_examples() -> None:
    from stages.data.records import example_frame, serialize_example

    rng = np.random.default_rng(1)
    for shape, label in (((28, 28, 1), 0), ((5, 7, 3), 9), ((96, 96, 3), 300), ((1, 1, 1), 127), ((2, 2, 1), 128)):
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        before, after = example_frame(image.nbytes, label)
        assert before + image.tobytes() + after == serialize_example(image, label)
