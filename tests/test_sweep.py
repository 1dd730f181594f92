"""Sweeps: the space and its errors, proposals that depend only on the seed, the number and the finished trials,
duplicate configs trained once, trials cached from a plain run, pruning in the tape loop that a later run
continues exactly, a second driver refused, a diverging trial recorded as failed, and the winner through the gate
in the Prefect flow (the `tapeline sweep --json` contract)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.graph import run_stage
from sweeps.driver import run_sweep
from sweeps.space import all_grid_points, check_space, shaping_trials, trial_config
from sweeps.state import DriverLease, SweepBusyError, SweepFiles, TrialRecord, sweep_name
from sweeps.study import best_trial, propose
from sweeps.trial import read_history
from tapeline.config import PipelineConfig, load_config
from tapeline.errors import ConfigError, TrainingPaused
from tapeline.store import open_store
from tapeline.testing import tiny_config
from tests.helpers import sweep_processes

LR = "sweep.space.train.learning_rate={float: [0.001, 0.02], log: true}"
UNITS = "sweep.space.model.dense_units={choice: [8, 16]}"


def sweep_config(idx_dir: Path, *more: str) -> PipelineConfig:
    """A tiny base config with a sweep section."""
    return tiny_config(f"idx:{idx_dir}", "train.max_epochs=2", "data.limit=200", *more)


# --- the space ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "message"), [
    ("{float: [0.1]}", "sweep.space.train.learning_rate: "),
    ("{float: [0.1, 0.01]}", "sweep.space.train.learning_rate: "),
    ("{float: [0.0, 0.1], log: true}", "sweep.space.train.learning_rate: "),
    ("{uniform: [0.1, 0.2]}", "sweep.space.train.learning_rate: "),
    ("{choice: []}", "sweep.space.train.learning_rate: "),
])
def test_a_malformed_distribution_is_one_line_naming_the_key(idx_dir: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        sweep_config(idx_dir, f"sweep.space.train.learning_rate={entry}")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("entry", "message"), [
    ("sweep.space.train.learning_rate={float: [-1.0, 0.1]}",
     "sweep.space.train.learning_rate: the value -1.0 is not valid"),
    ("sweep.space.model.dense_units={choice: [16, 'many']}", "sweep.space.model.dense_units: the value 'many' is not"),
    ("sweep.space.train.no_such_key={int: [1, 3]}", "sweep.space.train.no_such_key: the value 1 is not valid"),
])
def test_an_impossible_space_is_refused_before_any_work(idx_dir: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_space(sweep_config(idx_dir, entry))


def test_an_empty_space_and_a_float_grid_are_refused(idx_dir: Path) -> None:
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        check_space(sweep_config(idx_dir))
    with pytest.raises(ConfigError, match="sweep.sampler=grid needs choices or an int range"):
        check_space(sweep_config(idx_dir, LR, "sweep.sampler=grid"))


def test_a_trial_config_is_the_base_with_its_parameters_set(idx_dir: Path) -> None:
    base = sweep_config(idx_dir, UNITS, "sweep.space.model.conv_filters={choice: [[4, 8], [8, 16]]}")
    trial = trial_config(base, {"model.dense_units": 8, "model.conv_filters": [4, 8]})
    assert (trial.model.dense_units, list(trial.model.conv_filters)) == (8, [4, 8])
    assert trial.train == base.train and trial.data == base.data
    with pytest.raises(ConfigError, match=r"sweep.space: the trial model.dense_units=-3 is not a valid config"):
        trial_config(base, {"model.dense_units": -3})


def test_the_grid_lists_every_point_once(idx_dir: Path) -> None:
    base = sweep_config(idx_dir, UNITS, "sweep.space.data.batch_size={int: [16, 48], step: 16}", "sweep.sampler=grid",
                        "sweep.trials=50")
    points = [propose(base.sweep, [], n) for n in range(6)]
    assert sorted(json.dumps(p, sort_keys=True) for p in points) == \
        sorted(json.dumps(p, sort_keys=True) for p in all_grid_points(base.sweep.space))
    assert len(all_grid_points(base.sweep.space)) == 6


def test_a_proposal_depends_on_the_seed_the_number_and_the_finished_trials_only(idx_dir: Path) -> None:
    sweep = sweep_config(idx_dir, LR, UNITS, "sweep.trials=8").sweep
    finished: list[TrialRecord] = []
    for n in range(3):  # each proposed from the ones before it, as the driver proposes
        finished.append(TrialRecord(number=n, params=propose(sweep, finished, n), config={}, state="complete",
                                    value=0.5 + n / 10, intermediate={1: 0.4, 2: 0.5 + n / 10}))
    assert {r.params["model.dense_units"] for r in finished[:2]} == {8, 16}  # every choice before a repeat
    running = TrialRecord(number=3, params=propose(sweep, finished, 3), config={})
    # Every choice has been drawn: a running trial changes nothing.
    assert propose(sweep, finished, 4) == propose(sweep, [*finished, running], 4)
    assert propose(sweep, finished, 4) == propose(sweep, list(reversed(finished)), 4)
    other_seed = sweep.model_copy(update={"seed": 1})
    assert propose(sweep, finished, 4) != propose(other_seed, finished, 4)
    assert best_trial(sweep, finished).number == 2


def test_the_sweeps_name_depends_on_the_search_not_its_budget(idx_dir: Path) -> None:
    name = sweep_name(sweep_config(idx_dir, LR))
    assert name == sweep_name(sweep_config(idx_dir, LR, "sweep.trials=99", "sweep.parallel=2"))
    assert name != sweep_name(sweep_config(idx_dir, LR, "sweep.seed=3"))
    assert name != sweep_name(sweep_config(idx_dir, LR, "train.patience=7"))
    assert sweep_name(sweep_config(idx_dir, LR, "sweep.name=nightly-lr")) == "nightly-lr"


def test_a_sweep_continues_with_more_trials_or_on_a_work_pool_but_not_with_another_search(idx_dir: Path,
                                                                                          tmp_path: Path) -> None:
    from tapeline.errors import TapelineError

    local = sweep_config(idx_dir, LR, "sweep.name=lr")
    files = SweepFiles(open_store(tmp_path), sweep_name(local))
    files.check_definition(local)
    files.check_definition(sweep_config(idx_dir, LR, "sweep.name=lr", "sweep.trials=40",
                                        "sweep.deployment=training-pipeline/manual"))
    assert sweep_name(local.model_copy(update={"sweep": local.sweep.model_copy(update={"name": None})})) == \
        sweep_name(sweep_config(idx_dir, LR, "sweep.deployment=training-pipeline/manual"))
    with pytest.raises(TapelineError, match="sweep lr at .* searched another search"):
        files.check_definition(sweep_config(idx_dir, LR, "sweep.name=lr", "sweep.seed=3"))


# --- trials ------------------------------------------------------------------------------------------------------


def history_values(rows: list[dict]) -> list[dict]:
    """History rows without wall-clock columns."""
    return [{k: v for k, v in row.items() if "second" not in k and "time" not in k} for row in rows]


def test_a_pruned_trial_continued_later_has_the_uninterrupted_history(idx_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=3", "train.patience=5")
    uninterrupted = run_train(config, tmp_path / "a")
    paused_at: list[int] = []

    def prune_after_first(history: list[dict]) -> bool:
        paused_at.append(len(history))
        return len(history) == 1

    with pytest.raises(TrainingPaused):
        run_train(config, tmp_path / "b", should_stop=prune_after_first)
    assert paused_at == [1]
    continued = run_train(config, tmp_path / "b")
    assert history_values(read_history(continued.path)) == history_values(read_history(uninterrupted.path))
    assert len(read_history(continued.path)) == 3


def run_train(config: PipelineConfig, artifacts: Path, should_stop=None):
    results: dict = {}
    for name in ("data", "validate", "model"):
        results[name] = run_stage(name, config, artifacts, results)
    return run_stage("train", config, artifacts, results, should_stop=should_stop)


@pytest.mark.slow  # trials in processes of their own
def test_duplicate_configs_train_once_and_a_plain_run_is_a_cache_hit(idx_dir: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    base = sweep_config(idx_dir, "sweep.space.model.dense_units={choice: [8, 12]}", "sweep.trials=4",
                        "sweep.parallel=2", "sweep.pruner=none", "sweep.sampler=random", "sweep.seed=1")
    plain = trial_config(base, {"model.dense_units": 12})
    run_train(plain, artifacts)  # as `tapeline run` would have trained it before the sweep
    outcome = run_sweep(base, artifacts)
    by_units: dict[int, list[TrialRecord]] = {}
    for record in outcome.records:
        by_units.setdefault(record.params["model.dense_units"], []).append(record)
    assert [r.state for r in outcome.records] == ["complete"] * 4
    # 0 and 1 draw both values before any repeat (1 is the plain run's cache hit); 2 is proposed while 0 trains.
    assert [r.params["model.dense_units"] for r in outcome.records] == [8, 12, 8, 12]
    trained = {units: sum(r.epochs_trained_in(outcome.invocation) for r in records)
               for units, records in by_units.items()}
    assert trained == {8: 2, 12: 0}  # one training of 2 epochs, however often proposed; 12 was trained before
    assert by_units[12][0].cached and [r.cached for r in by_units[8]].count(False) == 1
    assert len({r.train_fingerprint for r in outcome.records}) == len(by_units)
    again = run_sweep(base, artifacts)
    assert [r.epochs_trained_in(again.invocation) for r in again.records] == [0, 0, 0, 0]
    assert again.best.number == outcome.best.number


def test_a_second_driver_is_refused_and_a_dead_ones_sweep_is_taken_over(idx_dir: Path, tmp_path: Path) -> None:
    base = sweep_config(idx_dir, UNITS)
    files = SweepFiles(open_store(tmp_path / "artifacts"), sweep_name(base))
    with DriverLease(files, 60), pytest.raises(SweepBusyError) as info:
        run_sweep(base, tmp_path / "artifacts")
    assert f"sweep {files.name} is being run by another driver" in str(info.value)
    assert "\n" not in str(info.value)
    dead = {"token": "x", "host": __import__("socket").gethostname(), "pid": 2**22 + 7, "heartbeat": 0.0}
    files.write(json.dumps(dead).encode(), "driver.json")
    with DriverLease(files, 60):  # the same host and a pid that is gone: taken over at once
        assert json.loads(files.read("driver.json"))["pid"] != dead["pid"]


@pytest.mark.slow  # trials in processes of their own
def test_a_diverging_trial_is_recorded_as_failed_and_the_sweep_goes_on(idx_dir: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    base = sweep_config(idx_dir, "sweep.space.train.learning_rate={choice: [1.0e+9, 0.003]}", "sweep.sampler=grid",
                        "sweep.pruner=none", "train.lr_schedule=constant")
    before = set(Path(tempfile.gettempdir()).glob("tapeline-sweep-*"))
    with caplog.at_level("WARNING", logger="tapeline.sweep"):
        outcome = run_sweep(base, tmp_path / "artifacts")
    states = {r.params["train.learning_rate"]: r for r in outcome.records}
    assert states[1.0e9].state == "failed" and "non-finite loss at epoch 1" in states[1.0e9].reason
    assert states[0.003].state == "complete" and outcome.best is states[0.003]
    assert f"sweep {outcome.name}: the grid has 2 configurations, fewer than sweep.trials=20; the sweep runs each " \
           "once" in caplog.text
    logs = tmp_path / "artifacts" / "sweeps" / outcome.name / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["trial-00000.log", "trial-00001.log", "workers.log"]
    assert set(Path(tempfile.gettempdir()).glob("tapeline-sweep-*")) == before  # nothing left in /tmp


def test_every_trial_that_shapes_the_model_is_checked_before_any_work(idx_dir: Path) -> None:
    base = sweep_config(idx_dir, "sweep.space.data.image_size={choice: [[28, 28], [4096, 4096]]}")
    with pytest.raises(ConfigError) as info:
        check_space(base)
    assert str(info.value).startswith("sweep.space: the trial data.image_size=[4096, 4096] cannot run: model: the "
                                      "built-in CNN for 4096x4096x1 images has ")
    assert "lower data.image_size or data.batch_size" in str(info.value)
    space = {"model.dense_units": {"int": [8, 64]}, "data.batch_size": {"choice": [16, 32, 64]},
             "train.learning_rate": {"float": [0.001, 0.1]}}
    assert shaping_trials(space) == [{"model.dense_units": u, "data.batch_size": b} for u in (8, 64)
                                     for b in (16, 32, 64)]
    wide = {f"model.params.p{i}": {"choice": [1, 2, 3]} for i in range(5)}  # 243 combinations: ends and singles
    checked = shaping_trials(wide)
    assert len(checked) == 5 * 3 + 2 and checked[-1] == {f"model.params.p{i}": 3 for i in range(5)}


def test_an_impossible_trial_is_one_line_from_the_command_and_nothing_is_written(
        idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    artifacts = tmp_path / "artifacts"
    sets = ["sweep.space.data.image_size={choice: [[28, 28], [4096, 4096]]}", "sweep.trials=2"]
    assert main(["sweep", "--artifacts", str(artifacts), *[a for o in sets for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("tapeline: error: sweep.space: the trial data.image_size=[4096, 4096] cannot run: ")
    assert not artifacts.exists()


def test_every_choice_is_drawn_before_any_repeats(idx_dir: Path) -> None:
    for sampler in ("tpe", "random"):
        for seed in range(6):
            sweep = sweep_config(idx_dir, LR, "sweep.space.model.dense_units={choice: [8, 16, 24]}", "sweep.trials=9",
                                 f"sweep.sampler={sampler}", f"sweep.seed={seed}").sweep
            records: list[TrialRecord] = []
            for n in range(3):  # recorded before they start: the ones still running count too
                records.append(TrialRecord(number=n, params=propose(sweep, records, n), config={}))
            assert sorted(r.params["model.dense_units"] for r in records) == [8, 16, 24], (sampler, seed)


# --- the flow and the command ------------------------------------------------------------------------------------


def test_a_second_driver_is_refused_in_seconds_before_any_prefect_api(idx_dir: Path, tmp_path: Path) -> None:
    sets = ["preset=v1", f"data.source=idx:{idx_dir}", "data.limit=200", UNITS]
    files = SweepFiles(open_store(tmp_path / "artifacts"), sweep_name(load_config(None, sets)))
    command = [str(Path(sys.executable).with_name("tapeline")), "sweep", "--artifacts", str(tmp_path / "artifacts"),
               *[a for o in sets for a in ("--set", o)]]
    with DriverLease(files, 60):
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    assert done.returncode == 2 and seconds <= 3.0, (seconds, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1].startswith(f"tapeline: error: sweep {files.name} is being run by "
                                                           "another driver (pid ")
    assert "Prefect" not in done.stderr and not (tmp_path / "artifacts" / "data").exists()


def test_a_sweep_whose_trials_all_failed_exits_1_naming_the_commonest_reason(harness, idx_dir: Path,
                                                                             tmp_path: Path) -> None:
    from flows.cli import build_parser, command_sweep
    from tapeline.errors import OutcomeError
    from tapeline.registry import runs_of

    sets = ["preset=v1", f"data.source=idx:{idx_dir}", "data.limit=200", "data.batch_size=32",
            "model.conv_filters=[8, 16]", "train.max_epochs=2", "train.lr_schedule=constant",
            "sweep.space.train.learning_rate={choice: [1000.0, 2000.0]}", "sweep.trials=2", "sweep.pruner=none"]
    artifacts = tmp_path / "artifacts"
    args = build_parser().parse_args(["sweep", "--artifacts", str(artifacts), *[a for o in sets for a in ("--set", o)]])
    with redirect_stdout(io.StringIO()), pytest.raises(OutcomeError) as info:
        command_sweep(args)  # `tapeline sweep` prints it as `tapeline: error: …` and exits with 1 (test_cli.py)
    assert info.value.exit_status == 1
    assert str(info.value).startswith("every trial of the sweep failed (2 of 2); the commonest reason (2 of them, "
                                      "e.g. trial 0): did not learn: validation "), str(info.value)
    assert runs_of(artifacts) == [] and not (artifacts / "models").exists()  # nothing evaluated, nothing promoted


def test_the_winner_goes_through_the_gate_and_the_json_contract(harness, idx_dir: Path, tmp_path: Path) -> None:
    from flows.cli import main
    from tapeline.registry import runs_of

    artifacts = tmp_path / "artifacts"
    common = ["--artifacts", str(artifacts), "--json"]
    for override in ("preset=v1", f"data.source=idx:{idx_dir}", "data.limit=200", "data.batch_size=32",
                     "model.conv_filters=[8, 16]", "train.max_epochs=2", "sweep.trials=3", "sweep.seed=4", LR):
        common += ["--set", override]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["sweep", *common]) == 0
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    assert set(summary) >= {"sweep", "trials", "best", "promoted", "decision"}
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2]
    for trial in summary["trials"]:
        assert set(trial) == {"number", "params", "value", "state", "cached", "epochs_trained", "reason"}
        assert list(trial["params"]) == ["train.learning_rate"]
        assert trial["state"] in ("complete", "pruned") and trial["cached"] is False
        assert 1 <= trial["epochs_trained"] <= 2
    best = summary["best"]
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    assert best["value"] == max(t["value"] for t in complete) and summary["promoted"] is True
    rows = runs_of(artifacts)
    assert [(r["sweep"], r["trial"]) for r in rows] == [(summary["sweep"], best["number"])]
    # The exported model is the trial's model: the best config, run alone, is all cache hits.
    rerun = load_config(Path(best["config"]))
    from stages.graph import plan

    assert plan(rerun, artifacts)["would_run"] == []
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", *common]) == 0
    planned = json.loads(out.getvalue())
    assert list(planned["stages"]) == ["data", "validate"] and planned["would_run"] == []  # not the base config's
    section = planned["sweep"]
    assert (section["name"], section["recorded"], section["to_propose"]) == (summary["sweep"], 3, 0)
    assert [t["cached"] for t in section["trials"]] == [t["state"] == "complete" for t in summary["trials"]]
    assert {t["rerun"] for t in section["trials"]} == {"nothing (finished)"}
    sweep_dir = artifacts / "sweeps" / summary["sweep"]
    assert (sweep_dir / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_dir / "slices.png").stat().st_size > 1000


def test_hyperband_judges_a_trial_in_its_own_bracket_the_same_way_every_time() -> None:
    from sweeps.study import prune_decision, study_of

    sweep = load_config(None, ["sweep.space.train.learning_rate={float: [0.0001, 0.1], log: true}",
                               "sweep.pruner=hyperband", "sweep.min_epochs=1", "sweep.reduction_factor=3"]).sweep
    done = [TrialRecord(number=n, params={"train.learning_rate": 0.001 * (n + 1)}, config={}, state="complete",
                        value=0.8 + 0.01 * n, intermediate={e: 0.7 + 0.01 * n + 0.01 * e for e in range(1, 10)})
            for n in range(9)]
    study = study_of(sweep, done, 9)
    pruner = study.pruner
    pruner._try_initialization(study)  # the longest schedule, 9 epochs, from the complete trials: 3 brackets
    assert pruner._n_brackets == 3

    def bracket(number: int) -> int:
        return pruner._get_bracket_id(study, SimpleNamespace(number=number, user_attrs={"number": number}))

    numbers = range(9, 200)
    eager = next(n for n in numbers if bracket(n) == 0)  # the bracket whose first rung is at epoch 1
    late = next(n for n in numbers if bracket(n) == 2)  # the bracket that judges only at epoch 9
    for number, expected in ((eager, True), (late, False)):
        poor = TrialRecord(number=number, params={"train.learning_rate": 0.1}, config={}, intermediate={1: 0.1})
        decisions = {prune_decision(sweep, done, poor)[0] for _ in range(3)}
        assert decisions == {expected}, (number, decisions)


def schedule_sweep(*more: str) -> PipelineConfig:
    """A base config searching the cosine schedule's length (20 or 30 epochs) under ASHA with rungs at 4 and 12."""
    return load_config(None, ["train.max_epochs=30", "sweep.space.train.decay_epochs={choice: [20, 30]}",
                              "sweep.pruner=asha", "sweep.min_epochs=4", "sweep.reduction_factor=3", *more])


