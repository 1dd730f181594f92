"""The sweep's driver: shared inputs built once, trials proposed (and recorded before they start), run each in
its own process `sweep.parallel` at a time, cache hits told to the sampler without a process, and a killed sweep
taken up where it stopped: finished and pruned trials stay as they are, interrupted ones resume from their last
epoch checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Protocol

import yaml

from stages.graph import run_stage
from sweeps.space import check_space, planned_trials, trial_config
from sweeps.state import DriverLease, SweepFiles, TrialClaim, TrialRecord, sweep_name
from sweeps.study import best_trial, propose
from sweeps.trial import cached_outcome
from tapeline.config import PipelineConfig
from tapeline.errors import ConfigError
from tapeline.processes import end_child, start_child, thread_environment
from tapeline.store import Store, open_store

log = logging.getLogger("tapeline.sweep")
WAIT_POLL_SECONDS = 2.0  # how often a driver looks at trials another process trains
TrialEnd = Callable[[TrialRecord], None]


class Launcher(Protocol):
    """What starts trials and waits for them: local processes, or flow runs on a work pool."""

    def start(self, number: int) -> Any:
        """Start trial `number` (its record is saved); returns a handle with `number` and `log_path`."""

    def wait_any(self, running: dict[int, Any]) -> tuple[int, int]:
        """(trial number, exit status: 0 when it ended normally) of the first of `running` to end."""

    def stop_all(self, running: dict[int, Any]) -> None:
        """Stop every running trial (the driver is failing)."""

    def close(self) -> None:
        """The sweep's trials are done: let go of what is left (idle workers)."""


LauncherFactory = Callable[[PipelineConfig, "SweepFiles", str], Launcher]


@dataclass
class SweepOutcome:
    """What a sweep came to: every trial's record, the best one, where its config was written."""

    name: str
    location: str
    invocation: str
    records: list[TrialRecord]
    best: TrialRecord | None
    best_config: str | None
    planned: int


@dataclass
class TrialProcess:
    """A running trial process and its log file."""

    number: int
    process: subprocess.Popen
    log_path: Path


@dataclass
class LocalLauncher:
    """Trials as local processes (`python -m sweeps.trial`), each with its share of the cores."""

    artifacts: str
    name: str
    invocation: str
    parallel: int
    log_dir: Path

    def start(self, number: int) -> TrialProcess:
        """Start trial `number`'s process."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"trial-{number:05d}.log"
        env = {**os.environ, **thread_environment(self.parallel), "TF_CPP_MIN_LOG_LEVEL": "2"}
        with log_path.open("ab") as out:
            process = start_child(
                [sys.executable, "-m", "sweeps.trial", self.artifacts, self.name, str(number), self.invocation],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        return TrialProcess(number, process, log_path)

    def wait_any(self, running: dict[int, TrialProcess]) -> tuple[int, int]:
        """(trial number, exit status) of the first of `running` to end."""
        while True:
            for number, trial in running.items():
                code = trial.process.poll()
                if code is not None:
                    return number, code
            time.sleep(0.2)

    def stop_all(self, running: dict[int, TrialProcess]) -> None:
        """Stop every running trial (the driver is failing): each resumes from its checkpoint next time."""
        for trial in running.values():
            end_child(trial.process)

    def close(self) -> None:
        """Nothing outlives its trial here."""


@dataclass
class Worker:
    """A warm worker process, the lines it has answered (read by a thread), the trial it runs."""

    process: subprocess.Popen
    answers: Queue[str | None]
    busy: int | None = None
    leaving: bool = False  # it said so with its last answer: it reads no more trials


@dataclass
class WarmTrial:
    """A trial running in a warm worker."""

    number: int
    worker: Worker
    log_path: Path


def _pump(stream: Any, answers: Queue[str | None]) -> None:
    """Every line a worker writes, then None at its end."""
    for line in stream:
        answers.put(line.strip())
    answers.put(None)


@dataclass
class WarmLauncher:
    """Trials in warm worker processes (`python -m sweeps.worker`), `sweep.parallel` of them, each running trials
    one after another with TensorFlow imported once; a worker leaves after `trials_per_worker` trials or when its
    memory has grown past `max_growth_mib`, and the next trial gets a fresh one."""

    artifacts: str
    name: str
    invocation: str
    parallel: int
    log_dir: Path
    trials_per_worker: int
    max_growth_mib: float
    workers: list[Worker] = field(default_factory=list)

    def _spawn(self) -> Worker:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **thread_environment(self.parallel), "TF_CPP_MIN_LOG_LEVEL": "2"}
        with (self.log_dir / "workers.log").open("ab") as log:
            process = start_child(
                [sys.executable, "-m", "sweeps.worker", self.artifacts, self.name, self.invocation,
                 str(self.trials_per_worker), str(self.max_growth_mib), str(self.log_dir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True, bufsize=1)
        answers: Queue[str | None] = Queue()
        threading.Thread(target=_pump, args=(process.stdout, answers), name="sweep-worker-answers",
                         daemon=True).start()
        worker = Worker(process, answers)
        self.workers.append(worker)
        return worker

    def start(self, number: int) -> WarmTrial:
        """Give trial `number` to an idle live worker, or to a fresh one."""
        self.workers = [w for w in self.workers if w.process.poll() is None]  # a leaving one is waited for at close
        worker = next((w for w in self.workers if w.busy is None and not w.leaving), None) or self._spawn()
        worker.busy = number
        assert worker.process.stdin is not None
        worker.process.stdin.write(f"{number}\n")
        worker.process.stdin.flush()
        return WarmTrial(number, worker, self.log_dir / f"trial-{number:05d}.log")

    def wait_any(self, running: dict[int, WarmTrial]) -> tuple[int, int]:
        """(trial number, status) of the first of `running` whose worker answered, or died (its exit status)."""
        while True:
            for number, trial in running.items():
                worker = trial.worker
                with contextlib.suppress(Empty):
                    answer = worker.answers.get(timeout=0.05 if worker.process.poll() is None else 5)
                    worker.busy = None
                    if answer is not None:
                        fields = answer.split()
                        worker.leaving = "leaving" in fields[2:]
                        return number, int(fields[1])
                    worker.process.wait()
                    return number, worker.process.returncode or 1  # it ended before it answered

    def stop_all(self, running: dict[int, WarmTrial]) -> None:
        """Stop every worker (the driver is failing): each trial resumes from its checkpoint next time."""
        for worker in self.workers:
            end_child(worker.process)
        self.workers = []

    def close(self) -> None:
        """Close the idle workers' input: they leave; kill any that lingers."""
        for worker in self.workers:
            with contextlib.suppress(OSError, ValueError):
                assert worker.process.stdin is not None
                worker.process.stdin.close()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                end_child(worker.process)
        self.workers = []


