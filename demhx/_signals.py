"""Termination signals: SIGTERM and SIGHUP stop a run the way Ctrl-C does.

Batch systems stop a job with SIGTERM (SLURM's ``scancel``, ``docker stop``, systemd) and a
closed terminal sends SIGHUP. Python's default for both is to die at once, skipping the
clean-up that removes temporary files. :func:`handled` (entered by the command line) makes
SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`, a ``KeyboardInterrupt``, so the same
``except``/``finally`` clean-up runs for all three. :func:`deferred` holds these signals back
for the few statements that must not be cut in two (moving an output and its confidence map
into place) and delivers them when the block ends.

Only the main thread can install signal handlers; elsewhere both are no-ops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that stop a run: Ctrl-C, termination, hang-up (not on Windows)."""
EXIT_BASE = 128  # shells report a process stopped by signal N with status 128 + N


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``signum`` is the signal, ``exit_status`` 128 + signum."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        """The signal's name, e.g. ``SIGTERM``."""
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_status(self) -> int:
        """The exit status that reports this signal: 130 for SIGINT, 143 SIGTERM, 129 SIGHUP."""
        return EXIT_BASE + self.signum


def exit_status(error: KeyboardInterrupt) -> int:
    """The exit status for an interruption (a plain ``KeyboardInterrupt`` is SIGINT's 130)."""
    return error.exit_status if isinstance(error, Interrupted) else EXIT_BASE + signal.SIGINT


def signal_name(error: KeyboardInterrupt) -> str:
    """``SIGTERM``, ``SIGHUP`` or ``SIGINT`` for an interruption."""
    return error.name if isinstance(error, Interrupted) else "SIGINT"


def _raise(signum: int, frame: FrameType | None) -> None:
    """Stop the run; further signals are ignored so that the clean-up is not cut short."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handled() -> Iterator[None]:
    """Inside the block SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (the first of
    them; later ones are ignored until the block ends, while the clean-up runs)."""
    if not _in_main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise) for number in SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back inside the block; deliver the first at its end.

    The signal then goes to the handler that was installed before the block (raising
    :class:`Interrupted` under :func:`handled`, ``KeyboardInterrupt`` by Python's default,
    or the default action, which ends the process).
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {number: signal.signal(number, hold) for number in SIGNALS}
    try:
        yield
    finally:
        _restore(previous)
        if pending:
            _deliver(pending[0], previous.get(signal.Signals(pending[0])))


def _restore(previous: dict[signal.Signals, Any]) -> None:
    for number, handler in previous.items():
        signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _deliver(signum: int, handler: Callable[[int, FrameType | None], Any] | int | None) -> None:
    """Act on a held signal as ``handler`` would have."""
    if callable(handler):
        handler(signum, None)
    elif handler != signal.SIG_IGN:
        signal.raise_signal(signum)  # the default action
