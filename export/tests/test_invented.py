"""bench/invented.py (it measures with export's metrics, so its tests live with export's):
phase randomisation keeps the amplitude spectrum and the mean and removes the structure; the
blob and noise measures count what they say on tiny volumes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import invented  # noqa: E402


def _blobs(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    volume = np.zeros(shape, np.float32)
    for centre, height in (((6, 8, 10), 1.0), ((14, 12, 5), 0.5)):
        distance2 = sum((grid[k] - centre[k]) ** 2 for k in range(3))
        volume += height * np.exp(-distance2 / (2 * 2.0 ** 2))
    return volume


@pytest.mark.parametrize("shape", [(20, 18, 16), (15, 17, 19)])
def test_phase_randomised_keeps_amplitudes_and_mean(shape: tuple[int, int, int]) -> None:
    volume = _blobs(shape)
    copy = invented.phase_randomised(volume, 1)
    assert copy.dtype == np.float32 and copy.shape == shape
    np.testing.assert_allclose(np.abs(np.fft.rfftn(copy)), np.abs(np.fft.rfftn(volume)),
                               rtol=1e-4, atol=1e-4 * float(np.abs(volume).sum()))
    assert copy.mean() == pytest.approx(volume.mean(), rel=1e-5)
    assert abs(np.corrcoef(copy.ravel(), volume.ravel())[0, 1]) < 0.3  # structure gone
    np.testing.assert_array_equal(copy, invented.phase_randomised(volume, 1))
    assert not np.allclose(copy, invented.phase_randomised(volume, 2))


def test_brightest_blob_is_the_highest_peak_not_the_largest_region() -> None:
    output = np.zeros((12, 12, 12), np.float32)
    output[1:6, 1:6, 1:6] = 0.4  # large, dim
    output[9, 9, 9:11] = 0.9  # two voxels, bright
    assert invented.brightest_blob(output, 0.3) == (pytest.approx(0.9), 2)
    assert invented.brightest_blob(output, 0.95) == (0.0, 0)


def test_noise_score_counts_voxels_above_and_refusals_as_nothing() -> None:
    real = np.zeros((10, 10, 10), np.float32)
    real[:, :, :2] = 10.0  # 99.5th percentile 10, peak 10: threshold 2
    speck = np.zeros_like(real)
    speck[5, 5, 5] = 4.0
    score = invented.noise_score([speck, None], real)
    assert score.above == pytest.approx(1 / 1000)
    assert score.blob == pytest.approx(0.4) and score.blob_voxels == 1
    assert score.refused == 1
    refused = invented.noise_score([None, None], real)
    assert (refused.above, refused.blob, refused.refused) == (0.0, 0.0, 2)
    assert invented.noise_score([np.zeros_like(real)], real).blank == 1
    assert invented.noise_score([speck], np.zeros_like(real)).error


def test_empty_region_keeps_its_distance_from_the_truth() -> None:
    truth = np.zeros((15, 15, 15), np.float32)
    truth[7, 7, 7] = 1.0
    empty, support = invented.empty_region(truth, 1.0)
    assert support.sum() == 1
    assert not empty[7, 7, 9] and empty[7, 7, 10] and empty[0, 0, 0]
    scores = invented.empty_scores(truth + 0.01 * empty, empty, support)
    assert 0 < scores["empty mass"] < 1 and scores["empty p99"] == pytest.approx(0.01)


def test_refusals_are_recognised_by_their_words() -> None:
    assert invented.is_refusal("ValueError: map: all solvent, no signal to enhance")
    assert not invented.is_refusal("RuntimeError: the model returned shape (1, 2, 64, 64, 64)")
