"""`model.builder`: the user's own Keras model, checked before any work, fingerprinted by its code (and its
helpers' code), trained, exported, served, predicted with, resumed after SIGKILL and trained on two workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from stages.data.readers import load_split
from tapeline.builder import builder_code, imported_names
from tapeline.config import load_config, output_config
from tapeline.testing import png_bytes
from tests.helpers import write_user_project

ROOT = Path(__file__).resolve().parents[1]
TAPELINE = str(Path(sys.executable).with_name("tapeline"))
TINY = ["--set", "data.shards=2", "--set", "data.batch_size=32", "--set", "train.max_epochs=2",
        "--set", "train.steps_per_execution=4", "--set", "train.precision=float32"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A user project outside the repository as the working directory, its helper directory on the path."""
    project, helpers = write_user_project(tmp_path / "user")
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(helpers))
    return project, helpers


def args(idx_dir: Path, artifacts: Path, builder: str = "usermodels.py:build", *more: str) -> list[str]:
    return ["--artifacts", str(artifacts), "--set", f"data.source=idx:{idx_dir}", "--set", f"model.builder={builder}",
            *TINY, *[part for item in more for part in ("--set", item)]]


def error_and_frames(capsys: pytest.CaptureFixture[str], code: int) -> tuple[str, list[str]]:
    """The single `tapeline: error:` line of a failed command (exit 2, no traceback) and what follows it: only the
    user's own frames, as Python prints them."""
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("tapeline: error:")]
    assert len(errors) == 1, err[-2000:]
    lines = err.rstrip().splitlines()
    frames = lines[lines.index(errors[0]) + 1:]
    assert all(line.startswith(('  File "', "    ")) for line in frames), err[-2000:]
    return errors[0], frames


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    """The single `tapeline: error:` line of a failed command (exit 2, no traceback, nothing after it)."""
    line, frames = error_and_frames(capsys, code)
    assert frames == []
    return line


# ---------------------------------------------------------------- checked once, before any work

@pytest.mark.parametrize(("builder", "end"), [("usermodels.py:missing", "has no 'missing'; name a function it defines"),
                                             ("nofile.py:build", "nofile.py does not exist"),
                                             ("no_such_module_xyz:build", "PYTHONPATH")])
def test_plan_names_a_reference_that_does_not_resolve_without_importing_it(
        project, idx_dir: Path, tmp_path: Path, builder: str, end: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, main(["plan", *args(idx_dir, tmp_path / "a", builder)]))
    assert line.startswith("tapeline: error: model.builder: ") and end in line


BEFORE_DATA = [
    ("nofile.py:build", [], "model.builder: ", "nofile.py does not exist"),
    ("no_such_module_xyz:build", [], "model.builder: no module 'no_such_module_xyz' on the Python path", "PYTHONPATH"),
    ("usermodels.py:missing", [], "model.builder: ", "has no 'missing'; name a function it defines"),
    ("usermodels.py:NOT_CALLABLE", [], "NOT_CALLABLE in ", "is a int, not callable"),
    ("usermodels.py:build", ["model.params.widht=16"], "model.params: usermodels.py:build does not take these "
     "arguments", "it accepts width, dropout"),
    ("usermodels.py:build", ["model.dropout=0.3"], "model.dropout shapes the built-in CNN, which model.builder="
     "usermodels.py:build replaces", "through model.params"),
    ("usermodels.py:no_classes", [], "model.builder: usermodels.py:no_classes does not take num_classes; tapeline "
     "calls it as no_classes(input_shape=(H, W, C), num_classes=N, **model.params)", "add num_classes to its "
     "arguments"),
    ("usermodels.py:unregistered_layer", [], "model.builder: usermodels.py:unregistered_layer builds a model that "
     "saves but does not load back (Keras cannot find the class 'Doubled')", "@keras.saving."
     "register_keras_serializable()"),
    ("lonely.py:build", [], "model.builder: importing ", "failed with ModuleNotFoundError: No module named "
     "'tapeline_missing_helpers'"),
    ("usermodels.py:softmax_output", [], "model.builder: usermodels.py:softmax_output returns probabilities (a final "
     "softmax activation), not logits", "tapeline's loss takes logits"),
    ("usermodels.py:softmax_layer", ["data.image_size=[20, 20]", "data.color_mode=grayscale"], "model.builder: "
     "usermodels.py:softmax_layer returns probabilities", "not logits"),
    ("usermodels.py:wrong_output", ["data.class_names=[a, b, c, d, e, f, g, h, i, j]"], "model.builder: "
     "usermodels.py:wrong_output returned a model whose output is (batch, 11), not (batch, 10)", "Dense(num_classes)"),
]