def test_schedule_steps_count_each_trial_in_epochs_of_the_longest_schedule() -> None:
    from sweeps.space import longest_schedule
    from sweeps.study import schedule_step

    assert [schedule_step(e, 20, 30) for e in (1, 2, 3, 8, 20)] == [1, 3, 4, 12, 30]
    assert [schedule_step(e, 30, 30) for e in range(1, 31)] == list(range(1, 31))
    base = schedule_sweep()
    assert longest_schedule(base.sweep.space, base.train) == 30
    assert longest_schedule(base.sweep.space, base.train.model_copy(update={"max_epochs": 25})) == 25  # the cap
    plateau = schedule_sweep("sweep.space.train.lr_schedule={choice: [cosine, plateau]}",
                             "sweep.space.train.max_epochs={int: [10, 40]}")
    assert longest_schedule(plateau.sweep.space, plateau.train) == 40  # plateau runs to max_epochs' top


@pytest.mark.parametrize(("rungs", "pruned"), [("epochs", True), ("schedule", False)])
def test_schedule_rungs_judge_a_longer_schedule_where_its_rate_has_fallen_as_far(rungs: str, pruned: bool) -> None:
    from sweeps.space import distributions
    from sweeps.study import frozen, prune_decision

    base = schedule_sweep(f"sweep.rungs={rungs}")
    sweep = base.sweep

    def record(number: int, decay: int, state: str, intermediate: dict[int, float]) -> TrialRecord:
        params = {"train.decay_epochs": decay}
        return TrialRecord(number=number, params=params, config=trial_config(base, params).model_dump(mode="json"),
                           state=state, value=intermediate[max(intermediate)], intermediate=intermediate)

    # Three complete 20-epoch trials: 0.815 + n/1000 at epoch 3 (the first at 4/30 of their schedule), 0.820 + n/1000
    # at epoch 4. A 30-epoch trial at its epoch 4 (4/30 of its schedule) has 0.818: behind them at the same epoch,
    # ahead of them at the same fraction.
    done = [record(n, 20, "complete", {e: 0.800 + 0.005 * e + 0.001 * n for e in range(1, 21)}) for n in range(3)]
    long = record(3, 30, "running", {e: 0.802 + 0.004 * e for e in range(1, 5)})
    assert prune_decision(sweep, done, long)[0] is pruned
    rung_values = frozen(done[0], sweep, distributions(sweep.space)).system_attrs
    at_epochs = (3, 8) if rungs == "schedule" else (4, 12)  # steps 4 and 12: epochs 3 and 8 of 20 by the schedule
    assert rung_values == {f"completed_rung_{k}": done[0].intermediate[e] for k, e in enumerate(at_epochs)}


