"""bench/tiling_study.py: its prediction cache changes no output, and through the whole
pipeline the default and fast tilings evaluate no cube that the reference tiling did not."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx_fixtures import smooth_model, write_model

from demhx import pipeline

# The particle stands ~100 noise stds above its noise, beyond the trained range; the warning
# about it is tested in test_pipeline.py.
pytestmark = pytest.mark.filterwarnings("ignore:.*the network was trained on")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tiling_study  # noqa: E402
from conftest import run_with  # noqa: E402


@pytest.fixture(scope="module")
def smooth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models"), "smooth.onnx", smooth_model())


def _particle(shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(5)
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, np.float32)[:, None, None, None] / 2
    volume = np.exp(-((grid - centre) ** 2).sum(axis=0) / (2 * 6.0 ** 2))
    return (volume + rng.normal(0.0, 0.01, shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(45, 38, 61), (30, 30, 30)])
def test_default_cubes_are_reference_cubes_end_to_end(smooth: Path,
                                                      shape: tuple[int, int, int]) -> None:
    loaded = pipeline.Enhancer(smooth, device="cpu", threads=1).runtime
    cached = tiling_study.CachedSession(loaded.session, None)
    enhancer = pipeline.Enhancer.from_runtime(dataclasses.replace(loaded, session=cached),
                                              threads=1)
    volume = _particle(shape)
    _, reference = run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling="reference")
    assert cached.evaluated == reference.cubes.run > 0
    _, fast = run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling="fast")
    assert 0 < fast.cubes.run < reference.cubes.run
    default, info = run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling="default")
    assert fast.cubes.run <= info.cubes.run <= reference.cubes.run
    assert cached.evaluated == reference.cubes.run  # every default cube was already run
    plain, _ = run_with(pipeline.Enhancer(smooth, device="cpu", threads=1),
                        volume, 1.0, noise_stats=(0.0, 0.01), tiling="default")
    np.testing.assert_array_equal(default, plain)


def test_cube_grids_of_their_own_are_new_cubes(smooth: Path) -> None:
    loaded = pipeline.Enhancer(smooth, device="cpu", threads=1).runtime
    cached = tiling_study.CachedSession(loaded.session, None)
    enhancer = pipeline.Enhancer.from_runtime(dataclasses.replace(loaded, session=cached),
                                              threads=1)
    volume = _particle((45, 38, 61))
    run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01), tiling="reference")
    before = cached.evaluated
    run_with(enhancer, volume, 1.0, noise_stats=(0.0, 0.01),
             tiling=tiling_study.parse_scheme("6:5"))
    assert cached.evaluated > before
