"""MRC/CCP4 map input and output that honours the header exactly (through ``mrcfile``).

Reading
    :func:`read_map` validates the file at the boundary (existence, size, header, data mode,
    dimensions against the file size *before* any data is read, finite voxels, voxel size),
    then returns a :class:`MrcMap` whose ``data`` is a private float32 copy in the
    **canonical** ``(z, y, x)`` axis order (x fastest), whatever the file's axis order.

    The header fields ``mapc``/``mapr``/``maps`` say which spatial axis (1 = x, 2 = y, 3 = z)
    runs along the columns, rows and sections of the stored array. The stored array (sections,
    rows, columns) is transposed so that axis 0 is z, 1 is y and 2 is x, so a map is never
    mirrored or rotated. The voxel size is per spatial axis, ``cella.x / mx`` and so on, and
    is reported in the same ``(z, y, x)`` order as ``data``.

Writing
    :func:`write_map` transposes the canonical array back to the template's stored layout and
    writes float32 (mode 2) with the template's header: the geometry (``nx/ny/nz``,
    ``mx/my/mz``, ``cella``, ``cellb``, ``mapc/mapr/maps``, ``nxstart/nystart/nzstart``,
    ``origin``), ``ispg`` (a negative one, which MRC2014 does not allow, becomes 1, a single
    volume, with a warning), the extra fields and the labels' text are copied unchanged. The
    format fields are those of the file actually written, MRC2014, whatever the input's age,
    so that the output validates (``mrcfile.validate``): ``mode`` 2, ``nversion``
    :data:`MRC2014_VERSION`, ``machst`` (this machine's byte order), the ``MAP`` identifier,
    ``dmin/dmax/dmean/rms`` from the new data, and ``nlabl`` counting the labels, one label
    appended (when the ten labels are full the last one is replaced; blank labels between
    text-filled ones are closed up). The extended header is copied with its ``exttyp`` and
    ``nsymbt`` when its type is one MRC2014 names (:data:`EXTENDED_HEADER_TYPES`); an untyped
    one (pre-2014 files) that holds 80-character symmetry records is typed ``CCP4``; any
    other untyped or unknown one cannot be described in MRC2014 and is left out, with a
    warning.

    **Voxel-size override**: when the template was read with ``voxel_size=...`` that differs
    from its header, the output carries the corrected voxel size, i.e. ``cella`` is set to
    ``voxel_size * m`` per axis (and an ``mx/my/mz`` of zero is set to the number of voxels
    along that axis first). Every other field is kept.

    The file is written to a temporary file in the destination folder
    (``.<name>.demhx-<machine>-<pid>-<random>.tmp``, ``<name>`` shortened where the whole
    would pass the file system's limit on a name) and moved into place with
    :func:`os.replace`; on any failure, ``KeyboardInterrupt`` included, the temporary file is
    removed and the destination is untouched. :func:`write_maps` writes several maps (an
    output and its confidence map) all or none. A temporary file left by a killed run is
    removed by the next run in that folder (:func:`clean_stale_temporaries`). A full disk is
    an ``OSError`` naming the output. ``.gz`` destinations are gzip-compressed.

Every path written is checked before any work (:func:`check_output_path`,
:func:`check_path_limits`, :func:`check_distinct_outputs`): not an input or another output
(resolved paths and inodes), within the system's name and path limits, free of symbolic-link
loops.

Errors are built-in exceptions (``FileNotFoundError``, ``IsADirectoryError``,
``PermissionError``, ``FileExistsError``, ``ValueError``) whose one-line message names the
file, the problem and the fix.

Sections, in order: temporary files, the header, reading, output paths and writing.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import math
import os
import re
import secrets
import socket
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header
from numpy.typing import NDArray

from demhx import _signals, validate
from demhx.errors import DemhxWarning

__all__ = ["check_distinct_outputs", "check_folder_to_create", "check_map_file",
           "check_output_folder", "check_output_path", "check_path_limits",
           "clean_stale_temporaries", "COMPLEX_MODES", "extended_header_to_write",
           "EXTENDED_HEADER_TYPES", "HEADER_BYTES", "IMAGE_STACK_SPACE_GROUP",
           "LABEL_BYTES", "LABEL_COUNT", "MRC2014_VERSION", "MrcMap", "new_temporary",
           "OUTPUT_SUFFIXES", "read_map", "REAL_MODES", "same_file",
           "STALE_AFTER_SECONDS", "SYMMETRY_RECORD_BYTES", "TEMPORARY_PATTERN",
           "VOLUME_SPACE_GROUP", "VOLUME_STACK_SPACE_GROUPS", "VoxelSizeLike",
           "write_map", "write_maps"]

# --------------------------------------------------------------------------- temporary files
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


# --------------------------------------------------------------------------- the header
HEADER_BYTES = 1024  # fixed size of the MRC header
LABEL_BYTES = 80  # size of one header label
LABEL_COUNT = 10  # labels in a header
REAL_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
COMPLEX_MODES = (3, 4)
IMAGE_STACK_SPACE_GROUP = 0
VOLUME_SPACE_GROUP = 1  # ispg of a single volume (P1), written in place of an invalid one
VOLUME_STACK_SPACE_GROUPS = range(401, 631)
MRC2014_VERSION = 20140  # nversion of the MRC2014 format (float32 needs nothing later)
EXTENDED_HEADER_TYPES = (b"CCP4", b"MRCO", b"SERI", b"AGAR", b"FEI1", b"FEI2", b"HDF5")
"""``exttyp`` values MRC2014 defines (``CCP4``: symmetry records as 80-character text)."""
SYMMETRY_RECORD_BYTES = 80  # one symmetry operator of a CCP4 extended header, as text
_WRITER_FIELDS = ("map", "machst", "mode", "nsymbt", "dmin", "dmax", "dmean", "rms",
                  "nversion", "exttyp", "nlabl", "label")


@dataclass(frozen=True, eq=False)
class MrcMap:
    """A map read from an MRC/CCP4 file.

    Attributes
    ----------
    data : (z, y, x) float32, C-contiguous, canonical axis order (x fastest); a private,
        writeable copy.
    voxel_size : Å per voxel along (z, y, x) of ``data`` (the override, if one was given).
    header : a copy of the file's header (``mrcfile`` record array), untouched.
    extended_header : a copy of the extended header bytes (may be empty).
    path : the file it was read from.
    """

    data: NDArray[np.float32]
    voxel_size: tuple[float, float, float]
    header: np.recarray
    extended_header: NDArray[np.void]
    path: Path


def _check_header(path: Path, header: np.recarray) -> None:
    """Reject headers that do not describe one real-valued 3-D volume."""
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise ValueError(f"{path}: header dimensions {nx}×{ny}×{nz} are not positive; the "
                         "header is corrupt, re-export the map")
    flat = [nx, ny, nz].count(1)
    if flat:
        kind = {1: "a 2-D image", 2: "a 1-D line of voxels", 3: "a single voxel"}[flat]
        raise ValueError(f"{path}: is {kind} ({nx}×{ny}×{nz}), not a 3-D map; pass a 3-D "
                         "density map")
    ispg, mz = int(header.ispg), int(header.mz)
    if ispg == IMAGE_STACK_SPACE_GROUP and mz == 1:
        raise ValueError(f"{path}: is a stack of {nz} 2-D images (space group 0, mz = 1), "
                         "not a 3-D map; pass a 3-D density map (a volume has mz = nz)")
    if ispg in VOLUME_STACK_SPACE_GROUPS:
        raise ValueError(f"{path}: is a stack of volumes (space group {ispg}); pass a single "
                         "3-D map")
    _check_mode(path, int(header.mode))
    _axis_order(path, header)


def _check_mode(path: Path, mode: int) -> None:
    if mode in COMPLEX_MODES:
        raise ValueError(f"{path}: holds complex (Fourier-space) data, mode {mode}; pass a "
                         "real-space density map")
    if mode not in REAL_MODES:
        modes = ", ".join(f"{m} ({name})" for m, name in REAL_MODES.items())
        raise ValueError(f"{path}: data mode {mode} is not supported (supported: {modes}); "
                         "convert the map to float32 (mode 2)")


def _axis_order(path: Path, header: np.recarray) -> tuple[int, int, int]:
    """The spatial axes (1 = x, 2 = y, 3 = z) of the stored (sections, rows, columns)."""
    order = (int(header.maps), int(header.mapr), int(header.mapc))
    if sorted(order) != [1, 2, 3]:
        raise ValueError(f"{path}: header axis order mapc/mapr/maps = {order[2]},{order[1]},"
                         f"{order[0]} is not a permutation of 1,2,3; fix the header (the "
                         "usual order is 1,2,3)")
    return order


def _canonical_permutation(order: tuple[int, int, int]) -> tuple[int, int, int]:
    """Axes of the stored array giving canonical (z, y, x): ``stored.transpose(result)``."""
    return order.index(3), order.index(2), order.index(1)


def _data_bytes(header: np.recarray) -> int:
    itemsize = data_dtype_from_header(header).itemsize
    return int(header.nx) * int(header.ny) * int(header.nz) * itemsize


def _header_voxel_size(header: np.recarray) -> tuple[float, float, float]:
    """Header voxel size along (z, y, x) in Å (may be 0, negative, NaN or inf)."""
    cell = header.cella
    sizes = []
    for length, count in ((cell.z, header.mz), (cell.y, header.my), (cell.x, header.mx)):
        if int(count) == 0:
            sizes.append(math.nan)
            continue
        # The header holds float32: report the shortest decimal of the float32 quotient.
        with np.errstate(all="ignore"):
            size = np.float32(length) / np.float32(int(count))
        sizes.append(float(str(size)) if np.isfinite(size) else float(size))
    return sizes[0], sizes[1], sizes[2]


def _checked_header_voxel_size(path: Path, header: np.recarray) -> tuple[float, float, float]:
    voxel = _header_voxel_size(header)
    along_xyz = voxel[::-1]  # messages give x/y/z, the order of --voxel-size X,Y,Z
    if not all(math.isfinite(v) and v > 0 for v in voxel):
        text = "/".join(f"{v:.4g}" for v in along_xyz)
        raise ValueError(f"{path}: header voxel size is {text} Å (x/y/z; from cella and "
                         "mx/my/mz), not positive; pass voxel_size=")
    validate.check_voxel_size(along_xyz, f"{path}: header voxel size (x/y/z)",
                              "if the header is wrong, pass the true size in Å with voxel_size=")
    return voxel


def _write_mrc(temporary: Path, stored: NDArray[np.float32], template: MrcMap, label: str,
               compression: str | None) -> None:
    """Write the stored-layout array with the template's header, stats and a new label."""
    with mrcfile.new(temporary, overwrite=True, compression=compression) as mrc:
        mrc.set_data(stored)  # sets mode 2, byte order and dmin/dmax/dmean/rms
        header = mrc.header
        # The template's geometry and other fields, then the MRC2014 format fields.
        for name in template.header.dtype.names or ():
            if name not in _WRITER_FIELDS:
                header[name] = template.header[name]
        header.nversion = MRC2014_VERSION
        # The mean in float64: mrcfile's float32 mean of a zero-mean map (e.g. 6824.mrc) can
        # be 0.0 where the true mean is 1e-8, which mrcfile.validate reports as wrong.
        header.dmean = np.float32(stored.mean(dtype=np.float64))
        exttyp, extended = extended_header_to_write(template)
        mrc.set_extended_header(extended)  # sets nsymbt
        header.exttyp = exttyp
        _write_voxel_size(header, template)
        _write_space_group(header, template)
        _write_labels(header, _labels(template.header), label)


