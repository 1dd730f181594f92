"""Child processes that die with their parent (trial processes, training workers, the temporary Prefect API),
and the share of the cores each of several gets."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1
# Every child started by `start_child`, so that an interrupted command can end them all before it exits.
_CHILDREN: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGKILL when the thread that started it dies (Linux), so a
    `kill -9` of the parent leaves no orphan behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tied_to_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen that ties the child's life to this process (None off Linux)."""
    return _die_with_parent if sys.platform == "linux" else None


def start_child(argv: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Start a child of this command: it dies with this process (a `kill -9` leaves no orphan) and lives in a
    process group of its own, so that a Ctrl-C at the terminal reaches only this process, which then ends its
    children in order (the Prefect API last, after the flow run's final state is reported); `end_children` ends it
    when the command must exit at once."""
    process = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=_tied_to_parent(),  # noqa: S603, PLW1509
                               **popen)
    _CHILDREN.add(process)
    return process


def end_child(process: subprocess.Popen) -> None:
    """Kill a child started by `start_child` and everything in its process group; reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(ChildProcessError, OSError):
        process.wait(timeout=2)


def end_children() -> None:
    """Kill every child this process started with `start_child` that still runs."""
    for process in list(_CHILDREN):
        end_child(process)


def _usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_environment(processes: int, cores: int | None = None) -> dict[str, str]:
    """Environment that gives each of `processes` TensorFlow processes its share of the cores (at least one thread
    each), so that several at once do not oversubscribe the machine."""
    share = max(1, (cores or _usable_cores()) // max(1, processes))
    return {"TF_NUM_INTRAOP_THREADS": str(share), "TF_NUM_INTEROP_THREADS": str(min(2, share)),
            "OMP_NUM_THREADS": str(share)}
