"""Numba's one-off start-up, begun on a background thread while the run does other work.

The first jitted call of a process sets numba's compiler up: it imports its registry of
implementations (and scipy, for its BLAS check) and loads the code generator, about 0.3 s on
two cores, before the first kernel is even looked up in the on-disk cache. :func:`start`
begins it so that this happens while the main thread reads and checks the map and opens the
ONNX Runtime session (file reads, NumPy's array passes and session creation release the GIL;
with CUDA, session creation alone takes about 0.5 s).

It is started by the entry points: the file path before the map is read, the array path
once its inputs are checked, the several-maps command before the model is loaded. A process
that ends while the set-up is still running (an early error) waits for it first, at exit:
numba's code generator must not be torn down under a running thread.

The thread only compiles (or loads from the cache) a one-line function; the kernels it
prepares are numba's own, so nothing here depends on demhx's kernels or their signatures.
When demhx's kernels are not in numba's cache yet, it says so (:func:`compile_note`): the
run then spends about 10 s compiling them before its first map, once per cache folder.
Numba serialises compilation behind one lock, so a kernel the main thread needs meanwhile
waits for the set-up instead of repeating it. A failure here is ignored: the main thread
then meets it again where it can report it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from demhx import _jit

_EXIT_WAIT_S = 60.0  # at exit, the longest wait for an unfinished set-up (a first compile)
_LOCK = threading.Lock()
_thread: threading.Thread | None = None


def start() -> None:
    """Begin numba's start-up on a daemon thread (once per process; later calls do nothing)."""
    global _thread
    with _LOCK:
        if _thread is None:
            _thread = threading.Thread(target=_set_up, name="demhx-numba-start-up", daemon=True)
            _thread.start()
            atexit.register(wait, _EXIT_WAIT_S)


def wait(timeout: float | None = None) -> bool:
    """Wait for the start-up begun by :func:`start`; False while it is still running (or if
    it was never started)."""
    thread = _thread
    if thread is None:
        return False
    thread.join(timeout)
    return not thread.is_alive()


def _one(value: int) -> int:
    return value + 1


def compile_note() -> str | None:
    """A line saying that demhx's kernels are about to be compiled, and where they will be
    kept; None when they are in numba's cache (or numba's cache does not say)."""
    if not _jit.CACHE:
        return ("compiling demhx's numba kernels in memory, as on every run here: no cache "
                "folder is writable; set NUMBA_CACHE_DIR to a writable folder to keep them "
                "(about 10 s on 2 cores)")
    try:
        from demhx import _kernels

        kernel: Any = _kernels.z_moments  # a numba dispatcher
        index = str(kernel._cache._cache_file._index_path)  # its cache's index file
    except Exception:  # another numba version's internals: say nothing rather than guess
        return None
    if os.path.exists(index):
        return None
    return (f"compiling demhx's numba kernels into {os.path.dirname(index)}: once, about 10 s "
            "on 2 cores; later runs load them")


def _set_up() -> None:
    log = logging.getLogger("demhx")
    try:
        import numba

        numba.njit(cache=_jit.CACHE)(_one)(1)
    except Exception as error:  # the main thread meets the same problem and reports it
        log.debug(f"numba start-up on the side failed: {error}")
        return
    note = compile_note()
    if note is not None:
        log.info(note)
