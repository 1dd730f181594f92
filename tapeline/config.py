"""Typed pipeline configuration: one frozen pydantic section per stage, defaults in code.

A config comes from the defaults, an optional YAML file and `section.key=value` overrides, in that
order. Unknown keys and invalid values fail before any work starts, naming the key.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tapeline.errors import ConfigError

SOURCE_SCHEMES = ("idx:", "tfds:", "parquet:", "images:")
NAMED_SOURCES = ("fashion_mnist", "mnist")
EXPORT_FORMATS = ("saved_model", "keras", "tflite")
MAX_CONFIG_BYTES = 1 << 20
MAX_FILTERS, MAX_CONV_LAYERS = 4096, 32


# The v1 defaults (until the speed work), the v2 model (the defaults until the AVX2 work: wider convs) and the
# tutorial's own settings, kept reproducible by name; `fast` trades the last half point of accuracy for a shorter
# schedule.
_V0_TRAINING: dict[str, Any] = {
    "data": {"batch_size": 32},
    "model": {"batch_norm": False, "dropout": 0.0, "dense_units": 64, "conv_filters": [32, 64, 64]},
    "train": {"learning_rate": 1e-3, "precision": "float32", "random_shift": 0, "random_flip": False},
}
PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {**_V0_TRAINING, "train": {**_V0_TRAINING["train"], "lr_schedule": "constant"}},
    "v1": {**_V0_TRAINING, "train": {**_V0_TRAINING["train"], "lr_schedule": "plateau", "input_pipeline": "stream"}},
    "v2": {"model": {"conv_filters": [32, 64]}, "train": {"decay_epochs": 14, "warmup_epochs": 1}},
    "fast": {"train": {"decay_epochs": 8}},
}


def runtime(default: Any, **kwargs: Any) -> Any:
    """A knob of how a stage runs (retries, timeouts, speed) that never changes its output: every
    fingerprint leaves it out."""
    return Field(default, json_schema_extra={"affects_output": False}, **kwargs)


def used_by(stage: str, default: Any, **kwargs: Any) -> Any:
    """A key kept in its section for users but read by another stage: that stage's fingerprint covers
    it, its own section's does not (`data.batch_size` shapes training, not the TFRecords)."""
    return Field(default, json_schema_extra={"used_by": stage}, **kwargs)


