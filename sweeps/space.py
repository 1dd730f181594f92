"""The search space: `sweep.space` entries as Optuna distributions, and a trial's parameters applied to the base
config, validated by the pipeline's own config model."""

from __future__ import annotations

import itertools
import json
from typing import Any

from tapeline.config import PipelineConfig, TrainConfig, epoch_limit, validate_config
from tapeline.errors import ConfigError

GRID_LIMIT = 100_000


def choice_label(value: Any) -> str:
    """A choice as Optuna stores it: its JSON text (lists such as filter widths are not Optuna values)."""
    return json.dumps(value, sort_keys=True)


def distribution(spec: dict[str, Any]) -> Any:
    """The Optuna distribution of one (already validated) `sweep.space` entry."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if "choice" in spec:
        return CategoricalDistribution([choice_label(v) for v in spec["choice"]])
    if "int" in spec:
        low, high = spec["int"]
        return IntDistribution(low, high, step=spec.get("step", 1), log=spec.get("log", False))
    low, high = spec["float"]
    return FloatDistribution(float(low), float(high), log=spec.get("log", False))


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every entry of the space as an Optuna distribution, by key."""
    return {key: distribution(spec) for key, spec in space.items()}


def to_optuna(space: dict[str, dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as written in a trial record -> Optuna's values (choices as their labels)."""
    return {k: choice_label(v) if "choice" in space[k] else v for k, v in params.items()}


def from_optuna(space: dict[str, dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's values -> the parameters as a config takes them (choices decoded), in the space's key order."""
    return {k: json.loads(params[k]) if "choice" in space[k] else params[k] for k in space}


def _grid_values(key: str, spec: dict[str, Any]) -> list[Any]:
    """The points of one entry on a grid: the choices, or every step of an int range; a float range has none."""
    if "choice" in spec:
        return [choice_label(v) for v in spec["choice"]]
    if "int" in spec:
        low, high = spec["int"]
        return list(range(low, high + 1, spec.get("step", 1)))
    raise ConfigError(f"sweep.space.{key}: sweep.sampler=grid needs choices or an int range, not a float range; "
                      f"list the values ({{choice: [...]}}) or use sweep.sampler=tpe")


def grid(space: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """Each entry's grid values (Optuna's labels for choices), by key."""
    return {key: _grid_values(key, spec) for key, spec in space.items()}


def _grid_size(space: dict[str, dict[str, Any]]) -> int:
    """How many points the grid has (capped at GRID_LIMIT + 1)."""
    size = 1
    for values in grid(space).values():
        size = min(size * len(values), GRID_LIMIT + 1)
    return size


def _set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a config tree; a key whose parents are not sections is an error naming it."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"sweep.space.{key}: {'.'.join(parts[: i + 1])} is not a section; use a config key "
                              f"such as train.learning_rate or model.params.NAME")
        node = child
    node[parts[-1]] = value


def _base_tree(base: PipelineConfig) -> dict[str, Any]:
    """The base config as a tree for trials: every key explicit, the preset already applied, no sweep section."""
    tree = base.model_dump(mode="json", exclude={"sweep"})
    tree["preset"] = None
    return tree


def trial_config(base: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The base config with a trial's parameters set, validated by the pipeline's config model; its sweep
    section is the base's (it shapes no stage). ConfigError names the parameters when the result is invalid."""
    tree = _base_tree(base)
    for key, value in params.items():
        _set_key(tree, key, value)
    try:
        config = validate_config(tree)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(f"sweep.space: the trial {shown} is not a valid config: "
                          f"{str(exc).removeprefix('invalid configuration:').strip()}") from None
    return config.model_copy(update={"sweep": base.sweep})


def _extremes(spec: dict[str, Any]) -> list[Any]:
    """The values of an entry that bound what it can propose: both ends of a range, every choice."""
    if "choice" in spec:
        return list(spec["choice"])
    kind = "int" if "int" in spec else "float"
    return list(spec[kind])


SCHEDULE_KEYS = ("max_epochs", "decay_epochs", "lr_schedule")  # the train keys that set where training ends


def longest_schedule(space: dict[str, dict[str, Any]], train: TrainConfig) -> int:
    """The most epochs a trial of the sweep can train (`epoch_limit`) over the values the space can give the
    schedule's keys (a range by its ends: the limit never falls as max_epochs or decay_epochs grows); `train` is
    any trial's train section (the keys not searched are the base's)."""
    options = [_extremes(space[f"train.{key}"]) if f"train.{key}" in space else [getattr(train, key)]
               for key in SCHEDULE_KEYS]
    return max(epoch_limit(train.model_copy(update=dict(zip(SCHEDULE_KEYS, point, strict=True))))
               for point in itertools.product(*options))


def check_space(base: PipelineConfig) -> None:
    """Before any work: the space is not empty, and each entry's bounds and choices give a valid config on their
    own (ConfigError naming the key: an unknown key, a value out of the key's range, a wrong type)."""
    space = base.sweep.space
    if not space:
        raise ConfigError("sweep.space is empty: give at least one key to search, e.g. --set "
                          "'sweep.space.train.learning_rate={float: [0.0003, 0.01], log: true}'")
    for key, spec in space.items():
        for value in _extremes(spec):
            try:
                trial_config(base, {key: value})
            except ConfigError as exc:
                detail = str(exc).split(" is not a valid config: ", 1)[-1]
                raise ConfigError(f"sweep.space.{key}: the value {value!r} is not valid ({detail})") from None
    if base.sweep.sampler == "grid" and _grid_size(space) > GRID_LIMIT:
        raise ConfigError(f"sweep.space: the grid has more than {GRID_LIMIT} points; use sweep.sampler=tpe")
    _check_shaping_trials(base)


# The keys whose values decide the model and what training holds in memory: each distinct trial config over them
# is checked before any work, as `tapeline run` checks its one config.
SHAPING_KEYS = ("data.image_size", "data.batch_size", "data.color_mode", "data.class_names", "model.")
MAX_CHECKED_TRIALS = 64


def shaping_trials(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The parameters of every distinct trial config the space can produce over its shaping keys (ranges by their
    two ends). Beyond MAX_CHECKED_TRIALS combinations: each key's values alone, and the corners where every key
    is at its first or at its last value."""
    keys = [k for k in space if k.startswith(SHAPING_KEYS)]
    values = {key: _extremes(space[key]) for key in keys}
    combos = [dict(zip(keys, point, strict=True)) for point in itertools.islice(
        itertools.product(*values.values()), MAX_CHECKED_TRIALS + 1)]
    if len(combos) <= MAX_CHECKED_TRIALS:
        return combos if keys else []
    singles = [{key: value} for key in keys for value in values[key]]
    return [*singles, {k: v[0] for k, v in values.items()}, {k: v[-1] for k, v in values.items()}]


def _check_shaping_trials(base: PipelineConfig) -> None:
    """Every trial config that changes the model or its size, checked before any work as `tapeline run` checks one
    (sizes against this machine's memory, the user's model built, checked and loaded back): ConfigError naming the
    trial's values."""
    from stages.model import check_before_work

    for params in shaping_trials(base.sweep.space):
        try:
            check_before_work(trial_config(base, params))
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"sweep.space: the trial {shown} cannot run: {exc}") from None


def planned_trials(base: PipelineConfig) -> int:
    """How many trials the sweep has: sweep.trials, at most the grid's size with the grid sampler."""
    sweep = base.sweep
    return min(sweep.trials, _grid_size(sweep.space)) if sweep.sampler == "grid" else sweep.trials


def all_grid_points(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every point of the grid as parameters, in a fixed order (the grid sampler shuffles it by the seed)."""
    values = grid(space)
    return [from_optuna(space, dict(zip(values, point, strict=True))) for point in itertools.product(*values.values())]
