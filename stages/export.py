"""The export stage: SavedModel (raw uint8 in), .keras and TFLite, each reloaded and checked, and a model
card. Whether the export replaces production is the promotion step's decision (`stages.promotion`)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.readers import load_split
from tapeline.builder import import_user_code
from tapeline.cache import describe_files, package_versions, read_manifest
from tapeline.config import PipelineConfig
from tapeline.errors import ExportError
from tapeline.hardware import cpu_name
from tapeline.results import DataResult, ExportResult, InputSpec, StageInputs, TrainResult
from tapeline.serving import SAVED_MODEL

KERAS_FILE, TFLITE_FILE = "model.keras", "model.tflite"
TFLITE_SIGNATURE = "serving_nhwc"
VERIFY_IMAGES = 64
log = logging.getLogger("tapeline.export")


# ---------------------------------------------------------------- formats

def write_saved_model(model: Any, spec: InputSpec, path: Path) -> None:
    """A SavedModel whose `serving_default` takes raw uint8 images [batch, H, W] or [batch, H, W, C]
    and returns probabilities, class_id and class_name; normalization is inside the graph. A
    fixed-rank `serving_nhwc` endpoint (no strings) is what TFLite converts."""
    import keras
    import tensorflow as tf

    names = tf.constant(list(spec.class_names))
    height, width, channels = spec.shape

    def outputs(images: Any) -> tuple[Any, Any]:
        pixels = tf.cast(tf.reshape(images, [-1, height, width, channels]), tf.float32) / 255.0
        probabilities = tf.nn.softmax(tf.cast(model(pixels, training=False), tf.float32))
        return probabilities, tf.argmax(probabilities, axis=-1, output_type=tf.int32)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    def serving_default(images: Any) -> dict[str, Any]:
        probabilities, class_id = outputs(images)
        return {"probabilities": probabilities, "class_id": class_id, "class_name": tf.gather(names, class_id)}

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, channels], tf.uint8, name="images")])
    def serving_nhwc(images: Any) -> dict[str, Any]:
        probabilities, class_id = outputs(images)
        return {"probabilities": probabilities, "class_id": class_id}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serving_default)
    archive.add_endpoint(TFLITE_SIGNATURE, serving_nhwc)
    archive.write_out(str(path), verbose=False)


def _write_tflite(saved_model: Path, path: Path) -> None:
    """Convert the SavedModel's fixed-rank uint8 endpoint to a TFLite flatbuffer."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[TFLITE_SIGNATURE])
    path.write_bytes(converter.convert())


def _reference_probabilities(model: Any, images: np.ndarray) -> np.ndarray:
    """The trained model's probabilities on uint8 images."""
    import tensorflow as tf

    logits = tf.cast(model(images.astype(np.float32) / 255.0, training=False), tf.float32)
    return tf.nn.softmax(logits).numpy()


def reloaded_probabilities(directory: Path, fmt: str, images: np.ndarray) -> np.ndarray:
    """Probabilities from an exported artifact loaded back the way a user would load it."""
    import keras
    import tensorflow as tf

    if fmt == "saved_model":
        serve = tf.saved_model.load(str(directory / SAVED_MODEL)).signatures["serving_default"]
        return serve(images=tf.constant(images))["probabilities"].numpy()
    if fmt == "keras":
        model = keras.models.load_model(directory / KERAS_FILE, compile=False)
        return _reference_probabilities(model, images)
    interpreter = tf.lite.Interpreter(model_path=str(directory / TFLITE_FILE))
    return interpreter.get_signature_runner(TFLITE_SIGNATURE)(images=images)["probabilities"]


def _verify_exports(directory: Path, formats: tuple[str, ...], model: Any, images: np.ndarray,
                   tolerance: float) -> dict[str, float]:
    """Max |probability difference| of each reloaded format against the trained model; fails past tolerance."""
    expected = _reference_probabilities(model, images)
    differences = {fmt: float(np.abs(reloaded_probabilities(directory, fmt, images) - expected).max())
                   for fmt in formats}
    bad = {fmt: diff for fmt, diff in differences.items() if diff > tolerance}
    if bad:
        raise ExportError(
            f"exported {', '.join(bad)} disagree with the trained model: max probability difference "
            f"{max(bad.values()):.3g} > export.tolerance {tolerance}; the export is not kept"
        )
    return differences


# ---------------------------------------------------------------- model card

