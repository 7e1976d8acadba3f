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
``"peak"`` — :func:`peak_stats`, zones without solvent
    Tight zones around a chain, crops and thresholded segments have no solvent to measure:
    the mean is the masked value and the std puts the map's peak at
    :data:`TARGET_PEAK_SIGMAS` (the middle of the training inputs' 6.5-22). No noise was
    measured, so the solvent-cube test of the tiling takes :data:`ZONE_NOISE_FRACTION` of
    the peak as its noise std (``solvent_std``): only cubes below 1 % of the peak, in
    practice those in the masked region, are skipped, and a zone is never blanked.
``"user"`` — :func:`user_stats`
    The user's mean and std (``--noise-stats MEAN,STD``).
``"mask"`` — :func:`mask_stats`, for models with ``normalisation = mask``
    The paper's mode 2: the median and the 10–95 % inter-quantile range of the density inside
    a (dilated) user mask, with the solvent-cube test of ``"peak"``.

:func:`estimate_noise` itself still refuses a masked map (:func:`check_not_masked`);
:func:`choose_stats` routes masked maps around it.

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

WINDOW_VOXELS = 7  # edge of the local-statistics window along the finest axis, voxels
SEED_FRACTION = 0.2  # fraction of the low-density voxels taken as the first solvent guess
CLIP_SIGMAS = 3.0  # solvent: local mean and std within this many robust stds of the solvent's
ITERATIONS = 3  # refinements of the solvent set
MASKED_FRACTION = 0.2  # estimate_noise refuses a map with this fraction of one exact value
MIN_MASK_FRACTION = 0.01  # a coherent constant region this large makes a map masked too
MASK_COHERENCE = 0.25  # coherent: this fraction of the region survives a one-voxel erosion
MIN_SOLVENT_FRACTION = 0.02  # fewer solvent voxels than this: estimation refused
MIN_SOLVENT_VOXELS = 200
MASK_DILATION_VOXELS = 3  # dilation of a user mask before taking its statistics
MASK_QUANTILES = (0.10, 0.95)  # inter-quantile range used as the "std" of a masked map
SAMPLE_VOXELS = 1 << 18  # voxels sampled for medians and for the constant-value search
MAD_TO_STD = 1.4826  # median absolute deviation of a Gaussian, in standard deviations
PEAK_QUANTILE = 0.9999  # the "peak" of a map: this quantile of its density
TRAINED_PEAK_SIGMAS = (6.5, 22.0)  # training inputs' peaks, noise stds (bench/input_range.py)
MAX_PEAK_SIGMAS = 30.0  # largest peak, in noise stds above the mean, the network is given
PEAK_SAMPLE_VOXELS = 1 << 22  # voxels sampled for the peak quantile
MIN_EDGE_BAND_VOXELS = 4  # masked maps: voxels this close to the constant region are left out
MAX_EDGE_BAND_VOXELS = 24  # widest band left out where a soft mask edge attenuates the noise
EDGE_TOLERANCE = 0.05  # the edge band ends where the noise level rises by less than 5 % a voxel
MIN_EDGE_SHELL_VOXELS = 50  # shells with fewer candidate voxels are not measured
MIN_MASKED_SOLVENT_FRACTION = 0.05  # solvent needed, fraction of the voxels inside the mask
MIN_TAIL_FRACTION = 0.005  # solvent below mean - 2 std (Gaussian 2.3 %; thresholded maps: 0)
MAX_SOLVENT_OFFSET_SIGMAS = 0.5  # solvent mean above a masked map's constant, in its stds
MIN_SOLVENT_PEAK_SIGMAS = 4.0  # below this the "solvent" is density: normalise by the peak
TARGET_PEAK_SIGMAS = 12.0  # peak mode: the map peaks here (training inputs: 6.5-22, median 11.5)
ZONE_NOISE_FRACTION = 0.002  # peak mode: the solvent-cube test takes this fraction of the peak
# as its noise std, so only cubes below 1 % of the peak (5 such stds) are skipped
_FIX = "pass --mask PATH or --noise-stats MEAN,STD"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    """

    mean: float
    std: float
    method: str
    solvent_fraction: float
    widened_from: float | None = None
    solvent_std: float | None = None

    @property
    def noise_fraction(self) -> float:
        """The std that tells solvent cubes, as a fraction of ``std``: 1, below 1 once widened
        (the measured std), or far below 1 when no noise was measured (``solvent_std``)."""
        if self.solvent_std is not None:
            return self.solvent_std / self.std
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
    """Voxels in runs of one exactly repeated value (padding), or None; refuses masked maps."""
    value, runs, fraction = _constant_region(volume, path_label)
    if fraction >= MASKED_FRACTION:
        raise ValueError(f"{path_label}: {fraction:.0%} of the voxels are exactly {value:g} "
                         "(the map looks masked), so its solvent noise cannot be estimated; "
                         + _FIX)
    return runs


def _constant_region(volume: np.ndarray, path_label: str
                     ) -> tuple[np.float32, np.ndarray | None, float]:
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
    return _estimate_unmasked(volume, voxel_size, _constant_runs(volume, "map"))


def _estimate_unmasked(volume: np.ndarray, voxel_size: tuple[float, float, float] | None,
                       padding: np.ndarray | None) -> NoiseStats:
    """:func:`estimate_noise` of a checked float32 ``volume`` whose ``padding`` (runs of one
    exact value, or None) is known."""
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


def _checked_volume(volume: np.ndarray, name: str = "map") -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(f"{name}: shape {array.shape} is not a 3-D (z, y, x) map")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite voxels; fix or replace the map")
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
    """Local mean and standard deviation (float32) in a box window around every voxel.

    The values, less the median (against cancellation), and their squares are averaged by
    box filters with ``scipy.ndimage.uniform_filter``'s mirrored boundary and arithmetic
    (:func:`demhx._kernels.local_moments`, the same floats as that filter).
    """
    from demhx import _kernels

    centre = np.median(_sample(volume)).astype(np.float32)
    local_mean, local_std = np.empty_like(volume), np.empty_like(volume)
    _kernels.local_moments(np.ascontiguousarray(volume, dtype=np.float32), float(centre),
                           *window, local_mean, local_std)
    return local_mean, local_std


def _seed(local_mean: np.ndarray, local_std: np.ndarray,
          candidates: np.ndarray | None = None) -> np.ndarray:
    """First solvent guess: the lowest-variance part of the low-density half of the box (of
    the ``candidates`` when given)."""
    from demhx import _kernels

    pool = _sample(local_mean) if candidates is None else _masked_sample(local_mean, candidates)
    low = np.ones(local_mean.shape, dtype=bool)
    _kernels.select_within(local_mean, -np.inf, float(np.median(pool)), low)
    _kernels.select_within(local_std, -np.inf, _FLOAT32_MAX, low)  # finite local stds only
    threshold = np.quantile(_masked_sample(local_std, low), SEED_FRACTION)
    _kernels.select_within(local_std, -np.inf, float(threshold), low)
    return low


def _refine(local_mean: np.ndarray, local_std: np.ndarray, solvent: np.ndarray) -> np.ndarray:
    """Voxels whose local mean and std lie within the current solvent's robust ranges."""
    from demhx import _kernels

    result = np.ones(local_mean.shape, dtype=bool)
    for values in (local_mean, local_std):
        centre, spread = _robust_centre_spread(_masked_sample(values, solvent))
        lower, upper = centre - CLIP_SIGMAS * spread, centre + CLIP_SIGMAS * spread
        _kernels.select_within(values, lower, upper, result)
    return result


def _masked_sample(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``_sample(values[mask])`` without the intermediate copy of ``values[mask]``."""
    from demhx import _kernels

    count = int(np.count_nonzero(mask))
    step = max(1, count // SAMPLE_VOXELS)
    sample = np.empty(-(-count // step), dtype=values.dtype)
    _kernels.masked_sample(values, mask, step, sample)
    return sample


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
    from demhx import _kernels

    mean, std = _kernels.masked_mean_std(volume, solvent)
    if not (math.isfinite(std) and std > 0):
        raise ValueError("map: the solvent has no noise (std 0), it looks masked; " + _FIX)
    return NoiseStats(mean, std, "auto", fraction)


# --------------------------------------------------------------------------- any map


def choose_stats(volume: np.ndarray, voxel_size: tuple[float, float, float] | None = None,
                 mask: np.ndarray | None = None, *, name: str = "map") -> NoiseStats:
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
    if particle is None and not _is_masked(constant, fraction):
        return limit_peak(volume, _estimate_unmasked(volume, voxel_size, constant))
    stats = _masked_noise(volume, voxel_size, constant, float(value), particle)
    if stats is None:
        return peak_stats(volume, _background(volume, value, constant, particle),
                          _inside_fraction(constant, particle))
    return limit_peak(volume, stats)


def _is_masked(constant: np.ndarray | None, fraction: float) -> bool:
    """A coherent constant region (not scattered repeated values) of a sizeable fraction."""
    if constant is None or fraction < MIN_MASK_FRACTION:
        return False
    if fraction >= MASKED_FRACTION:
        return True
    from scipy import ndimage

    kept = np.count_nonzero(ndimage.binary_erosion(constant))
    return bool(kept >= MASK_COHERENCE * np.count_nonzero(constant))


def _masked_noise(volume: np.ndarray, voxel_size: tuple[float, float, float] | None,
                  constant: np.ndarray | None, background: float,
                  particle: np.ndarray | None) -> NoiseStats | None:
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
    solvent = _seed(local_mean, local_std, candidates)
    for _ in range(ITERATIONS):
        solvent = _refine(local_mean, local_std, solvent)
    del local_mean, local_std
    values = volume[solvent]
    if not _looks_like_solvent(volume, values, inside_count,
                               None if constant is None else background):
        return None
    return NoiseStats(float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64)),
                      "auto-masked", values.size / inside_count)


def _edge_distance(constant: np.ndarray, voxel_size: tuple[float, float, float] | None
                   ) -> np.ndarray:
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


def edge_band(local_std: np.ndarray, distance: np.ndarray, candidates: np.ndarray) -> int:
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


def _looks_like_solvent(volume: np.ndarray, values: np.ndarray, inside_count: int,
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


def peak_stats(volume: np.ndarray, background: float, inside_fraction: float = 1.0
               ) -> NoiseStats:
    """Statistics for a map with no solvent to measure (method ``"peak"``).

    ``mean`` is the ``background`` (a masked map's constant), ``std`` puts the map's peak
    (:data:`PEAK_QUANTILE`) at :data:`TARGET_PEAK_SIGMAS`, the middle of the range the network
    was trained on; the solvent-cube test then takes :data:`ZONE_NOISE_FRACTION` of the peak as
    its noise std, so only cubes (nearly) empty of density are skipped.
    """
    sample = _sample(np.asarray(volume), PEAK_SAMPLE_VOXELS)
    height = float(np.quantile(sample, PEAK_QUANTILE)) - background
    if not height > 0:  # density below the background (inverted contrast)
        height = float(np.quantile(np.abs(sample - np.float32(background)), PEAK_QUANTILE))
    height = _positive(height, "map: peak above the background")
    return NoiseStats(float(background), height / TARGET_PEAK_SIGMAS, "peak", inside_fraction,
                      solvent_std=ZONE_NOISE_FRACTION * height)


def _background(volume: np.ndarray, value: np.float32, constant: np.ndarray | None,
                particle: np.ndarray | None) -> float:
    """The level of the empty box: the masked constant, else the median off the particle."""
    if constant is not None:
        return float(value)
    outside = volume if particle is None or particle.all() else volume[~particle]
    return float(np.median(_sample(outside)))


def _inside_fraction(constant: np.ndarray | None, particle: np.ndarray | None) -> float:
    inside = np.ones(1, bool) if constant is None else ~constant
    if particle is not None:
        inside = inside & particle
    return float(inside.mean())


def _mask_inside(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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
                         "covers the particle, or --noise-stats MEAN,STD")
    # No noise is measured: only cubes (nearly) empty of density count as solvent.
    median = float(np.median(values))
    height = float(np.quantile(values, PEAK_QUANTILE)) - median
    return NoiseStats(median, spread, "mask", float(inside.mean()),
                      solvent_std=ZONE_NOISE_FRACTION * (height if height > 0 else spread))
