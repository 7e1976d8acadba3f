"""The numba kernels agree with their plain-NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from demhx import _kernels

CUBE = 8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _corners(rng: np.random.Generator, padded_shape: tuple[int, int, int], count: int
             ) -> np.ndarray:
    highs = [n - CUBE + 1 for n in padded_shape]
    corners = np.stack([rng.integers(0, high, count) for high in highs], axis=1)
    return np.ascontiguousarray(corners, dtype=np.int64)


def test_extract_matches_reference(rng: np.random.Generator) -> None:
    padded = rng.standard_normal((13, 17, 11)).astype(np.float32)
    corners = _corners(rng, padded.shape, 9)
    fast = np.full((4, 1, CUBE, CUBE, CUBE), -1.0, dtype=np.float32)
    slow = fast.copy()
    for first in (0, 4, 8):
        count = min(4, 9 - first)
        _kernels.extract_cubes(padded, corners, first, count, fast)
        _kernels.extract_cubes_reference(padded, corners, first, count, slow)
        np.testing.assert_array_equal(fast, slow)


def test_extract_leaves_unused_batch_entries(rng: np.random.Generator) -> None:
    padded = rng.standard_normal((CUBE, CUBE, CUBE)).astype(np.float32)
    corners = np.zeros((1, 3), dtype=np.int64)
    batch = np.full((3, 1, CUBE, CUBE, CUBE), 5.0, dtype=np.float32)
    _kernels.extract_cubes(padded, corners, 0, 1, batch)
    np.testing.assert_array_equal(batch[0, 0], padded)
    assert np.all(batch[1:] == 5.0)


def test_accumulate_matches_reference(rng: np.random.Generator) -> None:
    shape = (12, 19, 10)
    corners = _corners(rng, shape, 7)
    predictions = rng.standard_normal((7, 1, CUBE, CUBE, CUBE)).astype(np.float32)
    weights = rng.uniform(0.01, 1.0, (CUBE, CUBE, CUBE)).astype(np.float32)
    sums = [np.zeros(shape, np.float32) for _ in range(4)]
    for first in (0, 3, 6):
        count = min(3, 7 - first)
        block = np.ascontiguousarray(predictions[first:first + count])
        _kernels.accumulate_cubes(block, corners, first, count, weights, sums[0], sums[1])
        _kernels.accumulate_cubes_reference(block, corners, first, count, weights, sums[2],
                                            sums[3])
    np.testing.assert_allclose(sums[0], sums[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sums[1], sums[3])
    assert sums[1].max() > 0


def test_accumulate_weight_sum_counts_overlaps() -> None:
    corners = np.array([[0, 0, 0], [2, 0, 0]], dtype=np.int64)
    predictions = np.ones((2, 1, CUBE, CUBE, CUBE), np.float32)
    weights = np.ones((CUBE, CUBE, CUBE), np.float32)
    accumulator = np.zeros((CUBE + 2, CUBE, CUBE), np.float32)
    weight_sum = np.zeros_like(accumulator)
    _kernels.accumulate_cubes(predictions, corners, 0, 2, weights, accumulator, weight_sum)
    np.testing.assert_array_equal(weight_sum[:, 0, 0], [1, 1, 2, 2, 2, 2, 2, 2, 1, 1])
    np.testing.assert_array_equal(accumulator, weight_sum)


def test_accumulate_weighted_matches_reference_and_accumulate_cubes(
        rng: np.random.Generator) -> None:
    shape = (11, 14, 17)
    corners = _corners(rng, shape, 6)
    values = rng.uniform(0.0, 2.0, (6, 1, CUBE, CUBE, CUBE)).astype(np.float32)
    weights = rng.uniform(0.01, 1.0, (CUBE, CUBE, CUBE)).astype(np.float32)
    fast, slow, blended, weight_sum = (np.zeros(shape, np.float32) for _ in range(4))
    for first in (0, 4):
        count = min(4, 6 - first)
        block = np.ascontiguousarray(values[first:first + count])
        _kernels.accumulate_weighted(block, corners, first, count, weights, fast)
        _kernels.accumulate_weighted_reference(block, corners, first, count, weights, slow)
        _kernels.accumulate_cubes(block, corners, first, count, weights, blended, weight_sum)
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(fast, blended)
    assert fast.max() > 0


def test_cube_abs_max_matches_reference(rng: np.random.Generator) -> None:
    padded = rng.standard_normal((16, 9, 20)).astype(np.float32)
    padded[3, 4, 5] = -40.0
    corners = _corners(rng, padded.shape, 12)
    fast = np.empty(12, np.float32)
    slow = np.empty(12, np.float32)
    _kernels.cube_abs_max(padded, corners, CUBE, fast)
    _kernels.cube_abs_max_reference(padded, corners, CUBE, slow)
    np.testing.assert_array_equal(fast, slow)


def test_disk_cache_is_skipped_where_nothing_is_writable(monkeypatch) -> None:
    from demhx import _kernels

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(_kernels.os, "access", lambda path, mode: False)
    assert _kernels._disk_cache_usable() is False
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    assert _kernels._disk_cache_usable() is True
