"""The file path: read the map (or half-maps) and mask, enhance, gate and write.

:func:`enhance_file` checks the output paths and options before any slow work, reads the
input (averaging two half-maps in place after checking they share one grid), runs the array
path (:func:`demhx.run_array.enhance_array`), passes the output through the gate
(:func:`demhx.validate.check_output`: nothing all-zero, non-finite or out of proportion is
written) and writes the output (and the confidence map) atomically with the input's header:
axis order, origin, nstart, voxel size, cell, labels, and one label naming demhx and the model.
Nothing is written when any step fails or is interrupted.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from demhx import _warmup, mrcio, validate
from demhx.errors import DemhxWarning
from demhx.multi_device import Loaded
from demhx.options import EnhanceOptions, EnhanceSummary, RunInfo, VoxelSize
from demhx.run_array import StageClock, average_half_maps, model_cause, zero_cause

if TYPE_CHECKING:
    from demhx.pipeline import Enhancer

_VOXEL_MATCH = 1e-4  # relative tolerance for two half-maps' voxel sizes (and cells)
_ORIGIN_MATCH = 1e-3  # Å: two half-maps' origins agree within this
_RIGHT_ANGLE = 90.0
_ANGLE_MATCH = 0.01  # degrees: a cell angle this close to 90° is a right angle


def enhance_file(enhancer: Enhancer, source: str | Path, output: str | Path,
                 options: EnhanceOptions, *, half2: str | Path | None = None,
                 voxel_size: VoxelSize | None = None, mask: str | Path | None = None,
                 confidence: str | Path | None = None, overwrite: bool = False
                 ) -> EnhanceSummary:
    """Enhance the map in ``source`` into ``output`` (see :func:`demhx.pipeline.enhance_file`).

    ``confidence`` (a path) asks for the confidence map, whatever ``options.confidence`` says.
    """
    start = time.perf_counter()
    # Check the output paths and options before any slow work.
    inputs = [Path(p) for p in (source, half2, mask) if p is not None]
    output = mrcio.check_output_path(Path(output), inputs, overwrite)
    spread_path = _check_confidence_path(confidence, output, inputs, overwrite)
    options = options.replace(confidence=spread_path is not None)
    _check_half2_path(Path(source), half2)
    for folder in {path.parent for path in (output, spread_path) if path is not None}:
        mrcio.clean_stale_temporaries(folder)
    _warmup.start()  # numba's set-up, while the map is read and the model loaded
    enhancer.preload()  # on a GPU: the session and a first batch, while the map is read
    # Read the map (averaging half-maps in place) and the mask.
    clock = StageClock()
    template = _read_input(Path(source), half2, voxel_size)
    mask_data = None if mask is None else mrcio.read_map(Path(mask), template.voxel_size).data
    # Enhance, check the result, and write atomically: nothing is written if anything
    # above fails.
    enhanced = enhancer.process(template.data, template.voxel_size, options, mask=mask_data,
                                name=str(source), mask_name=str(mask), clock=clock)
    runtime = enhancer.runtime
    _check_output(enhanced.map, enhanced.info, runtime, output)
    label = _label(runtime, enhanced.info)
    items = [(output, enhanced.map, label)]
    if spread_path is not None and enhanced.spread is not None:
        items.insert(0, (spread_path, enhanced.spread, f"{label}, confidence: std"[:80]))
    mrcio.write_maps(items, template, overwrite=overwrite)
    clock.lap("write")
    clock.log()
    return EnhanceSummary(Path(source), None if half2 is None else Path(half2), output,
                          enhanced.info.shape, template.voxel_size, runtime.spec.label,
                          enhanced.info, time.perf_counter() - start, spread_path)


def _check_confidence_path(confidence: str | Path | None, output: Path, inputs: list[Path],
                           overwrite: bool) -> Path | None:
    """The confidence map's path, checked like the output's (and distinct from it)."""
    if confidence is None:
        return None
    path = mrcio.check_output_path(Path(confidence), inputs, overwrite)
    mrcio.check_distinct_outputs([("output map", output), ("confidence=", path)], inputs)
    return path


def _read_input(source: Path, half2: str | Path | None, voxel_size: VoxelSize | None
                ) -> mrcio.MrcMap:
    """The map, or the first half-map with the average of both in its (private) data."""
    first = mrcio.read_map(source, voxel_size)
    _warn_oblique_cell(first)
    if half2 is None:
        return first
    second = mrcio.read_map(Path(half2), voxel_size)
    _check_same_voxel_size(first, second)
    _check_same_grid(first, second, compare_cell=voxel_size is None)
    average_half_maps(first.data, second.data, (str(source), str(half2)), out=first.data)
    return first


def _check_half2_path(source: Path, half2: str | Path | None) -> None:
    """ValueError when ``half2`` names the input map itself."""
    if half2 is not None and mrcio.same_file(Path(half2), source):
        raise ValueError(f"{half2}: half2= is the input map {source} itself; pass the other "
                         "half-map of the reconstruction, or leave half2= out")


def _check_same_voxel_size(first: mrcio.MrcMap, second: mrcio.MrcMap) -> None:
    if not np.allclose(first.voxel_size, second.voxel_size, rtol=_VOXEL_MATCH, atol=0):
        sizes = ["/".join(f"{v:.4g}" for v in m.voxel_size) for m in (first, second)]
        raise ValueError(f"{second.path}: voxel size {sizes[1]} Å (z/y/x) differs from "
                         f"{first.path} {sizes[0]} Å; pass the two half-maps of one "
                         "reconstruction, or voxel_size= if a header is wrong")


def _grid_fields(item: mrcio.MrcMap, compare_cell: bool) -> dict[str, tuple[float, ...]]:
    """The fields two half-maps must share: shape, nstart, origin (and the cell)."""
    header = item.header
    values = {"shape (z, y, x)": tuple(float(n) for n in item.data.shape),
              "nstart (x, y, z)": (float(header.nxstart), float(header.nystart),
                                   float(header.nzstart)),
              "origin (x, y, z)": tuple(float(header.origin[a]) for a in "xyz")}
    if compare_cell:
        values["cell (x, y, z)"] = tuple(float(header.cella[a]) for a in "xyz")
    return values


def _check_same_grid(first: mrcio.MrcMap, second: mrcio.MrcMap, compare_cell: bool) -> None:
    """ValueError when two half-maps' shape, nstart, origin or cell differ."""
    tolerance = {"origin (x, y, z)": (0.0, _ORIGIN_MATCH), "cell (x, y, z)": (_VOXEL_MATCH, 0.0)}
    ours, theirs = _grid_fields(first, compare_cell), _grid_fields(second, compare_cell)
    for what, values in ours.items():
        rtol, atol = tolerance.get(what, (0.0, 0.0))
        if not np.allclose(values, theirs[what], rtol=rtol, atol=atol, equal_nan=True):
            show = [",".join(f"{v:g}" for v in item) for item in (theirs[what], values)]
            raise ValueError(f"{second.path}: {what} {show[0]} differs from {first.path} "
                             f"{show[1]}; the two half-maps must share one grid: pass the two "
                             "half-maps of one reconstruction, or fix the header that is wrong")


