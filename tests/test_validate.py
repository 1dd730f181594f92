"""The validate stage on tiny synthetic data: every anomaly kind with exact counts and severities, the
group-aware split, the baseline from production, the gate, and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.graph import STAGE_NAMES, run_stage
from stages.pipeline import run_all, run_data
from stages.validate import (
    constant_anomalies,
    count_anomalies,
    drift_anomalies,
    duplicate_anomalies,
    duplicate_counts,
    js_divergence,
    near_duplicates,
    pixel_histogram,
    schema_anomalies,
)
from tapeline.config import load_config
from tapeline.errors import ValidationError
from tapeline.testing import synthetic_images, tiny_config, write_idx_dir

CONFIG = load_config().validate
NAMES = tuple(str(i) for i in range(10))


def keys_of(*arrays: np.ndarray) -> list[np.ndarray]:
    from stages.data.layout import image_keys

    return [image_keys(a) for a in arrays]


def parquet_source(path: Path, images: np.ndarray, labels: np.ndarray, splits: list[str]) -> str:
    pq.write_table(pa.table({"image": [img.reshape(-1).tolist() for img in images], "label": labels.tolist(),
                             "split": splits, "height": [images.shape[1]] * len(images),
                             "width": [images.shape[2]] * len(images)}), path)
    return f"parquet:{path}"


def validated(config, artifacts: Path):
    """The data stage, then the validate stage (raising ValidationError when it fails)."""
    run_data(config, artifacts)
    return run_stage("validate", config, artifacts)


def report_of(result) -> dict:
    return json.loads((result.path / "report.json").read_text())


def kinds(report: dict) -> dict[str, tuple[str, int]]:
    return {a["kind"]: (a["severity"], a["count"]) for a in report["anomalies"]}


def test_graph_has_validate_between_data_and_model() -> None:
    assert STAGE_NAMES == ("data", "validate", "model", "train", "evaluate", "export")


def test_clean_data_passes_with_its_report(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    result = validated(config, tmp_path / "a")
    report = report_of(result)
    assert result.passed and report["passed"] is True
    assert report["duplicates"] == dict.fromkeys(("within_train", "within_validation", "within_test", "train_test",
                                                  "validation_test", "train_validation", "label_conflicts"), 0)
    assert kinds(report) == {"few_examples": ("warning", 10)}  # 3 validation images a class, under 10
    assert report["records"] == {"train": 270, "validation": 30, "test": 100} and report["baseline"] is None
    rows = pq.read_table(result.path / "statistics.parquet").to_pylist()
    assert len(rows) == 3 * 11 and {r["split"] for r in rows} == {"train", "validation", "test"}
    train_all = next(r for r in rows if r["split"] == "train" and r["class"] == "*")
    assert train_all["count"] == 270 and train_all["constant_share"] == 0.0
    for name in ("class_histogram.png", "pixel_histogram.png"):
        assert (result.path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# Data validation: passed" in (result.path / "report.md").read_text()
    assert validated(config, tmp_path / "a").cached


def test_duplicate_counts_within_and_across_splits() -> None:
    train, _ = synthetic_images(20, seed=1)
    test, _ = synthetic_images(10, seed=2)
    validation, _ = synthetic_images(6, seed=3)
    train = np.concatenate([train, train[:2], test[:3]])  # 2 copies within train, 3 test images in train
    validation = np.concatenate([validation, train[:1]])  # 1 train image in validation
    labels = {"train": np.arange(len(train)) % 10, "validation": np.arange(len(validation)) % 10,
              "test": np.arange(len(test)) % 10}
    labels["train"][22:25] = labels["test"][:3]  # copies keep their labels...
    labels["validation"][6] = labels["train"][0]
    labels["train"][20] = (labels["train"][0] + 1) % 10  # ...but one: a conflict
    keys = dict(zip(("train", "validation", "test"), keys_of(train, validation, test), strict=True))
    counts, examples = duplicate_counts(keys, labels)
    assert counts == {"within_train": 2, "within_validation": 0, "within_test": 0, "train_test": 3,
                      "validation_test": 0, "train_validation": 1, "label_conflicts": 1}
    assert examples["within_train"][0] == {"split": "train", "index": 20, "copy_of": 0}
    found = {a["kind"]: (a["severity"], a["count"]) for a in duplicate_anomalies(counts, examples)}
    assert found == {"duplicates": ("warning", 2), "leakage": ("error", 4), "label_conflict": ("error", 1)}


def test_missing_and_rare_classes() -> None:
    images = np.zeros((5, 4, 4, 1), np.uint8)
    splits = {"train": (images, np.array([0, 0, 1, 1, 2])), "validation": (images[:2], np.array([0, 1])),
              "test": (images, np.array([0, 1, 2, 3, 3]))}
    config = CONFIG.model_copy(update={"min_per_class": 2})
    found = [(a["kind"], a["severity"], a["count"]) for a in count_anomalies(splits, ("a", "b", "c", "d"), config)]
    assert found == [("missing_class", "error", 1), ("few_examples", "warning", 1),  # train: no d, one c
                     ("missing_class", "warning", 2), ("few_examples", "warning", 2),  # validation: no c, d
                     ("few_examples", "warning", 3)]  # test: one a, b and c


def test_constant_images_over_the_threshold() -> None:
    images, labels = synthetic_images(100)
    images = images[..., None]
    images[:7] = 0
    images[7:9] = 200
    splits = {"train": (images, labels), "validation": (images[10:], labels[10:]), "test": (images[9:], labels[9:])}
    found = constant_anomalies(splits, CONFIG)
    assert [(a["kind"], a["severity"], a["count"]) for a in found] == [("constant_images", "error", 9)]
    assert [e["index"] for e in found[0]["examples"]] == [0, 1, 2, 3, 4]
    assert constant_anomalies(splits, CONFIG.model_copy(update={"max_constant_share": 0.1})) == []


def test_label_and_pixel_drift() -> None:
    images, labels = synthetic_images(400)
    baseline = {"class_shares": np.full(10, 0.1), "pixel_histogram": pixel_histogram(images)}
    skewed = np.where(labels < 5, 0, labels)  # classes 1-4 become class 0: its share goes 0.1 -> 0.5
    ours = {"class_shares": np.bincount(skewed, minlength=10) / len(skewed),
            "pixel_histogram": pixel_histogram(np.clip(images.astype(int) + 60, 0, 255).astype(np.uint8))}
    found, drift = drift_anomalies(ours, baseline, CONFIG)
    assert [(a["kind"], a["severity"], a["count"]) for a in found] == [("label_drift", "warning", 1),
                                                                       ("pixel_drift", "warning", 1)]
    assert drift["label"] == pytest.approx(0.4)
    assert drift["pixel"] == pytest.approx(js_divergence(ours["pixel_histogram"], baseline["pixel_histogram"]))
    strict, _ = drift_anomalies(ours, baseline, CONFIG.model_copy(update={"drift": "error"}))
    assert {a["severity"] for a in strict} == {"error"}
    assert drift_anomalies(ours, baseline, CONFIG.model_copy(update={"drift": "off"}))[0] == []
    assert drift_anomalies(baseline, baseline, CONFIG) == ([], {"label": 0.0, "pixel": 0.0})


def test_schema_change_is_an_error_unless_allowed() -> None:
    ours = {"shape": [28, 28, 1], "dtype": "uint8", "channels": 1, "label_range": [0, 4], "class_names": list("abcde")}
    base = {**ours, "shape": [32, 32, 1], "class_names": list("abcdx")}
    (found,) = schema_anomalies(ours, base, CONFIG)
    assert (found["kind"], found["severity"], found["count"], found["examples"]) == \
        ("schema_change", "error", 2, ["shape", "class_names"])
    (allowed,) = schema_anomalies(ours, base, CONFIG.model_copy(update={"allow_schema_change": True}))
    assert allowed["severity"] == "warning"
    assert schema_anomalies(ours, ours, CONFIG) == [] and schema_anomalies(ours, None, CONFIG) == []


def test_near_duplicates_are_found_and_exact_copies_are_not() -> None:
    train, _ = synthetic_images(50, seed=4)
    test, _ = synthetic_images(5, seed=5)
    close = train[7].astype(np.int16)
    close[0, :4] += 1  # a few pixels one grey level off
    test = np.concatenate([test, close.astype(np.uint8)[None], train[9:10]])
    assert near_duplicates(train[..., None], test[..., None], 3.0) == [(5, 7)]


def test_split_is_group_aware_and_test_copies_are_dropped(tmp_path: Path) -> None:
    images, labels = synthetic_images(240, seed=6)
    test_images, test_labels = synthetic_images(60, seed=7)
    copies = np.concatenate([images[:12], images[:12], test_images[:5]])  # 12 images thrice, 5 test copies
    all_images = np.concatenate([images, copies, test_images])
    all_labels = np.concatenate([labels, labels[:12], labels[:12], test_labels[:5], test_labels])
    splits = ["train"] * (240 + 29) + ["test"] * 60
    source = parquet_source(tmp_path / "d.parquet", all_images, all_labels, splits)
    kept = validated(tiny_config(source), tmp_path / "a")
    report = report_of(kept)
    assert report["dropped_test_duplicates"] == 5 and report["duplicates"]["train_test"] == 0
    assert report["duplicates"]["train_validation"] == 0  # every copy landed with its original
    assert report["duplicates"]["within_train"] + report["duplicates"]["within_validation"] == 24
    assert kinds(report)["dropped_test_duplicates"] == ("warning", 5) and kept.passed
    manifest = json.loads((run_data(tiny_config(source), tmp_path / "a").path / "manifest.json").read_text())
    assert manifest["dropped_test_duplicates"] == 5

    with pytest.raises(ValidationError, match=r"data validation failed: leakage \(5\)"):
        validated(tiny_config(source, "data.drop_test_duplicates=false"), tmp_path / "a")


def test_label_conflict_stops_the_run_before_the_model_stage(tmp_path: Path) -> None:
    images, labels = synthetic_images(300, seed=8)
    conflicting = (labels[:3] + 1) % 10
    source = parquet_source(tmp_path / "d.parquet", np.concatenate([images, images[:3]]),
                            np.concatenate([labels, conflicting]), ["train"] * 303)
    with pytest.raises(ValidationError) as raised:
        run_all(tiny_config(source), tmp_path / "a")
    assert "label_conflict (3)" in str(raised.value) and "report.md" in str(raised.value)
    report = json.loads(next((tmp_path / "a" / "validate").glob("*/report.json")).read_text())
    assert report["passed"] is False and report["duplicates"]["label_conflicts"] == 3
    assert kinds(report)["label_conflict"] == ("error", 3)
    assert not (tmp_path / "a" / "model").exists()  # nothing downstream ran
    with pytest.raises(ValidationError):  # a cached failed report fails again
        validated(tiny_config(source), tmp_path / "a")


def test_baseline_is_the_data_production_was_trained_on(tmp_path: Path) -> None:
    first = write_idx_dir(tmp_path / "first", seed=0)
    artifacts = tmp_path / "a"
    results = run_all(tiny_config(f"idx:{first}", "train.max_epochs=1"), artifacts)
    assert report_of(results["validate"])["baseline"] is None
    same = validated(tiny_config(f"idx:{first}", "train.max_epochs=1"), artifacts)
    assert same.cached  # production was trained on this very data: still no baseline, still cached

    second = tmp_path / "second"
    write_idx_dir(second, seed=3)
    shifted = validated(tiny_config(f"idx:{second}"), artifacts)
    report = report_of(shifted)
    assert report["baseline"] == results["data"].fingerprint and shifted.passed
    assert report["drift"]["label"] == pytest.approx(0.0, abs=0.05) and report["drift"]["pixel"] < 0.05

    bright = tmp_path / "bright"
    write_idx_dir(bright, seed=3, brightness=90)
    report = report_of(validated(tiny_config(f"idx:{bright}"), artifacts))
    assert kinds(report)["pixel_drift"] == ("warning", 1) and report["passed"] is True
    with pytest.raises(ValidationError, match="pixel_drift"):
        validated(tiny_config(f"idx:{bright}", "validate.drift=error"), artifacts)
