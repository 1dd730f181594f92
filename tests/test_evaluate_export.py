"""Evaluate, export, promotion and predict on a tiny trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from stages.data.readers import load_split
from stages.evaluate import classification_metrics, cross_entropy_from_logits
from stages.graph import STAGE_NAMES
from stages.pipeline import record_run, registry_row, run_all, run_export
from stages.promotion import decide
from tapeline.config import load_config
from tapeline.errors import ExportError, PredictError
from tapeline.predict import predict
from tapeline.registry import POINTER, format_runs, production, read_runs
from tapeline.testing import png_bytes, tiny_config


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path):
    """One complete tiny run: (config, artifacts, results)."""
    artifacts = tmp_path_factory.mktemp("run") / "artifacts"
    config = tiny_config(f"idx:{idx_dir}")
    return config, artifacts, run_all(config, artifacts)


def test_metrics_match_keras_and_by_hand() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0])
    logits = np.array([[3, 0, 0], [0, 2, 0], [0, 3, 1], [1, 0, 0], [0, 1, 0], [0, 0, 2]], np.float32)
    metrics = classification_metrics(labels, logits, ("a", "b", "c"))
    keras_loss = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits))
    assert metrics["test_loss"] == pytest.approx(keras_loss, rel=1e-6)
    assert cross_entropy_from_logits(labels, logits) == pytest.approx(keras_loss, rel=1e-6)
    assert metrics["test_accuracy"] == pytest.approx(3 / 6)
    assert metrics["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [1, 1, 0]]
    a, b, c = metrics["per_class"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == (0.5, 0.5, 0.5, 2)
    assert (b["precision"], b["recall"]) == (2 / 3, 1.0) and b["f1"] == pytest.approx(0.8)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)


def test_evaluate_outputs(first_run) -> None:
    config, artifacts, results = first_run
    evaluation = results["evaluate"]
    metrics = json.loads((evaluation.path / "metrics.json").read_text())
    assert metrics["test_accuracy"] == evaluation.test_accuracy and "champion" not in metrics  # pure: no champion
    assert len(metrics["per_class"]) == 10 and np.sum(metrics["confusion_matrix"]) == 100
    predictions = pq.read_table(evaluation.path / "predictions.parquet").to_pylist()
    assert len(predictions) == 100 and list(predictions[0]) == ["index", "label", "predicted", "probability"]
    _, labels = load_split(results["data"].path, "test")
    assert [p["label"] for p in predictions] == labels.tolist()
    accuracy = np.mean([p["label"] == p["predicted"] for p in predictions])
    assert accuracy == pytest.approx(metrics["test_accuracy"])
    for name in ("learning_curves.png", "confusion_matrix.png", "worst_misclassified.png"):
        assert (evaluation.path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exports_round_trip(first_run) -> None:
    config, artifacts, results = first_run
    export = results["export"]
    manifest = json.loads((export.path / "manifest.json").read_text())
    assert set(manifest["reload_max_difference"]) == {"saved_model", "keras", "tflite"}
    assert max(manifest["reload_max_difference"].values()) <= config.export.tolerance
    images, labels = load_split(results["data"].path, "test")
    model = keras.models.load_model(results["train"].path / "model.keras")
    expected = tf.nn.softmax(model(images[:16].astype("float32") / 255.0)).numpy()
    serve = tf.saved_model.load(str(export.path / "saved_model")).signatures["serving_default"]
    for batch in (images[:16], images[:16, ..., 0]):  # [B, H, W, C] and [B, H, W]
        out = serve(images=tf.constant(batch))
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
        assert out["class_id"].numpy().tolist() == expected.argmax(1).tolist()
        assert [n.decode() for n in out["class_name"].numpy()] == [str(i) for i in expected.argmax(1)]
    interpreter = tf.lite.Interpreter(model_path=str(export.path / "model.tflite"))
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    card = json.loads((export.path / "model_card.json").read_text())
    assert card["metrics"]["test_accuracy"] == results["evaluate"].test_accuracy
    assert {"tensorflow", "keras", "prefect"} <= set(card["versions"])
    assert {f["name"] for f in card["files"]} >= {"model.keras", "model.tflite", "saved_model/saved_model.pb"}
    assert "| 0 |" in (export.path / "model_card.md").read_text()


def test_first_model_is_promoted_and_rerun_is_all_cache_hits(first_run) -> None:
    config, artifacts, results = first_run
    assert results["promotion"].promoted and results["promotion"].decision.startswith("promoted")
    pointer = production(artifacts)
    assert pointer["version"] == "v0001" and pointer["train_fingerprint"] == results["train"].fingerprint
    record = json.loads((Path(results["promotion"].record) / "metrics.json").read_text())
    assert record["champion"] is None and record["promotion"]["promoted"] is True
    assert record["test_accuracy"] == results["evaluate"].test_accuracy
    again = run_all(config, artifacts)
    assert all(again[s].cached for s in ("data", "model", "train", "evaluate", "export"))
    assert not again["promotion"].promoted and again["promotion"].decision == "already production (v0001)"


def test_gate_decisions() -> None:
    gate = load_config().export
    assert decide(0.90, 0.91, gate)[0] is False  # worse
    assert decide(0.91, 0.91, gate)[0] is False  # a tie keeps the champion
    assert decide(0.92, 0.91, gate)[0] is True  # better
    assert decide(0.50, None, gate)[0] is True
    strict = load_config(None, ["export.min_accuracy=0.95", "export.promote_min_delta=0.02"]).export
    assert decide(0.94, None, strict) == (False, "rejected: test accuracy 0.9400 < export.min_accuracy 0.9500")
    assert decide(0.975, 0.96, strict)[0] is False and decide(0.99, 0.96, strict)[0] is True


def test_worse_challenger_is_not_promoted_better_is(tmp_path: Path, idx_dir: Path) -> None:
    artifacts = tmp_path / "artifacts"
    good = run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=3"), artifacts)
    worse = run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1"), artifacts)
    assert worse["evaluate"].test_accuracy < good["evaluate"].test_accuracy
    assert worse["promotion"].champion_version == "v0001"
    assert worse["promotion"].champion_accuracy == good["evaluate"].test_accuracy
    assert not worse["promotion"].promoted and worse["promotion"].decision.startswith("kept production")
    assert production(artifacts)["version"] == "v0001"
    card = json.loads((Path(worse["promotion"].record) / "model_card.json").read_text())
    assert card["champion"] == {"version": "v0001", "test_accuracy": good["evaluate"].test_accuracy}
    assert card["promotion"]["decision"] == worse["promotion"].decision
    assert "kept production" in (Path(worse["promotion"].record) / "model_card.md").read_text()
    better = run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=6"), artifacts)
    assert better["evaluate"].test_accuracy > good["evaluate"].test_accuracy
    assert better["promotion"].promoted and production(artifacts)["version"] == "v0002"
    promotion = json.loads((artifacts / "models" / "v0002" / "promotion.json").read_text())
    assert promotion["champion_accuracy"] == good["evaluate"].test_accuracy
    assert promotion["previous"] == "v0001"


def test_promotion_over_a_champion_then_unchanged_rerun_is_all_cache_hits(tmp_path: Path, idx_dir: Path) -> None:
    artifacts = tmp_path / "artifacts"
    config_a = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1")
    config_b = tiny_config(f"idx:{idx_dir}", "train.max_epochs=4")
    run_a = run_all(config_a, artifacts)
    assert run_a["promotion"].promoted and production(artifacts)["version"] == "v0001"
    run_b = run_all(config_b, artifacts)
    assert run_b["evaluate"].test_accuracy > run_a["evaluate"].test_accuracy
    assert run_b["promotion"].promoted and production(artifacts)["version"] == "v0002"
    assert run_b["promotion"].champion_accuracy == run_a["evaluate"].test_accuracy
    exports_before = sorted(p.name for p in (artifacts / "export").iterdir())
    again = run_all(config_b, artifacts)
    assert {name: again[name].cached for name in STAGE_NAMES} == dict.fromkeys(STAGE_NAMES, True)
    assert {name: again[name].fingerprint for name in STAGE_NAMES} == \
        {name: run_b[name].fingerprint for name in STAGE_NAMES}
    assert again["promotion"].decision == "already production (v0002)"
    assert sorted(p.name for p in (artifacts / "export").iterdir()) == exports_before  # no second export
    assert len(list((artifacts / "runs").iterdir())) == 3  # one record per run


def test_crash_between_version_write_and_switch_keeps_production(tmp_path: Path, idx_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.promotion

    artifacts = tmp_path / "artifacts"
    run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1"), artifacts)
    before = (artifacts / "models" / POINTER).read_text()

    def crash(*_args, **_kwargs) -> None:
        raise KeyboardInterrupt("killed before the pointer switch")

    monkeypatch.setattr(stages.promotion, "switch", crash)
    with pytest.raises(KeyboardInterrupt):
        run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=4"), artifacts)
    assert (artifacts / "models" / POINTER).read_text() == before
    assert production(artifacts)["version"] == "v0001"
    assert (artifacts / "models" / "v0001" / "saved_model" / "saved_model.pb").exists()
    monkeypatch.undo()
    resumed = run_all(tiny_config(f"idx:{idx_dir}", "train.max_epochs=4"), artifacts)
    assert resumed["promotion"].promoted and production(artifacts)["version"] == "v0003"


def test_export_fails_past_tolerance(tmp_path: Path, idx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.export

    artifacts = tmp_path / "artifacts"
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1")
    results = run_all(config, artifacts)
    shutil.rmtree(results["export"].path)
    monkeypatch.setattr(stages.export, "reloaded_probabilities", lambda d, f, images: np.full((len(images), 10), 0.1))
    with pytest.raises(ExportError, match="disagree with the trained model"):
        run_export(config, results["data"], results["train"], results["evaluate"], artifacts)
    assert not results["export"].path.exists()
    assert not list((artifacts / "export").glob(".partial-*"))


def test_registry_rows_and_table(first_run) -> None:
    config, artifacts, results = first_run
    record_run(artifacts, registry_row("run-a", config, results))
    record_run(artifacts, registry_row("run-b", config, results))
    rows = read_runs(artifacts)
    assert [r["run_id"] for r in rows][:2] == ["run-b", "run-a"]  # newest first, even within one second
    assert rows[0]["train_fingerprint"] == results["train"].fingerprint
    table = format_runs(rows)
    assert table.splitlines()[0].split()[:3] == ["run_id", "time", "train_fingerprint"]
    assert "run-b" in table


def test_predict_png_and_npy(first_run, tmp_path: Path) -> None:
    config, artifacts, results = first_run
    images, labels = load_split(results["data"].path, "test")
    paths = []
    for i in range(3):
        path = tmp_path / f"test{i}.png"
        path.write_bytes(png_bytes(images[i, ..., 0]))
        paths.append(path)
    np.save(tmp_path / "test3.npy", images[3, ..., 0])
    paths.append(tmp_path / "test3.npy")
    rgb = tmp_path / "rgb_big.png"
    rgb.write_bytes(png_bytes(np.repeat(np.kron(images[4, ..., 0], np.ones((2, 2), np.uint8))[..., None], 3, -1)))
    paths.append(rgb)
    predictions = predict(paths, None, artifacts)
    model = keras.models.load_model(results["train"].path / "model.keras")
    expected = model(images[:4].astype("float32") / 255.0).numpy().argmax(1)
    assert [p.class_name for p in predictions[:4]] == [str(c) for c in expected]
    assert all(0 < p.probability <= 1 for p in predictions)
    assert predictions[4].class_name in {str(i) for i in range(10)}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "is empty"),
        ("text.png", b"hello, not an image", "is not an image tapeline can read"),
        ("dir", None, "is a directory"),
        ("bad.npy", b"\x93NUMPY garbage", "is not a readable .npy array"),
    ],
)
def test_predict_rejects_bad_input(first_run, tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    _, artifacts, _ = first_run
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(PredictError, match=message):
        predict([path], None, artifacts)


def test_predict_rejects_a_huge_image(first_run, tmp_path: Path) -> None:
    _, artifacts, _ = first_run
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("L", (5000, 4000)).save(path)
    with pytest.raises(PredictError, match="5000x4000 pixels, larger than tapeline accepts"):
        predict([path], None, artifacts)


def test_predict_without_production_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="no production model .* run `tapeline run` first"):
        predict([tmp_path / "x.png"], None, tmp_path)


def test_a_registry_written_before_the_sweep_columns_still_reads_and_grows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tapeline.registry import REGISTRY, REQUIRED_COLUMNS, append_run, read_runs

    old = {c: None for c in REQUIRED_COLUMNS} | {"run_id": "old", "time": "2026-12-01T00:00:00Z"}
    pq.write_table(pa.Table.from_pylist([old]), tmp_path / REGISTRY)
    append_run(tmp_path, {"run_id": "new", "time": "2026-12-06T00:00:00Z", "sweep": "sweep-1", "trial": 3})
    rows = read_runs(tmp_path, newest_first=False)
    assert [(r["run_id"], r["sweep"], r["trial"]) for r in rows] == [("old", None, None), ("new", "sweep-1", 3)]
