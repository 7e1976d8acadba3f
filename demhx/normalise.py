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
    :mod:`demhx._solvent` for the estimator and its measured accuracy. Maps whose particle
    fills about half the box with strongly correlated noise need ``noise_stats=`` or
    ``mask=``.
``"auto-masked"`` — masked maps and user masks
    A map is masked when a coherent region of one exact value covers
    :data:`MIN_MASK_FRACTION` of the box or more. The same estimator then runs on the voxels
    inside the map's mask only, beyond the band along its edge where a soft edge attenuates
    the noise (:func:`edge_band`) and off the particle a user mask marks; the result is kept
    when it looks like solvent (:mod:`demhx._solvent`).
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

Dynamic range (:func:`limit_peak`, :mod:`demhx._noisestats`): an automatically estimated std
is widened until the map's 99.99th percentile lies at :data:`MAX_PEAK_SIGMAS` noise stds, the
edge of what the network was trained on (:data:`TRAINED_PEAK_SIGMAS`); the measured std is
kept (``widened_from``) to decide which cubes are solvent.

Stage policy: :func:`as_stats` checks the statistics a caller gives, :func:`statistics_for`
picks those of one map for a model (the user's, the model's mask mode, or
:func:`choose_stats`, with the warnings a run shows), :func:`describe` puts them in one line
and :func:`normalise_for` normalises the map as the model expects.

The estimators live in :mod:`demhx._solvent` and the :class:`NoiseStats` record with the peak
measures in :mod:`demhx._noisestats`; their public names are re-exported here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from demhx._noisestats import (  # noqa: F401  (re-exported: demhx.normalise.NoiseStats, ...)
    MAD_TO_STD,
    MAX_PEAK_SIGMAS,
    PEAK_QUANTILE,
    PEAK_SAMPLE_VOXELS,
    SAMPLE_VOXELS,
    TARGET_PEAK_SIGMAS,
    TRAINED_PEAK_SIGMAS,
    ZONE_NOISE_FRACTION,
    NoiseStats,
    _positive,
    _sample,
    limit_peak,
    peak_sigmas,
    peak_stats,
)
from demhx._solvent import (  # noqa: F401  (re-exported: demhx.normalise.estimate_noise, ...)
    CLIP_SIGMAS,
    EDGE_TOLERANCE,
    ITERATIONS,
    MASK_COHERENCE,
    MASKED_FRACTION,
    MAX_EDGE_BAND_VOXELS,
    MAX_SOLVENT_OFFSET_SIGMAS,
    MIN_EDGE_BAND_VOXELS,
    MIN_EDGE_SHELL_VOXELS,
    MIN_MASK_FRACTION,
    MIN_MASKED_SOLVENT_FRACTION,
    MIN_SOLVENT_FRACTION,
    MIN_SOLVENT_PEAK_SIGMAS,
    MIN_SOLVENT_VOXELS,
    MIN_TAIL_FRACTION,
    SEED_FRACTION,
    WINDOW_VOXELS,
    _checked_volume,
    _constant_region,
    _estimate_unmasked,
    _is_masked,
    _local_moments,
    _masked_noise,
    _most_common_value,
    _refine,
    _seed,
    _window,
    check_not_masked,
    edge_band,
    estimate_noise,
)

if TYPE_CHECKING:
    from demhx.model import ModelSpec

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
      enough and looks like noise (:func:`demhx._solvent._looks_like_solvent`).
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