def test_schedule_rungs_name_a_new_sweep_and_epoch_rungs_keep_the_old_names() -> None:
    from sweeps.state import _search_of

    assert "rungs" not in _search_of(schedule_sweep())  # sweeps written before sweep.rungs existed keep their names
    assert _search_of(schedule_sweep("sweep.rungs=schedule"))["rungs"] == "schedule"
    assert sweep_name(schedule_sweep()) != sweep_name(schedule_sweep("sweep.rungs=schedule"))


# --- one copy of a trial trains ------------------------------------------------------------------------------------


def claimed_trial(artifacts: str, idx_dir: Path) -> tuple[PipelineConfig, SweepFiles]:
    """A sweep of one trial whose record exists (as if another driver had proposed it)."""
    base = sweep_config(idx_dir, "sweep.space.model.dense_units={choice: [8]}", "sweep.trials=1", "sweep.pruner=none")
    files = SweepFiles(open_store(artifacts), sweep_name(base))
    config = trial_config(base, {"model.dense_units": 8})
    files.save(TrialRecord(number=0, params={"model.dense_units": 8}, config=config.model_dump(mode="json")))
    return base, files


def check_claim_refuses_a_second_copy(artifacts: str, idx_dir: Path) -> None:
    from sweeps.state import TrialClaim, TrialClaimedError
    from sweeps.trial import run_trial

    _, files = claimed_trial(artifacts, idx_dir)
    with TrialClaim(files, 0, 60):
        with pytest.raises(TrialClaimedError, match=r"^trial 0 of sweep .* is being trained by pid \d+ on "):
            run_trial(files.store, files, 0, "second")
        assert files.trial(0).attempts == 0 and not TrialClaim(files, 0, 60).is_free()
    assert TrialClaim(files, 0, 60).is_free()  # released when its holder ends
    stale = {"token": "x", "host": "another-machine", "pid": 1, "started": 0.0, "heartbeat": time.time() - 120}
    files.write(json.dumps(stale).encode(), "claims", "00000.json")
    claim = TrialClaim(files, 0, 60)
    assert claim.is_free()  # another machine's holder, silent past sweep.lease_seconds: taken over
    with claim:
        assert json.loads(files.read("claims", "00000.json"))["token"] == claim.token


