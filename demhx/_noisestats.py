"""The record of a map's noise statistics (:class:`NoiseStats`) and the measures of its peak
that keep the normalised map in the range the network was trained on.

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

Zones without solvent (:func:`peak_stats`, method ``"peak"``) are scaled by their peak
instead: no noise can be measured in them.

The public names are re-exported by :mod:`demhx.normalise`, where callers take them from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

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
    from demhx import _noise_kernels

    count = int(np.count_nonzero(mask))
    step = max(1, count // SAMPLE_VOXELS)
    sample = np.empty(-(-count // step), dtype=values.dtype)
    _noise_kernels.masked_sample(values, mask, step, sample)
    return sample


def _robust_centre_spread(values: NDArray[Any]) -> tuple[float, float]:
    """Median and MAD-based standard deviation of a (sampled) set of values."""
    sample = _sample(values)
    if sample.size == 0:
        return 0.0, 0.0
    centre = float(_median(sample))
    spread = MAD_TO_STD * float(_median(np.abs(sample - np.float32(centre))))
    return centre, spread


def run_split(kernel: Callable[..., None], length: int, *args: Any) -> None:
    """``kernel(start, stop, *args)`` over ``[0, length)`` in contiguous parts, one per thread.

    As many threads as :func:`numba.get_num_threads` allows (``NUMBA_NUM_THREADS``,
    :func:`numba.set_num_threads`), at most the cores this process may use. The kernels
    release the GIL and each part writes its own planes or rows, so the result does not
    depend on the number of threads.
    """
    import numba

    from demhx.session import available_cores

    parts = max(1, min(numba.get_num_threads(), available_cores(), length // 32))
    bounds = [length * part // parts for part in range(parts + 1)]
    if parts == 1:
        kernel(0, length, *args)
        return
    with ThreadPoolExecutor(parts - 1) as pool:
        rest = [pool.submit(kernel, bounds[part], bounds[part + 1], *args)
                for part in range(1, parts)]
        kernel(bounds[0], bounds[1], *args)
        for future in rest:
            future.result()



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

