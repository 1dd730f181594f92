"""The interrupt handler on its own: the first signal raises, a second one (or the grace period) forces the exit."""

from __future__ import annotations

import signal
import time

import pytest

from tapeline.interrupts import MESSAGE, Interrupted, InterruptHandler, interruptible


class Exited(Exception):
    """Stands for os._exit in these tests."""


def recording_handler(grace: float = 60.0) -> tuple[InterruptHandler, list[str], list[int]]:
    lines: list[str] = []
    codes: list[int] = []

    def force_exit(code: int) -> None:
        codes.append(code)
        raise Exited

    return InterruptHandler(grace=grace, write=lines.append, force_exit=force_exit), lines, codes


def test_the_first_signal_raises_interrupted_with_the_shells_exit_status() -> None:
    handler, lines, codes = recording_handler()
    with pytest.raises(Interrupted) as caught:
        handler(signal.SIGINT, None)
    assert caught.value.status == 130 and isinstance(caught.value, KeyboardInterrupt)
    assert lines == [] and codes == []
    handler.announce()
    handler.announce()
    assert lines == [MESSAGE]
    handler.timer.cancel()


def test_a_second_signal_exits_at_once_with_one_line() -> None:
    handler, lines, codes = recording_handler()
    with pytest.raises(Interrupted):
        handler(signal.SIGTERM, None)
    with pytest.raises(Exited):
        handler(signal.SIGINT, None)
    assert codes == [130] and lines == [MESSAGE]
    handler.timer.cancel()


def test_the_grace_period_forces_the_exit_when_unwinding_hangs() -> None:
    lines: list[str] = []
    codes: list[int] = []
    handler = InterruptHandler(grace=0.2, write=lines.append, force_exit=codes.append)
    with pytest.raises(Interrupted):
        handler(signal.SIGTERM, None)
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert codes == [143] and lines == [MESSAGE]


def test_interruptible_restores_the_handlers_unless_a_signal_came() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interruptible() as handler:
        assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is handler
    assert signal.getsignal(signal.SIGINT) is before