def extended_header_to_write(template: MrcMap) -> tuple[bytes, NDArray[np.void]]:
    """The ``exttyp`` and extended header bytes an MRC2014 copy of ``template`` carries.

    A typed extended header (:data:`EXTENDED_HEADER_TYPES`) is kept as it is; an untyped one
    made of 80-character text records is the symmetry operators of a pre-2014 CCP4 map and is
    typed ``CCP4``; any other is left out with a :class:`~demhx.errors.DemhxWarning` (MRC2014
    has no way to describe it). No extended header gives ``exttyp`` empty.
    """
    extended = np.array(template.extended_header, dtype="V1").reshape(-1)
    declared = bytes(template.header.exttyp).rstrip(b"\x00")
    if extended.size == 0:
        return (declared if declared in EXTENDED_HEADER_TYPES else b""), extended
    if declared in EXTENDED_HEADER_TYPES:
        return declared, extended
    if _is_symmetry_text(extended.tobytes()):
        return b"CCP4", extended
    shown = declared.decode("ascii", "replace").strip() or "none"
    warnings.warn(f"{template.path}: its {extended.size}-byte extended header has no MRC2014 "
                  f"type (exttyp {shown}) and is not CCP4 symmetry text; the output leaves it "
                  "out so that it is a valid MRC2014 file", DemhxWarning, stacklevel=4)
    return b"", np.zeros(0, dtype="V1")


