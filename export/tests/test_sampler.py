"""Cube sampler: shapes, determinism, balance, and the 24 proper rotations of the cube."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from demhx_export.sampler import CubeSampler, cube_rotations, rotate


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Three tiny maps: noise input, a target cube of ones in the molecule region."""
    rng = np.random.default_rng(0)
    index = []
    for i, shape in enumerate([(24, 24, 24), (28, 24, 26), (20, 22, 24)]):
        signal = np.zeros(shape, dtype=np.uint8)
        signal[6:14, 6:14, 6:14] = 1
        inputs = rng.normal(0, 0.1, shape).astype(np.float32) + signal
        target = signal.astype(np.float32) * (i + 1)
        np.savez(tmp_path / f"m{i}.npz", input=inputs, target=target, signal=signal)
        index.append({"id": f"m{i}", "shape": list(shape)})
    (tmp_path / "index.json").write_text(json.dumps(index))
    return tmp_path


def test_batch_shapes(dataset: Path) -> None:
    sampler = CubeSampler(dataset, cube_size=16, batch_size=3, seed=0)
    inputs, targets = sampler.batch()
    assert inputs.shape == targets.shape == (3, 1, 16, 16, 16)
    assert inputs.dtype == targets.dtype == np.float32


def test_same_seed_same_batches(dataset: Path) -> None:
    a = CubeSampler(dataset, cube_size=16, batch_size=2, seed=5)
    b = CubeSampler(dataset, cube_size=16, batch_size=2, seed=5)
    for _ in range(5):
        for x, y in zip(a.batch(), b.batch(), strict=True):
            np.testing.assert_array_equal(x, y)


def test_fixed_batches_are_reproducible_and_unaugmented(dataset: Path) -> None:
    sampler = CubeSampler(dataset, cube_size=16, batch_size=2, seed=0, augment=True)
    first = sampler.fixed_batches(3, seed=1)
    sampler.batch()
    second = sampler.fixed_batches(3, seed=1)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # without augmentation every cube is an unrotated crop: targets are constant per map
    for _, y in first:
        for cube in y[:, 0]:
            assert set(np.unique(cube)) <= {0.0, 1.0, 2.0, 3.0}


def test_signal_fraction_one_gives_molecule_cubes(dataset: Path) -> None:
    sampler = CubeSampler(dataset, cube_size=8, batch_size=16, seed=0, signal_fraction=1.0,
                          augment=False)
    _, targets = sampler.batch()
    assert (targets.reshape(16, -1).max(axis=1) > 0).all()
    sampler = CubeSampler(dataset, cube_size=4, batch_size=16, seed=0, signal_fraction=0.0,
                          augment=False)
    _, targets = sampler.batch()
    assert (targets.reshape(16, -1).max(axis=1) < 1).mean() > 0.5


def test_augmented_pairs_stay_aligned(dataset: Path) -> None:
    sampler = CubeSampler(dataset, cube_size=16, batch_size=8, seed=3, augment=True)
    for _ in range(4):
        inputs, targets = sampler.batch()
        # input ~ 1 + noise where target > 0; rotation is applied to both (blur or a
        # corrupted patch can only touch a minority of voxels)
        inside = targets > 0
        assert np.mean(inputs[inside] > 0.5) > 0.6


def test_cube_rotations_are_the_24_proper_rotations() -> None:
    rotations = cube_rotations()
    assert len(rotations) == 24
    probe = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    images = {rotate(probe, r).tobytes() for r in rotations}
    assert len(images) == 24
    # a chiral pattern is never turned into its mirror image
    chiral = np.zeros((3, 3, 3))
    chiral[0, 0, 0], chiral[1, 0, 0], chiral[0, 1, 0], chiral[0, 0, 2] = 1, 2, 3, 4
    mirror = chiral[::-1].copy()
    assert all(not np.array_equal(rotate(chiral, r), mirror) for r in rotations)


def test_rotate_acts_on_the_last_three_axes() -> None:
    batch = np.random.default_rng(0).standard_normal((2, 1, 4, 4, 4))
    rotation = cube_rotations()[7]
    np.testing.assert_array_equal(rotate(batch, rotation)[1, 0], rotate(batch[1, 0], rotation))


def test_missing_index_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        CubeSampler(tmp_path)


