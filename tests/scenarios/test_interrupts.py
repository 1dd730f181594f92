"""Ctrl-C and SIGTERM, as a terminal and a process manager send them, to real `tapeline run`, `sweep` and `stage`
subprocesses in the middle of training: the command exits within 10 s with one line and 130 or 143, no traceback,
no process of its own left behind (its temporary Prefect API and trial processes included), and the same command
afterwards goes on from the last epoch checkpoint."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.state import SweepFiles, sweep_name
from tapeline.config import load_config
from tapeline.interrupts import MESSAGE
from tapeline.store import open_store
from tapeline.testing import tiny_overrides, write_idx_dir

pytestmark = pytest.mark.slow
TAPELINE = str(Path(sys.executable).with_name("tapeline"))
EXIT_WITHIN = 10.0


@pytest.fixture(scope="module")
def slow_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset big enough that an epoch takes a while, so that a signal lands in the middle of one."""
    return write_idx_dir(tmp_path_factory.mktemp("idx-interrupts"), n_train=4000, n_test=200)


def overrides(idx: Path, epochs: int) -> list[str]:
    return tiny_overrides(f"idx:{idx}", f"train.max_epochs={epochs}", f"train.patience={epochs}",
                          "train.lr_schedule=constant", "train.learning_rate=0.0003")


def command_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The command in a session of its own, as a shell runs a foreground job: a signal to its group is a Ctrl-C."""
    return subprocess.Popen([TAPELINE, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def read_until(process: subprocess.Popen, pattern: str, timeout: float = 240) -> str:
    """The command's output up to the first line matching `pattern` (the command keeps running)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern.encode(), seen):
        assert time.monotonic() < deadline, f"never saw {pattern!r}:\n{seen.decode(errors='replace')[-3000:]}"
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            assert chunk, f"the command ended ({process.wait()}) before {pattern!r}:\n{seen.decode()[-3000:]}"
            seen += chunk
    return seen.decode(errors="replace")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def interrupt(process: subprocess.Popen, signum: int, times: int = 1) -> tuple[int, float, str, list[int]]:
    """Send `signum` to the command's process group (`times` times, 0.3 s apart), as a terminal does; returns (exit
    status, seconds to exit, the rest of its output, the processes it had started that are still alive)."""
    below = descendants(process.pid)
    started = time.monotonic()
    for attempt in range(times):
        if attempt:
            time.sleep(0.3)
        os.killpg(process.pid, signum)
    try:
        rest, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"no exit 60 s after {signal.Signals(signum).name}") from None
    seconds = time.monotonic() - started
    time.sleep(0.5)  # the kernel's SIGKILL of a child whose parent died is asynchronous
    return process.returncode, seconds, rest.decode(errors="replace"), [p for p in below if alive(p)]


def assert_clean_exit(code: int, seconds: float, output: str, left: list[int], status: int) -> None:
    # A signal that lands while the interpreter shuts down meets the default handler Python has put back by then:
    # the command dies of that signal, which a shell reports as the same 128 + N.
    assert code in (status, 128 - status), output[-3000:]
    assert seconds <= EXIT_WITHIN, f"took {seconds:.1f} s"
    assert output.count(MESSAGE) == 1, output[-3000:]
    assert "Traceback" not in output and "this is a bug" not in output, output[-3000:]
    assert left == [], f"processes left behind: {left}"


