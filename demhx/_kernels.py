"""Numba kernels: cube extraction, solvent test and overlap-add of the tiled inference, and
the box filter and masked reductions of the noise estimation (:mod:`demhx.normalise`).

Each tiling kernel takes C-contiguous float32 arrays, an ``(n, 3)`` int64 array of cube corners
``(z, y, x)`` in the padded volume (or the grid of cubes that ran) and plain ints; it writes
into preallocated outputs and allocates at most small per-axis tables. The noise-estimation
kernels take C-contiguous float32 volumes, bool masks of the same shape and plain numbers.
Every kernel has a plain-NumPy twin (``*_reference``) with the same arguments, which the tests
compare it against.

The kernels release the GIL (``nogil=True``) so that extraction, inference and accumulation
can run in separate threads; they are compiled on first use and cached on disk, so only the
very first run of an installation pays the compilation. Where no cache location is writable
(read-only install and no writable home, as in some containers) they are compiled in memory
on each run instead of failing at import; ``NUMBA_CACHE_DIR`` names a cache folder explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numba import njit


def _disk_cache_usable() -> bool:
    """Whether numba can keep compiled kernels on disk (beside this file or in the home)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    here = Path(__file__).resolve().parent
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    writable_home = os.access(home if home.exists() else home.parent, os.W_OK)
    return os.access(here, os.W_OK) or writable_home


_CACHE = _disk_cache_usable()
_BYTE_SUM = np.uint64(0x0101010101010101)  # times a word of 0/1 bytes: their sum in the top byte


@njit(cache=_CACHE, nogil=True)
def extract_cubes(padded: np.ndarray, corners: np.ndarray, first: int, count: int,
                  batch: np.ndarray) -> None:  # pragma: no cover - compiled
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


def extract_cubes_reference(padded: np.ndarray, corners: np.ndarray, first: int, count: int,
                            batch: np.ndarray) -> None:
    """NumPy twin of :func:`extract_cubes` (same arguments, same result)."""
    size = batch.shape[2]
    for index in range(count):
        z0, y0, x0 = (int(value) for value in corners[first + index])
        batch[index, 0] = padded[z0:z0 + size, y0:y0 + size, x0:x0 + size]