@pytest.mark.parametrize(("builder", "extra", "start", "end"), BEFORE_DATA)
def test_unusable_builder_is_one_line_before_any_work(project, idx_dir: Path, tmp_path: Path, builder: str,
                                                      extra: list[str], start: str, end: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = tmp_path / "artifacts"
    line = one_line_error(capsys, main(["stage", "data", *args(idx_dir, artifacts, builder, *extra)]))
    assert start in line and end in line
    assert not artifacts.exists()  # nothing was done, not even the data stage


CALLED = [
    ("usermodels.py:raises", "model.builder: usermodels.py:raises raised ValueError: width must be even; fix the "
     "builder or model.params"),
    ("usermodels.py:not_a_model", "model.builder: usermodels.py:not_a_model returned a Dense, not a keras.Model"),
    ("usermodels.py:wrong_input", "returned a model whose input is (None, 32, 32, 1), not (None, 28, 28, 1)"),
    ("usermodels.py:wrong_output", "returned a model whose output is (batch, 11), not (batch, 10)"),
    ("usermodels.py:softmax_output", "returns probabilities (a final softmax activation), not logits; end with "
     "Dense(num_classes) and no activation; tapeline's loss takes logits"),
    ("usermodels.py:softmax_layer", "returns probabilities (a final softmax activation), not logits"),
    ("usermodels.py:unregistered_layer", "builds a model that saves but does not load back (Keras cannot find the "
     "class 'Doubled'); register each custom layer or model class with @keras.saving.register_keras_serializable()"),
]


@pytest.fixture(scope="module")
def data_artifacts(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> Path:
    """An artifacts directory with the data stage of the tiny config built."""
    artifacts = tmp_path_factory.mktemp("builder-data")
    assert main(["stage", "data", "--artifacts", str(artifacts), "--set", f"data.source=idx:{idx_dir}", *TINY]) == 0
    return artifacts


@pytest.mark.parametrize(("builder", "message"), CALLED)
def test_builder_that_builds_the_wrong_thing_is_one_line(project, idx_dir: Path, data_artifacts: Path, builder: str,
                                                         message: str, capsys: pytest.CaptureFixture[str]) -> None:
    line, frames = error_and_frames(capsys, main(["stage", "model", *args(idx_dir, data_artifacts, builder)]))
    assert message in line
    if builder.endswith(":raises"):  # the user's own frame, and no other
        assert len(frames) == 2 and frames[0].startswith('  File "') and 'usermodels.py", line' in frames[0]
        assert frames[0].endswith(", in raises") and frames[1].strip() == 'raise ValueError("width must be even")'
    else:
        assert frames == []
    committed = [p for p in (data_artifacts / "model").glob("*") if not p.name.startswith(".")]
    assert committed == []


def test_presets_keep_their_cnn_keys_away_from_a_builder() -> None:
    config = load_config(None, ["model.builder=x.py:build"], "tutorial")
    assert config.model.builder == "x.py:build" and config.data.batch_size == 32  # the rest of the preset applies
    assert config.train.lr_schedule == "constant"


# ---------------------------------------------------------------- fingerprints

def plan_fingerprints(idx_dir: Path, artifacts: Path, capsys: pytest.CaptureFixture[str], *more: str
                      ) -> dict[str, str]:
    assert main(["plan", "--json", *args(idx_dir, artifacts, "usermodels.py:build", *more)]) == 0
    return {name: row["fingerprint"] for name, row in json.loads(capsys.readouterr().out)["stages"].items()}


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [name for name in before if before[name] != after[name]]


MODEL_ON = ["model", "train", "evaluate", "export"]


def test_builder_code_is_in_the_fingerprint(project, idx_dir: Path, data_artifacts: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    user, helpers = project
    artifacts = data_artifacts  # plan writes nothing; data's output makes its dependents' fingerprints known
    before = plan_fingerprints(idx_dir, artifacts, capsys)
    assert None not in before.values()
    models, helper = user / "usermodels.py", helpers / "tapeline_helpers.py"
    original_models, original_helper = models.read_text(), helper.read_text()

    models.write_text(original_models.replace('"""A stem conv', '"""Reworded: a stem conv')
                      + "\n# a comment about the models\n")
    assert changed(before, plan_fingerprints(idx_dir, artifacts, capsys)) == []  # comments and docstrings only

    models.write_text(original_models.replace("MaxPooling2D(2)", "MaxPooling2D(2, padding='same')"))
    assert changed(before, plan_fingerprints(idx_dir, artifacts, capsys)) == MODEL_ON
    models.write_text(original_models)

    helper.write_text(original_helper + "\n# helper comment\n")
    assert changed(before, plan_fingerprints(idx_dir, artifacts, capsys)) == []
    helper.write_text(original_helper.replace('padding="same")(y)', 'padding="same", use_bias=False)(y)'))
    assert changed(before, plan_fingerprints(idx_dir, artifacts, capsys)) == MODEL_ON  # a helper in another dir
    helper.write_text(original_helper)

    assert changed(before, plan_fingerprints(idx_dir, artifacts, capsys, "model.params.width=16")) == MODEL_ON
    assert plan_fingerprints(idx_dir, artifacts, capsys) == before


def test_code_closure_is_the_users_modules_only(project, monkeypatch: pytest.MonkeyPatch) -> None:
    user, helpers = project
    files = builder_code("usermodels.py:build")
    assert [(f.module, f.path) for f in files] == [("tapeline_helpers", "tapeline_helpers.py"),
                                                    ("usermodels", "usermodels.py")]  # keras is not the user's
    package = user / "teamnet"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text("import numpy\n\n\ndef block(x):\n    return x\n")
    (package / "nets.py").write_text("from . import layers\nfrom .layers import block\n\n\n"
                                     "def build(input_shape, num_classes):\n    return block(None)\n")
    monkeypatch.syspath_prepend(str(user))
    modules = [(f.module, f.path) for f in builder_code("teamnet.nets:build")]
    assert modules == [("teamnet", "teamnet/__init__.py"), ("teamnet.layers", "teamnet/layers.py"),
                       ("teamnet.nets", "teamnet/nets.py")]


def test_default_cnn_config_has_no_new_keys_in_its_fingerprint() -> None:
    default = output_config(load_config(), "model", ("seed", "model"))
    assert set(default) == {"seed", "model.conv_filters", "model.dense_units", "model.dropout", "model.batch_norm"}
    assert "train.init_from" not in output_config(load_config(), "train", ("seed", "train"))
    built = output_config(load_config(None, ["model.builder=a.py:f", "model.params.k=2"]), "model", ("seed", "model"))
    assert built["model.builder"] == "a.py:f" and built["model.params"] == {"k": 2}


def test_plan_imports_neither_tensorflow_nor_the_users_module(project, idx_dir: Path, tmp_path: Path) -> None:
    user, helpers = project
    script = textwrap.dedent(f"""
        import json, sys
        from flows.cli import main
        code = main(["plan", "--json", "--artifacts", {str(tmp_path / 'a')!r}, "--set", "data.source=idx:{idx_dir}",
                     "--set", "model.builder=usermodels.py:build"])
        print(json.dumps({{"code": code, "imported": sorted(m for m in ("tensorflow", "keras", "usermodels",
                                                                          "tapeline_helpers") if m in sys.modules)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=user, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(helpers)])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0, "imported": []}


def test_import_names_resolve_relative_imports() -> None:
    import ast

    tree = ast.parse("from . import a\nfrom ..b import c\nimport d.e\n")
    assert imported_names(tree, "pkg.sub.mod", is_package=False) == {
        "pkg.sub", "pkg.sub.a", "pkg", "pkg.b", "pkg.b.c", "d", "d.e"}


# ---------------------------------------------------------------- a user's model through every stage

def user_env(helpers: Path, tmp_path: Path, api: str | None = None) -> dict[str, str]:
    """The environment of a `tapeline` child: the user's helper directory on PYTHONPATH, its own Prefect home, the
    session's Prefect API when given."""
    env = {**os.environ, "PYTHONPATH": str(helpers), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PREFECT_API_URL", None)
    return env if api is None else {**env, "PREFECT_API_URL": api}


@pytest.mark.slow
def test_user_model_trains_through_stage_and_run_then_serves_and_predicts(
        project, prefect_api: str, idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import keras
    import tensorflow as tf

    user, helpers = project
    artifacts = tmp_path / "artifacts"
    cli = args(idx_dir, artifacts)
    for stage in ("data", "model", "train"):
        assert main(["stage", stage, *cli, "--json"]) == 0, stage
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model_dir = next(p for p in (artifacts / "model").iterdir() if not p.name.startswith("."))
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["builder"]["reference"] == "usermodels.py:build"
    assert [(f["module"], f["path"]) for f in manifest["builder"]["files"]] == [
        ("tapeline_helpers", "tapeline_helpers.py"), ("usermodels", "usermodels.py")]
    assert all(len(f["sha256"]) == 64 for f in manifest["builder"]["files"])
    saved = keras.models.load_model(Path(trained["path"]) / "model.keras", compile=False)
    kinds = {type(layer).__name__ for layer in saved.layers}
    assert {"Add", "GlobalAveragePooling2D"} <= kinds and "Flatten" not in kinds

    # The residual model pools globally, so two epochs on these position-coded synthetic classes leave it at chance;
    # this test follows a user's model through export and serving, so its gate takes any model (the floor has tests
    # of its own, and the default floor refuses this one: test_floor.py).
    anything = ["--set", "promotion.min_accuracy=0", "--set", "promotion.max_loss=1000"]
    done = subprocess.run([TAPELINE, "run", *cli, *anything, "--json"], cwd=user,
                          env=user_env(helpers, tmp_path, prefect_api), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {n: row["cached"] for n, row in summary["stages"].items()} == {
        "data": True, "validate": False, "model": True, "train": True, "evaluate": False, "export": False}
    assert summary["stages"]["train"]["fingerprint"] == trained["fingerprint"]
    assert summary["promoted"] is True

    # TF Serving's layout: serving/1 is production v0001's SavedModel, with a models.config naming it.
    serving = artifacts / "serving"
    assert sorted(p.name for p in serving.iterdir()) == ["1", "models.config"]
    assert {"saved_model.pb", "variables"} <= {p.name for p in (serving / "1").iterdir()}
    assert f"base_path: '{serving}'" in (serving / "models.config").read_text()
    images, _ = load_split(Path(summary["stages"]["data"]["path"]), "test")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"test{i}.png")
        paths[-1].write_bytes(png_bytes(images[i][..., 0]))
    assert main(["predict", "--artifacts", str(artifacts), *map(str, paths)]) == 0
    predicted = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    serve = tf.saved_model.load(str(serving / "1")).signatures["serving_default"]
    batch = serve(images=tf.constant(images[:3]))
    single = serve(images=tf.constant(images[:1]))
    np.testing.assert_allclose(single["probabilities"].numpy()[0], batch["probabilities"].numpy()[0], atol=1e-6)
    for row, probabilities, name in zip(predicted, batch["probabilities"].numpy(), batch["class_name"].numpy(),
                                        strict=True):
        assert row[1] == name.decode() and float(row[2]) == pytest.approx(probabilities.max(), abs=5e-5)


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tapeline.config import load_config
    from stages.pipeline import run_data, run_model, run_train
    artifacts = Path(sys.argv[1])
    config = load_config(None, sys.argv[2:])
    data = run_data(config, artifacts)
    model = run_model(config, data, artifacts)
    run_train(config, data, model, artifacts, on_epoch_end=lambda row, _: time.sleep(1.5))
""")


@pytest.mark.slow
def test_user_model_resumes_after_sigkill(project, idx_dir: Path, tmp_path: Path) -> None:
    import keras

    from stages.pipeline import run_data, run_model, run_train

    user, helpers = project
    overrides = [f"data.source=idx:{idx_dir}", f"model.builder={user / 'usermodels.py'}:build",
                 "model.params.dropout=0.2", "data.shards=2", "data.batch_size=32", "train.max_epochs=4",
                 "train.patience=3", "train.steps_per_execution=4", "train.precision=float32"]
    config = load_config(None, overrides)
    data = run_data(config, tmp_path / "a")
    whole = run_train(config, data, run_model(config, data, tmp_path / "a"), tmp_path / "a")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "b"), *overrides], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(helpers)]),
                                  "TF_CPP_MIN_LOG_LEVEL": "3"})
    state = tmp_path / "b" / "train" / f".partial-{whole.fingerprint}" / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 240
    while not (state.exists() and 'model_checkpoint_path: "ckpt-2"' in state.read_text()) \
            and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "b" / "train" / whole.fingerprint).exists()
    seen: list[int] = []
    data_b = run_data(config, tmp_path / "b")
    resumed = run_train(config, data_b, run_model(config, data_b, tmp_path / "b"), tmp_path / "b",
                        on_epoch_end=lambda row, _: seen.append(row["epoch"]))
    assert seen and seen[0] >= 3 and seen[-1] == 4
    assert resumed.fingerprint == whole.fingerprint
    ours = keras.models.load_model(resumed.path / "model.keras", compile=False).get_weights()
    theirs = keras.models.load_model(whole.path / "model.keras", compile=False).get_weights()
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_user_model_trains_on_two_workers(project, idx_dir: Path, tmp_path: Path) -> None:
    user, helpers = project
    cli = args(idx_dir, tmp_path / "a", f"{user / 'usermodels.py'}:build")
    for stage in ("data", "model"):
        assert main(["stage", stage, *cli]) == 0
    done = subprocess.run([TAPELINE, "stage", "train", "--workers", "2", *cli], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=user_env(helpers, tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = [p for p in (tmp_path / "a" / "train").iterdir() if not p.name.startswith(".")]
    manifest = json.loads((outputs[0] / "manifest.json").read_text())
    assert len(outputs) == 1 and manifest["workers"] == 2 and manifest["summary"]["epochs_run"] == 2


def test_the_example_project_builds_and_its_code_is_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.model import build_model
    from tapeline.builder import builder_identity
    from tapeline.results import InputSpec

    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "examples" / "residual" / "config.yaml")
    assert config.model.builder == "examples/residual/models.py:build"
    identity = builder_identity(config.model.builder)
    assert [(f["module"], f["path"]) for f in identity["files"]] == [("blocks", "blocks.py"), ("models", "models.py")]
    model = build_model(config.model, InputSpec(shape=(28, 28, 1), class_names=tuple("abcdefghij")))
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Add", "GlobalAveragePooling2D"} <= kinds and model.output.shape[1:] == (10,)


def test_every_deployment_parameter_set_is_a_valid_config() -> None:
    import yaml

    from tapeline.config import validate_config

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} >= {"manual", "nightly", "residual"}
    for deployment in deployments:
        config = validate_config(deployment["parameters"].get("config", {}))
        if deployment["name"] == "residual":
            assert config.model.builder == "examples/residual/models.py:build"