def test_a_claimed_trial_is_refused_to_a_second_copy_on_a_directory(idx_dir: Path, tmp_path: Path) -> None:
    check_claim_refuses_a_second_copy(str(tmp_path / "artifacts"), idx_dir)


@pytest.mark.slow
def test_a_claimed_trial_is_refused_to_a_second_copy_on_a_bucket(s3_url: str, idx_dir: Path) -> None:
    check_claim_refuses_a_second_copy(s3_url, idx_dir)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["directory", "bucket"])
def test_a_driver_waits_for_a_trial_another_process_trains_and_trains_nothing(
        where: str, idx_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import threading

    from stages.graph import known_fingerprint
    from sweeps.state import TrialClaim

    artifacts = str(tmp_path / "artifacts") if where == "directory" else request.getfixturevalue("s3_url")
    base, files = claimed_trial(artifacts, idx_dir)
    claim = TrialClaim(files, 0, 60)
    claim.__enter__()  # a work pool's flow run, say, trains trial 0 now

    def finish_elsewhere() -> None:
        time.sleep(4)
        files.save(files.trial(0).model_copy(update={"state": "complete", "value": 0.5, "epochs": 2}))
        claim.__exit__(None, None, None)

    other = threading.Thread(target=finish_elsewhere)
    other.start()
    outcome = run_sweep(base, artifacts)
    other.join()
    [record] = outcome.records
    assert (record.state, record.value, record.epochs_trained_in(outcome.invocation)) == ("complete", 0.5, 0)
    train = known_fingerprint("train", trial_config(base, record.params), artifacts)
    assert open_store(artifacts).manifest("train", train) is None  # nothing trained here: the holder's outcome


# --- warm workers ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_warm_workers_train_each_trial_as_a_run_alone_would(idx_dir: Path, tmp_path: Path) -> None:
    from stages.pipeline import run_data, run_model, run_train

    base = sweep_config(idx_dir, "sweep.space.model.dense_units={choice: [8, 12, 16]}", "sweep.sampler=grid",
                        "sweep.trials=3", "sweep.pruner=none", "sweep.trials_per_worker=2")
    outcome = run_sweep(base, tmp_path / "artifacts")
    assert [r.state for r in outcome.records] == ["complete"] * 3
    logs = tmp_path / "artifacts" / "sweeps" / outcome.name / "logs"
    assert (logs / "workers.log").exists() and len(list(logs.glob("trial-*.log"))) == 3
    for record in outcome.records:  # the same config trained alone, in this process, in a store of its own
        config = trial_config(base, record.params)
        alone = tmp_path / f"alone-{record.number}"
        data = run_data(config, alone)
        trained = run_train(config, data, run_model(config, data, alone), alone)
        swept = read_history(open_store(tmp_path / "artifacts").fetch("train", record.train_fingerprint)[1])
        assert [(r["loss"], r["val_accuracy"]) for r in read_history(trained.path)] == \
            [(r["loss"], r["val_accuracy"]) for r in swept], record.params


def test_a_worker_leaves_after_its_share_of_trials_or_past_its_memory_bound() -> None:
    from sweeps.worker import should_leave

    assert not should_leave(1, 8, first_rss=900, rss=900, max_growth_mib=256)  # the first trial sets the base
    assert should_leave(8, 8, first_rss=900, rss=900, max_growth_mib=256)
    assert not should_leave(3, 8, first_rss=900, rss=1156, max_growth_mib=256)
    assert should_leave(3, 8, first_rss=900, rss=1156.5, max_growth_mib=256)


def _traced_keras_train_step() -> weakref.ref:
    """A weak reference to the graph of a traced Keras train step whose model and optimizer are gone."""
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    def step(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x) ** 2)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    return weakref.ref(tf.function(step, autograph=False).get_concrete_function(tf.TensorSpec([None, 4])).graph)


