"""A one-line progress bar over cubes for terminals (used by the command line)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_REDRAW_SECONDS = 0.1


class ProgressBar:
    """Callable as ``bar(done, total)``; draws ``[#####-----] 120/343 cubes 35% 12 s, ~22 s left``.

    Parameters
    ----------
    stream : where to draw (default: ``sys.stderr`` at construction).
    enabled : draw at all; None draws only when ``stream`` is a terminal.
    width : characters of the bar itself.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None,
                 width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.width = width
        self._start = time.perf_counter()
        self._last_draw = -1.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        """Record progress; redraw at most every 0.1 s and always at the end."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if done == 0:
            self._start = now
        if done < total and now - self._last_draw < _REDRAW_SECONDS:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render(done, total, now - self._start))
        self.stream.flush()
        self._drawn = True

    def render(self, done: int, total: int, seconds: float) -> str:
        """The bar as text (no carriage return)."""
        fraction = done / total if total else 1.0
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {done}/{total} cubes {fraction:4.0%} {seconds:.0f} s"
        if 0 < done < total:
            text += f", ~{seconds * (total - done) / done:.0f} s left"
        return text + " " * 4

    def close(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
