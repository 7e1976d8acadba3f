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
    current = source
    if window_z > 1:
        _box_planes(current, window_z, out)
        current = out
    if window_y > 1:
        for z in range(source.shape[0]):
            _box_rows(current[z], window_y, out[z])
        current = out
    if window_x > 1:
        _box_lines(current, window_x, out)
    elif window_z == 1 and window_y == 1:  # no pass ran: copy
        out[...] = source


@njit(cache=_CACHE, nogil=True)
def _mirror(index: int, length: int) -> int:  # pragma: no cover - compiled
    """``index`` folded into ``[0, length)`` by mirroring about the ends (period ``2 length``)."""
    index %= 2 * length
    return index if index < length else 2 * length - 1 - index


@njit(cache=_CACHE, nogil=True)
def _box_planes(source: NDArray[np.float32], window: int,
                out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """The z pass of :func:`box_mean`, streaming planes (``out`` may be ``source``).

    The running sum is a (Y, X) float64 plane; the source planes still needed after ``out``
    overwrites them are kept, in float64, in a ring of ``window + 1`` planes.
    """
    depth, rows, columns = source.shape
    before = window // 2
    slots = window + 1
    ring = np.empty((slots, rows, columns))
    total = np.zeros((rows, columns))
    loaded = 0  # source planes 0 .. loaded - 1 have been copied into the ring
    for step in range(depth + window - 1):
        entering = _mirror(step - before, depth)
        while loaded <= entering:
            _copy_plane(source[loaded], ring[loaded % slots])
            loaded += 1
        new = ring[entering % slots]
        if step < window:  # the first window: sum its planes in order
            for y in range(rows):
                for x in range(columns):
                    total[y, x] += new[y, x]
            if step == window - 1:
                for y in range(rows):
                    for x in range(columns):
                        out[0, y, x] = total[y, x] / window
            continue
        old = ring[_mirror(step - window - before, depth) % slots]
        plane = step - window + 1
        for y in range(rows):
            for x in range(columns):
                total[y, x] += new[y, x] - old[y, x]
                out[plane, y, x] = total[y, x] / window


@njit(cache=_CACHE, nogil=True)
def _copy_plane(source: NDArray[np.float32], target: NDArray[np.float64]
                ) -> None:  # pragma: no cover - compiled
    """``target[...] = source`` for two (Y, X) planes (float32 into float64)."""
    for y in range(source.shape[0]):
        for x in range(source.shape[1]):
            target[y, x] = source[y, x]


@njit(cache=_CACHE, nogil=True)
def _box_rows(plane: NDArray[np.float32], window: int, out: NDArray[np.float32]
              ) -> None:  # pragma: no cover
    """The y pass of :func:`box_mean` on one (Y, X) plane (``out`` may be ``plane``)."""
    rows, columns = plane.shape
    before = window // 2
    block = np.empty((rows + window - 1, columns))
    for e in range(rows + window - 1):
        row = _mirror(e - before, rows)
        for x in range(columns):
            block[e, x] = plane[row, x]
    total = np.zeros(columns)
    for e in range(window):
        for x in range(columns):
            total[x] += block[e, x]
    for x in range(columns):
        out[0, x] = total[x] / window
    for row in range(1, rows):
        for x in range(columns):
            total[x] += block[row - 1 + window, x] - block[row - 1, x]
            out[row, x] = total[x] / window


@njit(cache=_CACHE, nogil=True)
def _box_lines(source: NDArray[np.float32], window: int,
               out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """The x pass of :func:`box_mean`, one line at a time (``out`` may be ``source``)."""
    depth, rows, columns = source.shape
    before = window // 2
    line = np.empty(columns + window - 1)
    for z in range(depth):
        for y in range(rows):
            for e in range(before):
                line[e] = source[z, y, _mirror(e - before, columns)]
            for x in range(columns):
                line[before + x] = source[z, y, x]
            for e in range(before + columns, columns + window - 1):
                line[e] = source[z, y, _mirror(e - before, columns)]
            total = 0.0
            for e in range(window):
                total += line[e]
            out[z, y, 0] = total / window
            for x in range(1, columns):
                total += line[x - 1 + window] - line[x - 1]
                out[z, y, x] = total / window


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
    values, means, stds = volume.reshape(-1), local_mean.reshape(-1), local_std.reshape(-1)
    shift = np.float32(centre)
    for i in range(values.size):
        centred = values[i] - shift
        means[i] = centred
        stds[i] = centred * centred
    box_mean(local_mean, window_z, window_y, window_x, local_mean)
    box_mean(local_std, window_z, window_y, window_x, local_std)
    for i in range(values.size):
        variance = stds[i] - means[i] * means[i]
        stds[i] = np.sqrt(variance) if variance > 0 else np.float32(0.0)


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
        seen, wanted, written = _take_every_step(flat_values, flat_mask, word * 8,
                                                 word * 8 + 8, step, out, seen, wanted,
                                                 written)
    # the voxels after the last whole word
    seen, wanted, written = _take_every_step(flat_values, flat_mask, words.size * 8,
                                             flat_mask.size, step, out, seen, wanted, written)
    return written


@njit(cache=_CACHE, nogil=True, inline="always")
def _take_every_step(flat_values: NDArray[np.float32], flat_mask: NDArray[np.bool_], start: int,
                     stop: int, step: int, out: NDArray[np.float32], seen: int, wanted: int,
                     written: int) -> tuple[int, int, int]:  # pragma: no cover - compiled
    """:func:`masked_sample`'s voxel-by-voxel scan of ``[start, stop)``: the updated counts."""
    for i in range(start, stop):
        if flat_mask[i]:
            if seen == wanted:
                out[written] = flat_values[i]
                written += 1
                wanted += step
            seen += 1
    return seen, wanted, written


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

    Two passes: the mean, then the mean squared deviation from it; (nan, nan) for an empty
    mask. Summed in float64 in voxel order, so it differs from NumPy's pairwise sums only by
    rounding (relative 1e-12 on 10⁷ voxels).
    """
    flat_values, flat_mask = values.reshape(-1), mask.reshape(-1)
    total = 0.0
    count = 0
    for i in range(flat_values.size):  # adding 0.0 off the mask: branch-free, same sums
        total += flat_values[i] if flat_mask[i] else 0.0
        count += flat_mask[i]
    if count == 0:
        return np.nan, np.nan
    mean = total / count
    squares = 0.0
    for i in range(flat_values.size):
        deviation = flat_values[i] - mean if flat_mask[i] else 0.0
        squares += deviation * deviation
    return mean, np.sqrt(squares / count)


def masked_mean_std_reference(values: NDArray[np.float32], mask: NDArray[np.bool_]
                              ) -> tuple[float, float]:
    """NumPy twin of :func:`masked_mean_std` (same result up to rounding)."""
    selected = values[mask]
    if selected.size == 0:
        return np.nan, np.nan
    return float(selected.mean(dtype=np.float64)), float(selected.std(dtype=np.float64))
