"""One options object for every entry point, and messages in API terms shown as flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import enhance_with
from onnx_fixtures import identity_path

from demhx import cli, errors, pipeline, validate
from demhx.normalise import NoiseStats
from demhx.options import Enhanced, EnhanceOptions

pytestmark = pytest.mark.filterwarnings("ignore:.*the network was trained on")


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> pipeline.Enhancer:
    return pipeline.Enhancer(identity_path(tmp_path_factory.mktemp("m")), device="cpu",
                             threads=1)


def _blob(shape: tuple[int, int, int] = (20, 20, 20)) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, np.float32)[:, None, None, None] / 2
    blob = np.exp(-((grid - centre) ** 2).sum(axis=0) / 18).astype(np.float32)
    return blob + np.random.default_rng(0).normal(0, 0.01, shape).astype(np.float32)


def _blob_file(folder: Path) -> Path:
    """:func:`_blob` written as ``in.mrc`` in ``folder``, at 1 Å/voxel."""
    source = folder / "in.mrc"
    with mrcfile.new(source) as stream:
        stream.set_data(_blob())
        stream.voxel_size = 1.0
    return source


def test_options_are_frozen_and_checked_when_made() -> None:
    options = EnhanceOptions(noise_stats=(0.0, 0.5), tiling="fast")
    assert options.noise_stats == NoiseStats(0.0, 0.5, "user", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tiling = "reference"  # type: ignore[misc]
    with pytest.raises(ValueError, match="tiling='quick' is not a tiling scheme"):
        EnhanceOptions(tiling="quick")
    with pytest.raises(ValueError, match="tta=5"):
        EnhanceOptions(tta=5)
    with pytest.raises(ValueError, match="noise_stats="):
        EnhanceOptions(noise_stats=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError):
        EnhanceOptions(noise_stats=(0.0, -1.0))


def test_options_rotations_and_equality() -> None:
    assert EnhanceOptions().rotations is None
    assert EnhanceOptions(confidence=True).rotations is not None
    assert len(EnhanceOptions(tta=3).rotations or ()) == 3
    # The progress callback is not part of what a run computes.
    assert EnhanceOptions(progress=lambda done, total: None) == EnhanceOptions()
    changed = EnhanceOptions().replace(tiling="reference")
    assert changed.tiling_name == "reference"
    with pytest.raises(ValueError, match="tiling="):
        EnhanceOptions().replace(tiling="nope")


def test_process_gives_the_same_map_as_enhance(identity: pipeline.Enhancer) -> None:
    volume = _blob()
    options = EnhanceOptions(noise_stats=(0.0, 0.01), tiling="fast")
    enhanced = identity.process(volume, 1.0, options)
    assert isinstance(enhanced, Enhanced) and enhanced.spread is None
    np.testing.assert_array_equal(enhanced.map, enhance_with(
        identity, volume, 1.0, noise_stats=(0.0, 0.01), tiling="fast"))
    assert enhanced.info.tiling == "fast" and enhanced.info.shape == volume.shape
    spread = identity.process(volume, 1.0, options.replace(confidence=True, tta=3)).spread
    assert spread is not None and spread.shape == volume.shape


def test_process_file_writes_what_enhance_file_writes(identity: pipeline.Enhancer,
                                                       tmp_path: Path) -> None:
    source = _blob_file(tmp_path)
    options = EnhanceOptions(tiling="fast")
    first = identity.process_file(source, tmp_path / "a.mrc", options)
    second = pipeline.enhance_file(source, tmp_path / "b.mrc", model=identity.model, device="cpu",
                                  tiling="fast")
    with mrcfile.open(first.output) as a, mrcfile.open(second.output) as b:
        np.testing.assert_array_equal(a.data, b.data)
    assert first.info.cubes == second.info.cubes


@pytest.mark.parametrize(("text", "shown"), [
    ("pass voxel_size=", "pass --voxel-size"),
    ("give noise_stats=MEAN,STD", "give --noise-stats MEAN,STD"),
    ("tiling='x' is not a tiling scheme", "--tiling 'x' is not a tiling scheme"),
    ("try batch_size=16, free the GPU or use device=cpu", "try --batch-size 16, free the GPU "
                                                          "or use --device cpu"),
    ("(noise_stats=, mask=), or run tiling=reference", "(--noise-stats, --mask), or run "
                                                       "--tiling reference"),
    ("half2= is the input map", "--half2 is the input map"),
    ("choose another out_dir= or suffix=", "choose another --out-dir or --suffix"),
    ("SLURM_ARRAY_TASK_ID=3 and a masked map", "SLURM_ARRAY_TASK_ID=3 and a masked map"),
])
def test_cli_terms_show_parameters_as_flags(text: str, shown: str) -> None:
    assert errors.cli_terms(text) == shown


def test_option_names_only_known_parameters() -> None:
    assert errors.option("voxel_size") == "voxel_size="
    with pytest.raises(KeyError):
        errors.option("voxelsize")


def test_api_errors_name_parameters_and_the_cli_names_flags(identity: pipeline.Enhancer,
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    with pytest.raises(ValueError, match=r"pass a positive voxel_size= in Å$"):
        validate.voxel_triplet((1.0, 2.0))
    with pytest.raises(ValueError, match=r"threads=0: must be a positive integer"):
        pipeline.Enhancer(threads=0)
    assert cli.main([str(tmp_path / "in.mrc"), str(tmp_path / "out.mrc"),
                     "--threads", "0"]) == 2
    error = capsys.readouterr().err
    assert "--threads" in error and "threads=" not in error


def test_threads_bound_the_host_kernels_during_a_run(identity: pipeline.Enhancer) -> None:
    """``threads`` reaches numba (the noise and tiling kernels follow its thread count) for
    the run only."""
    import numba

    before = numba.get_num_threads()
    seen: list[int] = []
    options = EnhanceOptions(noise_stats=(0.0, 0.01), tiling="fast",
                             progress=lambda done, total: seen.append(numba.get_num_threads()))
    identity.process(_blob(), 1.0, options)  # the fixture's enhancer has threads=1
    assert seen and set(seen) == {1}
    assert numba.get_num_threads() == before


def test_options_take_keywords_only() -> None:
    with pytest.raises(TypeError):
        EnhanceOptions((0.0, 1.0))  # type: ignore[misc]
    assert EnhanceOptions(tiling="fast").tiling == "fast"


def test_results_print_in_a_line_without_their_arrays(identity: pipeline.Enhancer) -> None:
    enhanced = identity.process(_blob(), 1.0, EnhanceOptions(noise_stats=(0.0, 0.01)))
    text = repr(enhanced)
    assert text.startswith("Enhanced(map=20×20×20 float32 [") and "\n" not in text
    assert "spread=None" in text and f"{enhanced.info.cubes.run} cubes run" in text
    assert len(text) < 300
    assert repr(identity).startswith("Enhancer(model=") and "device='cpu'" in repr(identity)


def test_a_file_run_refuses_a_confidence_map_it_has_no_file_for(identity: pipeline.Enhancer,
                                                                tmp_path: Path) -> None:
    source = _blob_file(tmp_path)
    with pytest.raises(ValueError, match="pass confidence= with the path"):
        identity.process_file(source, tmp_path / "out.mrc", EnhanceOptions(confidence=True))
    assert not (tmp_path / "out.mrc").exists()


def test_the_public_api_is_small() -> None:
    import demhx

    assert len(demhx.__all__) <= 12
    assert {name for name in vars(pipeline.Enhancer) if not name.startswith("_")} == {
        "from_runtime", "runtime", "preload", "process", "process_file"}
    for name in demhx.__all__:
        assert getattr(demhx, name) is not None
