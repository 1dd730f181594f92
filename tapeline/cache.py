"""The stage cache: fingerprints, manifests, atomic directory commits, validation and locks.

A stage's output lives in `artifacts/<stage>/<fingerprint>/`. It is built in a sibling staging
directory and renamed into place only when complete, with `manifest.json` written last. A directory
without a valid manifest does not exist as far as the cache is concerned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tapeline.errors import CacheError, LockTimeoutError, MissingUpstreamError

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 1024**2
FINGERPRINT_CHARS = 16
log = logging.getLogger("tapeline.cache")


def canonical_json(payload: Any) -> str:
    """JSON with sorted keys and no whitespace: equal payloads give equal text."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able payload."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_CHARS]


def files_digest(manifest: Mapping[str, Any]) -> str:
    """A hash of an output's files as its manifest lists them (name and SHA-256 each): two outputs with the same
    bytes have the same digest, whatever their fingerprints, timings or run ids."""
    return fingerprint({"files": sorted((row["name"], row.get("sha256")) for row in manifest.get("files", []))})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(root: Path) -> list[dict[str, Any]]:
    """Every file under `root` (but the manifest) as {name, bytes, sha256}, sorted by name."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name != MANIFEST:
            rows.append({"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return rows


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a cached output depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    distributions = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "keras": ("keras",), "numpy": ("numpy",),
                     "prefect": ("prefect",), "pyarrow": ("pyarrow",)}
    for key, names in distributions.items():
        for name in names:
            with contextlib.suppress(PackageNotFoundError):
                found[key] = version(name)
                break
    return found


def member(root: Path, name: Any) -> Path:
    """The path of a file a state file names inside `root`, or CacheError when the name could lead outside
    it (absolute, `..`, a symlink pointing out): such an output is invalid and is never read."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise CacheError(f"{root / MANIFEST} names {name!r}, which is not a plain relative path inside {root}")
    path = root / name
    try:
        inside = is_inside(root, path)
    except (OSError, RuntimeError):
        raise CacheError(f"{path} is a symlink loop") from None
    if not inside:
        raise CacheError(f"{root / MANIFEST} names {name!r}, which leads outside {root} (a symlink?)")
    return path


def check_entries(root: Path, entries: Any) -> None:
    """Every file entry is {name: a contained path, bytes: int, sha256: str}; CacheError naming the first
    that is not."""
    if not isinstance(entries, list):
        raise CacheError(f"{root / MANIFEST} has no file list")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) \
                or not isinstance(entry.get("sha256"), str):
            raise CacheError(f"{root / MANIFEST} has a file entry without name, bytes and sha256: {entry!r:.120}")
        member(root, entry.get("name"))


def check_files(root: Path, files: list[dict[str, Any]], verify: bool) -> str | None:
    """Why the listed files do not match what is on disk, or None when they do."""
    for entry in files:
        path = root / entry["name"]
        if path.is_symlink() and not path.exists():
            return f"{path} is a broken or looping symlink"
        if path.exists() and not path.is_file():
            return f"{path} is {'a directory' if path.is_dir() else 'not a regular file (a device or a pipe?)'}"
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path} has {size} bytes, the manifest says {entry['bytes']}"
        if verify and sha256_file(path) != entry["sha256"]:
            return f"{path} does not match its sha256 checksum"
    return None


def read_manifest(root: Path) -> dict[str, Any]:
    """Load `root/manifest.json`, raising CacheError when it is missing or unreadable."""
    path = root / MANIFEST
    try:
        with path.open("rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except FileNotFoundError as exc:
        raise CacheError(f"{path} is missing") from exc
    except IsADirectoryError as exc:
        raise CacheError(f"{path} is a directory, not a manifest") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise CacheError(f"{path} cannot be read ({exc.strerror or exc})") from exc
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} has no file list")
    check_entries(root, manifest.get("files"))
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict):
        raise CacheError(f"{path}: `splits` is not a mapping")
    for split in splits.values():
        check_entries(root, split.get("files") if isinstance(split, dict) else None)
    return manifest


def manifest_problem(root: Path, verify: bool = False, check_name: bool = True) -> str | None:
    """Why `root` is not a valid stage output (None when it is): manifest, sizes, checksums if asked. Without
    `check_name`, a directory that keeps another output's manifest (a promoted version keeps its export's) is
    checked by its files alone."""
    if not root.is_dir():
        return f"{root} does not exist"
    try:
        manifest = read_manifest(root)
    except CacheError as exc:
        return str(exc)
    if check_name and manifest.get("fingerprint") != root.name:
        return f"{root / MANIFEST} belongs to fingerprint {manifest.get('fingerprint')!r}, not {root.name!r}"
    return check_files(root, manifest["files"], verify)