@njit(cache=_CACHE, nogil=True)
def accumulate_weighted(values: np.ndarray, corners: np.ndarray, first: int, count: int,
                        weights: np.ndarray, accumulator: np.ndarray
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


def accumulate_weighted_reference(values: np.ndarray, corners: np.ndarray, first: int,
                                  count: int, weights: np.ndarray,
                                  accumulator: np.ndarray) -> None:
    """NumPy twin of :func:`accumulate_weighted` (same arguments, same result)."""
    size = weights.shape[0]
    for index in range(count):
        z0, y0, x0 = (int(value) for value in corners[first + index])
        region = (slice(z0, z0 + size), slice(y0, y0 + size), slice(x0, x0 + size))
        accumulator[region] += values[index, 0] * weights


@njit(cache=_CACHE, nogil=True)
def accumulate_sampled_squares(values: np.ndarray, corners: np.ndarray, first: int, count: int,
                               sample: int, squares: np.ndarray, counts: np.ndarray
                               ) -> None:  # pragma: no cover - compiled
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


def accumulate_sampled_squares_reference(values: np.ndarray, corners: np.ndarray, first: int,
                                         count: int, sample: int, squares: np.ndarray,
                                         counts: np.ndarray) -> None:
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
def cube_abs_max(padded: np.ndarray, corners: np.ndarray, size: int,
                 out: np.ndarray) -> None:  # pragma: no cover - compiled
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


def cube_abs_max_reference(padded: np.ndarray, corners: np.ndarray, size: int,
                           out: np.ndarray) -> None:
    """NumPy twin of :func:`cube_abs_max` (same arguments, same result)."""
    for index, (z0, y0, x0) in enumerate(corners.tolist()):
        cube = padded[z0:z0 + size, y0:y0 + size, x0:x0 + size]
        out[index] = np.abs(cube).max()


@njit(cache=_CACHE, nogil=True)
def divide_by_window_sum(values: np.ndarray, ran: np.ndarray, stride: int, weights: np.ndarray,
                         fill: float) -> None:  # pragma: no cover - compiled
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
def _used(ran: np.ndarray, axis: int) -> np.ndarray:  # pragma: no cover - compiled
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
              used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
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


def divide_by_window_sum_reference(values: np.ndarray, ran: np.ndarray, stride: int,
                                   weights: np.ndarray, fill: float) -> None:
    """NumPy twin of :func:`divide_by_window_sum` (same arguments, same result)."""
    size = weights.shape[0]
    total = np.zeros(values.shape, dtype=np.float32)
    for i, j, k in np.argwhere(ran != 0).tolist():  # cube order, as the sums were made
        z0, y0, x0 = i * stride, j * stride, k * stride
        total[z0:z0 + size, y0:y0 + size, x0:x0 + size] += weights
    covered = total > 0
    values[...] = np.where(covered, values / np.where(covered, total, 1), fill)


# --------------------------------------------------------------------------- noise estimation


@njit(cache=_CACHE, nogil=True)
def box_mean(source: np.ndarray, window_z: int, window_y: int, window_x: int,
             out: np.ndarray) -> None:  # pragma: no cover - compiled
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
def _box_planes(source: np.ndarray, window: int,
                out: np.ndarray) -> None:  # pragma: no cover - compiled
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
def _copy_plane(source: np.ndarray, target: np.ndarray) -> None:  # pragma: no cover - compiled
    """``target[...] = source`` for two (Y, X) planes (float32 into float64)."""
    for y in range(source.shape[0]):
        for x in range(source.shape[1]):
            target[y, x] = source[y, x]


@njit(cache=_CACHE, nogil=True)
def _box_rows(plane: np.ndarray, window: int, out: np.ndarray) -> None:  # pragma: no cover
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
def _box_lines(source: np.ndarray, window: int,
               out: np.ndarray) -> None:  # pragma: no cover - compiled
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


def box_mean_reference(source: np.ndarray, window_z: int, window_y: int, window_x: int,
                       out: np.ndarray) -> None:
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
def local_moments(volume: np.ndarray, centre: float, window_z: int, window_y: int,
                  window_x: int, local_mean: np.ndarray,
                  local_std: np.ndarray) -> None:  # pragma: no cover - compiled
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


def local_moments_reference(volume: np.ndarray, centre: float, window_z: int, window_y: int,
                            window_x: int, local_mean: np.ndarray,
                            local_std: np.ndarray) -> None:
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
def select_within(values: np.ndarray, lower: float, upper: float,
                  mask: np.ndarray) -> int:  # pragma: no cover - compiled
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


def select_within_reference(values: np.ndarray, lower: float, upper: float,
                            mask: np.ndarray) -> int:
    """NumPy twin of :func:`select_within` (same arguments, same result)."""
    mask &= (values >= lower) & (values <= upper)
    return int(np.count_nonzero(mask))


@njit(cache=_CACHE, nogil=True)
def masked_sample(values: np.ndarray, mask: np.ndarray, step: int,
                  out: np.ndarray) -> int:  # pragma: no cover - compiled
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
def _take_every_step(flat_values: np.ndarray, flat_mask: np.ndarray, start: int, stop: int,
                     step: int, out: np.ndarray, seen: int, wanted: int, written: int
                     ) -> tuple[int, int, int]:  # pragma: no cover - compiled
    """:func:`masked_sample`'s voxel-by-voxel scan of ``[start, stop)``: the updated counts."""
    for i in range(start, stop):
        if flat_mask[i]:
            if seen == wanted:
                out[written] = flat_values[i]
                written += 1
                wanted += step
            seen += 1
    return seen, wanted, written


def masked_sample_reference(values: np.ndarray, mask: np.ndarray, step: int,
                            out: np.ndarray) -> int:
    """NumPy twin of :func:`masked_sample` (same arguments, same result)."""
    sample = values[mask][::step]
    out[:sample.size] = sample
    return int(sample.size)


@njit(cache=_CACHE, nogil=True)
def masked_mean_std(values: np.ndarray, mask: np.ndarray
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


def masked_mean_std_reference(values: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """NumPy twin of :func:`masked_mean_std` (same result up to rounding)."""
    selected = values[mask]
    if selected.size == 0:
        return np.nan, np.nan
    return float(selected.mean(dtype=np.float64)), float(selected.std(dtype=np.float64))
