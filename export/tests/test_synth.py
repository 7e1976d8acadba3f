"""The synthetic-map generator: determinism, FSC calibration, target masking, speed."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from demhx_export.metrics import fsc, fsc_resolution
from demhx_export.synth import SynthOptions, simulate_pair, synth_command

STRUCTURES = Path(__file__).resolve().parents[3] / "shared" / "data" / "structures"
# a small test-split structure (823 atoms, deposited B-factors)
SMALL = STRUCTURES / "eqdb55__1WEJ_l_b.cif.gz"
# a small structure without meaningful B-factors (burial proxy)
FLAT_B = STRUCTURES / "eqdips__2b2e.pdb1_0_l.cif.gz"
# small boxes keep the tests fast
OPTIONS = SynthOptions(margin=(10.0, 12.0))

pytestmark = pytest.mark.skipif(not SMALL.is_file(), reason="structure corpus not present")


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(SMALL, 3.5, seed=0, options=OPTIONS)


def test_same_seed_same_arrays(pair) -> None:
    again = simulate_pair(SMALL, 3.5, seed=0, options=OPTIONS)
    for name in ("half1", "half2", "input", "target", "model_map"):
        np.testing.assert_array_equal(getattr(pair, name), getattr(again, name))
    assert json.dumps(pair.params) == json.dumps(again.params)


def test_other_seed_other_arrays(pair) -> None:
    other = simulate_pair(SMALL, 3.5, seed=1, options=OPTIONS)
    assert other.params["rotation_quaternion"] != pair.params["rotation_quaternion"]


def test_shapes_and_dtypes(pair) -> None:
    for name in ("half1", "half2", "input", "target", "model_map"):
        volume = getattr(pair, name)
        assert volume.dtype == np.float32
        assert volume.shape == (pair.params["box"],) * 3
    np.testing.assert_allclose(pair.input, 0.5 * (pair.half1 + pair.half2), atol=1e-6)


@pytest.mark.parametrize("resolution", [2.8, 3.5, 5.5])
def test_half_map_fsc_crosses_at_the_requested_resolution(resolution: float) -> None:
    sample = simulate_pair(SMALL, resolution, seed=2, options=OPTIONS)
    frequencies, values = fsc(sample.half1, sample.half2)
    assert fsc_resolution(frequencies, values, 0.143) == pytest.approx(resolution, abs=0.4)


def test_half_map_noise_is_independent_and_coloured(pair) -> None:
    noise1 = pair.half1 - pair.input
    spectrum = np.abs(np.fft.rfftn(noise1)) ** 2
    f = np.sqrt(sum(g**2 for g in np.meshgrid(np.fft.fftfreq(noise1.shape[0]),
                                              np.fft.fftfreq(noise1.shape[1]),
                                              np.fft.rfftfreq(noise1.shape[2]),
                                              indexing="ij")))
    low = spectrum[(f > 0.02) & (f < 0.06)].mean()
    high = spectrum[(f > 0.35) & (f < 0.45)].mean()
    assert low > 2 * high


def test_target_is_zero_outside_the_mask(pair) -> None:
    # the tight mask is the model map thresholded, dilated by 2 Å and softened over 3 Å:
    # nothing of the target lies farther than 6 Å from the modelled density
    from scipy import ndimage

    core = pair.model_map > np.quantile(pair.model_map, 0.5)
    far = ndimage.distance_transform_edt(~core) > 12
    assert np.count_nonzero(pair.target[far]) == 0
    assert np.count_nonzero(pair.target) < 0.5 * pair.target.size
    assert (pair.target[pair.signal_mask < 0.01] == 0).all()


def test_burial_proxy_used_without_deposited_bfactors() -> None:
    sample = simulate_pair(FLAT_B, 4.0, seed=0, options=OPTIONS)
    assert sample.params["bfactor_source"] == "burial"


def test_one_small_sample_is_fast() -> None:
    start = time.perf_counter()
    simulate_pair(SMALL, 4.0, seed=3, options=OPTIONS)
    assert time.perf_counter() - start < 10.0


def test_synth_command_writes_the_files(tmp_path: Path) -> None:
    mrcfile = pytest.importorskip("mrcfile")
    synth_command(str(SMALL), str(tmp_path / "out"), resolution=4.0, seed=0)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"half1.mrc", "half2.mrc", "input.mrc", "target.mrc", "model_map.mrc",
                     "params.json"}
    with mrcfile.open(tmp_path / "out" / "input.mrc") as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(1.0)
    assert json.loads((tmp_path / "out" / "params.json").read_text())["seed"] == 0


def test_resolution_beyond_nyquist_is_refused() -> None:
    with pytest.raises(ValueError, match="Nyquist"):
        simulate_pair(SMALL, 1.9, seed=0)


def test_local_scaling_against_itself_is_the_identity() -> None:
    from demhx_export.locscale import local_amplitude_scaling

    volume = np.random.default_rng(0).standard_normal((40, 40, 40)).astype(np.float32)
    scaled = local_amplitude_scaling(volume, volume, window=16, step=4)
    np.testing.assert_allclose(scaled, volume, atol=1e-4)


def test_local_scaling_restores_a_global_blur() -> None:
    # a map blurred by B = 60 Å², scaled against the sharp one, gets its amplitudes back
    from demhx_export.locscale import local_amplitude_scaling
    from demhx_export.metrics import frequency_radius, sharpen

    sharp = sharpen(np.random.default_rng(1).standard_normal((48, 48, 48)), 1.0, -20.0)
    blurred = sharpen(sharp, 1.0, -60.0)
    restored = local_amplitude_scaling(blurred, sharp)
    radius = frequency_radius(sharp.shape)
    band = (radius > 1 / 10) & (radius < 1 / 3)

    def amplitude(volume: np.ndarray) -> float:
        return float(np.abs(np.fft.rfftn(volume))[band].mean())

    assert amplitude(blurred) / amplitude(sharp) < 0.6
    assert amplitude(restored) / amplitude(sharp) == pytest.approx(1.0, abs=0.15)


def test_region_limits_the_work_and_the_output() -> None:
    from demhx_export.locscale import local_amplitude_scaling

    volume = np.random.default_rng(2).standard_normal((40, 40, 40)).astype(np.float32)
    region = np.zeros(volume.shape, dtype=bool)
    region[16:24, 16:24, 16:24] = True
    scaled = local_amplitude_scaling(volume, volume, region=region, window=16, step=4)
    np.testing.assert_allclose(scaled[region], volume[region], atol=1e-4)
    assert (scaled[:8] == 0).all()


def test_spherical_mask_never_cuts_the_molecule() -> None:
    options = SynthOptions(margin=(10.0, 12.0), sphere_mask_probability=1.0)
    sample = simulate_pair(SMALL, 4.0, seed=4, options=options)
    assert sample.params["sphere_radius"] >= sample.params["molecule_radius"] + 6.0
    assert np.isfinite(sample.target).all()
    assert np.abs(sample.target).max() < 50 * np.abs(sample.input).max()


def _sample_with_unmodelled_density() -> object:
    """The first seed whose sample leaves a slab of the molecule out of the model."""
    for seed in range(20):
        sample = simulate_pair(SMALL, 3.5, seed=seed, options=OPTIONS)
        if sample.unmodelled_region is not None and sample.unmodelled_region.sum() > 50:
            return sample
    raise AssertionError("no seed below 20 drew unmodelled density")


def test_truth_target_keeps_what_the_model_lacks() -> None:
    sample = _sample_with_unmodelled_density()
    region = sample.unmodelled_region
    inside = sample.model_map > np.quantile(sample.model_map, 0.99)
    truth, locscale = sample.targets["truth"], sample.targets["locscale"]
    # the truth target holds the unmodelled slab at a fair fraction of the molecule's level ...
    assert truth[region].mean() > 0.2 * truth[inside].mean()
    # ... where the model-masked LocScale-style target has (almost) erased it
    assert locscale[region].mean() < 0.5 * truth[region].mean() / truth[inside].mean() \
        * locscale[inside].mean()
    assert sample.target is sample.targets["locscale"]


def test_every_recipe_is_finite_and_chosen_by_name(pair) -> None:
    assert set(pair.targets) == {"locscale", "locscale-full", "truth"}
    for name, target in pair.targets.items():
        assert target.shape == pair.input.shape and np.isfinite(target).all(), name
    chosen = simulate_pair(SMALL, 3.5, seed=0, options=replace(OPTIONS, target_recipe="truth"))
    np.testing.assert_array_equal(chosen.target, pair.targets["truth"])
    with pytest.raises(ValueError, match="recipe"):
        simulate_pair(SMALL, 3.5, seed=0, options=replace(OPTIONS, target_recipe="sharp"))


def test_deposited_mask_zeroes_the_outside_and_changes_nothing_else(pair) -> None:
    masked = simulate_pair(SMALL, 3.5, seed=0,
                           options=replace(OPTIONS, deposited_mask_probability=1.0))
    assert masked.params["deposited"] == "soft mask"
    outside = masked.input == 0
    assert 0.2 < outside.mean() < 0.99
    # inside the mask's core the input is the unmasked one; the targets are untouched
    core = masked.input == pair.input
    assert core.mean() > 0.05
    for name in pair.targets:
        np.testing.assert_array_equal(masked.targets[name], pair.targets[name])
    assert masked.params["noise_std"] == pair.params["noise_std"]


def test_zone_cuts_input_and_targets_alike(pair) -> None:
    zoned = simulate_pair(SMALL, 3.5, seed=0, options=replace(OPTIONS, zone_probability=1.0))
    assert zoned.params["deposited"] == "zone"
    outside = zoned.input == 0
    assert outside.mean() > 0.5
    for target in zoned.targets.values():
        assert (target[outside] == 0).all()
