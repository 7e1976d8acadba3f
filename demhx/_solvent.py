"""The solvent-noise estimators: the noise of an unmasked map (method ``"auto"``,
:func:`estimate_noise`) and of the solvent left inside a mask (method ``"auto-masked"``), and
the detection of masked maps (a coherent region of one exact value).

``"auto"`` — :func:`estimate_noise`, for unmasked maps
    The solvent is found from local statistics, with no assumption on where the particle is:
    the mean and standard deviation of the density in a window of about
    :data:`WINDOW_VOXELS` voxels around every voxel are computed (box filters), and

    1. a first guess of the solvent takes, among the voxels whose local mean is below the
       median, the :data:`SEED_FRACTION` with the lowest local standard deviation;
    2. the solvent is then every voxel whose local mean *and* local standard deviation lie
       within :data:`CLIP_SIGMAS` robust standard deviations (median and median absolute
       deviation) of those of the current solvent set; this is repeated
       :data:`ITERATIONS` times;
    3. the noise mean and std are those of the raw voxels in the final set.

    Density raises the local mean and the local variance, so particles anywhere in the box
    (off-centre, touching an edge, filaments crossing it, hollow particles whose empty centre
    counts as solvent, non-cubic boxes) are left out, while the solvent is kept wherever it
    is. Runs of exactly constant voxels (padding) are left out too.

    Measured on the synthetic particles of ``tests/conftest.py`` (centred, off-centre, cut by
    a box face, a filament crossing the box, a hollow shell, a non-cubic box; blobs peaking at
    12 noise stds): with white noise the mean is within 0.005 noise std of the truth and the
    std within 0.6 %; with noise smoothed over 1 voxel, within 0.025 std and 3.6 % (the std
    is slightly underestimated: windows with the largest local variance are clipped); over
    1.5 voxels, 0.04 std and 5 %. Limit: a particle filling about half the box with noise
    correlated over 2 voxels gives +0.3 std and +23 % (solvent and density no longer separate
    in 7-voxel windows); pass ``noise_stats=`` or ``mask=`` for such maps.
``"auto-masked"`` — masked maps and user masks
    A map is masked when a coherent region of one exact value (runs of it, see
    :func:`_constant_region`) covers :data:`MIN_MASK_FRACTION` of the box or more. The same
    estimator then runs on the voxels inside the map's mask only, leaving out the band along
    the mask's edge where a soft edge attenuates the noise (:func:`edge_band`: the band ends
    where the noise level stops rising; box faces holding masked voxels count as edges) and,
    with a user mask, the particle it marks (the mask at half its maximum or more, dilated by
    :data:`MASK_DILATION_VOXELS`). The result is kept when it looks like solvent
    (:func:`_looks_like_solvent`): :data:`MIN_MASKED_SOLVENT_FRACTION` of the inside or more,
    a lower tail as noise has, a peak of :data:`MIN_SOLVENT_PEAK_SIGMAS` or more, and a mean
    at most :data:`MAX_SOLVENT_OFFSET_SIGMAS` stds above the masked value. On the synthetic
    particles masked with hard or soft spheres the std is within 1.5 % of the unmasked
    estimate (stationary noise, white or correlated), 6-10 % high for a hollow shell whose
    solvent inside the mask is a minority.

:func:`estimate_noise` itself still refuses a masked map (:func:`check_not_masked`);
:func:`demhx.normalise.choose_stats`, the policy that picks a map's statistics, routes masked
maps around it. The public names are re-exported by :mod:`demhx.normalise`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx._noisestats import (
    SAMPLE_VOXELS,
    NoiseStats,
    _masked_sample,
    _median,
    _robust_centre_spread,
    _sample,
    peak_sigmas,
    run_split,
)
from demhx.validate import check_volume

WINDOW_VOXELS = 7  # edge of the local-statistics window along the finest axis, voxels
SEED_FRACTION = 0.2  # fraction of the low-density voxels taken as the first solvent guess
CLIP_SIGMAS = 3.0  # solvent: local mean and std within this many robust stds of the solvent's
ITERATIONS = 3  # refinements of the solvent set
MASKED_FRACTION = 0.2  # estimate_noise refuses a map with this fraction of one exact value
MIN_MASK_FRACTION = 0.01  # a coherent constant region this large makes a map masked too
MASK_COHERENCE = 0.25  # coherent: this fraction of the region survives a one-voxel erosion
MIN_SOLVENT_FRACTION = 0.02  # fewer solvent voxels than this: estimation refused
MIN_SOLVENT_VOXELS = 200
MIN_EDGE_BAND_VOXELS = 4  # masked maps: voxels this close to the constant region are left out
MAX_EDGE_BAND_VOXELS = 24  # widest band left out where a soft mask edge attenuates the noise
EDGE_TOLERANCE = 0.05  # the edge band ends where the noise level rises by less than 5 % a voxel
MIN_EDGE_SHELL_VOXELS = 50  # shells with fewer candidate voxels are not measured
MIN_MASKED_SOLVENT_FRACTION = 0.05  # solvent needed, fraction of the voxels inside the mask
MIN_TAIL_FRACTION = 0.005  # solvent below mean - 2 std (Gaussian 2.3 %; thresholded maps: 0)
MAX_SOLVENT_OFFSET_SIGMAS = 0.5  # solvent mean above a masked map's constant, in its stds
MIN_SOLVENT_PEAK_SIGMAS = 4.0  # below this the "solvent" is density: normalise by the peak
_FIX = "pass mask=PATH or noise_stats=MEAN,STD"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- masked maps


def check_not_masked(volume: NDArray[Any], path_label: str) -> None:
    """Refuse a constant map, or one that is already masked (its solvent exactly constant).

    Raises
    ------
    ValueError
        Naming ``path_label``; for a masked map suggesting ``mask=`` or ``noise_stats=``.
    """
    _constant_runs(np.asarray(volume, dtype=np.float32), path_label)


def _constant_runs(volume: NDArray[Any], path_label: str) -> NDArray[np.bool_] | None:
    """Voxels in runs of one exactly repeated value (padding), or None; refuses masked maps."""
    value, runs, fraction = _constant_region(volume, path_label)
    if fraction >= MASKED_FRACTION:
        raise ValueError(f"{path_label}: {fraction:.0%} of the voxels are exactly {value:g} "
                         "(the map looks masked), so its solvent noise cannot be estimated; "
                         + _FIX)
    return runs


def _constant_region(volume: NDArray[Any], path_label: str
                     ) -> tuple[np.float32, NDArray[np.bool_] | None, float]:
    """The most common value, the voxels in runs of it (or None) and their fraction of the box.

    A voxel is in a run when it and its next neighbour along each axis all equal the most
    common value of the map. Integer-valued noise rarely forms such runs; masking and padding
    do. Refuses a constant map.
    """
    low, high = float(volume.min()), float(volume.max())
    if low == high:
        raise ValueError(f"{path_label}: is constant (every voxel is {low:g}); there is no "
                         "density to normalise, check the map")
    value = _most_common_value(volume)
    equal = volume == value
    runs = equal[:-1, :-1, :-1] & equal[1:, :-1, :-1] & equal[:-1, 1:, :-1] \
        & equal[:-1, :-1, 1:]
    fraction = np.count_nonzero(runs) / volume.size
    if fraction == 0:
        return value, None, 0.0
    equal[:-1, :-1, :-1] = runs
    equal[-1, :, :] = equal[:, -1, :] = equal[:, :, -1] = False
    return value, equal, fraction


def _most_common_value(volume: NDArray[Any]) -> np.float32:
    """The most common value of a sample of the map; a zero is +0 (a masked map's outside
    holds -0 where the mask zeroed negative values, and which one the sample met first must
    not decide the sign of the normalised outside)."""
    sample = _sample(volume)
    values, counts = np.unique(sample, return_counts=True)
    return np.float32(values[int(np.argmax(counts))]) + np.float32(0.0)


# --------------------------------------------------------------------------- automatic


def estimate_noise(volume: NDArray[Any], voxel_size: tuple[float, float, float] | None = None
                   ) -> NoiseStats:
    """Estimate the solvent noise mean and std of an unmasked map (method ``"auto"``).

    Parameters
    ----------
    volume : (z, y, x) map, any real dtype (computed in float32).
    voxel_size : Å along (z, y, x); used only to make the window about isotropic in Å.

    Returns
    -------
    NoiseStats
        ``method="auto"``, ``solvent_fraction`` the fraction of voxels used.

    Raises
    ------
    ValueError
        A constant or masked map, or no solvent found (suggesting ``mask=`` or
        ``noise_stats=``).
    """
    volume = _checked_volume(volume)
    return _estimate_unmasked(volume, voxel_size, _constant_runs(volume, "map"))


def _estimate_unmasked(volume: NDArray[np.float32], voxel_size: tuple[float, float, float] | None,
                       padding: NDArray[np.bool_] | None) -> NoiseStats:
    """:func:`estimate_noise` of a checked float32 ``volume`` whose ``padding`` (runs of one
    exact value, or None) is known."""
    # Local mean and std in windows around every voxel.
    local_mean, local_std = _local_moments(volume, _window(voxel_size, volume.shape))
    if padding is not None:
        local_std[padding] = np.nan  # never solvent
    # First guess, then refinements of the solvent set.
    solvent = _solvent_set(local_mean, local_std)
    del local_mean, local_std
    return _stats_of(volume, solvent)


def _checked_volume(volume: NDArray[Any], name: str = "map") -> NDArray[np.float32]:
    """:func:`demhx.validate.check_volume`, with at least two voxels along each axis (the
    local windows and the constant-run search compare neighbours)."""
    array = check_volume(volume, name)
    if min(array.shape) < 2:
        raise ValueError(f"{name}: shape {array.shape} is not a 3-D (z, y, x) map")
    return array


def _window(voxel_size: tuple[float, float, float] | None, shape: tuple[int, ...]
            ) -> tuple[int, int, int]:
    """Window edge per axis: :data:`WINDOW_VOXELS` along the finest axis, about isotropic."""
    sizes = np.ones(3) if voxel_size is None else np.asarray(voxel_size, dtype=float)
    if sizes.shape != (3,) or not np.all(np.isfinite(sizes) & (sizes > 0)):
        sizes = np.ones(3)
    edges = []
    for size, length in zip(WINDOW_VOXELS * sizes.min() / sizes, shape, strict=True):
        edge = max(3, 2 * int(round((size - 1) / 2)) + 1)
        edges.append(min(edge, length if length % 2 else length - 1))
    return edges[0], edges[1], edges[2]


def _local_moments(volume: NDArray[Any], window: tuple[int, int, int]
                   ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Local mean and standard deviation (float32) in a box window around every voxel.

    The values, less the median (against cancellation), and their squares are averaged by
    box filters with ``scipy.ndimage.uniform_filter``'s mirrored boundary and arithmetic
    (:func:`demhx._noise_kernels.local_moments`, the same floats as that filter), split
    between threads: the z pass by rows, the y and x passes by planes.
    """
    from demhx import _noise_kernels as kernels

    volume = np.ascontiguousarray(volume, dtype=np.float32)
    centre = float(_median(_sample(volume)))
    local_mean, local_std = np.empty_like(volume), np.empty_like(volume)
    run_split(kernels.z_moments, volume.shape[1], volume, centre, window[0],
                      local_mean, local_std)
    run_split(kernels.plane_moments, volume.shape[0], window[1], window[2],
                      local_mean, local_std)
    return local_mean, local_std


