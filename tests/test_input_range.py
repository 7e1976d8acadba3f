"""What the network handles: the input-range checks before any cube runs, the output check
after the last (demhx.validate), on synthetic volumes, the tiny
models of onnx_fixtures and the shared real maps."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import enhance_with, real_map, synthetic_map
from onnx_fixtures import identity_path, metadata, scale_model, write_model

import demhx
from demhx import cli, mrcio, normalise, pipeline, validate
from demhx.errors import DemhxWarning

ONE = (1.0, 1.0, 1.0)  # Å
REAL_MAPS = ["emd_5168.map", "emd_5168_monomer.mrc", "2566_3J6B_9.mrc", "emd_21457_seg.mrc",
             "EMD-3001.map", "6824.mrc"]


def _real(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    item = mrcio.read_map(real_map(name))
    return np.asarray(item.data, dtype=np.float32), item.voxel_size


def _stats(volume: np.ndarray, voxel: tuple[float, float, float]) -> tuple[float, float]:
    """The noise mean and measured std the runtime chooses for ``volume``."""
    stats = normalise.choose_stats(volume, voxel)
    return stats.mean, stats.widened_from or stats.std


def _no_cube_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cube ran although the input was out of range")
    monkeypatch.setattr(pipeline, "_on_model_grid", never)


# --------------------------------------------------------------------------- voxel size


@pytest.mark.parametrize("ratio", [0.1, 0.24, 4.1, 10.0, 17.42])
def test_voxel_sizes_far_from_the_models_are_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"^m\.mrc: voxel size .* (times|of) the model's 1 Å, "
                       r"outside the 0\.25–4 times it handles: .*pass voxel_size= in Å"):
        validate.check_voxel_ratio((ratio, 1.0, 1.0) if ratio < 1 else (1.0, ratio, 1.0),
                                   1.0, "m.mrc")


@pytest.mark.parametrize(("ratio", "message"), [(0.3, "keeps no detail finer than 2 Å"),
                                                (0.45, "keeps no detail finer than 2 Å"),
                                                (3.5, "cannot resolve better than 7 Å")])
def test_voxel_sizes_at_the_edges_warn(ratio: float, message: str) -> None:
    with pytest.warns(DemhxWarning, match=message):
        validate.check_voxel_ratio((ratio,) * 3, 1.0, "m.mrc")


@pytest.mark.parametrize("voxel", [(0.5, 0.5, 0.5), (1.0, 1.0, 1.0), (1.742,) * 3, (3.0,) * 3,
                                   (2.64, 1.0, 0.6)])
def test_voxel_sizes_the_network_handles_pass_quietly(voxel: tuple[float, ...]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate.check_voxel_ratio(voxel, 1.0, "m.mrc")


def test_a_tenfold_voxel_size_slip_is_refused_before_any_cube(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """EMD-5168's monomer at 1.742 Å given as 17.42 Å planned 2,165 cubes without a word."""
    _no_cube_may_run(monkeypatch)
    source, output = real_map("emd_5168_monomer.mrc"), tmp_path / "out.mrc"
    assert cli.main([str(source), str(output), "--voxel-size", "17.42", "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.splitlines()
    error = [line for line in lines if line.startswith("demhx: error: ")]
    assert len(error) == 1 and "emd_5168_monomer.mrc: voxel size 17.42" in error[0]
    assert "17.4 times the model's 1 Å" in error[0] and "--voxel-size" in error[0]
    assert not output.exists()


# --------------------------------------------------------------------------- contrast


@pytest.mark.parametrize("name", REAL_MAPS)
def test_real_maps_point_up_and_inverted_ones_down(name: str) -> None:
    volume, voxel = _real(name)
    above, below = validate.density_mass(volume, *_stats(volume, voxel))
    validate.check_contrast(above, below, "auto", name)  # as deposited: accepted
    above, below = validate.density_mass(-volume, *_stats(-volume, voxel))
    assert below > above  # inverted: more density below the noise mean on every map
    if below >= validate.MIN_INVERTED_FRACTION:  # all but EMD-3001 (0.015 %; its run is empty)
        with pytest.raises(ValueError, match="contrast looks inverted.*multiply the map by -1"):
            validate.check_contrast(above, below, "auto", name)


@pytest.mark.parametrize(("shape", "std"), [((5, 7, 3), 0.1), ((33, 17, 20), 0.1),
                                            ((40, 40, 40), 1.0), ((40, 40, 40), 0.1)])
def test_pure_noise_is_neither_inverted_nor_warned_about(shape: tuple[int, int, int],
                                                         std: float) -> None:
    """Noise is symmetric about its mean, whatever std it is said to have."""
    for seed in range(5):
        noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        for volume in (noise, -noise):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                validate.check_contrast(*validate.density_mass(volume, 0.0, std), "user",
                                        "noise")
    for correlation in (0.0, 1.5):
        from scipy import ndimage
        noise = np.random.default_rng(3).standard_normal((40, 40, 40)).astype(np.float32)
        noise = ndimage.gaussian_filter(noise, correlation) if correlation else noise
        upper, _ = validate.density_tails(noise, *_stats(noise, (1.0, 1.0, 1.0)))
        assert upper < validate.NOISE_PEAK_SIGMAS
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            validate.warn_low_peak(upper, "auto", "noise")


def test_an_inverted_map_is_refused_before_any_cube(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cube_may_run(monkeypatch)
    volume, voxel = _real("emd_5168_monomer.mrc")
    runner = demhx.Enhancer(identity_path(tmp_path), device="cpu", threads=1)
    with pytest.raises(ValueError, match=r"^inverted\.mrc: 4\.03% of the voxels lie more than 5 "
                       r"noise stds below the noise mean \(peak\) and only 0\.00% as far "
                       r"above it: the contrast looks inverted .*; multiply the map by -1$"):
        runner.process(-volume, voxel, demhx.EnhanceOptions(), name="inverted.mrc")


# --------------------------------------------------------------------------- noise statistics


@pytest.mark.filterwarnings("ignore::demhx.errors.DemhxWarning")  # -3: beyond the peak range
@pytest.mark.parametrize("mean", [5.0, -3.0, 0.9])
def test_a_noise_mean_away_from_the_solvent_is_refused(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       mean: float) -> None:
    """2566's zone spans -0.39 to 0.86; a mean above every voxel turned it into garbage."""
    _no_cube_may_run(monkeypatch)
    source, output = real_map("2566_3J6B_9.mrc"), tmp_path / "out.mrc"
    with pytest.raises(ValueError, match=rf"2566_3J6B_9\.mrc: the noise mean {mean:g} \(user\) "
                       r"is not where the map's solvent is: .*\(noise_stats=MEAN,STD\)"):
        demhx.enhance_file(source, output, noise_stats=(mean, 0.08),
                           model=identity_path(tmp_path), device="cpu", threads=1)
    assert not output.exists()


def test_a_noise_mean_given_too_high_is_refused_naming_it(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """3 noise stds too high: the solvent below the mean looks like inverted density."""
    _no_cube_may_run(monkeypatch)
    runner = demhx.Enhancer(identity_path(tmp_path), device="cpu", threads=1)
    volume = synthetic_map("centred", noise_mean=0.3, noise_std=0.05)
    with pytest.raises(ValueError, match=r"looks inverted .*; check the noise mean given "
                       r"\(noise_stats=\) or multiply the map by -1$"):
        runner.process(volume, 1.0, demhx.EnhanceOptions(noise_stats=(0.45, 0.05)))


def test_the_measured_noise_of_every_real_map_sits_in_its_solvent() -> None:
    for name in REAL_MAPS:
        volume, voxel = _real(name)
        stats = normalise.choose_stats(volume, voxel)
        validate.check_noise_level(volume, stats.mean, stats.widened_from or stats.std,
                                   stats.method, name)


def test_a_peak_below_the_trained_range_is_warned_about() -> None:
    """EMD-3001 (a MicroED crystal map, density everywhere) peaks at 5.6 noise stds."""
    volume, voxel = _real("EMD-3001.map")
    upper, _ = validate.density_tails(volume, *_stats(volume, voxel))
    assert validate.NOISE_PEAK_SIGMAS <= upper < validate.MIN_PEAK_SIGMAS
    with pytest.warns(DemhxWarning, match=r"EMD-3001\.map: the map peaks at only 5\.6 noise "
                      r"stds \(auto\).*noise_stats=MEAN,STD"):
        validate.warn_low_peak(upper, "auto", "EMD-3001.map")


# --------------------------------------------------------------------------- output check


def _particle() -> np.ndarray:
    return synthetic_map("centred", noise_mean=0.3, noise_std=0.05)


def test_a_faithful_output_passes_and_an_erased_or_inverted_one_fails() -> None:
    volume = _particle()
    density = volume - np.float32(0.3)
    faithful = validate.output_fidelity(volume, 1.2 * density, ONE, 0.3, 0.05)
    assert faithful is not None and faithful.gain == pytest.approx(1.2)
    assert faithful.cc == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate.check_fidelity(faithful, "m.mrc", "model x")
    for output, word in ((0.1 * density, "erased"), (-density, "erased or inverted")):
        fidelity = validate.output_fidelity(volume, output, ONE, 0.3, 0.05)
        with pytest.raises(RuntimeError, match=f"^model x {word}.*where m\\.mrc has density"):
            validate.check_fidelity(fidelity, "m.mrc", "model x")
    loose = validate.output_fidelity(volume, 0.3 * density, ONE, 0.3, 0.05)
    with pytest.warns(DemhxWarning, match="follows the map only loosely"):
        validate.check_fidelity(loose, "m.mrc", "model x")
    with pytest.warns(DemhxWarning, match="erased or inverted"):  # an untrained model: warned
        validate.check_fidelity(validate.output_fidelity(volume, 0 * density + 1e-3, ONE, 0.3,
                                                         0.05),
                                "m.mrc", "model x", strict=False)


@pytest.mark.parametrize("output", ["zeros", "noise", "half"])
def test_noise_in_may_give_nothing_out(output: str) -> None:
    """Pure noise has no density to follow: whatever the network returns for it passes."""
    noise = np.random.default_rng(5).normal(0.3, 0.05, (40, 40, 40)).astype(np.float32)
    result = {"zeros": np.zeros_like(noise),
              "noise": np.random.default_rng(6).normal(0, 0.05, noise.shape),
              "half": 0.5 * (noise - np.float32(0.3))}[output]
    assert validate.output_fidelity(noise, result, ONE, 0.3, 0.05) is None


def test_the_microed_map_is_not_erased_silently(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """EMD-3001 (0.39-0.46 Å voxels) came out with a tenth of its amplitude, exit 0, under
    an older default model. Whatever the shipped model makes of it, the user is told: the
    voxel size and the low peak before the run, and after it either a refusal (an erased
    output, nothing written) or a warning that the output follows the map only loosely."""
    source, output = real_map("EMD-3001.map"), tmp_path / "out.mrc"
    status = cli.main([str(source), str(output), "--device", "cpu", "-q"])
    lines = capsys.readouterr().err.splitlines()
    warned = [line for line in lines if line.startswith("demhx: warning: ")]
    assert any("is 1/2.55 of the model's 1 Å" in line for line in warned)
    assert any("peaks at only 5.6 noise stds" in line for line in warned)
    if status == 1:
        assert lines[-1].startswith("demhx: error: model tight-fast") and "erased" in lines[-1]
        assert "nothing written" in lines[-1] and not output.exists()
    else:
        assert status == 0 and output.exists()
        assert any("follows the map only loosely" in line for line in warned)


@pytest.mark.filterwarnings("ignore:.*marked untrained:demhx.errors.DemhxWarning")
def test_an_untrained_model_that_erases_only_warns(tmp_path: Path) -> None:
    path = write_model(tmp_path, "weak.onnx", scale_model(0.05, meta=metadata(trained="false")))
    runner = demhx.Enhancer(path, device="cpu", threads=1)
    with pytest.warns(DemhxWarning, match=r"weak\.onnx\].* erased or inverted the map"):
        out = enhance_with(runner, _particle(), 1.0, tiling="fast")
    assert np.any(out != 0)


def test_the_default_model_passes_the_output_check_on_a_real_map() -> None:
    """On 2566's zone (the monomer: tests/test_masks.py)."""
    volume, voxel = _real("2566_3J6B_9.mrc")
    runner = demhx.Enhancer(device="cpu", threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DemhxWarning)
        enhanced = runner.process(volume, voxel, demhx.EnhanceOptions(tiling="fast"))
    fidelity = enhanced.info.fidelity
    assert fidelity is not None and fidelity.gain > 0.9 and fidelity.cc > 0.85


def test_the_array_api_refuses_an_all_zero_output_of_a_map_with_density(tmp_path: Path
                                                                         ) -> None:
    """A model that returns zeros erased the particle: the array API says so, as the file
    path does, instead of returning an all-zero map."""
    path = write_model(tmp_path, "zero.onnx", scale_model(0.0))
    for call in (lambda: demhx.enhance(_particle(), 1.0, model=str(path), device="cpu",
                                       threads=1),
                 lambda: demhx.Enhancer(path, device="cpu", threads=1).process(_particle(), 1.0)):
        with pytest.raises(RuntimeError, match=r"zero\.onnx\].* erased or inverted the map"):
            call()


def test_the_array_api_warns_when_noise_gives_an_all_zero_output(tmp_path: Path) -> None:
    """Noise in, nothing out is a legitimate result; it comes with a warning naming why."""
    noise = np.random.default_rng(1).normal(0, 0.1, (48, 48, 48)).astype(np.float32)
    with pytest.warns(DemhxWarning, match=r"all zero \(all \d+ cubes were skipped as solvent"):
        out = demhx.enhance(noise, 1.0, model=str(identity_path(tmp_path)), device="cpu",
                            threads=1)
    assert not out.any()