def _git_commit() -> str | None:
    """The current git commit, when run from a checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def model_card(config: PipelineConfig, data: DataResult, train: TrainResult, metrics: dict[str, Any],
               files: list[dict[str, Any]], differences: dict[str, float]) -> dict[str, Any]:
    """Everything a reviewer needs to know about the model, as JSON."""
    return {
        "data": {"source": config.data.source, "extra": config.data.extra, "fingerprint": data.fingerprint,
                 "records": data.records},
        "input_spec": data.input_spec.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "metrics": {k: metrics[k] for k in ("test_accuracy", "test_loss", "per_class")},
        "training": {"fingerprint": train.fingerprint, "epochs_run": train.epochs_run, "best_epoch": train.best_epoch,
                     "stopped_early": train.stopped_early, "seconds": round(train.train_seconds, 1),
                     "hardware": read_manifest(train.path).get("hardware")},
        "versions": package_versions(),
        "git_commit": _git_commit(),
        "files": files,
        "reload_max_difference": differences,
    }


def _hardware_lines(hardware: dict[str, Any] | None) -> list[str]:
    """The model card's line on the machine that trained the model and the precision chosen for it."""
    if not hardware or "precision" not in hardware:
        return []
    precision, machine = hardware["precision"], hardware["precision"]["cpu"]
    onednn = f", oneDNN kernels {hardware['onednn']['reason']}" if "onednn" in hardware else ""
    return [f"- Trained in {precision['resolved']} ({precision['reason']}) on {cpu_name(machine)}, {machine['cores']} "
            f"cores, ISA {' '.join(machine['isa']) or 'baseline'}{onednn}"]


def render_model_card(card: dict[str, Any]) -> str:
    """The model card as Markdown."""
    metrics, training = card["metrics"], card["training"]
    lines = [
        "# Model card", "",
        f"- Data: `{card['data']['source']}` (fingerprint `{card['data']['fingerprint']}`), "
        f"records {card['data']['records']}",
        f"- Input: uint8 images {card['input_spec']['shape']}, classes: {', '.join(card['input_spec']['class_names'])}",
        f"- Test accuracy **{metrics['test_accuracy']:.4f}**, test loss {metrics['test_loss']:.4f}",
        f"- Training: {training['epochs_run']} epochs, best epoch {training['best_epoch']}"
        f"{' (stopped early)' if training['stopped_early'] else ''}, {training['seconds']} s",
        *_hardware_lines(training.get("hardware")),
        f"- Versions: {', '.join(f'{k} {v}' for k, v in card['versions'].items())}",
        f"- Git commit: {card['git_commit'] or 'unknown'}", "",
        "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
        *(f"| {c['class']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
          for c in metrics["per_class"]),
        "", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|",
        *(f"| {f['name']} | {f['bytes']} | `{f['sha256'][:16]}…` |" for f in card["files"]
          if not f["name"].startswith(f"{SAVED_MODEL}/variables") or f["name"].endswith("index")),
        "", "## Reload check (max |probability difference|)", "",
        *(f"- {fmt}: {diff:.3g}" for fmt, diff in card["reload_max_difference"].items()),
        "", "## Config", "", "```json", json.dumps(card["config"], indent=2), "```", "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage

def build_export(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Write every format, verify each by reloading it, then write the model card."""
    import keras

    config, data, train, evaluation = inputs.config, inputs.data, inputs.train, inputs.evaluate
    import_user_code(config.model)
    model = keras.models.load_model(train.path / KERAS_FILE, compile=False)
    formats = config.export.formats
    if "saved_model" in formats or "tflite" in formats:
        write_saved_model(model, data.input_spec, staging / SAVED_MODEL)
    if "tflite" in formats:
        _write_tflite(staging / SAVED_MODEL, staging / TFLITE_FILE)
    # The .keras file is always kept: champion/challenger comparisons reload it.
    shutil.copy2(train.path / KERAS_FILE, staging / KERAS_FILE)
    images, _ = load_split(data.path, "test")
    differences = _verify_exports(staging, formats, model, images[:VERIFY_IMAGES], config.export.tolerance)
    card = model_card(config, data, train, evaluation.metrics(), describe_files(staging), differences)
    (staging / "model_card.json").write_text(json.dumps(card, indent=2))
    (staging / "model_card.md").write_text(render_model_card(card))
    log.info("exported %s; reload max differences %s", ", ".join(formats), differences)
    return {
        "stage": "export", "config": config.export.model_dump(mode="json"),
        "upstream": {"train": train.fingerprint, "evaluate": evaluation.fingerprint}, "formats": list(formats),
        "reload_max_difference": differences, "test_accuracy": evaluation.test_accuracy,
        "versions": package_versions(),
    }


def export_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> ExportResult:
    """An ExportResult from an export manifest."""
    return ExportResult(stage="export", fingerprint=manifest["fingerprint"], path=path, cached=cached,
                        seconds=seconds, formats=tuple(manifest["formats"]))
