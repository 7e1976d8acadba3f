"""Termination signals: SIGINT, SIGTERM and SIGHUP stop a run once, and cleanly.

Batch systems stop a job with SIGTERM (SLURM's ``scancel``, ``docker stop``, systemd) and a
closed terminal sends SIGHUP. Python's default for both is to die at once, skipping the
clean-up that removes temporary files. Here the first of the three signals raises
:class:`Interrupted`, a ``KeyboardInterrupt``, so the same ``except``/``finally`` clean-up
runs for all three. Every later signal is ignored, and so is any signal once the outcome is
final (:func:`close`), so that neither the clean-up nor the line that reports it is cut
short. The handler stays a Python function throughout: a signal already on its way while
``SIG_IGN`` is swapped in makes Python print "Signal N ignored due to race condition".

:func:`catch` installs the handler for the rest of the process (the command does so before
anything else); :func:`handled` installs it for a block and restores the previous handlers
after it. Code between the handler and the command's report may turn :class:`Interrupted`
into another error (an extension module's import, ``__set_name__``), so :func:`taken` says
whether a signal was taken, whatever arrived. :func:`deferred` holds the signals back for the
few statements that must not be cut in two (moving an output and its confidence map into
place) and delivers them when the block ends.

:class:`OutputWatch` notes the files a run may write before it writes any, so that the line
that reports a stop names those it wrote.

Only the main thread can install signal handlers; elsewhere these functions do nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
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


def how_stopped(name: str) -> str:
    """How a run stopped by the signal ``name`` says so: ``interrupted`` (Ctrl-C) or
    ``stopped by SIGTERM``."""
    return "interrupted" if name == "SIGINT" else f"stopped by {name}"


class _State:
    """Where the handler stands: the signal taken (None: none yet), whether the outcome is
    final, and whether :func:`catch` installed the handler for the whole process."""

    def __init__(self) -> None:
        self.taken: int | None = None
        self.closed = False
        self.for_process = False

    def reset(self) -> None:
        self.taken, self.closed = None, False


_STATE = _State()


def _take(signum: int, frame: FrameType | None) -> None:
    """The handler: the first signal stops the run; later ones, and any once the outcome is
    final, are ignored."""
    if _STATE.taken is not None or _STATE.closed:
        return
    _STATE.taken = signum
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def catch() -> None:
    """Install the handler for the rest of the process (the command, first thing).

    A signal the process was started with ignored stays ignored: ``nohup``'s SIGHUP, a
    background job's SIGINT.
    """
    if not _in_main_thread():
        return
    _STATE.reset()
    _STATE.for_process = True
    for number in SIGNALS:
        if signal.getsignal(number) != signal.SIG_IGN:
            signal.signal(number, _take)


def close() -> None:
    """The outcome is final: from now on every signal is ignored (until :func:`handled`
    ends, or for the rest of the process under :func:`catch`)."""
    _STATE.closed = True


def taken() -> Interrupted | None:
    """The interruption by the signal taken so far, or None when none was taken."""
    return None if _STATE.taken is None else Interrupted(_STATE.taken)


def raise_taken() -> None:
    """Raise :class:`Interrupted` again if a signal was taken: its exception was turned into
    another error, or swallowed, on its way, and the run must still stop as asked."""
    if _STATE.taken is not None:
        raise Interrupted(_STATE.taken)


@contextmanager
def handled() -> Iterator[None]:
    """Inside the block the first SIGINT, SIGTERM or SIGHUP raises :class:`Interrupted`;
    later ones are ignored while the clean-up runs. Under :func:`catch` the handler is
    already in place and this does nothing."""
    if _STATE.for_process or not _in_main_thread():
        yield
        return
    _STATE.reset()
    previous: dict[signal.Signals, Any] = {}
    try:
        for number in SIGNALS:
            previous[number] = signal.signal(number, _take)
        yield
    finally:
        _STATE.closed = True  # a signal arriving while the handlers are put back is ignored
        _restore(previous)
        _STATE.reset()


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back inside the block; deliver the first at its end.

    The signal then goes to the handler that was installed before the block (raising
    :class:`Interrupted` under :func:`handled` or :func:`catch`, ``KeyboardInterrupt`` by
    Python's default, or the default action, which ends the process).
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous: dict[signal.Signals, Any] = {}
    try:
        for number in SIGNALS:
            previous[number] = signal.signal(number, hold)
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


class OutputWatch:
    """The files a run may write, each with its state before the run, to tell which ones it
    wrote: demhx moves a file into place only when it is complete, so a file that appeared
    (or was replaced) is whole."""

    def __init__(self) -> None:
        self._before: dict[str, tuple[int, ...] | None] | None = None

    def watch(self, paths: Iterable[object]) -> None:
        """Note the files ``paths`` (None entries left out) before anything is written."""
        self._before = {str(path): _file_state(str(path)) for path in paths if path is not None}

    def changed(self, path: object) -> bool:
        """Whether the watched file ``path`` was written since :meth:`watch`."""
        return _file_state(str(path)) not in (None, (self._before or {}).get(str(path)))

    def written(self) -> list[str] | None:
        """The watched files written since :meth:`watch`, in its order; None before it."""
        if self._before is None:
            return None
        return [path for path in self._before if self.changed(path)]


def _file_state(path: str) -> tuple[int, ...] | None:
    """A file's device, inode, size and modification time; None when there is no such file."""
    try:
        status = os.stat(os.path.expanduser(path))
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns
