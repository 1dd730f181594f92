"""Optuna as the sampler and the pruner, driven by ask and tell: an in-memory study is rebuilt from the trial
records whenever a decision is needed, so the store stays the one source of truth, and a proposal depends only
on the seed, the trial number and the finished trials (not on how often the driver started)."""

from __future__ import annotations

import math
from typing import Any

from sweeps.space import all_grid_points, choice_label, distributions, from_optuna, longest_schedule, to_optuna
from sweeps.state import TrialRecord
from tapeline.config import SweepConfig, TrainConfig, epoch_limit

FINISHED = ("complete", "pruned", "failed")


STUDY_NAME = "tapeline-sweep"  # Hyperband puts a trial in a bracket by a hash of the study's name and its number


def direction(sweep: SweepConfig) -> str:
    """`maximize` or `minimize` (auto: accuracies up, losses down)."""
    if sweep.direction != "auto":
        return sweep.direction
    return "minimize" if sweep.metric.endswith("loss") else "maximize"


def _trial_seed(sweep: SweepConfig, number: int) -> int:
    """The sampler's seed for proposing trial `number`: the sweep's seed and the number, nothing else."""
    return (sweep.seed * 1_000_003 + number * 7_919) % (2**31 - 1)


def startup_trials(sweep: SweepConfig) -> int:
    """Random trials before TPE models the results: Optuna's 10, fewer for a short sweep (a quarter of it, at
    least 2), so that a 20-trial sweep spends most of its budget where TPE points."""
    return max(2, min(10, sweep.trials // 4))


def _make_sampler(sweep: SweepConfig, number: int) -> Any:
    """A fresh sampler seeded for trial `number`."""
    import optuna

    seed = _trial_seed(sweep, number)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(sweep), multivariate=True)


def _make_pruner(sweep: SweepConfig) -> Any:
    """ASHA (Optuna's SuccessiveHalvingPruner: rungs at min_epochs × factor^k), Hyperband (brackets of ASHA that
    start pruning at min_epochs × factor^b, so a slow starter gets a bracket that judges it late; the longest
    schedule is taken from the first complete trial), the median rule, or none."""
    import optuna

    if sweep.pruner == "hyperband":
        return _record_hyperband(sweep)
    if sweep.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.min_epochs,
                                                     reduction_factor=sweep.reduction_factor)
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=sweep.min_epochs)
    return optuna.pruners.NopPruner()


def _record_hyperband(sweep: SweepConfig) -> Any:
    """Optuna's HyperbandPruner placing a trial in a bracket by its sweep number (the records' `number` user
    attribute), not by its index in the study: a study is rebuilt from the records for each decision, and a
    trial's index there changes as trials finish, its number never."""
    from types import SimpleNamespace

    import optuna

    class RecordHyperband(optuna.pruners.HyperbandPruner):
        def _get_bracket_id(self, study: Any, trial: Any) -> int:
            number = trial.user_attrs.get("number", trial.number)
            return super()._get_bracket_id(study, SimpleNamespace(number=number))

    return RecordHyperband(min_resource=sweep.min_epochs, max_resource="auto",
                           reduction_factor=sweep.reduction_factor)


def schedule_step(epoch: int, length: int, longest: int) -> int:
    """Epoch `epoch` of a trial whose schedule ends at epoch `length`, counted in epochs of the sweep's longest
    schedule (`longest`): the same fraction of any two schedules is the same step."""
    return epoch * max(longest, length) // length


def pruner_steps(record: TrialRecord, sweep: SweepConfig) -> dict[int, float]:
    """The record's reports as the pruner sees them: by epoch, or (`sweep.rungs: schedule`) by the fraction of its
    schedule each epoch ends, as `schedule_step` counts it."""
    if sweep.rungs == "epochs" or not record.intermediate:
        return dict(record.intermediate)
    train = TrainConfig.model_validate(record.config["train"])
    length, longest = epoch_limit(train), longest_schedule(sweep.space, train)
    return {schedule_step(epoch, length, longest): value for epoch, value in record.intermediate.items()}


def _rung_attrs(steps: dict[int, float], sweep: SweepConfig, first_rate: int = 0) -> dict[str, Any]:
    """ASHA's bookkeeping for a trial that never met the pruner (a cache hit): at each rung it reached, the value
    of its first report at or past the rung, what Optuna's SuccessiveHalvingPruner records when it is asked after
    every report (rungs at min_epochs × factor^(first_rate + k); a Hyperband bracket b starts at rate b)."""
    attrs, rung = {}, 0
    while reached := [s for s in steps if s >= sweep.min_epochs * sweep.reduction_factor ** (first_rate + rung)]:
        attrs[f"completed_rung_{rung}"] = steps[min(reached)]
        rung += 1
    return attrs


