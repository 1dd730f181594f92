"""The model stage: the tutorial's CNN from the data's input spec, seeded and saved."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from stages.graph import find_output
from stages.model import build_model
from stages.pipeline import run_data, run_model
from tapeline.config import ModelConfig, load_config
from tapeline.errors import ConfigError, MissingUpstreamError
from tapeline.results import InputSpec
from tapeline.testing import tiny_config

FASHION = InputSpec(shape=(28, 28, 1), class_names=tuple(str(i) for i in range(10)))


def test_default_cnn_has_two_convs_and_a_wider_dense_layer() -> None:
    model = build_model(load_config().model, FASHION)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense", "Dropout", "Dense"]
    # 3x3x1x24+24, 3x3x24x48+48, (11*11*48)x128+128, 128x10+10
    assert model.count_params() == 240 + 10_416 + 11 * 11 * 48 * 128 + 128 + 1_290
    assert model.get_layer("dropout").rate == 0.2


def test_tutorial_preset_is_the_tutorial_cnn() -> None:
    model = build_model(load_config(None, [], "tutorial").model, FASHION)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense", "Dense"]
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [32, 64, 64]
    assert model.count_params() == 93322  # the tutorial model.summary()'s total
    assert model.output.shape[1:] == (10,)
    assert model.layers[-1].activation.__name__ == "linear"  # logits


def test_colour_images_and_options_build() -> None:
    spec = InputSpec(shape=(32, 32, 3), class_names=tuple("abcde"))
    model = build_model(ModelConfig(dropout=0.3, batch_norm=True, dense_units=32), spec)
    assert model.input.shape[1:] == (32, 32, 3) and model.output.shape[1:] == (5,)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)


def test_too_deep_for_the_image_names_the_key() -> None:
    with pytest.raises(ConfigError, match="model.conv_filters: 5 conv layers do not fit 28x28"):
        build_model(ModelConfig(conv_filters=(8, 8, 8, 8, 8)), FASHION)


def test_stage_saves_a_seeded_initialization(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    data = run_data(config, tmp_path / "a")
    first = run_model(config, data, tmp_path / "a")
    other = run_model(config, data, tmp_path / "b")
    assert first.fingerprint == other.fingerprint and not first.cached
    assert run_model(config, data, tmp_path / "a").cached
    a = keras.models.load_model(first.path / "model.keras").get_weights()
    b = keras.models.load_model(other.path / "model.keras").get_weights()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    summary = json.loads((first.path / "summary.json").read_text())
    reloaded = keras.models.load_model(first.path / "model.keras")
    assert summary["parameters"] == first.parameters == reloaded.count_params()
    assert [row["name"] for row in summary["layers"]][-1] == "logits"
    reseeded = run_model(tiny_config(f"idx:{idx_dir}", "seed=1"), run_data(tiny_config(f"idx:{idx_dir}", "seed=1"),
                                                                              tmp_path / "a"), tmp_path / "a")
    assert reseeded.fingerprint != first.fingerprint


def test_missing_model_names_the_stage_to_run(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}")
    run_data(config, tmp_path / "a")
    with pytest.raises(MissingUpstreamError, match="run `tapeline stage model`"):
        find_output("model", config, tmp_path / "a")


@pytest.mark.parametrize("overrides", [[], ["model.batch_norm=true", "model.conv_filters=[8, 16, 32]"],
                                       ["model.dropout=0", "model.dense_units=7"]])
def test_the_cnns_footprint_is_what_keras_builds(overrides: list[str]) -> None:
    from stages.model import cnn_footprint

    config = load_config(None, overrides).model
    spec = InputSpec(shape=(40, 36, 3), class_names=("a", "b", "c"))
    model = build_model(config, spec)
    values = sum(int(np.prod(layer.output.shape[1:])) for layer in model.layers[1:])
    assert cnn_footprint(config, spec.shape, spec.num_classes) == (model.count_params(), values)


def test_a_model_too_big_for_the_machine_is_one_line_naming_the_keys() -> None:
    from stages.model import check_size_before_work

    config = load_config(None, ["data.image_size=[64, 64]", "data.color_mode=grayscale"])
    check_size_before_work(config, available=2**30)
    with pytest.raises(ConfigError) as info:
        check_size_before_work(config, available=2**20)
    message = str(info.value)
    assert message.startswith("model: the built-in CNN for 64x64x1 images has ") and "\n" not in message
    assert message.endswith("more than the 0.0 GiB this machine has available; lower data.image_size or "
                            "data.batch_size (or model.conv_filters, model.dense_units)")


def test_run_refuses_an_image_size_the_machine_cannot_train_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    (tmp_path / "pics" / "a").mkdir(parents=True)
    artifacts = tmp_path / "artifacts"
    code = main(["run", "--artifacts", str(artifacts), "--set", f"data.source=images:{tmp_path / 'pics'}",
                 "--set", "data.image_size=[4096, 4096]"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "tapeline: error: model: the built-in CNN for 4096x4096x3 images has " in err
    assert "lower data.image_size or data.batch_size" in err
    assert not artifacts.exists()
