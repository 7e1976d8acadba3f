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
    ``origin``), ``ispg``, the extra fields and the labels' text are copied unchanged. The
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
    (``.<name>.demhx-<machine>-<pid>-<random>.tmp``) and moved into place with
    :func:`os.replace`; on any failure, ``KeyboardInterrupt`` included, the temporary file is
    removed and the destination is untouched. :func:`write_maps` writes several maps (an
    output and its confidence map) all or none. A temporary file left by a killed run is
    removed by the next run in that folder (:func:`clean_stale_temporaries`). A full disk is
    an ``OSError`` naming the output. ``.gz`` destinations are gzip-compressed.

Errors are built-in exceptions (``FileNotFoundError``, ``IsADirectoryError``,
``PermissionError``, ``FileExistsError``, ``ValueError``) whose one-line message names the
file, the problem and the fix.

This module holds the output checks and the all-or-none writing; the header
(:mod:`demhx._mrcheader`), the reading (:mod:`demhx._mrcread`) and the temporary files
(:mod:`demhx._temporaries`) live in private modules whose public names are re-exported here.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import _signals, validate
from demhx._mrcheader import (  # noqa: F401  (re-exported: demhx.mrcio.MrcMap, ...)
    COMPLEX_MODES,
    EXTENDED_HEADER_TYPES,
    HEADER_BYTES,
    IMAGE_STACK_SPACE_GROUP,
    LABEL_BYTES,
    LABEL_COUNT,
    MRC2014_VERSION,
    REAL_MODES,
    SYMMETRY_RECORD_BYTES,
    VOLUME_STACK_SPACE_GROUPS,
    MrcMap,
    _axis_order,
    _canonical_permutation,
    _write_mrc,
    extended_header_to_write,
)
from demhx._mrcread import (  # noqa: F401  (re-exported: demhx.mrcio.read_map, ...)
    VoxelSizeLike,
    check_map_file,
    read_map,
)
from demhx._temporaries import (  # noqa: F401  (re-exported: demhx.mrcio.new_temporary, ...)
    STALE_AFTER_SECONDS,
    TEMPORARY_PATTERN,
    _owner,
    clean_stale_temporaries,
    new_temporary,
)

OUTPUT_SUFFIXES = (".mrc", ".map", ".ccp4")


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
        Wrong extension, or the output is one of the inputs.
    FileNotFoundError, PermissionError
        The output folder is missing or not writable.
    IsADirectoryError, FileExistsError
        The output is a folder, or exists and ``overwrite`` is False.
    """
    path = Path(path).expanduser()
    # The name, then the folder, then the file itself.
    _check_output_suffix(path)
    check_output_folder(path.parent, "output")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: output is a folder; give a file name ending .mrc")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: output exists and is not a regular file (a named pipe, "
                         "device or socket); choose an ordinary file name")
    for source in inputs:
        if same_file(path, Path(source)):
            raise ValueError(f"{path}: output is the input {source}; inputs are never "
                             "overwritten, choose another output path")
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


def _check_output_suffix(path: Path) -> None:
    name = path.name.lower()
    stem = name[:-3] if name.endswith(".gz") else name
    if not stem.endswith(OUTPUT_SUFFIXES):
        raise ValueError(f"{path}: output name must end in .mrc, .map or .ccp4 (optionally "
                         ".gz); choose an MRC file name")


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file (resolved paths, or the same inode)."""
    if first.resolve() == second.resolve():
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
