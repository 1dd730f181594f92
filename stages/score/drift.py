"""Drift of a scored batch against the data the model was trained on, with the validate stage's own statistics
(grey-level histogram and Jensen–Shannon divergence, class shares): the images this run scored, the classes the
model gave them, its mean confidence, and its accuracy where the inputs have labels. Drift is a finding, not an
error: the predictions are kept whatever it says."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.score.model import ScoringModel
from stages.score.shards import ROWS, SHARDS, scores_stage
from stages.validate import baseline_summary, class_shares, js_divergence
from tapeline.config import ScoreConfig
from tapeline.store import Store

BASELINES, BASELINE = "scores/baselines", "baseline.json"


def batch_statistics(store: Store, version: str, shards: Sequence[dict[str, Any]], classes: int) -> dict[str, Any]:
    """What the shards scored: image count, grey-level histogram, predicted class shares, mean confidence, and
    accuracy over the labelled rows (None without labels)."""
    import pyarrow.parquet as pq

    counts = np.zeros(256, np.float64)
    predicted, confidence, hits = [np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0, bool)]
    for shard in shards:
        counts += np.asarray(shard["pixel_counts"], np.float64)
        _, local = store.fetch(scores_stage(version, SHARDS), shard["fingerprint"])
        table = pq.read_table(local / ROWS, columns=["class_index", "probability", "label"])
        guesses = table["class_index"].to_numpy().astype(np.int64)
        labels = table["label"].to_numpy(zero_copy_only=False)  # floats, NaN where unlabelled
        labelled = ~np.isnan(labels.astype(np.float64))
        predicted.append(guesses)
        confidence.append(table["probability"].to_numpy())
        hits.append(guesses[labelled] == labels[labelled])
    predicted_all, confidence_all, hits_all = np.concatenate(predicted), np.concatenate(confidence), \
        np.concatenate(hits)
    return {"images": len(predicted_all),
            "pixel_histogram": counts / counts.sum() if counts.sum() else counts,
            "predicted_shares": class_shares(predicted_all, classes),
            "mean_confidence": float(confidence_all.mean()) if len(confidence_all) else None,
            "accuracy": float(hits_all.mean()) if len(hits_all) else None, "labelled": len(hits_all)}


def training_baseline(store: Store, model: ScoringModel) -> dict[str, Any] | None:
    """The class shares and grey-level histogram of the training split the model was trained on (None when the
    model's train output is gone from the store, or its data output before its baseline was kept)."""
    if model.train_fingerprint is None:
        return None
    train = store.manifest("train", model.train_fingerprint)
    data_fp = ((train or {}).get("upstream") or {}).get("data")
    if data_fp is None or (store.manifest(BASELINES, data_fp) is None and store.manifest("data", data_fp) is None):
        return None
    return _stored_baseline(store, data_fp)


def _stored_baseline(store: Store, data_fp: str) -> dict[str, Any]:
    """The class shares and grey-level histogram of a data output's training split, computed once (reading every
    training image) and kept in the store beside the scores (`scores/baselines/<data fingerprint>/`)."""

    def make(staging: Path, _save_partial: Any) -> dict[str, Any]:
        _, local = store.fetch("data", data_fp)
        summary = baseline_summary(local)
        shares, histogram = summary["class_shares"], summary["pixel_histogram"]
        (staging / BASELINE).write_text(json.dumps({"class_shares": np.asarray(shares).tolist(),
                                                    "pixel_histogram": np.asarray(histogram).tolist()}))
        return {"stage": "score-baseline", "data": data_fp}

    _, _, local = store.build(BASELINES, data_fp, make)
    stored = json.loads((local / BASELINE).read_text())
    return {key: np.asarray(value, np.float64) for key, value in stored.items()}


def drift_figures(stats: dict[str, Any], baseline: dict[str, Any] | None, model: ScoringModel,
                  config: ScoreConfig) -> dict[str, Any]:
    """The drift figures of a batch, and whether (and why) it drifted: the grey levels past
    score.drift_threshold, a predicted class's share past score.max_prediction_shift, the accuracy more than
    score.max_accuracy_drop below the model's test accuracy."""
    figures: dict[str, Any] = {"detected": False, "reasons": [], "images": stats["images"],
                               "mean_confidence": stats["mean_confidence"], "accuracy": stats["accuracy"],
                               "labelled": stats["labelled"], "test_accuracy": model.test_accuracy,
                               "pixel_divergence": None, "prediction_shift": None, "accuracy_drop": None,
                               "baseline": baseline is not None}
    if stats["images"] == 0:
        figures["reasons"] = ["no new image was scored by this run"]
        return figures
    if stats["images"] < config.min_drift_images:
        figures["reasons"] = [f"{stats['images']} new images are too few to judge drift by (score.min_drift_images "
                              f"{config.min_drift_images})"]
        return figures
    reasons: list[str] = []
    if baseline is not None:
        pixel = js_divergence(stats["pixel_histogram"], baseline["pixel_histogram"])
        shift = float(np.abs(stats["predicted_shares"] - baseline["class_shares"]).max())
        figures.update(pixel_divergence=round(pixel, 6), prediction_shift=round(shift, 6))
        if pixel > config.drift_threshold:
            reasons.append(f"grey levels moved by Jensen–Shannon {pixel:.4f} bits (score.drift_threshold "
                           f"{config.drift_threshold})")
        if shift > config.max_prediction_shift:
            reasons.append(f"a predicted class's share moved by {shift:.3f} from its training share "
                           f"(score.max_prediction_shift {config.max_prediction_shift})")
    if stats["accuracy"] is not None and model.test_accuracy is not None:
        drop = float(model.test_accuracy) - stats["accuracy"]
        figures["accuracy_drop"] = round(drop, 6)
        if drop > config.max_accuracy_drop:
            reasons.append(f"accuracy {stats['accuracy']:.4f} is {drop:.4f} below the model's test accuracy "
                           f"{model.test_accuracy:.4f} (score.max_accuracy_drop {config.max_accuracy_drop})")
    figures.update(detected=bool(reasons), reasons=reasons)
    return figures


def drift_report(figures: dict[str, Any], stats: dict[str, Any], baseline: dict[str, Any] | None,
                 model: ScoringModel, source: str) -> dict[str, bytes]:
    """The report's files: `drift.md` and `drift.png`."""
    return {"drift.md": _drift_markdown(figures, model, source).encode(),
            "drift.png": _drift_picture(stats, baseline, model.spec.class_names)}


def _drift_markdown(figures: dict[str, Any], model: ScoringModel, source: str) -> str:
    """The drift report as Markdown."""
    def shown(value: Any, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    verdict = "**drift detected**: " + "; ".join(figures["reasons"]) if figures["detected"] else \
        "no drift" + (f" ({figures['reasons'][0]})" if figures["reasons"] else "")
    lines = [f"# Drift of {source} scored by {model.ref.label}", "", verdict, "",
             "| figure | value |", "|---|---|",
             f"| images scored by this run | {figures['images']} |",
             f"| grey-level divergence from the training data (JS, bits) | {shown(figures['pixel_divergence'])} |",
             f"| largest shift of a predicted class's share | {shown(figures['prediction_shift'])} |",
             f"| mean confidence | {shown(figures['mean_confidence'])} |",
             f"| accuracy ({figures['labelled']} labelled) | {shown(figures['accuracy'])} |",
             f"| the model's test accuracy | {shown(figures['test_accuracy'])} |"]
    if not figures["baseline"]:
        lines += ["", "The model's training data is no longer in the store: no comparison with it."]
    return "\n".join(lines) + "\n"


def _drift_picture(stats: dict[str, Any], baseline: dict[str, Any] | None, class_names: Sequence[str]) -> bytes:
    """Grey levels and predicted class shares of the batch beside the training data's, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(np.arange(256), stats["pixel_histogram"], label="scored")
    right.bar(np.arange(len(class_names)) - 0.2, stats["predicted_shares"], width=0.4, label="predicted")
    if baseline is not None:
        left.plot(np.arange(256), baseline["pixel_histogram"], label="training data", linestyle="--")
        right.bar(np.arange(len(class_names)) + 0.2, baseline["class_shares"], width=0.4, label="training data")
    left.set_yscale("log")
    left.set(title="grey levels", xlabel="grey level", ylabel="share of pixels")
    right.set(title="classes", ylabel="share")
    right.set_xticks(np.arange(len(class_names)), [str(n) for n in class_names], rotation=45, ha="right")
    left.legend()
    right.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
