"""The interrupt handler on its own: the first signal raises, a second one (or the grace period) forces the exit."""

from __future__ import annotations

import signal
import time

import pytest

from tapeline.interrupts import MESSAGE, Interrupted, InterruptHandler, interruptible, pending_interrupt


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


def test_a_signal_that_native_code_turned_into_another_exception_ends_the_stage_as_an_interrupt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.training as training

    def traced_by_tensorflow(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized active exception types")

    monkeypatch.setattr(training, "run_stage", traced_by_tensorflow)
    monkeypatch.setattr(training, "progress_reporter", lambda: None)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with interruptible(recording_handler()[0]) as handler:
            assert pending_interrupt() is None
            with pytest.raises(RuntimeError, match="pybind11"):  # no signal came: the error is the error
                training._stage_or_failure("train", None, "unused", {}, False)
            handler.received = signal.SIGINT  # as the handler records it before it raises
            with pytest.raises(Interrupted) as caught:
                training._stage_or_failure("train", None, "unused", {}, False)
        assert caught.value.status == 130 and isinstance(caught.value.__cause__, RuntimeError)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert pending_interrupt() is None
