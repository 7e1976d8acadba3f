"""SIGTERM and SIGHUP as Ctrl-C, and signals held back while outputs are moved into place."""

from __future__ import annotations

import signal
import threading

import pytest

from demhx import _signals


def _to_this_thread(signum: int) -> None:
    """Send ``signum`` to this (the main) thread: a signal sent to the process may be taken
    by another thread (ONNX Runtime's or numba's, left by earlier tests), whose C handler
    can run only after the block under test has ended when the machine is busy."""
    signal.pthread_kill(threading.get_ident(), signum)


def _handlers() -> dict[int, object]:
    return {number: signal.getsignal(number) for number in _signals.SIGNALS}


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                                (signal.SIGINT, 130)])
def test_handled_signals_raise_interrupted(signum: int, status: int) -> None:
    before = _handlers()
    with pytest.raises(KeyboardInterrupt) as caught, _signals.handled():
        _to_this_thread(signum)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert isinstance(caught.value, _signals.Interrupted)
    assert _signals.exit_status(caught.value) == status
    assert _signals.signal_name(caught.value) == signal.Signals(signum).name
    assert _handlers() == before


def test_deferred_holds_a_signal_until_the_block_ends() -> None:
    steps = []
    with pytest.raises(_signals.Interrupted), _signals.handled():
        with _signals.deferred():
            _to_this_thread(signal.SIGTERM)
            for _ in range(1000):
                pass
            steps.append("finished")  # not cut short
        steps.append("after")  # the held signal is delivered at the end of the block
    assert steps == ["finished"]


def test_deferred_without_handlers_delivers_to_python_default() -> None:
    # Python's own handler, also when the suite runs as a background job (a shell starts
    # those with SIGINT ignored, and Python then leaves it ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _raises_keyboard_interrupt_after_the_block()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _raises_keyboard_interrupt_after_the_block() -> None:
    with pytest.raises(KeyboardInterrupt), _signals.deferred():
        _to_this_thread(signal.SIGINT)
        for _ in range(1000):
            pass


def test_plain_keyboard_interrupt_is_sigint() -> None:
    assert _signals.exit_status(KeyboardInterrupt()) == 130
    assert _signals.signal_name(KeyboardInterrupt()) == "SIGINT"
