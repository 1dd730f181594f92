"""A sweep killed with SIGKILL, its driver or one trial's process, then started again: no finished trial is
trained again, the interrupted trial resumes from its last epoch checkpoint (at most one epoch more than the
uninterrupted sweep), and the sweep ends with the same trials and the same best trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.driver import run_sweep
from sweeps.state import SweepFiles, TrialRecord, sweep_name
from sweeps.study import best_trial
from tapeline.config import PipelineConfig, load_config
from tapeline.store import open_store
from tapeline.testing import tiny_overrides
from tests.helpers import sweep_processes

pytestmark = pytest.mark.slow
DRIVER = "import sys; from sweeps.driver import run_sweep; from tapeline.config import load_config; " \
         "run_sweep(load_config(None, sys.argv[2:]), sys.argv[1])"


def overrides(idx_dir: Path) -> list[str]:
    return tiny_overrides(f"idx:{idx_dir}", "data.limit=200", "train.max_epochs=3", "train.patience=5",
                          "sweep.space.train.learning_rate={float: [0.0005, 0.02], log: true}",
                          "sweep.space.model.dense_units={choice: [8, 16]}", "sweep.trials=3", "sweep.seed=2")


def start_driver(artifacts: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(artifacts), *args], env=env,  # noqa: S603
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(files: SweepFiles, condition, process: subprocess.Popen, timeout: float = 240) -> TrialRecord:
    """The first trial record meeting `condition`, polled while the driver runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((r for r in files.trials() if condition(r)), None)
        if found is not None:
            return found
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    raise AssertionError("the sweep never got there")


def total_epochs(records: list[TrialRecord]) -> int:
    return sum(sum(r.trained.values()) for r in records)


def in_progress(record: TrialRecord) -> bool:
    """Trial 1 running, one epoch done: trial 0 finished before it."""
    return record.number == 1 and record.state == "running" and record.epochs >= 1


def test_kill_the_driver_or_a_trial_then_rerun(idx_dir: Path, tmp_path: Path) -> None:
    args = overrides(idx_dir)
    config = load_config(None, args)
    reference = run_sweep(config, tmp_path / "reference")
    assert [r.state for r in reference.records].count("complete") >= 1

    # 1. The driver killed while trial 1 trains: its trial process dies with it (a parent-death signal).
    killed = tmp_path / "driver-killed"
    files = SweepFiles(open_store(killed), sweep_name(config))
    driver = start_driver(killed, args)
    wait_for(files, in_progress, driver)
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 10
    while sweep_processes(killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sweep_processes(killed) == []
    before = {r.number: r for r in files.trials()}
    assert before[0].state in ("complete", "pruned") and before[1].state == "running"
    resumed = run_sweep(config, killed)
    assert resumed.records[0].epochs_trained_in(resumed.invocation) == 0  # finished: not trained again
    assert resumed.records[1].epochs_trained_in(resumed.invocation) <= \
        reference.records[1].epochs - before[1].epochs + 1  # from its checkpoint
    check_same_sweep(config, reference.records, resumed.records)
    assert resumed.best.number == reference.best.number

    # 2. One trial's process killed: the driver resumes it (sweep.trial_retries) and the sweep ends as usual.
    trial_killed = tmp_path / "trial-killed"
    files = SweepFiles(open_store(trial_killed), sweep_name(config))
    driver = start_driver(trial_killed, args)
    wait_for(files, in_progress, driver)
    for pid in sweep_processes(trial_killed):
        os.kill(pid, signal.SIGKILL)
    assert driver.wait(timeout=300) == 0, driver.stderr.read().decode()[-3000:]
    after = files.trials()
    assert max(r.attempts for r in after) == 2
    check_same_sweep(config, reference.records, after)


def check_same_sweep(config: PipelineConfig, reference: list[TrialRecord], other: list[TrialRecord]) -> None:
    """The same trials (parameters, states, values), at most one epoch more in all, and the same best trial."""
    assert [(r.number, r.params, r.state, r.epochs) for r in other] == \
        [(r.number, r.params, r.state, r.epochs) for r in reference]
    assert [r.value for r in other] == pytest.approx([r.value for r in reference])
    assert total_epochs(other) <= total_epochs(reference) + 1
    assert best_trial(config.sweep, other).number == best_trial(config.sweep, reference).number