def _is_symmetry_text(data: bytes) -> bool:
    """Whether extended-header bytes are 80-character ASCII text records (CCP4 symmetry)."""
    return (len(data) % SYMMETRY_RECORD_BYTES == 0
            and all(32 <= byte <= 126 for byte in data.rstrip(b"\x00")))


def _write_space_group(header: np.recarray, template: MrcMap) -> None:
    """A negative space group (which MRC2014 does not allow, so the output would not validate)
    becomes :data:`VOLUME_SPACE_GROUP`, a single volume, with a warning naming the input."""
    ispg = int(template.header.ispg)
    if ispg >= 0:
        return
    header.ispg = VOLUME_SPACE_GROUP
    warnings.warn(f"{template.path}: header space group (ispg) is {ispg}, which MRC2014 does "
                  f"not allow; the output has {VOLUME_SPACE_GROUP} (a single volume), fix the "
                  "input's header to silence this", DemhxWarning, stacklevel=5)


def _write_voxel_size(header: np.recarray, template: MrcMap) -> None:
    """Set ``cella`` from the template's voxel size when it overrides the header's."""
    if np.allclose(template.voxel_size, _header_voxel_size(template.header), rtol=1e-6,
                   atol=0.0):
        return
    counts = template.data.shape  # voxels along (z, y, x)
    for axis, (letter, size) in enumerate(zip("zyx", template.voxel_size, strict=True)):
        sampling = f"m{letter}"
        if int(header[sampling]) <= 0:
            header[sampling] = counts[axis]
        header.cella[letter] = np.float32(size * int(header[sampling]))


