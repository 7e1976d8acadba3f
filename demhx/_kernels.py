"""Every numba kernel of demhx: the tiled inference's (cube extraction, the solvent test, the
overlap-add blending of the predictions) and the noise estimation's (the box filter of the
local statistics, masked reductions over a volume).

The tiling kernels take C-contiguous float32 arrays, an ``(n, 3)`` int64 array of cube corners
``(z, y, x)`` in the padded volume (or the grid of cubes that ran) and plain ints; it writes
into preallocated outputs and allocates at most small per-axis tables. Every kernel has a
plain-NumPy twin (``*_reference``) with the same arguments, which the tests compare it against.

The kernels release the GIL (``nogil=True``) so that extraction, inference and accumulation
can run in separate threads; they are compiled on first use and cached on disk where
:mod:`demhx._jit` finds a writable place (compiled in memory on each run otherwise).
The noise kernels take C-contiguous float32 volumes, bool masks of the same shape and plain
numbers. :func:`run_split` runs a kernel over parts of an axis on several threads.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numba import njit
from numpy.typing import NDArray

from demhx._jit import CACHE as _CACHE
from demhx.device import available_cores


# --------------------------------------------------------------------------- tiling
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


# --------------------------------------------------------------------------- noise estimation
_BYTE_SUM = np.uint64(0x0101010101010101)  # times a word of 0/1 bytes: their sum in the top byte
_LANES = 16  # rows of a plane whose x passes run side by side


@njit(cache=_CACHE, nogil=True)
def box_mean(source: NDArray[np.float32], window_z: int, window_y: int, window_x: int,
             out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """Mean of ``source`` in a box of ``(window_z, window_y, window_x)`` voxels around each voxel.

    The boundary mode and the arithmetic are those of
    ``scipy.ndimage.uniform_filter(source, window, mode="reflect")`` (SciPy 1.17), so the
    result is the same bit for bit: one pass per axis (z, then y, then x; axes of window 1
    skipped), each a running sum in float64 (``entering - leaving`` added per step, divided by
    the window for each output) over the line extended by mirroring about its ends
    (``d c b a | a b c d | d c b a``), stored as float32 between passes. Odd windows are
    centred; an even window ``w`` reaches ``w // 2`` voxels back.

    Parameters
    ----------
    source : (Z, Y, X) float32, C-contiguous
        The values to average.
    window_z, window_y, window_x : int
        Box edge per axis, voxels (>= 1).
    out : (Z, Y, X) float32, C-contiguous
        The result; may be ``source`` itself (computed in place).
    """
    result = np.empty_like(source)
    z_moments(0, source.shape[1], source, 0.0, window_z, result, result)
    plane_moments(0, source.shape[0], window_y, window_x, result, result)
    out[...] = result


@njit(cache=_CACHE, nogil=True)
def _mirror(index: int, length: int) -> int:  # pragma: no cover - compiled
    """``index`` folded into ``[0, length)`` by mirroring about the ends (period ``2 length``)."""
    index %= 2 * length
    return index if index < length else 2 * length - 1 - index


@njit(cache=_CACHE, nogil=True)
def z_moments(start: int, stop: int, volume: NDArray[np.float32], centre: float, window: int,
              out_mean: NDArray[np.float32], out_squares: NDArray[np.float32]
              ) -> None:  # pragma: no cover - compiled
    """The z pass of :func:`box_mean` for the rows ``start <= y < stop`` of ``volume - centre``
    (float32 differences) into ``out_mean`` and, unless ``out_squares`` is ``out_mean``, of
    their float32 squares into ``out_squares`` (window 1: the values themselves)."""
    depth, columns = volume.shape[0], volume.shape[2]
    shift, before = np.float32(centre), window // 2
    squares = out_squares.ctypes.data != out_mean.ctypes.data
    total, total_sq = np.zeros(columns), np.zeros(columns)
    for y in range(start, stop):
        if window == 1:
            for p in range(depth):
                for x in range(columns):
                    value = volume[p, y, x] - shift
                    out_mean[p, y, x] = value
                    out_squares[p, y, x] = value * value if squares else value
            continue
        total[:] = 0.0
        total_sq[:] = 0.0
        for e in range(window):
            z = _mirror(e - before, depth)
            for x in range(columns):
                value = volume[z, y, x] - shift
                total[x] += value
                total_sq[x] += value * value
        for x in range(columns):
            out_mean[0, y, x] = total[x] / window
            if squares:
                out_squares[0, y, x] = total_sq[x] / window
        for p in range(1, depth):
            new, old = _mirror(p - 1 + window - before, depth), _mirror(p - 1 - before, depth)
            if squares:
                _z_step_squares(volume[new, y], volume[old, y], shift, window, total,
                                total_sq, out_mean[p, y], out_squares[p, y])
            else:
                for x in range(columns):
                    total[x] += (np.float64(volume[new, y, x] - shift)
                                 - np.float64(volume[old, y, x] - shift))
                    out_mean[p, y, x] = total[x] / window


@njit(cache=_CACHE, nogil=True, inline="always")
def _z_step_squares(entering: NDArray[np.float32], leaving: NDArray[np.float32],
                    shift: np.float32, window: int, total: NDArray[np.float64],
                    total_sq: NDArray[np.float64], out_mean: NDArray[np.float32],
                    out_squares: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """One step of :func:`z_moments` along a line of x, values and squares."""
    for x in range(entering.size):
        new, old = entering[x] - shift, leaving[x] - shift
        total[x] += np.float64(new) - np.float64(old)
        total_sq[x] += np.float64(new * new) - np.float64(old * old)
        out_mean[x] = total[x] / window
        out_squares[x] = total_sq[x] / window


@njit(cache=_CACHE, nogil=True)
def plane_moments(start: int, stop: int, window_y: int, window_x: int,
                  local_mean: NDArray[np.float32], local_std: NDArray[np.float32]
                  ) -> None:  # pragma: no cover - compiled
    """The y and x passes of :func:`box_mean`, in place, on the planes ``start <= z < stop`` of
    ``local_mean`` and, unless it is ``local_mean``, of ``local_std`` (the box mean of the
    squares, :func:`z_moments`), which then becomes the local standard deviation: the square
    root of the mean square less the squared mean, 0 where that is negative (float32)."""
    rows, columns = local_mean.shape[1], local_mean.shape[2]
    moments = local_std.ctypes.data != local_mean.ctypes.data
    copy, total = np.empty((rows, columns), np.float32), np.empty(columns)
    lines = np.empty((columns + window_x - 1, _LANES))
    result, running = np.empty((columns, _LANES), np.float32), np.empty(_LANES)
    for z in range(start, stop):
        _y_pass(local_mean[z], window_y, copy, total)
        _x_pass(local_mean[z], window_x, lines, result, running)
        if moments:
            _y_pass(local_std[z], window_y, copy, total)
            _x_pass(local_std[z], window_x, lines, result, running)
            for y in range(rows):
                for x in range(columns):
                    mean = local_mean[z, y, x]
                    variance = local_std[z, y, x] - mean * mean
                    local_std[z, y, x] = np.sqrt(variance) if variance > 0 else np.float32(0)


@njit(cache=_CACHE, nogil=True)
def _y_pass(plane: NDArray[np.float32], window: int, copy: NDArray[np.float32],
            total: NDArray[np.float64]) -> None:  # pragma: no cover - compiled
    """The y pass of :func:`box_mean` on one (Y, X) plane, in place."""
    if window == 1:
        return
    rows, columns = plane.shape
    before = window // 2
    copy[...] = plane
    total[:] = 0.0
    for e in range(window):
        row = _mirror(e - before, rows)
        for x in range(columns):
            total[x] += copy[row, x]
    for x in range(columns):
        plane[0, x] = total[x] / window
    for row in range(1, rows):
        new, old = _mirror(row - 1 + window - before, rows), _mirror(row - 1 - before, rows)
        for x in range(columns):
            total[x] += np.float64(copy[new, x]) - np.float64(copy[old, x])
            plane[row, x] = total[x] / window


@njit(cache=_CACHE, nogil=True)
def _x_pass(plane: NDArray[np.float32], window: int, lines: NDArray[np.float64],
            result: NDArray[np.float32], running: NDArray[np.float64]
            ) -> None:  # pragma: no cover - compiled
    """The x pass of :func:`box_mean` on one (Y, X) plane, in place: :data:`_LANES` rows at a
    time, transposed so that their running sums advance side by side (vectorised)."""
    if window == 1:
        return
    rows, columns = plane.shape
    before = window // 2
    for first in range(0, rows, _LANES):
        for e in range(columns + window - 1):  # rows past the last repeat it (not stored)
            x = _mirror(e - before, columns)
            for lane in range(_LANES):
                lines[e, lane] = plane[min(first + lane, rows - 1), x]
        running[:] = 0.0
        for e in range(window):
            for lane in range(_LANES):
                running[lane] += lines[e, lane]
        for lane in range(_LANES):
            result[0, lane] = running[lane] / window
        for x in range(1, columns):
            for lane in range(_LANES):
                running[lane] += lines[x - 1 + window, lane] - lines[x - 1, lane]
                result[x, lane] = running[lane] / window
        for lane in range(min(_LANES, rows - first)):
            for x in range(columns):
                plane[first + lane, x] = result[x, lane]


def box_mean_reference(source: NDArray[np.float32], window_z: int, window_y: int, window_x: int,
                       out: NDArray[np.float32]) -> None:
    """NumPy twin of :func:`box_mean`: differences of cumulative sums (float64) of the
    mirrored volume (same result up to rounding)."""
    result = np.asarray(source, dtype=np.float64)
    for axis, window in enumerate((window_z, window_y, window_x)):
        before = window // 2
        length = result.shape[axis]
        index = np.arange(-before, length + window - 1 - before) % (2 * length)
        index = np.where(index < length, index, 2 * length - 1 - index)
        extended = np.take(result, index, axis=axis)
        sums = np.cumsum(extended, axis=axis)
        zero = np.zeros_like(np.take(sums, [0], axis=axis))
        sums = np.concatenate([zero, sums], axis=axis)
        upper = np.take(sums, np.arange(window, window + length), axis=axis)
        lower = np.take(sums, np.arange(length), axis=axis)
        result = (upper - lower) / window
    out[...] = result


@njit(cache=_CACHE, nogil=True)
def local_moments(volume: NDArray[np.float32], centre: float, window_z: int, window_y: int,
                  window_x: int, local_mean: NDArray[np.float32],
                  local_std: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """Mean and standard deviation of ``volume`` in a box around every voxel (float32).

    ``local_mean`` is the :func:`box_mean` of ``volume - centre`` and ``local_std`` the square
    root of the box mean of its squares less the squared local mean (0 where that is
    negative), all in float32 as NumPy computes them; ``centre`` (a float32 value, e.g. the
    median) guards against cancellation.

    Parameters
    ----------
    volume : (Z, Y, X) float32, C-contiguous.
    centre : float
        Subtracted from every voxel first (rounded to float32).
    window_z, window_y, window_x : int
        Box edge per axis, voxels (>= 1).
    local_mean, local_std : (Z, Y, X) float32, C-contiguous
        Outputs.
    """
    z_moments(0, volume.shape[1], volume, centre, window_z, local_mean, local_std)
    plane_moments(0, volume.shape[0], window_y, window_x, local_mean, local_std)


def local_moments_reference(volume: NDArray[np.float32], centre: float, window_z: int,
                            window_y: int, window_x: int, local_mean: NDArray[np.float32],
                            local_std: NDArray[np.float32]) -> None:
    """NumPy twin of :func:`local_moments` (same result up to the rounding of
    :func:`box_mean_reference`)."""
    window = (window_z, window_y, window_x)
    centred = volume - np.float32(centre)
    box_mean_reference(centred, *window, local_mean)
    box_mean_reference(np.square(centred), *window, local_std)
    local_std -= np.square(local_mean)
    np.maximum(local_std, 0, out=local_std)
    np.sqrt(local_std, out=local_std)


@njit(cache=_CACHE, nogil=True)
def select_within(values: NDArray[np.float32], lower: float, upper: float,
                  mask: NDArray[np.bool_]) -> int:  # pragma: no cover - compiled
    """Keep in ``mask`` only the voxels with ``lower <= value <= upper``; their count.

    The bounds are rounded to float32 and compared in float32, as NumPy compares a float32
    array with a Python float. NaN values are never kept.

    Parameters
    ----------
    values : (Z, Y, X) float32, C-contiguous.
    lower, upper : float
        Inclusive bounds.
    mask : (Z, Y, X) bool, C-contiguous
        Updated in place (``mask &= lower <= values <= upper``).
    """
    flat_values, flat_mask = values.reshape(-1), mask.reshape(-1)
    low, high = np.float32(lower), np.float32(upper)
    count = 0
    for i in range(flat_values.size):  # branch-free, so that it vectorises
        keep = flat_mask[i] & (flat_values[i] >= low) & (flat_values[i] <= high)
        flat_mask[i] = keep
        count += keep
    return count


def select_within_reference(values: NDArray[np.float32], lower: float, upper: float,
                            mask: NDArray[np.bool_]) -> int:
    """NumPy twin of :func:`select_within` (same arguments, same result)."""
    mask &= (values >= lower) & (values <= upper)
    return int(np.count_nonzero(mask))


@njit(cache=_CACHE, nogil=True)
def masked_sample(values: NDArray[np.float32], mask: NDArray[np.bool_], step: int,
                  out: NDArray[np.float32]) -> int:  # pragma: no cover - compiled
    """Every ``step``-th value (from the first) of ``values[mask]`` into ``out``; the count.

    Parameters
    ----------
    values : (Z, Y, X) float32, C-contiguous.
    mask : (Z, Y, X) bool, C-contiguous.
    step : int (>= 1).
    out : (n,) float32 with ``n >= ceil(count_nonzero(mask) / step)``.
    """
    flat_values, flat_mask = values.reshape(-1), mask.reshape(-1)
    # Eight mask bytes (0 or 1 each) at a time: their sum counts the voxels in the mask, and
    # only the words holding the next voxel to take are looked at voxel by voxel.
    words = flat_mask[:flat_mask.size // 8 * 8].view(np.uint64)
    written = 0
    seen = 0  # voxels of the mask passed so far
    wanted = 0  # position, among the voxels of the mask, of the next one to take
    for word in range(words.size):
        count = (words[word] * _BYTE_SUM) >> np.uint64(56)
        if seen + count <= wanted:
            seen += count
            continue
        seen, wanted, written = _take_pair(flat_mask, flat_values, flat_values, word * 8,
                                           word * 8 + 8, step, out, out, seen, wanted, written)
    # the voxels after the last whole word
    seen, wanted, written = _take_pair(flat_mask, flat_values, flat_values, words.size * 8,
                                       flat_mask.size, step, out, out, seen, wanted, written)
    return written


def masked_sample_reference(values: NDArray[np.float32], mask: NDArray[np.bool_], step: int,
                            out: NDArray[np.float32]) -> int:
    """NumPy twin of :func:`masked_sample` (same arguments, same result)."""
    sample = values[mask][::step]
    out[:sample.size] = sample
    return int(sample.size)


@njit(cache=_CACHE, nogil=True)
def masked_mean_std(values: NDArray[np.float32], mask: NDArray[np.bool_]
                    ) -> tuple[float, float]:  # pragma: no cover - compiled
    """Mean and standard deviation (float64, divided by the count) of ``values[mask]``.

    Two passes of :func:`plane_sums`: the mean, then the mean squared deviation from it; (nan,
    nan) for an empty mask. Sums per plane, added in plane order, so the result does not
    depend on how the planes are split between threads.
    """
    depth = values.shape[0]
    sums = np.empty(depth)
    plane_sums(0, depth, values, mask, 0.0, False, sums)
    count = np.count_nonzero(mask)
    if count == 0:
        return np.nan, np.nan
    mean = np.cumsum(sums)[-1] / count  # planes added in order
    plane_sums(0, depth, values, mask, mean, True, sums)
    return mean, np.sqrt(np.cumsum(sums)[-1] / count)


@njit(cache=_CACHE, nogil=True)
def plane_sums(start: int, stop: int, values: NDArray[np.float32], mask: NDArray[np.bool_],
               centre: float, squares: bool, out: NDArray[np.float64]
               ) -> None:  # pragma: no cover - compiled
    """``out[z]``: the sum over plane ``z`` (``start <= z < stop``) of ``values - centre`` (or
    of its squares) where ``mask`` is set, in float64; each column of the plane summed over
    the rows (vectorised), then the columns in order."""
    rows, columns = values.shape[1], values.shape[2]
    column_sums = np.empty(columns)
    for z in range(start, stop):
        column_sums[:] = 0.0
        for y in range(rows):
            for x in range(columns):
                deviation = np.float64(values[z, y, x]) - centre if mask[z, y, x] else 0.0
                column_sums[x] += deviation * deviation if squares else deviation
        total = 0.0
        for x in range(columns):
            total += column_sums[x]
        out[z] = total


@njit(cache=_CACHE, nogil=True)
def select_pair(start: int, stop: int, first: NDArray[np.float32], second: NDArray[np.float32],
                bounds: NDArray[np.float64], combine: bool, mask: NDArray[np.bool_],
                counts: NDArray[np.int64]) -> None:  # pragma: no cover - compiled
    """On the planes ``start <= z < stop``: ``mask`` set where ``bounds[0] <= first <=
    bounds[1]`` and ``bounds[2] <= second <= bounds[3]`` (and, if ``combine``, where it was
    set), compared in float32 as :func:`select_within`; ``counts[z]`` its voxels in plane z."""
    low_a, high_a = np.float32(bounds[0]), np.float32(bounds[1])
    low_b, high_b = np.float32(bounds[2]), np.float32(bounds[3])
    plane = first.shape[1] * first.shape[2]
    flat_a, flat_b = first.reshape(-1), second.reshape(-1)
    flat_mask = mask.reshape(-1).view(np.uint8)
    unset = np.uint8(0 if combine else 1)  # or-ed with the old mask: 1 ignores it
    for z in range(start, stop):
        count = np.int32(0)  # int32 and uint8 arithmetic: the loop vectorises
        values_a, values_b = flat_a[z * plane:(z + 1) * plane], flat_b[z * plane:(z + 1) * plane]
        plane_mask = flat_mask[z * plane:(z + 1) * plane]
        for i in range(plane):
            a, b = values_a[i], values_b[i]
            keep = (np.int32((a >= low_a) & (a <= high_a) & (b >= low_b) & (b <= high_b))
                    & np.int32(plane_mask[i] | unset))
            plane_mask[i] = np.uint8(keep)
            count += keep
        counts[z] = count


@njit(cache=_CACHE, nogil=True)
def sample_pair(start: int, stop: int, first: NDArray[np.float32], second: NDArray[np.float32],
                mask: NDArray[np.bool_], before: NDArray[np.int64], step: int,
                out_first: NDArray[np.float32], out_second: NDArray[np.float32]
                ) -> None:  # pragma: no cover - compiled
    """Every ``step``-th voxel of the mask (from its first), of ``first`` into ``out_first``
    and of ``second`` into ``out_second``, from the planes ``start <= z < stop``; ``before[z]``
    is the number of mask voxels ahead of plane z (:func:`masked_sample` over the planes)."""
    plane = mask.shape[1] * mask.shape[2]
    flat_a, flat_b, flat_mask = first.reshape(-1), second.reshape(-1), mask.reshape(-1)
    words = flat_mask[:flat_mask.size // 8 * 8].view(np.uint64)
    for z in range(start, stop):
        seen = before[z]
        wanted = -(-seen // step) * step  # the first position to take at or after seen
        written = wanted // step
        head = min(-(-z * plane // 8) * 8, (z + 1) * plane)  # the plane's first whole word
        tail = max((z + 1) * plane // 8 * 8, z * plane)  # and the end of its last
        seen, wanted, written = _take_pair(flat_mask, flat_a, flat_b, z * plane, head, step,
                                           out_first, out_second, seen, wanted, written)
        for word in range(head // 8, tail // 8):  # whole words: skipped unless a voxel is due
            count = (words[word] * _BYTE_SUM) >> np.uint64(56)
            if seen + count <= wanted:
                seen += count
                continue
            seen, wanted, written = _take_pair(flat_mask, flat_a, flat_b, word * 8,
                                               word * 8 + 8, step, out_first, out_second,
                                               seen, wanted, written)
        _take_pair(flat_mask, flat_a, flat_b, max(head, tail), (z + 1) * plane, step, out_first,
                   out_second, seen, wanted, written)


@njit(cache=_CACHE, nogil=True, inline="always")
def _take_pair(flat_mask: NDArray[np.bool_], flat_a: NDArray[np.float32],
               flat_b: NDArray[np.float32], start: int, stop: int, step: int,
               out_a: NDArray[np.float32], out_b: NDArray[np.float32], seen: int, wanted: int,
               written: int) -> tuple[int, int, int]:  # pragma: no cover - compiled
    """:func:`sample_pair`'s voxel-by-voxel scan of ``[start, stop)``: the updated counts."""
    for i in range(start, stop):
        if flat_mask[i]:
            if seen == wanted:
                out_a[written], out_b[written] = flat_a[i], flat_b[i]
                written += 1
                wanted += step
            seen += 1
    return seen, wanted, written


def masked_mean_std_reference(values: NDArray[np.float32], mask: NDArray[np.bool_]
                              ) -> tuple[float, float]:
    """NumPy twin of :func:`masked_mean_std` (same result up to rounding)."""
    selected = values[mask]
    if selected.size == 0:
        return np.nan, np.nan
    return float(selected.mean(dtype=np.float64)), float(selected.std(dtype=np.float64))


def run_split(kernel: Callable[..., None], length: int, *args: Any) -> None:
    """``kernel(start, stop, *args)`` over ``[0, length)`` in contiguous parts, one per thread.

    As many threads as :func:`numba.get_num_threads` allows (``NUMBA_NUM_THREADS``,
    :func:`numba.set_num_threads`), at most the cores this process may use. The kernels
    release the GIL and each part writes its own planes or rows, so the result does not
    depend on the number of threads.
    """
    import numba

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
