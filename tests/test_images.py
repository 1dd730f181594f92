"""`images:DIR`: class folders of image files on disk and in a bucket; sizes, colour, bad files, fingerprints."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from stages.data.readers import load_split
from stages.graph import fingerprints
from stages.pipeline import run_data, run_stage
from tapeline.config import load_config
from tapeline.errors import ConfigError, DataSourceError, ValidationError
from tapeline.imaging import crop_box, resize_pixels

CLASSES = ("boot", "coat", "shirt")
TINY = ["data.shards=2", "data.batch_size=16", "model.conv_filters=[8]", "model.dense_units=16",
        "train.max_epochs=2", "train.steps_per_execution=4", "train.precision=float32", "preset=v1"]


@pytest.fixture
def spool_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory of this test's own for decoded-image spools: what another test left in the shared
    one (a failed test's spool stays alive in its traceback) cannot be mistaken for this test's."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def pattern(label: int, size: tuple[int, int], rgb: bool, seed: int) -> np.ndarray:
    """A learnable image: a bright band whose height depends on the class, in a class colour when RGB."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    band = slice(label * height // 3, (label + 1) * height // 3)
    image[band, :, :] = 220
    if rgb:
        image[band, :, (label + 1) % 3] = 40
        return image
    return image[..., 0]


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(root: Path, per_class: int = 12, size: tuple[int, int] = (20, 20), rgb: bool = False,
                 fmt: str = "PNG", split: str | None = None, seed: int = 0) -> Path:
    """`root/[split/]<class>/<i>.<ext>` for every class; nested sub-folders for half of them."""
    extension = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif"}[fmt]
    for label, name in enumerate(CLASSES):
        folder = root / split / name if split else root / name
        for i in range(per_class):
            target = folder / ("nested" if i % 2 else "") / f"{seed}-{i}.{extension}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encode(pattern(label, size, rgb, seed * 1000 + label * 100 + i), fmt))
    return root


def config_for(root: Path | str, *more: str):
    return load_config(None, [f"data.source=images:{root}", *TINY, *more])


def manifest_of(result) -> dict:
    return json.loads((result.path / "manifest.json").read_text())


# ---------------------------------------------------------------- layouts and classes

