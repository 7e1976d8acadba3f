"""Tiling geometry and overlap-add: coverage, partition of unity, the paper's counts."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demhx import blend, tiling
from demhx.blend import overlap_add, select_cubes
from demhx.refine import MAX_COVERING, SampledSums, most_covering, predicted_cc

SHAPES = [(1, 1, 1), (17, 65, 130), (64, 64, 64), (65, 65, 65), (100, 37, 200)]
CUBE = 64


def _schemes() -> list[tiling.TilingScheme]:
    default = tiling.scheme_for("default", CUBE, 16)
    no_skip = tiling.TilingScheme("default-no-skip", default.stride, default.window, None)
    return [tiling.scheme_for("reference", CUBE, 16), no_skip]


def _ones(batch: np.ndarray) -> np.ndarray:
    return np.ones_like(batch)


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch.copy()


@given(length=st.integers(1, 400), cube=st.integers(8, 64), data=st.data())
@settings(max_examples=200, deadline=None)
def test_axis_layout_covers_every_voxel(length: int, cube: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, cube))
    padded, offset, starts = tiling.axis_layout(length, cube, stride)
    assert padded == cube + (len(starts) - 1) * stride >= length
    assert 0 <= offset and offset + length <= padded
    assert starts[0] == 0 and starts[-1] + cube == padded
    assert np.all(np.diff(starts) == stride)
    # The fewest cubes: one fewer would not reach the end.
    assert len(starts) == 1 or cube + (len(starts) - 2) * stride < length


def test_reference_counts_are_the_papers() -> None:
    scheme = tiling.scheme_for("reference", CUBE, 16)
    assert (scheme.stride, scheme.window, scheme.skip_threshold) == (16, "uniform", None)
    assert tiling.plan_tiling((256, 256, 256), CUBE, scheme).cube_count == 13 ** 3
    assert tiling.plan_tiling((100, 100, 100), CUBE, scheme).cube_count == 4 ** 3
    plan = tiling.plan_tiling((64, 80, 30), CUBE, scheme)
    assert plan.cube_count == 1 * 2 * 1 and plan.padded_shape == (64, 80, 64)
    np.testing.assert_array_equal(plan.weights, 1.0)


def test_default_scheme_is_faster() -> None:
    scheme = tiling.scheme_for("default", CUBE, 16)
    assert (scheme.stride, scheme.window, scheme.lattice) == (48, "uniform", 16)
    assert scheme.skip_threshold == tiling.DEFAULT_SKIP_THRESHOLD
    assert tiling.plan_tiling((256, 256, 256), CUBE, scheme).cube_count == 5 ** 3


@pytest.mark.parametrize("length", [1, 30, 64, 65, 100, 174, 185, 256, 300, 511, 512, 1000])
def test_default_cubes_are_reference_cubes(length: int) -> None:
    """Same padding, corners a subset of the reference's, first and last kept, gaps <= 48."""
    reference = tiling.axis_layout(length, CUBE, 16)
    padded, offset, starts = tiling.axis_layout(length, CUBE, 48, 16)
    assert (padded, offset) == reference[:2]
    assert set(starts.tolist()) <= set(reference[2].tolist())
    assert starts[0] == 0 and starts[-1] == reference[2][-1]
    gaps = np.diff(starts)
    assert np.all(gaps % 16 == 0) and np.all((gaps >= 16) & (gaps <= 48))
    assert len(starts) == 1 + -(-int(reference[2][-1]) // 48)  # the fewest that fit


def test_default_plan_is_a_subset_of_the_reference_plan() -> None:
    """Each default cube sees exactly the input of a reference cube, so the network's
    prediction for it is one the reference averages too."""
    shape = (100, 90, 174)
    schemes = [tiling.scheme_for(name, CUBE, 16) for name in ("reference", "default")]
    plans = [tiling.plan_tiling(shape, CUBE, scheme) for scheme in schemes]
    assert plans[0].padded_shape == plans[1].padded_shape
    reference_corners = {tuple(c) for c in plans[0].corners.tolist()}
    assert {tuple(c) for c in plans[1].corners.tolist()} <= reference_corners


@pytest.mark.parametrize("stride", [8, 16, 32, 40, 48, 64])
def test_cosine_window_is_positive_and_a_partition_of_unity(stride: int) -> None:
    line = tiling.window_1d(CUBE, stride, "cosine")
    assert line.min() > 0 and line.max() <= 1.0
    total = np.zeros(CUBE + 4 * stride)
    for start in range(0, 4 * stride + 1, stride):
        total[start:start + CUBE] += line
    interior = total[CUBE:4 * stride] if 4 * stride > CUBE else total[:0]
    if stride >= CUBE // 2:
        np.testing.assert_allclose(interior, 1.0, rtol=1e-12)


def test_bad_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="tiling scheme"):
        tiling.scheme_for("quick", CUBE, 16)
    with pytest.raises(ValueError, match="exceeds the cube size"):
        tiling.scheme_for(tiling.TilingScheme("wide", 65), CUBE, 16)
    with pytest.raises(ValueError, match="window"):
        tiling.TilingScheme("x", 16, "triangle")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", _schemes(), ids=lambda s: s.name)