class Section(BaseModel):
    """Base of every config section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(Section):
    """Where the images come from and how they are split, batched and sharded."""

    source: str = Field(
        "fashion_mnist",
        description="fashion_mnist | mnist | idx:DIR | tfds:NAME[:VERSION] | parquet:PATH (file, dir, glob or "
        "bucket URL) | images:DIR (class folders of images: a directory, file://, s3://BUCKET/PREFIX or gs://…)",
    )
    extra: str | None = Field(
        None, description="directory, glob or bucket URL (s3://BUCKET/PREFIX) of extra labelled Parquet files "
        "appended to the training data"
    )
    class_names: tuple[str, ...] | None = Field(
        None, json_schema_extra={"omit_when_default": True}, min_length=2, max_length=1000,
        description="images: the class order (every name a folder, every folder named); none = sorted folder names",
    )
    image_size: tuple[int, int] | None = Field(
        None, json_schema_extra={"omit_when_default": True},
        description="images: resize every image to [H, W] (none = every image must already share one size)",
    )
    color_mode: Literal["auto", "grayscale", "rgb"] = Field(
        "auto", json_schema_extra={"omit_when_default": True},
        description="images: grayscale | rgb | auto (rgb when any image has colour)",
    )
    interpolation: Literal["bilinear", "nearest", "area", "bicubic"] = Field(
        "bilinear", json_schema_extra={"omit_when_default": True},
        description="images: resampling when resizing (the same in tapeline predict)",
    )
    crop_to_aspect_ratio: bool = Field(
        False, json_schema_extra={"omit_when_default": True},
        description="images: centre-crop to image_size's aspect ratio before resizing, instead of squeezing",
    )
    limit: int | None = Field(None, gt=0, le=1_000_000_000, description="cap on training examples (none = all)")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of training data held out for early stopping"
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="share held out as the test split when the source has no test split"
    )
    batch_size: int = used_by("train", 256, gt=0, le=65536, description="global batch size")
    shuffle_buffer: int = used_by(
        "train", 10000, gt=0, le=10_000_000, description="tf.data shuffle buffer for training"
    )
    shards: int = Field(4, gt=0, le=1024, description="TFRecord files per split")
    drop_test_duplicates: bool = Field(
        True, description="for sources with a fixed test split, drop training copies of test images (exact pixels)"
    )
    tfds_data_dir: str | None = runtime(None, description="TFDS data_dir for tfds: sources")
    retries: int = runtime(2, ge=0, le=10, description="retries of the data stage (downloads) in the flow")
    timeout_seconds: float | None = runtime(None, gt=0, description="data stage time limit in the flow")

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not all(0 < side <= 4096 for side in value):
            raise ValueError("both sides must be in 1..4096 pixels")
        return value

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in NAMED_SOURCES or (value.startswith(SOURCE_SCHEMES) and value.split(":", 1)[1]):
            return value
        raise ValueError(
            f"unknown source {value!r}: use one of {', '.join(NAMED_SOURCES)}, "
            "idx:DIR, tfds:NAME[:VERSION], parquet:PATH or images:DIR"
        )


class ModelConfig(Section):
    """The CNN: two 3x3 conv layers of 24 and 48 filters and a 128-unit dense layer by default (the tutorial's
    three conv layers and 64 units are the `tutorial` and `v1` presets' model, 32 and 64 filters `v2`'s); or a
    Keras model of the user's own (`builder`)."""

    builder: str | None = Field(
        None, json_schema_extra={"omit_when_default": True}, max_length=4096,
        description="the user's model: path/to/file.py:function or package.module:function, called as "
        "function(input_shape=(H, W, C), num_classes=N, **model.params) -> keras.Model with logits (none = the CNN)",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"omit_when_default": True},
        description="keyword arguments of model.builder (--set model.params.width=64)",
    )
    conv_filters: tuple[int, ...] = Field((24, 48), min_length=1, description="filters of each 3x3 conv layer")
    dense_units: int = Field(128, gt=0, le=65536, description="units of the hidden dense layer")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before the logits layer")
    batch_norm: bool = Field(False, description="batch normalization after each conv layer")

    @field_validator("builder")
    @classmethod
    def _builder_reference(cls, value: str | None) -> str | None:
        if value is None:
            return value
        target, sep, function = value.rpartition(":")
        if not sep or not target.strip() or not function.isidentifier():
            raise ValueError(f"{value!r} is not a reference to a function; use path/to/file.py:function or "
                             "package.module:function")
        return value

    @field_validator("conv_filters")
    @classmethod
    def _positive_filters(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(f <= 0 or f > MAX_FILTERS for f in value):
            raise ValueError(f"every filter count must be in 1..{MAX_FILTERS}")
        if len(value) > MAX_CONV_LAYERS:
            raise ValueError(f"at most {MAX_CONV_LAYERS} conv layers")
        return value


class TrainConfig(Section):
    """The GradientTape loop, early stopping (Keras semantics), checkpoints and performance switches."""

    learning_rate: float = Field(3e-3, gt=0, description="Adam learning rate (the peak of the cosine schedule)")
    max_epochs: int = Field(100, gt=0, le=100_000, description="upper bound on epochs")
    monitor: str = Field("val_loss", description="loss | accuracy | val_loss | val_accuracy")
    mode: Literal["auto", "min", "max"] = Field("auto", description="direction of improvement")
    min_delta: float = Field(0.0, description="minimum change that counts as an improvement (absolute value)")
    patience: int = Field(5, gt=0, le=100_000, description="epochs without improvement before stopping")
    baseline: float | None = Field(None, description="value the monitor must beat")
    restore_best_weights: bool = Field(True, description="end with the best epoch's weights")
    start_from_epoch: int = Field(0, ge=0, description="epochs to wait before early stopping starts")
    lr_schedule: Literal["cosine", "plateau", "constant"] = Field(
        "cosine", description="cosine: linear warm-up for warmup_epochs, then cosine decay to min_learning_rate at "
        "decay_epochs, where training ends; plateau: drop by reduce_lr_factor when the monitor stalls (v1); "
        "constant: learning_rate throughout (the tutorial)"
    )
    warmup_epochs: int = Field(0, ge=0, le=100_000, description="cosine: epochs of linear warm-up from a tenth of "
                               "learning_rate")
    decay_epochs: int = Field(12, gt=0, le=100_000, description="cosine: the epoch at which the rate reaches "
                              "min_learning_rate and training ends (max_epochs still caps it)")
    reduce_lr_patience: int = Field(
        1, ge=0, description="plateau: epochs without improvement of the monitor before the learning rate drops "
        "(0 = never)"
    )
    reduce_lr_factor: float = Field(0.2, gt=0, lt=1, description="plateau: learning rate multiplier on a plateau")
    min_learning_rate: float = Field(1e-5, ge=0, description="the learning rate never drops below this")
    checkpoints_to_keep: int = Field(3, gt=0, le=1000, description="last N epoch checkpoints kept")
    steps_per_execution: int = runtime(32, gt=0, le=100_000, description="training steps per tf.function call")
    random_shift: int = Field(1, ge=0, le=64, description="training-only augmentation: shift each image by up to "
                              "this many pixels each way (0 = off)")
    random_flip: bool = Field(False, description="training-only augmentation: flip half the images left-right "
                              "(not for digits, text, or Fashion-MNIST's shoes, which all face one way)")
    input_pipeline: Literal["auto", "memory", "stream"] = Field(
        "auto", description="stream: read TFRecords through the shuffle buffer (the tutorial's order); memory: "
        "hold the uint8 training split in RAM, full seeded shuffle each epoch; auto: memory when it fits in 2 GiB "
        "on one replica"
    )
    deterministic: bool = Field(False, description="TF op determinism (slower)")
    strategy: Literal["auto", "default", "mirrored", "multi_worker"] = Field(
        "auto", description="tf.distribute strategy; auto: multi_worker under TF_CONFIG or with workers > 1, mirrored "
        "over several GPUs, else default"
    )
    workers: int = Field(1, ge=1, le=1024, description="training processes (MultiWorkerMirroredStrategy); locally "
                         "tapeline starts them, on a cluster TF_CONFIG must name this many workers; data.batch_size "
                         "is the global batch")
    worker_timeout_seconds: float = runtime(120, gt=0, le=86_400, description="a worker that stops answering stops "
                                            "the others within this long, with an error naming it")
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = Field(
        "auto", description="compute precision; auto: on a GPU mixed_bfloat16 from compute capability 8.0, "
        "mixed_float16 (loss scaled in the tape step) on 7.x; on a CPU mixed_bfloat16 with AMX or AVX-512 BF16; "
        "float32 elsewhere (logits and loss are float32 in every case)"
    )
    jit_compile: bool = Field(False, description="XLA-compile the step (helps on GPUs, slower on CPUs)")
    init_from: str = Field(
        "none", json_schema_extra={"omit_when_default": True}, min_length=1, max_length=4096,
        description="warm start: none | production (the production model's weights, when there is one) | the path "
        "or URL of an exported model; optimizer state starts fresh",
    )
    retries: int = runtime(0, ge=0, le=10, description="retries of the train stage in the flow")
    timeout_seconds: float | None = runtime(None, gt=0, description="train stage time limit in the flow")

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, value: str) -> str:
        allowed = ("loss", "accuracy", "val_loss", "val_accuracy")
        if value not in allowed:
            raise ValueError(f"unknown monitor {value!r}: use one of {', '.join(allowed)}")
        return value


