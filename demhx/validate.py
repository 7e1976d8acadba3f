"""Plausibility checks at the boundary, and the gate every output passes before it is written.

Inputs
    :func:`check_voxel_size` — a voxel size must lie in :data:`VOXEL_SIZE_RANGE` (0.2–20 Å).
    Smaller sizes are a header in the wrong units (0.001 Å) or a size given in nm
    (``--voxel-size 0.1`` for 1 Å); larger ones turn a map into a handful of voxels on the
    model's 1 Å grid or, the other way, into billions. The real maps of the test data span
    0.39–2.64 Å.

    :func:`check_grid` — a grid (the input's, read from its header, and the model grid it
    is resampled to) may hold at most :data:`MAX_GRID_VOXELS` voxels (2³¹, 8 GiB as float32,
    about 1290³), checked before anything of that size is allocated.

    :func:`repair_extreme_voxels` — an isolated voxel of absurd value (1e30 in a map of unit
    scale, a corrupt or hot voxel) would dominate the normalisation and, through Fourier
    resampling, ring across the whole map. A voxel is *extreme* when it lies more than
    :data:`OUTLIER_FACTOR` (1000) times further from the median than the 99.9th percentile of
    the distances from the median (measured on the real maps of the test data: the farthest
    voxel lies 1.2–1.7 times that far). Each extreme voxel is replaced by the median of its
    ordinary neighbours and all are named in one warning; the output is then trustworthy
    everywhere but near them. EMD-5168 cropped to 48³ (1.742 Å) with one 1e30 voxel, through
    ``tight-fast`` and the fast tiling: CC 1 - 1.3e-11 to the clean crop's output, largest
    difference 0.003 (output peak 50.5); clipping to the other voxels' range instead gave CC
    0.9986 and a false peak of 86 (the corrupt voxel became the map's brightest).
    A map whose scale itself is outside :data:`MAGNITUDE_RANGE` (a map multiplied by 1e30 or
    1e-30) is refused: float32 arithmetic on it overflows or underflows.

    :func:`check_noise_range` — noise statistics that put the map's peak more than
    :data:`MAX_NOISE_STDS` (1e5) noise stds above the noise mean (a std given in the wrong
    units) are refused: the network knows 6.5–22, and such inputs overflow float16 on a GPU.

    What the network handles (:mod:`demhx._range`, re-exported here; measured with
    ``bench/input_range.py``): :func:`check_voxel_ratio` (the map's voxel size against the
    model's, before the statistics), then :func:`check_noise_level`,
    :func:`check_contrast` and :func:`warn_low_peak` (the noise statistics against the
    map's range, the contrast's sign, a peak below the trained range), before any cube runs.

Options and arrays (the one place each is checked; messages name the API's parameters,
    which the command line shows as its flags, see :mod:`demhx.errors`)
    :func:`voxel_triplet`, :func:`check_volume`, :func:`check_mask`, :func:`check_tiling`,
    :func:`check_positive`.

Outputs
    :func:`check_fidelity` — every output (array and file path) must follow the input's
    density where the input has some (:func:`output_fidelity`): an erased or inverted output
    is a runtime failure naming the model, a loose one a warning (:mod:`demhx._range`).
    :func:`check_output` — the file path's gate: an output that has non-finite voxels, is
    all zero, or peaks more than :data:`MAX_OUTPUT_RATIO` times above the input's density is
    a runtime failure (``RuntimeError``) naming the cause; nothing is written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx._range import (  # noqa: F401  (re-exported: demhx.validate.check_contrast, ...)
    CONTRAST_SIGMAS,
    INVERTED_MASS_RATIO,
    MIN_INVERTED_FRACTION,
    MIN_NOISE_BAND_FRACTION,
    MIN_OUTPUT_CC,
    MIN_OUTPUT_GAIN,
    MIN_PEAK_SIGMAS,
    MIN_SIGNAL_FRACTION,
    NOISE_BAND_SIGMAS,
    NOISE_PEAK_SIGMAS,
    VOXEL_RATIO_REFUSED,
    VOXEL_RATIO_WARNED,
    WARN_OUTPUT_CC,
    WARN_OUTPUT_GAIN,
    Fidelity,
    check_contrast,
    check_fidelity,
    check_noise_level,
    check_voxel_ratio,
    density_mass,
    density_tails,
    output_fidelity,
    warn_low_peak,
)
from demhx.errors import DemhxWarning

VOXEL_SIZE_RANGE = (0.2, 20.0)  # Å per voxel accepted, from the header or --voxel-size
MAX_GRID_VOXELS = 1 << 31  # voxels of any grid demhx allocates (8 GiB as float32)
OUTLIER_FACTOR = 1000.0  # extreme: this many times the 99.9th percentile of |v - median|
OUTLIER_QUANTILE = 0.999
MAGNITUDE_RANGE = (1e-12, 1e12)  # the map's typical |v - median| and |median| must fit
MAX_OUTPUT_RATIO = 1000.0  # an output peaking this many times above the input is refused
MAX_NOISE_STDS = 1e5  # a map peaking this many noise stds above the noise mean is refused
SAMPLE_VOXELS = 1 << 18  # voxels sampled for the median and the percentile
MIN_SAMPLE_VOXELS = 100  # fewer non-constant voxels than this: no outlier test
_SLAB_VOXELS = 1 << 22  # voxels per slab when searching (bounded temporary memory)


def voxel_triplet(voxel_size: float | Sequence[float], what: str = "voxel size"
                  ) -> tuple[float, float, float]:
    """A positive finite voxel size per axis (z, y, x) in Å from a scalar or three values."""
    try:
        values = np.atleast_1d(np.asarray(voxel_size, dtype=np.float64)).ravel()
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{what} {voxel_size!r} Å is not one positive value or three "
                         "(z, y, x); pass a positive voxel_size= in Å")
    return float(values[0]), float(values[1]), float(values[2])


def all_finite(array: NDArray[Any]) -> bool:
    """Whether every value of ``array`` is finite.

    NaN and ±inf carry through ``min`` and ``max``, so two passes without a temporary array
    answer it (an ``isfinite`` mask is a quarter of the map again, in fresh memory).
    """
    if array.size == 0 or array.dtype.kind not in "fc":
        return True
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def count_nonfinite(array: NDArray[Any]) -> int:
    """How many values of ``array`` are NaN or infinite (slab by slab: for error messages)."""
    if array.size == 0:
        return 0
    return sum(int(slab.size - np.count_nonzero(np.isfinite(slab))) for _, slab in _slabs(array))


def check_volume(volume: Any, name: str = "volume") -> NDArray[np.float32]:
    """A 3-D finite float32 C-contiguous view or copy of ``volume``."""
    array = np.asarray(volume)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"{name}: shape {array.shape} is not a 3-D (z, y, x) map")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{name}: data type {array.dtype} is not real numbers")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not all_finite(array):
        raise ValueError(f"{name}: contains NaN or infinite voxels; fix or replace the map")
    return array


def check_mask(mask: Any, shape: tuple[int, ...], name: str = "mask", map_name: str = "the map"
               ) -> NDArray[np.float32]:
    """The mask as a checked float32 volume of the map's ``shape`` with a voxel above 0.

    ``name`` (the mask's file) and ``map_name`` (the map's) are named in the messages.
    """
    checked = check_volume(mask, name)
    if checked.shape != shape:
        raise ValueError(f"{name}: shape {checked.shape} (z, y, x) of the mask differs from "
                         f"{map_name} {shape}; make the mask on the map's grid")
    if not np.any(checked > 0):
        raise ValueError(f"{name}: the mask is empty (no voxel > 0); pass a mask that covers "
                         "the particle")
    return checked


def check_tiling(tiling: Any) -> None:
    """ValueError unless ``tiling`` names a scheme of :mod:`demhx.tiling` or is a scheme."""
    from demhx import tiling as schemes

    if not isinstance(tiling, schemes.TilingScheme) and tiling not in schemes.SCHEMES:
        raise ValueError(f"tiling={tiling!r} is not a tiling scheme; use one of "
                         f"{', '.join(schemes.SCHEMES)}")


def check_positive(option: str, value: Any) -> int | None:
    """``value`` as a positive int (None stays None); ValueError naming the parameter
    ``option`` (``"batch_size"``) otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{option}={value!r}: must be a positive integer")
    return int(value)


