"""A sweep's state in the artifacts store, `<artifacts>/sweeps/<name>/`: the definition, one record per trial,
the driver's lease, and what the sweep reports (best.yaml, pictures). Records are small JSON objects, each
replaced whole (an atomic rename on disk, one PUT on an object store), so a reader never sees half of one, on a
bucket shared by machines too."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tapeline.cache import canonical_json, fingerprint, write_bytes_atomic
from tapeline.config import PipelineConfig
from tapeline.errors import CacheError, TapelineError
from tapeline.store import LocalStore, RemoteStore, Store

SWEEPS = "sweeps"
# The settings that make a search what it is: its name hashes them and a rerun must keep them. The budget
# (trials, parallel), where trials run (deployment) and the driver's housekeeping may change between runs.
SEARCH_SETTINGS = {"space", "metric", "direction", "sampler", "seed", "pruner", "min_epochs", "reduction_factor"}
TrialState = Literal["running", "complete", "pruned", "failed"]


class SweepBusyError(TapelineError):
    """Another driver is working on this sweep."""


class TrialClaimedError(TapelineError):
    """Another live process trains this trial (its claim is held)."""


class TrialRecord(BaseModel):
    """One trial: its parameters (keyed by the space's keys as written), its config, and what became of it."""

    model_config = ConfigDict(extra="ignore")

    number: int
    params: dict[str, Any]
    config: dict[str, Any]
    state: TrialState = "running"
    value: float | None = None
    intermediate: dict[int, float] = Field(default_factory=dict)  # epoch -> the metric, as the pruner saw it
    system_attrs: dict[str, Any] = Field(default_factory=dict)  # what the pruner keeps per trial (ASHA's rungs)
    train_fingerprint: str | None = None
    cached: bool = False
    epochs: int = 0  # epochs in the trial's history
    trained: dict[str, int] = Field(default_factory=dict)  # driver invocation -> epochs trained in it
    attempts: int = 0  # processes started for it
    reason: str | None = None
    seconds: float = 0.0

    def epochs_trained_in(self, invocation: str) -> int:
        """Epochs this trial trained during one driver invocation (0 for a cache hit)."""
        return self.trained.get(invocation, 0)


class TrialTicket(BaseModel):
    """What a flow run needs to run one trial of a sweep: the store, the sweep, the trial, the driver's invocation."""

    artifacts: str
    sweep: str
    number: int
    invocation: str


def sweep_name(config: PipelineConfig) -> str:
    """`sweep.name`, or a hash of the space, the search's settings and the base config (not of the budget:
    `sweep.trials` or `sweep.parallel` raised later continue the same sweep)."""
    sweep = config.sweep
    if sweep.name is not None:
        return sweep.name
    return f"sweep-{fingerprint({'base': _base_of(config), 'search': _search_of(config)})[:12]}"


def _base_of(config: PipelineConfig) -> dict[str, Any]:
    """The base config a sweep searches around (its sweep section and preset name aside)."""
    return config.model_dump(mode="json", exclude={"sweep", "preset"})


def _search_of(config: PipelineConfig) -> dict[str, Any]:
    """The sweep's search settings (`SEARCH_SETTINGS`; `rungs` only when not `epochs`, so that the sweeps written
    before the key existed keep their names and definitions)."""
    settings = config.sweep.model_dump(mode="json", include=SEARCH_SETTINGS)
    if config.sweep.rungs != "epochs":
        settings["rungs"] = config.sweep.rungs
    return settings


class SweepFiles:
    """The objects of one sweep in a store: read, replace, list."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name

    def location(self, *parts: str) -> str:
        """Where `parts` of the sweep live (a path or a URL)."""
        if isinstance(self.store, RemoteStore):
            return self.store.url(SWEEPS, self.name, *parts)
        return str(Path(self.store.root, SWEEPS, self.name, *parts))

    def read(self, *parts: str) -> bytes | None:
        """An object's bytes, None when absent."""
        if isinstance(self.store, RemoteStore):
            return self.store.read_bytes(self.store.key(SWEEPS, self.name, *parts))
        try:
            return Path(self.location(*parts)).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes, *parts: str) -> None:
        """Replace an object whole."""
        if isinstance(self.store, RemoteStore):
            self.store.put_bytes(self.store.key(SWEEPS, self.name, *parts), data)
            return
        path = Path(self.location(*parts))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)

    def remove(self, *parts: str) -> None:
        """Delete an object, or a folder with everything in it (absent is fine)."""
        if isinstance(self.store, RemoteStore):
            self.store.remove(self.store.key(SWEEPS, self.name, *parts))
            return
        path = Path(self.location(*parts))
        if path.is_dir():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def names(self, *parts: str) -> list[str]:
        """The objects directly under `parts`, sorted."""
        if isinstance(self.store, RemoteStore):
            return sorted(n for n in self.store.listing(self.store.key(SWEEPS, self.name, *parts)) if "/" not in n)
        folder = Path(self.location(*parts))
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    # -- trials

    def trial(self, number: int) -> TrialRecord | None:
        """One trial's record, None when it has none."""
        data = self.read("trials", f"{number:05d}.json")
        return None if data is None else self.parse(data, f"trials/{number:05d}.json")

    def trials(self) -> list[TrialRecord]:
        """Every trial's record, by number."""
        found = []
        for name in self.names("trials"):
            if name.endswith(".json") and not name.startswith("."):
                data = self.read("trials", name)
                if data is not None:
                    found.append(self.parse(data, f"trials/{name}"))
        return sorted(found, key=lambda r: r.number)

    def save(self, record: TrialRecord) -> None:
        """Replace a trial's record."""
        self.write(record.model_dump_json(indent=2).encode(), "trials", f"{record.number:05d}.json")

    def parse(self, data: bytes, name: str) -> TrialRecord:
        """A record from its JSON; CacheError naming it when damaged."""
        try:
            return TrialRecord.model_validate_json(data)
        except ValueError as exc:
            raise CacheError(f"{self.location(*name.split('/'))} is not a trial record ({str(exc).splitlines()[0]});"
                             " delete it to run that trial again") from None

    # -- the definition

    def check_definition(self, config: PipelineConfig) -> None:
        """Write the sweep's definition on its first run; later runs must search the same space on the same base."""
        mine = {"name": self.name, "space": config.sweep.space, "base": _base_of(config), "search": _search_of(config)}
        data = self.read("sweep.json")
        if data is None:
            self.write(json.dumps(mine, indent=2, sort_keys=True).encode(), "sweep.json")
            return
        theirs = json.loads(data)
        for part in ("space", "base", "search"):
            if canonical_json(theirs.get(part)) != canonical_json(mine[part]):
                raise TapelineError(f"sweep {self.name} at {self.location()} searched another {part} "
                                    f"({'the sweep settings' if part == 'search' else part}); give a new sweep.name, "
                                    "or drop sweep.name to get one from the space and the config")