def test_a_traced_train_step_s_registered_gradients_are_forgotten_and_its_graph_freed() -> None:
    import gc

    import keras

    from sweeps.worker import forget_traced_gradients, registered_gradients

    keep = registered_gradients()
    graph = _traced_keras_train_step()
    added = registered_gradients() - keep
    assert added and all(name.startswith("CustomGradient-") for name in added)  # what holds the graph (TF's leak)
    keras.backend.clear_session(free_memory=True)
    gc.collect()
    assert graph() is not None  # still held by TensorFlow's global gradient registry
    assert forget_traced_gradients(keep) == len(added)
    gc.collect()
    assert registered_gradients() == keep and graph() is None


def test_a_worker_that_says_it_leaves_gets_no_further_trial_though_it_still_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from queue import Queue

    from sweeps.driver import WarmLauncher, Worker, _pump

    # a stand-in worker: answers its trial with "leaving", then takes its time to exit, as a worker holding a
    # gigabyte does; a trial written to it now would be lost
    script = "import sys, time; n = sys.stdin.readline().strip(); print(n, 0, 'leaving', flush=True); time.sleep(2)"
    launcher = WarmLauncher("unused", "unused", "unused", 1, tmp_path, 8, 256.0)
    spawned: list[Worker] = []

    def spawn() -> Worker:
        process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, bufsize=1)
        answers: Queue[str | None] = Queue()
        threading.Thread(target=_pump, args=(process.stdout, answers), daemon=True).start()
        spawned.append(Worker(process, answers))
        launcher.workers.append(spawned[-1])
        return spawned[-1]

    monkeypatch.setattr(launcher, "_spawn", spawn)
    first = launcher.start(0)
    assert launcher.wait_any({0: first}) == (0, 0)
    assert first.worker.process.poll() is None and first.worker.leaving  # still exiting
    second = launcher.start(1)
    assert second.worker is not first.worker and len(spawned) == 2
    launcher.close()
    assert all(w.process.poll() is not None for w in spawned)