def _labels(header: np.recarray) -> list[bytes]:
    """The text-filled labels of a header, in order (blank ones left out, whatever nlabl says)."""
    return [bytes(text) for text in header.label if bytes(text).strip(b" \x00")]


def _write_labels(header: np.recarray, labels: list[bytes], label: str) -> None:
    """Write ``labels`` then ``label`` (printable ASCII, ≤ 80 bytes), ``nlabl`` their count;
    with ten labels already the last is replaced."""
    text = "".join(c if " " <= c <= "~" else "?" for c in label)[:LABEL_BYTES]
    kept = labels[:LABEL_COUNT - 1] + [text.encode("ascii")]
    for index in range(LABEL_COUNT):
        header.label[index] = kept[index] if index < len(kept) else b""
    header.nlabl = len(kept)


# --------------------------------------------------------------------------- reading
_CHUNK_BYTES = 1 << 24  # 16 MiB read chunks for compressed files
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_MAP_ID_OFFSET = 208

VoxelSizeLike = float | tuple[float, float, float] | Sequence[float]


def read_map(path: str | Path, voxel_size: VoxelSizeLike | None = None) -> MrcMap:
    """Read an MRC/CCP4 map (``.mrc``, ``.map``, ``.ccp4``, optionally gzip/bzip2-compressed).

    Parameters
    ----------
    path : the map file; it is never modified.
    voxel_size : Å, one value (isotropic) or three in (z, y, x) order; overrides the header's
        voxel size (needed when the header's is missing, zero or wrong).

    Returns
    -------
    MrcMap
        ``data`` (z, y, x) float32 in canonical axis order and the header's metadata.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError
        The path is missing, a folder, or unreadable.
    ValueError
        Not an MRC map, truncated, 2-D or a stack, unsupported mode, non-finite voxels, a
        header voxel size that is not positive (without override), or a bad override.
    """
    path = Path(path)
    # Validate the file, the override and the header before reading any data.
    compression = _check_input_file(path)
    override = (None if voxel_size is None
                else validate.voxel_triplet(voxel_size, f"{path}: voxel size"))
    header, extended_header = _read_header(path)
    _check_header(path, header)
    _check_data_size(path, header, None if compression is None else -1)
    try:
        validate.check_grid((int(header.nx), int(header.ny), int(header.nz)),
                            f"{path}: header dimensions (x×y×z)", "crop or bin the map")
    except ValueError:
        if compression is not None:  # a file that does not hold them says so first
            length = sum(map(len, _decompressed(path, compression, _file_bytes(header) + 1)))
            _check_data_size(path, header, length)
        raise
    voxel = override if override is not None else _checked_header_voxel_size(path, header)
    if override is not None:
        validate.check_voxel_size(override, f"{path}: voxel_size=",
                                  "give the voxel size in Å (1 nm = 10 Å)")
    # A compressed file is decompressed once, and its length checked before it is used.
    raw = None
    if compression is not None:
        raw = bytearray()
        for chunk in _decompressed(path, compression, _file_bytes(header) + 1):
            raw += chunk
        _check_data_size(path, header, len(raw))
    # Read the stored array and bring it to canonical (z, y, x) order in one float32 copy.
    data = _read_canonical(path, header, raw)
    _check_finite(path, data)
    return MrcMap(data, voxel, header, extended_header, path)


