"""The model a scoring run uses: the exported SavedModel (the served artifact, uint8 in), never a checkpoint; named
by registry version or export directory, and loaded once per process however many shards that process scores."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tapeline.cache import manifest_problem, read_manifest
from tapeline.errors import ScoreError, TapelineError
from tapeline.predict import Resize, card_resize, resolve_model
from tapeline.registry import MODELS, local_version, read_production, registry_version
from tapeline.results import InputSpec
from tapeline.store import Store, open_store

_LOADED: dict[str, Any] = {}
_LOADING = threading.Lock()


class ModelRef(BaseModel):
    """Which model scores, as a worker on any machine can find it: a registry version of a store, or an export
    directory (local to the machine that names it)."""

    model_config = ConfigDict(frozen=True)

    artifacts: str
    version: str | None = None  # vNNNN
    directory: str | None = None  # an export directory

    @property
    def label(self) -> str:
        """The `model_version` of the rows: the registry version, or `export-<fingerprint>`."""
        if self.version is not None:
            return self.version
        return f"export-{Path(str(self.directory)).name}"


class ScoringModel(BaseModel):
    """A resolved model: where its SavedModel lies on this machine, what it takes, what it scored on its test split,
    and the train output (hence the data) it came from."""

    model_config = ConfigDict(frozen=True)

    ref: ModelRef
    saved_model: Path
    spec: InputSpec
    interpolation: str
    crop_to_aspect_ratio: bool
    export_fingerprint: str
    train_fingerprint: str | None
    test_accuracy: float | None

    @property
    def resize(self) -> Resize:
        """How the model's training images were resized (what `predict` applies too)."""
        return Resize(self.interpolation, self.crop_to_aspect_ratio)


def model_ref(wanted: str | None, store: Store) -> ModelRef:
    """`--model`: none or `production` (the production model), `models/vNNNN` / `vNNNN` / `serving/N` (a registry
    version), or the path of an export directory. ScoreError in one line when there is no such model."""
    root = str(store.root)
    if wanted in (None, "production"):
        pointer, _ = read_production(store)
        if pointer is None:
            raise ScoreError(f"no production model under {root}: run `tapeline run` first, or pass --model "
                             "models/vNNNN or an export directory")
        return ModelRef(artifacts=root, version=pointer["version"])
    text = str(wanted).rstrip("/")
    place, _, name = text.rpartition("/")
    version = registry_version(place or MODELS, name) if place in ("", MODELS, "serving") else None
    if version is not None:
        return ModelRef(artifacts=root, version=version)
    directory = Path(text).expanduser()
    if not directory.is_dir():
        raise ScoreError(f"--model {wanted}: no such model: give models/vNNNN (`tapeline runs` lists them), "
                         "serving/N, production, or an export directory")
    return ModelRef(artifacts=root, directory=str(directory.resolve()))


def resolve(ref: ModelRef) -> ScoringModel:
    """The model of `ref` on this machine (a version is fetched into the read cache from a bucket)."""
    store = open_store(ref.artifacts)
    if ref.version is not None:
        try:
            directory = local_version(store, ref.version)
        except TapelineError:
            directory = None
        if directory is None or not directory.is_dir() or manifest_problem(directory, check_name=False) is not None:
            raise ScoreError(f"model version {ref.version} does not exist under {ref.artifacts} (or is incomplete); "
                             "`tapeline runs` lists the versions")
    else:
        directory = Path(str(ref.directory))
    try:
        saved_model, spec = resolve_model(directory, ref.artifacts)
        manifest = read_manifest(directory)
    except TapelineError as exc:
        raise ScoreError(f"--model {ref.version or ref.directory}: {exc}") from None
    resize = card_resize(saved_model)
    return ScoringModel(ref=ref, saved_model=saved_model, spec=spec, interpolation=resize.interpolation,
                        crop_to_aspect_ratio=resize.crop_to_aspect_ratio,
                        export_fingerprint=str(manifest.get("fingerprint")),
                        train_fingerprint=(manifest.get("upstream") or {}).get("train"),
                        test_accuracy=manifest.get("test_accuracy"))


def serving_function(saved_model: Path) -> Any:
    """The SavedModel's `serving_default` signature, loaded once per process (threads share it)."""
    key = str(saved_model)
    with _LOADING:
        if key not in _LOADED:
            import tensorflow as tf

            _LOADED[key] = tf.saved_model.load(key).signatures["serving_default"]
        return _LOADED[key]


def load_in_background(saved_model: Path) -> threading.Thread:
    """Start importing TensorFlow and loading the SavedModel in a thread (join it before Prefect is imported): a
    command that must wait for its temporary Prefect API to start loads the model meanwhile, off the run's clock."""

    def load() -> None:
        try:
            serving_function(saved_model)
        except Exception:  # noqa: BLE001 - the shard that needs the model loads it again and reports the error
            _LOADED.pop(str(saved_model), None)

    thread = threading.Thread(target=load, name="tapeline-model-preload")
    thread.start()
    return thread
