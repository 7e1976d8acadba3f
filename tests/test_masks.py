"""Masks honoured: a masked map's output is exactly 0 outside the map's own mask, and
``--mask`` has one meaning (it marks the particle; the noise is measured outside it) in the
help, the README, the log and the code. On every shared masked map, with the tiny models of
onnx_fixtures (and the default model on the smallest)."""

from __future__ import annotations

import re
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import real_map, synthetic_map
from onnx_fixtures import smooth_model, write_model

import demhx
from demhx import _command, cli, mrcio, normalise
from demhx.errors import cli_terms

MASKED_MAPS = ["2566_3J6B_9.mrc", "emd_21457_seg.mrc", "emd_21457_seg_nstart.mrc",
               "emd_21457_seg_orig0.mrc", "emd_5168_monomer.mrc"]
UNMASKED_MAPS = ["emd_5168.map", "6824.mrc", "EMD-3001.map"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def smooth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smooth network with zero padding: it spreads density beyond the mask's edge."""
    return write_model(tmp_path_factory.mktemp("models"), "smooth.onnx", smooth_model())


# --------------------------------------------------------------------------- the map's mask


@pytest.mark.parametrize("name", MASKED_MAPS)
def test_the_outside_of_a_masked_map_is_its_constant_region(name: str) -> None:
    volume = np.asarray(mrcio.read_map(real_map(name)).data, dtype=np.float32)
    outside = normalise.masked_outside(volume)
    assert outside is not None
    value = volume[outside][0]
    assert np.all(volume[outside] == value)  # one exact value outside ...
    # ... and every voxel of that value next to another one of it is outside.
    equal = volume == value
    from scipy import ndimage
    paired = equal & (ndimage.convolve(equal.astype(np.int8), np.ones((3, 3, 3), np.int8),
                                       mode="constant") > 1)
    assert np.count_nonzero(paired & ~outside) <= 0.01 * np.count_nonzero(outside)


@pytest.mark.parametrize("name", UNMASKED_MAPS)
def test_unmasked_maps_have_no_outside(name: str) -> None:
    volume = np.asarray(mrcio.read_map(real_map(name)).data, dtype=np.float32)
    assert normalise.masked_outside(volume) is None


def test_a_soft_mask_s_outside_is_exactly_where_the_mask_is_zero() -> None:
    volume = synthetic_map("centred", noise_mean=0.0)
    grid = np.indices(volume.shape) - 23.5
    radius = np.sqrt((grid ** 2).sum(axis=0))
    mask = np.clip((20 - radius) / 5, 0, 1).astype(np.float32)  # soft edge 15-20 voxels out
    outside = normalise.masked_outside(volume * mask)
    assert outside is not None
    np.testing.assert_array_equal(outside, mask == 0)
    inside = volume * mask
    inside[24, 24, 24] = 0.0  # an isolated zero inside the density stays inside
    assert not normalise.masked_outside(inside)[24, 24, 24]


@pytest.mark.parametrize("name", MASKED_MAPS)
def test_masked_maps_come_out_exactly_zero_outside_their_mask(name: str, smooth: Path,
                                                              tmp_path: Path) -> None:
    source, output, spread = real_map(name), tmp_path / "out.mrc", tmp_path / "spread.mrc"
    outside = normalise.masked_outside(np.asarray(mrcio.read_map(source).data))
    assert outside is not None
    demhx.enhance_file(source, output, model=smooth, device="cpu", threads=1, tiling="fast",
                       confidence=spread, tta=3)
    enhanced, confidence = mrcio.read_map(output).data, mrcio.read_map(spread).data
    assert np.all(enhanced[outside] == 0) and np.all(confidence[outside] == 0)
    assert np.abs(enhanced[~outside]).max() > 0


def test_the_network_alone_would_leak_outside_the_mask(smooth: Path) -> None:
    """What the zeroing removes: the smooth network spreads the monomer beyond its mask."""
    item = mrcio.read_map(real_map("emd_5168_monomer.mrc"))
    volume = np.asarray(item.data, dtype=np.float32)
    outside = normalise.masked_outside(volume)
    runner = demhx.Enhancer(smooth, device="cpu", threads=1)
    options = demhx.EnhanceOptions(tiling="fast")
    kept = pytest.MonkeyPatch.context()
    with kept as patch:
        patch.setattr(normalise, "masked_outside", lambda v: None)
        leaked = runner.process(volume, item.voxel_size, options).map
    zeroed = runner.process(volume, item.voxel_size, options).map
    assert np.abs(leaked[outside]).max() > 0.01 * np.abs(leaked).max()
    assert np.all(zeroed[outside] == 0)
    np.testing.assert_array_equal(zeroed[~outside], leaked[~outside])


@pytest.mark.slow
def test_the_default_model_leaves_the_monomer_s_outside_empty(tmp_path: Path) -> None:
    """emd_5168_monomer.mrc: zeros outside its mask reached 12 % of the output's peak. Inside,
    the output follows the input (the output check)."""
    source = real_map("emd_5168_monomer.mrc")
    summary = demhx.enhance_file(source, tmp_path / "out.mrc", device="cpu", threads=1,
                                 tiling="fast")
    output = mrcio.read_map(tmp_path / "out.mrc").data
    outside = normalise.masked_outside(np.asarray(mrcio.read_map(source).data))
    assert outside is not None and np.all(output[outside] == 0)
    fidelity = summary.info.fidelity
    assert fidelity is not None and fidelity.gain > 0.9 and fidelity.cc > 0.85


# --------------------------------------------------------------------------- --mask


def _particle_and_mask(tmp_path: Path) -> tuple[Path, Path]:
    """An unmasked synthetic map and a mask of 10 % of its box around the particle."""
    volume = synthetic_map("centred", noise_mean=0.3, noise_std=0.05)
    grid = np.indices(volume.shape) - 23.5
    mask = (np.sqrt((grid ** 2).sum(axis=0)) < 0.29 * 48).astype(np.float32)
    assert 0.08 < mask.mean() < 0.12
    paths = []
    for name, data in (("map.mrc", volume), ("mask.mrc", mask)):
        with mrcfile.new(tmp_path / name) as stream:
            stream.set_data(data)
            stream.voxel_size = 1.0
        paths.append(tmp_path / name)
    return paths[0], paths[1]


def test_the_log_says_where_the_noise_was_measured(tmp_path: Path, smooth: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An unmasked map with a 10 % mask used to be logged as a "masked map, noise from 61 % of
    the voxels inside the mask": the noise is measured outside the mask, in the box."""
    source, mask = _particle_and_mask(tmp_path)
    assert cli.main([str(source), str(tmp_path / "out.mrc"), "--mask", str(mask), "--model",
                     str(smooth), "--device", "cpu", "--tiling", "fast"]) == 0
    noise = [line for line in capsys.readouterr().err.splitlines() if "noise mean" in line]
    assert len(noise) == 1
    assert re.search(r"\(auto-masked: noise from \d+% of the box, outside --mask\)", noise[0])
    assert "masked map" not in noise[0] and "inside" not in noise[0]


def test_the_output_is_not_masked_by_the_user_s_mask(tmp_path: Path, smooth: Path) -> None:
    """Outside the mask the output is what a run without it gives (solvent cubes skipped in
    both), not zeros."""
    source, mask = _particle_and_mask(tmp_path)
    outputs = []
    for name, given in (("with.mrc", mask), ("without.mrc", None)):
        demhx.enhance_file(source, tmp_path / name, mask=given, model=smooth, device="cpu",
                           threads=1, tiling="fast")
        outputs.append(mrcio.read_map(tmp_path / name).data)
    outside = mrcio.read_map(mask).data == 0
    kept = [np.count_nonzero(output[outside]) for output in outputs]
    assert kept[0] > 0.2 * np.count_nonzero(outside) and kept[0] >= 0.9 * kept[1]


@pytest.mark.parametrize(("masks", "words"), [
    ("map", "masked map, noise from 30% of the voxels inside the map's own mask"),
    ("user", "noise from 30% of the box, outside --mask"),
    ("map and user", "masked map, noise from 30% of the voxels inside the map's own mask and "
                     "outside --mask"),
])
def test_describe_names_which_mask_bounded_the_noise(masks: str, words: str) -> None:
    stats = normalise.NoiseStats(0.3, 0.05, "auto-masked", 0.3, masks=masks)
    line = cli_terms(normalise.describe(stats))
    assert line == f"noise mean 0.3, std 0.05 (auto-masked: {words})"


def test_a_user_mask_without_solvent_outside_says_so() -> None:
    stats = normalise.NoiseStats(0.0, 0.25, "peak", 0.9, solvent_std=0.006, masks="user")
    line = cli_terms(normalise.describe(stats))
    assert "no solvent outside --mask (it covers 90% of the box)" in line
    assert "masked zone" not in line


def test_choose_stats_records_the_masks_it_used() -> None:
    volume = synthetic_map("centred", noise_mean=0.3, noise_std=0.05)
    grid = np.indices(volume.shape) - 23.5
    particle = (np.sqrt((grid ** 2).sum(axis=0)) < 14).astype(np.float32)
    assert normalise.choose_stats(volume, (1.0,) * 3, particle).masks == "user"
    sphere = (np.sqrt((grid ** 2).sum(axis=0)) < 22).astype(np.float32)
    masked = volume * sphere
    assert normalise.choose_stats(masked, (1.0,) * 3).masks == "map"
    assert normalise.choose_stats(masked, (1.0,) * 3, particle).masks == "map and user"


def test_help_and_readme_give_mask_one_meaning() -> None:
    """The help, the README and the API's docstring say the same: the mask marks the particle,
    the noise is measured outside it, and the output is not masked by it."""
    line = " ".join(_command.HELP[_command.HELP.index("  --mask PATH"):].split("\n  --out-dir")[0]
                    .split())
    readme = " ".join(README.read_text(encoding="utf-8").split())
    api = " ".join((demhx.enhance.__doc__ or "").split())
    for text in (line, readme, api):
        assert "marks the particle" in text
        assert "measured outside it" in text
        assert "not masked by it" in text
    assert "normalise from the density inside it" not in line + api
