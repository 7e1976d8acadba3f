"""The numba kernels agree with their plain-NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from demhx import _kernels
from demhx.refine import COUNT_DTYPE

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


def test_accumulate_weighted_matches_reference(rng: np.random.Generator) -> None:
    shape = (12, 19, 10)
    corners = _corners(rng, shape, 7)
    values = rng.standard_normal((7, 1, CUBE, CUBE, CUBE)).astype(np.float32)
    weights = rng.uniform(0.01, 1.0, (CUBE, CUBE, CUBE)).astype(np.float32)
    fast, slow = (np.zeros(shape, np.float32) for _ in range(2))
    for first in (0, 3, 6):
        count = min(3, 7 - first)
        block = np.ascontiguousarray(values[first:first + count])
        _kernels.accumulate_weighted(block, corners, first, count, weights, fast)
        _kernels.accumulate_weighted_reference(block, corners, first, count, weights, slow)
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6)
    assert np.abs(fast).max() > 0


def test_accumulate_weighted_counts_overlaps() -> None:
    corners = np.array([[0, 0, 0], [2, 0, 0]], dtype=np.int64)
    ones = np.ones((2, 1, CUBE, CUBE, CUBE), np.float32)
    accumulator = np.zeros((CUBE + 2, CUBE, CUBE), np.float32)
    _kernels.accumulate_weighted(ones, corners, 0, 2, np.ones((CUBE,) * 3, np.float32),
                                 accumulator)
    np.testing.assert_array_equal(accumulator[:, 0, 0], [1, 1, 2, 2, 2, 2, 2, 2, 1, 1])


def _window_grid(rng: np.random.Generator, stride: int, grid: tuple[int, int, int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random run/skip grid, a positive separable window and the summed windows."""
    ran = (rng.uniform(size=grid) < 0.6).astype(np.uint8)
    line = rng.uniform(0.05, 1.0, CUBE)
    shape = tuple(CUBE + (n - 1) * stride for n in grid)
    total = np.zeros(shape)
    cube = (line[:, None, None] * line[None, :, None] * line[None, None, :]).astype(np.float32)
    for i, j, k in zip(*np.nonzero(ran), strict=True):
        total[i * stride:i * stride + CUBE, j * stride:j * stride + CUBE,
              k * stride:k * stride + CUBE] += cube
    return ran, cube, total


@pytest.mark.parametrize("stride", [2, 3, 4, 6, 8])
def test_divide_by_window_sum_matches_reference_and_brute_force(
        rng: np.random.Generator, stride: int) -> None:
    ran, weights, total = _window_grid(rng, stride, (3, 4, 2))
    values = rng.uniform(0.5, 2.0, total.shape).astype(np.float32)
    fast, slow = values.copy(), values.copy()
    _kernels.divide_by_window_sum(fast, ran, stride, weights, -7.0)
    _kernels.divide_by_window_sum_reference(slow, ran, stride, weights, -7.0)
    np.testing.assert_array_equal(fast, slow)
    covered = total > 0
    assert covered.any() and not covered.all()
    np.testing.assert_allclose(fast[covered], (values[covered] / total[covered]), rtol=1e-6)
    assert np.all(fast[~covered] == -7.0)


def test_divide_by_window_sum_of_a_constant_blend_is_the_constant(
        rng: np.random.Generator) -> None:
    """Blending a constant prediction gives back the constant (ones bit for bit)."""
    stride = 5
    ran, weights, total = _window_grid(rng, stride, (3, 3, 3))
    corners = np.ascontiguousarray(np.argwhere(ran) * stride, dtype=np.int64)
    for constant in (1.0, 2.5):
        values = np.full((len(corners), 1, CUBE, CUBE, CUBE), constant, np.float32)
        blend = np.zeros(total.shape, np.float32)
        _kernels.accumulate_weighted(values, corners, 0, len(corners), weights, blend)
        _kernels.divide_by_window_sum(blend, ran, stride, weights, 0.0)
        if constant == 1.0:
            assert np.all(blend[total > 0] == 1.0)
        np.testing.assert_allclose(blend[total > 0], constant, rtol=1e-6)
        assert np.all(blend[total == 0] == 0.0)


def test_cube_abs_max_matches_reference(rng: np.random.Generator) -> None:
    padded = rng.standard_normal((16, 9, 20)).astype(np.float32)
    padded[3, 4, 5] = -40.0
    corners = _corners(rng, padded.shape, 12)
    fast = np.empty(12, np.float32)
    slow = np.empty(12, np.float32)
    _kernels.cube_abs_max(padded, corners, CUBE, fast)
    _kernels.cube_abs_max_reference(padded, corners, CUBE, slow)
    np.testing.assert_array_equal(fast, slow)


