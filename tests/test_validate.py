"""Plausibility checks and the output gate, on small synthetic volumes and the real maps."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
from conftest import real_map

from demhx import validate
from demhx.errors import DemhxWarning

REAL_MAPS = ["emd_5168.map", "emd_5168_monomer.mrc", "2566_3J6B_9.mrc", "emd_21457_seg.mrc",
             "EMD-3001.map", "6824.mrc"]


def _map(seed: int = 0, shape: tuple[int, int, int] = (24, 26, 28)) -> np.ndarray:
    volume = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.1
    volume[8:14, 9:15, 10:16] += 3.0
    return volume


@pytest.mark.parametrize("name", REAL_MAPS)
def test_real_maps_are_never_repaired(name: str) -> None:
    with mrcfile.open(real_map(name), permissive=True) as stream:
        volume = np.ascontiguousarray(stream.data, dtype=np.float32)
    assert validate.repair_extreme_voxels(volume, name) is volume


def _neighbour_median(volume: np.ndarray, z: int, y: int, x: int) -> float:
    block = volume[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2].copy()
    values = np.delete(block.ravel(), 13)  # all but the centre
    return float(np.median(values))


@pytest.mark.parametrize("value", [1e30, -1e30, 5e6])
def test_isolated_extreme_voxels_are_replaced_by_their_neighbours(value: float) -> None:
    volume = _map()
    spiked = volume.copy()
    spiked[2, 3, 4] = value
    spiked[20, 21, 22] = value
    before = spiked.copy()
    with pytest.warns(DemhxWarning, match=r"m\.mrc: 2 voxel\(s\) lie far outside"):
        repaired = validate.repair_extreme_voxels(spiked, "m.mrc")
    np.testing.assert_array_equal(spiked, before)  # the input is never modified
    others = np.ones(volume.shape, bool)
    others[2, 3, 4] = others[20, 21, 22] = False
    np.testing.assert_array_equal(repaired[others], volume[others])
    for z, y, x in ((2, 3, 4), (20, 21, 22)):
        assert repaired[z, y, x] == pytest.approx(_neighbour_median(volume, z, y, x))


def test_a_masked_map_with_a_spike_is_repaired() -> None:
    volume = np.zeros((30, 30, 30), np.float32)
    volume[10:20, 10:20, 10:20] = np.random.default_rng(1).uniform(1, 2, (10, 10, 10))
    volume[0, 0, 0] = 1e20
    with pytest.warns(DemhxWarning):
        repaired = validate.repair_extreme_voxels(volume, "masked")
    assert repaired[0, 0, 0] == 0.0 and repaired.max() <= 2.0


@pytest.mark.parametrize("scale", [1e30, 1e20, 1e-20, 1e-30])
def test_a_map_of_absurd_scale_is_refused(scale: float) -> None:
    with pytest.raises(ValueError, match="scaled: typical density values are of order"):
        validate.repair_extreme_voxels(_map() * np.float32(scale), "scaled")


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 1.0, 1e3, 1e9])
def test_ordinary_scales_pass_unchanged(scale: float) -> None:
    volume = _map() * np.float32(scale)
    assert validate.repair_extreme_voxels(volume, "ok") is volume


def test_constant_and_tiny_maps_are_left_to_the_normalisation() -> None:
    constant = np.ones((10, 10, 10), np.float32)
    assert validate.repair_extreme_voxels(constant, "c") is constant
    tiny = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    assert validate.repair_extreme_voxels(tiny, "t") is tiny


@pytest.mark.parametrize(("voxel", "ok"), [((0.2,) * 3, True), ((20.0,) * 3, True),
                                           ((1.0, 1.0, 0.19), False), ((20.01,), False),
                                           ((math.nan,), False), ((0.393, 0.448, 0.459), True)])
def test_voxel_size_range(voxel: tuple[float, ...], ok: bool) -> None:
    if ok:
        validate.check_voxel_size(voxel, "x", "fix")
        return
    with pytest.raises(ValueError, match=r"x .* Å is outside the range demhx accepts \(0\.2–20 "
                       r"Å\); fix"):
        validate.check_voxel_size(voxel, "x", "fix")


def test_grid_bound() -> None:
    validate.check_grid((1024, 1024, 2048), "grid", "fix")  # exactly 2**31 voxels
    with pytest.raises(ValueError, match="grid 1024×1024×2049 voxels"):
        validate.check_grid((1024, 1024, 2049), "grid", "fix")


def test_output_gate() -> None:
    good = _map()
    validate.check_output(good, float(np.abs(good).max()), "o.mrc", "model m", "why")
    with pytest.raises(RuntimeError, match=r"the output is all zero \(why\); nothing written "
                       r"to o\.mrc"):
        validate.check_output(np.zeros_like(good), 1.0, "o.mrc", "model m", "why")
    bad = good.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(RuntimeError, match="model m produced 1 NaN or infinite voxels"):
        validate.check_output(bad, 1.0, "o.mrc", "model m", "why")
    with pytest.raises(RuntimeError, match="model m produced values up to .* out of all "
                       "proportion"):
        validate.check_output(good * np.float32(1e4), float(np.abs(good).max()), "o.mrc",
                              "model m", "why")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_and_count_agree_with_isfinite(bad: float, dtype: type) -> None:
    """The min/max test and the slab count give isfinite's answer wherever the bad values
    sit (first, last, several), for both float widths; -0.0 and huge finite values pass."""
    rng = np.random.default_rng(3)
    volume = rng.standard_normal((9, 700, 31)).astype(dtype)  # slabs of a few planes
    volume[0, 0, 0], volume[4, 5, 6] = -0.0, np.finfo(dtype).max
    assert validate.all_finite(volume) and validate.count_nonfinite(volume) == 0
    for places in ([(0, 0, 0)], [(8, 699, 30)], [(1, 2, 3), (7, 600, 1), (8, 0, 30)]):
        broken = volume.copy()
        for place in places:
            broken[place] = bad
        assert not validate.all_finite(broken)
        assert validate.count_nonfinite(broken) == len(places) == int(
            broken.size - np.count_nonzero(np.isfinite(broken)))
        assert not validate.all_finite(broken[:, :, ::-1])  # any layout


def test_all_finite_on_integers_empty_and_mixed_bad_values() -> None:
    assert validate.all_finite(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    assert validate.all_finite(np.zeros((0, 3, 4), np.float32))
    assert validate.count_nonfinite(np.zeros((0, 3, 4), np.float32)) == 0
    mixed = np.zeros((3, 4, 5), np.float32)
    mixed[0, 0, 0], mixed[2, 3, 4] = np.inf, -np.inf  # min -inf, max inf
    assert not validate.all_finite(mixed) and validate.count_nonfinite(mixed) == 2


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_output_gate_peak_and_zero_from_min_and_max(sign: float) -> None:
    """An all-negative (or all-positive) output's peak is its largest magnitude; an output
    of -0.0 only is all zero; one non-zero voxel is enough to pass."""
    out = np.full((6, 7, 8), sign * 2.0, np.float32)
    out[3, 3, 3] = sign * 50.0
    validate.check_output(out, 50.0 / validate.MAX_OUTPUT_RATIO + 1e-3, "o.mrc", "m", "z")
    with pytest.raises(RuntimeError, match="values up to 50,"):
        validate.check_output(out, 50.0 / validate.MAX_OUTPUT_RATIO * 0.9, "o.mrc", "m", "z")
    with pytest.raises(RuntimeError, match="all zero"):
        validate.check_output(np.full((4, 4, 4), -0.0, np.float32), 1.0, "o.mrc", "m", "z")
    single = np.zeros((4, 4, 4), np.float32)
    single[1, 2, 3] = sign * 1e-30
    validate.check_output(single, 1.0, "o.mrc", "m", "z")