def check_map_file(path: str | Path) -> None:
    """Check, without reading the data, that ``path`` is a map :func:`read_map` can open.

    The same checks as :func:`read_map` makes before reading: the file exists, is a readable
    regular file, and its header describes one real-valued 3-D volume whose data fit the
    file (for compressed files, up to the header: their length is checked when read). Raises
    as :func:`read_map` does.
    """
    path = Path(path)
    compression = _check_input_file(path)
    header, _ = _read_header(path)
    _check_header(path, header)
    if compression is None:
        _check_data_size(path, header, None)


def _check_input_file(path: Path) -> str | None:
    """Check the file exists, is a readable non-empty file; its compression (or None)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a map file; pass an .mrc/.map file")
    if not path.is_file():
        raise ValueError(f"{path}: is not a regular file (a named pipe, device or socket); "
                         "save the map to a file and pass that")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: cannot be read (permission denied); check the "
                              "file's permissions")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: is empty (0 bytes), not an MRC map; check the file")
    with open(path, "rb") as stream:
        start = stream.read(_MAP_ID_OFFSET + 4)
    if start[_MAP_ID_OFFSET:_MAP_ID_OFFSET + 3] != b"MAP":
        if start.startswith(_GZIP_MAGIC):
            return "gzip"
        if start.startswith(_BZIP2_MAGIC):
            return "bzip2"
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: is {size} bytes, shorter than an MRC header "
                         f"({HEADER_BYTES} bytes); not an MRC map, check the file")
    return None


def _read_header(path: Path) -> tuple[np.recarray, NDArray[np.void]]:
    """Copies of the header and extended header, read strictly by ``mrcfile``."""
    with _mrcfile_errors(path):
        with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
            header = np.array(mrc.header).view(np.recarray)
            extended = np.array(mrc.extended_header, dtype="V1").reshape(-1)
    return header, extended


@contextmanager
def _mrcfile_errors(path: Path) -> Iterator[None]:
    """Turn ``mrcfile`` (and decompressor) errors and runtime warnings into ValueErrors."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except (PermissionError, FileNotFoundError):
            raise
        except (ValueError, OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: {_explain(str(error))}") from None
    problems = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    if problems:
        raise ValueError(f"{path}: {_explain(str(problems[0].message))}")


def _explain(reason: str) -> str:
    """A reason from ``mrcfile`` (or a decompressor) with what to do about it."""
    reason = " ".join(reason.split()) or "unreadable"
    if "Map ID string not found" in reason:
        return "not an MRC/CCP4 map (no 'MAP' identifier in the header); check the file"
    if "machine stamp" in reason.lower():
        return (f"{reason}; the header's byte-order stamp is invalid, rewrite the file with "
                "a tool that sets it (e.g. mrcfile)")
    if "Couldn't read enough bytes for MRC header" in reason:
        return "shorter than an MRC header (1024 bytes); not an MRC map, check the file"
    if "extended header" in reason:
        return f"{reason}; the file is truncated, re-download or re-export it"
    if "negative count" in reason:
        return ("header extended-header size (nsymbt) is negative; the header is corrupt, "
                "re-export the map")
    if "ended before the end-of-stream marker" in reason:
        return ("the compressed file is truncated (it ends before its end-of-stream marker); "
                "re-download the file")
    if any(word in reason for word in ("decompress", "gzip", "CRC", "invalid data stream",
                                       "compressed")):
        return (f"compressed data are corrupt ({reason}); re-download the file or "
                "decompress and re-compress it")
    return f"not a readable MRC/CCP4 map ({reason}); check the file or re-export it"


def _file_bytes(header: np.recarray) -> int:
    """Bytes of the file the header describes: the headers and the data."""
    return HEADER_BYTES + max(0, int(header.nsymbt)) + _data_bytes(header)


def _check_data_size(path: Path, header: np.recarray, actual: int | None) -> None:
    """Compare the file's size with what the header promises. ``actual``: the decompressed
    length of a compressed file; None: the file's own size; -1: not known yet (only the
    extended-header size is checked)."""
    nsymbt = int(header.nsymbt)
    if nsymbt < 0:
        raise ValueError(f"{path}: header extended-header size {nsymbt} is negative; the "
                         "header is corrupt, re-export the map")
    if actual == -1:
        return
    expected = _file_bytes(header)
    if actual is None:
        actual = path.stat().st_size
    if actual != expected:
        shape = f"{int(header.nx)}×{int(header.ny)}×{int(header.nz)}"
        mode = int(header.mode)
        problem = ("truncated or its header dimensions are wrong" if actual < expected
                   else "longer than its header describes (wrong header dimensions?)")
        raise ValueError(f"{path}: header promises {shape} voxels of mode {mode} "
                         f"({expected} bytes with the headers) but the file holds {actual} "
                         f"bytes: {problem}; re-download or re-export the map")


def _open_compressed(path: Path, compression: str) -> Any:
    return gzip.open(path, "rb") if compression == "gzip" else bz2.open(path, "rb")


def _decompressed(path: Path, compression: str, limit: int) -> Iterator[bytes]:
    """The decompressed bytes of a compressed file in chunks, at most ``limit`` of them (so
    that a header promising more than the file holds makes nothing that large)."""
    total = 0
    with _mrcfile_errors(path), _open_compressed(path, compression) as stream:
        while total < limit:
            chunk = stream.read(min(_CHUNK_BYTES, limit - total))
            if not chunk:
                return
            total += len(chunk)
            yield chunk


def _read_canonical(path: Path, header: np.recarray, raw: bytearray | None
                    ) -> NDArray[np.float32]:
    """The data as a private (z, y, x) float32 C-contiguous array, read from the file, or
    from ``raw``, a compressed file's decompressed bytes."""
    permutation = _canonical_permutation(_axis_order(path, header))
    if raw is None:
        with _mrcfile_errors(path):
            with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
                stored = mrc.data
                return np.array(stored.transpose(permutation), dtype=np.float32, order="C")
    dtype = data_dtype_from_header(header)
    shape = (int(header.nz), int(header.ny), int(header.nx))
    stored = np.frombuffer(raw, dtype=dtype, count=shape[0] * shape[1] * shape[2],
                           offset=HEADER_BYTES + int(header.nsymbt)).reshape(shape)
    return np.array(stored.transpose(permutation), dtype=np.float32, order="C")


def _check_finite(path: Path, data: NDArray[Any]) -> None:
    if not validate.all_finite(data):
        count = validate.count_nonfinite(data)
        raise ValueError(f"{path}: contains {count} NaN or infinite voxels; fix or replace "
                         "the map")


# ---------------------------------------------------------------- checking output paths and writing
OUTPUT_SUFFIXES = (".mrc", ".map", ".ccp4")
_PATH_MAX = 4096  # bytes in a path, where the system does not say (Linux)


# --------------------------------------------------------------------------- writing


def check_output_path(path: str | Path, inputs: Sequence[Path], overwrite: bool) -> Path:
    """Validate an output path before any work is done; returns it as a :class:`Path`.

    Parameters
    ----------
    path : the output file (``.mrc``, ``.map`` or ``.ccp4``, optionally ``.gz``).
    inputs : the input files; the output must be none of them.
    overwrite : allow replacing an existing output file.

    Raises
    ------
    ValueError
        Wrong extension, the output is one of the inputs, or its name or path is longer than
        the system allows or runs into a loop of symbolic links (:func:`check_path_limits`).
    FileNotFoundError, PermissionError
        The output folder is missing or not writable.
    IsADirectoryError, FileExistsError
        The output is a folder, or exists and ``overwrite`` is False.
    """
    path = Path(path).expanduser()
    # The name, then the folder, then the file itself.
    _check_output_suffix(path)
    check_path_limits(path, "output")
    check_output_folder(path.parent, "output")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: output is a folder; give a file name ending .mrc")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: output exists and is not a regular file (a named pipe, "
                         "device or socket); choose an ordinary file name")
    check_distinct_outputs([("output", path)], inputs)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: output exists; pass overwrite= to replace it or "
                              "choose another output path")
    return path


