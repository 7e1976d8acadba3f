"""The ``demhx`` command: parse the arguments (with fire), call :func:`demhx.enhance_file`, report.

Exit status: 0 on success, 2 for usage and input errors (bad option, missing or invalid
file, existing output, unknown model, CUDA unavailable), 1 for failures while running,
128 + the signal's number when stopped by a signal: 130 for Ctrl-C (SIGINT), 143 for
SIGTERM, 129 for SIGHUP; every temporary file is removed and nothing is half-written.
Errors are one line on stderr, ``demhx: error: <message>``; the traceback is shown only with
``--debug``. Options are matched exactly (fire's prefix matching is not used; see
:mod:`demhx._argv`), and DeepEMhancer's flags are accepted where they mean the same.
Progress, the device line and the summary go to stderr too (hidden by ``--quiet``); warnings
always print as ``demhx: warning: <message>``.

Several maps (``demhx IN... --out-dir DIR`` or ``--suffix SUF``) run with one model load and
go on past a map that fails; a table (one row per map) ends the run on stderr, and the exit
status is 1 if any map failed. Under a job array (``--shard K/N``, else SLURM's array
variables) only this job's share of the maps runs.

A signal ends the run with one line (:func:`stop_line`) whenever it comes, and a second one
changes nothing. :func:`run` installs the handlers (:mod:`demhx._signals`) before anything
else is imported: this module needs only the standard library, and the work (reading the
words, the run, its messages) is :mod:`demhx._command`'s. The line names the outputs that
were written as found on disk (:class:`OutputWatch`): an output is moved into place only
when it is complete, so one that appeared is whole.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from demhx import _signals

__all__ = ["HELP", "USAGE", "Arguments", "OutputWatch", "describe_error", "help_text", "main",
           "parse_arguments", "run", "stop_line"]

if TYPE_CHECKING:
    from demhx._arguments import Arguments, parse_arguments
    from demhx._help import HELP, USAGE, help_text
    from demhx.errors import describe_error

PROGRAM = "demhx"
_LAZY = {"HELP": "demhx._help", "USAGE": "demhx._help", "help_text": "demhx._help",
         "Arguments": "demhx._arguments", "parse_arguments": "demhx._arguments",
         "describe_error": "demhx.errors"}
"""The parsing and help names this module offers, imported on first use."""
_MANY_NAMES = 3  # a stop line names up to this many outputs, then counts them


def run() -> NoReturn:
    """The console script (and ``python -m demhx``): :func:`main`, then exit with its status.

    The signal handlers come first, before the imports of the run. The exit handlers run and
    the standard streams are flushed, then the process ends without the interpreter's
    teardown, which only frees memory: with numba's registries, ONNX Runtime and a map's
    arrays loaded, that teardown took 0.15 s, a tenth of a 256³ run. Every output is
    complete and closed before :func:`main` returns.
    """
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
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    watch = OutputWatch()
    with _signals.handled():  # SIGTERM and SIGHUP stop the run as Ctrl-C does
        try:
            from demhx import _command

            status = _command.main(args, watch)
            _signals.close()  # the outcome is final: a signal now is ignored
        except BaseException as error:
            # A signal's, also where code on its way turned it into another error.
            interrupt = error if isinstance(error, KeyboardInterrupt) else _signals.taken()
            if interrupt is None:
                raise  # a closed pipe (see run), or a bug
            return _stopped(interrupt, watch)
    return status


def stop_line(signal_name: str, written: Sequence[str] | None) -> str:
    """The line that ends a run stopped by a signal (``"SIGINT"``, ``"SIGTERM"``, ...).

    ``written``: the outputs the run had written, each complete; None when the signal came
    before the run had noted its outputs (before any work).
    """
    what = "interrupted" if signal_name == "SIGINT" else f"stopped by {signal_name}"
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


def _stopped(interrupt: KeyboardInterrupt, watch: OutputWatch | None) -> int:
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
        before = (self._before or {}).get(str(path))
        return _file_state(str(path)) not in (None, before)

    def written(self) -> list[str] | None:
        """The watched files written since :meth:`watch`, in its order; None before it."""
        if self._before is None:
            return None
        return [path for path in self._before if self.changed(path)]


def _file_state(path: str) -> tuple[int, ...] | None:
    """A file's identity and version (device, inode, size, modification time); None when
    there is no such file."""
    try:
        status = os.stat(os.path.expanduser(path))
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def __getattr__(name: str) -> Any:
    """The parsing and help names (:data:`_LAZY`), imported on first use."""
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
