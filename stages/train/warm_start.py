"""Warm start (`train.init_from`): which exported model the train stage starts from, and whether it fits.

`production` is the current production model (none yet: train from scratch, and say so); any other value
is the path or URL of an exported model directory (`<artifacts>/export/<fp>` or `<artifacts>/models/vNNNN`).
What training starts from is part of the train fingerprint (its train fingerprint), so a promotion makes the
next scheduled run start from the new champion. Reading it costs one manifest read: no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tapeline.cache import manifest_problem, read_manifest
from tapeline.config import PipelineConfig
from tapeline.errors import ConfigError, TapelineError
from tapeline.registry import local_version, read_production, registry_version
from tapeline.results import InputSpec
from tapeline.store import Store, is_remote, normalize_root, open_store

KEY = "train.init_from"
FIX = "use --set train.init_from=none to train from scratch"


def _split_location(text: str) -> tuple[str | Path, str, str]:
    """(store root, stage, fingerprint) of an exported model's directory path or URL."""
    if is_remote(text):
        root, stage, fp = text.rstrip("/").rsplit("/", 2)
        return root, stage, fp
    path = Path(normalize_root(text))
    return path.parent.parent, path.parent.name, path.name


STORE_PLACES = ("models", "serving", "export")


def _init_location(text: str, store: Store) -> str:
    """Where `train.init_from` points: a URL or an absolute path as given; `models/vNNNN`, `serving/N` or
    `export/<fingerprint>` inside the artifacts (a directory or a bucket), as `tapeline runs` and the docs name
    them; any other relative path from the current directory."""
    parts = Path(text).parts
    if is_remote(text) or Path(text).is_absolute() or len(parts) != 2 or parts[0] not in STORE_PLACES:
        return text
    return store.location(parts[0], parts[1])


def init_identity(config: PipelineConfig, store: Store, _upstream: Mapping[str, str]) -> dict[str, Any] | None:
    """What the train stage starts from, as its fingerprint sees it: {"from", "version"?, "train_fingerprint",
    "location"}; None when it trains from scratch (`none`, or `production` with no production model yet)."""
    wanted = config.train.init_from
    if wanted == "none":
        return None
    if wanted == "production":
        pointer, _ = read_production(store)
        if pointer is None:
            return None
        return {"from": "production", "version": pointer["version"], "train_fingerprint": pointer["train_fingerprint"]}
    location = _init_location(wanted, store)
    root, stage, fp = _split_location(location)
    version = registry_version(stage, fp)
    manifest = _version_manifest(open_store(root), version) if version else open_store(root).manifest(stage, fp)
    train_fp = ((manifest or {}).get("upstream") or {}).get("train")
    if manifest is None or not isinstance(train_fp, str):
        tried = "" if location == wanted else f" (looked in the artifacts: {location})"
        raise ConfigError(f"{KEY}={wanted}: not a complete exported model{tried}: no valid manifest with a train "
                          f"fingerprint; give models/vNNNN or serving/N (in the artifacts), the path or URL of an "
                          f"export directory, production, or {FIX}")
    return {"from": wanted, "train_fingerprint": train_fp, **({"version": version} if version else {})}


def _version_manifest(store: Store, version: str) -> dict[str, Any] | None:
    """A promoted version's manifest (the export's, copied with it) when the version is complete, else None. A
    version directory keeps its export's manifest, whose fingerprint is the export's, not `vNNNN`."""
    try:
        directory = local_version(store, version)
    except TapelineError:
        return None
    if not directory.is_dir() or manifest_problem(directory, check_name=False) is not None:
        return None
    return read_manifest(directory)


def _init_model_dir(identity: Mapping[str, Any], store: Store) -> Path:
    """A local directory with the starting model's model.keras and model_card.json (fetched when remote)."""
    if identity["from"] == "production":
        return local_version(store, identity["version"])
    root, stage, fp = _split_location(_init_location(identity["from"], store))
    if "version" in identity:
        return local_version(open_store(root), identity["version"])
    return open_store(root).fetch(stage, fp)[1]


def describe(identity: Mapping[str, Any] | None, wanted: str) -> str:
    """One phrase for the log: what training starts from."""
    if identity is None:
        return "from scratch" + (" (train.init_from=production, but there is no production model yet)"
                                 if wanted == "production" else "")
    where = f"production {identity['version']}" if identity["from"] == "production" else identity["from"]
    return f"warm-started from {where} (train fingerprint {identity['train_fingerprint']})"


def _incompatibility(card_spec: Mapping[str, Any], spec: InputSpec, theirs: list[tuple[str, tuple[int, ...]]],
                    ours: list[tuple[str, tuple[int, ...]]]) -> str | None:
    """What differs between the starting model and this run's (input shape, class names, architecture), or None."""
    if tuple(card_spec.get("shape", ())) != spec.shape:
        return f"its input shape is {tuple(card_spec.get('shape', ()))}, this run's is {spec.shape}"
    if tuple(card_spec.get("class_names", ())) != spec.class_names:
        return (f"its class names are {', '.join(card_spec.get('class_names', ()))}, this run's are "
                f"{', '.join(spec.class_names)}")
    if len(theirs) != len(ours):
        return f"other architecture: the starting model has {len(theirs)} weight tensors, this run's {len(ours)}"
    for (their_name, their_shape), (our_name, our_shape) in zip(theirs, ours, strict=True):
        if their_shape != our_shape:
            theirs_named = "" if their_name == our_name else f" ({their_name})"
            return (f"other architecture: weight {our_name} is {our_shape} here, {their_shape} in the starting "
                    f"model{theirs_named}")
    return None


def warm_start(model: Any, identity: Mapping[str, Any], store: Store, spec: InputSpec) -> None:
    """Set `model`'s weights to the starting model's; ConfigError naming what differs when it does not fit."""
    import json

    import keras

    directory = _init_model_dir(identity, store)
    where = f"{KEY}={identity['from']}" + (f" ({identity['version']})" if "version" in identity else "")
    try:
        card_spec = json.loads((directory / "model_card.json").read_text())["input_spec"]
        source = keras.models.load_model(directory / "model.keras", compile=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same answer
        raise ConfigError(f"{where}: cannot load its model ({type(exc).__name__}: {exc}); {FIX}") from None
    theirs = [(w.path, tuple(w.shape)) for w in source.weights]
    ours = [(w.path, tuple(w.shape)) for w in model.weights]
    problem = _incompatibility(card_spec, spec, theirs, ours)
    if problem is not None:
        raise ConfigError(f"{where} does not fit this run: {problem}; {FIX}")
    model.set_weights(source.get_weights())