def new_invocation() -> str:
    """An id for one start of the driver (epochs trained are counted per invocation)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _build_shared_inputs(config: PipelineConfig, store: Store, verify: bool = False) -> None:
    """The data and validate outputs every trial reads, built once before any trial starts (the validation gate
    stops the sweep here when the data is bad); with `verify`, a cached one is checked by SHA-256 first."""
    data = run_stage("data", config, store.root, verify=verify)
    run_stage("validate", config, store.root, {"data": data}, verify=verify)


def _proposed_record(config: PipelineConfig, records: dict[int, TrialRecord], number: int) -> TrialRecord:
    """Trial `number`, proposed and validated: running, or failed at once when its config is invalid."""
    params = propose(config.sweep, list(records.values()), number)
    try:
        trial = trial_config(config, params)
    except ConfigError as exc:
        return TrialRecord(number=number, params=params, config={}, state="failed", reason=str(exc))
    return TrialRecord(number=number, params=params, config=trial.model_dump(mode="json"))


def died(record: TrialRecord, code: int, log_path: Path, retry: bool) -> TrialRecord:
    """The record of a trial whose process ended without an outcome: left running (to resume) when it may be
    retried, else failed with the exit status and the log's last line."""
    if retry:
        return record
    how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()] \
        if log_path.exists() else []
    last = f": {lines[-1][:300]}" if lines else ""
    return record.model_copy(update={"state": "failed", "reason": f"the trial's process {how} ({log_path}){last}"})


