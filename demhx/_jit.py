"""Numba compilation settings shared by the kernel modules (:mod:`demhx._kernels`,
:mod:`demhx._noise_kernels`): where compiled kernels are cached, and the cache's seed.

The kernels are compiled on first use and cached on disk, so only the very first run of an
installation pays the compilation. Where no cache location is writable (read-only install and
no writable home, as in some containers) they are compiled in memory on each run instead of
failing at import; ``NUMBA_CACHE_DIR`` names a cache folder explicitly.

Numba only uses a cache folder it can write to. A container image is read-only, so it ships
kernels compiled at build time (:mod:`demhx._precompile`) in a folder named by
``DEMHX_NUMBA_SEED``; :func:`seed_cache` copies what the writable ``NUMBA_CACHE_DIR`` lacks
of it when this module is imported, before any kernel is looked up.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

SEED_VARIABLE = "DEMHX_NUMBA_SEED"


def disk_cache_usable() -> bool:
    """Whether numba can keep compiled kernels on disk (beside this file or in the home)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    here = Path(__file__).resolve().parent
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    writable_home = os.access(home if home.exists() else home.parent, os.W_OK)
    return os.access(here, os.W_OK) or writable_home


def seed_cache(seed: Path, cache: Path) -> int:
    """Copy each file of ``seed`` that ``cache`` lacks (same relative path); returns how many.

    Each file is written under a temporary name and renamed, so processes seeding one cache
    at once (a job array's tasks on one node) never see a partial file; files already in
    ``cache`` are kept (numba may have updated them since).
    """
    copied = 0
    for source in sorted(seed.rglob("*")):
        target = cache / source.relative_to(seed)
        if not source.is_file() or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        copied += 1
    return copied


def _seed_from_environment() -> None:
    seed, cache = os.environ.get(SEED_VARIABLE), os.environ.get("NUMBA_CACHE_DIR")
    if not seed or not cache or not Path(seed).is_dir():
        return
    try:
        seed_cache(Path(seed), Path(cache))
    except OSError as error:  # numba compiles what it cannot load, as without a seed
        logging.getLogger("demhx").debug(f"numba cache not seeded from {seed}: {error}")


CACHE = disk_cache_usable()
"""The ``cache=`` of every ``@njit`` kernel: True where :func:`disk_cache_usable`."""
_seed_from_environment()
