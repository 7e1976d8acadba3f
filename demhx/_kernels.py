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
                line, source = batch[index, 0, i, j], padded[z0 + i, y0 + j, x0:x0 + size]
                for k in range(size):
                    line[k] = source[k]


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
    none = np.zeros((0, 0, 0), dtype=np.float32)
    accumulate_blend(values, corners, first, count, weights, accumulator, 0, none,
                     none.astype(np.uint16))


@njit(cache=_CACHE, nogil=True)
def accumulate_blend(values: NDArray[np.float32], corners: NDArray[np.int64], first: int,
                     count: int, weights: NDArray[np.float32], accumulator: NDArray[np.float32],
                     sample: int, squares: NDArray[np.float32], counts: NDArray[np.uint16]
                     ) -> None:  # pragma: no cover - compiled
    """:func:`accumulate_weighted`, and with ``sample >= 1`` also
    :func:`accumulate_sampled_squares` (same arguments), in one pass over the values.

    The padded volume is visited plane by plane, and each plane receives the cubes that
    cross it in cube order: every voxel gets the same additions in the same order as cube
    by cube, while the planes of the accumulator stay in cache across the cubes of a batch.
    """
    size = weights.shape[0]
    low, high = accumulator.shape[0], 0
    for index in range(count):
        low = min(low, corners[first + index, 0])
        high = max(high, corners[first + index, 0] + size)
    for z in range(low, high):
        for index in range(count):
            z0, y0, x0 = corners[first + index, 0], corners[first + index, 1], corners[
                first + index, 2]
            if z0 <= z < z0 + size:
                plane = values[index, 0, z - z0]
                for j in range(size):
                    line, window = plane[j], weights[z - z0, j]
                    out = accumulator[z, y0 + j, x0:x0 + size]
                    for k in range(size):
                        out[k] += line[k] * window[k]
                if sample >= 1 and z % sample == 0:
                    _sampled_plane(plane, z // sample, y0, x0, sample, squares, counts)


@njit(cache=_CACHE, nogil=True)
def _sampled_plane(plane: NDArray[np.float32], zs: int, y0: int, x0: int, sample: int,
                   squares: NDArray[np.float32], counts: NDArray[np.uint16]
                   ) -> None:  # pragma: no cover - compiled
    """The squares and counts of one sampled plane ``zs`` of a cube at ``(y0, x0)``."""
    j0, k0 = (-y0) % sample, (-x0) % sample
    ys, xs = (y0 + j0) // sample, (x0 + k0) // sample
    size = plane.shape[1]
    for b in range((plane.shape[0] - j0 + sample - 1) // sample):
        line = plane[j0 + b * sample]
        out, seen = squares[zs, ys + b], counts[zs, ys + b]
        for c in range((size - k0 + sample - 1) // sample):
            value = line[k0 + c * sample]
            out[xs + c] += value * value
            seen[xs + c] += 1


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
                               counts: NDArray[np.uint16]) -> None:  # pragma: no cover - compiled
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
    counts : same shape, uint16
        Running number of covering cubes (starts at 0; at most 65535, which
        :meth:`demhx.refine.SampledSums.for_plan` makes sure of).
    """
    size = values.shape[2]
    for index in range(count):
        z0, y0, x0 = corners[first + index, 0], corners[first + index, 1], corners[first + index, 2]
        i0 = (-z0) % sample
        for a in range((size - i0 + sample - 1) // sample):
            _sampled_plane(values[index, 0, i0 + a * sample], (z0 + i0) // sample + a, y0, x0,
                           sample, squares, counts)


def accumulate_sampled_squares_reference(values: NDArray[np.float32], corners: NDArray[np.int64],
                                         first: int, count: int, sample: int,
                                         squares: NDArray[np.float32], counts: NDArray[np.uint16]
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
        counts[region] += 1


@njit(cache=_CACHE, nogil=True)
def cube_abs_max(padded: NDArray[np.float32], corners: NDArray[np.int64], size: int,
                 out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """Write the largest ``|value|`` of every cube of edge ``size`` into ``out[n]`` (float32).

    NaNs are passed over. Compared as bit patterns with the sign cleared (ordered as the
    magnitudes they encode, and a vectorisable integer maximum).
    """
    bits = padded.view(np.int32)
    largest = out.view(np.int32)
    for index in range(corners.shape[0]):
        z0 = corners[index, 0]
        y0 = corners[index, 1]
        x0 = corners[index, 2]
        top = np.int32(0)
        for i in range(size):
            for j in range(size):
                line = bits[z0 + i, y0 + j, x0:x0 + size]
                for k in range(size):
                    magnitude = line[k] & np.int32(0x7FFFFFFF)
                    if magnitude > np.int32(0x7F800000):  # NaN
                        magnitude = np.int32(0)
                    top = max(top, magnitude)
        largest[index] = top


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
    divide_into(values, ran, stride, weights, fill, 0, 0, 0, values)


@njit(cache=_CACHE, nogil=True)
def divide_into(values: NDArray[np.float32], ran: NDArray[np.uint8], stride: int,
                weights: NDArray[np.float32], fill: float, z0: int, y0: int, x0: int,
                out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """:func:`divide_by_window_sum` of the box of ``values`` at ``(z0, y0, x0)`` of
    ``out``'s shape, written to ``out`` (``values`` itself, or a separate array)."""
    size = weights.shape[0]
    # Per axis and position: the lattice indices whose cubes cover it and ran somewhere.
    zs, z_count = _covering(values.shape[0], size, stride, _used(ran, 0))
    ys, y_count = _covering(values.shape[1], size, stride, _used(ran, 1))
    row = np.empty(values.shape[2], dtype=np.float32)
    # Where every row of the window is the same (a uniform window), the sum along a row
    # depends only on which cubes cover it: it is made once per change of those.
    same_rows = np.all(weights == weights[0, 0])
    last_z, last_y = -1, -1
    for z in range(out.shape[0]):
        for y in range(out.shape[1]):
            if not (same_rows and last_z >= 0 and _same_points(zs, z_count, z + z0, last_z)
                    and _same_points(ys, y_count, y + y0, last_y)):
                _window_row(ran, stride, weights, z + z0, zs[z + z0, :z_count[z + z0]],
                            y + y0, ys[y + y0, :y_count[y + y0]], row)
                last_z, last_y = z + z0, y + y0
            line = values[z + z0, y + y0]
            for x in range(out.shape[2]):
                total = row[x + x0]
                out[z, y, x] = line[x + x0] / total if total > 0 else fill


@njit(cache=_CACHE, nogil=True)
def _window_row(ran: NDArray[np.uint8], stride: int, weights: NDArray[np.float32], z: int,
                z_points: NDArray[np.int64], y: int, y_points: NDArray[np.int64],
                row: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """The sum of the windows of the cubes that ran along the row ``(z, y)``, into ``row``.

    Summed cube by cube in cube order (lattice points ``(i, j, k)`` in increasing order), as
    :func:`accumulate_weighted` sums the values, so every voxel sees the same additions.
    """
    size = weights.shape[2]
    row[:] = 0
    for i in z_points:
        for j in y_points:
            line = weights[z - i * stride, y - j * stride]
            for k in range(ran.shape[2]):
                if ran[i, j, k]:
                    start = k * stride
                    for t in range(min(size, row.shape[0] - start)):
                        row[start + t] += line[t]


@njit(cache=_CACHE, nogil=True)
def _same_points(table: NDArray[np.int64], count: NDArray[np.int64], p: int, q: int
                 ) -> bool:  # pragma: no cover - compiled
    """Whether positions ``p`` and ``q`` are covered by the same lattice points."""
    if count[p] != count[q]:
        return False
    for a in range(count[p]):
        if table[p, a] != table[q, a]:
            return False
    return True


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




@njit(cache=_CACHE, nogil=True)
def overlap_sums(sums: NDArray[np.floating], squares: NDArray[np.floating],
                 counts: NDArray[np.uint16], background: float, totals: NDArray[np.float64]
                 ) -> None:  # pragma: no cover - compiled
    """The five sums of :func:`demhx.refine.predicted_cc`, in float64, into ``totals``.

    ``sums``, ``squares`` and ``counts`` are 3-D arrays of one shape (views of any strides):
    per voxel the sum of the predictions of the ``n = counts`` cubes covering it, and of their
    squares. ``totals`` receives the sums over the voxels with ``n >= 2`` of the predictions'
    sample variance and of the squared output (``mean = sums / n``), over the covered voxels
    of ``mean² / n``, and over all voxels of the output (``background`` where ``n = 0``) and
    of its square.
    """
    totals[:] = 0
    for z in range(counts.shape[0]):
        for y in range(counts.shape[1]):  # summed per row, then added up
            variance = power = per_cube = total = square_total = 0.0
            for x in range(counts.shape[2]):
                n = np.float64(counts[z, y, x])
                mean = np.float64(sums[z, y, x]) / n if n >= 1 else np.float64(background)
                square = mean * mean
                if n >= 2:
                    variance += max(np.float64(squares[z, y, x]) - n * square, 0.0) / (n - 1)
                    power += square
                if n >= 1:
                    per_cube += square / n
                total += mean
                square_total += square
            totals += np.array((variance, power, per_cube, total, square_total))


def overlap_sums_reference(sums: NDArray[np.floating], squares: NDArray[np.floating],
                           counts: NDArray[np.uint16], background: float,
                           totals: NDArray[np.float64]) -> None:
    """NumPy twin of :func:`overlap_sums` (same arguments; the same sums up to rounding)."""
    count = counts.astype(np.float64)
    covered, multi = count >= 1, count >= 2
    mean = np.where(covered, sums / np.maximum(count, 1), background)
    square = mean * mean
    variance = np.maximum(squares - count * square, 0) / np.maximum(count - 1, 1)
    totals[:] = (variance[multi].sum(), square[multi].sum(),
                 (square[covered] / count[covered]).sum(), mean.sum(), square.sum())