def _hyperband_brackets(sweep: SweepConfig, records: list[TrialRecord]) -> dict[int, int]:
    """Each record's Hyperband bracket, as the pruner will place it in a study of these records. Optuna keeps no
    bracket per trial (it hashes the study's name and the trial's number, once the longest schedule is known), so
    a scratch study and the pruner's private helpers tell it: a cache hit needs the rungs of its own bracket."""
    import optuna

    scratch = optuna.create_study(study_name=STUDY_NAME, direction=direction(sweep), pruner=_make_pruner(sweep))
    dists = distributions(sweep.space)
    for record in records:
        scratch.add_trial(frozen(record, sweep, dists))
    pruner = scratch.pruner
    pruner._try_initialization(scratch)
    if not pruner._pruners:
        return {}
    return {trial.user_attrs["number"]: pruner._get_bracket_id(scratch, trial) for trial in scratch.trials}


def frozen(record: TrialRecord, sweep: SweepConfig, dists: dict[str, Any], state: str | None = None,
           bracket: int | None = None) -> Any:
    """A record as an Optuna FrozenTrial to add to a study (with the rungs of its Hyperband `bracket` when it
    never met the pruner)."""
    from optuna.trial import TrialState, create_trial

    state = state or record.state
    optuna_state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL,
                    "running": TrialState.RUNNING}[state]
    value = record.value if state == "complete" and record.value is not None and math.isfinite(record.value) else None
    if state == "complete" and value is None:
        optuna_state = TrialState.FAIL
    steps, derived = pruner_steps(record, sweep), {}
    if state != "running" and (sweep.pruner == "asha" or bracket is not None):
        derived = _rung_attrs(steps, sweep, bracket or 0)
    return create_trial(state=optuna_state, value=value, params=to_optuna(sweep.space, record.params),
                        distributions=dists, intermediate_values=steps,
                        system_attrs=dict(record.system_attrs) or derived, user_attrs={"number": record.number})


def study_of(sweep: SweepConfig, records: list[TrialRecord], number: int) -> Any:
    """An in-memory study holding the records (by number) and a sampler and pruner seeded for trial `number`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, direction=direction(sweep),
                                sampler=_make_sampler(sweep, number), pruner=_make_pruner(sweep))
    dists = distributions(sweep.space)
    ordered = sorted(records, key=lambda r: r.number)
    brackets = _hyperband_brackets(sweep, ordered) if sweep.pruner == "hyperband" else {}
    for record in ordered:
        study.add_trial(frozen(record, sweep, dists, bracket=brackets.get(record.number)))
    return study


def propose(sweep: SweepConfig, records: list[TrialRecord], number: int) -> dict[str, Any]:
    """Trial `number`'s parameters, from the finished trials (the grid: the number-th point of a seeded order)."""
    import warnings

    if sweep.sampler == "grid":
        return grid_point(sweep, number)
    known = [r for r in records if r.number < number and r.state in FINISHED]
    study = study_of(sweep, known, number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns that multivariate TPE is experimental
        trial = study.ask(distributions(sweep.space))
    earlier = [r for r in records if r.number < number]
    return _unseen_choices_first(sweep, from_optuna(sweep.space, trial.params), earlier, number)


def _unseen_choices_first(sweep: SweepConfig, params: dict[str, Any], earlier: list[TrialRecord], number: int
                         ) -> dict[str, Any]:
    """Each choice's values all drawn before any repeats: where the sampler drew a value an earlier trial (finished
    or not) has while some value of that choice none has, one of those is taken instead (seeded by the trial), so
    a small sweep never spends a trial on a repeat while a choice is still untried. (Independent samplers draw
    repeats often: 2 values, 2 random trials, one time in two.)"""
    import random

    chosen = dict(params)
    rng = random.Random(_trial_seed(sweep, number))
    for key, spec in sweep.space.items():
        if "choice" not in spec:
            continue
        used = {choice_label(r.params[key]) for r in earlier if key in r.params}
        unused = [value for value in spec["choice"] if choice_label(value) not in used]
        if unused and choice_label(chosen[key]) in used:
            chosen[key] = rng.choice(unused)
    return chosen


def grid_point(sweep: SweepConfig, number: int) -> dict[str, Any]:
    """The grid's `number`-th point in an order shuffled by the seed: every point once, in the same order on every
    start (Optuna's GridSampler picks among the points no trial holds, which a study rebuilt from records would
    have to be told through its private attributes)."""
    import random

    points = all_grid_points(sweep.space)
    random.Random(sweep.seed).shuffle(points)
    return points[number % len(points)]


def prune_decision(sweep: SweepConfig, records: list[TrialRecord], me: TrialRecord) -> tuple[bool, dict[str, Any]]:
    """Whether the pruner stops `me` at its last reported epoch, judged against the other trials' reports, and
    the attributes the pruner keeps for `me` (ASHA's completed rungs)."""
    others = [r for r in records if r.number != me.number]
    study = study_of(sweep, others, me.number)
    study.add_trial(frozen(me, sweep, distributions(sweep.space), state="running"))
    trial = study.trials[-1]
    pruned = bool(study.pruner.prune(study, trial))
    return pruned, dict(study.trials[-1].system_attrs)


def best_trial(sweep: SweepConfig, records: list[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the best value (the lowest number among equals), None when none completed."""
    complete = [r for r in records if r.state == "complete" and r.value is not None and math.isfinite(r.value)]
    if not complete:
        return None
    sign = -1.0 if direction(sweep) == "maximize" else 1.0
    return min(complete, key=lambda r: (sign * float(r.value or 0.0), r.number))
