"""Ctrl-C (SIGINT) and SIGTERM for the commands that work: the first signal abandons the current step (an
`Interrupted` raised where the main thread is), so that a stage's staging directory and its last checkpoint
stay, Prefect reports the run's end, and the command's children end; the command then exits with one line and
128 + the signal's number. Should the unwinding take longer than a grace period, or a second signal come, the
command ends its children and exits at once: outputs are committed by a rename or a manifest written last, so
what a forced exit leaves behind is what a `kill -9` leaves, which the next run resumes from."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

from tapeline.processes import end_children

MESSAGE = "tapeline: interrupted; run the same command to go on"
GRACE_SECONDS = 5.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command received SIGINT or SIGTERM. A KeyboardInterrupt, so that no `except Exception` swallows it
    and Prefect records the run as aborted by a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def status(self) -> int:
        """The exit status of a command ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def _write_stderr(text: str) -> None:
    """Write a line to file descriptor 2 directly (safe inside a signal handler and at any point of shutdown)."""
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())


@dataclass
class InterruptHandler:
    """The signal handler of `interruptible`: the first signal raises `Interrupted` and arms a timer that forces
    the exit after `grace` seconds; a second signal forces it at once."""

    grace: float = GRACE_SECONDS
    write: Callable[[str], None] = _write_stderr
    force_exit: Callable[[int], None] = os._exit
    received: int | None = None
    announced: bool = False
    timer: threading.Timer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            self.exit_now(signum)
            return
        self.received = signum
        self.timer = threading.Timer(self.grace, self.exit_now, args=(signum,))
        self.timer.daemon = True
        self.timer.start()
        raise Interrupted(signum)

    def announce(self) -> None:
        """Say, once, that the command was interrupted and how to go on."""
        with self.lock:
            if self.announced:
                return
            self.announced = True
        self.write(MESSAGE)

    def exit_now(self, signum: int) -> None:
        """End every child, say so once, and exit with 128 + signum without unwinding further."""
        end_children()
        self.announce()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        self.force_exit(128 + signum)


def pending_interrupt() -> Interrupted | None:
    """The `Interrupted` of a signal this command received, or None. An exception raised by the handler inside a
    Python callback of native code (TensorFlow tracing a tf.data function, say) comes out of it as another
    exception, a RuntimeError from pybind11: whoever catches that asks here whether it was an interrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, InterruptHandler) and handler.received is not None:
        return Interrupted(handler.received)
    return None


@contextlib.contextmanager
def interruptible(handler: InterruptHandler | None = None) -> Iterator[InterruptHandler]:
    """Within the block, SIGINT and SIGTERM are handled by `handler` (main thread only; elsewhere nothing is
    installed); the previous handlers come back after it, unless a signal came: then the handler stays for the
    rest of the exit, so that a second signal still exits at once."""
    handler = handler or InterruptHandler()
    if threading.current_thread() is not threading.main_thread():
        yield handler
        return
    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield handler
    finally:
        if handler.received is None:
            for signum, old in previous.items():
                signal.signal(signum, old)
