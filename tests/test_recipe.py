"""The training recipe of the defaults: augmentation, the cosine schedule, presets, automatic precision and the
epoch-end work that runs beside training."""

from __future__ import annotations

import contextvars
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from flows.cli import main
from stages.data.readers import Augment, augment_batch, load_split, make_dataset, make_memory_dataset
from stages.pipeline import run_data, run_evaluate, run_export, run_model, run_train
from stages.train.environment import precision_decision, resolve_precision
from stages.train.loop import build_trainer, epoch_limit, fit, learning_rate_for, make_early_stopping
from tapeline.config import PRESETS, TrainConfig, load_config
from tapeline.errors import ConfigError
from tapeline.hardware import onednn_enabled, onednn_reason
from tapeline.testing import tiny_overrides
from tests.helpers import Interrupted
from tests.test_train import assert_same_weights, history

# The current defaults on tiny data: the tiny CNN and batches of the other tests, nothing of the v1 recipe.
DEFAULT_RECIPE = ["data.batch_size=32", "data.shards=2", "data.shuffle_buffer=256", "model.conv_filters=[8, 16]",
                  "model.dense_units=16", "train.steps_per_execution=4"]


def recipe_config(source: str, *more: str):
    return load_config(None, [f"data.source={source}", *DEFAULT_RECIPE, *more])


def dot_images(count: int, row: int = 14, col: int = 10) -> tf.Tensor:
    images = np.zeros((count, 28, 28, 1), np.float32)
    images[:, row, col, 0] = 1.0
    return tf.constant(images)


def test_shift_moves_each_image_by_at_most_the_configured_pixels() -> None:
    shifted = augment_batch(dot_images(64), Augment(shift=2), tf.constant([7, 0], tf.int64)).numpy()
    offsets = []
    for image in shifted:
        rows, cols, _ = np.nonzero(image)
        assert len(rows) == 1 and image.sum() == 1.0  # moved, not blurred or lost
        offsets.append((rows[0] - 14, cols[0] - 10))
    assert {dy for dy, _ in offsets} == {dx for _, dx in offsets} == {-2, -1, 0, 1, 2}


def test_flip_mirrors_about_half_of_the_images() -> None:
    flipped = augment_batch(dot_images(64), Augment(flip=True), tf.constant([7, 0], tf.int64)).numpy()
    columns = [int(np.nonzero(image)[1][0]) for image in flipped]
    assert set(columns) == {10, 17} and 16 <= columns.count(17) <= 48


def test_augmentation_is_a_function_of_its_key() -> None:
    augment = Augment(shift=2, flip=True)
    a = augment_batch(dot_images(32), augment, tf.constant([1, 5], tf.int64)).numpy()
    b = augment_batch(dot_images(32), augment, tf.constant([1, 5], tf.int64)).numpy()
    c = augment_batch(dot_images(32), augment, tf.constant([1, 6], tf.int64)).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_augmented_epochs_are_the_same_after_a_resume(tmp_path: Path, idx_dir: Path) -> None:
    config = recipe_config(f"idx:{idx_dir}")
    data = run_data(config, tmp_path)
    images, labels = tf.constant(load_split(data.path, "train")[0]), tf.constant(load_split(data.path, "train")[1])
    augment = Augment(shift=2, flip=True)
    two_epochs = [x.numpy() for x, _ in make_memory_dataset(images, labels, 32, epoch=3, epochs=2, augment=augment)]
    resumed = [x.numpy() for x, _ in make_memory_dataset(images, labels, 32, epoch=4, augment=augment)]
    per_epoch = len(resumed)
    assert all(np.array_equal(a, b) for a, b in zip(two_epochs[per_epoch:], resumed, strict=True))
    plain = [x.numpy() for x, _ in make_memory_dataset(images, labels, 32, epoch=4)]
    assert not all(np.array_equal(a, b) for a, b in zip(plain, resumed, strict=True))
    stream = [x.numpy() for x, _ in make_dataset(data.path, "train", 32, training=True, epoch=4, augment=augment)]
    again = [x.numpy() for x, _ in make_dataset(data.path, "train", 32, training=True, epoch=4, augment=augment)]
    assert all(np.array_equal(a, b) for a, b in zip(stream, again, strict=True))
    # Only training data is augmented.
    validation = [x.numpy() for x, _ in make_dataset(data.path, "validation", 32, augment=augment)]
    reference = load_split(data.path, "validation", normalize=True)[0]
    assert np.array_equal(np.concatenate(validation), reference)


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = load_config(None, ["train.learning_rate=0.01", "train.min_learning_rate=0.0001",
                                "train.warmup_epochs=1", "train.decay_epochs=4"]).train
    schedule = learning_rate_for(config, steps_per_epoch=10)
    values = [float(schedule(step)) for step in range(41)]
    assert values[0] == pytest.approx(0.001)
    assert values[10] == pytest.approx(0.01)
    assert values[40] == pytest.approx(0.0001)
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a > b for a, b in zip(values[10:40], values[11:41], strict=True))
    plateau = load_config(None, ["train.lr_schedule=plateau", "train.learning_rate=0.002"]).train
    assert learning_rate_for(plateau, 10) == 0.002
    assert epoch_limit(config) == 4
    assert epoch_limit(load_config(None, ["train.lr_schedule=plateau"]).train) == 100


