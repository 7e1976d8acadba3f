"""Fourier resampling: identity, mean, band-limited round trips, Nyquist, per-axis shapes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from conftest import real_map
from hypothesis import given, settings
from hypothesis import strategies as st

from demhx import mrcio, resample

sizes = st.integers(1, 12)
shapes = st.tuples(sizes, sizes, sizes)


def _band_limited(shape: tuple[int, int, int], limit: float, seed: int = 0) -> np.ndarray:
    """Real noise with no frequency above ``limit`` cycles/voxel along any axis, plus 1."""
    spectrum = scipy.fft.rfftn(np.random.default_rng(seed).standard_normal(shape))
    frequencies = np.meshgrid(scipy.fft.fftfreq(shape[0]), scipy.fft.fftfreq(shape[1]),
                              scipy.fft.rfftfreq(shape[2]), indexing="ij")
    keep = np.ones(spectrum.shape, bool)
    for frequency in frequencies:
        keep &= np.abs(frequency) < limit
    volume = scipy.fft.irfftn(spectrum * keep, s=shape)
    return (volume + 1.0).astype(np.float32)


def _relative_error(result: np.ndarray, expected: np.ndarray) -> float:
    difference = np.linalg.norm((result - expected).astype(np.float64))
    return float(difference / np.linalg.norm(expected.astype(np.float64)))


def test_same_shape_is_an_exact_copy(blob_volume: np.ndarray) -> None:
    result = resample.resample_to_shape(blob_volume, blob_volume.shape)
    np.testing.assert_array_equal(result, blob_volume)
    assert result is not blob_volume and not np.shares_memory(result, blob_volume)
    same, achieved = resample.resample(blob_volume, (1.2, 1.2, 1.2), 1.2)
    np.testing.assert_array_equal(same, blob_volume)
    assert achieved == (1.2, 1.2, 1.2)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, new_shape=shapes)
def test_mean_preserved_and_float32(shape: tuple, new_shape: tuple) -> None:
    volume = np.random.default_rng(1).random(shape).astype(np.float32) + 0.5
    result = resample.resample_to_shape(volume, new_shape)
    assert result.shape == new_shape and result.dtype == np.float32
    assert result.flags.c_contiguous and np.isfinite(result).all()
    assert float(result.mean(dtype=np.float64)) == pytest.approx(
        float(volume.mean(dtype=np.float64)), rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(*[st.integers(2, 14)] * 3), growth=st.tuples(*[st.integers(0, 9)] * 3))
def test_padding_then_cropping_back_is_the_identity(shape: tuple, growth: tuple) -> None:
    volume = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    larger = tuple(n + g for n, g in zip(shape, growth, strict=True))
    back = resample.resample_to_shape(resample.resample_to_shape(volume, larger), shape)
    np.testing.assert_allclose(back, volume, rtol=0, atol=2e-5 * float(np.abs(volume).max()))


@pytest.mark.parametrize("shape", [(20, 20, 20), (21, 19, 22), (16, 25, 30)])
def test_band_limited_signal_survives_cropping_and_padding(shape: tuple) -> None:
    volume = _band_limited(shape, 0.3)
    smaller = tuple(int(n * 0.7) for n in shape)  # Nyquist 0.35 cycle/voxel of the input
    back = resample.resample_to_shape(resample.resample_to_shape(volume, smaller), shape)
    assert _relative_error(back, volume) < 1e-5


@pytest.mark.parametrize(("old", "new"), [(16, 27), (17, 26), (30, 12), (31, 13), (9, 9)])
def test_sampled_cosine_is_interpolated_exactly(old: int, new: int) -> None:
    """A cosine below both Nyquist frequencies, resampled, equals its samples on the new grid."""
    def cosine(count: int) -> np.ndarray:
        position = np.arange(count) / count  # fraction of the box
        line = np.cos(2 * np.pi * 3 * position + 0.4) + 0.5
        return np.broadcast_to(line, (3, 4, count)).astype(np.float32)

    result = resample.resample_to_shape(cosine(old), (3, 4, new))
    np.testing.assert_allclose(result, cosine(new), atol=2e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_even_nyquist_is_split_and_folded_symmetrically(axis: int) -> None:
    """(-1)^i on an even grid, upsampled 2×, is cos(π i / 2); cropping back restores it."""
    shape = [6, 6, 6]
    shape[axis] = 8
    alternating = np.moveaxis(np.broadcast_to((-1.0) ** np.arange(8), (6, 6, 8)), 2, axis)
    doubled = list(shape)
    doubled[axis] = 16
    result = resample.resample_to_shape(alternating.astype(np.float32), tuple(doubled))
    expected = np.moveaxis(np.broadcast_to(np.cos(np.pi * np.arange(16) / 2), (6, 6, 16)), 2,
                           axis)
    np.testing.assert_allclose(result, expected, atol=1e-6)
    back = resample.resample_to_shape(result, tuple(shape))
    np.testing.assert_allclose(back, alternating, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(old=st.integers(2, 13), new=st.integers(2, 13))
def test_resampling_commutes_with_mirroring(old: int, new: int) -> None:
    """Mirroring about voxel 0 before or after gives the same result: no shift, no phase."""
    volume = np.random.default_rng(3).standard_normal((3, 4, old)).astype(np.float32)

    def mirror(array: np.ndarray) -> np.ndarray:
        return np.roll(array[..., ::-1], 1, axis=-1)

    first = resample.resample_to_shape(mirror(volume), (3, 4, new))
    second = mirror(resample.resample_to_shape(volume, (3, 4, new)))
    np.testing.assert_allclose(first, second, atol=1e-5)


def test_target_shape_per_axis() -> None:
    assert resample.target_shape((100, 100, 100), (1.742,) * 3, 1.0) == (174, 174, 174)
    assert resample.target_shape((73, 25, 43), (0.45875, 0.3925, 0.44825), 1.0) == (33, 10, 19)
    assert resample.target_shape((40, 30, 20), (1.0, 2.0, 0.5), 1.0) == (40, 60, 10)
    assert resample.target_shape((3, 3, 3), (0.1, 0.1, 0.1), 1.0) == (1, 1, 1)
    for bad in [((1, 1, 0), 1.0), ((1, 1, 1), 0.0), ((1, float("nan"), 1), 1.0)]:
        with pytest.raises(ValueError, match="voxel size"):
            resample.target_shape((4, 4, 4), *bad)  # type: ignore[arg-type]


def test_resample_reports_achieved_voxel_sizes() -> None:
    volume = _band_limited((30, 20, 25), 0.2)
    result, achieved = resample.resample(volume, (1.3, 1.1, 0.9), 1.0)
    assert result.shape == (39, 22, 23) and result.dtype == np.float32
    assert achieved == pytest.approx((30 * 1.3 / 39, 20 * 1.1 / 22, 25 * 0.9 / 23))
    back = resample.resample_to_shape(result, volume.shape)
    assert _relative_error(back, volume) < 1e-5


def test_real_map_round_trip_through_one_angstrom() -> None:
    source = mrcio.read_map(real_map("emd_5168.map"))
    fine, achieved = resample.resample(source.data, source.voxel_size, 1.0)
    assert fine.shape == (174, 174, 174) and achieved[0] == pytest.approx(1.742 * 100 / 174)
    back = resample.resample_to_shape(fine, source.data.shape)
    assert _relative_error(back, source.data) < 1e-5
    assert np.corrcoef(back.ravel(), source.data.ravel())[0, 1] > 1 - 1e-9


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot resample"):
        resample.resample_to_shape(np.zeros((4, 4), np.float32), (4, 4, 4))
    with pytest.raises(ValueError, match="cannot resample"):
        resample.resample_to_shape(np.zeros((4, 4, 4), np.float32), (4, 0, 4))


@pytest.mark.parametrize(("shape", "new_shape"), [((20, 21, 19), (35, 12, 19)),
                                                  ((16, 17, 18), (9, 30, 31))])
def test_equals_scipy_signal_resample_per_axis(shape: tuple[int, int, int],
                                               new_shape: tuple[int, int, int]) -> None:
    """The crop/pad is scipy.signal.resample's, axis by axis (smaller axes first)."""
    from scipy import signal

    volume = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    expected = volume.astype(np.float64)
    for axis in sorted(range(3), key=lambda axis: new_shape[axis] / shape[axis]):
        if new_shape[axis] != shape[axis]:
            expected = signal.resample(expected, new_shape[axis], axis=axis)
    result = resample.resample_to_shape(volume, new_shape)
    assert result.dtype == np.float32 and result.shape == new_shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
