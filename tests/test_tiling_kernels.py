"""The tiling kernels added for speed agree bit for bit with their NumPy references, and with
the kernels they fuse (cube order kept, so the blend is independent of the batch size)."""

from __future__ import annotations

import numpy as np
import pytest

from demhx import _kernels
from demhx.refine import COUNT_DTYPE, predicted_cc

CUBE = 8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def _lattice_corners(rng: np.random.Generator, grid: tuple[int, int, int], stride: int,
                     keep: float = 0.7) -> np.ndarray:
    """Corners on a lattice in cube order (z, then y, then x), some of them left out."""
    points = np.argwhere(rng.uniform(size=grid) < keep) * stride
    return np.ascontiguousarray(points, dtype=np.int64)


@pytest.mark.parametrize("window", ["ones", "random"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_accumulate_blend_is_the_two_kernels_bit_for_bit(
        rng: np.random.Generator, window: str, batch: int) -> None:
    stride, sample = 3, 2
    grid = (4, 3, 5)
    corners = _lattice_corners(rng, grid, stride)
    shape = tuple(CUBE + (n - 1) * stride + extra for n, extra in zip(grid, (1, 0, 2),
                                                                    strict=True))
    values = rng.standard_normal((len(corners), 1, CUBE, CUBE, CUBE)).astype(np.float32)
    weights = (np.ones((CUBE,) * 3, np.float32) if window == "ones"
               else rng.uniform(0.05, 1.0, (CUBE,) * 3).astype(np.float32))
    sampled = tuple(-(-n // sample) for n in shape)
    fused = (np.zeros(shape, np.float32), np.zeros(sampled, np.float32),
             np.zeros(sampled, COUNT_DTYPE))
    apart = tuple(np.zeros_like(array) for array in fused)
    slow = tuple(np.zeros_like(array) for array in fused)
    for first in range(0, len(corners), batch):
        count = min(batch, len(corners) - first)
        block = np.ascontiguousarray(values[first:first + count])
        _kernels.accumulate_blend(block, corners, first, count, weights, fused[0], sample,
                                  fused[1], fused[2])
        _kernels.accumulate_weighted(block, corners, first, count, weights, apart[0])
        _kernels.accumulate_sampled_squares(block, corners, first, count, sample, apart[1],
                                            apart[2])
        _kernels.accumulate_weighted_reference(block, corners, first, count, weights, slow[0])
        _kernels.accumulate_sampled_squares_reference(block, corners, first, count, sample,
                                                      slow[1], slow[2])
    for one, two, three in zip(fused, apart, slow, strict=True):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)  # same additions in the same order
    assert fused[2].max() >= 2


def test_accumulation_does_not_depend_on_the_batch_size(rng: np.random.Generator) -> None:
    corners = _lattice_corners(rng, (3, 4, 3), 2, keep=1.0)
    values = rng.standard_normal((len(corners), 1, CUBE, CUBE, CUBE)).astype(np.float32)
    weights = rng.uniform(0.05, 1.0, (CUBE,) * 3).astype(np.float32)
    sums = []
    for batch in (1, 5, len(corners)):
        accumulator = np.zeros((CUBE + 4, CUBE + 6, CUBE + 4), np.float32)
        for first in range(0, len(corners), batch):
            count = min(batch, len(corners) - first)
            _kernels.accumulate_weighted(np.ascontiguousarray(values[first:first + count]),
                                         corners, first, count, weights, accumulator)
        sums.append(accumulator)
    np.testing.assert_array_equal(sums[0], sums[1])
    np.testing.assert_array_equal(sums[0], sums[2])


@pytest.mark.parametrize("window", ["ones", "random"])
@pytest.mark.parametrize("offset", [(0, 0, 0), (1, 2, 0), (3, 0, 2)])
def test_divide_into_is_the_cropped_division(rng: np.random.Generator, window: str,
                                             offset: tuple[int, int, int]) -> None:
    stride = 3
    ran = (rng.uniform(size=(3, 4, 3)) < 0.6).astype(np.uint8)
    shape = tuple(CUBE + (n - 1) * stride for n in ran.shape)
    weights = (np.ones((CUBE,) * 3, np.float32) if window == "ones"
               else rng.uniform(0.05, 1.0, (CUBE,) * 3).astype(np.float32))
    values = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    box = tuple(n - start - 1 for n, start in zip(shape, offset, strict=True))
    out = np.full(box, np.nan, np.float32)
    _kernels.divide_into(values, ran, stride, weights, -3.0, *offset, out)
    whole = values.copy()
    _kernels.divide_by_window_sum_reference(whole, ran, stride, weights, -3.0)
    region = tuple(slice(start, start + n) for start, n in zip(offset, box, strict=True))
    np.testing.assert_array_equal(out, whole[region])
    in_place = values.copy()
    _kernels.divide_by_window_sum(in_place, ran, stride, weights, -3.0)
    np.testing.assert_array_equal(in_place, whole)
    assert np.any(whole == -3.0)


def test_cube_abs_max_passes_over_nans_and_keeps_infinities(rng: np.random.Generator) -> None:
    padded = rng.standard_normal((12, 10, 9)).astype(np.float32)
    padded[1, 2, 3] = np.nan
    padded[9, 9, 8] = -np.inf
    padded[0, 0, 0] = -0.0
    corners = np.array([[0, 0, 0], [4, 2, 1], [2, 2, 1], [0, 0, 0]], dtype=np.int64)
    fast, slow = np.empty(4, np.float32), np.empty(4, np.float32)
    _kernels.cube_abs_max(padded, corners, CUBE, fast)
    _kernels.cube_abs_max_reference(np.where(np.isnan(padded), 0, padded), corners, CUBE, slow)
    np.testing.assert_array_equal(fast, slow)
    assert fast[1] == np.inf
    zeros = np.zeros((CUBE,) * 3, np.float32)
    zeros[0, 0, 0] = -0.0
    _kernels.cube_abs_max(zeros, corners[:1], CUBE, fast)
    assert fast[0] == 0.0 and not np.signbit(fast[0])


@pytest.mark.parametrize("background", [0.0, 0.7])
def test_overlap_sums_match_reference_on_strided_views(rng: np.random.Generator,
                                                       background: float) -> None:
    accumulator = rng.standard_normal((21, 18, 25)).astype(np.float32)
    counts = rng.integers(0, 5, (10, 9, 12)).astype(COUNT_DTYPE)
    squares = (rng.uniform(0, 3, counts.shape) * counts).astype(np.float32)
    sums = accumulator[1::2, 0::2, 1::2][:10, :9, :12]  # a strided view, as the refinement
    fast, slow = np.empty(5), np.empty(5)
    _kernels.overlap_sums(sums, squares, counts, background, fast)
    _kernels.overlap_sums_reference(sums, squares, counts, background, slow)
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    flat = predicted_cc(np.ravel(sums), squares.ravel(), counts.ravel(), background)
    assert predicted_cc(sums, squares, counts, background) == pytest.approx(flat, rel=1e-12)


@pytest.mark.parametrize("batch", [7, 300])
def test_counts_of_300_cubes_over_a_voxel_match_the_reference(rng: np.random.Generator,
                                                              batch: int) -> None:
    """300 cubes over the same voxels: the kernels count 300 there (not 300 - 256 = 44 as
    a byte did), as the NumPy twins and a brute-force count do, and the self-check's sums
    over those counts agree with their reference."""
    sample, covers = 2, 300
    shape = (CUBE + 3, CUBE + 2, CUBE + 3)
    corners = np.ascontiguousarray(rng.integers(0, 3, (covers, 3)), dtype=np.int64)
    values = rng.standard_normal((covers, 1, CUBE, CUBE, CUBE)).astype(np.float32)
    weights = np.ones((CUBE,) * 3, np.float32)
    sampled = tuple(-(-n // sample) for n in shape)
    fused = (np.zeros(shape, np.float32), np.zeros(sampled, np.float32),
             np.zeros(sampled, COUNT_DTYPE))
    slow = tuple(np.zeros_like(array) for array in fused)
    for first in range(0, covers, batch):
        count = min(batch, covers - first)
        block = np.ascontiguousarray(values[first:first + count])
        _kernels.accumulate_blend(block, corners, first, count, weights, fused[0], sample,
                                  fused[1], fused[2])
        _kernels.accumulate_weighted_reference(block, corners, first, count, weights, slow[0])
        _kernels.accumulate_sampled_squares_reference(block, corners, first, count, sample,
                                                      slow[1], slow[2])
    brute = np.zeros(shape, np.int64)
    for z, y, x in corners.tolist():
        brute[z:z + CUBE, y:y + CUBE, x:x + CUBE] += 1
    np.testing.assert_array_equal(fused[2], brute[::sample, ::sample, ::sample])
    np.testing.assert_array_equal(fused[2], slow[2])
    assert fused[2].max() == covers
    np.testing.assert_array_equal(fused[0], slow[0])
    np.testing.assert_allclose(fused[1], slow[1], rtol=1e-6)
    sums = fused[0][::sample, ::sample, ::sample]
    fast, reference = np.empty(5), np.empty(5)
    _kernels.overlap_sums(sums, fused[1], fused[2], 0.0, fast)
    _kernels.overlap_sums_reference(sums, fused[1], brute[::sample, ::sample, ::sample], 0.0,
                                    reference)
    np.testing.assert_allclose(fast, reference, rtol=1e-12)
