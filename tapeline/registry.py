"""The model registry: versioned promoted models, the production pointer, and the runs table.

`artifacts/models/<version>/` holds promoted models; `artifacts/models/production.json` points at
one of them and is only ever replaced atomically. `artifacts/registry.parquet` has one row per run.

On an object store the same names are used, without locks: a version is claimed by creating its
`promotion.json` only if absent, `production.json` is switched with `If-Match` on the ETag read when
the decision was made (a loser re-decides), and each run's row is its own object under `registry/`,
read together, so concurrent runs never lose a row.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tapeline.cache import check_files, fsync_tree, is_inside, quarantine, read_manifest, write_json_atomic
from tapeline.errors import CacheError
from tapeline.store import LocalStore, RemoteStore, Store, open_store, read_json_object

log = logging.getLogger("tapeline.registry")
POINTER = "production.json"
REGISTRY = "registry.parquet"
REGISTRY_OBJECTS = "registry"
MODELS = "models"
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
REGISTRY_COLUMNS = (
    "run_id", "time", "data_fingerprint", "model_fingerprint", "train_fingerprint", "source", "max_epochs",
    "batch_size", "learning_rate", "epochs_run", "test_accuracy", "champion_accuracy", "promoted", "decision",
    "model_path", "sweep", "trial",
)
# A row written before a column existed reads as None there; only these must be present.
REQUIRED_COLUMNS = REGISTRY_COLUMNS[:15]


def _models_dir(artifacts: Path) -> Path:
    """Where promoted model versions live."""
    return artifacts / "models"


def _read_pointer(path: Path) -> dict[str, Any]:
    """production.json as a typed pointer; CacheError naming the file for any other content or kind of file."""
    try:
        with path.open("rb") as f:
            pointer = json.loads(f.read(1 << 20).decode("utf-8"))
    except IsADirectoryError as exc:
        raise CacheError(f"{path} is a directory; remove it, or restore it from a version's promotion.json") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path} is corrupt ({exc}); restore it from a version's promotion.json") from exc
    fields = ("version", "path", "train_fingerprint")
    if not isinstance(pointer, dict) or not all(isinstance(pointer.get(k), str) for k in fields):
        raise CacheError(f"{path} is not a production pointer (it needs string {', '.join(fields)}); restore it "
                         "from a version's promotion.json")
    return pointer


def production(artifacts: Path) -> dict[str, Any] | None:
    """The production pointer ({version, path, train_fingerprint, test_accuracy, ...}) or None."""
    path = _models_dir(artifacts) / POINTER
    if not path.exists() and not path.is_symlink():
        return None
    pointer = _read_pointer(path)
    target = artifacts / pointer["path"]
    if not VERSION_PATTERN.match(target.name) or not is_inside(_models_dir(artifacts), target):
        raise CacheError(f"{path} points at {pointer.get('path')!r}, outside {_models_dir(artifacts)}; "
                         "point it at a version directory models/vNNNN")
    if not target.is_dir():
        raise CacheError(f"{path} points at {pointer['path']}, which is missing; point it at a complete version")
    manifest = read_manifest(target)
    problem = check_files(target, manifest["files"], verify=False)
    if problem is not None:
        raise CacheError(f"production model {pointer['version']} is damaged: {problem}; restore it from "
                         f"{manifest.get('fingerprint') and 'artifacts/export/' + str(manifest['fingerprint'])} or "
                         "point production.json at another version")
    return pointer


def _next_version(artifacts: Path) -> str:
    """`v0001`, `v0002`, …: one past the highest existing version (call under the promotion lock)."""
    numbers = [int(m.group(1)) for p in _models_dir(artifacts).glob("v*") if (m := VERSION_PATTERN.match(p.name))]
    return f"v{max(numbers, default=0) + 1:04d}"


def _publish_version(artifacts: Path, export_dir: Path, record: dict[str, Any]) -> str:
    """Copy an export into a new version directory (complete before it has its name); returns the version."""
    version = _next_version(artifacts)
    staging = _models_dir(artifacts) / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(export_dir, staging)
    (staging / "promotion.json").write_text(json.dumps({**record, "version": version}, indent=2, default=str))
    fsync_tree(staging)
    staging.rename(_models_dir(artifacts) / version)
    return version


def _switch_production(artifacts: Path, pointer: dict[str, Any]) -> None:
    """Point production at a complete version, atomically."""
    write_json_atomic(_models_dir(artifacts) / POINTER, pointer)


def append_run(artifacts: Path, row: dict[str, Any]) -> None:
    """Append one row to registry.parquet (call under the registry lock); atomic replace.

    A corrupt registry is moved aside (kept for inspection, with a warning) and a new one started:
    a run that trained and exported a model must not fail on its bookkeeping.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        existing = read_runs(artifacts, newest_first=False)
    except CacheError as exc:
        log.warning("%s; moved aside to %s, starting a new registry", exc, quarantine(artifacts / REGISTRY))
        existing = []
    rows = [{c: r.get(c) for c in REGISTRY_COLUMNS} for r in [*existing, row]]
    path = artifacts / REGISTRY
    tmp = path.with_name(f".{REGISTRY}.{time.time_ns()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def read_runs(artifacts: Path, newest_first: bool = True) -> list[dict[str, Any]]:
    """Every registry row; a corrupt file is an error naming it, never silently dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = artifacts / REGISTRY
    if not path.exists():
        return []
    try:
        if not path.is_file():
            raise OSError(f"{path} is not a file")
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise CacheError(
            f"{path} is corrupt ({exc}); move it aside (rows are lost only from the table, every run's "
            "outputs stay under artifacts/) and the next run starts a new registry"
        ) from exc
    if rows and not set(REQUIRED_COLUMNS) <= set(rows[0]):
        raise CacheError(f"{path} has another schema (missing {sorted(set(REQUIRED_COLUMNS) - set(rows[0]))}); "
                         "move it aside and the next run starts a new registry")
    # Times have one-second resolution: the append order breaks ties.
    ordered = sorted(enumerate(rows), key=lambda pair: (pair[1]["time"], pair[0]), reverse=newest_first)
    return [row for _, row in ordered]


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The registry as an aligned text table."""
    columns = ("run_id", "time", "train_fingerprint", "epochs_run", "test_accuracy", "champion_accuracy",
               "promoted", "decision")
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


# ---------------------------------------------------------------- any store

def read_production(store: Store) -> tuple[dict[str, Any] | None, str | None]:
    """(production pointer or None, the ETag to switch it conditionally; None for a directory)."""
    if isinstance(store, LocalStore):
        return production(store.path), None
    assert isinstance(store, RemoteStore)
    pointer, etag = read_json_object(store, store.key(MODELS, POINTER))
    if pointer is None:
        return None, None
    version = str(pointer.get("version", ""))
    if not VERSION_PATTERN.match(version) or pointer.get("path") != f"{MODELS}/{version}":
        raise CacheError(f"{store.url(MODELS, POINTER)} points at {pointer.get('path')!r}; point it at a version "
                         "models/vNNNN")
    problem = store.problem(MODELS, version)
    if problem is not None:
        raise CacheError(f"production model {version} is damaged: {problem}; point production.json at another "
                         "version")
    return pointer, etag


def local_version(store: Store, version: str) -> Path:
    """A local directory with a promoted version's files (fetched into the read cache from an object store)."""
    if isinstance(store, LocalStore):
        return _models_dir(store.path) / version
    return store.fetch(MODELS, version)[1]


def _remote_versions(store: RemoteStore) -> list[int]:
    """Numbers of the versions (claimed or complete) under models/."""
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.key(MODELS), refresh=True)]
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for n in names if (m := VERSION_PATTERN.match(n))]