def check_output_folder(folder: Path, kind: str) -> None:
    """Refuse a missing or unwritable folder for a ``kind`` file (``"output"``,
    ``"preview"``, ...), naming the folder and the fix."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {kind} folder does not exist; create it or "
                                f"choose another {kind} path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder}: {kind} folder is not writable; check its "
                              f"permissions or choose another {kind} path")


def check_folder_to_create(folder: Path, kind: str) -> None:
    """Like :func:`check_output_folder` for a folder that may not exist yet: its nearest
    existing ancestor must be a writable folder (nothing is created here)."""
    if folder.is_dir():
        check_output_folder(folder, kind)
        return
    ancestor = folder
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{ancestor}: is a file, not a folder, so the {kind} folder "
                                 f"{folder} cannot be created; choose another {kind} path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{ancestor}: folder is not writable, so the {kind} folder "
                              f"{folder} cannot be created; check its permissions or choose "
                              f"another {kind} path")


def check_path_limits(path: Path, kind: str) -> None:
    """ValueError naming ``path``, the problem and the fix when a ``kind`` file (``"output"``,
    ``"preview"``, ...) cannot be made there: a name longer than the file system allows
    (``NAME_MAX``), a path longer than the system allows (``PATH_MAX``), or a loop of
    symbolic links on the way. Nothing is created.
    """
    name_max, path_max = _path_limits(path.parent)
    name_bytes = len(os.fsencode(path.name))
    if name_bytes > name_max:
        raise ValueError(f"{path}: {kind} name is {name_bytes} bytes, over the file system's "
                         f"limit of {name_max} bytes per name; choose a shorter {kind} name")
    path_bytes = len(os.fsencode(os.path.abspath(path)))
    if path_bytes >= path_max:
        raise ValueError(f"{_abbreviated(path)}: {kind} path is {path_bytes} bytes, over the "
                         f"system's limit "
                         f"of {path_max - 1} (PATH_MAX); choose a shorter path, in a folder "
                         "nearer the root")
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path}: {kind} path runs into a loop of symbolic links; fix or "
                             f"remove the link, or choose another {kind} path") from None
        if error.errno == errno.ENAMETOOLONG:
            raise ValueError(f"{path}: {kind} path has a folder name longer than the file "
                             f"system allows; choose a shorter {kind} path") from None


def _abbreviated(path: Path, keep: int = 60) -> str:
    """``path`` with its middle left out when longer than ``2 * keep`` characters."""
    text = str(path)
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep:]}"


def _path_limits(folder: Path) -> tuple[int, int]:
    """The file system's longest name and the system's longest path (bytes) for a file in
    ``folder`` (the nearest folder that exists answers; POSIX values where none does)."""
    for candidate in (folder, *folder.absolute().parents):
        try:
            return (os.pathconf(candidate, "PC_NAME_MAX"), os.pathconf(candidate, "PC_PATH_MAX"))
        except (OSError, ValueError, AttributeError):
            continue
    return _NAME_MAX, _PATH_MAX


def check_distinct_outputs(outputs: Sequence[tuple[str, Path]], inputs: Sequence[Path]) -> None:
    """ValueError unless every file written is neither an input nor another file written,
    and no written file lies in a folder named like one of them (a ``--preview`` folder
    named like the output). Nothing is created.

    Parameters
    ----------
    outputs : ``(kind, path)`` of each file written, ``kind`` naming it in messages
        (``"output"``, ``"preview"``, ...).
    inputs : the files read (maps, half-maps, masks).

    Paths are compared resolved (through symbolic links) and, for files that exist, by
    device and inode (hard links).
    """
    seen: dict[object, tuple[str, Path]] = {}
    for source in inputs:
        for key in _identities(Path(source)):
            seen.setdefault(key, ("input", Path(source)))
    # Each written file against the inputs and the files before it ...
    for kind, path in outputs:
        keys = _identities(path)
        for key in keys:
            if key in seen:
                raise _clash(kind, path, *seen[key])
        seen.update(dict.fromkeys(keys, (kind, path)))
    # ... then no written file in a folder named like another file.
    for kind, path in outputs:
        for folder in _resolved(path).parents:
            if folder in seen:
                other_kind, other = seen[folder]
                raise ValueError(f"{path}: {kind} would lie in a folder named like the "
                                 f"{other_kind} {other}; choose another {kind} path")


def _identities(path: Path) -> list[object]:
    """A file's identities: its resolved path, and its (device, inode) when it exists."""
    keys: list[object] = [_resolved(path)]
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return keys
    return [*keys, (status.st_dev, status.st_ino)]