def test_disk_cache_is_skipped_where_nothing_is_writable(monkeypatch, tmp_path) -> None:
    from demhx import _jit

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(_jit.os, "access", lambda path, mode: path == str(tmp_path))
    assert _jit.disk_cache_usable() is False
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba-cache"))  # made when used
    assert _jit.disk_cache_usable() is True
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/proc/numba-cache")  # set, but not writable
    assert _jit.disk_cache_usable() is False


@pytest.mark.parametrize(("numba_cache_dir", "writable"), [
    (None, "tmp"), ("file/cache", "tmp"), (None, "nowhere")])
def test_import_without_a_writable_home_or_cache_folder(tmp_path, numba_cache_dir: str | None,
                                                        writable: str) -> None:
    """A user whose home cannot be looked into, with no usable NUMBA_CACHE_DIR and a
    read-only install (``sudo -u other`` without ``-H``): no traceback at import. The
    kernels are cached in a private folder of the user under the temporary folder, or
    compiled in memory where even that cannot be written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    home, cwd, temporary = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for folder in (home, cwd, temporary):
        folder.mkdir()
    (tmp_path / "file").write_text("in the way of a folder")
    script = ("import os\n"  # only WRITABLE can be written (root may write anywhere)
              "allowed, access = os.environ['WRITABLE'], os.access\n"
              "os.access = lambda path, mode: (str(path).startswith(allowed)\n"
              "                                and access(path, mode))\n"
              "from demhx import _jit, _kernels\n"
              "print(_jit.CACHE, os.environ.get('NUMBA_CACHE_DIR'))\n")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("NUMBA_", "DEMHX_")) and key != "XDG_CACHE_HOME"}
    env.update(HOME=str(home), TMPDIR=str(temporary), WRITABLE=str(tmp_path / writable),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if numba_cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(tmp_path / numba_cache_dir)
    home.chmod(0o000)  # as /root for another user
    cwd.chmod(0o500)
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                env=env, cwd=cwd, timeout=120)
    finally:
        home.chmod(0o700)
        cwd.chmod(0o700)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") <= 1, result.stderr
    if writable == "nowhere":
        assert result.stdout.split()[0] == "False"
        return
    cache = temporary / f"demhx-numba-{os.getuid()}"
    assert result.stdout == f"True {cache}\n"
    assert cache.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("sample", [1, 2, 3])
def test_accumulate_sampled_squares_matches_reference_and_brute_force(
        rng: np.random.Generator, sample: int) -> None:
    shape = (13, 18, 11)
    corners = _corners(rng, shape, 7)
    values = rng.standard_normal((7, 1, CUBE, CUBE, CUBE)).astype(np.float32)
    grid = tuple(-(-n // sample) for n in shape)
    fast_sq, slow_sq = (np.zeros(grid, np.float32) for _ in range(2))
    fast_n, slow_n = (np.zeros(grid, COUNT_DTYPE) for _ in range(2))
    for first in (0, 3, 6):
        count = min(3, 7 - first)
        block = np.ascontiguousarray(values[first:first + count])
        _kernels.accumulate_sampled_squares(block, corners, first, count, sample, fast_sq,
                                            fast_n)
        _kernels.accumulate_sampled_squares_reference(block, corners, first, count, sample,
                                                      slow_sq, slow_n)
    np.testing.assert_array_equal(fast_n, slow_n)
    np.testing.assert_allclose(fast_sq, slow_sq, rtol=1e-6, atol=1e-6)
    # Brute force: full-resolution sums, then every sample-th voxel.
    squares, counts = np.zeros(shape, np.float64), np.zeros(shape, np.int64)
    for (z, y, x), cube in zip(corners, values[:, 0], strict=True):
        squares[z:z + CUBE, y:y + CUBE, x:x + CUBE] += cube.astype(np.float64) ** 2
        counts[z:z + CUBE, y:y + CUBE, x:x + CUBE] += 1
    every = (slice(None, None, sample),) * 3
    np.testing.assert_array_equal(fast_n, counts[every])
    np.testing.assert_allclose(fast_sq, squares[every], rtol=1e-5)
    assert fast_n.max() >= 2


# --------------------------------------------------------------------------- noise estimation

_SHAPES = [(1, 1, 1), (2, 3, 4), (5, 6, 7), (9, 8, 3), (13, 4, 11)]
_WINDOWS = [(1, 1, 1), (3, 3, 3), (7, 5, 3), (2, 4, 1), (1, 9, 12), (12, 2, 7)]


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("window", _WINDOWS)
def test_box_mean_matches_reference_and_scipy(rng: np.random.Generator,
                                              shape: tuple[int, int, int],
                                              window: tuple[int, int, int]) -> None:
    """Windows wider than the box, even windows, in place or not; SciPy's uniform filter."""
    from scipy import ndimage

    source = (rng.standard_normal(shape) * 10 + 3).astype(np.float32)
    fast, slow = np.empty_like(source), np.empty_like(source)
    _kernels.box_mean(source, *window, fast)
    _kernels.box_mean_reference(source, *window, slow)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast, ndimage.uniform_filter(source, window, mode="reflect"),
                               rtol=1e-6, atol=1e-6)
    in_place = source.copy()
    _kernels.box_mean(in_place, *window, in_place)
    np.testing.assert_array_equal(in_place, fast)