def test_ctrl_c_stops_a_run_at_once_and_the_same_command_resumes(tmp_path: Path, slow_idx: Path) -> None:
    argv = ["run", "--artifacts", str(tmp_path / "a"), *[a for o in overrides(slow_idx, 8) for a in ("--set", o)]]
    env = command_env(tmp_path)
    run = start(argv, env)
    read_until(run, r"epoch 2: ")
    assert descendants(run.pid), "the run's temporary Prefect API should be running"
    assert_clean_exit(*interrupt(run, signal.SIGINT), status=130)
    staging = [p.name for p in (tmp_path / "a" / "train").iterdir() if p.name.startswith(".partial-")]
    assert len(staging) == 1, "the interrupted epoch's checkpoints stay for the next run"
    assert not [p for p in (tmp_path / "a" / "train").iterdir() if not p.name.startswith(".")], \
        "no train output was committed"

    again = subprocess.run([TAPELINE, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = re.search(r"resumed from .* after epoch (\d+)", again.stderr)
    assert resumed and int(resumed.group(1)) >= 2, again.stderr[-3000:]
    assert "epoch 1: " not in again.stderr
    assert "train" in again.stdout and "test accuracy" in again.stdout


def test_sigterm_stops_a_sweep_and_its_trial_and_the_sweep_goes_on(tmp_path: Path, slow_idx: Path) -> None:
    sets = [*overrides(slow_idx, 6), "sweep.space.model.dense_units={choice: [8, 16]}", "sweep.trials=2",
            "sweep.pruner=none"]
    argv = ["sweep", "--artifacts", str(tmp_path / "a"), *[a for o in sets for a in ("--set", o)]]
    env = command_env(tmp_path)
    files = SweepFiles(open_store(tmp_path / "a"), sweep_name(load_config(None, sets)))
    sweep = start(argv, env)
    read_until(sweep, r"temporary Prefect API on")
    deadline = time.monotonic() + 240
    while not any(r.epochs >= 1 for r in files.trials()):
        assert time.monotonic() < deadline and sweep.poll() is None
        time.sleep(0.1)
    assert len(descendants(sweep.pid)) >= 2, "the API and a trial process should be running"
    assert_clean_exit(*interrupt(sweep, signal.SIGTERM), status=143)
    interrupted = [r for r in files.trials() if r.state == "running"]
    assert len(interrupted) == 1 and interrupted[0].epochs >= 1
    assert not list(Path("/tmp").glob(f"tapeline-sweep-*{files.name}*"))

    again = subprocess.run([TAPELINE, *argv, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    records = files.trials()
    assert [r.state for r in records] == ["complete", "complete"]
    assert records[interrupted[0].number].epochs == 6
    assert sum(records[interrupted[0].number].trained.values()) == 6, "no epoch of the interrupted trial trained twice"


def test_a_second_ctrl_c_ends_a_single_stage_at_once(tmp_path: Path, slow_idx: Path) -> None:
    sets = overrides(slow_idx, 30)
    argv = ["--artifacts", str(tmp_path / "a"), *[a for o in sets for a in ("--set", o)]]
    env = command_env(tmp_path)
    for name in ("data", "model"):
        subprocess.run([TAPELINE, "stage", name, *argv], env=env, check=True, capture_output=True, timeout=300)
    stage = start(["stage", "train", *argv], env)
    read_until(stage, r"epoch 1: ")
    assert_clean_exit(*interrupt(stage, signal.SIGINT, times=2), status=130)


def committed_shards(artifacts: Path) -> list[Path]:
    folder = artifacts / "scores" / "v0001" / "shards"
    # A `.partial-*` staging directory may hold its manifest already: committed is the rename that follows.
    return [p for p in folder.iterdir() if not p.name.startswith(".") and (p / "manifest.json").exists()] \
        if folder.is_dir() else []


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_scoring_run_loses_at_most_the_shards_in_flight(tmp_path: Path, slow_idx: Path,
                                                                   signum: int) -> None:
    from stages.pipeline import run_all
    from tapeline.config import load_config
    from tapeline.testing import png_bytes, synthetic_images

    artifacts = tmp_path / "a"
    assert run_all(load_config(None, overrides(slow_idx, 2)), artifacts)["promotion"].promoted
    folder = tmp_path / "to-score"
    folder.mkdir()
    images, _ = synthetic_images(3000, seed=4)
    for i, image in enumerate(images):
        (folder / f"x{i:05d}.png").write_bytes(png_bytes(image))
    argv = ["score", f"images:{folder}", "--artifacts", str(artifacts), "--set", "score.shard_size=50",
            "--set", "score.workers=1", "--set", "score.batch_size=8", "--json"]
    env = command_env(tmp_path)
    scoring = start(argv, env)
    deadline = time.monotonic() + 240
    while len(committed_shards(artifacts)) < 3:
        assert time.monotonic() < deadline and scoring.poll() is None, scoring.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    if signum == signal.SIGKILL:
        os.killpg(scoring.pid, signal.SIGKILL)
        scoring.wait()
    else:
        assert_clean_exit(*interrupt(scoring, signum), status=130)
    kept = committed_shards(artifacts)
    rows_kept = sum(len(json.loads((p / "manifest.json").read_text())["members"]) for p in kept)
    assert 0 < rows_kept < 3000
    again = subprocess.run([TAPELINE, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["images"] == 3000 and summary["scored"] == 3000 - rows_kept  # the committed shards stay scored
