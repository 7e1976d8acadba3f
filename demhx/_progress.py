"""Progress over cubes for the command line: a redrawn bar on a terminal, lines in a log.

On a terminal the bar is redrawn in place; when stderr is a file or a pipe (cluster logs,
``nohup``, CI) a carriage-return bar would stay invisible until the end, so a plain line is
written instead every :data:`LINE_FRACTION` of the cubes or :data:`LINE_SECONDS`, whichever
comes first, and at the end.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

_REDRAW_SECONDS = 0.1
LINE_FRACTION = 0.1  # logs: a line each time another tenth of the cubes is done ...
LINE_SECONDS = 30.0  # ... or this many seconds after the last line, whichever comes first


class ProgressBar:
    """Callable as ``bar(done, total)``; draws ``[#####-----] 120/343 cubes 35% 12 s, ~22 s left``.

    Parameters
    ----------
    stream : where to draw (default: ``sys.stderr`` at construction).
    enabled : report at all; None reports on a terminal (the bar) and elsewhere (lines),
        False never, True always.
    width : characters of the bar itself.
    lines : one line per report instead of a redrawn bar; None: when ``stream`` is not a
        terminal.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None,
                 width: int = 30, lines: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = True if enabled is None else enabled
        self.lines = not _is_terminal(self.stream) if lines is None else lines
        self.width = width
        self._start = time.perf_counter()
        self._last_draw = -1.0
        self._last_line = (0.0, 0)  # time and tenth of the last line
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        """Record progress: redraw at most every 0.1 s, or write a line when due; always at
        the end."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if done == 0:
            self._start = now
            self._last_line = (now, 0)
        if self.lines:
            self._line(done, total, now)
            return
        if done < total and now - self._last_draw < _REDRAW_SECONDS:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render(done, total, now - self._start))
        self.stream.flush()
        self._drawn = True

    def _line(self, done: int, total: int, now: float) -> None:
        """A line when another tenth of the cubes is done, :data:`LINE_SECONDS` have passed
        since the last line, or all cubes are done."""
        tenth = _tenths(done, total)
        last_time, last_tenth = self._last_line
        if done == 0 or not (done >= total or tenth > last_tenth
                             or now - last_time >= LINE_SECONDS):
            return
        self._last_line = (now, tenth)
        self.stream.write(self.line(done, total, now - self._start) + "\n")
        self.stream.flush()

    def render(self, done: int, total: int, seconds: float) -> str:
        """The bar as text (no carriage return)."""
        fraction = done / total if total else 1.0
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {done}/{total} cubes {fraction:4.0%} {seconds:.0f} s"
        if 0 < done < total:
            text += f", ~{seconds * (total - done) / done:.0f} s left"
        return text + " " * 4

    @staticmethod
    def line(done: int, total: int, seconds: float) -> str:
        """One log line: ``demhx: 120/343 cubes (35%), 12 s elapsed, ~22 s left``."""
        fraction = done / total if total else 1.0
        text = f"demhx: {done}/{total} cubes ({fraction:.0%}), {seconds:.0f} s elapsed"
        if 0 < done < total:
            text += f", ~{seconds * (total - done) / done:.0f} s left"
        return text

    def close(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _tenths(done: int, total: int) -> int:
    """How many whole :data:`LINE_FRACTION` steps of ``total`` ``done`` has reached."""
    if total <= 0:
        return 0
    return math.floor(done / total / LINE_FRACTION + 1e-9)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
