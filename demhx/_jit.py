"""Numba compilation settings shared by the kernel modules (:mod:`demhx._kernels`,
:mod:`demhx._noise_kernels`): where compiled kernels are cached.

The kernels are compiled on first use and cached on disk, so only the very first run of an
installation pays the compilation. Where no cache location is writable (read-only install and
no writable home, as in some containers) they are compiled in memory on each run instead of
failing at import; ``NUMBA_CACHE_DIR`` names a cache folder explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path


def disk_cache_usable() -> bool:
    """Whether numba can keep compiled kernels on disk (beside this file or in the home)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    here = Path(__file__).resolve().parent
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    writable_home = os.access(home if home.exists() else home.parent, os.W_OK)
    return os.access(here, os.W_OK) or writable_home


CACHE = disk_cache_usable()
"""The ``cache=`` of every ``@njit`` kernel: True where :func:`disk_cache_usable`."""
