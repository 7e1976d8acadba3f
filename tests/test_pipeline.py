"""The pipeline end to end with small ONNX fixtures: identity, scaling, half-maps, odd boxes."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import enhance_with, run_with
from onnx_fixtures import CUBE, identity_path, masking_model, scale_model, smooth_model, write_model

import demhx
from demhx import augment, normalise, pipeline
from demhx.errors import DemhxWarning
from demhx.normalise import NoiseStats
from demhx.tiling import TilingScheme

# The fixtures' blobs stand far above their weak noise (up to ~300 noise stds), beyond the
# range the trained network knows; the pipeline's warning about it is tested on its own below.
pytestmark = pytest.mark.filterwarnings("ignore:.*the network was trained on")

MAPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maps"
SCHEMES = ["default", "reference"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "identity": identity_path(folder),
        "double": write_model(folder, "double.onnx", scale_model(2.0)),
        "smooth": write_model(folder, "smooth.onnx", smooth_model()),
        "masked": write_model(folder / "m", "masked.onnx", scale_model(
            1.0, meta=_meta(normalisation="mask"))),
    }


@pytest.fixture(scope="module")
def identity(models: dict[str, Path]) -> pipeline.Enhancer:
    return pipeline.Enhancer(models["identity"], device="cpu", threads=1)


def _meta(**overrides: object) -> dict[str, str]:
    from onnx_fixtures import metadata

    return metadata(**overrides)


def _noise(shape: tuple[int, int, int], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _blobby(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    """A smooth particle (Gaussian blobs) in weak noise: solvent around, density inside."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    volume = np.zeros(shape, np.float32)
    centre = np.array(shape, np.float32)[:, None] / 2
    for point in (centre + rng.uniform(-0.2, 0.2, (3, 6)) * np.array(shape)[:, None]).T:
        distance = sum((g - p) ** 2 for g, p in zip(grid, point, strict=True))
        volume += np.exp(-distance / (2 * 2.5 ** 2)).astype(np.float32)
    return volume + _noise(shape, seed, 0.01)


def _write_mrc(path: Path, data: np.ndarray, voxel_size: float = 1.0) -> Path:
    with mrcfile.new(path, overwrite=True) as stream:
        stream.set_data(np.ascontiguousarray(data, np.float32))
        stream.voxel_size = voxel_size
        stream.header.nxstart, stream.header.nystart, stream.header.nzstart = -3, 4, 7
        stream.header.origin = (1.5, -2.0, 3.25)
    return path


@pytest.mark.parametrize("tiling", SCHEMES)
@pytest.mark.parametrize("shape", [(5, 7, 3), (23, 41, 37), (16, 16, 16), (33, 17, 20)])
def test_identity_model_returns_the_input(identity: pipeline.Enhancer, tiling: str,
                                          shape: tuple[int, int, int]) -> None:
    volume = _noise(shape)
    result = enhance_with(identity, volume, 1.0, noise_stats=(0.0, 0.1), tiling=tiling)
    assert result.shape == shape and result.dtype == np.float32
    np.testing.assert_allclose(result, volume, rtol=1e-5, atol=1e-5)


