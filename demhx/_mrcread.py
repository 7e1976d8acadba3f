"""Reading MRC/CCP4 maps: the checks at the boundary and the data in canonical order.

:func:`read_map` validates the file (existence, size, header, data mode, dimensions against
the file size *before* any data is read, finite voxels, voxel size), then returns a
:class:`~demhx.mrcio.MrcMap` whose ``data`` is a private float32 copy in the canonical
``(z, y, x)`` axis order, whatever the file's (:mod:`demhx._mrcheader`). Files compressed
with gzip or bzip2 are recognised by their first bytes and read through the decompressor;
``mrcfile`` errors and warnings become one-line ``ValueError`` messages that name the file
and what to do (:func:`_explain`).

The public names are re-exported by :mod:`demhx.mrcio`, where callers take them from.
"""

from __future__ import annotations

import bz2
import gzip
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header
from numpy.typing import NDArray

from demhx import validate
from demhx._mrcheader import (
    HEADER_BYTES,
    MrcMap,
    _axis_order,
    _canonical_permutation,
    _check_header,
    _checked_header_voxel_size,
    _data_bytes,
)

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
    _check_data_size(path, header, compression)
    validate.check_grid((int(header.nx), int(header.ny), int(header.nz)),
                        f"{path}: header dimensions (x×y×z)", "crop or bin the map")
    voxel = override if override is not None else _checked_header_voxel_size(path, header)
    if override is not None:
        validate.check_voxel_size(override, f"{path}: voxel_size=",
                                  "give the voxel size in Å (1 nm = 10 Å)")
    # Read the stored array and bring it to canonical (z, y, x) order in one float32 copy.
    data = _read_canonical(path, header, compression)
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
        _check_data_size(path, header, compression)


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


def _check_data_size(path: Path, header: np.recarray, compression: str | None) -> None:
    """Compare the file's size with what the header promises, without reading the data."""
    nsymbt = int(header.nsymbt)
    if nsymbt < 0:
        raise ValueError(f"{path}: header extended-header size {nsymbt} is negative; the "
                         "header is corrupt, re-export the map")
    expected = HEADER_BYTES + nsymbt + _data_bytes(header)
    if compression is None:
        actual = path.stat().st_size
    else:
        actual = _decompressed_size(path, compression, limit=expected + 1)
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


def _decompressed_size(path: Path, compression: str, limit: int) -> int:
    """Bytes in a compressed file, counting (without keeping) at most ``limit`` of them."""
    total = 0
    with _mrcfile_errors(path), _open_compressed(path, compression) as stream:
        while total < limit:
            chunk = stream.read(min(_CHUNK_BYTES, limit - total))
            if not chunk:
                break
            total += len(chunk)
    return total


def _read_canonical(path: Path, header: np.recarray, compression: str | None
                    ) -> NDArray[np.float32]:
    """The data as a private (z, y, x) float32 C-contiguous array."""
    permutation = _canonical_permutation(_axis_order(path, header))
    if compression is None:
        with _mrcfile_errors(path):
            with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
                stored = mrc.data
                return np.array(stored.transpose(permutation), dtype=np.float32, order="C")
    dtype = data_dtype_from_header(header)
    shape = (int(header.nz), int(header.ny), int(header.nx))
    with _mrcfile_errors(path), _open_compressed(path, compression) as stream:
        stream.read(HEADER_BYTES + int(header.nsymbt))
        raw = stream.read(_data_bytes(header))
    stored = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return np.array(stored.transpose(permutation), dtype=np.float32, order="C")


def _check_finite(path: Path, data: NDArray[Any]) -> None:
    if not validate.all_finite(data):
        count = validate.count_nonfinite(data)
        raise ValueError(f"{path}: contains {count} NaN or infinite voxels; fix or replace "
                         "the map")
