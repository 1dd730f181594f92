"""Hostile input and damaged state: bounded memory, containment inside the artifacts, typed state files,
cache hits that write nothing, and image modes converted (not clipped) or refused by name."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from stages.data.sources.idx import read_idx_bytes
from stages.pipeline import run_all, run_data
from tapeline.cache import manifest_problem
from tapeline.config import load_config
from tapeline.errors import CacheError, ConfigError, DataSourceError, PredictError
from tapeline.imaging import open_image
from tapeline.predict import predict
from tapeline.registry import production
from tapeline.testing import idx_bytes, png_bytes, tiny_config, write_idx_dir

ROOT = Path(__file__).resolve().parents[2]
PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    {body}
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def peak_rss_mb(body: str) -> int:
    """Peak resident memory (MB) of a fresh Python running `body`."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS.format(body=body)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- bounded memory

def test_gzip_bomb_behind_a_small_header_is_read_with_bounded_memory(tmp_path: Path) -> None:
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (100, 28, 28))
    bomb = tmp_path / "bomb-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(40):  # 400 MB of zeros behind a header that declares 78 KB
            f.write(bytes(10 * 1024**2))
    good = tmp_path / "good-images-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(header + bytes(100 * 28 * 28)))
    with pytest.raises(DataSourceError, match=r"declares dims \[100, 28, 28\] \(78400 bytes of data\) but the file "
                                              r"holds 78401 or more"):
        from stages.data.sources.idx import parse_idx

        parse_idx(read_idx_bytes(bomb), str(bomb))
    code = ("from stages.data.sources.idx import read_idx_bytes\n"
            "try:\n    read_idx_bytes(Path({!r}))\nexcept Exception:\n    pass")
    baseline, bombed = peak_rss_mb(code.format(str(good))), peak_rss_mb(code.format(str(bomb)))
    assert bombed < baseline + 32, (baseline, bombed)


def test_lying_header_on_a_sparse_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    with path.open("wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28)))
        f.truncate(3 * 1024**3)  # 3 GiB, sparse: the header declares 47 MB
    with pytest.raises(DataSourceError, match=r"declares dims \[60000, 28, 28\] \(47040000 bytes of data\) but the "
                                              r"file holds 3221225456"):
        read_idx_bytes(path)
    huge = tmp_path / "huge-images-idx3-ubyte"
    huge.write_bytes(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (10**6, 2000, 2000)))
    with pytest.raises(DataSourceError, match="more than tapeline reads"):
        read_idx_bytes(huge)