def test_identity_with_estimated_noise_removes_the_solvent_mean(
        identity: pipeline.Enhancer) -> None:
    volume = _blobby((40, 36, 44)) + np.float32(0.3)
    no_skip = TilingScheme("no-skip", CUBE // 2, "cosine", None)
    result, info = run_with(identity, volume, 1.0, tiling=no_skip)
    assert info.noise.method not in ("user", "mask")
    np.testing.assert_allclose(result, volume - np.float32(info.noise.mean), rtol=1e-4,
                               atol=1e-4 * float(np.abs(volume).max()))


def test_identity_round_trip_through_resampling(identity: pipeline.Enhancer) -> None:
    volume = _blobby((30, 26, 34))
    result, info = run_with(identity, volume, (1.3, 1.1, 0.9), noise_stats=(0.0, 0.1),
                                tiling="reference")
    assert info.model_shape != volume.shape and result.shape == volume.shape
    error = np.abs(result - volume).max() / np.abs(volume).max()
    assert error < 0.02


def test_scale_model_scales(models: dict[str, Path]) -> None:
    volume = _noise((20, 21, 22)) + np.float32(0.5)  # noise about the mean it is given
    result = demhx.enhance(volume, 1.0, model=models["double"], noise_stats=(0.5, 0.2),
                           device="cpu", tiling="reference")
    np.testing.assert_allclose(result, 2 * (volume - np.float32(0.5)), rtol=1e-5, atol=1e-5)


def test_half_maps_equal_their_average(identity: pipeline.Enhancer) -> None:
    half1, half2 = _blobby((30, 30, 30), 3), _blobby((30, 30, 30), 4)
    average = (half1 + half2) / 2
    from_halves = enhance_with(identity, half1, 1.0, half2=half2)
    np.testing.assert_array_equal(from_halves, enhance_with(identity, average, 1.0))
    with pytest.raises(ValueError, match="half-map 2: shape .* differs"):
        enhance_with(identity, half1, 1.0, half2=half2[:, :, :-1])


def test_batched_equals_one_by_one(models: dict[str, Path]) -> None:
    volume = _blobby((40, 30, 50))
    results = [demhx.enhance(volume, 1.0, model=models["smooth"], device="cpu", batch_size=b,
                             noise_stats=(0.0, 0.01), tiling="reference") for b in (1, 7)]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_runs_are_bitwise_deterministic(models: dict[str, Path]) -> None:
    enhancer = pipeline.Enhancer(models["smooth"], device="cpu", batch_size=3)
    volume = _blobby((36, 40, 28))
    first, second = (enhance_with(enhancer, volume, 1.1) for _ in range(2))
    np.testing.assert_array_equal(first, second)


def test_default_tiling_skips_solvent_and_stays_close_to_reference(
        models: dict[str, Path]) -> None:
    enhancer = pipeline.Enhancer(models["smooth"], device="cpu")
    volume = _blobby((64, 64, 64))
    reference, ref_info = run_with(enhancer, volume, 1.0, tiling="reference")
    default, info = run_with(enhancer, volume, 1.0, tiling="default")
    assert ref_info.cubes.skipped == 0 and info.cubes.skipped > 0
    assert info.cubes.run < ref_info.cubes.run / 8
    # The fixture's zero-padded 5³ convolutions get every cube's outer 4 voxels wrong; the
    # reference averages 64 predictions per voxel, the default about 1 to 8, both uniformly.
    # The CC >= 0.99 bar is measured with the trained model (bench/tiling_study.py).
    correlation = np.corrcoef(reference.ravel(), default.ravel())[0, 1]
    assert correlation > 0.98


def test_mask_model_needs_a_mask(models: dict[str, Path]) -> None:
    enhancer = pipeline.Enhancer(models["masked"], device="cpu")
    volume = _blobby((20, 20, 20))
    with pytest.raises(ValueError, match="masked.onnx: .* expects masked input.*mask="):
        enhance_with(enhancer, volume, 1.0)
    mask = np.zeros(volume.shape, np.float32)
    mask[5:15, 5:15, 5:15] = 1
    no_skip = TilingScheme("no-skip", CUBE // 2, "cosine", None)
    result = enhance_with(enhancer, volume, 1.0, mask=mask, noise_stats=(0.0, 0.1), tiling=no_skip)
    np.testing.assert_allclose(result, volume * mask, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask: shape"):
        enhance_with(enhancer, volume, 1.0, mask=mask[1:])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"voxel_size": 0.0}, "voxel size 0.0 Å"),
    ({"voxel_size": (1.0, float("nan"), 1.0)}, "voxel size"),
    ({"tiling": "quick"}, "tiling='quick'"),
    ({"noise_stats": (1.0, 2.0, 3.0)}, "two values"),
])
def test_bad_arguments(identity: pipeline.Enhancer, kwargs: dict, message: str) -> None:
    options = {"voxel_size": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        enhance_with(identity, _noise((8, 8, 8)), **options)


def test_bad_volumes(identity: pipeline.Enhancer) -> None:
    volume = _noise((8, 8, 8))
    volume[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        enhance_with(identity, volume, 1.0)
    with pytest.raises(ValueError, match="not a 3-D"):
        enhance_with(identity, np.zeros((8, 8), np.float32), 1.0)
    with pytest.raises(ValueError, match="not real numbers"):
        enhance_with(identity, np.zeros((8, 8, 8), np.complex64), 1.0)


def test_enhancer_loads_the_model_once(identity: pipeline.Enhancer) -> None:
    runtime = identity.runtime
    enhance_with(identity, _noise((10, 10, 10)), 1.0, noise_stats=(0, 1))
    assert identity.runtime is runtime


def test_enhance_file_half_maps_equal_average_file(tmp_path: Path,
                                                   models: dict[str, Path]) -> None:
    half1, half2 = _blobby((26, 30, 34), 5), _blobby((26, 30, 34), 6)
    first = _write_mrc(tmp_path / "h1.mrc", half1, 1.2)
    second = _write_mrc(tmp_path / "h2.mrc", half2, 1.2)
    average = _write_mrc(tmp_path / "avg.mrc", (half1 + half2) / 2, 1.2)
    options = {"model": models["smooth"], "device": "cpu"}
    summary = demhx.enhance_file(first, tmp_path / "out1.mrc", half2=second, **options)
    demhx.enhance_file(average, tmp_path / "out2.mrc", **options)
    with mrcfile.open(tmp_path / "out1.mrc") as one, mrcfile.open(tmp_path / "out2.mrc") as two:
        np.testing.assert_array_equal(one.data, two.data)
        assert (int(one.header.nxstart), int(one.header.nystart), int(one.header.nzstart)) == (
            -3, 4, 7)
        assert one.data.shape == half1.shape and one.data.dtype == np.float32
    assert summary.half2 == second and summary.info.cubes.run > 0
    assert "wrote" in summary.line() and "34×30×26" in summary.line()


def test_enhance_file_interrupted_leaves_nothing(tmp_path: Path,
                                                 models: dict[str, Path]) -> None:
    source = _write_mrc(tmp_path / "in.mrc", _blobby((40, 40, 40)))
    before = source.read_bytes()

    def interrupt(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demhx.enhance_file(source, tmp_path / "out.mrc", model=models["identity"],
                           device="cpu", tiling="reference", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc"]
    assert source.read_bytes() == before


def _real_map_roundtrip(tmp_path: Path, name: str, models: dict[str, Path]) -> None:
    source = MAPS / name
    if not source.is_file():
        pytest.skip(f"{source} not available")
    output = tmp_path / "out.mrc"
    demhx.enhance_file(source, output, model=models["identity"], device="cpu")
    with mrcfile.open(source, permissive=True) as before, mrcfile.open(output) as after:
        for field in ("nx", "ny", "nz", "nxstart", "nystart", "nzstart", "mx", "my", "mz",
                      "mapc", "mapr", "maps", "origin", "cella", "cellb", "ispg"):
            np.testing.assert_array_equal(after.header[field], before.header[field], field)
        assert after.data.shape == before.data.shape and after.data.dtype == np.float32
        labels = [bytes(label).decode("ascii", "replace") for label in
                  after.header.label[:int(after.header.nlabl)]]
        assert any("demhx" in label for label in labels)
        assert np.isfinite(after.data).all()


def test_real_map_with_axis_order_312_and_anisotropic_voxels(tmp_path: Path,
                                                             models: dict[str, Path]) -> None:
    # A MicroED crystal map: its monoclinic cell (beta 94.3°) is processed, with a warning.
    with pytest.warns(DemhxWarning, match=r"EMD-3001\.map: cell angles 90/94\.326/90°"):
        _real_map_roundtrip(tmp_path, "EMD-3001.map", models)


def test_real_map_with_negative_nstart(tmp_path: Path, models: dict[str, Path]) -> None:
    _real_map_roundtrip(tmp_path, "emd_5168.map", models)


# ------------------------------------------------------ confidence (test-time augmentation)


@pytest.fixture(scope="module")
def rotation_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pipeline.Enhancer]:
    """Enhancers for a model that commutes with rotations (identity, masking) and one that not."""
    folder = tmp_path_factory.mktemp("rotation_models")
    paths = {"identity": identity_path(folder),
             "masking": write_model(folder, "masking.onnx", masking_model()),
             "smooth": write_model(folder, "smooth.onnx", smooth_model())}
    return {name: pipeline.Enhancer(path, device="cpu", threads=1)
            for name, path in paths.items()}


@pytest.mark.parametrize("tiling", SCHEMES)
def test_confidence_with_identity_model_is_the_plain_output(
        rotation_models: dict[str, pipeline.Enhancer], tiling: str) -> None:
    enhancer = rotation_models["identity"]
    volume = _blobby((21, 26, 19))
    plain, plain_info = run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling=tiling)
    (mean, spread), info = run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling=tiling,
                                        confidence=True, tta=24)
    np.testing.assert_array_equal(mean, plain)
    np.testing.assert_array_equal(spread, np.zeros_like(plain))
    assert spread.dtype == mean.dtype == np.float32 and spread.shape == volume.shape
    assert info.augmentations == 24 and plain_info.augmentations == 1
    assert info.cubes == plain_info.cubes


@pytest.mark.parametrize("tiling", SCHEMES)
def test_confidence_with_rotation_equivariant_model_has_no_spread(
        rotation_models: dict[str, pipeline.Enhancer], tiling: str) -> None:
    enhancer = rotation_models["masking"]
    volume = _blobby((24, 20, 28)) * np.float32(0.2)
    plain = enhance_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling=tiling)
    mean, spread = enhance_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling=tiling,
                                    confidence=True, tta=24)
    scale = float(np.abs(plain).max())
    np.testing.assert_allclose(mean, plain, rtol=0, atol=1e-5 * scale)
    assert spread.max() < 1e-5 * scale


