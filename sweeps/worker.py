"""A warm trial worker: one process (`python -m sweeps.worker ARTIFACTS SWEEP INVOCATION TRIALS MAX_GROWTH_MIB`,
spawned by the driver, never forked from a process that imported TensorFlow) that runs trials one after another,
TensorFlow and tapeline imported once. The driver writes a trial number per line on its stdin; the worker answers
`<number> <status>` on its stdout when the trial's record holds its outcome (status 0, or 75 when another live copy
holds the trial), followed by ` leaving` when it leaves after that trial. After each trial Keras's session is
cleared, the gradient functions TensorFlow registered for the trial's traced steps are dropped, and the garbage
collected (the trial's stages set the seeds, as `tapeline run` does); each trial logs to its own file. The worker
leaves after `TRIALS` trials, or once its resident memory has grown by more than `MAX_GROWTH_MIB` since the end of
its first trial (the first trial's end holds the working set: TensorFlow's runtime, the training split in memory):
the driver starts a fresh one for the next trial. A worker dies with its driver, and a killed worker is a killed
trial, resumed from its checkpoint by a fresh one."""

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


def _gradient_registry() -> dict[str, object] | None:
    """TensorFlow's global gradient registry (a private API: None where it is not there)."""
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


def registered_gradients() -> set[str]:
    """The names in TensorFlow's global gradient registry now (empty where it cannot be read)."""
    return set(_gradient_registry() or {})


def forget_traced_gradients(keep: set[str]) -> int:
    """Drop the graph-mode custom gradients registered since `keep` was taken; how many were dropped.

    Tracing a train step under a tf.distribute strategy registers a `CustomGradient-N` in TensorFlow's global
    gradient registry (`ReplicaContext.all_reduce`'s gradient), and the entry holds the traced graph forever
    (tensorflow#27492, #97697; still so in TF 2.21): about 7 to 13 MiB a trial, with Keras's `fit` as with
    tapeline's step. Once the trial's models and functions are gone nothing can ask for those gradients again."""
    registry = _gradient_registry()
    if registry is None:
        return 0
    stale = [name for name in registry if name.startswith("CustomGradient-") and name not in keep]
    for name in stale:
        del registry[name]
    return len(stale)


def fresh_session(keep_gradients: set[str]) -> None:
    """What Keras Tuner does before each build, a cleared Keras session and a garbage collection, with the
    gradients TensorFlow registered since `keep_gradients` was taken dropped; then the freed heap handed back to the
    system (glibc keeps it otherwise, and a worker's resident memory would only grow)."""
    import keras

    keras.backend.clear_session(free_memory=True)
    forget_traced_gradients(keep_gradients)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def should_leave(trials_done: int, trials_per_worker: int, first_rss: float, rss: float, max_growth_mib: float
                 ) -> bool:
    """Whether the worker has run its share of trials, or its resident memory `rss` has grown past the bound since
    its first trial's end (`first_rss`)."""
    return trials_done >= trials_per_worker or rss - first_rss > max_growth_mib


def serve(commands: TextIO, answers: TextIO, artifacts: str, name: str, invocation: str, trials_per_worker: int,
          max_growth_mib: float, log_dir: Path) -> int:
    """Run the trials named on `commands` until it closes or the worker should leave; the trials run."""
    store = open_store(artifacts)
    files = SweepFiles(store, name)
    done, first_rss = 0, 0.0
    keep = registered_gradients()
    for line in commands:
        number = int(line)  # the session is fresh: cleared after the last trial (or none ran here yet)
        status = 0
        with trial_log(log_dir / f"trial-{number:05d}.log"):
            try:
                record = run_trial(store, files, number, invocation)
                log.info("trial %d %s", record.number, record.state)
            except TrialClaimedError as exc:
                log.info("%s; leaving it to that process", exc)
                status = CLAIMED
        done += 1
        fresh_session(keep)  # for the next trial, and the memory released before it is measured
        rss = resident_mib()
        first_rss = first_rss or rss
        log.info("trial %d done in this worker (%d so far); resident memory %.0f MiB", number, done, rss)
        leaving = should_leave(done, trials_per_worker, first_rss, rss, max_growth_mib)
        answers.write(f"{number} {status}{' leaving' if leaving else ''}\n")  # the driver gives it nothing more
        answers.flush()
        if leaving:
            log.info("worker leaves after %d trials (resident memory %.0f MiB, %.0f after its first)", done, rss,
                     first_rss)
            break
    return done


def main(argv: list[str]) -> int:
    """The worker process: the protocol on the original stdout, everything else printed goes to stderr."""
    artifacts, name, invocation, trials, growth, log_dir = argv
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print never reaches the driver's protocol
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)  # tf.data logs each epoch's sharding callback at INFO
    serve(sys.stdin, answers, artifacts, name, invocation, int(trials), float(growth), Path(log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