def test_overlap_add_of_ones_is_exactly_one(shape: tuple[int, int, int],
                                            scheme: tiling.TilingScheme) -> None:
    plan = tiling.plan_tiling(shape, CUBE, scheme)
    padded = tiling.pad_volume(np.zeros(shape, np.float32), plan)
    output, counts = overlap_add(padded, plan, _ones, batch_size=3, background=-7.0)
    assert output.shape == shape and output.dtype == np.float32
    assert np.all(output == 1.0)  # every voxel covered and weights normalised exactly
    assert counts.run == plan.cube_count and counts.skipped == 0


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 65, 130), (65, 65, 65)])
@pytest.mark.parametrize("scheme", _schemes(), ids=lambda s: s.name)
def test_identity_network_returns_the_input(shape: tuple[int, int, int],
                                            scheme: tiling.TilingScheme) -> None:
    volume = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    plan = tiling.plan_tiling(shape, CUBE, scheme)
    output, _ = overlap_add(tiling.pad_volume(volume, plan), plan, _identity, batch_size=4)
    np.testing.assert_allclose(output, volume, rtol=2e-6, atol=1e-6)


def test_batched_equals_one_by_one() -> None:
    shape = (40, 70, 90)
    volume = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    plan = tiling.plan_tiling(shape, CUBE, _schemes()[1])
    padded = tiling.pad_volume(volume, plan)

    def nonlinear(batch: np.ndarray) -> np.ndarray:
        return np.tanh(batch * 3.0) + batch.mean(axis=(1, 2, 3, 4), keepdims=True)

    single, _ = overlap_add(padded, plan, nonlinear, batch_size=1)
    for batch_size in (2, 5, plan.cube_count + 3):
        batched, _ = overlap_add(padded, plan, nonlinear, batch_size=batch_size)
        np.testing.assert_array_equal(batched, single)


def _in_place(batch: np.ndarray) -> np.ndarray:
    """A network that writes its predictions into the batch it is given and returns it."""
    np.tanh(batch * np.float32(3.0), out=batch)
    batch += np.float32(2.0)
    return batch


def _in_place_view(batch: np.ndarray) -> np.ndarray:
    """The same, returning a view of the batch rather than the batch itself."""
    return _in_place(batch)[:, :1]


@pytest.mark.parametrize("predict", [_in_place, _in_place_view], ids=["batch", "view"])
@pytest.mark.parametrize("name", ["reference", "default"])
def test_a_network_that_works_in_place_gives_what_a_pure_one_gives(
        predict: Callable[[np.ndarray], np.ndarray], name: str) -> None:
    """The batch buffers are reused from a pool: a prediction that is the buffer itself (or a
    view of it) must be summed before the buffer is filled with the next cubes."""
    volume = _particle((120, 100, 130))
    plan = tiling.plan_tiling(volume.shape, CUBE, tiling.scheme_for(name, CUBE, 16))
    padded = tiling.pad_volume(volume, plan)

    def pure(batch: np.ndarray) -> np.ndarray:
        return np.tanh(batch * np.float32(3.0)) + np.float32(2.0)

    expected, _ = overlap_add(padded, plan, pure, batch_size=2)
    for _ in range(3):  # several runs of many batches: the threads interleave differently
        output, counts = overlap_add(padded, plan, predict, batch_size=2)
        assert counts.run > 6  # more batches than buffers in the pool
        np.testing.assert_array_equal(output, expected)


