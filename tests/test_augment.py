"""The cube rotations and test-time augmentation over them (demhx.augment)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from demhx import augment
from demhx.augment import ROTATIONS, SUBSETS, Rotation
from demhx.errors import cli_terms


def _array(shape: tuple[int, ...] = (2, 3, 4, 5), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_24_distinct_proper_rotations_identity_first() -> None:
    assert len(ROTATIONS) == 24 and len(set(ROTATIONS)) == 24
    assert ROTATIONS[0] == Rotation((0, 1, 2), (False, False, False))
    cube = _array((1, 6, 6, 6))
    images = {r.apply(cube).tobytes() for r in ROTATIONS}
    assert len(images) == 24  # distinct as maps of voxels, not only as labels
    for rotation in ROTATIONS:
        matrix = rotation.matrix
        assert round(np.linalg.det(matrix)) == 1
        np.testing.assert_array_equal(matrix @ matrix.T, np.eye(3))


def test_reflections_are_refused() -> None:
    with pytest.raises(ValueError, match="reflection"):
        Rotation((0, 1, 2), (True, False, False))
    with pytest.raises(ValueError, match="reflection"):
        Rotation((1, 0, 2), (False, False, False))


@pytest.mark.parametrize("rotation", ROTATIONS, ids=str)
def test_rotation_then_inverse_is_the_identity(rotation: Rotation) -> None:
    array = _array()  # non-cubic: a swapped axis would change the shape
    turned = rotation.apply(array)
    assert turned.flags.c_contiguous and sorted(turned.shape[1:]) == [3, 4, 5]
    np.testing.assert_array_equal(rotation.inverse.apply(turned), array)
    np.testing.assert_array_equal(rotation.apply(rotation.inverse.apply(array)), array)
    assert rotation.then(rotation.inverse) == ROTATIONS[0]


def test_composition_matches_the_arrays() -> None:
    array = _array((4, 5, 6))
    for first, second in itertools.product(ROTATIONS, repeat=2):
        np.testing.assert_array_equal(second.apply(first.apply(array)),
                                      first.then(second).apply(array))


def test_rotation_turns_coordinates_by_its_matrix() -> None:
    size = 5
    centre = (size - 1) / 2
    array = np.zeros((size,) * 3, np.float32)
    array[0, 1, 4] = 1.0
    for rotation in ROTATIONS:
        where = np.argwhere(rotation.apply(array) == 1.0)[0] - centre
        np.testing.assert_array_equal(rotation.matrix @ where, np.array([0, 1, 4]) - centre)


@pytest.mark.parametrize("count", sorted(SUBSETS))
def test_subsets_are_groups_holding_the_identity(count: int) -> None:
    subset = augment.rotation_subset(count)
    assert len(subset) == count == len(set(subset)) and subset[0] == ROTATIONS[0]
    members = set(subset)
    assert all(a.then(b) in members for a in subset for b in subset)
    assert all(r.inverse in members for r in subset)


@pytest.mark.parametrize("count", [3, 6, 12, 24])
def test_subsets_move_every_axis_along_every_axis(count: int) -> None:
    sources = {(axis, r.permutation[axis]) for r in SUBSETS[count] for axis in range(3)}
    assert sources == set(itertools.product(range(3), repeat=2))


def test_four_rotations_reverse_every_axis() -> None:
    flips = np.array([r.flips for r in SUBSETS[4]])
    assert flips.any(axis=0).all() and all(r.permutation == (0, 1, 2) for r in SUBSETS[4])


@pytest.mark.parametrize("count", [0, 1, 5, 8, 48, True])
def test_unknown_subset_size_names_the_choices(count: int) -> None:
    with pytest.raises(ValueError, match=rf"^tta={count!r}: not a number of rotations demhx "
                       r"offers; use one of 3, 4, 6, 12, 24$") as caught:
        augment.rotation_subset(count)
    assert cli_terms(str(caught.value)).startswith(f"--tta {count!r}: not a number")


def _smoothing(batch: np.ndarray) -> np.ndarray:
    """A predictor that commutes with every cube rotation (isotropic, zero-padded)."""
    return ndimage.uniform_filter(batch, size=(1, 1, 3, 3, 3), mode="constant").astype(np.float32)


def _anisotropic(batch: np.ndarray) -> np.ndarray:
    """A predictor that does not: a ramp along the last axis, plus a shift along the first."""
    ramp = np.linspace(0.5, 1.5, batch.shape[-1], dtype=np.float32)
    return (batch * ramp + np.roll(batch, 1, axis=2)).astype(np.float32)


def test_identity_predictor_gives_its_input_and_zero_variance() -> None:
    cubes = _array((3, 1, 6, 6, 6))
    mean, variance = augment.predict_augmented(lambda b: b.copy(), cubes, ROTATIONS, 7)
    np.testing.assert_array_equal(mean, cubes)
    np.testing.assert_array_equal(variance, np.zeros_like(cubes))
    assert mean.dtype == variance.dtype == np.float32


def test_equivariant_predictor_gives_plain_mean_and_no_spread() -> None:
    cubes = _array((2, 1, 8, 8, 8), seed=3)
    plain = _smoothing(cubes)
    mean, variance = augment.predict_augmented(_smoothing, cubes, ROTATIONS, 5)
    np.testing.assert_allclose(mean, plain, rtol=0, atol=1e-6)
    assert np.sqrt(variance).max() < 1e-6 * np.abs(plain).max() + 1e-7


def test_mean_and_variance_over_turned_back_predictions() -> None:
    cubes = _array((2, 1, 6, 6, 6), seed=4)
    subset = SUBSETS[12]
    mean, variance = augment.predict_augmented(_anisotropic, cubes, subset, 4)
    aligned = np.stack([r.inverse.apply(_anisotropic(r.apply(cubes))) for r in subset])
    np.testing.assert_allclose(mean, aligned.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, aligned.var(axis=0), rtol=1e-4, atol=1e-6)
    assert variance.max() > 0.01


def test_batching_does_not_change_the_result() -> None:
    cubes = _array((3, 1, 6, 6, 6), seed=5)
    calls: list[int] = []

    def counted(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return _anisotropic(batch)

    results = [augment.predict_augmented(counted, cubes, SUBSETS[6], size) for size in (1, 4, 18)]
    assert calls.count(1) == 18 and max(calls) == 18 and sum(calls) == 3 * 18
    for mean, variance in results[1:]:
        np.testing.assert_array_equal(mean, results[0][0])
        np.testing.assert_array_equal(variance, results[0][1])