def test_target_recipe_is_chosen_by_name(tmp_path: Path) -> None:
    signal = np.zeros((16, 16, 16), dtype=np.uint8)
    signal[4:12, 4:12, 4:12] = 1
    inputs = signal.astype(np.float32)
    np.savez(tmp_path / "m0.npz", input=inputs, signal=signal,
             target_locscale=2 * inputs, target_truth=3 * inputs)
    (tmp_path / "index.json").write_text(json.dumps([{"id": "m0", "shape": [16] * 3}]))
    for name, factor in (("locscale", 2), ("truth", 3)):
        sampler = CubeSampler(tmp_path, cube_size=8, batch_size=2, augment=False, target=name)
        x, y = sampler.batch()
        np.testing.assert_array_equal(y, factor * x)
    with pytest.raises(ValueError, match="locscale-full"):
        CubeSampler(tmp_path, cube_size=8, target="locscale-full")


def test_phase_randomisation_keeps_the_spectrum_and_the_mean_but_not_the_structure() -> None:
    from demhx_export.sampler import phase_randomise

    rng = np.random.default_rng(3)
    volume = np.zeros((20, 18, 16), dtype=np.float32)
    volume[5:9, 4:10, 6:8] = 2.0  # structure: a bright block
    volume += rng.normal(0, 0.1, volume.shape).astype(np.float32)
    out = phase_randomise(volume, rng)
    assert out.dtype == np.float32 and out.shape == volume.shape
    np.testing.assert_allclose(np.abs(np.fft.rfftn(out)), np.abs(np.fft.rfftn(volume)),
                               rtol=1e-3, atol=1e-2)
    assert out.mean() == pytest.approx(volume.mean(), abs=1e-5)
    assert abs(np.corrcoef(out.ravel(), volume.ravel())[0, 1]) < 0.2
    assert not np.allclose(out, phase_randomise(volume, rng))  # new phases each time


def test_negatives_have_empty_targets_and_scaled_randomised_inputs(dataset: Path) -> None:
    def mean_power(sampler: CubeSampler) -> float:
        batches = [sampler.batch() for _ in range(20)]
        assert not any(targets.any() for _, targets in batches)  # every target empty
        return float(np.mean([(inputs ** 2).sum() for inputs, _ in batches]))

    plain = CubeSampler(dataset, cube_size=16, batch_size=6, seed=2, augment=False)
    unscaled = CubeSampler(dataset, cube_size=16, batch_size=6, seed=2, augment=False,
                           negative_fraction=1.0)
    scaled = CubeSampler(dataset, cube_size=16, batch_size=6, seed=2, negative_fraction=1.0,
                         negative_scale=(0.5, 0.5))
    source = float(np.mean([(plain.batch()[0] ** 2).sum() for _ in range(20)]))
    # unaugmented negatives (validation) keep their cubes' power; scaled ones a quarter of it
    assert mean_power(unscaled) == pytest.approx(source, rel=0.1)
    assert 0.15 < mean_power(scaled) / source < 0.3
    with pytest.raises(ValueError, match="negative_fraction"):
        CubeSampler(dataset, cube_size=16, negative_fraction=1.5)
    with pytest.raises(ValueError, match="negative_scale"):
        CubeSampler(dataset, cube_size=16, negative_scale=(2.0, 1.0))


def _with_negatives(dataset: Path, maps: tuple[int, ...]) -> Path:
    """The fixture's maps, those in ``maps`` with a 'negative' array of constant 0.5 + i."""
    for i in range(3):
        path = dataset / f"m{i}.npz"
        with np.load(path) as data:
            arrays = dict(data)
        if i in maps:
            arrays["negative"] = np.full(arrays["input"].shape, 0.5 + i, dtype=np.float32)
        np.savez(path, **arrays)
    return dataset


def test_map_negatives_come_from_the_maps_whole_map_negatives(dataset: Path) -> None:
    _with_negatives(dataset, (0, 2))
    for preload in (True, False):
        sampler = CubeSampler(dataset, cube_size=16, batch_size=8, seed=3, preload=preload,
                              negative_fraction=1.0, negative_source="map",
                              negative_scale=(2.0, 2.0))
        seen = set()
        for _ in range(6):
            inputs, targets = sampler.batch()
            assert not targets.any()
            for cube in inputs[:, 0]:
                assert np.ptp(cube) == 0  # a crop of one constant negative, never the input
                seen.add(round(float(cube[0, 0, 0]), 4))
        assert seen == {1.0, 5.0}  # (0.5 + i) × 2 for the maps that have one
        val = sampler.fixed_batches(2, seed=0, negatives=True)
        assert {round(float(x[0, 0, 0, 0, 0]), 4) for x, _ in val} <= {0.5, 2.5}  # unscaled


def test_map_negatives_need_a_dataset_that_has_them(dataset: Path) -> None:
    with pytest.raises(ValueError, match="rebuild the dataset"):
        CubeSampler(dataset, cube_size=16, negative_fraction=0.5, negative_source="map")
    with pytest.raises(ValueError, match="negative_source"):
        CubeSampler(dataset, cube_size=16, negative_source="maps")