class EvalConfig(Section):
    """Test-split evaluation and its pictures."""

    worst_examples: int = Field(25, ge=0, le=400, description="misclassified test images in the grid")
    timeout_seconds: float | None = runtime(None, gt=0, description="evaluate stage time limit in the flow")


class ValidateConfig(Section):
    """Data validation before training: what counts as an anomaly, and how bad each kind is."""

    allow_schema_change: bool = Field(False, description="a schema change against the baseline is a warning, "
                                      "not an error")
    min_per_class: int = Field(
        10, ge=0, le=1_000_000_000, description="fewer examples of a class in a split is a warning"
    )
    max_label_drift: float = Field(0.1, ge=0, le=1, description="largest change of a class share vs the baseline")
    max_pixel_drift: float = Field(0.05, ge=0, le=1, description="largest Jensen-Shannon divergence (bits) of the "
                                   "grey-level histogram vs the baseline")
    drift: Literal["warn", "error", "off"] = Field("warn", description="severity of label and pixel drift")
    max_constant_share: float = Field(0.01, ge=0, le=1, description="largest share of constant images in a split")
    max_unreadable_share: float = Field(
        0.01, ge=0, le=1, json_schema_extra={"omit_when_default": True},
        description="images: largest share of unreadable image files (skipped by the data stage) that passes",
    )
    near_duplicates: bool = Field(True, description="report test images that look like training images (warning)")
    near_duplicate_distance: float = Field(3.0, gt=0, description="mean absolute grey-level difference under "
                                           "which two images with the same average hash are near-duplicates")
    timeout_seconds: float | None = runtime(None, gt=0, description="validate stage time limit in the flow")