@pytest.mark.parametrize("predict", [_in_place, _in_place_view], ids=["batch", "view"])
def test_predictions_are_copied_off_a_batch_they_share(
        predict: Callable[[np.ndarray], np.ndarray]) -> None:
    """A second guard besides the pool: what blend sums never shares memory with the batch."""
    batch = np.ones((3, 1, 8, 8, 8), np.float32)
    result = blend._predict_checked(predict, batch)
    assert not np.may_share_memory(result, batch)
    assert result.flags.c_contiguous and result.dtype == np.float32
    np.testing.assert_array_equal(result, np.tanh(np.float32(3.0)) + np.float32(2.0))


def test_solvent_cubes_are_skipped_and_get_the_background() -> None:
    shape = (96, 96, 96)
    volume = np.zeros(shape, np.float32)
    volume[10, 10, 10] = 5.0  # density in one corner only
    plan = tiling.plan_tiling(shape, CUBE, tiling.scheme_for("default", CUBE, 16))
    padded = tiling.pad_volume(volume, plan)
    assert len(select_cubes(padded, plan, 1.0)) == 1
    assert len(select_cubes(padded, plan, None)) == plan.cube_count == 8
    output, counts = overlap_add(padded, plan, _identity, batch_size=2, background=-1.0,
                                 skip_below=1.0)
    assert (counts.total, counts.run, counts.skipped) == (8, 1, 7)
    # the one cube that runs: the first, whose padded corner is (0, 0, 0)
    near = tuple(slice(0, CUBE - offset) for offset in plan.offset)
    np.testing.assert_allclose(output[near], volume[near], rtol=1e-6)
    far = output.copy()
    far[near] = -1.0
    assert np.all(far == -1.0)


def test_progress_counts_cubes_and_can_interrupt() -> None:
    shape = (96, 96, 96)
    plan = tiling.plan_tiling(shape, CUBE, _schemes()[1])
    padded = tiling.pad_volume(np.zeros(shape, np.float32), plan)
    seen: list[tuple[int, int]] = []
    overlap_add(padded, plan, _ones, batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 8), (3, 8), (6, 8), (8, 8)]

    def interrupt(done: int, total: int) -> None:
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        overlap_add(padded, plan, _ones, batch_size=3, progress=interrupt)


def test_model_errors_propagate_and_wrong_shapes_are_refused() -> None:
    shape = (96, 70, 70)
    plan = tiling.plan_tiling(shape, CUBE, _schemes()[1])
    padded = tiling.pad_volume(np.zeros(shape, np.float32), plan)

    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        overlap_add(padded, plan, broken, batch_size=2)
    with pytest.raises(RuntimeError, match="keep the input shape"):
        overlap_add(padded, plan, lambda b: b[:, :, :8], batch_size=2)


def test_refine_positions_splits_the_widest_gap_until_none_is_left() -> None:
    positions = np.array([0, 3, 6, 8])
    seen = [positions]
    while True:
        finer = tiling.refine_positions(seen[-1])
        if len(finer) == len(seen[-1]):
            break
        assert set(seen[-1]) < set(finer) and len(finer) == len(seen[-1]) + 1
        assert np.all(np.diff(finer) > 0)
        seen.append(finer)
    np.testing.assert_array_equal(seen[1], [0, 1, 3, 6, 8])
    np.testing.assert_array_equal(seen[-1], np.arange(9))
    np.testing.assert_array_equal(tiling.refine_positions(np.array([4])), [4])


