"""The model stage: build the model (the CNN, or the user's `model.builder`) for the data's input spec, and
save its seeded initialization."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from tapeline.builder import build_user_model, call_builder, check_builder, check_logits, check_model, load_builder
from tapeline.cache import package_versions
from tapeline.config import NAMED_SOURCES, ModelConfig, PipelineConfig
from tapeline.errors import ConfigError
from tapeline.hardware import available_memory
from tapeline.results import InputSpec, ModelResult, StageInputs

FLOAT_BYTES = 4
# Training holds the weights, their gradients and Adam's two moments (4 copies of the parameters), and each
# batch's activations, kept for the backward pass, and their gradients (2 copies).
PARAMETER_COPIES, ACTIVATION_COPIES = 4, 2
MODEL_FILE = "model.keras"
WEIGHTS_FILE = "initial.weights.h5"
log = logging.getLogger("tapeline.model")


def build_model(config: ModelConfig, spec: InputSpec) -> Any:
    """The model of `config` for images of `spec`: the user's `model.builder` (checked), else the CNN; its
    output is logits."""
    if config.builder is not None:
        return build_user_model(config, spec.shape, spec.num_classes)
    return build_cnn(config, spec)


def build_cnn(config: ModelConfig, spec: InputSpec) -> Any:
    """The tutorial's CNN, generalized: 3x3 ReLU convs with 2x2 max-pooling after all but the last,
    Flatten, a hidden Dense, optional dropout, and float32 logits (also under mixed precision)."""
    import keras

    _check_fits(config, spec)
    inputs = keras.Input(shape=spec.shape, name="image")
    x = inputs
    last = len(config.conv_filters) - 1
    for i, filters in enumerate(config.conv_filters):
        if config.batch_norm:
            x = keras.layers.Conv2D(filters, 3, use_bias=False, name=f"conv{i + 1}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
            x = keras.layers.Activation("relu", name=f"relu{i + 1}")(x)
        else:
            x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{i + 1}")(x)
        if i < last:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    if config.dropout > 0:
        x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(spec.num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="tapeline_cnn")


def _check_fits(config: ModelConfig, spec: InputSpec) -> None:
    """Reject a conv stack that shrinks the image below one pixel, naming the key to change."""
    side = min(spec.shape[:2])
    last = len(config.conv_filters) - 1
    for i in range(len(config.conv_filters)):
        side -= 2
        if side < 1:
            raise ConfigError(
                f"model.conv_filters: {len(config.conv_filters)} conv layers do not fit {spec.shape[0]}x"
                f"{spec.shape[1]} images; use fewer layers"
            )
        if i < last:
            side //= 2


def cnn_footprint(config: ModelConfig, shape: tuple[int, int, int], num_classes: int) -> tuple[int, int]:
    """(parameters, activation values per image) of the built-in CNN for `shape` images, from the config alone:
    nothing is built or allocated."""
    height, width, channels = shape
    parameters = values = 0
    last = len(config.conv_filters) - 1
    for i, filters in enumerate(config.conv_filters):
        parameters += 9 * channels * filters + (4 * filters if config.batch_norm else filters)
        height, width, channels = height - 2, width - 2, filters
        values += height * width * filters * (3 if config.batch_norm else 1)
        if i < last:
            height, width = height // 2, width // 2
            values += height * width * filters
    flat = max(height, 0) * max(width, 0) * channels
    parameters += flat * config.dense_units + config.dense_units + config.dense_units * num_classes + num_classes
    values += flat + config.dense_units * (2 if config.dropout else 1) + num_classes
    return parameters, values


def _training_bytes(parameters: int, values_per_image: int, batch_size: int) -> int:
    """Memory to train a model in float32: the parameters' copies and one batch's activations' copies."""
    return FLOAT_BYTES * (PARAMETER_COPIES * parameters + ACTIVATION_COPIES * values_per_image * batch_size)


def _gib(count: float) -> str:
    """Bytes as GiB with one decimal."""
    return f"{count / 2**30:.1f} GiB"


