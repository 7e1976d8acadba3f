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

    What the network handles (see "What the network handles" below):
    :func:`check_voxel_ratio` (the map's voxel size against the
    model's, before the statistics), then :func:`check_noise_level`,
    :func:`check_contrast` and :func:`warn_low_peak` (the noise statistics against the
    map's range, the contrast's sign, a peak below the trained range), before any cube runs.

Options and arrays (the one place each is checked; messages name the API's parameters,
    which the command line shows as its flags, see :mod:`demhx.errors`)
    :func:`voxel_triplet`, :func:`check_volume`, :func:`check_mask`,
    :func:`check_positive`.

Outputs
    :func:`check_fidelity` — every output (array and file path) must follow the input's
    density where the input has some (:func:`output_fidelity`): an erased or inverted output
    is a runtime failure naming the model, a loose one a warning.
    :func:`check_output` — the file path's gate: an output that has non-finite voxels, is
    all zero, or peaks more than :data:`MAX_OUTPUT_RATIO` times above the input's density is
    a runtime failure (``RuntimeError``) naming the cause; nothing is written.

What the network handles
------------------------
The bounds below come from measurements on the synthetic training inputs, test-split maps and
the shared real maps (``bench/input_range.py``; the tables and the thresholds chosen from
them are in ``bench/RESULTS.md``, "Input range: what the network handles").

Inputs (refused with ``ValueError``, or warned about, before any cube runs)
    :func:`check_voxel_ratio` — the network sees every map resampled to the model's voxel
    size. A voxel size a few times too large leaves the map about unchanged at ``s³`` times
    the cost, one too small loses detail the network then cannot restore: refused outside
    :data:`VOXEL_RATIO_REFUSED` (a size slipped by 10 or in the wrong units), warned outside
    :data:`VOXEL_RATIO_WARNED`. The runtime bounds the apparent resolution through the voxel
    size only (no resolution is estimated from the map).

    :func:`density_mass`, :func:`check_contrast` — noise is symmetric about its mean and
    density only adds above it: among the voxels beyond :data:`CONTRAST_SIGMAS` noise stds,
    a map with inverted contrast has more below the mean than above. Refused above
    :data:`INVERTED_MASS_RATIO`, when :data:`MIN_INVERTED_FRACTION` of the voxels or more lie
    below (a few deep voxels are noise or sharpening ripples).

    :func:`check_noise_level` — the solvent lies within a few noise stds of the noise mean;
    a mean that leaves fewer than :data:`MIN_NOISE_BAND_FRACTION` of the voxels within
    :data:`NOISE_BAND_SIGMAS` describes another map: refused.

    :func:`warn_low_peak` — a map peaking below the trained range is partly taken for noise;
    pure noise peaks lower still and rightly comes out empty, so only peaks from
    :data:`NOISE_PEAK_SIGMAS` to :data:`MIN_PEAK_SIGMAS` warn.

Output (after the last cube, before anything is returned or written)
    :func:`output_fidelity`, :func:`check_fidelity` — where the input stands clearly above
    its noise, the output must follow it at low resolution (means over blocks of about
    :data:`COMPARE_ANGSTROM`): an erased or inverted output fails (``RuntimeError``, nothing
    written) below :data:`MIN_OUTPUT_GAIN` or :data:`MIN_OUTPUT_CC`, and warns below
    :data:`WARN_OUTPUT_GAIN` or :data:`WARN_OUTPUT_CC`. A map of pure noise has no such
    voxels (fewer than :data:`MIN_SIGNAL_FRACTION`): the network's empty output passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx.errors import DemhxWarning

__all__ = ["all_finite", "check_contrast", "check_fidelity", "check_grid", "check_mask",
           "check_noise_level", "check_noise_range", "check_output", "check_positive",
           "check_volume", "check_voxel_ratio", "check_voxel_size", "COMPARE_ANGSTROM",
           "CONTRAST_SIGMAS", "count_nonfinite", "density_mass", "density_tails",
           "extreme_limits", "Fidelity", "INVERTED_MASS_RATIO", "MAGNITUDE_RANGE",
           "MAX_GRID_VOXELS", "MAX_NOISE_STDS", "MAX_OUTPUT_RATIO",
           "MIN_INVERTED_FRACTION", "MIN_NOISE_BAND_FRACTION", "MIN_PEAK_SIGMAS",
           "MIN_SAMPLE_VOXELS", "MIN_SIGNAL_FRACTION", "NOISE_BAND_SIGMAS",
           "NOISE_PEAK_SIGMAS", "OUTLIER_FACTOR", "OUTLIER_QUANTILE", "output_fidelity",
           "RANGE_SAMPLE_VOXELS", "repair_extreme_voxels", "SAMPLE_VOXELS",
           "SIGNAL_SIGMAS", "SIGNAL_TAIL_QUANTILE", "TAIL_QUANTILE",
           "TRAINED_RESOLUTIONS", "VOXEL_RATIO_REFUSED", "VOXEL_RATIO_WARNED",
           "VOXEL_SIZE_RANGE", "voxel_triplet", "warn_low_peak"]

# ------------------------------------------------------------------------- what the network handles
VOXEL_RATIO_REFUSED = (0.25, 4.0)  # map voxel / model voxel refused outside (any axis)
VOXEL_RATIO_WARNED = (0.5, 3.0)  # ... and warned about outside
TRAINED_RESOLUTIONS = (2.5, 6.0)  # Å, FSC-0.143 of the training half-maps of every shipped model
# (tight-fast 0.4 also saw 6-7.5 Å); the messages name this shared range
TAIL_QUANTILE = 1e-4  # the map's reach above and below the noise mean: these end quantiles
CONTRAST_SIGMAS = 5.0  # density: voxels beyond this many noise stds from the noise mean
INVERTED_MASS_RATIO = 2.0  # inverted: this many times as many of them below as above ...
MIN_INVERTED_FRACTION = 1e-3  # ... and at least this fraction of the voxels below
NOISE_BAND_SIGMAS = 2.0  # the solvent: voxels within this many noise stds of the noise mean
MIN_NOISE_BAND_FRACTION = 0.01  # fewer voxels there than this: the noise mean is wrong
MIN_PEAK_SIGMAS = 6.5  # maps peaking lower than this (noise stds) are warned about ...
NOISE_PEAK_SIGMAS = 5.0  # ... unless lower than this too: pure noise (3.7 white, 4.3 smooth)
SIGNAL_SIGMAS = 3.0  # the input's signal: this many noise stds above the noise mean ...
SIGNAL_TAIL_QUANTILE = 1e-3  # ... or as far as this quantile reaches below it, if less
MIN_SIGNAL_FRACTION = 1e-2  # less signal than this fraction of the voxels: no output check
MIN_OUTPUT_GAIN, WARN_OUTPUT_GAIN = 0.25, 0.4  # output / input amplitude in the signal
MIN_OUTPUT_CC, WARN_OUTPUT_CC = 0.3, 0.6  # output-input correlation in the signal
COMPARE_ANGSTROM = 3.0  # output and input compared as means over blocks of about this edge
RANGE_SAMPLE_VOXELS = 1 << 20  # voxels of input and output these checks look at (evenly strided)


# --------------------------------------------------------------------------- inputs


def check_voxel_ratio(voxel: Sequence[float], model_voxel: float, name: str) -> None:
    """ValueError outside :data:`VOXEL_RATIO_REFUSED`, a warning outside
    :data:`VOXEL_RATIO_WARNED`, for the map's voxel size ``voxel`` (Å, z/y/x) over the
    model's ``model_voxel``; ``name`` starts the messages."""
    ratios = [float(v) / float(model_voxel) for v in voxel]
    shown = "/".join(f"{v:.4g}" for v in voxel)
    start = f"{name}: voxel size {shown} Å is"
    coarse = max(ratios) > 1 / min(ratios)
    times = f"{max(ratios):.3g} times" if coarse else f"1/{1 / min(ratios):.3g} of"
    lowest, highest = VOXEL_RATIO_REFUSED
    if min(ratios) < lowest or max(ratios) > highest:
        effect = (f"the network leaves maps this coarse about unchanged, and resampled to its "
                  f"voxels the map would grow {max(ratios) ** 3:.0f}-fold" if coarse else
                  "resampling to its voxels would keep almost none of the map's detail")
        raise ValueError(f"{start} {times} the model's {model_voxel:g} Å, outside the "
                         f"{lowest:g}–{highest:g} times it handles: {effect}; check the voxel "
                         "size (a value in nm, or off by 10?) and pass voxel_size= in Å if "
                         "the header is wrong")
    low, high = VOXEL_RATIO_WARNED
    if min(ratios) < low:
        warnings.warn(f"{start} {times} the model's {model_voxel:g} Å: resampling to it keeps "
                      f"no detail finer than {2 * model_voxel:g} Å, and a map resolved finer "
                      f"than the network's {TRAINED_RESOLUTIONS[0]:g}–"
                      f"{TRAINED_RESOLUTIONS[1]:g} Å comes out worse than it went in; check "
                      "the voxel size and the output", DemhxWarning, stacklevel=3)
    elif max(ratios) > high:
        warnings.warn(f"{start} {times} the model's {model_voxel:g} Å: the map cannot resolve "
                      f"better than {2 * max(voxel):.3g} Å, beyond the network's "
                      f"{TRAINED_RESOLUTIONS[0]:g}–{TRAINED_RESOLUTIONS[1]:g} Å, and comes "
                      "out about unchanged; check the voxel size (voxel_size=)",
                      DemhxWarning, stacklevel=3)


def density_tails(volume: NDArray[Any], mean: float, std: float) -> tuple[float, float]:
    """How far the map reaches above and below the noise ``mean``, in noise stds ``std``:
    its :data:`TAIL_QUANTILE` quantiles from each end, taken on an evenly strided sample."""
    sample = _sample(volume, RANGE_SAMPLE_VOXELS)
    low, high = np.quantile(sample, (TAIL_QUANTILE, 1 - TAIL_QUANTILE))
    return (float(high) - mean) / std, (mean - float(low)) / std


def density_mass(volume: NDArray[Any], mean: float, std: float) -> tuple[float, float]:
    """The fractions of the voxels more than :data:`CONTRAST_SIGMAS` noise stds ``std`` above
    and below the noise ``mean`` (on an evenly strided sample)."""
    sample = _sample(volume, RANGE_SAMPLE_VOXELS)
    level = CONTRAST_SIGMAS * std
    above = np.count_nonzero(sample > mean + level) / sample.size
    return above, np.count_nonzero(sample < mean - level) / sample.size


def check_contrast(above: float, below: float, method: str, name: str) -> None:
    """ValueError when the map's density points the wrong way (a map multiplied by -1, or
    a noise mean given far too high).

    ``above`` and ``below``: :func:`density_mass` with the statistics from ``method``.
    Refused when at least :data:`MIN_INVERTED_FRACTION` of the voxels lie below the noise
    mean and :data:`INVERTED_MASS_RATIO` times as many as above it.
    """
    if not (below >= MIN_INVERTED_FRACTION and below > INVERTED_MASS_RATIO * above):
        return
    fix = ("check the noise mean given (noise_stats=) or " if method == "user" else "")
    raise ValueError(f"{name}: {below:.2%} of the voxels lie more than {CONTRAST_SIGMAS:g} "
                     f"noise stds below the noise mean ({method}) and only {above:.2%} as far "
                     "above it: the contrast looks inverted (density negative), which the "
                     f"network was never trained on; {fix}multiply the map by -1")


def check_noise_level(volume: NDArray[Any], mean: float, std: float, method: str, name: str
                      ) -> None:
    """ValueError when fewer than :data:`MIN_NOISE_BAND_FRACTION` of the voxels lie within
    :data:`NOISE_BAND_SIGMAS` noise stds ``std`` of the noise ``mean`` (from ``method``)."""
    sample = _sample(volume, RANGE_SAMPLE_VOXELS)
    near = np.count_nonzero(np.abs(sample - mean) <= NOISE_BAND_SIGMAS * std) / sample.size
    if near >= MIN_NOISE_BAND_FRACTION:
        return
    raise ValueError(f"{name}: the noise mean {mean:.4g} ({method}) is not where the map's "
                     f"solvent is: {near:.1%} of the voxels lie within {NOISE_BAND_SIGMAS:g} "
                     f"noise stds ({std:.4g}) of it (the map spans {sample.min():.4g} to "
                     f"{sample.max():.4g}); give the mean and std of the map's own solvent "
                     "(noise_stats=MEAN,STD), or leave noise_stats= out")


def warn_low_peak(upper: float, method: str, name: str) -> None:
    """Warn when the map peaks (``upper``, noise stds) below :data:`MIN_PEAK_SIGMAS` but not
    below :data:`NOISE_PEAK_SIGMAS`, where pure noise stays."""
    if not NOISE_PEAK_SIGMAS <= upper < MIN_PEAK_SIGMAS:
        return
    warnings.warn(f"{name}: the map peaks at only {upper:.2g} noise stds ({method}), below "
                  f"the {MIN_PEAK_SIGMAS:g}–22 the network was trained on, so it may take "
                  "its density for noise and remove it; if the map has no solvent (a crystal "
                  "map, a crop inside the particle), give the solvent's statistics "
                  "(noise_stats=MEAN,STD)", DemhxWarning, stacklevel=3)


# --------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Fidelity:
    """How the output follows the input where the input has density.

    Attributes
    ----------
    signal_fraction : fraction of the voxels where the input stands clearly above its noise
        (:func:`output_fidelity`); the two measures below are taken there.
    cc : Pearson correlation of output and input there.
    gain : least-squares factor from input (less the noise mean) to output there: about 1
        for a faithful output, near 0 for an erased one, negative for an inverted one.
    """

    signal_fraction: float
    cc: float
    gain: float


def output_fidelity(volume: NDArray[Any], result: NDArray[Any],
                    voxel_size: Sequence[float], mean: float, std: float) -> Fidelity | None:
    """The output's :class:`Fidelity` to the input, or None where the input has no signal.

    The input's signal: the voxels above the noise ``mean`` by :data:`SIGNAL_SIGMAS` noise
    stds ``std``, or by as much as the input reaches below the mean (its
    :data:`SIGNAL_TAIL_QUANTILE`; noise is symmetric, density only adds), whichever is
    less. Pure noise puts about that quantile of its voxels there: below
    :data:`MIN_SIGNAL_FRACTION` there is nothing to compare (noise in, nothing out). Input and
    output are compared at low resolution, as means over blocks of about
    :data:`COMPARE_ANGSTROM` (sharpening and blurring leave those alike), in every block
    holding signal. ``volume`` and ``result``: (z, y, x), the same grid, the map's units;
    ``voxel_size``: Å along (z, y, x).
    """
    # Where the input stands above its noise, at its own resolution.
    values = _sample(volume, RANGE_SAMPLE_VOXELS) - mean
    mirror = -float(np.quantile(values, SIGNAL_TAIL_QUANTILE))
    level = min(SIGNAL_SIGMAS * std, max(mirror, 0.0))
    fraction = np.count_nonzero(values > level) / values.size
    if fraction < MIN_SIGNAL_FRACTION:
        return None
    # Input and output averaged over blocks, in the blocks holding signal.
    factors = [max(1, math.ceil(COMPARE_ANGSTROM / float(v))) for v in voxel_size]
    inside = _blocks(volume > np.float32(mean + level), factors)
    inputs = _blocks(volume, factors)[inside] - mean
    outputs = _blocks(result, factors)[inside]
    inputs, outputs = _sample(inputs, RANGE_SAMPLE_VOXELS), _sample(outputs, RANGE_SAMPLE_VOXELS)
    spread = float(inputs.std() * outputs.std())
    cc = float(np.mean((inputs - inputs.mean()) * (outputs - outputs.mean())) / spread) \
        if spread > 0 else 0.0
    gain = float(np.dot(inputs, outputs) / np.dot(inputs, inputs))
    return Fidelity(fraction, cc, gain)


def _blocks(array: NDArray[Any], factors: Sequence[int]) -> NDArray[Any]:
    """Means over blocks of ``factors`` voxels along (z, y, x) (the last block of an axis may
    be shorter); for a boolean ``array``, whether any voxel of the block is set."""
    for axis, factor in enumerate(factors):
        if factor == 1:
            continue
        starts = np.arange(0, array.shape[axis], factor)
        if array.dtype == bool:
            array = np.logical_or.reduceat(array, starts, axis=axis)
            continue
        counts = np.diff(np.append(starts, array.shape[axis])).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = counts.size
        array = np.add.reduceat(array, starts, axis=axis, dtype=np.float32) / counts.reshape(shape)
    return array


def check_fidelity(fidelity: Fidelity | None, name: str, cause: str, strict: bool = True
                   ) -> None:
    """RuntimeError (only a warning when not ``strict``: an untrained model) for an output
    that erased or inverted the input's density; a warning for one that follows it loosely.

    ``name``: the input; ``cause``: the model that made the output (its label, file and device).
    """
    if fidelity is None:
        return
    found = (f"where {name} has density ({fidelity.signal_fraction:.0%} of its voxels) the "
             f"output has {fidelity.gain:.2g} times its amplitude and a correlation of "
             f"{fidelity.cc:.2f} to it")
    if fidelity.gain < MIN_OUTPUT_GAIN or fidelity.cc < MIN_OUTPUT_CC:
        text = (f"{cause} erased or inverted the map: {found} (faithful outputs: 0.5–1.3 and "
                "0.7–1.0); the map is outside what the network handles: check the warnings "
                "above, the voxel size and the noise statistics (noise_stats=)")
        if strict:
            raise RuntimeError(f"{text}; nothing written")
        warnings.warn(text, DemhxWarning, stacklevel=2)
    elif fidelity.gain < WARN_OUTPUT_GAIN or fidelity.cc < WARN_OUTPUT_CC:
        warnings.warn(f"{cause} follows the map only loosely: {found} (faithful outputs: "
                      "0.5–1.3 and 0.7–1.0); compare the output with the input before using it",
                      DemhxWarning, stacklevel=2)


# --------------------------------------------------------------------------- boundary checks
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
