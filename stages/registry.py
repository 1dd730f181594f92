"""The model registry: versioned promoted models, the production pointer, and the runs table.

`artifacts/models/<version>/` holds promoted models; `artifacts/models/production.json` points at
one of them and is only ever replaced atomically. `artifacts/registry.parquet` has one row per run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from stages.cache import check_files, fsync_tree, is_inside, quarantine, read_manifest, write_json_atomic
from stages.errors import CacheError

log = logging.getLogger("tapeline.registry")
POINTER = "production.json"
REGISTRY = "registry.parquet"
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
REGISTRY_COLUMNS = (
    "run_id", "time", "data_fingerprint", "model_fingerprint", "train_fingerprint", "source", "max_epochs",
    "batch_size", "learning_rate", "epochs_run", "test_accuracy", "champion_accuracy", "promoted", "decision",
    "model_path",
)


def models_dir(artifacts: Path) -> Path:
    """Where promoted model versions live."""
    return artifacts / "models"


def production(artifacts: Path) -> dict[str, Any] | None:
    """The production pointer ({version, path, train_fingerprint, test_accuracy, ...}) or None."""
    path = models_dir(artifacts) / POINTER
    if not path.exists():
        return None
    try:
        pointer = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path} is corrupt ({exc}); restore it from a version's promotion.json") from exc
    target = artifacts / str(pointer.get("path", ""))
    if not VERSION_PATTERN.match(target.name) or not is_inside(models_dir(artifacts), target):
        raise CacheError(f"{path} points at {pointer.get('path')!r}, outside {models_dir(artifacts)}; "
                         "point it at a version directory models/vNNNN")
    if not target.is_dir():
        raise CacheError(f"{path} points at {pointer['path']}, which is missing; point it at a complete version")
    manifest = read_manifest(target)
    problem = check_files(target, manifest["files"], verify=False)
    if problem is not None:
        raise CacheError(f"production model {pointer['version']} is damaged: {problem}; restore it from "
                         f"{manifest.get('fingerprint') and 'artifacts/export/' + manifest['fingerprint']} or "
                         "point production.json at another version")
    return pointer


def next_version(artifacts: Path) -> str:
    """`v0001`, `v0002`, …: one past the highest existing version (call under the promotion lock)."""
    numbers = [int(m.group(1)) for p in models_dir(artifacts).glob("v*") if (m := VERSION_PATTERN.match(p.name))]
    return f"v{max(numbers, default=0) + 1:04d}"


def publish_version(artifacts: Path, export_dir: Path, record: dict[str, Any]) -> str:
    """Copy an export into a new version directory (complete before it has its name); returns the version."""
    version = next_version(artifacts)
    staging = models_dir(artifacts) / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(export_dir, staging)
    (staging / "promotion.json").write_text(json.dumps({**record, "version": version}, indent=2, default=str))
    fsync_tree(staging)
    staging.rename(models_dir(artifacts) / version)
    return version


def switch_production(artifacts: Path, pointer: dict[str, Any]) -> None:
    """Point production at a complete version, atomically."""
    write_json_atomic(models_dir(artifacts) / POINTER, pointer)


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
    rows = existing + [{c: row.get(c) for c in REGISTRY_COLUMNS}]
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
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise CacheError(
            f"{path} is corrupt ({exc}); move it aside (rows are lost only from the table, every run's "
            "outputs stay under artifacts/) and the next run starts a new registry"
        ) from exc
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
