"""TF Serving's layout of production: `<artifacts>/serving/<integer version>/` (saved_model.pb, variables/),
what `tensorflow_model_server --model_base_path=<artifacts>/serving` and KServe's `storageUri` load, plus
`serving/models.config` for `--model_config_file`.

A server polls the base path and loads the highest integer directory as soon as it sees `saved_model.pb`,
so that file comes last: on a directory the version is complete under a hidden name before it is renamed
to its number; on a bucket `saved_model.pb` is the last object uploaded. Version N is models/vNNNN.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tapeline.cache import fsync_tree, write_text_atomic
from tapeline.errors import CacheError
from tapeline.registry import MODELS, VERSION_PATTERN
from tapeline.store import LocalStore, RemoteStore, Store

SAVED_MODEL = "saved_model"  # the export's SavedModel directory, and each serving version's content

SERVING = "serving"
MODEL_CONFIG = "models.config"
SERVED_NAME = "tapeline"
GRAPH_FILE = "saved_model.pb"


def serving_number(version: str) -> int:
    """The integer TF Serving version of a registry version (`v0007` -> 7)."""
    match = VERSION_PATTERN.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a registry version vNNNN")
    return int(match.group(1))


def model_config_text(base_path: str) -> str:
    """A `--model_config_file` serving the versions under `base_path` as model `tapeline`."""
    return ("model_config_list {\n  config {\n"
            f"    name: '{SERVED_NAME}'\n    base_path: '{base_path}'\n    model_platform: 'tensorflow'\n"
            "  }\n}\n")


def files_in_order(names: list[str]) -> list[str]:
    """The SavedModel's files in upload order: saved_model.pb last."""
    return sorted(names, key=lambda name: (name == GRAPH_FILE, name))


def _publish_local(store: LocalStore, version: str) -> Path:
    """Copy models/<version>/saved_model to serving/<N>/ (complete under a hidden name, then renamed)."""
    base = store.path / SERVING
    final = base / str(serving_number(version))
    if final.is_dir():
        return final
    staging = base / f".staging-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    source = store.path / MODELS / version / SAVED_MODEL
    names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    for name in files_in_order(names):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, staging / name)
    fsync_tree(staging)
    staging.rename(final)
    write_text_atomic(base / MODEL_CONFIG, model_config_text(str(base)))
    return final


def publish_remote(store: RemoteStore, version: str) -> str:
    """Copy models/<version>/saved_model/* to serving/<N>/ in the bucket, saved_model.pb last."""
    number = str(serving_number(version))
    manifest = store.remote_manifest(MODELS, version)
    if manifest is None:
        raise CacheError(f"{store.url(MODELS, version)} has no manifest; promote the model again")
    prefix = f"{SAVED_MODEL}/"
    names = [entry["name"][len(prefix):] for entry in manifest["files"] if entry["name"].startswith(prefix)]
    source = store.key(MODELS, version, manifest["root"], SAVED_MODEL)  # a version's files are under its attempt
    for name in files_in_order(names):
        store.fs.copy(f"{source}/{name}", store.key(SERVING, number, name))
    store.put_bytes(store.key(SERVING, MODEL_CONFIG), model_config_text(store.url(SERVING)).encode())
    return store.url(SERVING, number)


def publish_serving(store: Store, version: str, formats: tuple[str, ...]) -> str | None:
    """Publish a promoted version in TF Serving's layout; returns where (a directory or URL), or None when the
    export has no SavedModel (`export.formats` without saved_model)."""
    if SAVED_MODEL not in formats and "tflite" not in formats:  # the TFLite file is converted from a SavedModel
        return None
    if isinstance(store, RemoteStore):
        return publish_remote(store, version)
    assert isinstance(store, LocalStore)
    return str(_publish_local(store, version))
