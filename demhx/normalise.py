"""Input normalisation: bring the solvent noise to mean 0 and std ``noise_std``.

The network was trained on maps whose solvent (background) noise has mean 0 and standard
deviation ``noise_std`` (0.1 in the paper), so a map is normalised as
``(v - mean) / std * noise_std`` with ``mean`` and ``std`` the statistics of its solvent noise,
and the prediction is brought back to the map's units with ``prediction * std / noise_std``
(the solvent background stays 0, where the network puts it).

The statistics come from one of three places (:class:`NoiseStats` ``method``):

``"auto"`` — :func:`estimate_noise`
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
    in 7-voxel windows); pass ``--noise-stats`` or ``--mask`` for such maps.
``"user"`` — :func:`user_stats`
    The user's mean and std (``--noise-stats MEAN,STD``).
``"mask"`` — :func:`mask_stats`
    The paper's mode 2: the median and the 10–95 % inter-quantile range of the density inside
    a (dilated) user mask.

An already-masked map (a large part of it exactly one constant) has no solvent noise to
measure; :func:`check_not_masked` refuses it with a message suggesting ``--mask`` or
``--noise-stats``.

Dynamic range (:func:`limit_peak`): the network only knows maps whose density stays within a
few tens of noise stds — on the synthetic training inputs the 99.99th percentile of the
normalised density lies between 6.5 and 22 noise stds (median 11.5; 24 samples, 2.8–6 Å,
``bench/input_range.py``). A map whose solvent was flattened (soft-masked, low-pass
filtered, renormalised) has a tiny measured noise std and lands far outside that range:
EMD-6824 (renormalised to SD 1, solvent std 0.023) reaches 397 noise stds, where the
network's output is unstable (it then depends on where the cube cuts the map; CC 0.930
between the default and the reference tiling, 0.972 once widened). So an automatically
estimated std is widened until the 99.99th percentile lies at :data:`MAX_PEAK_SIGMAS`; the
measured std is kept (``widened_from``) to decide which cubes are solvent. Maps in the
training range are untouched (EMD-5168: 25 noise stds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

WINDOW_VOXELS = 7  # edge of the local-statistics window along the finest axis, voxels
SEED_FRACTION = 0.2  # fraction of the low-density voxels taken as the first solvent guess
CLIP_SIGMAS = 3.0  # solvent: local mean and std within this many robust stds of the solvent's
ITERATIONS = 3  # refinements of the solvent set
MASKED_FRACTION = 0.2  # a map with this fraction of exactly-constant voxels counts as masked
MIN_SOLVENT_FRACTION = 0.02  # fewer solvent voxels than this: estimation refused
MIN_SOLVENT_VOXELS = 200
MASK_DILATION_VOXELS = 3  # dilation of a user mask before taking its statistics
MASK_QUANTILES = (0.10, 0.95)  # inter-quantile range used as the "std" of a masked map
SAMPLE_VOXELS = 1 << 18  # voxels sampled for medians and for the constant-value search
MAD_TO_STD = 1.4826  # median absolute deviation of a Gaussian, in standard deviations
PEAK_QUANTILE = 0.9999  # the "peak" of a map: this quantile of its density
MAX_PEAK_SIGMAS = 30.0  # largest peak, in noise stds above the mean, the network is given
PEAK_SAMPLE_VOXELS = 1 << 22  # voxels sampled for the peak quantile
_FIX = "pass --mask PATH or --noise-stats MEAN,STD"


@dataclass(frozen=True)
class NoiseStats:
    """Statistics of the solvent noise used to normalise a map.

    Attributes
    ----------
    mean : noise mean, in the map's units.
    std : noise standard deviation (finite, > 0), in the map's units.
    method : ``"auto"`` (estimated), ``"user"`` (given) or ``"mask"`` (from a mask).
    solvent_fraction : fraction of the voxels the statistics were taken from (1.0 for user).
    widened_from : the measured std when :func:`limit_peak` widened ``std``, else None.
    """

    mean: float
    std: float
    method: str
    solvent_fraction: float
    widened_from: float | None = None

    @property
    def noise_fraction(self) -> float:
        """The measured noise std as a fraction of ``std`` (1, or below 1 once widened)."""
        return 1.0 if self.widened_from is None else self.widened_from / self.std


def user_stats(mean: float, std: float) -> NoiseStats:
    """Noise statistics given by the user; ``mean`` finite, ``std`` finite and positive."""
    mean, std = float(mean), float(std)
    if not math.isfinite(mean):
        raise ValueError(f"--noise-stats: mean {mean!r} is not finite; give the solvent "
                         "noise mean as a number")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"--noise-stats: std {std!r} is not positive; give the solvent "
                         "noise standard deviation (> 0)")
    return NoiseStats(mean, std, "user", 1.0)


def normalise(volume: np.ndarray, stats: NoiseStats, noise_std: float) -> np.ndarray:
    """``(volume - mean) / std * noise_std`` as float32: solvent noise → (0, ``noise_std``)."""
    scale = np.float32(_positive(noise_std, "noise_std") / _positive(stats.std, "noise std"))
    result = np.subtract(volume, np.float32(stats.mean), dtype=np.float32)
    result *= scale
    return result


def denormalise(prediction: np.ndarray, stats: NoiseStats, noise_std: float) -> np.ndarray:
    """``prediction * std / noise_std`` as float32: back to the map's units (solvent 0)."""
    scale = np.float32(_positive(stats.std, "noise std") / _positive(noise_std, "noise_std"))
    return np.multiply(prediction, scale, dtype=np.float32)


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} {value!r} is not a positive number; check the noise "
                         "statistics or the model's metadata")
    return value