class ExportConfig(Section):
    """Export formats, the verification tolerance and the promotion gate."""

    formats: tuple[Literal["saved_model", "keras", "tflite"], ...] = Field(
        EXPORT_FORMATS, min_length=1, description="saved_model, keras, tflite"
    )
    tolerance: float = Field(1e-4, gt=0, description="max |difference| in probabilities of a reloaded export")
    min_accuracy: float = used_by(
        "promotion", 0.0, ge=0, le=1, description="test accuracy a model needs to be promoted"
    )
    promote_min_delta: float = used_by(
        "promotion", 0.0, ge=0, description="margin over the production model needed to promote"
    )
    lock_timeout_seconds: float = runtime(600, gt=0, description="wait for another run's promotion at most this long")
    timeout_seconds: float | None = runtime(None, gt=0, description="export stage time limit in the flow")


class PromotionConfig(Section):
    """The floor under the promotion gate (TFX's value thresholds): a model must have learned something before it
    may become production, with or without a champion to beat; sweep trials below it fail with "did not learn"."""

    min_accuracy: float | Literal["auto"] = Field(
        "auto", description="accuracy a model needs before any promotion (test split; a sweep trial: validation); "
        "auto: the majority-class share (chance) plus a tenth of the rest, 0.19 for 10 balanced classes"
    )
    max_loss: float | Literal["auto"] = Field(
        "auto", description="highest loss (finite) a model may have before any promotion; auto: 4 x ln(classes), four "
        "times the loss of a uniform guess (9.21 for 10 classes)"
    )

    @field_validator("min_accuracy", "max_loss")
    @classmethod
    def _in_range(cls, value: float | str, info: Any) -> float | str:
        if isinstance(value, str):
            return value
        if info.field_name == "min_accuracy" and not 0 <= value <= 1:
            raise ValueError("min_accuracy is auto or a share between 0 and 1")
        if info.field_name == "max_loss" and not value > 0:
            raise ValueError("max_loss is auto or a positive number")
        return value


class ScoreConfig(Section):
    """`tapeline score` and the `batch-scoring` flow: scoring new images with an exported model, and drift."""

    batch_size: int = runtime(256, gt=0, le=65_536, description="images per call of the SavedModel")
    shard_size: int = runtime(1024, gt=0, le=1_000_000, description="new inputs per shard (a Prefect task, the unit a "
                              "Dask worker takes and a killed run can lose)")
    workers: int = runtime(2, ge=1, le=256, description="shards scored at once on this machine (threads: decoding "
                           "and inference overlap; the model is loaded once per process)")
    dask_address: str | None = runtime(None, description="a Dask scheduler (tcp://HOST:PORT): shards run on its "
                                       "workers through prefect-dask; none: on this machine")
    drift_threshold: float = runtime(0.05, gt=0, le=1, description="drift when the scored images' grey-level "
                                     "histogram is this far (Jensen–Shannon, bits) from the training data's")
    max_prediction_shift: float = runtime(0.2, gt=0, le=1, description="drift when a predicted class's share moves "
                                          "this far from its share in the training data")
    max_accuracy_drop: float = runtime(0.05, gt=0, le=1, description="labelled inputs: drift when the accuracy is "
                                       "this far below the model's test accuracy")
    min_drift_images: int = runtime(200, ge=1, le=100_000_000, description="fewer new images than this are too few "
                                    "to judge drift by (the report says so; no event)")