# A set of voxels: its mask and, per plane z, the number of its voxels ahead of the plane
# (``before[z]``; ``before[-1]`` the count), which lets threads sample it plane by plane.
_Selection = tuple[NDArray[np.bool_], NDArray[np.int64]]


def _seed(local_mean: NDArray[np.float32], local_std: NDArray[np.float32],
          candidates: NDArray[np.bool_] | None = None) -> NDArray[np.bool_]:
    """First solvent guess: the lowest-variance part of the low-density half of the box (of
    the ``candidates`` when given)."""
    return _seed_selection(local_mean, local_std, candidates)[0]


def _refine(local_mean: NDArray[np.float32], local_std: NDArray[np.float32],
            solvent: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Voxels whose local mean and std lie within the current solvent's robust ranges."""
    counts = np.count_nonzero(solvent.reshape(solvent.shape[0], -1), axis=1)
    before = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return _refined(local_mean, local_std, (solvent.copy(), before))[0]


def _solvent_set(local_mean: NDArray[np.float32], local_std: NDArray[np.float32],
                 candidates: NDArray[np.bool_] | None = None) -> _Selection:
    """:func:`_seed`, then :data:`ITERATIONS` times :func:`_refine`."""
    solvent = _seed_selection(local_mean, local_std, candidates)
    for _ in range(ITERATIONS):
        solvent = _refined(local_mean, local_std, solvent)
    return solvent


def _seed_selection(local_mean: NDArray[np.float32], local_std: NDArray[np.float32],
                    candidates: NDArray[np.bool_] | None) -> _Selection:
    pool = _sample(local_mean) if candidates is None else _masked_sample(local_mean, candidates)
    median = float(_median(pool))
    # local mean at most the median, finite local std ...
    low = _select(local_mean, local_std, (-np.inf, median, -np.inf, _FLOAT32_MAX), None)
    # ... and the lowest local stds among those
    threshold = float(np.quantile(_samples(local_std, local_std, low)[0], SEED_FRACTION))
    return _select(local_std, local_std, (-np.inf, threshold, -np.inf, threshold), low)


def _refined(local_mean: NDArray[np.float32], local_std: NDArray[np.float32],
             solvent: _Selection) -> _Selection:
    """:func:`_refine` of a selection (whose mask is overwritten)."""
    bounds = []
    for sample in _samples(local_mean, local_std, solvent):
        centre, spread = _robust_centre_spread(sample)
        bounds += [centre - CLIP_SIGMAS * spread, centre + CLIP_SIGMAS * spread]
    return _select(local_mean, local_std, bounds, None, solvent[0])


def _select(first: NDArray[np.float32], second: NDArray[np.float32], bounds: Any,
            within: _Selection | None, out: NDArray[np.bool_] | None = None) -> _Selection:
    """The voxels with ``bounds[0] <= first <= bounds[1]`` and ``bounds[2] <= second <=
    bounds[3]`` (compared in float32), of ``within`` when given (its mask is overwritten)."""
    from demhx import _noise_kernels as kernels

    mask = within[0] if within is not None else (
        np.empty(first.shape, dtype=bool) if out is None else out)
    counts = np.empty(first.shape[0], dtype=np.int64)
    run_split(kernels.select_pair, first.shape[0], first, second,
                      np.asarray(bounds, dtype=np.float64), within is not None, mask, counts)
    before = np.zeros(first.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=before[1:])
    return mask, before


def _samples(first: NDArray[np.float32], second: NDArray[np.float32], selection: _Selection
             ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``_sample(first[mask])`` and ``_sample(second[mask])`` of a selection, in one pass."""
    from demhx import _noise_kernels as kernels

    mask, before = selection
    count = int(before[-1])
    step = max(1, count // SAMPLE_VOXELS)
    samples = np.empty((2, -(-count // step)), dtype=np.float32)
    run_split(kernels.sample_pair, mask.shape[0], first, second, mask, before, step,
                      samples[0], samples[1])
    return samples[0], samples[1]


def _stats_of(volume: NDArray[np.float32], solvent: _Selection) -> NoiseStats:
    """Mean and std of the raw voxels in ``solvent``; refuses too small or flat sets."""
    count = int(solvent[1][-1])
    fraction = count / volume.size
    if count < MIN_SOLVENT_VOXELS or fraction < MIN_SOLVENT_FRACTION:
        raise ValueError(f"map: found solvent in only {fraction:.1%} of the box, too little "
                         "to estimate the noise; " + _FIX)
    mean, std = _mean_std(volume, solvent)
    if not (math.isfinite(std) and std > 0):
        raise ValueError("map: the solvent has no noise (std 0), it looks masked; " + _FIX)
    return NoiseStats(mean, std, "auto", fraction)


def _mean_std(volume: NDArray[np.float32], solvent: _Selection) -> tuple[float, float]:
    """:func:`demhx._noise_kernels.masked_mean_std` of a selection, split between threads."""
    from demhx import _noise_kernels as kernels

    mask, before = solvent
    sums = np.empty(volume.shape[0])
    run_split(kernels.plane_sums, volume.shape[0], volume, mask, 0.0, False, sums)
    mean = float(np.cumsum(sums)[-1]) / int(before[-1])  # planes added in order
    run_split(kernels.plane_sums, volume.shape[0], volume, mask, mean, True, sums)
    return mean, math.sqrt(float(np.cumsum(sums)[-1]) / int(before[-1]))

def _is_masked(constant: NDArray[np.bool_] | None, fraction: float) -> bool:
    """A coherent constant region (not scattered repeated values) of a sizeable fraction."""
    if constant is None or fraction < MIN_MASK_FRACTION:
        return False
    if fraction >= MASKED_FRACTION:
        return True
    from scipy import ndimage

    kept = np.count_nonzero(ndimage.binary_erosion(constant))
    return bool(kept >= MASK_COHERENCE * np.count_nonzero(constant))


def _masked_noise(volume: NDArray[np.float32], voxel_size: tuple[float, float, float] | None,
                  constant: NDArray[np.bool_] | None, background: float,
                  particle: NDArray[np.bool_] | None) -> NoiseStats | None:
    """Noise of the solvent inside a mask (method ``"auto-masked"``), or None if too little."""
    # Local statistics; candidates: inside the map's mask, off the user's particle.
    local_mean, local_std = _local_moments(volume, _window(voxel_size, volume.shape))
    inside = np.ones(volume.shape, bool) if constant is None else ~constant
    candidates = inside if particle is None else inside & ~particle
    # Leave out the band along the map's mask edge.
    if constant is not None:
        distance = _edge_distance(constant, voxel_size)
        candidates &= distance > edge_band(local_std, distance, candidates)
        del distance
    inside_count = int(np.count_nonzero(inside))
    if np.count_nonzero(candidates) < max(MIN_SOLVENT_VOXELS,
                                          MIN_MASKED_SOLVENT_FRACTION * inside_count):
        return None
    # The estimator of estimate_noise, on the candidates only.
    local_std[~candidates] = np.nan
    solvent = _solvent_set(local_mean, local_std, candidates)[0]
    del local_mean, local_std
    values = volume[solvent]
    if not _looks_like_solvent(volume, values, inside_count,
                               None if constant is None else background):
        return None
    return NoiseStats(float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64)),
                      "auto-masked", values.size / inside_count)


def _edge_distance(constant: NDArray[np.bool_], voxel_size: tuple[float, float, float] | None
                   ) -> NDArray[np.float32]:
    """Distance of every voxel from the constant region, in voxels along the finest axis."""
    from scipy import ndimage

    sizes = np.ones(3) if voxel_size is None else np.asarray(voxel_size, dtype=float)
    if sizes.shape != (3,) or not np.all(np.isfinite(sizes) & (sizes > 0)):
        sizes = np.ones(3)
    # The box faces that hold constant voxels are edges too (the mask goes on beyond them).
    padded = np.pad(constant, 1)
    for axis in range(3):
        for side, index in ((0, 0), (-1, -1)):
            face = np.take(constant, index, axis=axis)
            if face.any():
                target = [slice(None)] * 3
                target[axis] = side  # type: ignore[call-overload]
                padded[tuple(target)] = True
    distance = ndimage.distance_transform_edt(~padded, sampling=sizes / sizes.min())
    return distance[1:-1, 1:-1, 1:-1].astype(np.float32)


def edge_band(local_std: NDArray[np.float32], distance: NDArray[np.float32],
              candidates: NDArray[np.bool_]) -> int:
    """Width, in voxels, of the band along a mask's edge to leave out of the solvent.

    A soft mask attenuates the noise over its edge, so the noise level rises with the distance
    from the constant region until the edge ends. The level of the shell ``(k, k + 1]`` (voxels
    from the constant region) is the :data:`SEED_FRACTION` quantile of the local standard
    deviations of its candidate voxels; the band is the first ``k`` from
    :data:`MIN_EDGE_BAND_VOXELS` (where local windows still reach the constant region) whose
    next measured shell is not higher by more than :data:`EDGE_TOLERANCE`: the level has
    stopped rising (a soft edge raises it by far more per voxel; density deeper in raises it
    slowly). At most :data:`MAX_EDGE_BAND_VOXELS`.
    """
    near = candidates & (distance > MIN_EDGE_BAND_VOXELS) & (distance <= MAX_EDGE_BAND_VOXELS + 2)
    depth, level = _sample(distance[near]), _sample(local_std[near])
    shells = np.ceil(depth).astype(np.int64) - 1  # shell k holds (k, k + 1]
    levels = {}
    for shell in range(MIN_EDGE_BAND_VOXELS, MAX_EDGE_BAND_VOXELS + 2):
        values = level[shells == shell]
        if values.size >= MIN_EDGE_SHELL_VOXELS:
            levels[shell] = float(np.quantile(values, SEED_FRACTION))
    for band in range(MIN_EDGE_BAND_VOXELS, MAX_EDGE_BAND_VOXELS):
        following = [levels[k] for k in (band + 1, band + 2) if k in levels]
        if band in levels and (not following
                               or following[0] <= (1 + EDGE_TOLERANCE) * levels[band]):
            return band
    return MAX_EDGE_BAND_VOXELS


def _looks_like_solvent(volume: NDArray[Any], values: NDArray[Any], inside_count: int,
                        background: float | None) -> bool:
    """Whether the voxels found inside a mask are solvent noise, not low density.

    Enough of them (:data:`MIN_MASKED_SOLVENT_FRACTION` of the inside); a lower tail as noise
    has (thresholded segments have none); a map peaking at least
    :data:`MIN_SOLVENT_PEAK_SIGMAS` of their std above their mean; and, in a map masked to
    the constant ``background``, a mean at most :data:`MAX_SOLVENT_OFFSET_SIGMAS` stds above
    it (masking usually takes the outside to the solvent level, and the low density between
    the atoms of a tight zone, taken for solvent, lies 1-2 of its own stds above that).
    """
    if values.size < max(MIN_SOLVENT_VOXELS, MIN_MASKED_SOLVENT_FRACTION * inside_count):
        return False
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    if not (math.isfinite(std) and std > 0):
        return False
    if background is not None and mean - background > MAX_SOLVENT_OFFSET_SIGMAS * std:
        return False
    tail = np.count_nonzero(values < mean - 2 * std) / values.size
    stats = NoiseStats(mean, std, "auto-masked", 1.0)
    return bool(tail >= MIN_TAIL_FRACTION
                and peak_sigmas(volume, stats) >= MIN_SOLVENT_PEAK_SIGMAS)
