"""Numba compilation settings of the kernels (:mod:`demhx._kernels`): where compiled kernels
are cached, and the cache's seed.

The kernels are compiled on first use and cached on disk, so only the very first run of an
installation pays the compilation. ``NUMBA_CACHE_DIR`` names a cache folder explicitly;
without a writable one numba uses the package's folder or the user's cache folder. Where
none of them is writable (a read-only install run by a user without a writable home:
``sudo -u other`` without ``-H``, some containers) the kernels are kept in a private folder
of this user under the system's temporary folder (:func:`private_cache`), which
``NUMBA_CACHE_DIR`` then names; where even that cannot be made they are compiled in memory on
each run. Either way the import does not fail.

Numba only uses a cache folder it can write to. A container image is read-only, so it ships
kernels compiled at build time (:mod:`demhx._precompile`) in a folder named by
``DEMHX_NUMBA_SEED``; :func:`seed_cache` copies what the writable ``NUMBA_CACHE_DIR`` lacks
of it when this module is imported, before any kernel is looked up.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

SEED_VARIABLE = "DEMHX_NUMBA_SEED"


def disk_cache_usable() -> bool:
    """Whether numba can keep compiled kernels on disk where it looks: ``NUMBA_CACHE_DIR``,
    beside this file, or the user's cache folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache"))
    folders = [os.environ.get("NUMBA_CACHE_DIR"), os.path.join(here, "__pycache__"),
               os.path.join(home, "numba")]
    return any(_writable(folder) for folder in folders if folder)


def _writable(folder: str) -> bool:
    """Whether ``folder`` can be written, or made where it does not exist (never raises: a
    home that cannot even be looked into is not writable)."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder):
        if os.path.lexists(folder) or os.path.dirname(folder) == folder:
            return False  # a file in the way, or no folder at all up to the root
        folder = os.path.dirname(folder)
    return os.access(folder, os.W_OK | os.X_OK)


def private_cache() -> str | None:
    """This user's numba cache folder under the system's temporary folder, made private
    (mode 0700) if new; None where it cannot be made, or is not this user's alone (numba
    loads code from its cache, so another user's folder must not be used)."""
    import stat
    import tempfile

    user = getattr(os, "getuid", lambda: None)()
    if user is None:  # Windows: the user's own cache folder is writable there
        return None
    folder = os.path.join(tempfile.gettempdir(), f"demhx-numba-{user}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        state = os.lstat(folder)
    except OSError:
        return None
    private = stat.S_ISDIR(state.st_mode) and not state.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    return folder if private and state.st_uid == user and _writable(folder) else None


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


def _choose_cache() -> bool:
    """The ``cache=`` of the kernels: True where numba can keep them on disk, if need be in
    :func:`private_cache` (then named by ``NUMBA_CACHE_DIR``, for numba and the processes
    this one starts); False where nothing is writable."""
    if disk_cache_usable():
        return True
    folder = private_cache()
    if folder is None:
        return False
    os.environ["NUMBA_CACHE_DIR"] = folder
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba read its settings when imported: read them again
        config.reload_config()
    return True


def _seed_from_environment() -> None:
    seed, cache = os.environ.get(SEED_VARIABLE), os.environ.get("NUMBA_CACHE_DIR")
    if not seed or not cache or not os.path.isdir(seed):
        return
    try:
        seed_cache(Path(seed), Path(cache))
    except OSError as error:  # numba compiles what it cannot load, as without a seed
        logging.getLogger("demhx").debug(f"numba cache not seeded from {seed}: {error}")


CACHE = _choose_cache()
"""The ``cache=`` of every ``@njit`` kernel: False where no cache folder can be written."""
_seed_from_environment()