@pytest.mark.parametrize("tiling", ["fast", "reference"])
def test_mean_is_the_mean_of_runs_on_rotated_maps(
        rotation_models: dict[str, pipeline.Enhancer], tiling: str) -> None:
    """Cube box with centred, symmetric tiling: turning the map turns the cube grid.

    (The adaptive default decides once, on the mean over rotations, which cubes to add, where
    separate runs on the rotated maps would each decide on their own.)"""
    enhancer = rotation_models["smooth"]
    volume = _blobby((24, 24, 24))
    options = {"noise_stats": (0.0, 0.01), "tiling": tiling}
    mean, spread = enhance_with(enhancer, volume, 1.0, confidence=True, tta=12, **options)
    runs = [rotation.inverse.apply(enhance_with(enhancer, rotation.apply(volume), 1.0, **options))
            for rotation in augment.SUBSETS[12]]
    expected = np.mean(runs, axis=0)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-5 * scale)
    assert spread.max() > 1e-3 * scale and float(np.abs(mean - runs[0]).max()) > 1e-3 * scale
    # The blended spread is at least the spread of the blended maps (a convex combination).
    assert np.all(spread >= np.std(runs, axis=0) - 1e-5 * scale)


def test_skipped_solvent_has_zero_spread(rotation_models: dict[str, pipeline.Enhancer]) -> None:
    enhancer = rotation_models["smooth"]
    volume = _noise((48, 40, 44), seed=2, scale=0.01)
    volume[4:14, 6:14, 5:12] += _blobby((10, 8, 7))
    (mean, spread), info = run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), confidence=True)
    assert info.cubes.skipped > 0 and info.augmentations == augment.DEFAULT_COUNT
    uncovered = mean == 0  # the model's background, where no run cube reaches
    assert uncovered.sum() > volume.size // 4
    np.testing.assert_array_equal(spread[uncovered], 0)
    assert spread[~uncovered].max() > 0 and np.all(spread >= 0)


