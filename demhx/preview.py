"""A picture of a map before and after enhancement: central orthogonal slices, side by side.

The picture has two rows, the input map and the enhanced map, and three panels per row: the
central xy slice (at the middle z), xz (middle y) and yz (middle x). Pixels are voxels (no
correction for anisotropic voxel sizes); the vertical axis of every panel points up (y in
xy, z in xz and yz), as in a molecular viewer looking down the remaining axis.

Contrast rule, the same for both rows but computed per map: the grey scale of a row runs
from the 1st to the 99.5th percentile (:data:`PERCENTILES`) of the voxels of that map's three
central slices, black to white, values outside clipped. A map and any positive affine
transform of it (``a * map + b``, ``a > 0``) therefore give identical rows.

:func:`preview_panels` and :func:`preview_image` are pure NumPy; :func:`write_preview` draws
the PNG with matplotlib (the optional extra ``demhx[preview]``), imported only when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import _signals
from demhx.errors import MissingExtra
from demhx.mrcio import (
    check_distinct_outputs,
    check_folder_to_create,
    check_output_folder,
    check_path_limits,
    new_temporary,
)

__all__ = ["BACKGROUND", "central_slices", "check_preview_path", "checked_preview_path",
           "contrast_limits", "GAP",
           "PERCENTILES", "PLANES", "preview_file_path", "PREVIEW_FIX", "preview_image",
           "preview_panels", "preview_row", "PreviewRow", "require_matplotlib",
           "row_titles", "to_grey", "write_file_preview", "write_preview"]

PERCENTILES = (1.0, 99.5)  # grey scale of a row: these percentiles of its central slices
GAP = 4  # pixels between panels and rows in :func:`preview_image`
BACKGROUND = 1.0  # grey level (white) of the gaps in :func:`preview_image`
PLANES = ("xy", "xz", "yz")
PREVIEW_FIX = 'pip install "demhx[preview]"'
_FIGURE_WIDTH = 9.0  # inches
_DPI = 100  # pixels per inch of the PNG
_TITLE_HEIGHT = 0.55  # inches above each row for its titles


@dataclass(frozen=True)
class PreviewRow:
    """One map's three central slices, scaled to grey levels in [0, 1].

    Attributes
    ----------
    panels : xy (ny, nx), xz (nz, nx) and yz (nz, ny) float32 images, first row at the top.
    limits : the map values shown as black and white (its percentiles, see the module).
    """

    panels: tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]
    limits: tuple[float, float]


def central_slices(volume: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """The central xy, xz and yz slices of a ``(z, y, x)`` map, vertical axis pointing up.

    Returns
    -------
    xy at ``z = nz // 2`` as (ny, nx), xz at ``y = ny // 2`` as (nz, nx) and yz at
    ``x = nx // 2`` as (nz, ny); each flipped so that its first row is the highest y or z.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"preview: shape {volume.shape} is not a 3-D (z, y, x) map")
    nz, ny, nx = volume.shape
    xy = volume[nz // 2]
    xz = volume[:, ny // 2, :]
    yz = volume[:, :, nx // 2]
    return xy[::-1], xz[::-1], yz[::-1]


def contrast_limits(slices: tuple[NDArray[Any], ...],
                    percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """The values shown as black and white: ``percentiles`` of all voxels of ``slices``.

    A constant picture gets limits one unit apart, so that it shows as black.
    """
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in slices])
    if not np.isfinite(values).all():
        raise ValueError("preview: the map has NaN or infinite voxels; fix or replace the map")
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if not high > low:
        high = low + 1.0
    return low, high


def to_grey(image: NDArray[Any], limits: tuple[float, float]) -> NDArray[np.float32]:
    """``image`` mapped linearly from ``limits`` to [0, 1] (float32), values outside clipped."""
    low, high = limits
    grey = (np.asarray(image, dtype=np.float64) - low) / (high - low)
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def preview_row(volume: NDArray[Any], percentiles: tuple[float, float] = PERCENTILES
                ) -> PreviewRow:
    """One map's central slices on its own grey scale (the contrast rule of the module)."""
    slices = central_slices(volume)
    limits = contrast_limits(slices, percentiles)
    xy, xz, yz = (to_grey(s, limits) for s in slices)
    return PreviewRow((xy, xz, yz), limits)


def preview_panels(input_volume: NDArray[Any], output_volume: NDArray[Any],
                   percentiles: tuple[float, float] = PERCENTILES
                   ) -> tuple[PreviewRow, PreviewRow]:
    """The input's and the output's rows; the two ``(z, y, x)`` maps must share one grid."""
    input_volume, output_volume = np.asarray(input_volume), np.asarray(output_volume)
    if input_volume.shape != output_volume.shape:
        raise ValueError(f"preview: output shape {output_volume.shape} (z, y, x) differs from "
                         f"the input {input_volume.shape}; compare maps on one grid")
    return preview_row(input_volume, percentiles), preview_row(output_volume, percentiles)


def preview_image(input_volume: NDArray[Any], output_volume: NDArray[Any], *,
                  percentiles: tuple[float, float] = PERCENTILES, gap: int = GAP,
                  background: float = BACKGROUND) -> NDArray[np.float32]:
    """The two rows of panels as one grey image, float32 in [0, 1].

    Parameters
    ----------
    input_volume, output_volume : (z, y, x) maps on the same grid.
    percentiles : the contrast rule (see the module).
    gap : pixels between panels and between the rows, filled with ``background``.

    Returns
    -------
    (2 * max(ny, nz) + gap, 2 * nx + ny + 2 * gap) float32
        Input on top, output below; in each row xy, xz, yz from left to right, top-aligned.
    """
    rows = preview_panels(input_volume, output_volume, percentiles)
    nz, ny, nx = np.asarray(input_volume).shape
    row_height = max(ny, nz)
    image = np.full((2 * row_height + gap, 2 * nx + ny + 2 * gap), background, np.float32)
    for index, row in enumerate(rows):
        top, left = index * (row_height + gap), 0
        for panel in row.panels:
            height, width = panel.shape
            image[top:top + height, left:left + width] = panel
            left += width + gap
    return image


def check_preview_path(path: str | Path, overwrite: bool = False) -> Path:
    """Validate a preview file before any work: ``.png``, folder writable, not in the way.

    Raises ValueError (not ``.png``; name or path too long, a loop of symbolic links: see
    :func:`demhx.mrcio.check_path_limits`), FileNotFoundError or PermissionError (the folder),
    IsADirectoryError, or FileExistsError (exists and ``overwrite`` is False).
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: preview name must end in .png; choose a PNG file name")
    check_path_limits(path, "preview")
    check_output_folder(path.parent, "preview")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: preview is a folder; give a file name ending .png")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: preview exists; pass overwrite= to replace it or "
                              "choose another preview path")
    return path


def require_matplotlib() -> None:
    """Raise :class:`~demhx.errors.MissingExtra` naming the fix when matplotlib (needed for PNG
    previews) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra(f"preview= needs matplotlib, which is not installed; "
                          f"{PREVIEW_FIX}") from None


def write_preview(input_volume: NDArray[Any], output_volume: NDArray[Any], path: str | Path, *,
                  names: tuple[str, str] | None = None, overwrite: bool = False,
                  percentiles: tuple[float, float] = PERCENTILES) -> Path:
    """Draw the input and output rows (:func:`preview_panels`) into a PNG file, atomically.

    Parameters
    ----------
    input_volume, output_volume : (z, y, x) maps on the same grid.
    path : the ``.png`` file; its folder must exist.
    names : file names (input, output) for the row titles, ``input: a.mrc``; without them
        the rows are titled ``input`` and ``output``.
    overwrite : replace an existing file.

    Returns
    -------
    The path written. Needs matplotlib (``pip install "demhx[preview]"``).
    """
    require_matplotlib()
    path = check_preview_path(path, overwrite)
    rows = preview_panels(input_volume, output_volume, percentiles)
    figure = _figure(rows, np.asarray(input_volume).shape, names, percentiles)
    # Save beside the destination, then move it into place.
    temporary = None
    try:
        with _signals.deferred():  # a signal waits until the new file is named for clean-up
            temporary = new_temporary(path)
        figure.savefig(temporary, format="png", dpi=_DPI)
        os.replace(temporary, path)
    except BaseException:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise
    return path


def row_titles(rows: tuple[PreviewRow, PreviewRow], names: tuple[str, str] | None,
               percentiles: tuple[float, float] = PERCENTILES) -> tuple[str, str]:
    """The two rows' titles: role, file name if given, and the grey scale's limits."""
    low, high = percentiles
    titles = []
    for index, (row, role) in enumerate(zip(rows, ("input", "output"), strict=True)):
        named = role if names is None else f"{role}: {names[index]}"
        titles.append(f"{named}   (black {row.limits[0]:.3g}, white {row.limits[1]:.3g}: "
                      f"percentiles {low:g}–{high:g})")
    return titles[0], titles[1]


def _figure(rows: tuple[PreviewRow, PreviewRow], shape: tuple[int, ...],
            names: tuple[str, str] | None, percentiles: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` (no pyplot state) of the two rows, titled with the file names."""
    from matplotlib.figure import Figure

    nz, ny, nx = shape
    widths = (nx, nx, ny)
    row_inches = _FIGURE_WIDTH * max(ny, nz) / sum(widths) + _TITLE_HEIGHT
    figure = Figure(figsize=(_FIGURE_WIDTH, 2 * row_inches), layout="constrained")
    centres = {"xy": f"z = {nz // 2}", "xz": f"y = {ny // 2}", "yz": f"x = {nx // 2}"}
    subfigures: Any = figure.subfigures(2, 1)  # one per row
    for subfigure, row, title in zip(subfigures, rows, row_titles(rows, names, percentiles),
                                     strict=True):
        subfigure.suptitle(title, fontsize=10)
        axes = subfigure.subplots(1, 3, width_ratios=widths)
        for axis, panel, plane in zip(axes, row.panels, PLANES, strict=True):
            axis.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            axis.set_title(f"{plane}, {centres[plane]}", fontsize=9)
            axis.set_axis_off()
    return figure


def write_file_preview(source: str | Path, output: str | Path, path: str | Path, *,
                       half2: str | Path | None = None,
                       voxel_size: float | Sequence[float] | None = None,
                       overwrite: bool = False) -> Path:
    """:func:`write_preview` of an input map file (averaged with ``half2``) and its output.

    ``voxel_size`` (Å, one value or (z, y, x)) is passed to the reader, as for the run.
    """
    from demhx import mrcio
    from demhx.pipeline import average_half_maps

    path = check_preview_path(path, overwrite)
    source, output = Path(source), Path(output)
    # The map the network saw (the half-map average) and the enhanced map.
    first = mrcio.read_map(source, voxel_size)
    name = source.name
    if half2 is not None:
        second = mrcio.read_map(Path(half2), voxel_size)
        average_half_maps(first.data, second.data, (str(source), str(half2)), out=first.data)
        name += f" + {Path(half2).name}"
    result = mrcio.read_map(output, voxel_size)
    return write_preview(first.data, result.data, path, names=(name, output.name),
                         overwrite=overwrite)


def preview_file_path(preview: str | Path, output: str | Path) -> Path:
    """Where ``--preview PATH`` writes the picture of ``output``.

    A PATH ending in ``.png`` is the picture itself; any other PATH is a folder, in which the
    picture is ``<output stem>.png`` (``out.mrc.gz`` gives ``out.png``).
    """
    preview = Path(preview).expanduser()
    if preview.suffix.lower() == ".png":
        return preview
    name = Path(output).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return preview / f"{Path(name).stem}.png"


def checked_preview_path(preview: str | Path, output: str | Path, inputs: Sequence[Path],
                         confidence: str | Path | None = None, overwrite: bool = False) -> Path:
    """The picture's file for ``preview`` (a PNG or a folder) of the run writing ``output``,
    checked before any work: within the system's limits, not an input nor another output
    (nor in a folder named like one); a folder that does not exist yet is created only when
    the picture is written; matplotlib must be installed (:func:`require_matplotlib`)."""
    require_matplotlib()
    path = preview_file_path(preview, output)
    written = [("output", Path(output).expanduser()), ("preview", path)]
    if confidence is not None:
        written.append(("confidence map", Path(confidence).expanduser()))
    check_path_limits(path, "preview")
    check_distinct_outputs(written, list(inputs))
    if Path(preview).suffix.lower() == ".png" or path.parent.is_dir():
        return check_preview_path(path, overwrite)
    check_folder_to_create(path.parent, "preview")
    return path