# --------------------------------------------------------------------------- dynamic range


def peak_sigmas(volume: np.ndarray, stats: NoiseStats) -> float:
    """The map's peak (:data:`PEAK_QUANTILE` of its density) in noise stds above the mean.

    Taken from an evenly strided sample of at most :data:`PEAK_SAMPLE_VOXELS` voxels.
    """
    peak = float(np.quantile(_sample(np.asarray(volume), PEAK_SAMPLE_VOXELS), PEAK_QUANTILE))
    return (peak - stats.mean) / stats.std


def limit_peak(volume: np.ndarray, stats: NoiseStats,
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


# --------------------------------------------------------------------------- masked maps


def check_not_masked(volume: np.ndarray, path_label: str) -> None:
    """Refuse a constant map, or one that is already masked (its solvent exactly constant).

    Raises
    ------
    ValueError
        Naming ``path_label``; for a masked map suggesting ``--mask`` or ``--noise-stats``.
    """
    _constant_runs(np.asarray(volume, dtype=np.float32), path_label)


def _constant_runs(volume: np.ndarray, path_label: str) -> np.ndarray | None:
    """Voxels in runs of one exactly repeated value (padding), or None; refuses masked maps.

    A voxel is in a run when it and its next neighbour along each axis all equal the most
    common value of the map. Integer-valued noise rarely forms such runs; masking does.
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
    if fraction >= MASKED_FRACTION:
        raise ValueError(f"{path_label}: {fraction:.0%} of the voxels are exactly {value:g} "
                         "(the map looks masked), so its solvent noise cannot be estimated; "
                         + _FIX)
    if fraction == 0:
        return None
    equal[:-1, :-1, :-1] = runs
    equal[-1, :, :] = equal[:, -1, :] = equal[:, :, -1] = False
    return equal


def _most_common_value(volume: np.ndarray) -> np.float32:
    sample = _sample(volume)
    values, counts = np.unique(sample, return_counts=True)
    return np.float32(values[int(np.argmax(counts))])


def _sample(array: np.ndarray, limit: int = SAMPLE_VOXELS) -> np.ndarray:
    """A deterministic, evenly strided sample: ``limit`` values or more, fewer than twice that
    (all of them for a small array)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // limit)
    return flat[::step]


# --------------------------------------------------------------------------- automatic


def estimate_noise(volume: np.ndarray, voxel_size: tuple[float, float, float] | None = None
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
        A constant or masked map, or no solvent found (suggesting ``--mask`` or
        ``--noise-stats``).
    """
    volume = _checked_volume(volume)
    padding = _constant_runs(volume, "map")
    # Local mean and std in windows around every voxel.
    local_mean, local_std = _local_moments(volume, _window(voxel_size, volume.shape))
    if padding is not None:
        local_std[padding] = np.nan  # never solvent
    # First guess, then refinements of the solvent set.
    solvent = _seed(local_mean, local_std)
    for _ in range(ITERATIONS):
        solvent = _refine(local_mean, local_std, solvent)
    del local_mean, local_std
    return _stats_of(volume, solvent)


def _checked_volume(volume: np.ndarray) -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(f"map: shape {array.shape} is not a 3-D (z, y, x) map")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("map: contains NaN or infinite voxels; fix or replace the map")
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


def _local_moments(volume: np.ndarray, window: tuple[int, int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and standard deviation (float32) in a box window around every voxel."""
    centred = volume - np.median(_sample(volume)).astype(np.float32)  # against cancellation
    local_mean = ndimage.uniform_filter(centred, window, mode="reflect")
    np.square(centred, out=centred)
    local_std = ndimage.uniform_filter(centred, window, mode="reflect")
    del centred
    local_std -= np.square(local_mean)
    np.maximum(local_std, 0, out=local_std)
    np.sqrt(local_std, out=local_std)
    return local_mean, local_std


def _seed(local_mean: np.ndarray, local_std: np.ndarray) -> np.ndarray:
    """First solvent guess: the lowest-variance part of the low-density half of the box."""
    low = local_mean <= np.median(_sample(local_mean))
    low &= np.isfinite(local_std)
    threshold = np.quantile(_sample(local_std[low]), SEED_FRACTION)
    low &= local_std <= threshold
    return low


def _refine(local_mean: np.ndarray, local_std: np.ndarray, solvent: np.ndarray) -> np.ndarray:
    """Voxels whose local mean and std lie within the current solvent's robust ranges."""
    result = np.ones(local_mean.shape, dtype=bool)
    for values in (local_mean, local_std):
        centre, spread = _robust_centre_spread(values[solvent])
        lower, upper = centre - CLIP_SIGMAS * spread, centre + CLIP_SIGMAS * spread
        result &= (values >= lower) & (values <= upper)
    return result


def _robust_centre_spread(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based standard deviation of a (sampled) set of values."""
    sample = _sample(values)
    if sample.size == 0:
        return 0.0, 0.0
    centre = float(np.median(sample))
    spread = MAD_TO_STD * float(np.median(np.abs(sample - np.float32(centre))))
    return centre, spread


def _stats_of(volume: np.ndarray, solvent: np.ndarray) -> NoiseStats:
    """Mean and std of the raw voxels in ``solvent``; refuses too small or flat sets."""
    count = int(np.count_nonzero(solvent))
    fraction = count / volume.size
    if count < MIN_SOLVENT_VOXELS or fraction < MIN_SOLVENT_FRACTION:
        raise ValueError(f"map: found solvent in only {fraction:.1%} of the box, too little "
                         "to estimate the noise; " + _FIX)
    values = volume[solvent]
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    if not (math.isfinite(std) and std > 0):
        raise ValueError("map: the solvent has no noise (std 0), it looks masked; " + _FIX)
    return NoiseStats(mean, std, "auto", fraction)


# --------------------------------------------------------------------------- user mask


def mask_stats(volume: np.ndarray, mask: np.ndarray) -> NoiseStats:
    """The paper's mode 2: median and 10–95 % inter-quantile range inside the dilated mask.

    Parameters
    ----------
    volume : (z, y, x) map.
    mask : (z, y, x) mask on the same grid; voxels at or above half its maximum are inside,
        and the inside is dilated by :data:`MASK_DILATION_VOXELS` voxels.

    Returns
    -------
    NoiseStats
        ``mean`` the median, ``std`` the inter-quantile range, ``method="mask"`` and
        ``solvent_fraction`` the fraction of the box inside the dilated mask.
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
    inside = ndimage.binary_dilation(mask >= peak / 2, iterations=MASK_DILATION_VOXELS)
    values = volume[inside]
    low, high = np.quantile(values, MASK_QUANTILES)
    spread = float(high - low)
    if not spread > 0:
        raise ValueError("mask: the density inside the mask is constant; pass a mask that "
                         "covers the particle, or --noise-stats MEAN,STD")
    return NoiseStats(float(np.median(values)), spread, "mask", float(inside.mean()))