def test_confidence_batched_equals_one_by_one_and_counts_evaluations(
        models: dict[str, Path]) -> None:
    volume = _blobby((22, 20, 21))
    results, reports = [], []
    for batch_size in (1, 7):
        reports.append([])
        results.append(demhx.enhance(volume, 1.0, model=models["smooth"], device="cpu",
                                     batch_size=batch_size, noise_stats=(0.0, 0.01),
                                     tiling="reference", confidence=True, tta=6,
                                     progress=lambda *counts: reports[-1].append(counts)))
    for first, second in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(first, second, rtol=1e-6, atol=1e-6)
    cubes = 3 * 2 * 3  # reference tiling of 22 × 20 × 21 with 16³ cubes at stride 4
    for progress in reports:
        assert progress[0] == (0, 6 * cubes) and progress[-1] == (6 * cubes, 6 * cubes)
        assert all(total == 6 * cubes for _, total in progress)


def test_without_confidence_the_run_is_unchanged(
        rotation_models: dict[str, pipeline.Enhancer]) -> None:
    enhancer = rotation_models["smooth"]
    volume = _blobby((30, 26, 34))
    plain = enhance_with(enhancer, volume, 1.1)
    np.testing.assert_array_equal(enhance_with(enhancer, volume, 1.1, confidence=False, tta=None),
                                  plain)
    averaged = enhance_with(enhancer, volume, 1.1, tta=4)  # the mean alone, no spread
    mean, _ = enhance_with(enhancer, volume, 1.1, confidence=True, tta=4)
    assert isinstance(averaged, np.ndarray)
    np.testing.assert_array_equal(averaged, mean)
    assert not np.array_equal(averaged, plain)


