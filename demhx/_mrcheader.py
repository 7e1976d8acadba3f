"""The MRC header: what demhx reads from it and what it writes into it (through ``mrcfile``).

Reading, the header must describe one real-valued 3-D volume (:func:`_check_header`: no
images, stacks, complex or unsupported modes) and name its axis order: ``mapc``/``mapr``/
``maps`` say which spatial axis (1 = x, 2 = y, 3 = z) runs along the columns, rows and
sections of the stored array, and :func:`_canonical_permutation` turns the stored array
(sections, rows, columns) into the canonical ``(z, y, x)``, so that a map is never mirrored or
rotated. The voxel size is per spatial axis, ``cella.x / mx`` and so on, in ``(z, y, x)``
order (:func:`_header_voxel_size`).

Writing, :func:`_write_mrc` keeps the template's header and sets the MRC2014 format fields,
the extended header (:func:`extended_header_to_write`), a voxel-size override and the labels,
as :mod:`demhx.mrcio` describes. :class:`MrcMap`, the map and its header, lives here too.

The public names are re-exported by :mod:`demhx.mrcio`, where callers take them from.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header
from numpy.typing import NDArray

from demhx import validate
from demhx.errors import DemhxWarning

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
