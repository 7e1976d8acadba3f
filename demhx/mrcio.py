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
_NAME_MAX = 255  # bytes in one file name, where the file system does not say (POSIX systems)
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
