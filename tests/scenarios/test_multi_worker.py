"""Training on several workers (MultiWorkerMirroredStrategy): TF_CONFIG, the local launcher, chief-only commits,
a dead worker, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.pipeline import run_data, run_model, run_train
from tapeline.cluster import (
    Cluster,
    check_port_free,
    check_workers,
    launch_local_workers,
    local_tf_configs,
    parse_tf_config,
)
from tapeline.config import load_config
from tapeline.errors import ConfigError, TrainingError
from tapeline.testing import write_idx_dir

ROOT = Path(__file__).resolve().parents[2]
TAPELINE = str(Path(sys.executable).with_name("tapeline"))


@pytest.fixture(scope="module")
def bigger_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 1,200 training images: 120 validation images, so accuracies move in steps of 1/120.
    return write_idx_dir(tmp_path_factory.mktemp("idx1200"), n_train=1200, n_test=200)


def worker_overrides(idx: Path, *more: str) -> list[str]:
    return [f"data.source=idx:{idx}", "data.shards=4", "data.batch_size=32", "data.shuffle_buffer=256",
            "model.conv_filters=[8, 16]", "model.dense_units=16", "model.batch_norm=false",
            "train.steps_per_execution=4", "train.lr_schedule=constant", "train.learning_rate=0.003",
            "train.random_shift=0", "train.random_flip=false", "train.precision=float32", *more]


def cli_args(artifacts: Path, overrides: list[str]) -> list[str]:
    return ["--artifacts", str(artifacts), *(a for o in overrides for a in ("--set", o))]


def prepare_upstream(artifacts: Path, overrides: list[str]) -> None:
    config = load_config(None, overrides)
    run_model(config, run_data(config, artifacts), artifacts)


def start_worker(tf_config: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([TAPELINE, "stage", "train", *args], env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(log: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("tapeline: error:")]


# ---------------------------------------------------------------- TF_CONFIG

def test_tf_config_is_parsed_into_the_cluster() -> None:
    two = '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}'
    assert parse_tf_config(two) == Cluster(("a:1", "b:2"), 1)
    chief = '{"cluster": {"chief": ["c:3"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'
    assert parse_tf_config(chief) == Cluster(("c:3", "a:1"), 1) and not parse_tf_config(chief).is_chief


@pytest.mark.parametrize(("text", "message"), [
    ('{"cluster": ', r"^TF_CONFIG is not valid JSON \(Expecting value at character 12\); expected "),
    ('[]', r'^TF_CONFIG has no "cluster" mapping'),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', r"cluster.worker must be a non-empty"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
     r"^TF_CONFIG task.index 1 is outside cluster.worker \(1 addresses\)$"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', r"address 'a' is not HOST:PORT"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', r"same address twice"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', r"task must be"),
])
def test_malformed_tf_config_is_one_line_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_tf_config(text)
    assert "\n" not in str(info.value)


def test_tf_config_must_agree_with_train_workers() -> None:
    with pytest.raises(ConfigError, match=r"^TF_CONFIG names 2 workers but train.workers is 1; set train.workers=2"):
        check_workers(Cluster(("a:1", "b:2"), 0), 1)
    check_workers(Cluster(("a:1", "b:2"), 0), 2)
    check_workers(None, 3)


def test_a_taken_port_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^TF_CONFIG gives worker 0 \(127.0.0.1:{port}\) port {port}, which "
                                              "another process is using"):
            check_port_free(Cluster((f"127.0.0.1:{port}", "127.0.0.1:1"), 0))


def test_global_batch_must_split_over_the_workers(bigger_idx: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.batch_size=33 does not split evenly over train.workers=2; use a "
                                          r"multiple of 2$"):
        load_config(None, worker_overrides(bigger_idx, "data.batch_size=33", "train.workers=2"))


def upstream_of(config, artifacts: Path):
    data = run_data(config, artifacts)
    return data, run_model(config, data, artifacts)


# ---------------------------------------------------------------- the local launcher

FAKE_WORKER = ("import json, os, sys; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
               "print('hello from', i, flush=True); sys.exit(3 if i == 1 else 0)")


def test_launcher_prefixes_logs_and_names_the_failed_worker(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tapeline.cluster")
    with pytest.raises(TrainingError, match=r"^worker 1 of 2 failed \(exit status 3\); see its \[worker 1\] lines"):
        launch_local_workers([sys.executable, "-c", FAKE_WORKER], 2, timeout=10)
    assert {"[worker 0] hello from 0", "[worker 1] hello from 1"} <= {r.getMessage() for r in caplog.records}


# ---------------------------------------------------------------- real clusters

@pytest.mark.slow
def test_two_local_workers_train_like_one(tmp_path: Path, bigger_idx: Path) -> None:
    overrides = worker_overrides(bigger_idx, "train.max_epochs=6", "train.monitor=val_accuracy", "train.patience=2")
    prepare_upstream(tmp_path, overrides)
    done = subprocess.run([TAPELINE, "stage", "train", "--workers", "2", *cli_args(tmp_path, overrides)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = [p for p in (tmp_path / "train").iterdir() if not p.name.startswith(".")]
    assert len(outputs) == 1 and not list((tmp_path / "train").glob(".partial-*"))  # one commit, nothing left
    manifest = json.loads((outputs[0] / "manifest.json").read_text())
    assert manifest["workers"] == 2 and manifest["input_pipeline"] == "stream"
    rows = pq.read_table(outputs[0] / "history.parquet").to_pylist()
    epochs_run = manifest["summary"]["epochs_run"]
    assert [r["epoch"] for r in rows] == list(range(1, epochs_run + 1))
    ends = re.findall(r"\[worker (\d)\] .*tapeline.train INFO trained (\d+) epochs \(([^)]*)\)", done.stderr)
    assert sorted(ends) == [("0", str(epochs_run), ends[0][2]), ("1", str(epochs_run), ends[0][2])]
    assert "the chief commits the output" in done.stderr

    single = load_config(None, overrides)  # the same global batch and epochs, one worker
    one = run_train(single, *upstream_of(single, tmp_path), tmp_path)
    assert one.epochs_run >= 3
    assert abs(manifest["summary"]["best_val_accuracy"] - one.best_val_accuracy) <= 0.02


@pytest.mark.slow
def test_dead_worker_stops_the_chief_and_a_rerun_resumes(tmp_path: Path, bigger_idx: Path) -> None:
    overrides = worker_overrides(bigger_idx, "data.limit=1200", "train.max_epochs=5", "train.patience=100",
                                 "train.workers=2", "train.worker_timeout_seconds=30")
    prepare_upstream(tmp_path, overrides)
    args = cli_args(tmp_path, overrides)
    configs = local_tf_configs(2)
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    chief, follower = (start_worker(c, args, log) for c, log in zip(configs, logs, strict=True))
    try:
        wait_for_line(logs[0], r"epoch 2: loss", timeout=300)
        time.sleep(0.3)  # into epoch 3
        follower.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        chief.wait(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        for process in (chief, follower):
            if process.poll() is None:
                process.kill()
    chief_log = logs[0].read_text()
    assert chief.returncode == 2, chief_log[-3000:]
    assert stopped_after < 30 + 5
    port = json.loads(configs[1])["cluster"]["worker"][1].rsplit(":", 1)[1]
    chief_address = json.loads(configs[0])["cluster"]["worker"][0]
    # How TensorFlow notices depends on timing: the connection drops at once, the heartbeats stop within 10 s.
    [line] = error_lines(chief_log)
    assert re.fullmatch(
        rf"tapeline: error: worker 1 \(127\.0\.0\.1:{port}\) (dropped its connection|stopped sending heartbeats); "
        rf"worker 0 \({re.escape(chief_address)}\) stopped too\. Run the same command on every worker again: each "
        r"resumes from the chief's last checkpoint", line), line
    finished = int(re.findall(r"epoch (\d+): loss", chief_log)[-1])
    assert not list((tmp_path / "train").glob("[!.]*"))  # nothing committed

    logs = [tmp_path / "w0-again.log", tmp_path / "w1-again.log"]
    processes = [start_worker(c, args, log) for c, log in zip(configs, logs, strict=True)]
    for process, log in zip(processes, logs, strict=True):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    for log in logs:
        assert re.search(rf"resumed from .*ckpt-{finished} after epoch {finished}", log.read_text())
        assert not re.search(rf"epoch {finished}: loss", log.read_text())
    output = next(p for p in (tmp_path / "train").iterdir() if not p.name.startswith("."))
    assert [r["epoch"] for r in pq.read_table(output / "history.parquet").to_pylist()] == [1, 2, 3, 4, 5]


def test_malformed_tf_config_from_the_command_line(tmp_path: Path, bigger_idx: Path) -> None:
    overrides = worker_overrides(bigger_idx, "train.max_epochs=1")
    prepare_upstream(tmp_path, overrides)
    done = subprocess.run([TAPELINE, "stage", "train", *cli_args(tmp_path, overrides)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CONFIG": '{"cluster": {"worker": "127.0.0.1:1"}}'})
    assert done.returncode == 2
    assert error_lines(done.stderr) == ['tapeline: error: TF_CONFIG cluster.worker must be a non-empty list of '
                                        '"host:port" addresses']
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("shards", "by_file"), [(4, True), (1, False)])
def test_worker_shards_split_the_training_data_exactly(tmp_path: Path, bigger_idx: Path, shards: int,
                                                       by_file: bool) -> None:
    from stages.data.layout import split_files
    from stages.data.readers import load_split, make_worker_dataset

    config = load_config(None, worker_overrides(bigger_idx, f"data.shards={shards}"))
    data = run_data(config, tmp_path)
    assert (len(split_files(data.path, "train")) >= 2) == by_file  # by file, else every 2nd record
    images, _ = load_split(data.path, "train", normalize=True)
    shards_seen: list[set[bytes]] = []
    for index in (0, 1):
        batches = make_worker_dataset(data.path, 64, 2, index, shuffle_buffer=256, seed=0, epoch=3)
        assert [len(x) for x, _ in batches.take(3)] == [32, 32, 32]  # global batch 64 over 2 workers
        keys = [x.numpy().tobytes() for x, _ in batches.unbatch().take(2 * len(images))]
        shard = set(keys)
        assert len(set(keys[:len(shard)])) == len(shard)  # one pass visits each of its records once
        shards_seen.append(shard)
    assert not shards_seen[0] & shards_seen[1]
    assert shards_seen[0] | shards_seen[1] == {x.tobytes() for x in images}