def _publish_remote_version(store: RemoteStore, export_fp: str, record: dict[str, Any]) -> str:
    """Copy a committed export to a new version: claim the number (create-if-absent), copy, commit its manifest."""
    export = store.remote_manifest("export", export_fp)
    if export is None:
        raise CacheError(f"{store.location('export', export_fp)} has no manifest; run the export stage again")
    number = max(_remote_versions(store), default=0) + 1
    while True:
        version = f"v{number:04d}"
        claim = json.dumps({**record, "version": version}, indent=2, default=str).encode()
        if store.put_bytes(store.key(MODELS, version, "promotion.json"), claim, create=True):
            break
        number += 1
    for entry in export["files"]:
        store.fs.copy(store.key("export", export_fp, export["root"], entry["name"]),
                      store.key(MODELS, version, export["root"], entry["name"]))
    manifest = {**export, "fingerprint": version, "export": export_fp}
    store.put_bytes(store.key(MODELS, version, "manifest.json"), json.dumps(manifest, indent=2).encode(), create=True)
    return version


def publish(store: Store, export_dir: Path, export_fp: str, record: dict[str, Any]) -> str:
    """Publish an export as the next version; returns the version."""
    if isinstance(store, LocalStore):
        return _publish_version(store.path, export_dir, record)
    assert isinstance(store, RemoteStore)
    return _publish_remote_version(store, export_fp, record)


def switch(store: Store, pointer: dict[str, Any], etag: str | None) -> bool:
    """Point production at a complete version; on an object store only if production is still what was
    read (`etag`; absent when there was none). False when another run switched it first."""
    if isinstance(store, LocalStore):
        _switch_production(store.path, pointer)
        return True
    assert isinstance(store, RemoteStore)
    data = json.dumps(pointer, indent=2, sort_keys=True, default=str).encode()
    return store.put_bytes(store.key(MODELS, POINTER), data, create=etag is None, if_match=etag)


def record_row(store: Store, row: dict[str, Any]) -> None:
    """Add a run's row: to registry.parquet (call under the registry lock), or as its own object."""
    if isinstance(store, LocalStore):
        append_run(store.path, row)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert isinstance(store, RemoteStore)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in REGISTRY_COLUMNS}]), buffer)
    store.put_bytes(store.key(REGISTRY_OBJECTS, f"{row['run_id']}.parquet"), buffer.getvalue().to_pybytes())


def _remote_runs(store: RemoteStore) -> list[dict[str, Any]]:
    """Every row object under registry/, unordered; an unreadable one is named, never silently dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for name in sorted(store.listing(store.key(REGISTRY_OBJECTS))):
        data = store.read_bytes(store.key(REGISTRY_OBJECTS, name))
        try:
            rows.extend(pq.read_table(pa.BufferReader(data)).to_pylist())
        except (pa.ArrowException, OSError, TypeError) as exc:
            raise CacheError(f"{store.url(REGISTRY_OBJECTS, name)} is corrupt ({exc}); delete it") from exc
    return rows


def runs_of(artifacts: Path | str, newest_first: bool = True) -> list[dict[str, Any]]:
    """The registry of any store, newest first."""
    store = open_store(artifacts)
    if isinstance(store, LocalStore):
        return read_runs(store.path, newest_first)
    assert isinstance(store, RemoteStore)
    rows = _remote_runs(store)
    return sorted(rows, key=lambda r: (r["time"], r["run_id"]), reverse=newest_first)


def registry_version(stage: str, name: str) -> str | None:
    """The registry version a location names: `models/vNNNN` itself, or `serving/N` (TF Serving's copy of
    version N); None for any other place (an export)."""
    if stage == MODELS and VERSION_PATTERN.match(name):
        return name
    if stage == "serving" and name.isdigit():
        return f"v{int(name):04d}"
    return None
