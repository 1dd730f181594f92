"""Optuna as the sampler and the pruner, driven by ask and tell: an in-memory study is rebuilt from the trial
records whenever a decision is needed, so the store stays the one source of truth, and a proposal depends only
on the seed, the trial number and the finished trials (not on how often the driver started)."""

from __future__ import annotations

import math
from typing import Any

from sweeps.space import all_grid_points, choice_label, distributions, from_optuna, to_optuna
from sweeps.state import TrialRecord
from tapeline.config import SweepConfig

FINISHED = ("complete", "pruned", "failed")


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
    """ASHA (Optuna's SuccessiveHalvingPruner: rungs at min_epochs × factor^k), the median rule, or none."""
    import optuna

    if sweep.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.min_epochs,
                                                     reduction_factor=sweep.reduction_factor)
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=sweep.min_epochs)
    return optuna.pruners.NopPruner()


def _rung_attrs(record: TrialRecord, sweep: SweepConfig) -> dict[str, Any]:
    """ASHA's bookkeeping for a trial that never met the pruner (a cache hit): the value at each rung it reached,
    what Optuna's SuccessiveHalvingPruner records when it is asked after every epoch."""
    attrs, rung = {}, 0
    while (step := sweep.min_epochs * sweep.reduction_factor ** rung) in record.intermediate:
        attrs[f"completed_rung_{rung}"] = record.intermediate[step]
        rung += 1
    return attrs


def frozen(record: TrialRecord, sweep: SweepConfig, dists: dict[str, Any], state: str | None = None) -> Any:
    """A record as an Optuna FrozenTrial to add to a study."""
    from optuna.trial import TrialState, create_trial

    state = state or record.state
    optuna_state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL,
                    "running": TrialState.RUNNING}[state]
    value = record.value if state == "complete" and record.value is not None and math.isfinite(record.value) else None
    if state == "complete" and value is None:
        optuna_state = TrialState.FAIL
    derived = _rung_attrs(record, sweep) if sweep.pruner == "asha" and state != "running" else {}
    return create_trial(state=optuna_state, value=value, params=to_optuna(sweep.space, record.params),
                        distributions=dists, intermediate_values=dict(record.intermediate),
                        system_attrs=dict(record.system_attrs) or derived, user_attrs={"number": record.number})


def study_of(sweep: SweepConfig, records: list[TrialRecord], number: int) -> Any:
    """An in-memory study holding the records (by number) and a sampler and pruner seeded for trial `number`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction(sweep), sampler=_make_sampler(sweep, number),
                                pruner=_make_pruner(sweep))
    dists = distributions(sweep.space)
    for record in sorted(records, key=lambda r: r.number):
        study.add_trial(frozen(record, sweep, dists))
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