def _clash(kind: str, path: Path, other_kind: str, other: Path) -> ValueError:
    if other_kind == "input":
        return ValueError(f"{path}: {kind} is the input {other}; inputs are never "
                          f"overwritten, choose another {kind} path")
    return ValueError(f"{path}: {kind} is the {other_kind} itself; give each file its own "
                      "name")


def _resolved(path: Path) -> Path:
    """``path`` absolute with symbolic links resolved (as far as they resolve)."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):  # a loop of links
        return path.expanduser().absolute()


def _check_output_suffix(path: Path) -> None:
    name = path.name.lower()
    stem = name[:-3] if name.endswith(".gz") else name
    if not stem.endswith(OUTPUT_SUFFIXES):
        raise ValueError(f"{path}: output name must end in .mrc, .map or .ccp4 (optionally "
                         ".gz); choose an MRC file name")


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file (resolved paths, or the same inode)."""
    if _resolved(first) == _resolved(second):
        return True
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def write_map(path: str | Path, data: NDArray[Any], template: MrcMap, label: str,
              overwrite: bool = False) -> None:
    """Write ``data`` as a float32 MRC file with ``template``'s header, atomically.

    Parameters
    ----------
    path : the output file; ``.gz`` names are gzip-compressed.
    data : (z, y, x) array on the template's grid (canonical order, ``template.data.shape``).
    template : the map whose header (and stored axis order) the output keeps.
    label : text for one appended header label (printable ASCII, at most 80 characters are
        kept; when the ten labels are full it replaces the last).
    overwrite : allow replacing an existing file.

    Notes
    -----
    A voxel-size override given to :func:`read_map` is written to the output (``cella``
    updated, see the module docstring); every other header field is kept.
    """
    write_maps([(path, data, label)], template, overwrite=overwrite)


