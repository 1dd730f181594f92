"""`train.init_from`: warm start from production or an exported model; the fingerprint follows what training
started from; an incompatible model is one line naming what differs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from flows.cli import main
from stages.graph import fingerprints
from stages.pipeline import run_all, run_data, run_model, run_train
from tapeline.config import load_config
from tapeline.registry import production
from tapeline.testing import tiny_overrides, write_idx_dir


def weights(path: Path) -> list[np.ndarray]:
    return keras.models.load_model(path, compile=False).get_weights()


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> tuple[Path, dict]:
    """An artifacts directory whose production model (v0001) is the tiny CNN trained cold."""
    artifacts = tmp_path_factory.mktemp("warm") / "artifacts"
    results = run_all(load_config(None, tiny_overrides(f"idx:{idx_dir}")), artifacts)
    assert results["promotion"].promoted
    return artifacts, results


def test_no_production_trains_from_scratch_and_says_so(tmp_path: Path, idx_dir: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, tiny_overrides(f"idx:{idx_dir}", "train.init_from=production"))
    data = run_data(config, tmp_path)
    with caplog.at_level(logging.INFO, logger="tapeline.train"):
        trained = run_train(config, data, run_model(config, data, tmp_path), tmp_path)
    assert "training from scratch (train.init_from=production, but there is no production model yet)" in caplog.text
    manifest = json.loads((trained.path / "manifest.json").read_text())
    assert manifest["init_from"] == {"requested": "production", "resolved": None}


def test_warm_start_begins_at_the_production_weights(champion, idx_dir: Path, caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    artifacts, cold = champion
    pointer = production(artifacts)
    # A learning rate of ~0 keeps the weights where training started: at production's.
    overrides = tiny_overrides(f"idx:{idx_dir}", "train.init_from=production", "train.learning_rate=1e-12",
                               "train.min_learning_rate=0", "train.max_epochs=1")
    config = load_config(None, overrides)
    with caplog.at_level(logging.INFO, logger="tapeline.train"):
        warm = run_train(config, cold["data"], cold["model"], artifacts)
    assert f"warm-started from production v0001 (train fingerprint {pointer['train_fingerprint']})" in caplog.text
    production_weights = weights(artifacts / "models" / "v0001" / "model.keras")
    assert largest_difference(weights(warm.path / "model.keras"), production_weights) < 1e-6
    initial = weights(cold["model"].path / "model.keras")
    assert largest_difference(initial, production_weights) > 1e-2  # so the check above can fail
    manifest = json.loads((warm.path / "manifest.json").read_text())
    assert manifest["init_from"]["resolved"] == {"from": "production", "version": "v0001",
                                                 "train_fingerprint": pointer["train_fingerprint"]}


def test_fingerprint_follows_the_production_model(champion, idx_dir: Path, tmp_path: Path) -> None:
    artifacts, cold = champion
    warm = load_config(None, tiny_overrides(f"idx:{idx_dir}", "train.init_from=production"))
    before = fingerprints(warm, artifacts)
    pointer_file = artifacts / "models" / "production.json"
    saved = pointer_file.read_text()
    try:
        pointer = json.loads(saved)
        pointer_file.write_text(json.dumps({**pointer, "train_fingerprint": "0" * 16}))
        after = fingerprints(warm, artifacts)
    finally:
        pointer_file.write_text(saved)
    assert [n for n in before if before[n] != after[n]] == ["train", "evaluate", "export"]
    cold_fps = fingerprints(load_config(None, tiny_overrides(f"idx:{idx_dir}")), artifacts)
    assert cold_fps["train"] == cold["train"].fingerprint != before["train"]


def test_init_from_an_export_directory(champion, idx_dir: Path) -> None:
    artifacts, cold = champion
    export_dir = cold["export"].path
    config = load_config(None, tiny_overrides(f"idx:{idx_dir}", f"train.init_from={export_dir}", "train.max_epochs=1",
                                              "train.learning_rate=1e-12", "train.min_learning_rate=0"))
    warm = run_train(config, cold["data"], cold["model"], artifacts)
    manifest = json.loads((warm.path / "manifest.json").read_text())
    assert manifest["init_from"]["resolved"] == {"from": str(export_dir),
                                                 "train_fingerprint": cold["train"].fingerprint}
    assert largest_difference(weights(warm.path / "model.keras"), weights(export_dir / "model.keras")) < 1e-6


@pytest.mark.parametrize("place", ["models/v0001", "serving/1"])
def test_init_from_a_promoted_version_or_its_serving_copy(champion, idx_dir: Path, place: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    artifacts, cold = champion
    overrides = tiny_overrides(f"idx:{idx_dir}", f"train.init_from={artifacts / place}", "train.max_epochs=1",
                               "train.learning_rate=1e-12", "train.min_learning_rate=0")
    assert main(["stage", "train", "--artifacts", str(artifacts), "--json",
                 *(a for o in overrides for a in ("--set", o))]) == 0
    warm = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((Path(warm["path"]) / "manifest.json").read_text())
    assert manifest["init_from"]["resolved"] == {"from": str(artifacts / place), "version": "v0001",
                                                 "train_fingerprint": cold["train"].fingerprint}
    promoted = weights(artifacts / "models" / "v0001" / "model.keras")
    assert largest_difference(weights(Path(warm["path"]) / "model.keras"), promoted) < 1e-6


@pytest.mark.slow
def test_init_from_a_version_named_as_the_registry_names_it_is_found_in_the_artifacts(
        champion, prefect_api: str, idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    shared, cold = champion
    artifacts = tmp_path / "artifacts"
    shutil.copytree(shared, artifacts, symlinks=True)  # this run may promote: the module's champion stays as it is
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the artifacts' parent: models/v0001 is read in the artifacts
    sets = [a for o in tiny_overrides(f"idx:{idx_dir}", "train.init_from=models/v0001", "train.max_epochs=1")
            for a in ("--set", o)]
    assert main(["plan", "--artifacts", str(artifacts), "--json", *sets]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"]["train"]["cached"] is False
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PREFECT_API_URL": prefect_api}
    done = subprocess.run([str(Path(sys.executable).with_name("tapeline")), "run", "--artifacts", str(artifacts),
                           "--json", *sets], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    manifest = json.loads((Path(summary["stages"]["train"]["path"]) / "manifest.json").read_text())
    assert manifest["init_from"]["resolved"] == {"from": "models/v0001", "version": "v0001",
                                                 "train_fingerprint": cold["train"].fingerprint}

    missing = [a for o in tiny_overrides(f"idx:{idx_dir}", "train.init_from=models/v0042") for a in ("--set", o)]
    line = one_line(capsys, main(["plan", "--artifacts", str(artifacts), *missing]))
    assert line.startswith(f"tapeline: error: train.init_from=models/v0042: not a complete exported model (looked "
                           f"in the artifacts: {artifacts / 'models' / 'v0042'})")


def one_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err.rstrip().splitlines()[-1]


def test_incompatible_production_is_one_line(champion, idx_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    artifacts, _ = champion
    other_cnn = ["--artifacts", str(artifacts), *[f"--set={o}" for o in tiny_overrides(
        f"idx:{idx_dir}", "model.dense_units=24", "train.init_from=production")]]
    assert main(["stage", "model", *other_cnn]) == 0
    capsys.readouterr()
    line = one_line(capsys, main(["stage", "train", *other_cnn]))
    assert line == ("tapeline: error: train.init_from=production (v0001) does not fit this run: other architecture: "
                    "weight dense/kernel is (1936, 24) here, (1936, 16) in the starting model; use --set "
                    "train.init_from=none to train from scratch")

    five = write_idx_dir(tmp_path / "five", classes=5)
    other_classes = ["--artifacts", str(artifacts), *[f"--set={o}" for o in tiny_overrides(
        f"idx:{five}", "train.init_from=production")]]
    for stage in ("data", "model"):
        assert main(["stage", stage, *other_classes]) == 0
    capsys.readouterr()
    line = one_line(capsys, main(["stage", "train", *other_classes]))
    assert line == ("tapeline: error: train.init_from=production (v0001) does not fit this run: its class names are "
                    "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, this run's are 0, 1, 2, 3, 4; use --set train.init_from=none to "
                    "train from scratch")


def test_init_from_a_directory_that_is_no_export(tmp_path: Path, idx_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "export" / "nothing").mkdir(parents=True)
    cli = ["--artifacts", str(tmp_path / "a"), "--set", f"data.source=idx:{idx_dir}",
           "--set", f"train.init_from={tmp_path / 'export' / 'nothing'}"]
    line = one_line(capsys, main(["plan", *cli]))
    assert line.startswith(f"tapeline: error: train.init_from={tmp_path / 'export' / 'nothing'}: not a complete "
                           "exported model")