def test_enhance_file_writes_the_confidence_map_with_the_output_header(
        tmp_path: Path, models: dict[str, Path]) -> None:
    source = _write_mrc(tmp_path / "in.mrc", _blobby((26, 30, 22)), 1.2)
    output, confidence = tmp_path / "out.mrc", tmp_path / "spread.mrc"
    summary = demhx.enhance_file(source, output, confidence=confidence, tta=3,
                                 model=models["smooth"], device="cpu")
    with mrcfile.open(output) as out, mrcfile.open(confidence) as spread:
        for field in ("nx", "ny", "nz", "nxstart", "nystart", "nzstart", "mx", "my", "mz",
                      "mapc", "mapr", "maps", "origin", "cella", "cellb", "ispg"):
            np.testing.assert_array_equal(spread.header[field], out.header[field], field)
        assert spread.data.dtype == np.float32 and spread.data.shape == out.data.shape
        assert np.all(spread.data >= 0) and spread.data.max() > 0
        label = bytes(spread.header.label[int(spread.header.nlabl) - 1]).decode()
        assert "3 rotations" in label and "confidence" in label
    assert summary.confidence == confidence and summary.info.augmentations == 3
    assert f"wrote {output} and confidence {confidence}:" in summary.line()
    assert "cubes run × 3 rotations (TTA)" in summary.line()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"confidence": "out.mrc"}, ValueError, "confidence= is the output map itself"),
    ({"confidence": "in.mrc"}, ValueError, "output is the input"),
    ({"confidence": "exists.mrc"}, FileExistsError, "overwrite="),
    ({"confidence": "spread.txt"}, ValueError, "spread.txt"),
    ({"confidence": "spread.mrc", "tta": 5}, ValueError, "tta=5"),
    ({"tta": 2}, ValueError, "tta=2"),
])
def test_confidence_errors_write_nothing(tmp_path: Path, models: dict[str, Path],
                                         kwargs: dict, error: type, message: str) -> None:
    source = _write_mrc(tmp_path / "in.mrc", _blobby((20, 20, 20)))
    (tmp_path / "exists.mrc").write_bytes(b"keep")
    options = {key: tmp_path / value if key == "confidence" else value
               for key, value in kwargs.items()}
    with pytest.raises(error, match=message):
        demhx.enhance_file(source, tmp_path / "out.mrc", model=models["identity"],
                           device="cpu", **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.mrc", "in.mrc"]


def _flattened_map() -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int, int]]:
    """Weak noise (std 0.01) with a strong particle at one end (≈ 1000 noise stds) and a weak
    blob (≈ 20 noise stds) at the other, three cubes apart; the map and the two centres."""
    shape = (40, 40, 200)
    grid = np.indices(shape, dtype=np.float32)
    strong, weak = (20, 20, 30), (20, 20, 170)
    volume = _noise(shape, 3, 0.01)
    for centre, height, width in ((strong, 10.0, 4.0), (weak, 0.2, 2.5)):
        distance = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        volume += np.float32(height) * np.exp(-distance / (2 * width ** 2)).astype(np.float32)
    return volume, strong, weak


