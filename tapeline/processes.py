"""Child processes that die with their parent (trial processes, the temporary Prefect server), and the share of
the cores each of several gets."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGKILL when the thread that started it dies (Linux), so a
    `kill -9` of the parent leaves no orphan behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def tied_to_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen that ties the child's life to this process (None off Linux)."""
    return die_with_parent if sys.platform == "linux" else None


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_environment(processes: int, cores: int | None = None) -> dict[str, str]:
    """Environment that gives each of `processes` TensorFlow processes its share of the cores (at least one thread
    each), so that several at once do not oversubscribe the machine."""
    share = max(1, (cores or usable_cores()) // max(1, processes))
    return {"TF_NUM_INTRAOP_THREADS": str(share), "TF_NUM_INTEROP_THREADS": str(min(2, share)),
            "OMP_NUM_THREADS": str(share)}
