"""Artifact stores: where stage outputs, promoted models, the production pointer and the registry live.

`--artifacts` / `TAPELINE_ARTIFACTS` is a directory (`LocalStore`: the layout and atomic renames of
`tapeline.cache`) or an object-store URL, `s3://BUCKET/PREFIX`, `gs://…` (`RemoteStore`, through fsspec;
`file://DIR` is a directory). Endpoint and credentials come only from the standard settings of the
backend (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, …): tapeline never sees or writes a secret.

Object stores have no rename, so a remote output is committed by its `manifest.json`, written last in
one conditional PUT (`If-None-Match: *`): two machines building the same fingerprint commit exactly
once, and the loser uses the winner's output. Each attempt uploads its files under its own attempt
directory (`<stage>/<fp>/<attempt>/…`, named in the manifest's `root`), so leftovers of a killed
upload never mix with a later good one. Stages read local files only: a committed remote output is
downloaded once into the read cache (`TAPELINE_CACHE_DIR`, default `~/.cache/tapeline`), keyed by
stage and fingerprint and verified against the manifest; a damaged local copy is fetched again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tapeline.cache import (
    MANIFEST,
    cached_build,
    canonical_json,
    check_entries,
    check_files,
    describe_files,
    file_lock,
    manifest_problem,
    member,
    read_manifest,
    require_valid,
)
from tapeline.errors import CacheError, MissingUpstreamError, StoreConnectionError, StoreError

REMOTE_SCHEMES = ("s3", "gs", "gcs")
PARTIAL = ".partial"
log = logging.getLogger("tapeline.store")
SavePartial = Callable[[], None]
MakeFn = Callable[[Path, SavePartial], dict[str, Any]]


def cache_dir() -> Path:
    """The local read cache: $TAPELINE_CACHE_DIR, else ~/.cache/tapeline."""
    return Path(os.environ.get("TAPELINE_CACHE_DIR") or Path.home() / ".cache" / "tapeline").expanduser()


class Store(ABC):
    """The operations the graph, the promotion step, `predict` and `runs` need of an artifacts store."""

    root: str

    @abstractmethod
    def location(self, stage: str, fp: str) -> str:
        """Where the output of `stage` with fingerprint `fp` lives, as a path or URL."""

    @abstractmethod
    def problem(self, stage: str, fp: str, verify: bool = False) -> str | None:
        """Why that output is not a valid committed output (None when it is)."""

    @abstractmethod
    def fetch(self, stage: str, fp: str, verify: bool = False) -> tuple[dict[str, Any], Path]:
        """(manifest, local directory) of a valid output; MissingUpstreamError when there is none."""

    @abstractmethod
    def manifest(self, stage: str, fp: str) -> dict[str, Any] | None:
        """The manifest of a valid output, without fetching its files; None when there is none."""

    @abstractmethod
    def copy_partial(self, stage: str, fp: str, target: Path) -> None:
        """Copy what a resumable build of `stage`/`fp` saved so far (the chief's checkpoints) into `target`."""

    @abstractmethod
    def build(self, stage: str, fp: str, make: MakeFn, *, verify: bool = False, resumable: bool = False
              ) -> tuple[dict[str, Any], bool, Path]:
        """(manifest, cached, local directory): reuse the valid output or build and commit it.

        `make(staging, save_partial)` writes the output into `staging` and returns the manifest body;
        `save_partial()` makes what is in `staging` so far survive the machine (training checkpoints).
        """


# ---------------------------------------------------------------- local directory

class LocalStore(Store):
    """A directory: outputs are committed by an atomic rename (`tapeline.cache.cached_build`)."""

    def __init__(self, root: Path) -> None:
        self.path = root
        self.root = str(root)

    def location(self, stage: str, fp: str) -> str:
        """The output directory."""
        return str(self.path / stage / fp)

    def problem(self, stage: str, fp: str, verify: bool = False) -> str | None:
        """The manifest check of `tapeline.cache`."""
        return manifest_problem(self.path / stage / fp, verify)

    def fetch(self, stage: str, fp: str, verify: bool = False) -> tuple[dict[str, Any], Path]:
        """The directory itself, once its manifest validates."""
        path = self.path / stage / fp
        return require_valid(path, stage, verify), path

    def manifest(self, stage: str, fp: str) -> dict[str, Any] | None:
        """The manifest, when the output validates."""
        path = self.path / stage / fp
        return read_manifest(path) if manifest_problem(path) is None else None

    def copy_partial(self, stage: str, fp: str, target: Path) -> None:
        """Copy the checkpoints of the build in progress (`.partial-<fp>/checkpoints`)."""
        source = self.path / stage / f".partial-{fp}" / "checkpoints"
        if source.is_dir():
            shutil.copytree(source, target / "checkpoints", dirs_exist_ok=True)

    def build(self, stage: str, fp: str, make: MakeFn, *, verify: bool = False, resumable: bool = False
              ) -> tuple[dict[str, Any], bool, Path]:
        """Build under the per-fingerprint lock; checkpoints already live on this disk."""
        manifest, cached = cached_build(self.path / stage, fp, lambda staging: make(staging, lambda: None),
                                        verify=verify, resumable=resumable)
        return manifest, cached, self.path / stage / fp


# ---------------------------------------------------------------- object store

def _is_precondition_failure(exc: BaseException) -> bool:
    """Whether a conditional PUT lost (HTTP 412 PreconditionFailed, as s3fs raises it)."""
    if isinstance(exc, FileExistsError):
        return True
    return isinstance(exc, OSError) and exc.errno == errno.EINVAL and "condition" in str(exc).lower()


class RemoteStore(Store):
    """An object-store prefix (`s3://bucket/prefix`, `gs://…`) through fsspec."""

    def __init__(self, url: str, fs: Any, base: str) -> None:
        self.root = url
        self.fs = fs
        self.base = base.rstrip("/")

    # -- keys and small objects

    def key(self, *parts: str) -> str:
        """The fsspec path of `parts` under the prefix."""
        return "/".join([self.base, *parts])

    def url(self, *parts: str) -> str:
        """The URL of `parts` under the prefix (what users see)."""
        return "/".join([self.root.rstrip("/"), *parts])

    def location(self, stage: str, fp: str) -> str:
        """The output's URL."""
        return self.url(stage, fp)

    def read_bytes(self, key: str) -> bytes | None:
        """An object's bytes, or None when it does not exist."""
        try:
            with guarded(self.root):
                return self.fs.cat_file(key)
        except FileNotFoundError:
            return None

    def read_with_etag(self, key: str) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of an object, (None, None) when it does not exist."""
        try:
            with guarded(self.root):
                info = self.fs.info(key, refresh=True)
                return self.fs.cat_file(key), info.get("ETag")
        except FileNotFoundError:
            return None, None

    def put_bytes(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> bool:
        """PUT an object; with `create` only if absent, with `if_match` only if unchanged. False when the
        condition did not hold (another writer got there first)."""
        options: dict[str, Any] = {"mode": "create"} if create else {}
        if if_match is not None:
            options["IfMatch"] = if_match
        try:
            with guarded(self.root):
                self.fs.pipe_file(key, data, **options)
        except OSError as exc:
            if _is_precondition_failure(exc):
                return False
            raise
        self.fs.invalidate_cache(key)
        return True

    def remove(self, key: str) -> None:
        """Delete everything under `key` (missing is fine)."""
        with contextlib.suppress(FileNotFoundError), guarded(self.root):
            self.fs.rm(key, recursive=True)

    def listing(self, key: str) -> dict[str, int]:
        """{relative name: size} of every object under `key`, listed afresh (fsspec's listing cache would hide
        objects other processes wrote since, and then make reading them fail)."""
        with guarded(self.root):
            self.fs.invalidate_cache(key)
            try:
                found = self.fs.find(key, detail=True, withdirs=False)
            except FileNotFoundError:
                return {}
        prefix = key.rstrip("/") + "/"
        return {name[len(prefix):]: int(info["size"]) for name, info in found.items() if name.startswith(prefix)}

    def upload_dir(self, local: Path, key: str, uploaded: dict[str, tuple[int, int]] | None = None) -> None:
        """Upload every file under `local` to `key/…`; with `uploaded` (name -> size, mtime), only the files
        that changed since the last call with the same dict."""
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            name, stat = path.relative_to(local).as_posix(), path.stat()
            if uploaded is not None and uploaded.get(name) == (stat.st_size, stat.st_mtime_ns):
                continue
            with guarded(self.root):
                self.fs.put_file(str(path), f"{key}/{name}")
            if uploaded is not None:
                uploaded[name] = (stat.st_size, stat.st_mtime_ns)

    # -- stage outputs

    def remote_manifest(self, stage: str, fp: str) -> dict[str, Any] | None:
        """The committed manifest of an output, None when there is none, CacheError when unreadable."""
        data = self.read_bytes(self.key(stage, fp, MANIFEST))
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(f"{self.url(stage, fp, MANIFEST)} is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list) \
                or not isinstance(manifest.get("root"), str) or manifest.get("fingerprint") != fp:
            raise CacheError(f"{self.url(stage, fp, MANIFEST)} is not a tapeline manifest for {fp}")
        member(self.local_dir(stage, fp), manifest["root"])
        check_entries(self.local_dir(stage, fp), manifest["files"])
        return manifest

    def remote_problem(self, stage: str, fp: str, manifest: dict[str, Any]) -> str | None:
        """Why the objects of a committed output do not match its manifest (sizes), or None."""
        sizes = self.listing(self.key(stage, fp, manifest["root"]))
        for entry in manifest["files"]:
            found = sizes.get(entry["name"])
            if found is None:
                return f"{self.url(stage, fp, manifest['root'], entry['name'])} is missing"
            if found != entry["bytes"]:
                return f"{self.url(stage, fp, manifest['root'], entry['name'])} has {found} bytes, " \
                       f"the manifest says {entry['bytes']}"
        return None

    def checked(self, stage: str, fp: str, verify: bool = False) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, why the output is not valid): manifest and object sizes; with `verify`, the SHA-256 of
        every object streamed from the store. One manifest read and one listing serve every caller."""
        try:
            manifest = self.remote_manifest(stage, fp)
        except CacheError as exc:
            return None, str(exc)
        if manifest is None:
            return None, f"{self.url(stage, fp)} has no manifest"
        problem = self.remote_problem(stage, fp, manifest)
        if problem is None and verify:
            problem = self.checksum_problem(stage, fp, manifest)
        return manifest, problem

    def problem(self, stage: str, fp: str, verify: bool = False) -> str | None:
        """Why the output is not valid (None when it is)."""
        return self.checked(stage, fp, verify)[1]

    def checksum_problem(self, stage: str, fp: str, manifest: dict[str, Any]) -> str | None:
        """The first object whose SHA-256 (streamed from the store) differs from the manifest, or None."""
        for entry in manifest["files"]:
            digest = hashlib.sha256()
            with guarded(self.root), self.fs.open(self.key(stage, fp, manifest["root"], entry["name"]), "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                return f"{self.url(stage, fp, manifest['root'], entry['name'])} does not match its sha256 checksum"
        return None

    def manifest(self, stage: str, fp: str) -> dict[str, Any] | None:
        """The committed manifest, when its objects match it."""
        try:
            found = self.remote_manifest(stage, fp)
        except CacheError:
            return None
        return found if found is not None and self.remote_problem(stage, fp, found) is None else None

    def local_dir(self, stage: str, fp: str) -> Path:
        """The read-cache directory of an output (content-addressed: stage + fingerprint)."""
        return cache_dir() / stage / fp

    def materialize(self, stage: str, fp: str, manifest: dict[str, Any]) -> Path:
        """A verified local copy of a committed output, downloaded once; a damaged copy is fetched again."""
        local = self.local_dir(stage, fp)
        wanted = canonical_json(manifest)
        if local.is_dir():
            try:
                same = canonical_json(read_manifest(local)) == wanted
            except CacheError:
                same = False
            if same and check_files(local, manifest["files"], verify=False) is None:
                return local
            log.warning("local copy %s is stale or damaged; fetching it again", local)
            shutil.rmtree(local, ignore_errors=True)
        staging = local.with_name(f".partial-{fp}-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        try:
            for entry in manifest["files"]:
                target = staging / entry["name"]
                target.parent.mkdir(parents=True, exist_ok=True)
                with guarded(self.root):
                    self.fs.get_file(self.key(stage, fp, manifest["root"], entry["name"]), str(target))
            problem = check_files(staging, manifest["files"], verify=True)
            if problem is not None:
                raise CacheError(f"{self.url(stage, fp)}: the downloaded copy does not match its manifest "
                                 f"({problem.replace(str(staging), 'local copy')})")
            (staging / MANIFEST).write_text(wanted)
            try:
                staging.rename(local)
            except OSError:  # another process of this machine fetched it first: use theirs
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return local

    def fetch(self, stage: str, fp: str, verify: bool = False) -> tuple[dict[str, Any], Path]:
        """The committed output, downloaded (once) into the read cache."""
        manifest, problem = self.checked(stage, fp)
        if manifest is None or problem is not None:
            raise MissingUpstreamError(f"no valid {stage} output for this config ({problem}): run "
                                       f"`tapeline stage {stage}` with the same config first")
        local = self.materialize(stage, fp, manifest)
        if verify and (damage := check_files(local, manifest["files"], verify=True)) is not None:
            shutil.rmtree(local, ignore_errors=True)
            raise MissingUpstreamError(f"{damage}; run again to fetch {self.url(stage, fp)} afresh")
        return manifest, local

    def set_aside(self, stage: str, fp: str, problem: str) -> None:
        """Move an invalid manifest aside (kept for inspection) so the output can be committed again."""
        key = self.key(stage, fp, MANIFEST)
        data = self.read_bytes(key)
        if data is not None:
            aside = self.key(stage, fp, f".invalid-manifest-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json")
            self.put_bytes(aside, data)
            self.remove(key)
            log.warning("cached output %s is not usable (%s): its manifest is moved aside and it is rebuilt",
                        self.url(stage, fp), problem)

    def build(self, stage: str, fp: str, make: MakeFn, *, verify: bool = False, resumable: bool = False
              ) -> tuple[dict[str, Any], bool, Path]:
        """Reuse the committed output, or build locally, upload under a fresh attempt and commit."""
        manifest, problem = self.checked(stage, fp, verify)
        if manifest is not None and problem is None:
            return manifest, True, self.materialize(stage, fp, manifest)
        self.set_aside(stage, fp, str(problem))  # no-op when there is no manifest at all
        staging = cache_dir() / "staging" / (f"{stage}-{fp}" if resumable else f"{stage}-{fp}-{uuid.uuid4().hex[:8]}")
        partial = self.key(stage, fp, PARTIAL)
        if not resumable:
            shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        if resumable and not any(staging.iterdir()):
            self.download_dir(partial, staging)

        uploaded: dict[str, tuple[int, int]] = {}

        def save_partial() -> None:
            self.upload_dir(staging, partial, uploaded)

        try:
            body = make(staging, save_partial if resumable else (lambda: None))
            return self.commit(stage, fp, staging, body)
        finally:
            if not resumable:
                shutil.rmtree(staging, ignore_errors=True)

    def copy_partial(self, stage: str, fp: str, target: Path) -> None:
        """Download the checkpoints the chief uploaded so far."""
        self.download_dir(self.key(stage, fp, PARTIAL), target)

    def download_dir(self, key: str, local: Path) -> None:
        """Download every object under `key` into `local` (a resumed run's checkpoints)."""
        names = self.listing(key)
        for name in names:
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with guarded(self.root):
                self.fs.get_file(f"{key}/{name}", str(target))
        if names:
            log.info("resuming from %d files of %s", len(names), key)

    def commit(self, stage: str, fp: str, staging: Path, body: dict[str, Any]) -> tuple[dict[str, Any], bool, Path]:
        """Upload under a fresh attempt directory, then PUT the manifest if none exists (exactly one wins)."""
        attempt = f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        files = describe_files(staging)
        self.upload_dir(staging, self.key(stage, fp, attempt))
        manifest = {**body, "fingerprint": fp, "files": files, "root": attempt}
        if not self.put_bytes(self.key(stage, fp, MANIFEST), json.dumps(manifest, indent=2, default=str).encode(),
                              create=True):
            log.info("another machine committed %s first; using its output", self.url(stage, fp))
            self.remove(self.key(stage, fp, attempt))
            theirs, local = self.fetch(stage, fp)
            return theirs, True, local
        self.remove(self.key(stage, fp, PARTIAL))
        local = self.local_dir(stage, fp)
        shutil.rmtree(local, ignore_errors=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, local)
        (local / MANIFEST).write_text(canonical_json(manifest))
        return manifest, False, local


# ---------------------------------------------------------------- opening a store

def is_remote(root: str | Path) -> bool:
    """Whether `root` names an object store rather than a directory."""
    return isinstance(root, str) and urlparse(root).scheme in REMOTE_SCHEMES


def normalize_root(root: str | Path) -> str | Path:
    """A resolved directory for paths and `file://` URLs; object-store URLs unchanged."""
    if isinstance(root, Path):
        return root.resolve()
    scheme = urlparse(root).scheme
    if scheme in REMOTE_SCHEMES:
        return root.rstrip("/")
    if scheme == "file":
        return Path(urlparse(root).path).resolve()
    if scheme and len(scheme) > 1:
        raise StoreError(f"--artifacts {root}: unsupported URL scheme {scheme!r}; use a directory, file://DIR, "
                         "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    return Path(root).expanduser().resolve()


@contextlib.contextmanager
def guarded(url: str) -> Iterator[None]:
    """Turn backend errors into one-line tapeline errors naming the URL and the fix."""
    try:
        yield
    except (FileNotFoundError, FileExistsError):
        raise
    except PermissionError as exc:
        raise StoreError(f"{url}: access denied ({exc}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                         "(or the profile) and the bucket's policy") from None
    except OSError as exc:
        if _is_precondition_failure(exc):
            raise
        text = str(exc)
        if any(word in text for word in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
            raise StoreError(f"{url}: the credentials were refused ({text.splitlines()[0][:160]}); check "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        raise StoreConnectionError(f"{url}: {text.splitlines()[0][:200] if text else type(exc).__name__}") from exc
    except Exception as exc:
        name = type(exc).__name__
        if "Credential" in name or "Endpoint" in name or "Connect" in name or "Timeout" in name:
            raise StoreConnectionError(
                f"{url}: cannot reach the object store ({name}: {str(exc)[:160]}); check AWS_ENDPOINT_URL and "
                "the network, then run again") from None
        raise


def remote_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, bucket/prefix path) for an object-store URL; settings from the environment."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with the project
        raise StoreError(f"{url}: fsspec is not installed") from exc
    scheme = urlparse(url).scheme
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = "s3fs" if scheme == "s3" else "gcsfs"
        raise StoreError(f"{url}: the {scheme}:// backend needs `pip install {package}`") from exc
    if scheme == "s3":
        import s3fs.core

        # S3 documents InternalError / ServiceUnavailable as "retry the request"; s3fs retries only throttling.
        s3fs.core.set_custom_error_handler(_is_retryable_s3_error)
    return fs, path


def _is_retryable_s3_error(exc: BaseException) -> bool:
    """Whether an S3 error response asks the client to try again."""
    text = str(exc)
    return any(code in text for code in ("InternalError", "ServiceUnavailable", "please try again"))


@lru_cache(maxsize=16)
def open_remote(url: str) -> RemoteStore:
    """The RemoteStore of `url`, checked once: the bucket must exist and answer."""
    fs, path = remote_filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        with guarded(url):
            fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StoreError(f"{url}: bucket {bucket!r} does not exist; create it (e.g. `aws s3 mb s3://{bucket}`) "
                         "or fix --artifacts") from None
    return RemoteStore(url, fs, path)


def object_version(info: dict[str, Any]) -> str:
    """An object's version from its listing entry: the ETag (S3; etag or md5Hash on GCS), else size and mtime."""
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash")
               or f"{info.get('size')}-{info.get('mtime')}").strip('"')


def list_objects(url: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(the bucket path of `url`, {key: listing entry} of every object under it, or matching it when it is a
    glob), listed afresh: fsspec's listing cache would hide what other processes wrote since."""
    fs, path = remote_filesystem(url)
    pattern = any(c in path for c in "*?[")
    with guarded(url):
        fs.invalidate_cache(path.split("*", 1)[0].rsplit("/", 1)[0] if pattern else path)
        try:
            found = fs.glob(path, detail=True) if pattern else fs.find(path, detail=True, withdirs=False)
        except FileNotFoundError:
            found = {}
    return path, found


def open_store(root: str | Path) -> Store:
    """The store of an artifacts root: a directory (or file:// URL) or an object-store URL."""
    normalized = normalize_root(root)
    if isinstance(normalized, Path):
        if normalized.exists() and not normalized.is_dir():
            raise StoreError(f"--artifacts {normalized} is a file, not a directory; give a directory or a URL")
        return LocalStore(normalized)
    return open_remote(normalized)


def read_json_object(store: RemoteStore, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """(JSON object, ETag) of a small state object; CacheError naming it when it is not a JSON object."""
    data, etag = store.read_with_etag(key)
    if data is None:
        return None, None
    try:
        value = json.load(io.BytesIO(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{store.root}/{key.removeprefix(store.base + '/')} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CacheError(f"{store.root}/{key.removeprefix(store.base + '/')} is not a JSON object")
    return value, etag


def with_lock(store: Store, name: str, timeout: float, what: str) -> contextlib.AbstractContextManager[None]:
    """A local lock for a local store; object stores rely on conditional writes instead."""
    if isinstance(store, LocalStore):
        return file_lock(store.path / name, timeout, what)
    return contextlib.nullcontext()