def check_voxel_size(voxel_size: Sequence[float], what: str, fix: str) -> None:
    """ValueError when a voxel size (Å, any number of axes) is outside :data:`VOXEL_SIZE_RANGE`.

    ``what`` starts the message (e.g. ``"in.mrc: header voxel size"``), ``fix`` ends it.
    """
    low, high = VOXEL_SIZE_RANGE
    values = [float(v) for v in voxel_size]
    if all(math.isfinite(v) and low <= v <= high for v in values):
        return
    text = "/".join(f"{v:.4g}" for v in values)
    raise ValueError(f"{what} {text} Å is outside the range demhx accepts ({low:g}–{high:g} "
                     f"Å); {fix}")


def check_grid(shape: Sequence[int], what: str, fix: str) -> None:
    """ValueError when a grid holds more than :data:`MAX_GRID_VOXELS` voxels."""
    count = math.prod(int(n) for n in shape)
    if count <= MAX_GRID_VOXELS:
        return
    box = "×".join(str(int(n)) for n in shape)
    raise ValueError(f"{what} {box} voxels ({count:.3g}) is more than demhx handles "
                     f"({MAX_GRID_VOXELS:.3g} voxels, 8 GiB as float32); {fix}")


def _sample(volume: NDArray[Any], limit: int = SAMPLE_VOXELS) -> NDArray[Any]:
    flat = volume.reshape(-1)
    step = max(1, flat.size // limit)
    return np.asarray(flat[::step], dtype=np.float64)


def extreme_limits(volume: NDArray[Any], name: str) -> tuple[float, float] | None:
    """The range beyond which a voxel of ``volume`` is extreme, or None when none can be told.

    Raises ValueError when the map's own scale is outside :data:`MAGNITUDE_RANGE`.
    """
    sample = _sample(volume)
    centre = float(np.median(sample))
    distance = np.abs(sample - centre)
    distance = distance[distance > 0]
    if distance.size < MIN_SAMPLE_VOXELS:
        return None  # (nearly) constant: the normalisation refuses such maps
    scale = float(np.quantile(distance, OUTLIER_QUANTILE))
    low, high = MAGNITUDE_RANGE
    if not (low <= scale <= high and abs(centre) <= high):
        size = max(scale, abs(centre))
        raise ValueError(f"{name}: typical density values are of order {size:.1e} (median "
                         f"{centre:.3g}), outside the range demhx computes with in "
                         f"float32 ({low:g} to {high:g}); the map's scale is wrong, multiply it "
                         "by a constant that brings it to ordinary units")
    return centre - OUTLIER_FACTOR * scale, centre + OUTLIER_FACTOR * scale


def repair_extreme_voxels(volume: NDArray[Any], name: str) -> NDArray[Any]:
    """``volume``, or a copy with its extreme voxels replaced (with a warning naming them).

    Parameters
    ----------
    volume : (z, y, x) float32, finite; never modified.
    name : the file (or ``"volume"``) the messages start with.

    Returns
    -------
    (z, y, x) float32: ``volume`` itself when no voxel is extreme; otherwise a copy in which
    every extreme voxel holds the median of its ordinary neighbours (3×3×3), or the map's
    median where it has none. A corrupt voxel's value is unknown; its neighbours' median
    neither invents density nor removes it.
    """
    limits = extreme_limits(volume, name)
    if limits is None:
        return volume
    low, high = limits
    smallest, largest = float(volume.min()), float(volume.max())
    if low <= smallest and largest <= high:
        return volume
    # Find the extreme voxels (slab by slab: bounded temporary memory), then replace each.
    extreme = _extreme_indices(volume, low, high)
    repaired = np.array(volume, dtype=np.float32, order="C")
    centre = float(np.median(_sample(volume)))
    for z, y, x in extreme:
        block = volume[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
        ordinary = block[(block >= low) & (block <= high)]
        repaired[z, y, x] = np.median(ordinary) if ordinary.size else centre
    worst = largest if largest - high >= low - smallest else smallest
    warnings.warn(f"{name}: {len(extreme)} voxel(s) lie far outside the map's density range "
                  f"(up to {worst:.3g}, more than {OUTLIER_FACTOR:g} times farther from the "
                  "median than 99.9 % of the map): corrupt or hot voxels? Each was replaced by "
                  "the median of its neighbours, so the output near them is unreliable; check "
                  "the file", DemhxWarning, stacklevel=2)
    return repaired


def _slabs(volume: NDArray[Any]) -> list[tuple[int, NDArray[Any]]]:
    rows = max(1, _SLAB_VOXELS // max(1, volume[0].size))
    return [(start, volume[start:start + rows]) for start in range(0, volume.shape[0], rows)]


def _extreme_indices(volume: NDArray[Any], low: float, high: float) -> list[tuple[int, int, int]]:
    """(z, y, x) of the voxels outside [low, high]."""
    found: list[tuple[int, int, int]] = []
    for start, slab in _slabs(volume):
        for z, y, x in np.argwhere((slab < low) | (slab > high)):
            found.append((start + int(z), int(y), int(x)))
    return found


def check_noise_range(peak: float, std: float, method: str, name: str) -> None:
    """ValueError when the map's ``peak`` (largest |v - noise mean|) exceeds
    :data:`MAX_NOISE_STDS` noise standard deviations ``std`` (from ``method``)."""
    if peak <= MAX_NOISE_STDS * std:
        return
    raise ValueError(f"{name}: with the noise std {std:.4g} ({method}) the map reaches "
                     f"{peak / std:.3g} noise stds, far beyond the few tens the network was "
                     "trained on; check the noise statistics (noise_stats=MEAN,STD takes the "
                     "solvent's mean and std in the map's units) or the mask (mask=)")


def check_output(result: NDArray[Any], input_peak: float, output: str, cause: str,
                 zero_cause: str) -> None:
    """RuntimeError unless ``result`` is finite, not all zero and in proportion to the input.

    Parameters
    ----------
    result : the output about to be written, in the map's units.
    input_peak : the input's largest ``|value - noise mean|``, in the same units.
    output : the output file (named in the messages).
    cause : who made the output (e.g. ``"model tight 0.2 on cpu"``), blamed for bad values.
    zero_cause : why an all-zero output happened (e.g. every cube skipped as solvent).
    """
    low, high = (float(result.min()), float(result.max())) if result.size else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):  # NaN and ±inf carry through
        raise RuntimeError(f"{cause} produced {count_nonfinite(result)} NaN or infinite voxels; "
                           f"nothing written to {output}; check the model file, or try "
                           "device=cpu")
    if low == 0.0 and high == 0.0:
        raise RuntimeError(f"the output is all zero ({zero_cause}); nothing written to {output}")
    peak = max(-low, high)
    if input_peak > 0 and peak > MAX_OUTPUT_RATIO * input_peak:
        raise RuntimeError(f"{cause} produced values up to {peak:.3g}, {peak / input_peak:.3g} "
                           f"times the input's density ({input_peak:.3g}), out of all "
                           f"proportion; nothing written to {output}; check the model")

