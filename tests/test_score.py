"""Batch scoring: the functions on their own, then the `batch-scoring` flow on an image folder (incremental by
content, per file), and the command's one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.pipeline import run_all
from stages.score.drift import drift_figures
from stages.score.inputs import ScoreInput, label_of
from stages.score.model import ModelRef, ScoringModel
from stages.score.shards import shard_groups, to_score
from tapeline.config import load_config
from tapeline.errors import ScoreError
from tapeline.results import InputSpec
from tapeline.testing import png_bytes, synthetic_images, tiny_config

CLASSES = tuple(str(c) for c in range(10))


def test_a_file_in_a_class_folder_has_that_label() -> None:
    assert label_of("3/a.png", CLASSES) == 3
    assert label_of("test/7/sub/a.png", CLASSES) == 7
    assert label_of("a.png", CLASSES) is None and label_of("cats/a.png", CLASSES) is None


def test_only_new_or_changed_inputs_are_scored_and_grouped_in_key_order() -> None:
    from stages.score.inputs import SourceListing

    inputs = [ScoreInput(key=f"{c}.png", digest=f"d{c}") for c in "edcba"]
    listing = SourceListing(root="/x", inputs=tuple(inputs))
    done = {("a.png", "da"): "s1", ("b.png", "old"): "s1"}
    todo = to_score(listing, done)
    assert [i.key for i in todo] == ["e.png", "d.png", "c.png", "b.png"]  # b changed: scored again
    assert [[i.key for i in g] for g in shard_groups(todo, 3)] == [["b.png", "c.png", "d.png"], ["e.png"]]


def test_the_shard_plan_goes_through_a_file_and_is_removed_after(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.score.inputs import read_plan, shard_plan

    monkeypatch.setenv("TAPELINE_CACHE_DIR", str(tmp_path / "cache"))
    groups = [[ScoreInput(key=f"{g}/{i}.png", digest="d" * 64, size=500, label=g) for i in range(3000)]
              for g in range(3)]  # 9,000 inputs: past the 512 KB a flow run's parameters may hold
    with shard_plan(groups) as plan:
        assert plan.stat().st_size > 512 * 1024
        assert read_plan(plan) == groups
    assert not plan.exists()


def scoring_model(test_accuracy: float | None = 0.9) -> ScoringModel:
    return ScoringModel(ref=ModelRef(artifacts="/x", version="v0001"), saved_model=Path("/x"),
                        spec=InputSpec(shape=(28, 28, 1), class_names=CLASSES), interpolation="bilinear",
                        crop_to_aspect_ratio=False, export_fingerprint="e", train_fingerprint="t",
                        test_accuracy=test_accuracy)


def batch(pixels: np.ndarray, predicted: np.ndarray, accuracy: float | None = None) -> dict:
    counts = np.bincount(pixels.reshape(-1), minlength=256).astype(float)
    return {"images": 500, "pixel_histogram": counts / counts.sum(),
            "predicted_shares": np.bincount(predicted, minlength=10) / len(predicted), "mean_confidence": 0.9,
            "accuracy": accuracy, "labelled": 0 if accuracy is None else 500}


def test_drift_is_judged_on_grey_levels_predicted_classes_and_accuracy() -> None:
    config = load_config().score
    images, labels = synthetic_images(500)
    baseline = batch(images, labels)
    baseline = {"pixel_histogram": baseline["pixel_histogram"], "class_shares": baseline["predicted_shares"]}
    same = drift_figures(batch(images, labels), baseline, scoring_model(), config)
    assert same["detected"] is False and same["pixel_divergence"] == 0.0 and same["prediction_shift"] == 0.0
    inverted = drift_figures(batch(255 - images, labels), baseline, scoring_model(), config)
    assert inverted["detected"] and inverted["reasons"][0].startswith("grey levels moved by Jensen–Shannon")
    one_class = drift_figures(batch(images, np.zeros(500, np.int64)), baseline, scoring_model(), config)
    assert one_class["detected"] and one_class["prediction_shift"] == pytest.approx(0.9)
    worse = drift_figures(batch(images, labels, accuracy=0.7), baseline, scoring_model(0.9), config)
    assert worse["detected"] and worse["accuracy_drop"] == pytest.approx(0.2)
    assert worse["reasons"] == ["accuracy 0.7000 is 0.2000 below the model's test accuracy 0.9000 "
                                "(score.max_accuracy_drop 0.05)"]
    few = drift_figures({**batch(255 - images, labels), "images": 20}, baseline, scoring_model(), config)
    assert few["detected"] is False and "too few to judge drift" in few["reasons"][0]


# ---------------------------------------------------------------- the flow and the command

@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> Path:
    """A store whose production model (v0001) is the tiny CNN trained on the synthetic data."""
    artifacts = tmp_path_factory.mktemp("score") / "artifacts"
    assert run_all(tiny_config(f"idx:{idx_dir}"), artifacts)["promotion"].promoted
    return artifacts


def write_pictures(folder: Path, count: int, seed: int, invert: bool = False) -> dict[str, int]:
    """`count` synthetic images as PNGs in class folders; {relative path: label}."""
    images, labels = synthetic_images(count, seed=seed)
    written = {}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        relative = f"{label}/s{seed}-{i:04d}.png"
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(png_bytes(255 - image if invert else image))
        written[relative] = int(label)
    return written


def score(folder: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch, *sets: str, model: str | None = None
          ) -> dict:
    from flows.scoring import batch_scoring

    monkeypatch.setenv("TAPELINE_ARTIFACTS", str(artifacts))
    return batch_scoring(source=f"images:{folder}", model=model, config=load_config(None, list(sets)))


@pytest.mark.slow
def test_scoring_is_per_file_by_content_and_agrees_with_predict(harness, production: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tapeline.predict import iter_predictions

    folder = tmp_path / "incoming"
    written = write_pictures(folder, 40, seed=5)
    (folder / "3" / "broken.png").write_bytes(b"not an image")
    first = score(folder, production, monkeypatch, "score.shard_size=16")
    assert (first["images"], first["scored"], first["model_version"]) == (40, 40, "v0001")
    assert first["skipped"] == [{"path": str(folder / "3" / "broken.png"),
                                 "reason": "is not an image tapeline can read (PNG, JPEG, BMP or GIF): cannot "
                                           "identify image file"}]
    table = pq.read_table(Path(first["output"]) / "predictions.parquet").to_pylist()
    assert [r["path"] for r in table] == sorted(written)
    assert {r["model_version"] for r in table} == {"v0001"} and all(r["label"] == written[r["path"]] for r in table)
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 and r["probability"] == max(r["probabilities"]) for r in table)
    assert np.mean([r["class_index"] == r["label"] for r in table]) > 0.5
    manifest = json.loads((Path(first["output"]) / "manifest.json").read_text())
    assert manifest["images"] == 40 and manifest["drift"]["labelled"] == 40
    paths = [folder / r["path"] for r in table[:5]]
    predicted = list(iter_predictions(paths, None, production))
    assert [p.class_name for p in predicted] == [r["class_name"] for r in table[:5]]
    assert np.allclose([p.probability for p in predicted], [r["probability"] for r in table[:5]], atol=1e-6)

    assert score(folder, production, monkeypatch)["scored"] == 0  # the same again: nothing
    added = write_pictures(folder, 3, seed=6)
    again = score(folder, production, monkeypatch, "score.shard_size=16")
    assert (again["images"], again["scored"]) == (43, 3)  # only the new files, not their neighbours
    changed = sorted(written)[0]
    (folder / changed).write_bytes(png_bytes(synthetic_images(1, seed=9)[0][0]))
    third = score(folder, production, monkeypatch)
    assert (third["images"], third["scored"]) == (43, 1)
    rows = pq.read_table(Path(third["output"]) / "predictions.parquet").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted([*written, *added])  # one row per file, the changed one new

    export = next(p for p in (production / "export").iterdir() if not p.name.startswith("."))
    other = score(folder, production, monkeypatch, model=str(export))
    assert other["scored"] == 43 and other["model_version"] == f"export-{export.name}"


@pytest.mark.slow
def test_an_inverted_batch_is_drift_and_still_scored(harness, production: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "inverted"
    write_pictures(folder, 60, seed=7, invert=True)
    result = score(folder, production, monkeypatch, "score.min_drift_images=50")
    assert result["drift"]["detected"] is True and result["images"] == 60
    assert result["drift"]["pixel_divergence"] > 0.05
    report = (Path(result["output"]) / "drift.md").read_text()
    assert "**drift detected**" in report and (Path(result["output"]) / "drift.png").stat().st_size > 1000


@pytest.mark.slow
def test_idx_and_parquet_sources_are_scored_row_by_row(harness, production: Path, idx_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from flows.scoring import batch_scoring

    monkeypatch.setenv("TAPELINE_ARTIFACTS", str(production))
    idx = batch_scoring(source=f"idx:{idx_dir}", config=load_config())
    assert (idx["images"], idx["scored"]) == (400, 400) and idx["drift"]["labelled"] == 400  # 300 train + 100 test
    assert idx["drift"]["accuracy"] > 0.5
    rows = pq.read_table(Path(idx["output"]) / "predictions.parquet").to_pylist()
    assert rows[0]["path"] == "t10k-images-idx3-ubyte#0" and rows[0]["label"] is not None

    images, _ = synthetic_images(30, seed=8)
    folder = tmp_path / "drop"
    folder.mkdir()
    pq.write_table(pa.table({"image": [png_bytes(i) for i in images[:20]]}), folder / "a.parquet")  # PNG bytes
    pq.write_table(pa.table({"image": pa.array([i.reshape(-1).tolist() for i in images[20:]],
                                               pa.list_(pa.uint8()))}), folder / "b.parquet")
    first = batch_scoring(source=f"parquet:{folder}", config=load_config())
    assert (first["images"], first["scored"], first["skipped"]) == (30, 30, [])
    changed = [png_bytes(i) for i in images[:20]]
    changed[4] = png_bytes(255 - images[4])
    pq.write_table(pa.table({"image": changed}), folder / "a.parquet")
    again = batch_scoring(source=f"parquet:{folder}", config=load_config())
    assert (again["images"], again["scored"]) == (30, 1)  # the one changed row
    rows = pq.read_table(Path(again["output"]) / "predictions.parquet").to_pylist()
    assert [r["path"] for r in rows][:2] == ["a.parquet#0", "a.parquet#1"] and "label" not in rows[0]


@pytest.mark.parametrize(("make", "model", "message"), [
    ("empty-store", None, "no production model under "),
    ("store", "models/v0042", "model version v0042 does not exist under "),
    ("store", None, "score: images:"),
    ("empty-folder", None, "holds no image files"),
    ("parquet-without-images", None, "has no 'image' column"),
])
def test_scoring_refuses_bad_input_in_one_line(production: Path, tmp_path: Path, make: str, model: str | None,
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    artifacts = tmp_path / "nothing" if make == "empty-store" else production
    folder = tmp_path / "pictures"
    source = f"images:{folder}"
    if make == "parquet-without-images":
        import pyarrow as pa

        pq.write_table(pa.table({"pixels": [1, 2]}), tmp_path / "drop.parquet")
        source = f"parquet:{tmp_path / 'drop.parquet'}"
    elif make == "empty-folder":
        (folder / "3").mkdir(parents=True)
    elif make != "store":
        write_pictures(folder, 2, seed=1)
    args = ["score", source, "--artifacts", str(artifacts), *(["--model", model] if model else [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and message in err, err


def test_the_training_baseline_is_computed_once_and_kept_in_the_store(production: Path, tmp_path: Path) -> None:
    from stages.score.drift import BASELINES, training_baseline
    from stages.score.model import model_ref, resolve
    from stages.validate import baseline_summary
    from tapeline.store import open_store

    artifacts = tmp_path / "artifacts"
    shutil.copytree(production, artifacts)
    store = open_store(artifacts)
    model = resolve(model_ref(None, store))
    data_fp = store.manifest("train", model.train_fingerprint)["upstream"]["data"]
    expected = baseline_summary(artifacts / "data" / data_fp)
    first = training_baseline(store, model)
    assert [p.name for p in (artifacts / BASELINES).iterdir() if not p.name.startswith(".")] == [data_fp]
    shutil.rmtree(artifacts / "data")  # the second read comes from the kept baseline, not from the data
    second = training_baseline(store, model)
    for found in (first, second):
        assert found is not None
        assert np.array_equal(found["pixel_histogram"], expected["pixel_histogram"])
        assert np.array_equal(found["class_shares"], expected["class_shares"])


def test_a_model_loaded_in_the_background_is_the_one_shards_use(production: Path) -> None:
    from stages.score import model as scoring
    from tapeline.store import open_store

    model = scoring.resolve(scoring.model_ref(None, open_store(production)))
    scoring._LOADED.pop(str(model.saved_model), None)
    scoring.load_in_background(model.saved_model).join()
    loaded = scoring._LOADED[str(model.saved_model)]
    assert scoring.serving_function(model.saved_model) is loaded
    missing = production / "no-such-model"
    scoring.load_in_background(missing).join()  # a failed load leaves nothing behind; the shard reports it
    assert str(missing) not in scoring._LOADED


@pytest.mark.slow
def test_a_parquet_source_on_a_bucket_is_listed_row_by_row(s3_url: str) -> None:
    import fsspec
    import pyarrow as pa

    from stages.score.inputs import fitted_images, list_source
    from tapeline.predict import Resize

    images, labels = synthetic_images(12, seed=9)
    fs = fsspec.filesystem("s3")
    drop = f"{s3_url}/drop"
    for name, part in (("a.parquet", slice(0, 7)), ("more/b.parquet", slice(7, 12))):
        with fs.open(f"{drop}/{name}", "wb") as out:
            pq.write_table(pa.table({"image": [png_bytes(i) for i in images[part]],
                                     "label": [int(v) for v in labels[part]]}), out)
    listing = list_source(f"parquet:{drop}", CLASSES)
    assert [i.key for i in listing.inputs] == [f"a.parquet#{n}" for n in range(7)] + \
        [f"more/b.parquet#{n}" for n in range(5)]
    assert [i.label for i in listing.inputs] == [int(v) for v in labels]
    spec = InputSpec(shape=(28, 28, 1), class_names=CLASSES)
    fitted = list(fitted_images(listing.root, listing.inputs, spec, Resize()))
    assert all(np.array_equal(image[..., 0], images[i]) for i, image, _ in fitted)
    with pytest.raises(ScoreError, match="idx: sources are read from disk"):
        list_source(f"idx:{s3_url}/idx", CLASSES)
