"""The noise-estimation kernels split between threads (z_moments, plane_moments, select_pair,
sample_pair, plane_sums) and the sample statistics of demhx.normalise, each against a plain
NumPy/SciPy twin on small synthetic volumes."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from demhx import _kernels, normalise

_SHAPES = [(1, 1, 1), (2, 3, 4), (5, 6, 7), (9, 8, 3), (13, 4, 11), (6, 21, 17)]
_WINDOWS = [(1, 1, 1), (3, 3, 3), (7, 5, 3), (2, 4, 1), (1, 9, 12), (12, 2, 7)]


def _moments_reference(volume: np.ndarray, centre: float, window: tuple[int, int, int]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's uniform filter of the centred values and their squares (float32 throughout)."""
    centred = volume - np.float32(centre)
    mean = ndimage.uniform_filter(centred, window, mode="reflect")
    squares = ndimage.uniform_filter(centred * centred, window, mode="reflect")
    variance = squares - mean * mean
    return mean, np.where(variance > 0, np.sqrt(np.maximum(variance, 0)), np.float32(0))


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("window", _WINDOWS)
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_moments_equal_scipy_bit_for_bit(shape: tuple[int, int, int],
                                               window: tuple[int, int, int], parts: int) -> None:
    rng = np.random.default_rng(sum(shape) + 7 * sum(window))
    volume = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    mean, std = np.empty_like(volume), np.empty_like(volume)
    for kernel, length, args in ((_kernels.z_moments, shape[1], (volume, 1.5, window[0])),
                                 (_kernels.plane_moments, shape[0], window[1:])):
        bounds = [length * k // parts for k in range(parts + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            kernel(start, stop, *args, mean, std)
    expected = _moments_reference(volume, 1.5, window)
    np.testing.assert_array_equal(mean, expected[0])
    np.testing.assert_array_equal(std, expected[1])
    whole = np.empty_like(volume), np.empty_like(volume)
    _kernels.local_moments(volume, 1.5, *window, *whole)
    np.testing.assert_array_equal(whole[0], mean)
    np.testing.assert_array_equal(whole[1], std)


def test_local_moments_threads_do_not_change_the_result() -> None:
    rng = np.random.default_rng(3)
    volume = rng.standard_normal((17, 19, 23)).astype(np.float32)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            results.append(normalise._local_moments(volume, (5, 7, 3)))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for first, second in zip(*results, strict=True):
        np.testing.assert_array_equal(first, second)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), combine=st.booleans(), lower=st.floats(-2, 0.5),
       width=st.floats(0, 3))
def test_select_pair_matches_numpy(seed: int, combine: bool, lower: float, width: float) -> None:
    rng = np.random.default_rng(seed)
    first, second = (rng.standard_normal((5, 7, 9)).astype(np.float32) for _ in range(2))
    second[0, 0, :2] = np.nan
    old = rng.uniform(size=first.shape) < 0.6
    bounds = np.array([lower, lower + width, -1.0, 0.1])  # 0.1: rounded to float32
    mask, counts = old.copy(), np.empty(first.shape[0], np.int64)
    _kernels.select_pair(0, 2, first, second, bounds, combine, mask, counts)
    _kernels.select_pair(2, 5, first, second, bounds, combine, mask, counts)
    expected = ((first >= bounds[0]) & (first <= bounds[1]) & (second >= bounds[2])
                & (second <= bounds[3]))
    if combine:
        expected &= old
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(counts, expected.reshape(5, -1).sum(axis=1))


@pytest.mark.parametrize("step", [1, 2, 7, 64])
@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(9, 10, 13), (4, 3, 5), (3, 8, 8)])
def test_sample_pair_matches_numpy(step: int, fraction: float,
                                   shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(step)
    first, second = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    mask = rng.uniform(size=shape) < fraction
    before = np.concatenate([[0], np.cumsum(mask.reshape(shape[0], -1).sum(axis=1))])
    size = -(-int(before[-1]) // step)
    out = np.full((2, size + 1), -9, np.float32)
    for start, stop in ((0, 1), (1, shape[0])):
        _kernels.sample_pair(start, stop, first, second, mask, before, step, out[0],
                                   out[1])
    np.testing.assert_array_equal(out[0, :size], first[mask][::step])
    np.testing.assert_array_equal(out[1, :size], second[mask][::step])
    assert (out[:, size] == -9).all()


def test_plane_sums_and_mean_std_match_numpy() -> None:
    rng = np.random.default_rng(4)
    values = (rng.standard_normal((12, 13, 14)) * 0.1 + 3).astype(np.float32)
    mask = rng.uniform(size=values.shape) < 0.4
    sums = np.empty(12)
    _kernels.plane_sums(0, 5, values, mask, 0.5, True, sums)
    _kernels.plane_sums(5, 12, values, mask, 0.5, True, sums)
    expected = [((values[z][mask[z]].astype(np.float64) - 0.5) ** 2).sum() for z in range(12)]
    np.testing.assert_allclose(sums, expected, rtol=1e-12)
    before = np.concatenate([[0], np.cumsum(mask.reshape(12, -1).sum(axis=1))])
    split = normalise._mean_std(values, (mask, before))
    assert split == _kernels.masked_mean_std(values, mask)  # same sums, same order
    np.testing.assert_allclose(split, _kernels.masked_mean_std_reference(values, mask),
                               rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), size=st.integers(1, 3000), ties=st.booleans())
def test_median_is_numpys(seed: int, size: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(size) * 10).astype(np.float32)
    if ties:
        values = np.round(values)
    assert normalise._median(values).tobytes() == np.float32(np.median(values)).tobytes()


@pytest.mark.parametrize("size", [5, 20000, 200001, 1 << 20])
@pytest.mark.parametrize("kind", ["normal", "integers", "zeros", "huge tail", "plateau"])
@pytest.mark.parametrize("quantile", [0.9999, 0.999, 0.95])
def test_top_quantile_is_numpys(size: int, kind: str, quantile: float) -> None:
    rng = np.random.default_rng(size)
    values = (rng.standard_normal(size) * 7 + 1).astype(np.float32)
    if kind == "integers":
        values = np.round(values)
    elif kind == "zeros":
        values[::3] = 0
    elif kind == "huge tail":
        values[-100:] = np.float32(1e30)
    elif kind == "plateau":
        values[size // 2:size // 2 + size // 500] = 50
    fast, slow = normalise.top_quantile(values, quantile), np.quantile(values, quantile)
    assert type(fast) is type(slow) and fast.tobytes() == slow.tobytes()
    values[size // 3] = np.nan
    assert np.isnan(normalise.top_quantile(values, quantile))