def test_default_recipe_trains_to_the_end_of_its_schedule(tmp_path: Path, idx_dir: Path) -> None:
    config = recipe_config(f"idx:{idx_dir}", "train.decay_epochs=4", "train.patience=10")
    data = run_data(config, tmp_path)
    result = run_train(config, data, run_model(config, data, tmp_path), tmp_path)
    rows = history(result.path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and not result.stopped_early
    rates = [r["learning_rate"] for r in rows]
    # No warm-up by default: a quarter of the way down the cosine after epoch 1, then the floor.
    peak, floor = config.train.learning_rate, config.train.min_learning_rate
    assert config.train.warmup_epochs == 0
    assert rates[0] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert rates[-1] == pytest.approx(floor)
    assert rows[-1]["val_accuracy"] > 0.5
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["precision"] == resolve_precision("auto")
    assert manifest["input_pipeline"] == "memory"
    # Trained in mixed precision (on AMX CPUs), saved and exported in float32: TFLite converts it.
    saved = keras.models.load_model(result.path / "model.keras")
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}
    evaluation = run_evaluate(config, data, result, tmp_path)
    exported = run_export(config, data, result, evaluation, tmp_path)
    assert (exported.path / "model.tflite").stat().st_size > 0


def train_whole_and_resumed(root: Path, idx_dir: Path) -> None:
    """Train the default recipe once through and once cut after epoch 2 and resumed, under `root`."""
    config = recipe_config(f"idx:{idx_dir}", "train.decay_epochs=4", "train.patience=10")
    whole = run_train(config, *upstream_of(config, root / "whole"), root / "whole")
    data, model = upstream_of(config, root / "cut")

    def stop_after_two(row: dict, _max: int) -> None:
        if row["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_train(config, data, model, root / "cut", on_epoch_end=stop_after_two)
    resumed = run_train(config, data, model, root / "cut")
    (root / "paths.json").write_text(json.dumps({"whole": str(whole.path), "resumed": str(resumed.path)}))


def test_default_recipe_resumes_to_the_same_weights(tmp_path: Path, idx_dir: Path) -> None:
    # Bit-for-bit equality needs run-to-run deterministic kernels: TensorFlow's own. oneDNN's AVX2 kernels (on by
    # default) once gave a first epoch 3 % apart from an identical run in CI, and on 270 images Adam amplifies
    # any last-bit difference; a resume that restored the wrong state would differ under either kernel set.
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"}
    env.pop("TAPELINE_SET_ONEDNN", None)
    code = ("import sys; from pathlib import Path; from tests.test_recipe import train_whole_and_resumed; "
            "train_whole_and_resumed(Path(sys.argv[1]), Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(idx_dir)], env=env, check=True,
                   cwd=Path(__file__).resolve().parents[1])
    paths = {name: Path(path) for name, path in json.loads((tmp_path / "paths.json").read_text()).items()}
    assert json.loads((paths["resumed"] / "manifest.json").read_text())["hardware"]["onednn"]["enabled"] is False
    assert [r["epoch"] for r in history(paths["resumed"])] == [1, 2, 3, 4]
    assert [r["val_loss"] for r in history(paths["resumed"])] == \
        pytest.approx([r["val_loss"] for r in history(paths["whole"])])
    assert_same_weights(paths["whole"] / "model.keras", paths["resumed"] / "model.keras", atol=1e-6)


def upstream_of(config, artifacts: Path):
    data = run_data(config, artifacts)
    return data, run_model(config, data, artifacts)


def test_epoch_callback_runs_beside_training_in_the_callers_context(tmp_path: Path, idx_dir: Path) -> None:
    config = load_config(None, tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=3"))
    data, model = upstream_of(config, tmp_path)
    marker = contextvars.ContextVar("marker")
    marker.set("flow-run-42")
    seen: list[tuple[int, str, str]] = []

    def record(row: dict, _max: int) -> None:
        seen.append((int(row["epoch"]), threading.current_thread().name, marker.get()))

    fit(build_trainer(config, data, model, tmp_path / "ckpt"), make_early_stopping(config.train), tmp_path / "run",
        record)
    assert [epoch for epoch, _, _ in seen] == [1, 2, 3]
    assert all(name.startswith("tapeline-epoch-end") and value == "flow-run-42" for _, name, value in seen)


def test_epoch_callback_error_stops_training_before_the_next_checkpoint(tmp_path: Path, idx_dir: Path) -> None:
    config = load_config(None, tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=5"))
    data, model = upstream_of(config, tmp_path)

    def fail_first(row: dict, _max: int) -> None:
        if row["epoch"] == 1:
            raise Interrupted

    trainer = build_trainer(config, data, model, tmp_path / "ckpt")
    with pytest.raises(Interrupted):
        fit(trainer, make_early_stopping(config.train), tmp_path / "run", fail_first)
    assert trainer.checkpointer.manager.latest_checkpoint.endswith("ckpt-1")


def test_presets_fill_in_under_the_file_and_set(tmp_path: Path) -> None:
    tutorial = load_config(None, [], "tutorial")
    assert (tutorial.data.batch_size, tutorial.train.learning_rate, tutorial.train.lr_schedule,
            tutorial.train.precision, tutorial.model.batch_norm, tutorial.train.random_shift,
            tutorial.train.random_flip) == (32, 1e-3, "constant", "float32", False, 0, False)
    v1 = load_config(None, ["preset=v1"])
    assert (v1.train.lr_schedule, v1.train.input_pipeline, v1.train.reduce_lr_patience) == ("plateau", "stream", 1)
    assert load_config(None, ["data.batch_size=64"], "tutorial").data.batch_size == 64
    config_file = tmp_path / "c.yaml"
    config_file.write_text("preset: tutorial\ndata:\n  batch_size: 16\n")
    from_file = load_config(config_file)
    assert (from_file.preset, from_file.data.batch_size, from_file.train.lr_schedule) == ("tutorial", 16, "constant")
    assert load_config(config_file, [], "v1").train.lr_schedule == "plateau"  # --preset replaces the file's
    assert load_config(None, [], "fast").train.decay_epochs == PRESETS["fast"]["train"]["decay_epochs"]
    with pytest.raises(ConfigError, match=r"^preset: unknown preset 'quick'; use one of tutorial, v1, v2, fast$"):
        load_config(None, ["preset=quick"])


def test_preset_changes_the_train_fingerprint_but_not_the_data(tmp_path: Path, idx_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    def plan_of(*args: str) -> dict[str, str]:
        assert main(["plan", "--json", "--artifacts", str(tmp_path), "--set", f"data.source=idx:{idx_dir}", *args]) == 0
        stages = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]
        return {name: row["fingerprint"] for name, row in stages.items()}

    # Stages past data key on data's content: build it, so plan knows their fingerprints.
    assert main(["stage", "data", "--artifacts", str(tmp_path), "--set", f"data.source=idx:{idx_dir}"]) == 0
    capsys.readouterr()
    default, tutorial = plan_of(), plan_of("--preset", "tutorial")
    assert default["data"] == tutorial["data"] and None not in (default["train"], tutorial["train"])
    assert default["train"] != tutorial["train"]
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--preset", "quick", "--artifacts", str(tmp_path)])
    assert exit_info.value.code == 2 and "invalid choice: 'quick'" in capsys.readouterr().err


def test_auto_precision_follows_the_cpu_flags(tmp_path: Path) -> None:
    from tapeline.hardware import cpu, precision_for_cpu

    flags = {"amx": "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8",
             "bf16_dot": "fpu avx2 avx512f avx512_bf16", "avx512": "fpu avx2 avx512f avx512_vnni",
             "avx2": "fpu avx avx2 fma"}
    for name, line in flags.items():
        numbers = "cpu family\t: 25\nmodel\t\t: 17\n" if name == "bf16_dot" else ""
        (tmp_path / name).write_text(f"{numbers}model name\t: Some CPU\nflags\t\t: {line}\n")
    decided = {name: precision_for_cpu(cpu(tmp_path / name)) for name in [*flags, "missing"]}
    assert {name: precision for name, (precision, _) in decided.items()} == {
        "amx": "mixed_bfloat16", "bf16_dot": "mixed_bfloat16", "avx512": "float32", "avx2": "float32",
        "missing": "float32"}
    assert decided["amx"][1] == "CPU with AMX bf16 tiles (amx_bf16): Some CPU"
    assert decided["bf16_dot"][1] == ("CPU with AVX-512 bf16 dot products (avx512_bf16), no AMX: Some CPU "
                                      "(family 25, model 17)")  # a bare "AMD EPYC" is Zen 2 to Zen 5 alike
    assert {k: cpu(tmp_path / "bf16_dot")[k] for k in ("model", "family", "model_number")} == {
        "model": "Some CPU", "family": 25, "model_number": 17}
    assert cpu(tmp_path / "amx")["family"] is None and cpu(tmp_path / "amx")["model_number"] is None
    assert decided["avx2"][1].startswith("CPU without AMX or AVX-512 BF16 (best vector ISA avx2): Some CPU")
    assert resolve_precision("float32") == "float32" and resolve_precision("mixed_float16") == "mixed_float16"
    assert resolve_precision("auto") == precision_for_cpu(cpu())[0]  # no GPU here


def test_hardware_choices_are_recorded_and_planned(tmp_path: Path, idx_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tapeline.hardware import cpu, cpu_name, cpu_precision

    config = load_config(None, tiny_overrides(f"idx:{idx_dir}", "train.precision=auto", "train.max_epochs=1"))
    data = run_data(config, tmp_path)
    trained = run_train(config, data, run_model(config, data, tmp_path), tmp_path)
    hardware = json.loads((trained.path / "manifest.json").read_text())["hardware"]
    assert hardware["precision"] == {"requested": "auto", "resolved": resolve_precision("auto"),
                                     "reason": cpu_precision()[1], "cpu": cpu(),
                                     "device": f"CPU {cpu_name(cpu())}, {cpu()['cores']} cores"}
    assert cpu()["cores"] >= 1 and ("avx2" in cpu()["isa"]) == (" avx2" in Path("/proc/cpuinfo").read_text())
    assert main(["plan", "--json", "--artifacts", str(tmp_path), "--set", f"data.source=idx:{idx_dir}"]) == 0
    planned = json.loads(capsys.readouterr().out)["auto"]["train.precision"]
    assert planned["value"] == resolve_precision("auto") and planned["reason"] == cpu_precision()[1]
    assert main(["plan", "--artifacts", str(tmp_path), "--set", f"data.source=idx:{idx_dir}"]) == 0
    text = capsys.readouterr().out
    assert f"train.precision: {resolve_precision('auto')} (" in text
    assert f"device: CPU {cpu_name(cpu())} (no NVIDIA GPU reported by the driver)" in text
    assert hardware["onednn"] == {"enabled": onednn_enabled(), "reason": onednn_reason(onednn_enabled())}
    assert f"oneDNN kernels: {onednn_reason(onednn_enabled())}" in text


def test_onednn_is_preferred_unless_the_user_chose() -> None:
    from tapeline.hardware import SET_BY_TAPELINE, prefer_onednn

    unset: dict[str, str] = {}
    assert prefer_onednn(unset, {}) == "tapeline" and unset == {"TF_ENABLE_ONEDNN_OPTS": "1", SET_BY_TAPELINE: "1"}
    assert prefer_onednn(unset, {}) == "tapeline"  # a worker process tapeline started inherits both
    chosen = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert prefer_onednn(chosen, {}) == "user" and chosen == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert prefer_onednn({"TF_ENABLE_ONEDNN_OPTS": "0", SET_BY_TAPELINE: "1"}, {}) == "user"
    late: dict[str, str] = {}
    assert prefer_onednn(late, {"tensorflow": object()}) == "imported first" and late == {}
    assert onednn_reason(False, "user", chosen) == "off: TF_ENABLE_ONEDNN_OPTS=0 set by the user"


@pytest.mark.parametrize(("setting", "expected"), [(None, True), ("0", False)])
def test_the_engine_turns_onednn_on_before_tensorflow_loads(setting: str | None, expected: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TAPELINE_SET_ONEDNN")}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    code = ("from tapeline.hardware import onednn_decision, onednn_origin; onednn_origin(); import tensorflow, json; "
            "print(json.dumps(onednn_decision()))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    decision = json.loads(done.stdout.strip().splitlines()[-1])
    assert decision["enabled"] is expected
    assert decision["reason"].startswith("on: tapeline set" if setting is None else "off: TF_ENABLE_ONEDNN_OPTS=0")


def test_auto_precision_on_a_gpu_is_what_its_tensor_cores_do_well() -> None:
    h100, t4, p100 = ({"name": "NVIDIA H100", "capability": (9, 0)}, {"name": "Tesla T4", "capability": (7, 5)},
                      {"name": "Tesla P100", "capability": (6, 0)})
    decided = {gpu["name"]: precision_decision("auto", [gpu]) for gpu in (h100, t4, p100)}
    assert {name: d["resolved"] for name, d in decided.items()} == {
        "NVIDIA H100": "mixed_bfloat16", "Tesla T4": "mixed_float16", "Tesla P100": "float32"}
    assert decided["Tesla T4"]["reason"] == ("GPU Tesla T4, compute capability 7.5: float16 tensor cores, with loss "
                                             "scaling in the tape step")
    assert decided["NVIDIA H100"]["device"] == "GPU NVIDIA H100"
    assert precision_decision("auto", [h100, t4])["device"] == "GPU NVIDIA H100 (and 1 more)"
    assert precision_decision("float32", [h100])["resolved"] == "float32"


def test_float16_trains_through_loss_scaling_in_the_tape_step() -> None:
    import keras

    from stages.train.loop import make_optimizer

    assert isinstance(make_optimizer(TrainConfig(), 10, "mixed_float16"), keras.optimizers.LossScaleOptimizer)
    for precision in ("mixed_bfloat16", "float32"):
        assert not isinstance(make_optimizer(TrainConfig(), 10, precision), keras.optimizers.LossScaleOptimizer)


def test_plan_names_the_device_from_the_installed_build_and_the_driver() -> None:
    from tapeline.hardware import nvidia_gpus, planned_choices, planned_device

    class Done:
        returncode, stdout = 0, "NVIDIA H100 80GB HBM3, 9.0\nTesla T4, 7.5\n"

    gpus = nvidia_gpus(run=lambda *a, **k: Done())
    assert gpus == [{"name": "NVIDIA H100 80GB HBM3", "capability": (9, 0)}, {"name": "Tesla T4", "capability": (7, 5)}]
    assert planned_device(["tensorflow"], gpus)["value"] == "GPU"
    on_cpu_build = planned_device(["tensorflow-cpu"], gpus)
    assert (on_cpu_build["value"], on_cpu_build["reason"]) == (
        "CPU", "2 NVIDIA GPU(s), but the CPU build of TensorFlow: pip install 'tapeline[gpu]'")
    planned = planned_choices("auto", ["tensorflow"], gpus)
    assert planned["train.precision"] == {"value": "mixed_bfloat16",
                                          "reason": "GPU NVIDIA H100 80GB HBM3, compute capability 9.0: bfloat16 "
                                                    "tensor cores"}
    assert nvidia_gpus(run=lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("nvidia-smi"))) == []


def test_none_or_both_tensorflow_builds_are_refused_in_one_line() -> None:
    from importlib.metadata import PackageNotFoundError

    from tapeline.hardware import installed_tensorflow_builds, tensorflow_install_problem

    def only(*names: str):
        def find(name: str) -> str:
            if name not in names:
                raise PackageNotFoundError(name)
            return name
        return find

    assert installed_tensorflow_builds(only("tensorflow-cpu", "tensorflow")) == ["tensorflow-cpu", "tensorflow"]
    assert tensorflow_install_problem(installed_tensorflow_builds(only("tensorflow-cpu"))) is None
    assert tensorflow_install_problem(installed_tensorflow_builds(only())) == (
        "TensorFlow is not installed: pip install 'tapeline[cpu]' (or 'tapeline[gpu]' on a machine with an NVIDIA GPU)")
    assert tensorflow_install_problem(["tensorflow-cpu", "tensorflow"]) == (
        "two TensorFlow builds are installed (tensorflow-cpu and tensorflow), and they overwrite each other's files: "
        "pip uninstall -y tensorflow tensorflow-cpu, then pip install 'tapeline[cpu]' or 'tapeline[gpu]'")
