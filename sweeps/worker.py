"""A warm trial worker: one process (`python -m sweeps.worker ARTIFACTS SWEEP INVOCATION TRIALS MAX_GROWTH_MIB`,
spawned by the driver, never forked from a process that imported TensorFlow) that runs trials one after another,
TensorFlow and tapeline imported once. The driver writes a trial number per line on its stdin; the worker answers
`<number> <status>` on its stdout when the trial's record holds its outcome (status 0, or 75 when another live copy
holds the trial). Before each trial Keras's session is cleared and the garbage collected (the trial's stages set
the seeds, as `tapeline run` does); each trial logs to its own file. The worker leaves after `TRIALS` trials, or
once its resident memory has grown by more than `MAX_GROWTH_MIB` since its first trial (TensorFlow keeps memory
across `fit`s even with the session cleared: tensorflow#61791): the driver starts a fresh one for the next trial.
A worker dies with its driver, and a killed worker is a killed trial, resumed from its checkpoint by a fresh one."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from sweeps.state import SweepFiles, TrialClaimedError
from sweeps.trial import CLAIMED, run_trial
from tapeline.store import open_store

log = logging.getLogger("tapeline.sweep.worker")
LOG_FORMAT = "%(asctime)s trial %(name)s %(levelname)s %(message)s"


def resident_mib(status: Path = Path("/proc/self/status")) -> float:
    """This process's resident memory (VmRSS), MiB; 0 where /proc is not there."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@contextlib.contextmanager
def trial_log(path: Path) -> Iterator[None]:
    """Send the logging of one trial to its own file (the driver reads its last line when the trial fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def fresh_session() -> None:
    """What Keras Tuner does before each build, a cleared Keras session and a garbage collection; then the freed
    heap handed back to the system (glibc keeps it otherwise, and a worker's resident memory would only grow)."""
    import keras

    keras.backend.clear_session(free_memory=True)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def should_leave(trials_done: int, trials_per_worker: int, first_rss: float, max_growth_mib: float) -> bool:
    """Whether the worker has run its share of trials, or its memory has grown past the bound."""
    return trials_done >= trials_per_worker or resident_mib() - first_rss > max_growth_mib


def serve(commands: TextIO, answers: TextIO, artifacts: str, name: str, invocation: str, trials_per_worker: int,
          max_growth_mib: float, log_dir: Path) -> int:
    """Run the trials named on `commands` until it closes or the worker should leave; the trials run."""
    store = open_store(artifacts)
    files = SweepFiles(store, name)
    done, first_rss = 0, 0.0
    for line in commands:
        number = int(line)
        fresh_session()
        first_rss = first_rss or resident_mib()
        status = 0
        with trial_log(log_dir / f"trial-{number:05d}.log"):
            try:
                record = run_trial(store, files, number, invocation)
                log.info("trial %d %s", record.number, record.state)
            except TrialClaimedError as exc:
                log.info("%s; leaving it to that process", exc)
                status = CLAIMED
        done += 1
        log.info("trial %d done in this worker (%d so far); resident memory %.0f MiB", number, done, resident_mib())
        answers.write(f"{number} {status}\n")
        answers.flush()
        if should_leave(done, trials_per_worker, first_rss, max_growth_mib):
            log.info("worker leaves after %d trials (resident memory %.0f MiB, %.0f at its first)", done,
                     resident_mib(), first_rss)
            break
    return done


def main(argv: list[str]) -> int:
    """The worker process: the protocol on the original stdout, everything else printed goes to stderr."""
    artifacts, name, invocation, trials, growth, log_dir = argv
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print never reaches the driver's protocol
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    serve(sys.stdin, answers, artifacts, name, invocation, int(trials), float(growth), Path(log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
