"""The `tapeline` command line: stage runs, errors, --help, run --json, runs and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from stages.data.readers import load_split

TINY = ["--set", "data.shards=2", "--set", "model.conv_filters=[8, 16]", "--set", "model.dense_units=16",
        "--set", "train.max_epochs=1", "--set", "train.steps_per_execution=4"]


def tiny_args(idx_dir: Path, artifacts: Path) -> list[str]:
    return ["--artifacts", str(artifacts), "--set", f"data.source=idx:{idx_dir}", *TINY]


def test_help_lists_every_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["--help"], ["run", "--help"], ["stage", "--help"], ["plan", "--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        out = capsys.readouterr().out
        assert "data.validation_fraction" in out and "train.restore_best_weights" in out and "--artifacts" in out


def test_stage_needs_its_upstream_first(tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "train", *tiny_args(idx_dir, tmp_path / "a")]) == 2
    assert "run `tapeline stage data` with the same config first" in capsys.readouterr().err
    assert main(["stage", "data", *tiny_args(idx_dir, tmp_path / "a"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["records"] == {"train": 270, "validation": 30, "test": 100}
    assert main(["stage", "train", *tiny_args(idx_dir, tmp_path / "a")]) == 2
    assert "run `tapeline stage model`" in capsys.readouterr().err
    assert main(["stage", "data", *tiny_args(idx_dir, tmp_path / "a")]) == 0
    assert "reused from cache" in capsys.readouterr().out


def test_bad_config_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "data", "--artifacts", str(tmp_path / "a"), "--set", "train.patience=0"]) == 2
    assert "train.patience: Input should be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_run_json_then_runs_and_predict(prefect_api: str, tmp_path: Path, idx_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = tmp_path / "a"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_API_URL": prefect_api}
    done = subprocess.run([str(Path(sys.executable).with_name("tapeline")), "run", *tiny_args(idx_dir, artifacts),
                           "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "oneDNN custom operations" not in done.stderr and "absl::InitializeLog" not in done.stderr
    assert "tapeline.train INFO epoch 1:" in done.stderr  # the rest of stderr still comes through
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # Prefect and stage logs go to stderr
    assert set(summary) >= {"run_id", "stages", "test_accuracy", "promoted", "model_path"}
    assert set(summary["stages"]) == {"data", "validate", "model", "train", "evaluate", "export"}
    assert set(summary["stages"]["train"]) >= {"fingerprint", "cached", "seconds"}
    assert summary["promoted"] is True and Path(summary["model_path"]).is_dir()

    assert main(["runs", "--artifacts", str(artifacts)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("run_id") and table[1].startswith(summary["run_id"])

    images, _ = load_split(Path(summary["stages"]["data"]["path"]), "test")
    np.save(tmp_path / "one.npy", images[0])
    assert main(["predict", "--artifacts", str(artifacts), str(tmp_path / "one.npy")]) == 0
    path, name, probability = capsys.readouterr().out.strip().split("\t")
    assert path == str(tmp_path / "one.npy") and name in {str(i) for i in range(10)} and 0 < float(probability) <= 1
    (tmp_path / "empty.png").write_bytes(b"")
    assert main(["predict", "--artifacts", str(artifacts), str(tmp_path / "empty.png")]) == 2
    assert "empty.png is empty" in capsys.readouterr().err


def test_promotion_step_needs_every_stage_output(tmp_path: Path, idx_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "promotion", *tiny_args(idx_dir, tmp_path / "a")]) == 2
    assert "no valid data output for this config" in capsys.readouterr().err


def test_the_temporary_prefect_server_sends_no_telemetry_unless_the_user_chose() -> None:
    from flows.cli import without_server_telemetry

    chosen: dict[str, str] = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    without_server_telemetry(chosen)
    assert chosen == {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    unset: dict[str, str] = {}
    without_server_telemetry(unset)
    assert unset == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


# ---------------------------------------------------------------- global options

GLOBAL_COMMANDS = [["run"], ["stage", "data"], ["plan"], ["predict", "x.png"], ["runs"]]


@pytest.mark.parametrize("command", GLOBAL_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("where", ["before", "after"])
def test_artifacts_is_taken_before_or_after_the_subcommand(command: list[str], where: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import build_parser

    monkeypatch.delenv("TAPELINE_ARTIFACTS", raising=False)
    given = ["--artifacts", "s3://bucket/prefix"]
    argv = [*given, *command] if where == "before" else [*command, *given]
    assert build_parser().parse_args(argv).artifacts == "s3://bucket/prefix"
    assert build_parser().parse_args(command).artifacts == "artifacts"
    monkeypatch.setenv("TAPELINE_ARTIFACTS", "from-env")
    assert build_parser().parse_args(command).artifacts == "from-env"


@pytest.mark.parametrize("where", ["before", "after"])
def test_plan_uses_the_artifacts_given_before_or_after_it(where: str, tmp_path: Path, idx_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    given = ["--artifacts", str(tmp_path / "chosen")]
    plan = ["plan", "--json", "--set", f"data.source=idx:{idx_dir}"]
    assert main([*given, *plan] if where == "before" else [*plan, *given]) == 0
    data = json.loads(capsys.readouterr().out)["stages"]["data"]
    assert data["path"] == str(tmp_path / "chosen" / "data" / data["fingerprint"])


def test_help_lists_config_keys_only_where_they_are_taken(capsys: pytest.CaptureFixture[str]) -> None:
    for command, lists_keys in (("run", True), ("plan", True), ("predict", False), ("runs", False)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert ("train.max_epochs" in text) is lists_keys, command
        assert "PydanticUndefined" not in text


def test_an_unexpected_error_keeps_its_traceback_and_says_it_is_a_bug(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import flows.cli

    def broken(_args):
        raise KeyError("a tapeline bug")

    monkeypatch.setitem(flows.cli.COMMANDS, "runs", broken)
    assert main(["runs"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'a tapeline bug'" in err
    assert err.rstrip().splitlines()[-1].startswith("tapeline: this is a bug in tapeline, not a problem with your")


def test_an_outcome_error_is_one_line_and_exit_status_1(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import flows.cli
    from flows.cli import all_failed
    from tapeline.errors import OutcomeError

    trials = [{"number": n, "state": "failed", "reason": reason} for n, reason in enumerate([
        "non-finite loss at epoch 1", "did not learn: validation accuracy 0.1000 < 0.1900 (…)",
        "did not learn: validation accuracy 0.0950 < 0.1900 (…)"])]
    message = all_failed(trials)
    assert message == ("every trial of the sweep failed (3 of 3); the commonest reason (2 of them, e.g. trial 1): did "
                       "not learn: validation accuracy 0.1000 < 0.1900 (…)")
    assert all_failed([*trials, {"number": 3, "state": "complete", "reason": None}]) is None

    def failed(_args):
        raise OutcomeError(message)

    monkeypatch.setitem(flows.cli.COMMANDS, "runs", failed)
    assert main(["runs"]) == 1
    err = capsys.readouterr().err
    assert err == f"tapeline: error: {message}\n"


def children_serving_prefect(parent: int) -> list[int]:
    """Processes whose parent is `parent` and that serve Prefect's API app."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent and b"prefect.server.api.server:create_app" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_run_takes_its_temporary_prefect_api_with_it(tmp_path: Path, idx_dir: Path) -> None:
    import signal
    import time

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([str(Path(sys.executable).with_name("tapeline")), "run",  # noqa: S603
                            *tiny_args(idx_dir, tmp_path / "a")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (servers := children_serving_prefect(run.pid)) and time.monotonic() < deadline:
        assert run.poll() is None
        time.sleep(0.1)
    assert len(servers) == 1
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 10
    while alive(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(servers[0])