def _warn_oblique_cell(item: mrcio.MrcMap) -> None:
    """Warn when the cell angles are not 90° (0° everywhere counts as unset)."""
    angles = [float(item.header.cellb[a]) for a in ("alpha", "beta", "gamma")]
    if all(angle == 0 for angle in angles) or all(
            abs(angle - _RIGHT_ANGLE) <= _ANGLE_MATCH for angle in angles):
        return
    text = "/".join(f"{angle:g}" for angle in angles)
    warnings.warn(f"{item.path}: cell angles {text}° (alpha/beta/gamma) are not all 90°; "
                  "demhx and the network treat the grid as orthogonal, so the density is "
                  "processed slightly sheared (the output keeps the input's cell); for an "
                  "exact result resample the map onto an orthogonal grid first",
                  DemhxWarning, stacklevel=4)


def _check_output(result: NDArray[np.float32], info: RunInfo, runtime: Loaded,
                  output: Path) -> None:
    """The output gate: RuntimeError naming the cause for an all-zero or absurd output."""
    validate.check_output(result, info.input_peak, str(output), model_cause(runtime),
                          zero_cause(info, runtime))


def _label(runtime: Loaded, info: RunInfo) -> str:
    """The output's label: demhx, its version, the model, the tiling (and rotations)."""
    from demhx import __version__

    rotations = f", {info.augmentations} rotations" if info.augmentations > 1 else ""
    return (f"demhx {__version__}: model {runtime.spec.label}, {info.tiling} tiling"
            f"{rotations}")[:80]
