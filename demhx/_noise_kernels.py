"""Numba kernels of the noise estimation (:mod:`demhx._solvent`): the box filter of the local
statistics and the masked reductions over a volume.

They take C-contiguous float32 volumes, bool masks of the same shape and plain numbers, and
write into preallocated outputs. Every kernel has a plain-NumPy twin (``*_reference``) with
the same arguments, which the tests compare it against. Like the tiling kernels
(:mod:`demhx._kernels`, which re-exports these) they release the GIL and are cached on disk
where :mod:`demhx._jit` finds a writable place.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

from demhx._jit import CACHE as _CACHE

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
