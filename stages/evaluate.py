"""The evaluate stage: the test split, seen once; metrics, predictions and pictures.

A pure function of (trained model, data, evaluate config): comparing with the production model is the
promotion step's business (`stages.promotion`), so a new champion never changes this stage's output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.readers import load_split
from tapeline.builder import import_user_code
from tapeline.cache import package_versions
from tapeline.results import METRICS_FILE, DataResult, EvaluateResult, StageInputs

log = logging.getLogger("tapeline.evaluate")


# ---------------------------------------------------------------- metrics

def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean sparse categorical cross-entropy computed from logits."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def classification_metrics(labels: np.ndarray, logits: np.ndarray, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Loss (from logits), accuracy, per-class precision / recall / F1 and the confusion matrix."""
    predicted = logits.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, len(class_names))
    true_positive = np.diag(matrix).astype(float)
    predicted_count, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(true_positive, predicted_count, out=np.zeros_like(true_positive), where=predicted_count > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return {
        "test_loss": cross_entropy_from_logits(labels, logits),
        "test_accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        "examples": int(len(labels)),
        "per_class": [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        ],
        "confusion_matrix": matrix.tolist(),
    }


def model_logits(model_path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of a saved .keras model on float images, in batches."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    return np.asarray(model.predict(images, batch_size=1024, verbose=0), np.float32)


# ---------------------------------------------------------------- pictures

def _plot_learning_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> None:
    """Train / validation loss and accuracy per epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key in zip(axes, ("loss", "accuracy"), strict=True):
        axis.plot(epochs, [r[key] for r in history], marker="o", label=f"train {key}")
        axis.plot(epochs, [r[f"val_{key}"] for r in history], marker="o", label=f"validation {key}")
        axis.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        axis.set_xlabel("epoch")
        axis.set_title(key)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _plot_confusion_matrix(matrix: list[list[int]], class_names: tuple[str, ...], path: Path) -> None:
    """The confusion matrix as a labelled heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(counts, cmap="Blues")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(class_names) <= 20:
        threshold = counts.max() / 2 if counts.size else 0
        for (i, j), value in np.ndenumerate(counts):
            axis.text(j, i, str(value), ha="center", va="center", fontsize=7,
                      color="white" if value > threshold else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def worst_misclassified(labels: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Indices of the misclassified examples the model was most confident about."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def _plot_worst(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, indices: np.ndarray,
               class_names: tuple[str, ...], path: Path) -> None:
    """A grid of misclassified test images titled true / predicted (probability)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 5
    rows = max(1, int(np.ceil(len(indices) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, indices, strict=False):
        image = images[index]
        axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        predicted = int(probabilities[index].argmax())
        axis.set_title(f"true {class_names[labels[index]]}\npred {class_names[predicted]} "
                       f"({probabilities[index, predicted]:.2f})", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# ---------------------------------------------------------------- the stage

def _write_predictions(path: Path, labels: np.ndarray, probabilities: np.ndarray) -> None:
    """predictions.parquet: index, label, predicted class, its probability."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    predicted = probabilities.argmax(axis=1)
    pq.write_table(pa.table({
        "index": pa.array(np.arange(len(labels)), pa.int64()),
        "label": pa.array(labels, pa.int64()),
        "predicted": pa.array(predicted, pa.int64()),
        "probability": pa.array(probabilities[np.arange(len(labels)), predicted], pa.float32()),
    }), path)


def test_metrics(model_file: Path, data: DataResult) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """(metrics, uint8 test images, labels, logits) of a saved .keras model on the data's test split."""
    raw, labels = load_split(data.path, "test")
    logits = model_logits(model_file, raw.astype(np.float32) / 255.0)
    metrics = classification_metrics(labels, logits, data.input_spec.class_names)
    return metrics, raw, labels, logits


def build_evaluation(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Evaluate on the test split; write metrics.json, predictions.parquet and the PNG pictures."""
    import pyarrow.parquet as pq

    config, data, train = inputs.config, inputs.data, inputs.train
    import_user_code(config.model)
    names = data.input_spec.class_names
    metrics, raw, labels, logits = test_metrics(train.path / "model.keras", data)
    metrics["class_names"] = list(names)
    metrics["data_fingerprint"], metrics["train_fingerprint"] = data.fingerprint, train.fingerprint
    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    probabilities = softmax(logits)
    _write_predictions(staging / "predictions.parquet", labels, probabilities)
    history = pq.read_table(train.path / "history.parquet").to_pylist()
    _plot_learning_curves(history, train.best_epoch, staging / "learning_curves.png")
    _plot_confusion_matrix(metrics["confusion_matrix"], names, staging / "confusion_matrix.png")
    worst = worst_misclassified(labels, probabilities, config.evaluate.worst_examples)
    _plot_worst(raw, labels, probabilities, worst, names, staging / "worst_misclassified.png")
    log.info("test accuracy %.4f, loss %.4f on %d images", metrics["test_accuracy"], metrics["test_loss"],
             len(labels))
    return {
        "stage": "evaluate", "config": config.evaluate.model_dump(mode="json"),
        "upstream": {"data": data.fingerprint, "train": train.fingerprint},
        "test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"], "versions": package_versions(),
    }


def evaluate_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> EvaluateResult:
    """An EvaluateResult from an evaluate manifest."""
    return EvaluateResult(
        stage="evaluate", fingerprint=manifest["fingerprint"], path=path, cached=cached, seconds=seconds,
        test_accuracy=manifest["test_accuracy"], test_loss=manifest["test_loss"],
    )
