"""The ``demhx`` command: signal handlers first, then the run (:mod:`demhx._command`).

Exit status: 0 done, 2 usage and input errors, 1 failures while running (or a failed map of
several), 128 + the signal's number when stopped by one (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP),
reported in one line (:func:`stop_line`). This module needs only the standard library, so that
:func:`run` installs the handlers (:mod:`demhx._signals`) before anything else is imported.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from demhx import _signals

__all__ = ["main", "run", "stop_line"]

PROGRAM = "demhx"
_MANY_NAMES = 3  # a stop line names up to this many outputs, then counts them


def run() -> NoReturn:
    """The console script (and ``python -m demhx``): :func:`main`, then exit with its status,
    skipping the interpreter's teardown, which only frees memory (0.15 s with a map loaded)."""
    _signals.catch()  # first: from here on a signal ends the run with one line
    status = 1
    try:
        status = main()
        sys.stdout.flush()
    except KeyboardInterrupt as interrupt:  # before main could take it: nothing started
        status = _stopped(interrupt, None)
    except BrokenPipeError:  # the reader of the help or version text stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = status or 1
    _signals.close()  # the outcome is final: a signal now cannot cut the exit short
    atexit._run_exitfuncs()  # logging.shutdown and the others, as a normal exit runs them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a hung-up terminal
            pass
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's); returns the exit status."""
    watch = _signals.OutputWatch()
    with _signals.handled():  # SIGTERM and SIGHUP stop the run as Ctrl-C does
        try:
            from demhx import _command

            status = _command.main(list(sys.argv[1:] if argv is None else argv), watch)
            _signals.close()  # the outcome is final: a signal now is ignored
        except BaseException as error:
            # A signal's, also where code on its way turned it into another error.
            interrupt = error if isinstance(error, KeyboardInterrupt) else _signals.taken()
            if interrupt is None:
                raise  # a closed pipe (see run), or a bug
            return _stopped(interrupt, watch)
    return status


def stop_line(signal_name: str, written: Sequence[str] | None) -> str:
    """The line that ends a run stopped by a signal (``"SIGINT"``, ``"SIGTERM"``, ...), given
    the outputs it wrote, each complete (None: stopped before it noted them)."""
    what = _signals.how_stopped(signal_name)
    if written is None:
        return f"{PROGRAM}: {what} before any work; nothing written"
    if not written:
        return f"{PROGRAM}: {what}; no output written"
    if len(written) > _MANY_NAMES:
        names, these = f"{len(written)} files ({written[0]} ... {written[-1]})", "all are"
    elif len(written) > 1:
        names = f"{', '.join(written[:-1])} and {written[-1]}"
        these = "both are" if len(written) == 2 else "all are"
    else:
        names, these = written[0], "it is"
    return f"{PROGRAM}: {what} after writing {names}; {these} complete, nothing else was written"


def _stopped(interrupt: KeyboardInterrupt, watch: _signals.OutputWatch | None) -> int:
    """Say in one line what stopped the run and what it wrote; the signal's exit status."""
    _signals.close()  # nothing cuts the line short
    name = _signals.signal_name(interrupt)
    line = stop_line(name, None if watch is None else watch.written())
    try:
        after_echo = name == "SIGINT" and sys.stderr.isatty()  # the terminal has printed ^C
        sys.stderr.write(("\n" if after_echo else "") + line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a terminal that hung up (SIGHUP)
        pass
    return _signals.exit_status(interrupt)

