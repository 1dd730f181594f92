"""Config: defaults, YAML file, --set overrides, and named errors for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapeline.config import PipelineConfig, config_keys, load_config
from tapeline.errors import ConfigError


def test_defaults_match_the_documented_values() -> None:
    config = load_config()
    assert config.seed == 0
    assert config.data.source == "fashion_mnist"
    assert config.data.limit is None
    assert config.data.validation_fraction == 0.1
    assert config.data.batch_size == 256
    assert config.data.shuffle_buffer == 10000
    assert config.train.learning_rate == 3e-3
    assert (config.train.lr_schedule, config.train.warmup_epochs, config.train.decay_epochs) == ("cosine", 0, 12)
    assert (config.train.random_shift, config.train.random_flip) == (1, False)
    assert (config.train.precision, config.train.input_pipeline) == ("auto", "auto")
    assert config.train.patience == 5
    assert config.train.max_epochs == 100
    assert config.train.restore_best_weights is True
    assert (config.train.workers, config.train.worker_timeout_seconds) == (1, 120)
    assert (config.model.conv_filters, config.model.dense_units, config.model.dropout) == ((24, 48), 128, 0.2)
    assert config.export.formats == ("saved_model", "keras", "tflite")


def test_v2_preset_is_the_defaults_before_the_avx2_work() -> None:
    v2, defaults = load_config(None, ["preset=v2"]), load_config(None, [])
    assert (v2.model.conv_filters, v2.train.decay_epochs, v2.train.warmup_epochs) == ((32, 64), 14, 1)
    assert v2.model.model_copy(update={"conv_filters": defaults.model.conv_filters}) == defaults.model
    assert v2.train.model_copy(update={"decay_epochs": defaults.train.decay_epochs,
                                       "warmup_epochs": defaults.train.warmup_epochs}) == defaults.train
    assert v2.data == defaults.data


def test_v1_preset_is_the_defaults_before_the_speed_work() -> None:
    v1 = load_config(None, ["preset=v1"])
    assert (v1.data.batch_size, v1.train.learning_rate, v1.train.lr_schedule) == (32, 1e-3, "plateau")
    assert (v1.train.reduce_lr_patience, v1.train.reduce_lr_factor, v1.train.min_learning_rate) == (1, 0.2, 1e-5)
    assert (v1.train.precision, v1.train.input_pipeline, v1.train.random_shift, v1.train.random_flip) == (
        "float32", "stream", 0, False)
    assert (v1.model.conv_filters, v1.model.dense_units, v1.model.dropout, v1.model.batch_norm) == (
        (32, 64, 64), 64, 0.0, False)


def test_file_then_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 4\ntrain:\n  max_epochs: 7\n  patience: 3\n")
    config = load_config(path, ["train.max_epochs=2", "data.limit=500", "model.conv_filters=[4, 8]"])
    assert (config.seed, config.train.max_epochs, config.train.patience) == (4, 2, 3)
    assert config.data.limit == 500
    assert config.model.conv_filters == (4, 8)


def test_config_is_frozen() -> None:
    with pytest.raises(Exception, match="frozen"):
        load_config().train.max_epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_epochs=0", "train.max_epochs: Input should be greater than 0"),
        ("train.patience=-1", "train.patience: Input should be greater than 0"),
        ("data.batch_size=0", "data.batch_size: Input should be greater than 0"),
        ("data.validation_fraction=1.5", "data.validation_fraction: Input should be less than 1"),
        ("data.validation_fraction=0", "data.validation_fraction: Input should be greater than 0"),
        ("train.epochs=3", "train.epochs: unknown key"),
        ("trian.max_epochs=3", "trian: unknown key"),
        ("train.max_epochs=many", "train.max_epochs: Input should be a valid integer"),
        ("data.source=s3://bucket", "data.source: unknown source 's3://bucket'"),
        ("train.precision=fp8", "train.precision: Input should be"),
        ("seed=-2", "seed: Input should be greater than or equal to 0"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_epoch=3", "invalid configuration: train.max_epoch: unknown key; did you mean train.max_epochs? (got "
                          "3)"),
    ("trian.max_epochs=3", "invalid configuration: trian: unknown key; did you mean train? (got {'max_epochs': 3})"),
    ("promotion.min_acuracy=0.5", "promotion.min_acuracy: unknown key; did you mean promotion.min_accuracy?"),
    ("train.zzz=1", "invalid configuration: train.zzz: unknown key (got 1)"),
])
def test_a_misspelled_key_names_the_closest_valid_one(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_the_size_check_names_the_channels_of_the_data() -> None:
    from stages.model import check_size_before_work

    for source, shape in (("fashion_mnist", "4096x4096x1"), ("images:photos", "4096x4096x3")):
        with pytest.raises(ConfigError, match=f"the built-in CNN for {shape} images"):
            check_size_before_work(load_config(None, [f"data.source={source}", "data.image_size=[4096, 4096]"]))


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(None, ["train.max_epochs"])


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_is_listed_for_help() -> None:
    keys = {k for k, _, _ in config_keys()}
    assert {"seed", "data.source", "data.limit", "data.shards", "train.patience", "export.min_accuracy"} <= keys
    sections = {name for name in PipelineConfig.model_fields if name not in ("seed", "preset")}
    assert sections == {"data", "validate", "model", "train", "evaluate", "export", "promotion", "score", "sweep",
                        "tracking"}


def test_partial_json_config_validates() -> None:
    config = PipelineConfig.model_validate({"train": {"max_epochs": 1}})
    assert config.train.max_epochs == 1 and config.train.patience == 5