def _load_valid_manifest(root: Path, verify: bool = False) -> dict[str, Any] | None:
    """The manifest of a valid stage output, or None (logging why) when it is not valid."""
    problem = manifest_problem(root, verify)
    if problem is None:
        return read_manifest(root)
    if root.exists():
        log.warning("cached output %s is not usable: %s; it will be rebuilt", root, problem)
    return None


def quarantine(root: Path) -> Path:
    """Move an invalid output aside (never delete evidence) and return where it went."""
    target = root.with_name(f".invalid-{root.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    root.rename(target)
    log.warning("moved the invalid output %s to %s", root, target)
    return target


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk before a rename publishes it."""
    for path in [*root.rglob("*"), root]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        with contextlib.suppress(OSError):
            fd = os.open(path, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary sibling, fsync it, then rename it over `path`."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temporary sibling, fsync it, then rename it over `path`."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary sibling, fsync it, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(staging: Path, final: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest last into `staging`, then rename it to `final`; returns the manifest."""
    files = manifest.get("files") or describe_files(staging)
    manifest = {**manifest, "fingerprint": final.name, "files": files}
    write_json_atomic(staging / MANIFEST, manifest)
    fsync_tree(staging)
    os.rename(staging, final)
    return manifest


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path`, waiting at most `timeout` seconds."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle_cm = path.open("a")
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CacheError(f"{what}: {path.parent} is read-only ({exc.strerror}); this step must write there: "
                             "use a writable --artifacts, or only read (plan, predict, runs, cache hits)") from None
        raise
    deadline = time.monotonic() + timeout
    with handle_cm as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise LockTimeoutError(
                        f"{what}: another tapeline process has held {path} for over {timeout:.0f} s; "
                        "wait for it to finish, or raise the timeout"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


BuildFn = Callable[[Path], dict[str, Any]]


def cached_build(
    stage_root: Path,
    fp: str,
    build: BuildFn,
    *,
    verify: bool = False,
    resumable: bool = False,
    lock_timeout: float = 24 * 3600,
) -> tuple[dict[str, Any], bool]:
    """Return (manifest, cached): reuse `stage_root/fp` when valid, else build it atomically.

    `build(staging_dir)` writes the outputs and returns the manifest body. Concurrent processes
    asking for the same fingerprint serialize on a lock, so the output is built once. With
    `resumable`, the staging directory has a stable name and survives a crash, so `build` can
    resume from what it left there (training checkpoints); otherwise a leftover is discarded.
    """
    final = stage_root / fp
    if manifest_problem(final, verify) is None:  # a hit needs no lock, so a read-only store serves it
        return read_manifest(final), True
    with file_lock(stage_root / f".{fp}.lock", lock_timeout, f"building {final}"):
        manifest = _load_valid_manifest(final, verify)
        if manifest is not None:
            return manifest, True
        if final.exists():
            quarantine(final)
        staging = stage_root / f".partial-{fp}"
        if staging.exists() and not resumable:
            shutil.rmtree(staging)
        staging.mkdir(exist_ok=True)
        try:
            body = build(staging)
            return commit(staging, final, body), False
        except OSError as exc:
            if not resumable:
                shutil.rmtree(staging, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(
                    f"disk full while writing {final} ({exc}); nothing partial was kept as an output: "
                    f"free space under {stage_root.parent} and run again"
                ) from exc
            raise
        except BaseException:
            if not resumable:
                shutil.rmtree(staging, ignore_errors=True)
            raise


def is_inside(root: Path, path: Path) -> bool:
    """Whether `path` (symlinks resolved) lies inside `root`: names from files never escape the artifacts."""
    return path.resolve().is_relative_to(root.resolve())


def require_valid(root: Path, stage: str, verify: bool = False) -> dict[str, Any]:
    """The manifest of an upstream output, or MissingUpstreamError saying which stage to run first."""
    problem = manifest_problem(root, verify)
    if problem is not None:
        raise MissingUpstreamError(
            f"no valid {stage} output for this config ({problem}): run `tapeline stage {stage}` "
            "with the same config first"
        )
    return read_manifest(root)