@pytest.mark.parametrize("shape", [(185, 185, 185), (100, 37, 200), (64, 64, 64)])
def test_refined_plans_grow_from_the_default_to_the_reference(
        shape: tuple[int, int, int]) -> None:
    plan = tiling.plan_tiling(shape, CUBE, tiling.scheme_for("default", CUBE, 16))
    reference = tiling.plan_tiling(shape, CUBE, tiling.scheme_for("reference", CUBE, 16))
    all_corners = {tuple(c) for c in reference.corners.tolist()}
    while True:
        corners = {tuple(c) for c in plan.corners.tolist()}
        assert corners <= all_corners
        finer = tiling.refine_plan(plan)
        if finer is None:
            break
        assert corners < {tuple(c) for c in finer.corners.tolist()}
        assert (finer.padded_shape, finer.offset) == (plan.padded_shape, plan.offset)
        plan = finer
    assert corners == all_corners


def test_fast_is_the_default_without_refinement() -> None:
    default = tiling.scheme_for("default", CUBE, 16)
    fast = tiling.scheme_for("fast", CUBE, 16)
    assert default.target_cc == tiling.DEFAULT_TARGET_CC and fast.target_cc is None
    assert dataclasses.replace(fast, name="default", target_cc=default.target_cc) == default
    with pytest.raises(ValueError, match="needs a lattice"):
        tiling.TilingScheme("x", 32, "cosine", None, 16, 0.99)
    with pytest.raises(ValueError, match="target CC"):
        tiling.TilingScheme("x", 32, "uniform", None, 16, 1.0)


def _noisy_network(relative: float) -> Callable[[np.ndarray], np.ndarray]:
    """A deterministic network whose output strays with the cube's context: the input times
    (1 + relative × noise), the noise drawn from the cube's own bytes."""
    def predict(batch: np.ndarray) -> np.ndarray:
        out = np.empty_like(batch)
        for i, cube in enumerate(batch):
            seed = int.from_bytes(hashlib.blake2b(cube.tobytes(), digest_size=8).digest(),
                                  "little")
            noise = np.random.default_rng(seed).standard_normal(cube.shape, dtype=np.float32)
            out[i] = cube * (1 + np.float32(relative) * noise)
        return out
    return predict


def _particle(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, np.float32)[:, None, None, None] / 2
    return np.exp(-((grid - centre) ** 2).sum(axis=0) / (2 * 30.0 ** 2)).astype(np.float32)


def _blend(volume: np.ndarray, name: str, predict: Callable, **options: object
           ) -> tuple[np.ndarray, object]:
    plan = tiling.plan_tiling(volume.shape, CUBE, tiling.scheme_for(name, CUBE, 16))
    return overlap_add(tiling.pad_volume(volume, plan), plan, predict, batch_size=4, **options)


def test_adaptive_default_stops_at_once_for_a_consistent_network() -> None:
    volume = _particle((120, 120, 120))
    fast, fast_counts = _blend(volume, "fast", _identity)
    default, counts = _blend(volume, "default", _identity)
    assert counts == fast_counts and counts.added == 0
    np.testing.assert_array_equal(default, fast)


@pytest.mark.slow
def test_adaptive_default_adds_reference_cubes_until_faithful() -> None:
    volume = _particle((150, 150, 150))  # 7³ reference cubes, 3³ before refining
    predict = _noisy_network(0.2)
    reference, ref_counts = _blend(volume, "reference", predict)
    fast, fast_counts = _blend(volume, "fast", predict)
    seen: list[tuple[int, int]] = []
    default, counts = _blend(volume, "default", predict,
                             progress=lambda d, t: seen.append((d, t)))
    assert fast_counts.run < counts.run < ref_counts.run
    assert counts.added == counts.total - fast_counts.total > 0 and fast_counts.added == 0
    cc_fast, cc_default = (np.corrcoef(out.ravel(), reference.ravel())[0, 1]
                           for out in (fast, default))
    assert cc_fast < 0.99 <= cc_default
    # Progress: cubes run so far, never backwards, ending at the cubes run.
    assert seen[-1] == (counts.run, counts.run)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