def test_flattened_solvent_warns_widens_and_still_runs_weak_density(
        identity: pipeline.Enhancer) -> None:
    volume, strong, weak = _flattened_map()
    assert demhx.DemhxWarning is DemhxWarning
    with pytest.warns(DemhxWarning, match=r"volume: the map peaks at \d+ noise stds .*"
                      r"normalised with std .* instead"):
        result, info = run_with(identity, volume, 1.0)
    noise = info.noise
    assert noise.widened_from is not None and noise.widened_from < noise.std / 10
    assert normalise.peak_sigmas(volume, noise) == pytest.approx(normalise.MAX_PEAK_SIGMAS,
                                                                  rel=1e-4)
    # Solvent cubes are still told by the measured noise: the weak blob (≈ 20 measured noise
    # stds, under 1 widened std) is enhanced, not replaced by the background.
    assert info.cubes.skipped > 0
    for centre in (strong, weak):
        assert result[centre] == pytest.approx(volume[centre] - noise.mean, rel=1e-3)
    assert "widened from" in normalise.describe(noise)


def test_user_noise_stats_beyond_the_range_warn_but_are_kept(
        identity: pipeline.Enhancer) -> None:
    volume, _, _ = _flattened_map()
    with pytest.warns(DemhxWarning, match="with noise_stats= std 0.01 the map peaks at"):
        _, info = run_with(identity, volume, 1.0, noise_stats=(0.0, 0.01))
    assert (info.noise.std, info.noise.widened_from) == (0.01, None)


def test_summary_names_the_cubes_the_self_check_added() -> None:
    from demhx.blend import TileCounts

    def summary(cubes: TileCounts) -> str:
        info = pipeline.RunInfo((10, 10, 10), (10, 10, 10), NoiseStats(0.0, 1.0, "user", 1.0),
                                cubes, "cpu", "default", 1.0)
        return pipeline.EnhanceSummary(Path("in.mrc"), None, Path("out.mrc"), (10, 10, 10),
                                       (1.0, 1.0, 1.0), "m", info, 1.0).line()

    assert ("100 cubes run, 0 skipped as solvent, 36 added by the self-check (default tiling)"
            in summary(TileCounts(100, 100, 0, 36)))
    assert "64 cubes run, 0 skipped as solvent (default tiling)" in summary(TileCounts(64, 64, 0))


def test_summary_gives_voxel_sizes_per_axis_and_counts_one_cube() -> None:
    from demhx.blend import TileCounts

    def summary(voxel_size: tuple[float, float, float], cubes: TileCounts) -> str:
        info = pipeline.RunInfo((10, 11, 12), (10, 11, 12), NoiseStats(0.0, 1.0, "user", 1.0),
                                cubes, "cpu", "default", 1.0)
        return pipeline.EnhanceSummary(Path("in.mrc"), None, Path("out.mrc"), (10, 11, 12),
                                       voxel_size, "m", info, 1.0).line()

    # EMD-3001: x, y, z = 0.448, 0.393, 0.459 Å; the summary's arrays are (z, y, x).
    line = summary((0.45875, 0.3925, 0.44825), TileCounts(1, 1, 0))
    assert "12×11×10 voxels (x×y×z) at 0.4482/0.3925/0.4587 Å (x/y/z)" in line
    assert " 1 cube run, " in line
    assert "at 1.742 Å, " in summary((1.742, 1.742, 1.742), TileCounts(2, 2, 0))


def test_range_warnings_give_the_trained_range(identity: pipeline.Enhancer) -> None:
    """Both warnings quote the README's trained range (6.5–22), not the widening limit."""
    trained = "{:g}–{:g}".format(*normalise.TRAINED_PEAK_SIGMAS)
    assert trained == "6.5–22"
    volume, _, _ = _flattened_map()
    with pytest.warns(DemhxWarning, match=f"beyond the {trained} noise stds the network"):
        run_with(identity, volume, 1.0, noise_stats=(0.0, 0.01))
    with pytest.warns(DemhxWarning, match=f"far beyond the {trained} the network"):
        run_with(identity, volume, 1.0)


