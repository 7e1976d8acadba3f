"""demhx's temporary files: unique names beside an output, and the clean-up of those that
killed runs left behind.

A map or a preview is written to a temporary file in the destination folder
(``.<name>.demhx-<machine>-<pid>-<random>.tmp``, :func:`new_temporary`) and moved into place;
the name carries the machine (and PID namespace) and the process, so that the next run in
that folder removes what a killed run left (:func:`clean_stale_temporaries`) without touching
the files of a run still writing elsewhere.

The public names are re-exported by :mod:`demhx.mrcio`, where callers take them from.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
import warnings
from pathlib import Path

from demhx.errors import DemhxWarning

TEMPORARY_PATTERN = re.compile(
    r"^\.(?P<name>.+)\.demhx-(?P<owner>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
"""Name of demhx's temporary files: ``.<output name>.demhx-<owner>-<pid>-<random>.tmp``."""
_NAME_MAX = 255  # bytes in a file name where the file system does not say
STALE_AFTER_SECONDS = 3600.0  # a temporary file of another machine this old is named
_reported: set[Path] = set()


def _owner() -> str:
    """8 hex digits naming this machine and PID namespace (container), for temporary files."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


def new_temporary(path: Path) -> Path:
    """Create an empty, uniquely named file in ``path``'s folder (umask-respecting mode).

    The name (:data:`TEMPORARY_PATTERN`) carries this machine and process, so that a file
    left by a killed run is recognised and removed by the next (:func:`clean_stale_temporaries`).
    The output's name in it is shortened when the whole would pass the file system's limit
    on a name, so that any output name the file system takes can be written.
    """
    tail = f".demhx-{_owner()}-{os.getpid()}"
    name = _shortened(path.name, _name_max(path.parent) - len(f".{tail}-00000000.tmp"))
    prefix = f".{name}{tail}"
    for _ in range(100):
        temporary = path.with_name(f"{prefix}-{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(f"{path.parent}: cannot create a temporary file; clean the folder")


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) in ``folder``; the POSIX usual 255 where it cannot be read."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return _NAME_MAX


def _shortened(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes (whole characters, at least one kept)."""
    encoded = os.fsencode(name)
    if len(encoded) <= limit:
        return name
    return encoded[:max(limit, 1)].decode("utf-8", "ignore") or name[:1]


def _process_running(pid: int) -> bool | None:
    """Whether a process of this PID namespace runs (None: cannot tell on this system)."""
    if os.name != "posix":
        return None  # os.kill would end the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return None
    return True


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from Linux's /proc; None where
    that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = float(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_gone(pid: int, modified: float) -> bool:
    """Whether the process that wrote a temporary file last modified at ``modified`` is gone:
    no process has its PID, or the one that has it started after the file was last written
    (the PID was reused: the writer started before creating the file)."""
    running = _process_running(pid)
    if running is False:
        return True
    started = _process_started(pid) if running else None
    return started is not None and started > modified + 1.0


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed demhx runs left in ``folder``; name the others.

    A temporary file (:data:`TEMPORARY_PATTERN`) whose writer ran on this machine and in this
    PID namespace and is no longer running (no process has its PID, or the one that has it
    started after the file was last written) is removed, with a warning naming it. One from
    another machine or container is only named, once it is older than
    :data:`STALE_AFTER_SECONDS`: a run elsewhere may still be writing it. Each
    file is named once per process. Returns the files removed.
    """
    removed: list[Path] = []
    owner, now = _owner(), time.time()
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return removed
    for entry in entries:
        found = TEMPORARY_PATTERN.match(entry.name)
        path = Path(entry.path)
        if found is None or path in _reported or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(found["pid"])
        if found["owner"] == owner and pid != os.getpid() and _writer_gone(pid, _mtime(entry)):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
            _reported.add(path)
            warnings.warn(f"{path}: removed a temporary file left by an interrupted demhx run "
                          f"(PID {pid}, no longer running)", DemhxWarning, stacklevel=2)
        elif now - _mtime(entry) > STALE_AFTER_SECONDS and pid != os.getpid():
            _reported.add(path)
            warnings.warn(f"{path}: a temporary file of a demhx run (PID {pid}) on another "
                          "machine or container, or of a run that was killed; remove it if no "
                          "demhx run is writing to this folder", DemhxWarning, stacklevel=2)
    return removed


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return time.time()