@pytest.mark.slow
def test_a_worker_is_replaced_after_its_trials_and_a_killed_one_is_a_resumed_trial(
        idx_dir: Path, tmp_path: Path) -> None:
    import signal
    import threading

    artifacts = tmp_path / "artifacts"
    base = sweep_config(idx_dir, "sweep.space.model.dense_units={choice: [8, 12, 16]}", "sweep.sampler=grid",
                        "sweep.trials=3", "sweep.pruner=none", "sweep.trials_per_worker=2",
                        "train.max_epochs=4", "train.patience=10")
    files = SweepFiles(open_store(artifacts), sweep_name(base))
    outcome: list = []
    driver = threading.Thread(target=lambda: outcome.append(run_sweep(base, artifacts)))
    driver.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ((trial := files.trial(0)) and trial.epochs >= 1 and
                                               trial.state == "running"):
        time.sleep(0.05)
    [pid] = sweep_processes(artifacts)
    os.kill(pid, signal.SIGKILL)  # mid-trial, an epoch checkpointed
    driver.join(timeout=600)
    [result] = outcome
    assert [r.state for r in result.records] == ["complete"] * 3
    # the killed worker's attempt, then a fresh worker's; trials 1 and 2 each trained once: no trial is handed to
    # a worker that has said it leaves
    assert [r.attempts for r in result.records] == [2, 1, 1]
    workers_log = (artifacts / "sweeps" / result.name / "logs" / "workers.log").read_text()
    assert workers_log.count("worker leaves after 2 trials") == 1  # trials 0 and 1; trial 2 in a fresh worker
    assert sweep_processes(artifacts) == []  # none left behind
    from stages.pipeline import run_data, run_model, run_train

    config = trial_config(base, result.records[0].params)  # the resumed trial ends as one run alone does
    data = run_data(config, tmp_path / "alone")
    alone = run_train(config, data, run_model(config, data, tmp_path / "alone"), tmp_path / "alone")
    swept = open_store(artifacts).fetch("train", result.records[0].train_fingerprint)[1]
    assert [r["val_loss"] for r in read_history(alone.path)] == [r["val_loss"] for r in read_history(swept)]


EXAMPLE_SWEEPS = sorted((Path(__file__).resolve().parents[1] / "examples" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLE_SWEEPS, ids=lambda path: path.name)
def test_each_example_sweep_is_a_valid_config_with_a_valid_space(example: Path) -> None:
    config = load_config(example)
    check_space(config)  # raises ConfigError naming the key
    assert config.sweep.space and config.sweep.trials >= 8
    for params in shaping_trials(config.sweep.space):  # every config at the ends of the shaping keys is valid
        trial_config(config, params)