# ---------------------------------------------------------------- the driver's lease

def _this_host() -> str:
    """The name the lease records for this machine."""
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    """Whether a process of this machine is alive: a zombie, or one already exiting (its memory released, so its
    command line reads empty: a killed TensorFlow process takes a moment to finish exiting), counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if Path(f"/proc/{pid}/cmdline").read_bytes() == b"":
            return False
    return True


def _lease_holder_alive(lease: dict[str, Any], lease_seconds: float, now: float) -> bool:
    """A lease of this machine is alive while its process is; another machine's while its heartbeat is fresh."""
    if lease.get("host") == _this_host():
        return _pid_alive(int(lease.get("pid", -1)))
    return now - float(lease.get("heartbeat", 0)) < lease_seconds


def _describe_lease(lease: dict[str, Any]) -> str:
    """`pid 123 on host h, since 2026-12-05T17:00:00Z`."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(lease.get("started", 0))))
    return f"pid {lease.get('pid')} on {lease.get('host')}, since {since}"


class Lease:
    """One holder of an object of the sweep's store (`parts`): the object names it (token, host, pid, heartbeat)
    and a heartbeat thread refreshes it; a second holder is refused while the first is alive (on this machine:
    while its process is; on another: while its heartbeat is fresher than `lease_seconds`) and takes a dead one's
    place. Taken by a conditional PUT on a bucket, under a file lock on a directory."""

    def __init__(self, files: SweepFiles, lease_seconds: float, parts: tuple[str, ...]) -> None:
        self.files = files
        self.lease_seconds = lease_seconds
        self.parts = parts
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def busy(self, holder: str) -> TapelineError:
        """The error for a live other holder (described by `holder`)."""
        return SweepBusyError(f"{'/'.join(self.parts)} of sweep {self.files.name} is held by {holder}")

    def body(self) -> bytes:
        """This holder's lease object."""
        return json.dumps({"token": self.token, "host": _this_host(), "pid": os.getpid(), "started": self.started,
                           "heartbeat": time.time()}).encode()

    def current(self) -> tuple[dict[str, Any] | None, str | None]:
        """(lease, ETag or None) as stored now."""
        if isinstance(self.files.store, RemoteStore):
            data, etag = self.files.store.read_with_etag(self.files.store.key(SWEEPS, self.files.name, *self.parts))
        else:
            data, etag = self.files.read(*self.parts), None
        try:
            return (json.loads(data) if data else None), etag
        except json.JSONDecodeError:
            return None, etag

    def held_by_other(self, lease: dict[str, Any] | None) -> bool:
        """Whether `lease` is another holder's and that holder is alive."""
        return lease is not None and lease.get("token") != self.token and \
            _lease_holder_alive(lease, self.lease_seconds, time.time())

    def refuse_if_busy(self, lease: dict[str, Any] | None) -> None:
        """The busy error naming the live holder of `lease` (when another one holds it)."""
        if lease is not None and self.held_by_other(lease):
            raise self.busy(_describe_lease(lease))

    def check_free(self) -> None:
        """Before any work: the busy error when a live holder holds it. The claim itself, later, decides a race
        between two starting at once."""
        self.refuse_if_busy(self.current()[0])

    def is_free(self) -> bool:
        """Whether nobody alive holds it now (a hint: only `claim` decides)."""
        return not self.held_by_other(self.current()[0])

    def claim(self) -> None:
        """Take the lease, or the busy error naming the live holder."""
        with self.exclusive():
            lease, etag = self.current()
            self.refuse_if_busy(lease)
            if isinstance(self.files.store, RemoteStore):
                key = self.files.store.key(SWEEPS, self.files.name, *self.parts)
                if not self.files.store.put_bytes(key, self.body(), create=etag is None, if_match=etag):
                    raise self.busy("another holder that took it at the same moment")
            else:
                self.files.write(self.body(), *self.parts)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """On a directory, a file lock around read-and-claim; an object store relies on the conditional PUT."""
        if isinstance(self.files.store, LocalStore):
            from tapeline.cache import file_lock

            path = Path(self.files.location(*self.parts[:-1], f".{self.parts[-1]}.lock"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(path, 30, f"claiming {'/'.join(self.parts)} of sweep {self.files.name}"):
                yield
        else:
            yield

    def beat(self) -> None:
        """Refresh the heartbeat until stopped (a quarter of the lease apart)."""
        while not self.stopping.wait(self.lease_seconds / 4):
            lease, _ = self.current()
            if lease is not None and lease.get("token") == self.token:
                with contextlib.suppress(OSError, TapelineError):
                    self.files.write(self.body(), *self.parts)

    def __enter__(self) -> Lease:
        self.claim()
        self.thread = threading.Thread(target=self.beat, name=f"sweep-lease-{'-'.join(self.parts)}", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        lease, _ = self.current()
        if lease is not None and lease.get("token") == self.token:
            self.files.remove(*self.parts)


class DriverLease(Lease):
    """The one driver of a sweep: `driver.json`; a second driver is refused while the first is alive, and takes
    over a dead one's sweep."""

    def __init__(self, files: SweepFiles, lease_seconds: float) -> None:
        super().__init__(files, lease_seconds, ("driver.json",))

    def busy(self, holder: str) -> TapelineError:
        """SweepBusyError naming the live driver."""
        if holder.startswith("another holder"):
            return SweepBusyError(f"sweep {self.files.name}: another driver took it at the same moment")
        return SweepBusyError(f"sweep {self.files.name} is being run by another driver ({holder}); wait for it to "
                              f"end, or stop it: a dead driver's sweep is taken over (after sweep.lease_seconds="
                              f"{self.lease_seconds:g} on another machine)")


class TrialClaim(Lease):
    """The one copy of a trial that trains: `claims/<number>.json`, held by the trial's process (a local one or a
    work pool's flow run) for as long as it trains. A second driver, or a driver restarted while the trial still
    runs on a worker, finds it held and waits for its outcome instead of training it again."""

    def __init__(self, files: SweepFiles, number: int, lease_seconds: float) -> None:
        super().__init__(files, lease_seconds, ("claims", f"{number:05d}.json"))
        self.number = number

    def busy(self, holder: str) -> TapelineError:
        """TrialClaimedError naming the live holder."""
        return TrialClaimedError(f"trial {self.number} of sweep {self.files.name} is being trained by {holder}")