def test_predicted_cc_matches_the_true_cc_of_averaged_predictions() -> None:
    rng = np.random.default_rng(3)
    signal = rng.standard_normal(200_000) ** 2
    counts = rng.choice([1, 2, 4, 8], signal.size).astype(np.uint8)
    relative = 0.4
    sums, squares = np.zeros(signal.size), np.zeros(signal.size)
    for copy in range(8):
        take = copy < counts
        prediction = signal * (1 + relative * rng.standard_normal(signal.size))
        sums += np.where(take, prediction, 0)
        squares += np.where(take, prediction ** 2, 0)
    true_cc = np.corrcoef(sums / counts, signal)[0, 1]
    predicted = predicted_cc(sums, squares, counts)
    assert abs(predicted - true_cc) < 0.005
    assert predicted_cc(signal * counts, signal ** 2 * counts, counts) == pytest.approx(1.0)
    assert predicted_cc(sums, squares, np.ones_like(counts)) == 1.0  # no overlaps: no estimate


def _dense_plan(shape: tuple[int, int, int], cube: int, lattice: int) -> tiling.TilingPlan:
    """An adaptive plan with every lattice position already (stride = lattice)."""
    scheme = tiling.TilingScheme("dense", lattice, "uniform", None, lattice, 0.99)
    return tiling.plan_tiling(shape, cube, scheme)


def test_the_self_check_counts_hundreds_of_cubes_over_a_voxel() -> None:
    """8³ cubes at every voxel: up to 512 cover one (a byte would count 0), and the self-check
    counts them all, as a brute-force count and the NumPy predicted CC do."""
    shape, cube = (22, 21, 23), 8
    plan = _dense_plan(shape, cube, 1)
    assert most_covering(plan) == 512 <= MAX_COVERING
    rng = np.random.default_rng(4)
    values = rng.standard_normal((plan.cube_count, 1, cube, cube, cube)).astype(np.float32)
    sums = SampledSums.for_plan(plan)
    accumulator = np.zeros(plan.padded_shape, np.float32)
    for first in range(0, plan.cube_count, 64):
        count = min(64, plan.cube_count - first)
        sums.add_blended(np.ascontiguousarray(values[first:first + count]), plan.corners,
                         first, count, plan.weights, accumulator)
    brute = np.zeros(plan.padded_shape, np.int64)
    for z, y, x in plan.corners.tolist():
        brute[z:z + cube, y:y + cube, x:x + cube] += 1
    np.testing.assert_array_equal(sums.counts, brute[::2, ::2, ::2])
    assert sums.counts.max() == 512
    box = tuple(slice(-(-start // 2), -(-(start + n) // 2))
                for start, n in zip(plan.offset, plan.shape, strict=True))
    first_voxel = tuple(b.start * 2 for b in box)
    sampled = accumulator[first_voxel[0]::2, first_voxel[1]::2, first_voxel[2]::2]
    counted = brute[::2, ::2, ::2][box]
    expected = predicted_cc(np.ravel(sampled[tuple(slice(0, n) for n in counted.shape)]),
                            sums.squares[box].ravel(), counted.ravel())
    assert sums.predicted_cc(accumulator, plan, 0.0) == pytest.approx(expected, rel=1e-12)


def test_a_lattice_too_fine_for_the_counts_is_refused() -> None:
    plan = _dense_plan((150, 150, 150), 64, 1)  # 64³ cubes over a voxel
    assert most_covering(plan) == 64 ** 3 > MAX_COVERING
    with pytest.raises(ValueError, match=r"tiling 'dense': .* at most 65535 cubes over a "
                                         r"voxel, but 64³ cubes on a 1-voxel lattice can put "
                                         r"262144 .*lattice of at least 2 voxels"):
        SampledSums.for_plan(plan)
    assert most_covering(_dense_plan((150, 150, 150), 64, 2)) == 32 ** 3
    default = tiling.plan_tiling((150, 150, 150), 64, tiling.scheme_for("default", 64, 16))
    assert most_covering(default) == 64  # DeepEMhancer's lattice: 4 positions per axis
