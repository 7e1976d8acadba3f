"""LocScale-style local amplitude scaling of a map against a model-simulated reference map.

In every cubic window the radial amplitude profile of the map is matched to that of the
reference (per Fourier shell, scale = reference amplitude / map amplitude). The filters are
computed on a coarse grid of window centres (``step`` voxels apart); each one is applied to
the map around its centre and the filtered blocks are blended with trilinear "hat" weights,
which form a partition of unity: the result is the map filtered with a smoothly varying,
locally matched filter. Volumes are ``(z, y, x)`` at any (isotropic) voxel size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft
from numpy.typing import NDArray

# Edge of the windows in which amplitude profiles are compared, voxels.
DEFAULT_WINDOW = 24
# Distance between window centres, voxels.
DEFAULT_STEP = 8
# Map amplitudes below this fraction of the window's strongest shell count as this fraction.
AMPLITUDE_FLOOR = 1e-3
# Largest per-shell amplitude scale.
MAX_SCALE = 1e4
# Windows processed per batched FFT (bounds memory to ~100 MB).
_CHUNK = 256


def local_amplitude_scaling(volume: NDArray[Any], reference: NDArray[Any],
                            region: NDArray[Any] | None = None, window: int = DEFAULT_WINDOW,
                            step: int = DEFAULT_STEP) -> NDArray[np.float32]:
    """Scale the local radial amplitude profile of ``volume`` to that of ``reference``.

    Parameters
    ----------
    volume : (z, y, x) map to sharpen (e.g. the average of two half-maps).
    reference : (z, y, x) model-simulated map, same shape.
    region : optional (z, y, x) bool mask; only windows whose blending support touches it are
        computed, the result is 0 elsewhere.
    window : window edge, voxels (even).
    step : distance between window centres, voxels; ``2 * step <= window``.

    Returns
    -------
    (z, y, x) float32 scaled map.
    """
    if volume.shape != reference.shape:
        raise ValueError(f"local_amplitude_scaling: shapes differ, {volume.shape} vs "
                         f"{reference.shape}")
    if window % 2 or 2 * step > window:
        raise ValueError(f"window {window} must be even and >= 2 * step ({2 * step})")
    half = window // 2
    padded_in = np.pad(volume.astype(np.float32), half + step)
    padded_ref = np.pad(reference.astype(np.float32), half + step)
    centres = _active_centres(volume.shape, region, step)
    taper = _soft_sphere(window)
    shells, n_shells = _window_shells(window)
    hat = _hat(step)
    out = np.zeros(padded_in.shape, dtype=np.float32)
    for start in range(0, len(centres), _CHUNK):
        chunk = centres[start:start + _CHUNK] + half + step
        # extract the windows around each centre from the padded maps
        blocks_in = _extract(padded_in, chunk, half)
        blocks_ref = _extract(padded_ref, chunk, half)
        # radial amplitude profiles of the tapered windows, and the per-shell scale
        scale = _profile_ratio(blocks_in * taper, blocks_ref * taper, shells, n_shells)
        # filter the untapered windows and keep their centres, hat-weighted
        spectra = scipy.fft.rfftn(blocks_in, axes=(1, 2, 3), workers=1)
        spectra *= scale[:, shells]
        filtered = scipy.fft.irfftn(spectra, s=(window,) * 3, axes=(1, 2, 3), workers=1)
        core = filtered[:, half - step + 1:half + step, half - step + 1:half + step,
                        half - step + 1:half + step] * hat
        for (z, y, x), block in zip(chunk, core, strict=True):
            out[z - step + 1:z + step, y - step + 1:y + step, x - step + 1:x + step] += block
    crop = half + step
    return np.ascontiguousarray(out[crop:-crop, crop:-crop, crop:-crop])


def _active_centres(shape: tuple[int, ...], region: NDArray[Any] | None, step: int) -> NDArray[Any]:
    """(n, 3) window centres on the coarse grid whose hat support touches ``region``."""
    axes = [np.arange(0, n + step, step) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    if region is None:
        return grid
    # a centre is needed if any region voxel lies within step - 1 of it (per axis)
    from scipy import ndimage

    grown = ndimage.maximum_filter(region.astype(np.uint8), size=2 * step - 1) > 0
    inside = np.all(grid < np.array(shape), axis=1)
    keep = np.zeros(len(grid), dtype=bool)
    keep[inside] = grown[tuple(grid[inside].T)]
    # centres beyond the box edge cover the last voxels: keep them when the nearest is needed
    outside = ~inside
    clipped = np.minimum(grid[outside], np.array(shape) - 1)
    keep[outside] = grown[tuple(clipped.T)]
    return grid[keep]


def _extract(padded: NDArray[Any], centres: NDArray[Any], half: int) -> NDArray[Any]:
    """(n, w, w, w) windows of edge ``2 * half`` centred on ``centres`` (padded coordinates)."""
    window = 2 * half
    blocks = np.empty((len(centres), window, window, window), dtype=np.float32)
    for i, (z, y, x) in enumerate(centres):
        blocks[i] = padded[z - half:z + half, y - half:y + half, x - half:x + half]
    return blocks


def _profile_ratio(blocks_in: NDArray[Any], blocks_ref: NDArray[Any], shells: NDArray[Any],
                   n_shells: int) -> NDArray[Any]:
    """(n, n_shells) ratio of the reference's to the map's radial amplitude, per window."""
    membership = np.zeros((shells.size, n_shells), dtype=np.float32)
    membership[np.arange(shells.size), shells.ravel()] = 1.0
    power_in = np.abs(scipy.fft.rfftn(blocks_in, axes=(1, 2, 3), workers=1)) ** 2
    power_ref = np.abs(scipy.fft.rfftn(blocks_ref, axes=(1, 2, 3), workers=1)) ** 2
    profile_in = np.sqrt(power_in.reshape(len(blocks_in), -1) @ membership)
    profile_ref = np.sqrt(power_ref.reshape(len(blocks_ref), -1) @ membership)
    # windows where the map is (nearly) empty must not be amplified without bound
    floor = AMPLITUDE_FLOOR * profile_in.max(axis=1, keepdims=True) + 1e-30
    ratio = np.maximum(profile_ref, floor) / np.maximum(profile_in, floor)
    return np.minimum(ratio, MAX_SCALE).astype(np.float32)


def _window_shells(window: int) -> tuple[NDArray[Any], int]:
    """Shell index of every rFFT coefficient of a ``window``-cube, and the number of shells."""
    f = np.fft.fftfreq(window)
    fx = np.fft.rfftfreq(window)
    radius = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    shells = np.minimum(np.rint(radius * window).astype(np.int64), window // 2 + 1)
    return shells, int(shells.max()) + 1


def _soft_sphere(window: int) -> NDArray[Any]:
    """Spherical taper of a window: 1 inside radius w/2 - 4, cosine edge to 0 at w/2."""
    c = (window - 1) / 2
    r = np.sqrt(((np.indices((window,) * 3) - c) ** 2).sum(axis=0))
    inner, outer = window / 2 - 4, window / 2
    t = np.clip((r - inner) / (outer - inner), 0, 1)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def _hat(step: int) -> NDArray[Any]:
    """Trilinear blending weights of edge ``2 * step - 1``; shifted copies sum to 1."""
    w = 1.0 - np.abs(np.arange(-step + 1, step)) / step
    return (w[:, None, None] * w[None, :, None] * w[None, None, :]).astype(np.float32)