def _check_memory(what: str, parameters: int, values_per_image: int, batch_size: int, keys: str,
                 available: int | None = None) -> None:
    """ConfigError naming the keys to lower when training the model would need more memory than the machine has
    available now."""
    available = available if available is not None else available_memory()
    need = _training_bytes(parameters, values_per_image, batch_size)
    if available is None or need <= available:
        return
    raise ConfigError(f"{what} has {parameters:,} parameters and {values_per_image:,} activation values per image: "
                      f"training it on batches of {batch_size} needs about {_gib(need)}, more than the "
                      f"{_gib(available)} this machine has available; lower {keys}")


def _check_cnn_memory(config: PipelineConfig, spec: InputSpec, available: int | None = None) -> None:
    """The built-in CNN's memory check for this input spec (before anything is built)."""
    parameters, values = cnn_footprint(config.model, spec.shape, spec.num_classes)
    _check_memory(f"model: the built-in CNN for {'x'.join(map(str, spec.shape))} images", parameters, values,
                 config.data.batch_size, "data.image_size or data.batch_size (or model.conv_filters, "
                 "model.dense_units)", available)


def check_size_before_work(config: PipelineConfig, available: int | None = None) -> None:
    """Before any stage runs: when the config alone decides the images' size (`data.image_size`) and the model is
    the built-in CNN, check that training it fits this machine's memory (RGB assumed unless grayscale)."""
    if config.model.builder is not None or config.data.image_size is None:
        return
    classes = tuple(config.data.class_names or ("a", "b"))
    spec = InputSpec(shape=(*config.data.image_size, _input_channels(config)), class_names=classes)
    _check_fits(config.model, spec)
    _check_cnn_memory(config, spec, available)


def _provisional_shape(config: PipelineConfig) -> tuple[tuple[int, int, int], int]:
    """The input shape and class count the config suggests before any data is read: `data.image_size` (RGB unless
    grayscale) or Fashion-MNIST's 28x28x1; `data.class_names`' length or 10."""
    shape = (28, 28, 1)
    if config.data.image_size is not None:
        shape = (*config.data.image_size, _input_channels(config))
    return shape, len(config.data.class_names or ()) or 10


def _input_channels(config: PipelineConfig) -> int:
    """The channels of the images the config makes: 1 for grayscale and for the IDX sources (Fashion-MNIST, MNIST,
    `idx:`), else 3."""
    if config.data.color_mode == "grayscale":
        return 1
    if config.data.color_mode == "auto" and _is_idx_source(config.data.source):
        return 1
    return 3


def _is_idx_source(source: str) -> bool:
    """Whether a source is one of the grayscale IDX datasets (named, or `idx:`)."""
    return source in NAMED_SOURCES or source.startswith("idx:")


def _known_input(config: PipelineConfig) -> tuple[bool, int | None]:
    """(whether the provisional input shape is the data's own, the class count when the config alone fixes it):
    Fashion-MNIST and MNIST are 28x28x1 in 10 classes; `data.image_size` with a known channel count fixes the shape
    of any source; `data.class_names` fixes the class count."""
    named = config.data.source in NAMED_SOURCES
    channels_known = config.data.color_mode != "auto" or _is_idx_source(config.data.source)
    shape_known = (named and config.data.image_size is None) or (config.data.image_size is not None and
                                                                  channels_known)
    classes = len(config.data.class_names) if config.data.class_names else (10 if named else None)
    return shape_known, classes


def _check_user_model_round_trip(config: PipelineConfig) -> None:
    """Before any work, the user's model built for the config's provisional input shape: the model stage's checks
    (a keras.Model; logits, not probabilities; the input shape and the class count where the config alone fixes
    them), and it must load back from a `.keras` file (a custom layer not registered for serialization is one line
    now, not after training). A builder that cannot build for a shape the config does not fix is left to the model
    stage, which checks the model it builds for the data's real input spec."""
    import tempfile

    if config.model.builder is None:
        return
    shape, classes = _provisional_shape(config)
    shape_known, known_classes = _known_input(config)
    try:
        model = call_builder(load_builder(config.model.builder), config.model, shape, classes)
    except ConfigError:
        if shape_known and known_classes is not None:
            raise
        return  # not a model for a guessed shape: the model stage says so for the real one
    if shape_known:
        check_model(model, config.model, shape, known_classes)
    elif tuple(getattr(model, "input_shape", ())[1:]) == shape:
        check_logits(model, config.model, shape, known_classes)
    else:
        return  # built for another shape than the guessed one: the model stage judges it on the real one
    with tempfile.TemporaryDirectory(prefix="tapeline-round-trip-") as directory:
        model.save(Path(directory) / MODEL_FILE)
        _check_reloads(Path(directory) / MODEL_FILE, config.model.builder)