def test_config_files_that_are_not_small_utf8_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(Path("/dev/zero"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("train:\n  monitor: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20))
    with pytest.raises(ConfigError, match="is larger than 1024 KiB"):
        load_config(tmp_path / "big.yaml")


@pytest.mark.parametrize(("override", "key"), [("data.batch_size=1e32", "data.batch_size"),
                                               ("model.dense_units=1e12", "model.dense_units"),
                                               ("model.conv_filters=[32, 1000000]", "model.conv_filters")])
def test_impossible_sizes_are_config_errors(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.slow
def test_predict_memory_does_not_grow_with_the_number_of_images(tmp_path: Path, idx_dir: Path) -> None:
    artifacts = tmp_path / "a"
    run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1"), artifacts)
    images = np.random.default_rng(0).integers(0, 255, (3000, 28, 28), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"{i:05d}.png").write_bytes(png_bytes(image))
    code = ("from tapeline.predict import iter_predictions\n"
            f"paths = sorted(Path({str(folder)!r}).glob('*.png'))[:{{n}}]\n"
            f"assert sum(1 for _ in iter_predictions(paths, None, Path({str(artifacts)!r}))) == {{n}}")
    one, many = peak_rss_mb(code.format(n=1)), peak_rss_mb(code.format(n=3000))
    assert many < one + 100, (one, many)  # one batch of 3,000 would add ~350 MB of activations


# ---------------------------------------------------------------- containment and typed state

def tampered(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../../outside.tfrecord", "/etc/passwd", "./train-00000-of-00002.tfrecord", ""])
def test_manifest_names_outside_the_output_make_it_invalid(tmp_path: Path, idx_dir: Path, name: str) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    data = run_data(config, tmp_path / "a")
    outside = tmp_path / "outside.tfrecord"
    outside.write_bytes((data.path / "train-00000-of-00002.tfrecord").read_bytes())

    def point_outside(manifest: dict) -> None:
        manifest["splits"]["train"]["files"][0]["name"] = name
        manifest["files"][0]["name"] = name

    tampered(data.path, point_outside)
    assert "not a plain relative path" in manifest_problem(data.path)
    rebuilt = run_data(config, tmp_path / "a")
    assert not rebuilt.cached and manifest_problem(rebuilt.path) is None
    assert len(list((tmp_path / "a" / "data").glob(".invalid-*"))) == 1


def test_symlink_leaving_the_output_makes_it_invalid(tmp_path: Path, idx_dir: Path) -> None:
    data = run_data(tiny_config(f"idx:{idx_dir}"), tmp_path / "a")
    shard = data.path / "train-00000-of-00002.tfrecord"
    outside = tmp_path / "outside.tfrecord"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    assert "leads outside" in manifest_problem(data.path)
    shard.unlink()
    shard.symlink_to(shard)
    assert manifest_problem(data.path).endswith("train-00000-of-00002.tfrecord is a symlink loop")


@pytest.mark.parametrize(("content", "message"), [(b"[]", "is not a production pointer"),
                                                  (b"\xff\xfe not utf-8", "is corrupt"),
                                                  (None, "is a directory")])
def test_bad_production_pointer_is_named(tmp_path: Path, content: bytes | None, message: str) -> None:
    pointer = tmp_path / "models" / "production.json"
    pointer.parent.mkdir(parents=True)
    if content is None:
        pointer.mkdir()
    else:
        pointer.write_bytes(content)
    with pytest.raises(CacheError, match=message):
        production(tmp_path)
    assert main(["predict", "--artifacts", str(tmp_path), str(tmp_path / "x.png")]) == 2


def test_model_card_without_input_spec_is_named(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "saved_model").mkdir(parents=True)
    (model / "saved_model" / "saved_model.pb").write_bytes(b"x")
    (model / "model_card.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(PredictError, match="model_card.json has no usable input_spec"):
        predict([tmp_path / "x.png"], model, tmp_path)


def test_registry_of_another_schema_or_kind(tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    artifacts = tmp_path / "a"
    artifacts.mkdir()
    pq.write_table(pa.table({"something": [1, 2]}), artifacts / "registry.parquet")
    assert main(["runs", "--artifacts", str(artifacts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has another schema" in err[0]

    (artifacts / "registry.parquet").unlink()
    (artifacts / "registry.parquet").mkdir()  # a finished run moves it aside and starts a new registry
    from stages.pipeline import record_run, registry_row

    results = run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1"), artifacts)
    record_run(artifacts, registry_row("after-damage", tiny_config(f"idx:{idx_dir}"), results))
    assert (artifacts / "registry.parquet").is_file() and list(artifacts.glob(".invalid-registry.parquet-*"))
    assert not list(artifacts.glob(".registry.parquet.*.tmp"))


def test_cache_hits_plan_predict_and_runs_write_nothing(tmp_path: Path, idx_dir: Path) -> None:
    """What makes a read-only artifacts directory work: reading never creates or touches a file."""
    artifacts = tmp_path / "a"
    overrides = ["--set", f"data.source=idx:{idx_dir}", "--set", "data.shards=2", "--set", "train.max_epochs=1",
                 "--set", "model.conv_filters=[8, 16]", "--set", "model.dense_units=16"]
    for stage in ("data", "validate", "model", "train", "evaluate", "export", "promotion"):
        assert main(["stage", stage, "--artifacts", str(artifacts), *overrides]) == 0
    for lock in artifacts.rglob("*.lock"):
        lock.unlink()
    before = {p: p.stat().st_mtime_ns for p in artifacts.rglob("*")}
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    for stage in ("data", "validate", "model", "train", "evaluate", "export"):
        assert main(["stage", stage, "--artifacts", str(artifacts), *overrides]) == 0
    assert main(["plan", "--artifacts", str(artifacts), *overrides]) == 0
    assert main(["predict", "--artifacts", str(artifacts), str(image)]) == 0
    assert main(["runs", "--artifacts", str(artifacts)]) == 0
    assert {p: p.stat().st_mtime_ns for p in artifacts.rglob("*")} == before


def test_a_read_only_place_to_write_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tapeline.cache import file_lock

    with pytest.raises(CacheError, match="is read-only"), file_lock(Path("/sys/tapeline/x.lock"), 1, "building x"):
        pass


def test_artifacts_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["plan", "--artifacts", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------- images

def encoded(image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    from PIL import Image

    values = np.array([[0, 257 * 100], [257 * 200, 65535]], np.uint16)
    pixels = open_image(encoded(Image.fromarray(values)), "scan.png")
    assert pixels.dtype == np.uint8 and pixels.tolist() == [[0, 100], [200, 255]]


def test_palette_alpha_and_cmyk_become_rgb() -> None:
    from PIL import Image

    rgba = Image.fromarray(np.full((4, 4, 4), (10, 20, 30, 0), np.uint8), mode="RGBA")
    assert open_image(encoded(rgba), "alpha.png")[0, 0].tolist() == [10, 20, 30]
    palette = rgba.convert("RGB").convert("P")
    assert open_image(encoded(palette), "palette.png").shape == (4, 4, 3)
    cmyk = Image.new("CMYK", (3, 3), (0, 0, 0, 0))
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG")
    assert open_image(buffer.getvalue(), "cmyk.jpg")[0, 0].tolist() == [255, 255, 255]


def test_decompression_bombs_and_oversize_images_are_named(tmp_path: Path) -> None:
    from PIL import Image

    from tapeline.errors import ImageError

    big = encoded(Image.new("L", (5000, 4000)))
    with pytest.raises(ImageError, match="5000x4000 pixels, larger than tapeline accepts"):
        open_image(big, "big.png")
    bomb = encoded(Image.new("1", (20000, 20000)))
    with pytest.raises(ImageError, match="bomb|larger than tapeline accepts"):
        open_image(bomb, "bomb.png")


def test_parquet_training_data_gets_the_same_conversion(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    scans = [encoded(Image.fromarray(np.full((28, 28), 257 * (10 + i), np.uint16))) for i in range(40)]
    pq.write_table(pa.table({"image": scans, "label": [i % 2 for i in range(40)]}), tmp_path / "scans.parquet")
    config = tiny_config(f"parquet:{tmp_path / 'scans.parquet'}", "data.validation_fraction=0.2")
    data = run_data(config, tmp_path / "a")
    from stages.data.readers import load_split

    images, _ = load_split(data.path, "train")
    assert 10 <= images.min() and images.max() <= 49  # scaled from 16 bits, not clipped to 255


def test_idx_reader_still_reads_real_files(tmp_path: Path) -> None:
    source = write_idx_dir(tmp_path / "src", gz=True)
    data = gzip.decompress((source / "train-images-idx3-ubyte.gz").read_bytes())
    assert read_idx_bytes(source / "train-images-idx3-ubyte.gz") == data
    (tmp_path / "raw").write_bytes(idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4)))
    assert read_idx_bytes(tmp_path / "raw") == idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))


# ---------------------------------------------------------------- random damage to a real artifacts tree

STATE_FILES = ("data/*/manifest.json", "validate/*/manifest.json", "model/*/manifest.json", "train/*/manifest.json",
               "models/production.json", "models/v0001/model_card.json", "models/v0001/manifest.json",
               "registry.parquet", "data/*/train-00000-of-00002.tfrecord")
MUTATIONS = ("truncate", "garbage", "empty_json_list", "directory", "drop_key", "wrong_type", "parent_name")


def mutate(path: Path, how: str, seed: int) -> None:
    """Damage one state file the way a disk, a person or an attacker might."""
    import shutil

    rng = np.random.default_rng(seed)
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: int(rng.integers(0, max(1, len(data))))])
    elif how == "garbage":
        path.write_bytes(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    elif how == "empty_json_list":
        path.write_bytes(b"[]")
    elif how == "directory":
        path.unlink()
        path.mkdir()
    else:
        try:
            value = json.loads(data)
        except ValueError:
            shutil.copy(path, path.with_suffix(".bak"))
            path.write_bytes(b"\x00" + data)
            return
        if not isinstance(value, dict) or not value:
            path.write_bytes(b"{}")
            return
        key = sorted(value)[int(rng.integers(0, len(value)))]
        if how == "drop_key":
            del value[key]
        elif how == "wrong_type":
            value[key] = [None, 1.5]
        else:
            for entry in value.get("files", []) if isinstance(value.get("files"), list) else []:
                entry["name"] = "../" * 4 + "etc/hostname"
            value.setdefault("path", "../../outside")
            value["path"] = "../../outside"
        path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def built_tree(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> tuple[Path, list[str]]:
    artifacts = tmp_path_factory.mktemp("tree") / "a"
    overrides = ["--set", f"data.source=idx:{idx_dir}", "--set", "data.shards=2", "--set", "train.max_epochs=1",
                 "--set", "model.conv_filters=[8, 16]", "--set", "model.dense_units=16"]
    config = load_config(None, [o for o in overrides if o != "--set"])
    from stages.pipeline import new_run_id, record_run, registry_row

    results = run_all(config, artifacts)
    record_run(artifacts, registry_row(new_run_id(), config, results))
    return artifacts, overrides


@pytest.mark.slow
@pytest.mark.parametrize("how", MUTATIONS)
@pytest.mark.parametrize("target", STATE_FILES)
def test_damaged_state_gives_a_result_or_one_line(built_tree, tmp_path: Path, target: str, how: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    source, overrides = built_tree
    artifacts = tmp_path / "a"
    shutil.copytree(source, artifacts, symlinks=True)
    (path,) = artifacts.glob(target)
    mutate(path, how, seed=len(target) * 31 + len(how))
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((28, 28), np.uint8))
    commands = [["plan", *overrides], ["runs"], ["predict", str(image)], ["stage", "validate", *overrides],
                ["stage", "evaluate", *overrides]]
    for command in commands:
        code = main([command[0], "--artifacts", str(artifacts), *command[1:]])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tapeline: error:")]
        assert code in (0, 2), (command, code)
        assert (code == 0) == (not err), (command, err)


TAPELINE = str(Path(sys.executable).with_name("tapeline"))


def tapeline_fails_in_one_line(tmp_path: Path, *args: str) -> str:
    """Run the `tapeline` command as a user does; it must exit 2 with one error line and no traceback."""
    done = subprocess.run([TAPELINE, *args, "--artifacts", str(tmp_path / "a")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.startswith("tapeline: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("levels", [40, 400, 4000])
def test_deeply_nested_config_is_one_line_for_files_and_set(tmp_path: Path, levels: int) -> None:
    deep = "[" * levels + "1" + "]" * levels
    line = tapeline_fails_in_one_line(tmp_path, "run", "--set", f"model.params.width={deep}")
    assert line.startswith("tapeline: error: override") and "model.params.width" in line
    assert "nest" in line and "flatten it" in line
    config = tmp_path / "deep.yaml"
    config.write_text("model:\n  params:\n    width: " + deep + "\n")
    line = tapeline_fails_in_one_line(tmp_path, "plan", "--config", str(config))
    assert line.startswith(f"tapeline: error: config file {config}") and "flatten it" in line
    if levels < 1000:  # parsed, so the message names the key
        assert "model.params.width" in line
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("model:\n  params:\n    width: " + "{a: " * levels + "1" + "}" * levels + "\n")
    assert "flatten it" in tapeline_fails_in_one_line(tmp_path, "run", "--config", str(mapping))


def test_a_key_of_hundreds_of_parts_is_one_line(tmp_path: Path) -> None:
    line = tapeline_fails_in_one_line(tmp_path, "plan", "--set", ".".join(["model"] * 300) + "=1")
    assert "a key of 300 parts" in line


@pytest.mark.slow
def test_an_expected_error_inside_the_flow_is_one_line_without_tracebacks(tmp_path: Path, idx_dir: Path) -> None:
    (tmp_path / "models.py").write_text(
        "import keras\n\n\ndef build(input_shape, num_classes):\n    inputs = keras.Input(shape=input_shape)\n"
        "    x = keras.layers.Flatten()(inputs)\n"
        "    return keras.Model(inputs, keras.layers.Dense(num_classes, activation='softmax')(x))\n")
    line = tapeline_fails_in_one_line(tmp_path, "run", "--set", f"data.source=idx:{idx_dir}", "--set",
                                      "model.builder=models.py:build", "--set", "data.shards=2")
    assert line.startswith("tapeline: error: model.builder: models.py:build returns probabilities")
    assert line.endswith("tapeline's loss takes logits")