class TrackingConfig(Section):
    """Experiment tracking in MLflow (`pip install 'tapeline[mlflow]'`): each run, sweep and promotion logged to a
    tracking server, beside the registry (never instead of it)."""

    mlflow_uri: str | None = runtime(None, description="MLflow tracking URI (http://HOST:PORT, sqlite:///FILE, a "
                                     "directory); none: MLFLOW_TRACKING_URI when set, else no tracking")
    experiment: str = runtime("tapeline", min_length=1, description="the MLflow experiment runs are logged to")
    registered_model: str = runtime("tapeline", min_length=1, description="the MLflow registered model each exported "
                                    "model becomes a version of; the alias `champion` follows production")


DISTRIBUTION_FORMS = "{float: [LO, HI], log: BOOL} | {int: [LO, HI], step: N} | {choice: [A, B, …]}"
HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def _distribution_problem(spec: Any) -> str | None:
    """What is wrong with one `sweep.space` entry, or None: a float or int range (low < high, a positive
    step, `log` only with positive bounds) or a non-empty list of choices."""
    if not isinstance(spec, dict) or len({"float", "int", "choice"} & spec.keys()) != 1:
        return f"not a distribution; write {DISTRIBUTION_FORMS}"
    kind = next(k for k in ("float", "int", "choice") if k in spec)
    allowed = {"float": {"float", "log"}, "int": {"int", "step", "log"}, "choice": {"choice"}}[kind]
    if extra := sorted(set(spec) - allowed):
        return f"{kind} takes {', '.join(sorted(allowed))}, not {', '.join(extra)}"
    if kind == "choice":
        choices = spec["choice"]
        return None if isinstance(choices, list) and choices else "choice needs a non-empty list of values"
    bounds, number = spec[kind], (int,) if kind == "int" else (int, float)
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        return f"{kind} needs [LO, HI] of {kind}s"
    if not bounds[0] < bounds[1]:
        return f"{kind} range [{bounds[0]}, {bounds[1]}] is empty: LO must be below HI"
    if not isinstance(spec.get("log", False), bool):
        return "log is true or false"
    if spec.get("log") and bounds[0] <= 0:
        return "log needs LO > 0"
    step = spec.get("step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
        return "step is a positive integer"
    return None


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{train: {learning_rate: {float: …}}}` (nested, as `--set sweep.space.train.learning_rate=…` writes it) as
    `{"train.learning_rate": {float: …}}`: a mapping of mappings without a distribution's key is a level of keys
    (anything else is an entry, judged by `_distribution_problem`)."""
    flat: dict[str, Any] = {}
    for key, spec in space.items():
        name = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and not {"float", "int", "choice"} & spec.keys() and \
                all(isinstance(v, dict) for v in spec.values()) and name.count(".") < 8:
            flat.update(_flatten_space(spec, f"{name}."))
        else:
            flat[name] = spec
    return flat


class SweepConfig(Section):
    """`tapeline sweep`: the search space and budget of a hyperparameter search (no stage reads it)."""

    space: dict[str, Any] = runtime(
        {}, description=f"config key -> distribution: {DISTRIBUTION_FORMS} (any key, model.params.* included)")
    trials: int = runtime(20, gt=0, le=100_000, description="trials of the sweep (a rerun with more continues it)")
    parallel: int = runtime(1, ge=1, le=256, description="trials at once, each its own process (cores divided)")
    metric: str = runtime("val_accuracy", description="the per-epoch validation metric searched on: "
                          f"{' | '.join(HISTORY_METRICS)}")
    direction: Literal["auto", "maximize", "minimize"] = runtime(
        "auto", description="auto: maximize accuracies, minimize losses")
    sampler: Literal["tpe", "random", "grid"] = runtime(
        "tpe", description="Optuna sampler; grid needs every space entry to be a choice or an int range")
    seed: int = runtime(0, ge=0, description="the sampler's seed: a proposal depends on it, the trial number and "
                        "the finished trials only")
    pruner: Literal["asha", "hyperband", "median", "none"] = runtime(
        "asha", description="stop poor trials early: asha (successive halving at rungs), hyperband (brackets of "
        "successive halving, some judging late), median, none")
    min_epochs: int = runtime(1, ge=1, le=100_000, description="pruning: the first rung (epochs a trial always "
                              "gets; with sweep.rungs=schedule, epochs of the longest schedule)")
    reduction_factor: int = runtime(3, ge=2, le=100, description="asha and hyperband: rungs at min_epochs × "
                                    "factor^k; the top 1/factor of a rung goes on")
    rungs: Literal["epochs", "schedule"] = runtime(
        "epochs", description="where pruning compares trials: epochs: at the same epoch; schedule: at the same "
        "fraction of each trial's schedule (its last epoch: train.decay_epochs under cosine, train.max_epochs "
        "capping it), counted in epochs of the longest schedule the space allows, so a trial with a longer schedule "
        "is judged where its learning rate has fallen as far as a shorter one's")
    name: str | None = runtime(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="the sweep's "
                               "directory under sweeps/; default: a hash of the space, the search settings and the "
                               "base config")
    deployment: str | None = runtime(None, pattern=r"^[^/\s]+/[^/\s]+$", description="run each trial as a flow run "
                                     "of this deployment (e.g. training-pipeline/manual) on its work pool's workers, "
                                     "sharing the artifacts store; none: a local process per trial")
    trials_per_worker: int = runtime(24, ge=1, le=10_000, description="trials one local worker process runs one "
                                     "after another (TensorFlow imported once) before a fresh one takes over; 1: a "
                                     "process per trial")
    worker_max_growth_mib: float = runtime(256, gt=0, le=1_000_000, description="a worker whose resident memory "
                                           "has grown by more than this since the end of its first trial leaves "
                                           "after the trial it runs")
    trial_retries: int = runtime(1, ge=0, le=10, description="times a trial whose process died is resumed before it "
                                 "counts as failed")
    lease_seconds: float = runtime(60, gt=0, le=86_400, description="a driver silent this long is dead: another may "
                                   "take the sweep over")

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        return _flatten_space(value) if isinstance(value, dict) else value

    @field_validator("space")
    @classmethod
    def _distributions(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, spec in value.items():
            if (problem := _distribution_problem(spec)) is not None:
                raise ValueError(f".{key}: {problem} (got {spec!r})")
            if key.startswith("sweep.") or key == "preset":
                raise ValueError(f".{key}: a sweep cannot search its own settings")
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in HISTORY_METRICS:
            raise ValueError(f"unknown metric {value!r}: use one of {', '.join(HISTORY_METRICS)} (the train history's "
                             "columns)")
        return value


with warnings.catch_warnings():
    # The section is named after its stage (`validate.*` keys are a contract); it shadows pydantic's
    # deprecated `BaseModel.validate` classmethod, which nothing here calls.
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class PipelineConfig(Section):
        """The whole pipeline's configuration; also the Prefect flow's one parameter."""

        preset: str | None = runtime(None, description=f"named bundle of keys applied before the file's own keys and "
                                     f"--set: {', '.join(PRESETS)}")
        seed: int = Field(0, ge=0, description="seed for splits, shuffling and initialization")
        data: DataConfig = DataConfig()
        validate: ValidateConfig = ValidateConfig()
        model: ModelConfig = ModelConfig()
        train: TrainConfig = TrainConfig()
        evaluate: EvalConfig = EvalConfig()
        export: ExportConfig = ExportConfig()
        promotion: PromotionConfig = PromotionConfig()
        score: ScoreConfig = ScoreConfig()
        sweep: SweepConfig = SweepConfig()
        tracking: TrackingConfig = TrackingConfig()

        @model_validator(mode="before")
        @classmethod
        def _expand_preset(cls, data: Any) -> Any:
            # Here rather than in load_config, so a preset given as a Prefect flow parameter expands too.
            return expand_preset(data) if isinstance(data, dict) else data

        @model_validator(mode="after")
        def _consistent(self) -> PipelineConfig:
            _check_consistency(self)
            return self


def epoch_limit(train: TrainConfig) -> int:
    """The last epoch training may run: `max_epochs`, and under the cosine schedule no further than
    `decay_epochs`, where the rate is at its floor."""
    return min(train.max_epochs, train.decay_epochs) if train.lr_schedule == "cosine" else train.max_epochs


def expand_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """The config tree with its `preset` (if any) filled in underneath: every key the tree sets itself wins."""
    name = tree.get("preset")
    if name is None:
        return tree
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    model = tree.get("model")
    if isinstance(model, dict) and model.get("builder") is not None:
        # A preset's CNN keys describe the built-in CNN; the user's own model takes the rest of the preset.
        preset = {section: keys for section, keys in preset.items() if section != "model"}
    return _merge(preset, tree)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A nested dict of `base` with `top`'s keys set over it (sections merged key by key)."""
    merged = _deep_copy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def field_marks(field: Any) -> dict[str, Any]:
    """The `runtime` / `used_by` marks of a config field (empty for ordinary keys)."""
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def output_config(config: PipelineConfig, stage: str, covers: tuple[str, ...]) -> dict[str, Any]:
    """The config values that shape `stage`'s output: the top-level keys and sections it `covers`,
    minus runtime knobs and keys another stage uses, plus keys elsewhere marked `used_by` it."""
    selected: dict[str, Any] = {}
    for name, field in PipelineConfig.model_fields.items():
        value = getattr(config, name)
        if isinstance(value, Section):
            for key, sub in type(value).model_fields.items():
                marks = field_marks(sub)
                owner = marks.get("used_by", name if name in covers else None)
                if marks.get("omit_when_default") and getattr(value, key) == sub.get_default(call_default_factory=True):
                    continue  # a key added later leaves the fingerprints of configs without it as they were
                if owner == stage and marks.get("affects_output", True):
                    selected[f"{name}.{key}"] = getattr(value, key)
        elif name in covers and field_marks(field).get("affects_output", True):
            selected[name] = value
    return selected


MAX_CONFIG_DEPTH = 32  # sections, lists and mappings inside one another; a config needs a handful


def _too_deep(value: Any, path: str, limit: int = MAX_CONFIG_DEPTH) -> str | None:
    """The dotted key of the first value nested deeper than `limit` levels under `path`, or None. Walked with a
    stack, not recursion, so no depth of input can exhaust Python's."""
    pending: list[tuple[Any, str, int]] = [(value, path, 0)]
    while pending:
        node, where, depth = pending.pop()
        if depth > limit:
            return where
        if isinstance(node, dict):
            pending.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list | tuple):
            pending.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
    return None


def _check_depth(value: Any, path: str, what: str) -> None:
    """ConfigError naming the key when `value` nests deeper than MAX_CONFIG_DEPTH levels."""
    where = _too_deep(value, path)
    if where is not None:
        name = where.split("[")[0][:120] or "config"
        raise ConfigError(f"{what}: {name} nests values more than {MAX_CONFIG_DEPTH} levels deep; a config value is "
                          "a scalar, a list or a mapping a few levels deep: flatten it")


def _safe_yaml(text: str) -> Any:
    """`yaml.safe_load`, with nesting too deep for the YAML parser itself (about 1,000 levels) a ConfigError."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"values nest more than {MAX_CONFIG_DEPTH} levels deep (too deep to parse); a config "
                          "value is a scalar, a list or a mapping a few levels deep: flatten it") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (example: --set train.max_epochs=3)")
    path = key.strip().split(".")
    if len(path) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"override {'.'.join(path[:3])}…: a key of {len(path)} parts; config keys are "
                          "section.key (model.params.NAME)")
    try:
        value = _safe_yaml(raw) if raw.strip() else None
    except ConfigError as exc:
        raise ConfigError(f"override {key.strip()}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from exc
    _check_depth(value, key.strip(), "override")
    return path, value


def _apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of a nested dict with each `a.b=value` override set."""
    result = _deep_copy(tree)
    for text in overrides:
        path, value = _parse_override(text)
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with an error naming the file when it is unusable. At most
    MAX_CONFIG_BYTES are read: a config is small, and `--config /dev/zero` must not fill the memory."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file")
    if path.exists() and not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file (a device or a pipe?); give a YAML file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; is it a config?")
    try:
        loaded = _safe_yaml(raw.decode("utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    _check_depth(loaded, "", f"config file {path}")
    return loaded


def validate_config(tree: dict[str, Any]) -> PipelineConfig:
    """Validate a nested dict into a PipelineConfig, raising ConfigError naming each bad key."""
    _check_depth(tree, "", "config")  # a Prefect parameter or a worker's config file comes here directly
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


CNN_KEYS = ("conv_filters", "dense_units", "dropout", "batch_norm")


def _check_consistency(config: PipelineConfig) -> None:
    """Rules that span keys: the global batch must split evenly over the training workers; the CNN's keys and
    model.params belong to one kind of model each."""
    model = config.model
    # Compared with the defaults, not `model_fields_set`: a config that went through JSON (a Prefect parameter,
    # a worker's config file) has every key set.
    cnn_keys = [key for key in CNN_KEYS if getattr(model, key) != ModelConfig.model_fields[key].default]
    if model.builder is not None and cnn_keys:
        raise ConfigError(f"model.{cnn_keys[0]} shapes the built-in CNN, which model.builder={model.builder} "
                          f"replaces; drop model.{', model.'.join(cnn_keys)}, or pass it to your builder through "
                          f"model.params")
    if model.builder is None and model.params:
        raise ConfigError("model.params are arguments of model.builder, which is not set; set model.builder=FILE.py:"
                          "FUNCTION, or drop model.params")
    if config.data.batch_size % config.train.workers:
        raise ConfigError(f"data.batch_size={config.data.batch_size} does not split evenly over train.workers="
                          f"{config.train.workers}; use a multiple of {config.train.workers}")


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the section holding `loc`'s last part takes (empty where that is no section: model.params)."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    """`unknown key`, with the closest valid key when one is close: `unknown key; did you mean train.max_epochs?`."""
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1, cutoff=0.6) if loc else []
    return f"unknown key; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else "unknown key"


def _problem_line(err: Any) -> str:
    """One validation problem as `key.path: message (got value)`. A validator of a mapping names the entry at
    fault by starting its message with `.ENTRY: ` (and shows the entry's value itself)."""
    key = ".".join(str(p) for p in err["loc"]) or "config"
    message = _unknown_key_message(tuple(err["loc"])) if err["type"] == "extra_forbidden" else \
        err["msg"].removeprefix("Value error, ")
    if message.startswith("."):
        return f"{key}{message}"
    return f"{key}: {message} (got {err.get('input')!r})"


def _format_validation_error(exc: ValidationError) -> str:
    """`invalid configuration: PROBLEM` on one line, or one line per problem under it when there are several."""
    lines = [_problem_line(err) for err in exc.errors()]
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None) -> PipelineConfig:
    """Defaults, then the preset (`preset` here, else the file's `preset:` key), then the optional YAML file,
    then `--set` overrides; validated."""
    tree = read_config_file(path) if path is not None else {}
    if preset is not None:
        tree = {**tree, "preset": preset}
    return validate_config(_apply_overrides(tree, overrides or []))


def config_keys() -> list[tuple[str, str, str]]:
    """Every config key as (dotted key, default, description), for `--help`."""
    rows: list[tuple[str, str, str]] = []
    for name, field in PipelineConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            for key, sub in annotation.model_fields.items():
                rows.append((f"{name}.{key}", repr(sub.get_default(call_default_factory=True)), sub.description or ""))
        else:
            rows.append((name, repr(field.default), field.description or ""))
    return rows