def check_before_work(config: PipelineConfig) -> None:
    """What is checked before any stage runs: the builder resolves and takes its arguments, its model loads back,
    and training the model fits this machine's memory where the config alone decides it."""
    check_builder(config.model)
    _check_user_model_round_trip(config)
    check_size_before_work(config)


def _check_user_model_memory(model: Any, config: PipelineConfig) -> None:
    """A built user model's memory check: its parameter count and its layers' outputs per image."""
    import math

    values = sum(math.prod(int(d) for d in layer.output.shape[1:] if d is not None) for layer in model.layers
                 if hasattr(layer, "output") and not isinstance(getattr(layer, "output", None), list | tuple))
    _check_memory(f"model: {config.model.builder}'s model", int(model.count_params()), values,
                 config.data.batch_size, "data.image_size or data.batch_size (or the model's size through "
                 "model.params)")


def _model_summary(model: Any) -> dict[str, Any]:
    """Parameter count and a layer table."""
    return {
        "parameters": int(model.count_params()),
        "layers": [
            {"name": layer.name, "type": type(layer).__name__, "output_shape": list(layer.output.shape[1:]),
             "parameters": int(layer.count_params())}
            for layer in model.layers
        ],
    }


def build_model_dir(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Build the seeded model and save it, its initial weights and its summary."""
    import keras

    config, data = inputs.config, inputs.data
    keras.utils.set_random_seed(config.seed)
    if config.model.builder is None:
        _check_cnn_memory(config, data.input_spec)
    model = build_model(config.model, data.input_spec)
    if config.model.builder is not None:
        _check_user_model_memory(model, config)
    model.save(staging / MODEL_FILE)
    if config.model.builder is not None:  # the CNN's layers are Keras's own
        _check_reloads(staging / MODEL_FILE, config.model.builder)
    model.save_weights(staging / WEIGHTS_FILE)
    summary = _model_summary(model)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    (staging / "summary.txt").write_text("\n".join(lines) + "\n")
    log.info("built %s with %d parameters", model.name, summary["parameters"])
    return {
        "stage": "model", "config": config.model.model_dump(mode="json"),
        "builder": _builder_record(config.model.builder, inputs.external), "seed": config.seed,
        "input_spec": data.input_spec.model_dump(mode="json"),
        "upstream": {"data": data.fingerprint}, "parameters": summary["parameters"], "versions": package_versions(),
    }


def _check_reloads(path: Path, builder: str) -> None:
    """The saved user model must load back, as evaluate, export and predict load it: a custom layer Keras cannot
    find by name (not registered for serialization) is one line here, before any training."""
    import keras

    try:
        keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises TypeError, ValueError, … for a model it cannot rebuild
        found = re.search(r"Could not locate (?:class|function) '([^']+)'", str(exc))
        what = f"Keras cannot find the class {found.group(1)!r}" if found else f"{type(exc).__name__}: {exc}"
        raise ConfigError(
            f"model.builder: {builder} builds a model that saves but does not load back ({what.splitlines()[0]}); "
            "register each custom layer or model class with @keras.saving.register_keras_serializable() (and give "
            "it get_config() when its __init__ takes arguments)") from None


def _builder_record(reference: str | None, identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The builder and the files its code fingerprint covered (module, path relative to its import root,
    hash of the normalized code), as recorded in the model manifest; None for the CNN."""
    if reference is None or identity is None:
        return None
    return {"reference": reference, **identity}


def model_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> ModelResult:
    """A ModelResult from a model manifest."""
    return ModelResult(stage="model", fingerprint=manifest["fingerprint"], path=path, cached=cached,
                       seconds=seconds, parameters=manifest["parameters"])