def _drive(config: PipelineConfig, store: Store, files: SweepFiles, invocation: str, on_trial_end: TrialEnd,
          launcher: Launcher) -> list[TrialRecord]:
    """Run the sweep's trials to the planned number; returns every record."""
    sweep = config.sweep
    planned = planned_trials(config)
    records = {r.number: r for r in files.trials()}
    queue = sorted(n for n, r in records.items() if r.state == "running")  # interrupted: resumed first
    next_number = max(records, default=-1) + 1
    running: dict[int, Any] = {}
    starts: dict[int, int] = {}
    waiting: set[int] = set()  # trials another live process holds (a work pool's, another driver's): not ours

    def claimed_elsewhere(number: int) -> bool:
        return not TrialClaim(files, number, sweep.lease_seconds).is_free()

    def take_back_finished() -> None:
        for number in sorted(waiting):
            record = files.trial(number) or records[number]
            if record.state != "running":
                waiting.discard(number)
                records[number] = record
                on_trial_end(record)
            elif not claimed_elsewhere(number):  # its holder died: resume it here
                waiting.discard(number)
                queue.insert(0, number)

    try:
        while True:
            take_back_finished()
            while len(running) < sweep.parallel and (queue or next_number < planned):
                if queue:
                    number = queue.pop(0)
                else:
                    number, next_number = next_number, next_number + 1
                    records[number] = _proposed_record(config, records, number)
                    files.save(records[number])
                record = records[number]
                if record.state == "running" and claimed_elsewhere(number):
                    log.info("trial %d is being trained by another process; waiting for its outcome", number)
                    waiting.add(number)
                    continue
                if record.state == "running":
                    found = cached_outcome(store, record, invocation)
                    if found is None and not any(records[n].config == record.config for n in running):
                        running[number] = launcher.start(number)
                        starts[number] = starts.get(number, 0) + 1
                        continue
                    if found is None:  # the same config is training right now: its result will be this one's
                        queue.append(number)
                        break
                    record = found
                records[number] = record
                files.save(record)
                on_trial_end(record)
            if not running:
                if queue:
                    continue
                if waiting:
                    time.sleep(WAIT_POLL_SECONDS)
                    continue
                break
            number, code = launcher.wait_any(running)
            ended = running.pop(number)
            record = files.trial(number) or records[number]
            if record.state == "running" and claimed_elsewhere(number):  # its process found the claim held
                waiting.add(number)
                continue
            if record.state == "running":
                record = died(record, code, ended.log_path, starts[number] <= sweep.trial_retries)
                if record.state == "running":
                    log.warning("trial %d's process %s; resuming it", number,
                                f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
                    queue.insert(0, number)
                    records[number] = record
                    continue
                files.save(record)
            records[number] = record
            on_trial_end(record)
    except BaseException:
        launcher.stop_all(running)
        raise
    launcher.close()
    return [records[n] for n in sorted(records)]


def _best_yaml(record: TrialRecord) -> str:
    """The best trial's config as a file `tapeline run --config` takes: only the keys that differ from the
    defaults, no sweep section (that run is all cache hits: it is the trial)."""
    config = PipelineConfig.model_validate(record.config).model_copy(update={"preset": None})
    tree = config.model_dump(mode="json", exclude_defaults=True, exclude={"sweep"})
    return yaml.safe_dump(tree, sort_keys=False)


def _write_best(files: SweepFiles, best: TrialRecord | None) -> str | None:
    """best.yaml in the sweep's directory (and, for a bucket, a local copy a `--config` can name)."""
    if best is None:
        return None
    text = _best_yaml(best)
    header = f"# the best trial ({best.number}) of sweep {files.name}: tapeline run --config THIS_FILE\n"
    files.write((header + text).encode(), "best.yaml")
    location = files.location("best.yaml")
    if "://" not in location:
        return location
    from tapeline.store import cache_dir

    local = cache_dir() / "sweeps" / files.name / "best.yaml"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(header + text)
    return str(local)


def _trial_log_dir(files: SweepFiles) -> Path:
    """Where the trial processes' logs go: `logs/` in the sweep's directory; for a sweep on a bucket, the same place
    in the local read cache (a log is written as the trial runs)."""
    location = files.location("logs")
    if "://" not in location:
        return Path(location)
    from tapeline.store import cache_dir

    return cache_dir() / "sweeps" / files.name / "logs"


def local_launcher(config: PipelineConfig, files: SweepFiles, invocation: str) -> Launcher:
    """Trials on this machine, `sweep.parallel` at a time, their logs in the sweep's directory: in warm workers
    (`sweep.trials_per_worker` > 1), or a process each."""
    sweep = config.sweep
    if sweep.trials_per_worker > 1:
        return WarmLauncher(str(files.store.root), files.name, invocation, sweep.parallel, _trial_log_dir(files),
                            sweep.trials_per_worker, sweep.worker_max_growth_mib)
    return LocalLauncher(str(files.store.root), files.name, invocation, sweep.parallel, _trial_log_dir(files))


def run_sweep(config: PipelineConfig, artifacts: str | Path, on_trial_end: TrialEnd | None = None,
              invocation: str | None = None, launcher: LauncherFactory = local_launcher, verify: bool = False
              ) -> SweepOutcome:
    """Check the space, take the sweep's lease, build the shared inputs, run the trials, write best.yaml.
    `invocation` names this start of the driver (epochs trained are counted per invocation); `launcher` makes
    what starts the trials (local processes; the Prefect flow passes flow runs on a work pool); with `verify` the
    shared inputs are checked by SHA-256 before they are reused."""
    check_space(config)
    store = open_store(artifacts)
    name = sweep_name(config)
    files = SweepFiles(store, name)
    invocation = invocation or new_invocation()
    if planned_trials(config) < config.sweep.trials:
        log.warning("sweep %s: the grid has %d configurations, fewer than sweep.trials=%d; the sweep runs each once",
                    name, planned_trials(config), config.sweep.trials)
    with DriverLease(files, config.sweep.lease_seconds):
        files.check_definition(config)
        _build_shared_inputs(config, store, verify)
        records = _drive(config, store, files, invocation, on_trial_end or (lambda _r: None),
                        launcher(config, files, invocation))
        best = best_trial(config.sweep, records)
        best_config = _write_best(files, best)
    return SweepOutcome(name, files.location(), invocation, records, best, best_config, planned_trials(config))