def write_maps(items: Sequence[tuple[str | Path, NDArray[Any], str]], template: MrcMap,
               overwrite: bool = False) -> None:
    """Write several maps with ``template``'s header: all of them or none.

    Each ``(path, data, label)`` is written as :func:`write_map` writes one, to a temporary
    file beside its destination; only when every temporary file is complete are they moved
    into place, one after the other with termination signals held back (see
    :func:`demhx._signals.deferred`). On any failure or interruption the temporary files and
    the outputs this call created are removed (an output it replaced stays replaced).

    Raises
    ------
    OSError
        Writing failed (disk full, I/O error); the message names the file and what to do.
    """
    paths = [check_output_path(path, [template.path], overwrite) for path, _, _ in items]
    temporaries: list[Path] = []
    created: list[Path] = []
    try:
        # Write every map to its temporary file (one stored copy alive at a time) ...
        for path, (_, data, label) in zip(paths, items, strict=True):
            stored = _stored_layout(path, data, template)
            with _signals.deferred():  # a signal waits until the new file is listed for clean-up
                temporaries.append(_new_temporary_for_writing(path))
            _write_temporary(path, temporaries[-1], stored, template, label)
            del stored
        # ... then move them all into place, uninterrupted.
        with _signals.deferred():
            _commit(paths, temporaries, overwrite, created)
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        for path in created:
            path.unlink(missing_ok=True)
        raise


def _stored_layout(path: Path, data: NDArray[Any], template: MrcMap) -> NDArray[np.float32]:
    """``data`` (canonical) transposed to the template's stored layout, float32 C order."""
    array = np.asarray(data)
    if array.shape != template.data.shape:
        raise ValueError(f"{path}: data shape {array.shape} (z, y, x) differs from the "
                         f"template {template.path} {template.data.shape}; write data on "
                         "the template's grid")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{path}: data type {array.dtype} is not real numbers")
    if not validate.all_finite(array):
        raise ValueError(f"{path}: data contain NaN or infinite voxels; nothing written")
    permutation = _canonical_permutation(_axis_order(template.path, template.header))
    inverse = tuple(int(axis) for axis in np.argsort(permutation))
    return np.ascontiguousarray(array.transpose(inverse), dtype=np.float32)


def _commit(paths: Sequence[Path], temporaries: Sequence[Path], overwrite: bool,
            created: list[Path]) -> None:
    """Move each temporary file to its path; ``created`` collects paths that were new."""
    for path in paths:
        if not overwrite and path.exists():
            raise FileExistsError(f"{path}: output appeared while writing; pass overwrite= "
                                  "to replace it or choose another output path")
    for path, temporary in zip(paths, temporaries, strict=True):
        existed = path.exists()
        os.replace(temporary, path)
        if not existed:
            created.append(path)


def _new_temporary_for_writing(path: Path) -> Path:
    try:
        return new_temporary(path)
    except OSError as error:
        if isinstance(error, FileExistsError):
            raise
        raise _write_error(path, error) from None


def _write_temporary(path: Path, temporary: Path, stored: NDArray[np.float32], template: MrcMap,
                     label: str) -> None:
    """Write ``path``'s content to ``temporary``; OSError naming ``path`` when that fails."""
    compression = "gzip" if path.name.lower().endswith(".gz") else None
    try:
        _write_mrc(temporary, stored, template, label, compression)
    except OSError as error:
        raise _write_error(path, error) from None


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_error(path: Path, error: OSError) -> OSError:
    """An OSError naming the output and what to do (its errno kept, so its class too)."""
    if error.errno in _NO_SPACE:
        reason = ("no space left on the device (disk full or over quota); nothing written, "
                  "free some space there or choose another output folder")
    else:
        reason = (f"cannot be written ({error.strerror or error}); nothing written, check the "
                  "output folder or choose another one")
    return OSError(error.errno, reason, str(path))
