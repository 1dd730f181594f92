"""`tapeline predict`: classify images (PNG, JPEG, BMP, GIF) or .npy arrays with an exported SavedModel (production
by default)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tapeline.errors import ImageError, PredictError
from tapeline.hardware import onednn_origin
from tapeline.imaging import IMAGE_FORMATS, open_image, resize_pixels, to_channels
from tapeline.registry import local_version, read_production
from tapeline.results import InputSpec
from tapeline.store import open_store

PREDICT_BATCH = 256
MAX_NPY_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Prediction:
    """One image's predicted class."""

    path: Path
    class_name: str
    probability: float


def resolve_model(model: Path | None, artifacts: Path | str) -> tuple[Path, InputSpec]:
    """(SavedModel directory, input spec) of `--model DIR` (a version/export directory) or of production
    (fetched into the read cache when the artifacts are on an object store)."""
    if model is None:
        store = open_store(artifacts)
        pointer, _ = read_production(store)
        if pointer is None:
            raise PredictError(f"no production model under {artifacts}: run `tapeline run` first, or pass --model DIR")
        model = local_version(store, pointer["version"])
    card_path = model / "model_card.json" if (model / "model_card.json").exists() else model.parent / "model_card.json"
    saved_model = model if (model / "saved_model.pb").exists() else model / "saved_model"
    if not (saved_model / "saved_model.pb").exists() or not card_path.exists():
        raise PredictError(f"{model} is not an exported model directory (expected saved_model/ and model_card.json)")
    return saved_model, _card_input_spec(card_path)


def _card_input_spec(card_path: Path) -> InputSpec:
    """The input spec a model card declares; PredictError naming the card when it has none that validates."""
    try:
        with card_path.open("rb") as f:
            spec = json.loads(f.read(16 << 20).decode("utf-8"))["input_spec"]
        return InputSpec(shape=tuple(spec["shape"]), class_names=tuple(spec["class_names"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise PredictError(f"{card_path} has no usable input_spec ({type(exc).__name__}: {str(exc)[:120]}); "
                           "export the model again") from None


def card_resize(saved_model: Path) -> Resize:
    """The resize settings of the model card beside a SavedModel (the defaults when it names none)."""
    for card in (saved_model.parent / "model_card.json", saved_model / "model_card.json"):
        if card.is_file():
            try:
                data = json.loads(card.read_text())["config"]["data"]
                return Resize(str(data.get("interpolation", "bilinear")), bool(data.get("crop_to_aspect_ratio")))
            except (OSError, ValueError, KeyError, TypeError):
                break
    return Resize()


def _read_image(path: Path) -> np.ndarray:
    """An image file (IMAGE_FORMATS) or a .npy array as uint8 [H, W, C]; clear errors for what cannot be used."""
    if path.is_dir():
        raise PredictError(f"{path} is a directory; give image files ({IMAGE_FORMATS}) or .npy arrays")
    if not path.exists():
        raise PredictError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise PredictError(f"{path} is empty")
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    try:
        array = open_image(path, str(path))
    except ImageError as exc:
        raise PredictError(str(exc)) from None
    return array[..., np.newaxis] if array.ndim == 2 else array


def _read_npy(path: Path) -> np.ndarray:
    """A .npy image: uint8 (or floats in [0, 1]) of shape [H, W] or [H, W, C]."""
    if path.stat().st_size > MAX_NPY_BYTES:
        raise PredictError(f"{path} is larger than {MAX_NPY_BYTES // 2**20} MiB")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PredictError(f"{path} is not a readable .npy array: {exc}") from exc
    if array.ndim not in (2, 3) or array.size == 0:
        raise PredictError(f"{path} has shape {list(array.shape)}; expected [H, W] or [H, W, C]")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise PredictError(f"{path}: float images must hold values in [0, 1]")
        array = np.round(array * 255)
    elif array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255:
        raise PredictError(f"{path}: expected uint8 pixels (or floats in [0, 1]), got {array.dtype}")
    array = array.astype(np.uint8)
    return array[..., np.newaxis] if array.ndim == 2 else array


@dataclass(frozen=True)
class Resize:
    """How the model's training images were resized (`data.interpolation`, `data.crop_to_aspect_ratio`)."""

    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False


def fit_to_spec(image: np.ndarray, spec: InputSpec, path: Path, resize: Resize = Resize()) -> np.ndarray:  # noqa: B008
    """Convert channels and resize only when the model's input spec needs it, as the data stage did."""
    height, width, channels = spec.shape
    if image.shape[-1] not in (1, 3, 4):
        raise PredictError(f"{path} has {image.shape[-1]} channels; expected 1 (grayscale) or 3 (RGB)")
    if image.shape[-1] == 4:
        image = image[..., :3]
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    pixels = resize_pixels(pixels, (height, width), resize.interpolation, resize.crop_to_aspect_ratio)
    return to_channels(pixels, channels)


def iter_predictions(paths: list[Path], model: Path | None, artifacts: Path | str,
                     batch_size: int = PREDICT_BATCH) -> Iterator[Prediction]:
    """Classify each image with the SavedModel's serving_default signature, `batch_size` images at a time,
    so memory does not grow with the number of images."""
    onednn_origin()
    import tensorflow as tf

    saved_model, spec = resolve_model(model, artifacts)
    resize = card_resize(saved_model)
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        out = serve(images=tf.constant(np.stack([fit_to_spec(_read_image(p), spec, p, resize) for p in chunk])))
        probabilities = out["probabilities"].numpy()
        for i, (path, name) in enumerate(zip(chunk, out["class_name"].numpy(), strict=True)):
            yield Prediction(path, name.decode(), float(probabilities[i].max()))


def predict(paths: list[Path], model: Path | None, artifacts: Path | str) -> list[Prediction]:
    """Every image's prediction, as a list (`iter_predictions` streams them)."""
    return list(iter_predictions(paths, model, artifacts))