def test_class_folders_are_split_and_hidden_files_ignored(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pics", per_class=20)
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(encode(pattern(0, (20, 20), False, 1), "PNG"))
    (root / "boot" / ".hidden.png").write_bytes(b"not even an image")
    (root / "coat" / "notes.txt").write_text("not an image file")
    (root / "README.png.md").write_text("loose file")
    data = run_data(config_for(root), tmp_path / "a")
    assert data.input_spec.class_names == CLASSES  # sorted folder names; no ".ipynb_checkpoints" class
    assert data.input_spec.shape == (20, 20, 1)
    assert sum(data.records.values()) == 60 and data.records["test"] == 6 and data.records["validation"] == 6
    manifest = manifest_of(data)
    assert manifest["skipped"] == [] and manifest["image_files"] == 60
    labels = np.concatenate([load_split(data.path, s)[1] for s in ("train", "validation", "test")])
    assert np.bincount(labels).tolist() == [20, 20, 20]


def test_train_test_validation_folders_are_the_splits(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    write_folder(root, per_class=10, split="train", seed=0)
    write_folder(root, per_class=4, split="test", seed=1)
    write_folder(root, per_class=3, split="validation", seed=2)
    data = run_data(config_for(root), tmp_path / "a")
    assert data.records == {"train": 30, "validation": 9, "test": 12}
    images, labels = load_split(data.path, "test")
    assert np.bincount(labels).tolist() == [4, 4, 4]
    expected = pattern(int(labels[0]), (20, 20), False, 1000 + int(labels[0]) * 100)  # seed 1: the test folder
    assert any(np.array_equal(image[..., 0], expected) for image in images)


def test_class_names_give_the_order_and_must_match_the_folders(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pics", per_class=10)
    data = run_data(config_for(root, "data.class_names=[shirt, boot, coat]"), tmp_path / "a")
    assert data.input_spec.class_names == ("shirt", "boot", "coat")
    images, labels = load_split(data.path, "train")
    band_row = {int(label): int(np.argmax(image[..., 0].mean(axis=1) > 200))
                for image, label in zip(images, labels, strict=True)}
    assert band_row[1] == 0 and band_row[0] == 2 * 20 // 3  # boot is class 1 now, shirt class 0
    with pytest.raises(DataSourceError, match="data.class_names: hat is not a folder of data.source images:"):
        run_data(config_for(root, "data.class_names=[shirt, boot, coat, hat]"), tmp_path / "b")
    with pytest.raises(DataSourceError, match="data.class_names does not list the folder.s. coat of"):
        run_data(config_for(root, "data.class_names=[shirt, boot]"), tmp_path / "c")


# ---------------------------------------------------------------- size and colour

def test_mixed_sizes_need_image_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "pics", per_class=8, size=(20, 20))
    write_folder(root, per_class=4, size=(30, 24), seed=5)
    code = main(["stage", "data", "--artifacts", str(tmp_path / "a"), *[f"--set={o}" for o in
                                                                       [f"data.source=images:{root}", *TINY]]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tapeline: error: data.image_size: data.source images:")
    assert "has images of 2 sizes (20x20, 30x24" in err and "set data.image_size: [H, W]" in err
    data = run_data(config_for(root, "data.image_size=[16, 12]"), tmp_path / "b")
    assert data.input_spec.shape == (16, 12, 1) and sum(data.records.values()) == 36


def test_colour_mode_auto_rgb_and_grayscale(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pics", per_class=8)
    colour = pattern(0, (20, 20), True, 7)
    (root / "boot" / "colour.jpg").write_bytes(encode(colour, "JPEG"))
    auto = run_data(config_for(root), tmp_path / "a")
    assert auto.input_spec.shape == (20, 20, 3)  # one colour image makes the set RGB
    grey = run_data(config_for(root, "data.color_mode=grayscale"), tmp_path / "b")
    assert grey.input_spec.shape == (20, 20, 1)
    grey_images, _ = load_split(grey.path, "train")
    rgb_images, _ = load_split(run_data(config_for(root, "data.color_mode=rgb"), tmp_path / "c").path, "train")
    assert rgb_images.shape[1:] == (20, 20, 3) and grey_images.shape[0] == rgb_images.shape[0]
    greys = rgb_images[(rgb_images[..., 0] == rgb_images[..., 1]).all(axis=(1, 2))]
    assert len(greys) >= len(rgb_images) - 2  # grey files are repeated into three equal channels


def test_resize_crop_and_interpolation() -> None:
    image = np.zeros((20, 40), np.uint8)
    image[:, :10] = 255  # a white left quarter: cropping to a square drops it
    squeezed = resize_pixels(image, (10, 10), "nearest")
    cropped = resize_pixels(image, (10, 10), "nearest", crop_to_aspect_ratio=True)
    assert squeezed[:, :2].min() == 255 and cropped.max() == 0
    assert crop_box(40, 20, (10, 10)) == (10, 0, 30, 20) and crop_box(20, 40, (10, 20)) == (0, 15, 20, 25)
    checker = np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))
    assert set(np.unique(resize_pixels(checker, (4, 4), "nearest"))) == {0, 255}
    assert resize_pixels(checker, (2, 2), "area").tolist() == [[255, 0], [0, 255]]
    assert len(np.unique(resize_pixels(checker, (3, 3), "bilinear"))) > 2


# ---------------------------------------------------------------- bad files

def bad_files(folder: Path) -> dict[str, str]:
    """One file of each unreadable kind; the reason fragment each must be skipped with."""
    good = encode(pattern(0, (20, 20), False, 3), "PNG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_bytes(b"this is not an image at all")
    (folder / "bmp.jpg").write_bytes(encode(pattern(0, (20, 20), False, 4), "BMP"))
    big = io.BytesIO()
    Image.new("L", (5000, 4000)).save(big, format="PNG")
    (folder / "bomb.png").write_bytes(big.getvalue())
    return {"empty.png": "empty file", "truncated.png": "truncated", "text.png": "is not an image tapeline can read "
            "(PNG, JPEG, BMP or GIF): cannot identify image file",
            "bmp.jpg": "the extension .jpg says JPEG but the content is BMP",
            "bomb.png": "larger than tapeline accepts"}


def test_bad_files_are_skipped_reported_and_gate_the_run(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pics", per_class=20)
    expected = bad_files(root / "coat")
    config = config_for(root)
    data = run_data(config, tmp_path / "a")
    assert sum(data.records.values()) == 60  # every good image, none of the bad
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest_of(data)["skipped"]}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
        assert name not in skipped[name] and "the file" not in skipped[name], skipped[name]
    assert skipped["text.png"] == ("is not an image tapeline can read (PNG, JPEG, BMP or GIF): cannot identify image "
                                   "file")
    assert sorted(s["path"] for s in manifest_of(data)["skipped"]) == sorted(str(root / "coat" / n) for n in expected)
    with pytest.raises(ValidationError, match=r"unreadable_images \(5\)"):
        run_stage("validate", config, tmp_path / "a")
    report = json.loads(next((tmp_path / "a" / "validate").glob("*/report.json")).read_text())
    unreadable = next(a for a in report["anomalies"] if a["kind"] == "unreadable_images")
    assert unreadable["count"] == 5 and unreadable["severity"] == "error" and len(unreadable["examples"]) == 5
    assert "5 of 65 image files (7.7%)" in unreadable["message"]
    passed = run_stage("validate", config_for(root, "validate.max_unreadable_share=0.1"), tmp_path / "a")
    assert passed.passed and passed.warnings["unreadable_images"] == 5


def test_an_empty_class_folder_is_a_class_of_no_images_like_one_of_only_corrupt_files(tmp_path: Path) -> None:
    reports = {}
    for case in ("empty", "corrupt"):
        root = write_folder(tmp_path / case / "pics", per_class=10)
        (root / "hat").mkdir()
        if case == "corrupt":
            (root / "hat" / "a.png").write_bytes(b"not an image")
        config = config_for(root)
        data = run_data(config, tmp_path / case / "a")
        assert data.input_spec.class_names == ("boot", "coat", "hat", "shirt")
        assert sum(data.records.values()) == 30
        with pytest.raises(ValidationError) as failed:
            run_stage("validate", config, tmp_path / case / "a")
        reports[case] = str(failed.value)
        assert "missing_class" in reports[case]
        named = run_data(config_for(root, "data.class_names=[shirt, boot, coat, hat]"), tmp_path / case / "b")
        assert named.input_spec.class_names == ("shirt", "boot", "coat", "hat")  # may be named: the gate decides
    assert "unreadable_images" in reports["corrupt"] and "unreadable_images" not in reports["empty"]
    before = run_data(config_for(tmp_path / "empty" / "pics"), tmp_path / "empty" / "a")
    (tmp_path / "empty" / "pics" / "hat").rmdir()
    after = run_data(config_for(tmp_path / "empty" / "pics"), tmp_path / "empty" / "a")
    assert after.fingerprint != before.fingerprint and after.input_spec.class_names == CLASSES


def test_no_readable_image_at_all_is_one_error(tmp_path: Path) -> None:
    for name in CLASSES:
        (tmp_path / "pics" / name).mkdir(parents=True)
        (tmp_path / "pics" / name / "a.png").write_bytes(b"")
    with pytest.raises(DataSourceError, match="none of the 3 files is a readable image"):
        run_data(config_for(tmp_path / "pics"), tmp_path / "a")


# ---------------------------------------------------------------- fingerprints

def test_fingerprint_follows_the_files_and_nothing_else(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pics", per_class=6)
    config = config_for(root)
    before = fingerprints(config, tmp_path / "a")["data"]
    some = next(root.rglob("*.png"))
    os.utime(some, (time.time() + 100, time.time() + 100))  # touched, same bytes
    assert fingerprints(config, tmp_path / "a")["data"] == before
    changed = some
    original = changed.read_bytes()
    changed.write_bytes(encode(pattern(1, (20, 20), False, 99), "PNG"))
    after_edit = fingerprints(config_for(root), tmp_path / "a")["data"]
    changed.write_bytes(original)
    (root / "boot" / "new.png").write_bytes(encode(pattern(0, (20, 20), False, 98), "PNG"))
    after_add = fingerprints(config_for(root), tmp_path / "a")["data"]
    (root / "boot" / "new.png").unlink()
    restored = fingerprints(config_for(root), tmp_path / "a")["data"]
    next(root.rglob("*.png")).unlink()
    after_remove = fingerprints(config_for(root), tmp_path / "a")["data"]
    assert len({before, after_edit, after_add, after_remove}) == 4 and restored == before


# ---------------------------------------------------------------- buckets

def upload(fs, local: Path, url: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{url.removeprefix('s3://')}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_folder_in_a_bucket(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    local = write_folder(tmp_path / "pics", per_class=10, rgb=True, fmt="JPEG", size=(24, 24))
    (local / ".ipynb_checkpoints").mkdir()
    (local / ".ipynb_checkpoints" / "x.jpg").write_bytes(b"hidden")
    (local / "shirt" / "broken.jpg").write_bytes(b"")
    source = f"{s3_url}/incoming-images"
    upload(fs, local, source)
    config = config_for(source)
    before = fingerprints(config, tmp_path / "a")["data"]

    def no_downloads(*_args, **_kwargs):
        raise AssertionError("the fingerprint must not download objects")

    with monkeypatch.context() as patch:
        patch.setattr(type(fs), "cat", no_downloads)
        patch.setattr(type(fs), "cat_file", no_downloads)
        assert fingerprints(config, tmp_path / "a")["data"] == before
    data = run_data(config, tmp_path / "a")
    assert data.input_spec == data.input_spec.model_copy(update={"shape": (24, 24, 3), "class_names": CLASSES})
    assert sum(data.records.values()) == 30
    assert [s["path"] for s in manifest_of(data)["skipped"]] == [f"{source.rstrip('/')}/shirt/broken.jpg"]
    fs.pipe_file(f"{source.removeprefix('s3://')}/coat/extra.jpg", encode(pattern(1, (24, 24), True, 5), "JPEG"))
    assert fingerprints(config, tmp_path / "a")["data"] != before


def test_extra_parquet_in_a_bucket(s3_url: str, tmp_path: Path, idx_dir: Path) -> None:
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tapeline.testing import png_bytes, synthetic_images

    images, labels = synthetic_images(20, seed=3)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"image": [png_bytes(i) for i in images], "label": labels.astype(np.int64)}), buffer)
    fs = fsspec.filesystem("s3")
    drop = f"{s3_url}/incoming"
    fs.pipe_file(f"{drop.removeprefix('s3://')}/2026-12-02.parquet", buffer.getvalue().to_pybytes())
    base = load_config(None, [f"data.source=idx:{idx_dir}", *TINY])
    with_extra = load_config(None, [f"data.source=idx:{idx_dir}", f"data.extra={drop}", *TINY])
    plain = run_data(base, tmp_path / "a")
    grown = run_data(with_extra, tmp_path / "a")
    assert sum(grown.records.values()) == sum(plain.records.values()) + 20
    fs.pipe_file(f"{drop.removeprefix('s3://')}/2026-12-03.parquet", buffer.getvalue().to_pybytes())
    assert fingerprints(with_extra, tmp_path / "a")["data"] != grown.fingerprint


# ---------------------------------------------------------------- a model from RGB folders, and predict

@pytest.mark.slow
def test_rgb_folder_model_predicts_class_names_for_a_jpeg_of_another_size(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "pics", per_class=30, rgb=True, fmt="JPEG", size=(24, 24))
    cli = ["--artifacts", str(tmp_path / "a"), *[f"--set={o}" for o in [
        f"data.source=images:{root}", *TINY, "train.max_epochs=8", "train.learning_rate=0.01"]]]
    for stage in ("data", "validate", "model", "train", "evaluate", "export", "promotion"):
        assert main(["stage", stage, *cli]) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(pattern(2, (60, 45), True, 77), "JPEG"))  # a shirt, larger and not square
    assert main(["predict", "--artifacts", str(tmp_path / "a"), str(photo)]) == 0
    path, name, probability = capsys.readouterr().out.strip().split("\t")
    assert path == str(photo) and name == "shirt" and float(probability) > 0.5


# ---------------------------------------------------------------- Parquet shapes

@pytest.mark.parametrize(("column", "value"), [("height", -3), ("width", 0), ("channels", 7)])
def test_parquet_with_impossible_shape_columns_names_row_and_column(tmp_path: Path, column: str, value: int,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"image": [[0] * 16, [0] * 16], "label": [0, 1], "height": [4, 4], "width": [4, 4], "channels": [1, 1]}
    rows[column] = [rows[column][0], value]
    pq.write_table(pa.table(rows), tmp_path / "bad.parquet")
    code = main(["stage", "data", "--artifacts", str(tmp_path / "a"), "--set",
                 f"data.source=parquet:{tmp_path / 'bad.parquet'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"tapeline: error: {tmp_path / 'bad.parquet'} row 1: column '{column}' is {value}")


def test_image_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(None, ["data.image_size=[0, 10]"])
    with pytest.raises(ConfigError, match="data.interpolation"):
        load_config(None, ["data.interpolation=lanczos"])
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=images:"])


def test_decoding_processes_give_what_one_process_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        spool_root: Path) -> None:
    import stages.data.sources.images as images

    root = write_folder(tmp_path / "pics", per_class=10, rgb=True)
    bad_files(root / "coat")
    layout = images.layout_of(str(root), images.list_files(str(root)).files, None)
    options = images.ImageOptions(image_size=(12, 12), interpolation="area")
    alone, alone_skipped = images.decode_all(str(root), layout.files, options, workers=1)
    monkeypatch.setattr(images, "IN_PROCESS_BELOW", 0)
    monkeypatch.setattr(images, "DECODE_CHUNK", 7)  # several chunks per process
    pooled, pooled_skipped = images.decode_all(str(root), layout.files, options, workers=2)
    assert pooled_skipped == alone_skipped and len(pooled_skipped) == 5
    assert len(pooled) == len(alone) == 30 and pooled.rows.tolist() == alone.rows.tolist()
    assert os.listdir(alone.directory) == [f"rows-{os.getpid()}.bin"]
    # one spool file per decoding process that got work (the pool hands out chunks as processes ask, so on a busy
    # machine one process may take all five), never this process's
    spooled_by = {int(name.removeprefix("rows-").removesuffix(".bin")) for name in os.listdir(pooled.directory)}
    assert 1 <= len(spooled_by) <= 2 and os.getpid() not in spooled_by
    assert len(spooled_by) == len(os.listdir(pooled.directory))
    for row, index in enumerate(pooled.rows):
        expected = images.decode_one(str(root / layout.files[index].relative), layout.files[index].relative, options)
        assert np.array_equal(pooled.read(row), expected) and np.array_equal(alone.read(row), expected)
    pooled.close()
    alone.close()
    assert list(spool_root.iterdir()) == []


def test_records_are_the_files_decoded_and_converted_copies_are_duplicates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.data.sources.images as images
    from tapeline.imaging import to_channels

    monkeypatch.setattr(images, "IN_PROCESS_BELOW", 0)  # decoding processes and their spool files
    monkeypatch.setattr(images, "DECODE_CHUNK", 5)
    root = write_folder(tmp_path / "pics", per_class=6, split="train")
    write_folder(root, per_class=3, split="test", seed=1)
    (root / "train" / "coat" / "colour.png").write_bytes(encode(pattern(1, (20, 20), True, 99), "PNG"))
    test_grey = pattern(2, (20, 20), False, 5)
    (root / "test" / "shirt" / "grey.png").write_bytes(encode(test_grey, "PNG"))
    # the same image stored as RGB: once the set is RGB (auto), it is an exact copy of the grey test image
    (root / "train" / "shirt" / "copy.png").write_bytes(encode(np.repeat(test_grey[..., None], 3, axis=-1), "PNG"))
    result = run_data(config_for(root), tmp_path / "out")
    assert result.input_spec.shape == (20, 20, 3)
    assert manifest_of(result)["dropped_test_duplicates"] == 1
    written = sorted(image.tobytes() for split in ("train", "validation", "test")
                     for image in load_split(result.path, split)[0])
    files = [p for p in sorted(root.rglob("*.png")) if p.name != "copy.png"]
    expected = sorted(to_channels(np.asarray(Image.open(p)), 3).tobytes() for p in files)
    assert written == expected


def test_writing_gathers_a_bounded_batch_of_images_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             spool_root: Path) -> None:
    import stages.data.sources.images as images
    import stages.data.stage

    monkeypatch.setattr(stages.data.stage, "GATHER_BATCH", 7)
    assert stages.data.stage.batch_for((20, 20, 1)) == 7
    monkeypatch.setattr(stages.data.stage, "GATHER_BYTES", 5 * 20 * 20)  # or fewer, when 7 would take more bytes
    assert stages.data.stage.batch_for((20, 20, 1)) == 5 and stages.data.stage.batch_for((4096, 4096, 3)) == 1
    monkeypatch.setattr(stages.data.stage, "GATHER_BYTES", 16 << 20)
    gathered: list[int] = []
    original = images.SpooledImages.__getitem__

    def recording(self, indices):
        gathered.append(len(indices))
        return original(self, indices)

    monkeypatch.setattr(images.SpooledImages, "__getitem__", recording)
    root = write_folder(tmp_path / "pics", per_class=12)
    result = run_data(config_for(root), tmp_path / "out")
    records = sum(s["records"] for s in manifest_of(result)["splits"].values())
    assert records == 36 and max(gathered) == 7
    assert sum(gathered) == records  # each image read once, to be written (its key came from the decoder)
    assert list(spool_root.iterdir()) == []  # the spool was removed


def test_a_full_spool_disk_is_one_error_naming_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      spool_root: Path) -> None:
    import errno

    import stages.data.sources.images as images

    class FullDisk(io.BytesIO):
        name = "rows-full.bin"

        def write(self, _data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images, "spool_writer", lambda directory: FullDisk())
    root = write_folder(tmp_path / "pics", per_class=4)
    with pytest.raises(DataSourceError, match=r"spool in .*tapeline-spool-.* ran out of disk space .*point TMPDIR"):
        run_data(config_for(root), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "data").iterdir() if not p.name.endswith(".lock")] == []
    assert list(spool_root.iterdir()) == []


def test_the_data_stage_lists_the_folder_once_unless_the_listing_is_not_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.data.sources.images as images

    listings: list[str] = []
    original = images.list_files

    def counting(root: str):
        listings.append(root)
        return original(root)

    monkeypatch.setattr(images, "list_files", counting)
    root = write_folder(tmp_path / "pics", per_class=4)
    first = run_data(config_for(root), tmp_path / "out")
    assert len(listings) == 1  # the fingerprint's listing is the one decoded
    (root / "coat" / "new.png").write_bytes(encode(pattern(1, (20, 20), False, 77), "PNG"))
    listings.clear()
    # an identity this process did not make (the fingerprint computed elsewhere): listed again, new file seen
    raw = images.ImageFolderSource(str(root)).load_listed({"kind": "images", "digest": "from another process"})
    assert len(listings) == 1 and len(raw.train_labels) == 13
    raw.release()
    assert sum(s["records"] for s in manifest_of(first)["splits"].values()) == 12


def test_links_and_unreadable_places_are_skipped_and_listed_with_their_real_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.data.sources.images as images

    root = write_folder(tmp_path / "pics", per_class=4)
    unreadable = sorted((root / "shirt").rglob("*.png"))[0]
    outside = write_folder(tmp_path / "elsewhere", per_class=2)
    (root / "coat" / "loop").symlink_to(root / "coat")  # a loop
    (root / "coat" / "dangling.png").symlink_to(tmp_path / "gone.png")  # a dangling link
    (root / "shirt" / "first").symlink_to(outside / "shirt")  # a link outside, walked once (sorted first)
    (root / "shirt" / "second").symlink_to(outside / "shirt")  # ... and not twice
    locked = root / "coat" / "locked"
    locked.mkdir()
    (locked / "x.png").write_bytes(encode(pattern(0, (20, 20), False, 5), "PNG"))
    real_scandir, real_hash = os.scandir, images.file_sha256

    def scandir(path):  # root reads everything: the test makes the denial itself
        if isinstance(path, str | os.PathLike) and Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    def file_sha256(path: str) -> str:
        if Path(path) == unreadable:
            raise PermissionError(13, "Permission denied")
        return real_hash(path)

    monkeypatch.setattr(images.os, "scandir", scandir)
    monkeypatch.setattr(images, "file_sha256", file_sha256)
    monkeypatch.setattr(images, "IN_PROCESS_BELOW", 10**6)  # hashed here, where the patches are
    images.forget_hashes()
    listing = images.list_files(str(root))
    reasons = {p["path"]: p["reason"] for p in listing.problems}
    assert reasons == {
        str(root / "coat" / "dangling.png"): f"dangling link to {tmp_path / 'gone.png'}",
        str(root / "coat" / "loop"): f"link to {root / 'coat'}, a folder walked already (a loop, or a second way "
                                     "to it): not followed",
        str(locked): "unreadable directory (Permission denied)",
        str(root / "shirt" / "second"): f"link to {outside / 'shirt'}, a folder walked already (a loop, or a second "
                                       "way to it): not followed",
        str(unreadable): "unreadable file (Permission denied)",
    }
    names = [f.relative for f in listing.files]
    assert sum(n.startswith("shirt/first/") for n in names) == len(list((outside / "shirt").rglob("*.png")))
    assert not any(n.startswith(("shirt/second/", "coat/loop/")) for n in names)

    data = run_data(config_for(root), tmp_path / "out")
    manifest = manifest_of(data)
    folders = {str(root / "coat" / "loop"), str(locked), str(root / "shirt" / "second")}
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == {p: r for p, r in reasons.items()
                                                                     if p not in folders}
    assert {s["path"]: s["reason"] for s in manifest["unwalked"]} == {p: reasons[p] for p in folders}
    assert manifest["image_files"] == len(names) + 2  # the dangling link and the unreadable file: images not read
    lenient = config_for(root, "validate.max_unreadable_share=0.5")
    run_stage("validate", lenient, tmp_path / "out")
    report = json.loads(next((tmp_path / "out" / "validate").glob("*/report.json")).read_text())
    counts = {a["kind"]: (a["count"], a["severity"]) for a in report["anomalies"]
              if a["kind"] in ("unreadable_images", "unwalked_folders")}
    assert counts == {"unreadable_images": (2, "warning"), "unwalked_folders": (3, "warning")}