# --------------------------------------------------------------------------- plausibility


def test_an_absurd_voxel_is_repaired_not_spread(identity: pipeline.Enhancer) -> None:
    volume = _blobby((24, 26, 28))
    spiked = volume.copy()
    spiked[5, 6, 7] = 1e30
    with pytest.warns(DemhxWarning, match=r"volume: 1 voxel\(s\) lie far outside"):
        result = enhance_with(identity, spiked, 1.0, noise_stats=(0.0, 0.1), tiling="reference")
    assert np.isfinite(result).all()
    others = np.ones(volume.shape, bool)
    others[5, 6, 7] = False
    np.testing.assert_allclose(result[others], volume[others], rtol=1e-5, atol=1e-5)
    assert spiked[5, 6, 7] == np.float32(1e30)  # the caller's array is not modified


@pytest.mark.parametrize("voxel_size", [0.05, (1.0, 1.0, 25.0), 1e6])
def test_implausible_voxel_size_in_the_api(identity: pipeline.Enhancer,
                                           voxel_size: object) -> None:
    with pytest.raises(ValueError, match=r"volume: voxel size \(z/y/x\) .* outside the range"):
        enhance_with(identity, _blobby((16, 16, 16)), voxel_size)  # type: ignore[arg-type]


def test_model_grid_bounded_before_allocation(identity: pipeline.Enhancer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from demhx import validate

    monkeypatch.setattr(validate, "MAX_GRID_VOXELS", 30 ** 3)
    monkeypatch.setattr(normalise, "statistics_for", _never)
    with pytest.raises(ValueError, match=r"volume: resampled to the model's 1 Å voxels the map "
                       r"would have \(x×y×z\) 40×40×40 voxels"):
        enhance_with(identity, _blobby((20, 20, 20)), 2.0)


def _never(*args: object) -> None:
    raise AssertionError("the check must come before any work on the map")


def test_gate_leaves_neither_output_nor_confidence(tmp_path: Path) -> None:
    model = write_model(tmp_path, "zero.onnx", scale_model(0.0))
    source = _write_mrc(tmp_path / "in.mrc", _blobby((20, 20, 20)))
    with pytest.raises(RuntimeError, match=r"the output is all zero .*zero\.onnx.* nothing "
                       "written"):
        demhx.enhance_file(source, tmp_path / "out.mrc", confidence=tmp_path / "spread.mrc",
                           tta=3, model=model, device="cpu", threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc", "zero.onnx"]


def test_half_maps_must_share_the_grid(tmp_path: Path, models: dict[str, Path]) -> None:
    half1 = _write_mrc(tmp_path / "h1.mrc", _blobby((20, 20, 20), 1))
    half2 = _write_mrc(tmp_path / "h2.mrc", _blobby((20, 20, 20), 2))
    with mrcfile.open(half2, mode="r+") as stream:
        stream.header.origin = (1.5, -2.0, 9.0)
    with pytest.raises(ValueError, match=r"h2\.mrc: origin \(x, y, z\) 1.5,-2,9 differs from "
                       r".*h1\.mrc 1.5,-2,3.25"):
        demhx.enhance_file(half1, tmp_path / "out.mrc", half2=half2, model=models["identity"],
                           device="cpu")
    with pytest.raises(ValueError, match="half2= is the input map"):
        demhx.enhance_file(half1, tmp_path / "out.mrc", half2=tmp_path / "." / "h1.mrc",
                           model=models["identity"], device="cpu")
    assert not (tmp_path / "out.mrc").exists()


def test_runtime_refuses_non_finite_predictions(tmp_path: Path) -> None:
    model = write_model(tmp_path, "nan.onnx", scale_model(float("inf")))
    runner = pipeline.Enhancer(model, device="cpu", threads=1)
    with pytest.raises(RuntimeError, match=r"nan\.onnx: model fixture 0\.1 on cpu produced "
                       r"\d+ NaN or infinite values"):
        enhance_with(runner, _blobby((16, 16, 16)), 1.0, noise_stats=(0.0, 0.1))