def test_box_mean_of_a_constant_is_the_constant_and_a_box_averages(
        rng: np.random.Generator) -> None:
    constant = np.full((6, 7, 8), 2.5, np.float32)
    out = np.empty_like(constant)
    _kernels.box_mean(constant, 3, 5, 7, out)
    np.testing.assert_allclose(out, 2.5, rtol=1e-6)
    source = rng.standard_normal((9, 9, 9)).astype(np.float32)
    _kernels.box_mean(source, 3, 3, 3, out := np.empty_like(source))
    assert out[4, 4, 4] == pytest.approx(source[3:6, 3:6, 3:6].mean(), rel=1e-5)


def test_local_moments_match_reference(rng: np.random.Generator) -> None:
    volume = (rng.standard_normal((11, 14, 9)) * 0.3 + 5).astype(np.float32)
    volume[2:5, 3:8, 1:4] += 4.0
    outputs = [np.empty_like(volume) for _ in range(4)]
    _kernels.local_moments(volume, 5.0, 3, 5, 3, outputs[0], outputs[1])
    _kernels.local_moments_reference(volume, 5.0, 3, 5, 3, outputs[2], outputs[3])
    np.testing.assert_allclose(outputs[0], outputs[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[1], outputs[3], rtol=1e-4, atol=1e-5)
    assert outputs[1].min() >= 0 and outputs[1].max() > 1.0  # the step shows in the std


def test_select_within_matches_reference_with_float32_bounds(rng: np.random.Generator) -> None:
    values = rng.standard_normal((7, 9, 13)).astype(np.float32)
    values[0, 0, :3] = (np.nan, np.float32(0.1), np.nextafter(np.float32(0.1), np.float32(1)))
    mask = rng.uniform(size=values.shape) < 0.7
    fast, slow = mask.copy(), mask.copy()
    # 0.1 is not a float32: bounds round to float32, as NumPy's comparison rounds them
    counts = (_kernels.select_within(values, -0.5, 0.1, fast),
              _kernels.select_within_reference(values, -0.5, 0.1, slow))
    np.testing.assert_array_equal(fast, slow)
    assert counts[0] == counts[1] == np.count_nonzero(fast) > 0
    assert not fast[0, 0, 0] and fast[0, 0, 1] == mask[0, 0, 1] and not fast[0, 0, 2]


@pytest.mark.parametrize("step", [1, 2, 7, 64])
@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.5, 1.0])
def test_masked_sample_matches_reference(rng: np.random.Generator, step: int,
                                         fraction: float) -> None:
    values = rng.standard_normal((9, 10, 13)).astype(np.float32)  # 1170: not a multiple of 8
    mask = rng.uniform(size=values.shape) < fraction
    size = -(-int(np.count_nonzero(mask)) // step)
    fast, slow = np.full(size + 1, -9, np.float32), np.full(size + 1, -9, np.float32)
    counts = (_kernels.masked_sample(values, mask, step, fast),
              _kernels.masked_sample_reference(values, mask, step, slow))
    assert counts[0] == counts[1] == size
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(fast[:size], values[mask][::step])


def test_masked_mean_std_matches_reference(rng: np.random.Generator) -> None:
    values = (rng.standard_normal((20, 21, 22)) * 0.1 + 3).astype(np.float32)
    mask = rng.uniform(size=values.shape) < 0.4
    fast = _kernels.masked_mean_std(values, mask)
    slow = _kernels.masked_mean_std_reference(values, mask)
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    assert slow[1] == pytest.approx(0.1, rel=0.05)
    assert all(np.isnan(_kernels.masked_mean_std(values, np.zeros_like(mask))))
