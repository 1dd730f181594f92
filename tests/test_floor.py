"""The floor under the gate: chance is never promoted, with or without a champion, and a sweep trial at chance is
failed ("did not learn"), never the best."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stages.floor import accuracy_floor, chance_accuracy, did_not_learn, loss_ceiling
from stages.pipeline import record_run, registry_row, run_all
from stages.promotion import decide
from tapeline.config import load_config
from tapeline.registry import read_production, read_runs
from tapeline.store import open_store
from tapeline.testing import tiny_config


def test_auto_floor_is_chance_plus_a_tenth_of_the_rest() -> None:
    config = load_config()
    assert chance_accuracy([10] * 10) == pytest.approx(0.1)
    assert chance_accuracy([70, 30]) == pytest.approx(0.7)
    assert accuracy_floor(config, [10] * 10) == pytest.approx(0.19)
    assert accuracy_floor(config, [50, 50]) == pytest.approx(0.55)
    assert accuracy_floor(config, [70, 30]) == pytest.approx(0.73)
    assert loss_ceiling(config, 10) == pytest.approx(4 * math.log(10))
    fixed = load_config(None, ["promotion.min_accuracy=0.8", "promotion.max_loss=1.5"])
    assert accuracy_floor(fixed, [10] * 10) == 0.8 and loss_ceiling(fixed, 10) == 1.5


def test_did_not_learn_names_the_split_the_value_and_the_key() -> None:
    config = load_config()
    assert did_not_learn(config, 0.91, 0.3, [100] * 10, "test") is None
    assert did_not_learn(config, 0.1, 2.3, [100] * 10, "test") == (
        "did not learn: test accuracy 0.1000 < 0.1900 (promotion.min_accuracy; a constant guess scores 0.1000)")
    assert did_not_learn(config, 0.5, 8e17, [100] * 10, "validation") == (
        "did not learn: validation loss 8e+17 > 9.21 (promotion.max_loss)")
    assert did_not_learn(config, 0.9, float("nan"), [100] * 10, "test") == "did not learn: test loss is nan"
    assert did_not_learn(config, 0.1, 1674.0, [100] * 10, "test") == (
        "did not learn: test accuracy 0.1000 < 0.1900 (promotion.min_accuracy; a constant guess scores 0.1000); "
        "test loss 1674 > 9.21 (promotion.max_loss)")


def test_the_floor_rejects_with_or_without_a_champion() -> None:
    gate = load_config().export
    assert decide(0.1, None, gate, "did not learn: x") == (False, "rejected: did not learn: x")
    assert decide(0.1, 0.05, gate, "did not learn: x")[0] is False
    assert decide(0.9, None, gate, None)[0] is True


def test_out_of_range_floors_are_refused_naming_the_key() -> None:
    from tapeline.errors import ConfigError

    with pytest.raises(ConfigError, match="promotion.min_accuracy"):
        load_config(None, ["promotion.min_accuracy=1.5"])
    with pytest.raises(ConfigError, match="promotion.max_loss"):
        load_config(None, ["promotion.max_loss=-1"])


@pytest.mark.slow
def test_a_learning_rate_of_1000_on_an_empty_store_promotes_nothing(tmp_path: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.learning_rate=1000", "train.lr_schedule=constant",
                         "train.max_epochs=2", "train.patience=5")
    results = run_all(config, tmp_path)
    promotion = results["promotion"]
    assert promotion.promoted is False
    assert promotion.decision.startswith("rejected: did not learn: test accuracy 0.1000 < 0.1900"), promotion.decision
    assert read_production(open_store(tmp_path))[0] is None
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").glob("v*"))
    assert json.loads(Path(promotion.record, "metrics.json").read_text())["promotion"]["decision"] == \
        promotion.decision
    record_run(tmp_path, registry_row("r1", config, results))
    assert [r["decision"] for r in read_runs(tmp_path)] == [promotion.decision]
