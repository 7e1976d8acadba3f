"""Numba kernels of the tiled inference: cube extraction, the solvent test and the
overlap-add blending of the predictions.

Each kernel takes C-contiguous float32 arrays, an ``(n, 3)`` int64 array of cube corners
``(z, y, x)`` in the padded volume (or the grid of cubes that ran) and plain ints; it writes
into preallocated outputs and allocates at most small per-axis tables. Every kernel has a
plain-NumPy twin (``*_reference``) with the same arguments, which the tests compare it against.

The kernels release the GIL (``nogil=True``) so that extraction, inference and accumulation
can run in separate threads; they are compiled on first use and cached on disk where
:mod:`demhx._jit` finds a writable place (compiled in memory on each run otherwise).

The kernels of the noise estimation live in :mod:`demhx._noise_kernels` and are re-exported
here, so that ``demhx._kernels`` names every kernel of demhx.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

from demhx._jit import CACHE as _CACHE
from demhx._noise_kernels import (  # noqa: F401  (re-exported: demhx._kernels.box_mean, ...)
    box_mean,
    box_mean_reference,
    local_moments,
    local_moments_reference,
    masked_mean_std,
    masked_mean_std_reference,
    masked_sample,
    masked_sample_reference,
    select_within,
    select_within_reference,
)


@njit(cache=_CACHE, nogil=True)
def extract_cubes(padded: NDArray[np.float32], corners: NDArray[np.int64], first: int, count: int,
                  batch: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """Copy cubes ``corners[first:first + count]`` of ``padded`` into ``batch[:count, 0]``.

    Parameters
    ----------
    padded : (Z, Y, X) float32, C-contiguous
        The padded volume.
    corners : (n, 3) int64
        Cube corners ``(z, y, x)``; every cube must lie inside ``padded``.
    first, count : int
        Range of corners to extract; ``count <= batch.shape[0]``.
    batch : (B, 1, c, c, c) float32, C-contiguous
        Output buffer; entries past ``count`` are left untouched.
    """
    size = batch.shape[2]
    for index in range(count):
        z0 = corners[first + index, 0]
        y0 = corners[first + index, 1]
        x0 = corners[first + index, 2]
        for i in range(size):
            for j in range(size):
                for k in range(size):
                    batch[index, 0, i, j, k] = padded[z0 + i, y0 + j, x0 + k]


def extract_cubes_reference(padded: NDArray[np.float32], corners: NDArray[np.int64], first: int,
                            count: int, batch: NDArray[np.float32]) -> None:
    """NumPy twin of :func:`extract_cubes` (same arguments, same result)."""
    size = batch.shape[2]
    for index in range(count):
        z0, y0, x0 = (int(value) for value in corners[first + index])
        batch[index, 0] = padded[z0:z0 + size, y0:y0 + size, x0:x0 + size]


@njit(cache=_CACHE, nogil=True)
def accumulate_weighted(values: NDArray[np.float32], corners: NDArray[np.int64], first: int,
                        count: int, weights: NDArray[np.float32], accumulator: NDArray[np.float32]
                        ) -> None:  # pragma: no cover - compiled
    """Add cube ``values`` times the blending window into ``accumulator``.

    Parameters
    ----------
    values : (B, 1, c, c, c) float32, C-contiguous
        Per-cube values for cubes ``corners[first:first + count]``.
    corners : (n, 3) int64
        Cube corners ``(z, y, x)`` in the padded volume.
    first, count : int
        Range of corners the values belong to.
    weights : (c, c, c) float32, C-contiguous
        Blending window.
    accumulator : (Z, Y, X) float32, C-contiguous
        Running weighted sum (starts at 0).
    """
    size = weights.shape[0]
    for index in range(count):
        z0 = corners[first + index, 0]
        y0 = corners[first + index, 1]
        x0 = corners[first + index, 2]
        for i in range(size):
            for j in range(size):
                for k in range(size):
                    accumulator[z0 + i, y0 + j, x0 + k] += values[index, 0, i, j, k] * weights[
                        i, j, k]


def accumulate_weighted_reference(values: NDArray[np.float32], corners: NDArray[np.int64],
                                  first: int, count: int, weights: NDArray[np.float32],
                                  accumulator: NDArray[np.float32]) -> None:
    """NumPy twin of :func:`accumulate_weighted` (same arguments, same result)."""
    size = weights.shape[0]
    for index in range(count):
        z0, y0, x0 = (int(value) for value in corners[first + index])
        region = (slice(z0, z0 + size), slice(y0, y0 + size), slice(x0, x0 + size))
        accumulator[region] += values[index, 0] * weights


@njit(cache=_CACHE, nogil=True)
def accumulate_sampled_squares(values: NDArray[np.float32], corners: NDArray[np.int64], first: int,
                               count: int, sample: int, squares: NDArray[np.float32],
                               counts: NDArray[np.uint8]) -> None:  # pragma: no cover - compiled
    """Add the squares of cube ``values`` and one count at every ``sample``-th padded voxel.

    Only voxels whose padded indices are all multiples of ``sample`` are visited; voxel
    ``(z, y, x)`` of the padded volume is entry ``(z, y, x) // sample`` of ``squares`` and
    ``counts``, so the two hold, on that sparse grid, the sum of the squared predictions and
    the number of cubes that covered each voxel.

    Parameters
    ----------
    values : (B, 1, c, c, c) float32, C-contiguous
        Per-cube values for cubes ``corners[first:first + count]``.
    corners : (n, 3) int64
        Cube corners ``(z, y, x)`` in the padded volume.
    first, count : int
        Range of corners the values belong to.
    sample : int
        Sampling step, voxels (>= 1).
    squares : (ceil(Z / sample), ceil(Y / sample), ceil(X / sample)) float32
        Running sum of squares (starts at 0).
    counts : same shape, uint8
        Running number of covering cubes (starts at 0; at most 255).
    """
    size = values.shape[2]
    for index in range(count):
        z0 = corners[first + index, 0]
        y0 = corners[first + index, 1]
        x0 = corners[first + index, 2]
        for i in range((sample - z0 % sample) % sample, size, sample):
            for j in range((sample - y0 % sample) % sample, size, sample):
                for k in range((sample - x0 % sample) % sample, size, sample):
                    value = values[index, 0, i, j, k]
                    zs = (z0 + i) // sample
                    ys = (y0 + j) // sample
                    xs = (x0 + k) // sample
                    squares[zs, ys, xs] += value * value
                    counts[zs, ys, xs] += 1


def accumulate_sampled_squares_reference(values: NDArray[np.float32], corners: NDArray[np.int64],
                                         first: int, count: int, sample: int,
                                         squares: NDArray[np.float32], counts: NDArray[np.uint8]
                                         ) -> None:
    """NumPy twin of :func:`accumulate_sampled_squares` (same arguments, same result)."""
    for index in range(count):
        z0, y0, x0 = (int(value) for value in corners[first + index])
        starts = [(-origin) % sample for origin in (z0, y0, x0)]
        cube = values[index, 0, starts[0]::sample, starts[1]::sample, starts[2]::sample]
        region = tuple(slice((origin + start) // sample, (origin + start) // sample + n)
                       for origin, start, n in zip((z0, y0, x0), starts, cube.shape,
                                                   strict=True))
        squares[region] += cube * cube
        counts[region] += np.uint8(1)


@njit(cache=_CACHE, nogil=True)
def cube_abs_max(padded: NDArray[np.float32], corners: NDArray[np.int64], size: int,
                 out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """Write the largest ``|value|`` of every cube of edge ``size`` into ``out[n]`` (float32)."""
    for index in range(corners.shape[0]):
        z0 = corners[index, 0]
        y0 = corners[index, 1]
        x0 = corners[index, 2]
        largest = np.float32(0.0)
        for i in range(size):
            for j in range(size):
                for k in range(size):
                    value = abs(padded[z0 + i, y0 + j, x0 + k])
                    if value > largest:
                        largest = value
        out[index] = largest


def cube_abs_max_reference(padded: NDArray[np.float32], corners: NDArray[np.int64], size: int,
                           out: NDArray[np.float32]) -> None:
    """NumPy twin of :func:`cube_abs_max` (same arguments, same result)."""
    for index, (z0, y0, x0) in enumerate(corners.tolist()):
        cube = padded[z0:z0 + size, y0:y0 + size, x0:x0 + size]
        out[index] = np.abs(cube).max()


@njit(cache=_CACHE, nogil=True)
def divide_by_window_sum(values: NDArray[np.float32], ran: NDArray[np.uint8], stride: int,
                         weights: NDArray[np.float32], fill: float
                         ) -> None:  # pragma: no cover - compiled
    """Divide a blended sum by the sum of the windows of the cubes that ran, in place.

    The cube corners lie on a lattice (point ``(i, j, k)`` at ``(i, j, k) * stride``; the
    tiling's ``scheme.step``), so the window sum of every voxel is computed here from the
    lattice points whose cubes ran instead of being accumulated in a volume of its own. It is
    summed in float32 in cube order, exactly as :func:`accumulate_weighted` sums the weighted
    values, so a constant blends back to itself bit for bit.

    Parameters
    ----------
    values : (Z, Y, X) float32, C-contiguous
        Sum of window-weighted predictions; becomes their weighted mean, or ``fill`` where
        no cube that ran covers the voxel.
    ran : (nz, ny, nx) uint8
        1 for the lattice points whose cube ran, 0 for skipped cubes and unused points.
    stride : int
        Spacing of the lattice, voxels.
    weights : (c, c, c) float32, C-contiguous
        Blending window (all > 0).
    fill : float
        Value of the voxels that no cube that ran covers.
    """
    size = weights.shape[0]
    # Per axis and position: the lattice indices whose cubes cover it and ran somewhere.
    zs, z_count = _covering(values.shape[0], size, stride, _used(ran, 0))
    ys, y_count = _covering(values.shape[1], size, stride, _used(ran, 1))
    xs, x_count = _covering(values.shape[2], size, stride, _used(ran, 2))
    for z in range(values.shape[0]):
        for y in range(values.shape[1]):
            for x in range(values.shape[2]):
                total = np.float32(0.0)
                for a in range(z_count[z]):
                    i = zs[z, a]
                    for b in range(y_count[y]):
                        j = ys[y, b]
                        for c in range(x_count[x]):
                            k = xs[x, c]
                            if ran[i, j, k]:
                                total += weights[z - i * stride, y - j * stride,
                                                 x - k * stride]
                if total > 0:
                    values[z, y, x] = values[z, y, x] / total
                else:
                    values[z, y, x] = fill


@njit(cache=_CACHE, nogil=True)
def _used(ran: NDArray[np.uint8], axis: int) -> NDArray[np.uint8]:  # pragma: no cover - compiled
    """1 for the lattice indices along ``axis`` where some cube ran."""
    used = np.zeros(ran.shape[axis], dtype=np.uint8)
    for i in range(ran.shape[0]):
        for j in range(ran.shape[1]):
            for k in range(ran.shape[2]):
                if ran[i, j, k]:
                    used[(i, j, k)[axis]] = 1
    return used


@njit(cache=_CACHE, nogil=True)
def _covering(length: int, size: int, stride: int,
              used: NDArray[np.uint8]
              ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:  # pragma: no cover
    """For each position ``p < length``: the used lattice indices ``i`` (increasing) with
    ``i * stride <= p < i * stride + size``, as a table and a count per position."""
    table = np.zeros((length, (size + stride - 1) // stride + 1), dtype=np.int64)
    count = np.zeros(length, dtype=np.int64)
    for p in range(length):
        for i in range(max(0, (p - size) // stride + 1), min(used.shape[0] - 1, p // stride) + 1):
            if used[i]:
                table[p, count[p]] = i
                count[p] += 1
    return table, count


def divide_by_window_sum_reference(values: NDArray[np.float32], ran: NDArray[np.uint8], stride: int,
                                   weights: NDArray[np.float32], fill: float) -> None:
    """NumPy twin of :func:`divide_by_window_sum` (same arguments, same result)."""
    size = weights.shape[0]
    total = np.zeros(values.shape, dtype=np.float32)
    for i, j, k in np.argwhere(ran != 0).tolist():  # cube order, as the sums were made
        z0, y0, x0 = i * stride, j * stride, k * stride
        total[z0:z0 + size, y0:y0 + size, x0:x0 + size] += weights
    covered = total > 0
    values[...] = np.where(covered, values / np.where(covered, total, 1), fill)


