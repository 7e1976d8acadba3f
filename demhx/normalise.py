"""Input normalisation: bring the solvent noise to mean 0 and std ``noise_std``.

The network was trained on maps whose solvent (background) noise has mean 0 and standard
deviation ``noise_std`` (0.1 in the paper), so a map is normalised as
``(v - mean) / std * noise_std`` with ``mean`` and ``std`` the statistics of its solvent noise,
and the prediction is brought back to the map's units with ``prediction * std / noise_std``
(the solvent background stays 0, where the network puts it).

The statistics come from :func:`choose_stats`, the one function that picks them for any map
(the runtime and the training data both call it), or from the user (:class:`NoiseStats`
``method``):

``"auto"`` — :func:`estimate_noise`, for unmasked maps
    The solvent is found from local statistics (means and standard deviations in windows of
    about :data:`WINDOW_VOXELS` voxels), with no assumption on where the particle is; see
    :func:`estimate_noise` for the estimator. Maps whose particle
    fills about half the box with strongly correlated noise need ``noise_stats=`` or
    ``mask=``.
``"auto-masked"`` — masked maps and user masks
    A map is masked when a coherent region of one exact value covers
    :data:`MIN_MASK_FRACTION` of the box or more. The same estimator then runs on the voxels
    inside the map's mask only, beyond the band along its edge where a soft edge attenuates
    the noise (:func:`edge_band`) and off the particle a user mask marks; the result is kept
    when it looks like solvent (:func:`_looks_like_solvent`).
``"peak"`` — :func:`peak_stats`, zones without solvent
    Tight zones around a chain, crops and thresholded segments have no solvent to measure:
    the mean is the masked value and the std puts the map's peak at
    :data:`TARGET_PEAK_SIGMAS` (the middle of the training inputs' 6.5-22). No noise was
    measured, so the solvent-cube test of the tiling takes :data:`ZONE_NOISE_FRACTION` of
    the peak as its noise std (``solvent_std``): only cubes below 1 % of the peak, in
    practice those in the masked region, are skipped, and a zone is never blanked.
``"user"`` — :func:`user_stats`
    The user's mean and std (``noise_stats=(MEAN, STD)``; ``--noise-stats MEAN,STD``).
``"mask"`` — :func:`mask_stats`, for models with ``normalisation = mask``
    The paper's mode 2: the median and the 10–95 % inter-quantile range of the density inside
    a (dilated) user mask, with the solvent-cube test of ``"peak"``.

:func:`estimate_noise` itself still refuses a masked map (:func:`check_not_masked`);
:func:`choose_stats` routes masked maps around it.

Dynamic range (:func:`limit_peak`): an automatically estimated std
is widened until the map's 99.99th percentile lies at :data:`MAX_PEAK_SIGMAS` noise stds, the
edge of what the network was trained on (:data:`TRAINED_PEAK_SIGMAS`); the measured std is
kept (``widened_from``) to decide which cubes are solvent.

Stage policy: :func:`as_stats` checks the statistics a caller gives, :func:`statistics_for`
picks those of one map for a model (the user's, the model's mask mode, or
:func:`choose_stats`, with the warnings a run shows), :func:`describe` puts them in one line
and :func:`normalise_for` normalises the map as the model expects.

Sections, in order: the noise statistics and the dynamic range, the solvent estimators
(masked maps, the automatic estimate, user masks), normalisation, the stage policy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from demhx.validate import check_volume

if TYPE_CHECKING:
    from demhx.model import ModelSpec

__all__ = ["as_stats", "check_not_masked", "choose_stats", "CLIP_SIGMAS", "denormalise",
           "describe", "edge_band", "EDGE_TOLERANCE", "estimate_noise", "ITERATIONS",
           "limit_peak", "MAD_TO_STD", "MASK_COHERENCE", "MASK_DILATION_VOXELS",
           "MASK_QUANTILES", "mask_stats", "MASKED_FRACTION", "masked_outside",
           "MAX_EDGE_BAND_VOXELS", "MAX_PEAK_SIGMAS", "MAX_SOLVENT_OFFSET_SIGMAS",
           "MIN_EDGE_BAND_VOXELS", "MIN_EDGE_SHELL_VOXELS", "MIN_MASK_FRACTION",
           "MIN_MASKED_SOLVENT_FRACTION", "MIN_SOLVENT_FRACTION",
           "MIN_SOLVENT_PEAK_SIGMAS", "MIN_SOLVENT_VOXELS", "MIN_TAIL_FRACTION",
           "most_common_value", "NoiseStats", "normalise", "normalise_for",
           "PEAK_QUANTILE", "PEAK_SAMPLE_VOXELS", "peak_sigmas", "peak_stats",
           "SAMPLE_VOXELS", "SEED_FRACTION", "solvent_voxels", "statistics_for",
           "TARGET_PEAK_SIGMAS", "top_quantile", "TRAINED_PEAK_SIGMAS", "user_stats",
           "WINDOW_VOXELS", "ZONE_NOISE_FRACTION"]


# --------------------------------------------------------------------------- noise statistics
MAD_TO_STD = 1.4826  # median absolute deviation of a Gaussian, in standard deviations
SAMPLE_VOXELS = 1 << 18  # voxels sampled for medians and for the constant-value search
PEAK_QUANTILE = 0.9999  # the "peak" of a map: this quantile of its density
TRAINED_PEAK_SIGMAS = (6.5, 22.0)  # training inputs' peaks, noise stds (bench/input_range.py)
MAX_PEAK_SIGMAS = 30.0  # largest peak, in noise stds above the mean, the network is given
PEAK_SAMPLE_VOXELS = 1 << 22  # voxels sampled for the peak quantile
TARGET_PEAK_SIGMAS = 12.0  # peak mode: the map peaks here (training inputs: 6.5-22, median 11.5)
ZONE_NOISE_FRACTION = 0.002  # peak mode: the solvent-cube test takes this fraction of the peak
# as its noise std, so only cubes below 1 % of the peak (5 such stds) are skipped


@dataclass(frozen=True)
class NoiseStats:
    """Statistics of the solvent noise used to normalise a map.

    Attributes
    ----------
    mean : noise mean, in the map's units.
    std : noise standard deviation (finite, > 0), in the map's units.
    method : ``"auto"`` (estimated), ``"auto-masked"`` (estimated from the solvent left inside
        a mask), ``"peak"`` (a zone without solvent, scaled to its peak), ``"user"`` (given)
        or ``"mask"`` (paper's mode 2, from a mask).
    solvent_fraction : fraction of the voxels the statistics were taken from (1.0 for user);
        for ``"auto-masked"``, of the voxels inside the mask; for ``"peak"``, the fraction of
        the box inside the mask.
    widened_from : the measured std when :func:`limit_peak` widened ``std``, else None.
    solvent_std : the std the solvent-cube test compares with when no noise was measured
        (``"peak"``, ``"mask"``: a small fraction of the peak), else None.
    masks : for ``"auto-masked"`` and ``"peak"``, which masks bounded the voxels measured:
        ``"map"`` (the map's own mask: a masked map), ``"user"`` (outside the particle a
        user's ``mask=`` marks) or ``"map and user"``.
    """

    mean: float
    std: float
    method: str
    solvent_fraction: float
    widened_from: float | None = None
    solvent_std: float | None = None
    masks: str = "map"

    @property
    def noise_fraction(self) -> float:
        """The std that tells solvent cubes, as a fraction of ``std``: 1, below 1 once widened
        (the measured std), or far below 1 when no noise was measured (``solvent_std``)."""
        if self.solvent_std is not None:
            return self.solvent_std / self.std
        return 1.0 if self.widened_from is None else self.widened_from / self.std


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} {value!r} is not a positive number; check the noise "
                         "statistics or the model's metadata")
    return value


def _sample(array: NDArray[Any], limit: int = SAMPLE_VOXELS) -> NDArray[Any]:
    """A deterministic, evenly strided sample: ``limit`` values or more, fewer than twice that
    (all of them for a small array)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // limit)
    return flat[::step]


def _median(values: NDArray[np.float32]) -> np.float32:
    """``np.median`` of a float32 sample, the same value, from one partition: the middle
    value, or the float32 mean of the two middle ones."""
    middle = values.size // 2
    if values.dtype != np.float32 or values.size < 2 or np.isnan(values.max()):
        return np.float32(np.median(values))
    part = np.partition(values, middle)
    upper = np.float32(0) + part[middle]  # NumPy's mean adds to 0: -0 becomes 0
    if values.size % 2:
        return np.float32(upper)
    return np.float32((part[:middle].max() + upper) / np.float32(2))


def _masked_sample(values: NDArray[np.float32], mask: NDArray[np.bool_]) -> NDArray[np.float32]:
    """``_sample(values[mask])`` without the intermediate copy of ``values[mask]``."""
    from demhx import _kernels

    count = int(np.count_nonzero(mask))
    step = max(1, count // SAMPLE_VOXELS)
    sample = np.empty(-(-count // step), dtype=values.dtype)
    _kernels.masked_sample(values, mask, step, sample)
    return sample


def _robust_centre_spread(values: NDArray[Any]) -> tuple[float, float]:
    """Median and MAD-based standard deviation of a (sampled) set of values."""
    sample = _sample(values)
    if sample.size == 0:
        return 0.0, 0.0
    centre = float(_median(sample))
    spread = MAD_TO_STD * float(_median(np.abs(sample - np.float32(centre))))
    return centre, spread



# --------------------------------------------------------------------------- dynamic range


def peak_sigmas(volume: NDArray[Any], stats: NoiseStats) -> float:
    """The map's peak (:data:`PEAK_QUANTILE` of its density) in noise stds above the mean.

    Taken from an evenly strided sample of at most :data:`PEAK_SAMPLE_VOXELS` voxels.
    """
    peak = float(top_quantile(_sample(np.asarray(volume), PEAK_SAMPLE_VOXELS), PEAK_QUANTILE))
    return (peak - stats.mean) / stats.std


def top_quantile(values: NDArray[Any], quantile: float) -> Any:
    """``np.quantile(values, quantile)`` (linear), the same value, for a quantile near 1 of a
    large float32 sample: only the values above a threshold taken from a coarser sample are
    sorted, and the two neighbours NumPy interpolates between are taken from them."""
    size = values.size
    virtual = size * quantile + (1 + quantile * -1) - 1  # NumPy's index for alpha = beta = 1
    below = math.floor(virtual)
    needed = size - below  # the values at or above the lower neighbour
    coarse = np.sort(values[::16])
    if values.dtype != np.float32 or values.ndim != 1 or not 0 <= virtual < size - 1 \
            or needed > size // 64 or np.isnan(coarse[-1]) or np.isnan(values.max()):
        return np.quantile(values, quantile)
    for margin in (4, 32):  # the top values may cluster between the coarse sample's
        top = values[values >= coarse[max(0, coarse.size - margin * (needed // 16 + 64))]]
        if top.size >= needed:
            break
    else:
        return np.quantile(values, quantile)
    top.sort()
    lower, upper = top[top.size - needed], top[top.size - needed + 1]
    gamma, difference = virtual - below, upper - lower
    if gamma >= 0.5:  # NumPy's _lerp, in float32
        return upper - difference * (1 - gamma)
    return lower + difference * gamma


def limit_peak(volume: NDArray[Any], stats: NoiseStats,
               max_sigmas: float = MAX_PEAK_SIGMAS) -> NoiseStats:
    """``stats`` with ``std`` widened so the map peaks at ``max_sigmas`` noise stds at most.

    Returns ``stats`` itself when the map's peak (:func:`peak_sigmas`) is within
    ``max_sigmas``; otherwise a copy with ``std`` scaled by ``peak / max_sigmas`` and
    ``widened_from`` set to the measured std.
    """
    max_sigmas = _positive(max_sigmas, "max_sigmas")
    peak = peak_sigmas(volume, stats)
    if not peak > max_sigmas:
        return stats
    return replace(stats, std=stats.std * peak / max_sigmas,
                   widened_from=stats.widened_from or stats.std)


def peak_stats(volume: NDArray[Any], background: float, inside_fraction: float = 1.0
               ) -> NoiseStats:
    """Statistics for a map with no solvent to measure (method ``"peak"``).

    ``mean`` is the ``background`` (a masked map's constant), ``std`` puts the map's peak
    (:data:`PEAK_QUANTILE`) at :data:`TARGET_PEAK_SIGMAS`, the middle of the range the network
    was trained on; the solvent-cube test then takes :data:`ZONE_NOISE_FRACTION` of the peak as
    its noise std, so only cubes (nearly) empty of density are skipped.
    """
    sample = _sample(np.asarray(volume), PEAK_SAMPLE_VOXELS)
    height = float(top_quantile(sample, PEAK_QUANTILE)) - background
    if not height > 0:  # density below the background (inverted contrast)
        height = float(np.quantile(np.abs(sample - np.float32(background)), PEAK_QUANTILE))
    height = _positive(height, "map: peak above the background")
    return NoiseStats(float(background), height / TARGET_PEAK_SIGMAS, "peak", inside_fraction,
                      solvent_std=ZONE_NOISE_FRACTION * height)


# --------------------------------------------------------------------------- solvent estimators
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
    value = most_common_value(volume)
    equal = volume == value
    runs = equal[:-1, :-1, :-1] & equal[1:, :-1, :-1] & equal[:-1, 1:, :-1] \
        & equal[:-1, :-1, 1:]
    fraction = np.count_nonzero(runs) / volume.size
    if fraction == 0:
        return value, None, 0.0
    equal[:-1, :-1, :-1] = runs
    equal[-1, :, :] = equal[:, -1, :] = equal[:, :, -1] = False
    return value, equal, fraction


def most_common_value(volume: NDArray[Any]) -> np.float32:
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

    The solvent is found from local statistics, with no assumption on where the particle is:
    the mean and standard deviation of the density in a window of about
    :data:`WINDOW_VOXELS` voxels around every voxel are computed (box filters), and

    1. a first guess of the solvent takes, among the voxels whose local mean is below the
       median, the :data:`SEED_FRACTION` with the lowest local standard deviation;
    2. the solvent is then every voxel whose local mean *and* local standard deviation lie
       within :data:`CLIP_SIGMAS` robust standard deviations (median and median absolute
       deviation) of those of the current solvent set; this is repeated
       :data:`ITERATIONS` times;
    3. the noise mean and std are those of the raw voxels in the final set
       (:func:`solvent_voxels`).

    Density raises the local mean and the local variance, so particles anywhere in the box
    (off-centre, touching an edge, filaments crossing it, hollow particles whose empty centre
    counts as solvent, non-cubic boxes) are left out, while the solvent is kept wherever it
    is. Runs of exactly constant voxels (padding) are left out too. Where solvent and density
    no longer separate in the windows (a particle filling about half the box, with noise
    correlated over a few voxels) the std comes out high: pass ``noise_stats=`` or ``mask=``
    for such maps. The measured accuracy is in ``bench/RESULTS.md`` ("Noise estimation").

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


def solvent_voxels(volume: NDArray[Any], voxel_size: tuple[float, float, float] | None = None
                   ) -> NDArray[np.bool_]:
    """The voxels :func:`estimate_noise` takes as the solvent of an unmasked map (its final
    set), as a bool array of the map's shape; ``voxel_size`` in Å, (z, y, x)."""
    volume = _checked_volume(volume)
    local_mean, local_std = _local_moments(volume, _window(voxel_size, volume.shape))
    return _solvent_set(local_mean, local_std)[0]


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
    (:func:`demhx._kernels.local_moments`, the same floats as that filter), split
    between threads: the z pass by rows, the y and x passes by planes.
    """
    from demhx import _kernels as kernels

    volume = np.ascontiguousarray(volume, dtype=np.float32)
    centre = float(_median(_sample(volume)))
    local_mean, local_std = np.empty_like(volume), np.empty_like(volume)
    kernels.run_split(kernels.z_moments, volume.shape[1], volume, centre, window[0],
                      local_mean, local_std)
    kernels.run_split(kernels.plane_moments, volume.shape[0], window[1], window[2],
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
    from demhx import _kernels as kernels

    mask = within[0] if within is not None else (
        np.empty(first.shape, dtype=bool) if out is None else out)
    counts = np.empty(first.shape[0], dtype=np.int64)
    kernels.run_split(kernels.select_pair, first.shape[0], first, second,
                      np.asarray(bounds, dtype=np.float64), within is not None, mask, counts)
    before = np.zeros(first.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=before[1:])
    return mask, before


def _samples(first: NDArray[np.float32], second: NDArray[np.float32], selection: _Selection
             ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``_sample(first[mask])`` and ``_sample(second[mask])`` of a selection, in one pass."""
    from demhx import _kernels as kernels

    mask, before = selection
    count = int(before[-1])
    step = max(1, count // SAMPLE_VOXELS)
    samples = np.empty((2, -(-count // step)), dtype=np.float32)
    kernels.run_split(kernels.sample_pair, mask.shape[0], first, second, mask, before, step,
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
    """:func:`demhx._kernels.masked_mean_std` of a selection, split between threads."""
    from demhx import _kernels as kernels

    mask, before = solvent
    sums = np.empty(volume.shape[0])
    kernels.run_split(kernels.plane_sums, volume.shape[0], volume, mask, 0.0, False, sums)
    mean = float(np.cumsum(sums)[-1]) / int(before[-1])  # planes added in order
    kernels.run_split(kernels.plane_sums, volume.shape[0], volume, mask, mean, True, sums)
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


# --------------------------------------------------------------------------- normalisation
MASK_DILATION_VOXELS = 3  # dilation of a user mask before taking its statistics
MASK_QUANTILES = (0.10, 0.95)  # inter-quantile range used as the "std" of a masked map


def user_stats(mean: float, std: float) -> NoiseStats:
    """Noise statistics given by the user; ``mean`` finite, ``std`` finite and positive."""
    mean, std = float(mean), float(std)
    if not math.isfinite(mean):
        raise ValueError(f"noise_stats=: mean {mean!r} is not finite; give the solvent "
                         "noise mean as a number")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"noise_stats=: std {std!r} is not positive; give the solvent "
                         "noise standard deviation (> 0)")
    return NoiseStats(mean, std, "user", 1.0)


def normalise(volume: NDArray[Any], stats: NoiseStats, noise_std: float
              ) -> NDArray[np.float32]:
    """``(volume - mean) / std * noise_std`` as float32: solvent noise → (0, ``noise_std``)."""
    scale = np.float32(_positive(noise_std, "noise_std") / _positive(stats.std, "noise std"))
    result = np.subtract(volume, np.float32(stats.mean), dtype=np.float32)
    result *= scale
    return result


def denormalise(prediction: NDArray[Any], stats: NoiseStats, noise_std: float
                ) -> NDArray[np.float32]:
    """``prediction * std / noise_std`` as float32: back to the map's units (solvent 0)."""
    scale = np.float32(_positive(stats.std, "noise std") / _positive(noise_std, "noise_std"))
    return np.multiply(prediction, scale, dtype=np.float32)


# --------------------------------------------------------------------------- any map


def choose_stats(volume: NDArray[Any], voxel_size: tuple[float, float, float] | None = None,
                 mask: NDArray[Any] | None = None, *, name: str = "map") -> NoiseStats:
    """The statistics to normalise any map with: unmasked, masked, zoned, or with a user mask.

    A pure, deterministic function of the arrays; the runtime and the training data both
    normalise with it.

    - An unmasked map (no coherent region of one exact value covering
      :data:`MIN_MASK_FRACTION` of the box) and no ``mask``: :func:`estimate_noise`.
    - A masked map (a constant outside a region, hard or soft edge) or a user ``mask``: the
      same estimator on the voxels inside the map's mask, beyond the band along its edge
      where a soft edge attenuates the noise (:func:`edge_band`), and outside the user's
      ``mask`` (where the particle is); method ``"auto-masked"`` when that solvent is large
      enough and looks like noise (:func:`_looks_like_solvent`).
    - Otherwise (tight zones, crops around one chain, thresholded segments): method
      ``"peak"`` (:func:`peak_stats`), scaled so the map peaks at
      :data:`TARGET_PEAK_SIGMAS`.

    Measured statistics are then kept within the trained range by :func:`limit_peak`.

    Parameters
    ----------
    volume : (z, y, x) map, any real dtype (computed in float32).
    voxel_size : Å along (z, y, x); shapes the local window and the edge distances.
    mask : (z, y, x) user mask on the map's grid (binary or soft); the particle is where it
        is at least half its maximum, dilated by :data:`MASK_DILATION_VOXELS`.
    name : starts the error messages (e.g. the file name).

    Raises
    ------
    ValueError
        A constant or non-finite map, or a mask on another grid or without any voxel > 0.
    """
    volume = _checked_volume(volume, name)
    particle = None if mask is None else _mask_inside(mask, volume.shape)
    value, constant, fraction = _constant_region(volume, name)
    masked = _is_masked(constant, fraction)
    if particle is None and not masked:
        return limit_peak(volume, _estimate_unmasked(volume, voxel_size, constant))
    masks = "map" if particle is None else "map and user" if masked else "user"
    stats = _masked_noise(volume, voxel_size, constant, float(value), particle)
    if stats is None:
        return replace(peak_stats(volume, _background(volume, value, constant, particle),
                                  _inside_fraction(constant, particle)), masks=masks)
    return limit_peak(volume, replace(stats, masks=masks))


def _background(volume: NDArray[Any], value: np.float32, constant: NDArray[np.bool_] | None,
                particle: NDArray[np.bool_] | None) -> float:
    """The level of the empty box: the masked constant, else the median off the particle."""
    if constant is not None:
        return float(value)
    outside = volume if particle is None or particle.all() else volume[~particle]
    return float(np.median(_sample(outside)))


def _inside_fraction(constant: NDArray[np.bool_] | None, particle: NDArray[np.bool_] | None
                     ) -> float:
    inside = np.ones(1, bool) if constant is None else ~constant
    if particle is not None:
        inside = inside & particle
    return float(inside.mean())


def _mask_inside(mask: NDArray[Any], shape: tuple[int, ...]) -> NDArray[np.bool_]:
    """The particle of a user mask: at least half its maximum, dilated; checked."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask: shape {mask.shape} (z, y, x) differs from the map "
                         f"{shape}; make the mask on the map's grid")
    peak = float(np.max(mask))
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError("mask: has no voxel > 0; pass a mask that covers the particle")
    from scipy import ndimage

    return ndimage.binary_dilation(mask >= peak / 2, iterations=MASK_DILATION_VOXELS)


def masked_outside(volume: NDArray[Any]) -> NDArray[np.bool_] | None:
    """Where a masked map is masked out, or None for a map that is not masked.

    A map is masked when a coherent region of one exact value covers
    :data:`MIN_MASK_FRACTION` of the box or more (as :func:`choose_stats` decides); the
    region is every voxel of that value in or next to its runs (isolated voxels of the value
    inside the density are not part of it). Nothing is known there, so the output is 0.
    """
    volume = _checked_volume(volume)
    value, runs, fraction = _constant_region(volume, "map")
    if runs is None or not _is_masked(runs, fraction):
        return None
    # The runs leave out the region's last voxel along each axis: grow them by one voxel
    # (a 3×3×3 dilation, one axis at a time), and keep the voxels of the value.
    grown = runs.copy()
    for axis in range(3):
        later, earlier = [slice(None)] * 3, [slice(None)] * 3
        later[axis], earlier[axis] = slice(1, None), slice(None, -1)
        before = grown.copy()
        grown[tuple(later)] |= before[tuple(earlier)]
        grown[tuple(earlier)] |= before[tuple(later)]
    return np.logical_and(grown, volume == value, out=grown)


# --------------------------------------------------------------------------- user mask


def mask_stats(volume: NDArray[Any], mask: NDArray[Any]) -> NoiseStats:
    """The paper's mode 2: median and 10–95 % inter-quantile range inside the dilated mask.

    Parameters
    ----------
    volume : (z, y, x) map.
    mask : (z, y, x) mask on the same grid; voxels at or above half its maximum are inside,
        and the inside is dilated by :data:`MASK_DILATION_VOXELS` voxels.

    Returns
    -------
    NoiseStats
        ``mean`` the median, ``std`` the inter-quantile range, ``method="mask"``,
        ``solvent_fraction`` the fraction of the box inside the dilated mask, and
        ``solvent_std`` :data:`ZONE_NOISE_FRACTION` of the peak above the median (no noise
        is measured, so the solvent-cube test skips only cubes nearly empty of density).
    """
    volume = _checked_volume(volume)
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
        raise ValueError(f"mask: shape {mask.shape} (z, y, x) differs from the map "
                         f"{volume.shape}; make the mask on the map's grid")
    peak = float(np.max(mask))
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError("mask: has no voxel > 0; pass a mask that covers the particle")
    # Inside = at least half the mask's maximum, dilated.
    from scipy import ndimage

    inside = ndimage.binary_dilation(mask >= peak / 2, iterations=MASK_DILATION_VOXELS)
    values = volume[inside]
    low, high = np.quantile(values, MASK_QUANTILES)
    spread = float(high - low)
    if not spread > 0:
        raise ValueError("mask: the density inside the mask is constant; pass a mask that "
                         "covers the particle, or noise_stats=MEAN,STD")
    # No noise is measured: only cubes (nearly) empty of density count as solvent.
    median = float(np.median(values))
    height = float(np.quantile(values, PEAK_QUANTILE)) - median
    return NoiseStats(median, spread, "mask", float(inside.mean()),
                      solvent_std=ZONE_NOISE_FRACTION * (height if height > 0 else spread))


# --------------------------------------------------------------------------- stage policy


def as_stats(noise_stats: NoiseStats | Sequence[float] | None) -> NoiseStats | None:
    """Statistics a caller gives, as checked :class:`NoiseStats`: None stays None, a
    :class:`NoiseStats` is kept, two numbers are the mean and std (:func:`user_stats`).

    Raises
    ------
    ValueError
        Not two values, or a mean that is not finite or a std that is not positive.
    """
    if noise_stats is None or isinstance(noise_stats, NoiseStats):
        return noise_stats
    values = [float(v) for v in noise_stats]
    if len(values) != 2:
        raise ValueError(f"noise_stats={noise_stats!r}: give two values, MEAN,STD")
    return user_stats(values[0], values[1])


def statistics_for(volume: NDArray[Any], voxel_size: tuple[float, float, float],
                   spec: ModelSpec, noise_stats: NoiseStats | Sequence[float] | None,
                   mask: NDArray[Any] | None, name: str = "volume") -> NoiseStats:
    """The statistics to normalise ``volume`` with for the model ``spec``: the user's, or
    :func:`choose_stats`.

    ``choose_stats`` handles unmasked, masked and zoned maps and a user ``mask`` alike (a model
    with ``normalisation = mask`` gets the paper's mode 2, :func:`mask_stats`). A measured std
    widened because the map peaks beyond what the network was trained on (:func:`limit_peak`)
    comes with a warning; the user's std is kept as given, with a warning when the map then
    peaks beyond :data:`MAX_PEAK_SIGMAS`. ``name`` starts the messages (and the error when the
    map is constant).

    Raises
    ------
    ValueError
        A model with ``normalisation = mask`` and no ``mask``, bad ``noise_stats``, or a map
        :func:`choose_stats` refuses.
    """
    from demhx.errors import DemhxWarning

    if spec.normalisation == "mask" and mask is None:
        raise ValueError(f"{spec.path.name}: model {spec.label} expects masked input "
                         "(normalisation 'mask'); pass mask=PATH")
    user = as_stats(noise_stats)
    if user is not None:
        peak = peak_sigmas(volume, user)
        if peak > MAX_PEAK_SIGMAS:
            warnings.warn(f"{name}: with noise_stats= std {user.std:.4g} the map peaks at "
                          f"{peak:.0f} noise stds, beyond the {_trained_range()} noise stds "
                          "the network was trained on (a measured std is widened above "
                          f"{MAX_PEAK_SIGMAS:.0f}), so the output may be unreliable; "
                          "check the noise std, or leave noise_stats= out", DemhxWarning,
                          stacklevel=3)
        return user
    if spec.normalisation == "mask" and mask is not None:
        return mask_stats(volume, mask)
    stats = choose_stats(volume, voxel_size, mask, name=name)
    if stats.widened_from is not None:
        peak = MAX_PEAK_SIGMAS * stats.std / stats.widened_from
        warnings.warn(f"{name}: the map peaks at {peak:.0f} noise stds (solvent std "
                      f"{stats.widened_from:.4g}), far beyond the {_trained_range()} the "
                      "network was trained on (flattened solvent: masked, filtered or "
                      f"rescaled?); normalised with std {stats.std:.4g} instead, so that it "
                      f"peaks at {MAX_PEAK_SIGMAS:.0f}. To choose, "
                      "pass noise_stats=MEAN,STD", DemhxWarning, stacklevel=3)
    return stats


def _trained_range() -> str:
    """The training inputs' peak range, e.g. ``6.5–22``, as the README gives it."""
    low, high = TRAINED_PEAK_SIGMAS
    return f"{low:g}–{high:g}"


# Where the noise was measured (auto-masked) or why none was (peak), by the masks used: the
# map's own mask (a masked map: a constant outside) and the particle a user's mask= marks.
_MEASURED_WHERE = {
    "map": ": masked map, noise from {} of the voxels inside the map's own mask",
    "user": ": noise from {} of the box, outside mask=",
    "map and user": ": masked map, noise from {} of the voxels inside the map's own mask and "
                    "outside mask=",
}
_NO_SOLVENT_WHERE = {
    "map": ": masked zone without solvent ({} of the box), scaled so its peak is {} stds "
           "above the masked value",
    "user": ": no solvent outside mask= (it covers {} of the box), scaled so its peak is {} "
            "stds above the median outside it",
    "map and user": ": masked zone without solvent outside mask= ({} of the box), scaled so "
                    "its peak is {} stds above the masked value",
}


def describe(stats: NoiseStats) -> str:
    """One line: the statistics and which path chose them."""
    line = f"noise mean {stats.mean:.4g}, std {stats.std:.4g} ({stats.method}"
    if stats.method == "auto" and math.isfinite(stats.solvent_fraction):
        line += f", from {stats.solvent_fraction:.0%} of the box"
    elif stats.method == "auto-masked":
        line += _MEASURED_WHERE[stats.masks].format(f"{stats.solvent_fraction:.0%}")
    elif stats.method == "peak":
        line += _NO_SOLVENT_WHERE[stats.masks].format(
            f"{stats.solvent_fraction:.0%}", f"{TARGET_PEAK_SIGMAS:.0f}")
    elif stats.method == "mask":
        line += ": median and inter-quantile range inside mask="
    if stats.widened_from is not None:
        line += f"; widened from {stats.widened_from:.4g} to keep the peak in range"
    return line + ")"


def normalise_for(volume: NDArray[Any], stats: NoiseStats, spec: ModelSpec,
                  mask: NDArray[Any] | None) -> NDArray[np.float32]:
    """``volume`` normalised as the model ``spec`` expects (:func:`normalise` with its
    ``noise_std``; times ``mask`` for a model with ``normalisation = mask``), float32
    C-contiguous."""
    normalised = normalise(volume, stats, spec.noise_std)
    if spec.normalisation == "mask" and mask is not None:
        normalised = normalised * mask
    return np.ascontiguousarray(normalised, dtype=np.float32)
