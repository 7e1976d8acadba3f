"""The model loaded on a background thread (demhx._preload): same runtime, same output, same
errors, raised where a plain load would raise them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import enhance_with
from onnx_fixtures import identity_path, scale_model, write_model

import demhx
from demhx import _preload
from demhx.errors import DemhxWarning


def _particle() -> np.ndarray:
    rng = np.random.default_rng(3)
    grid = np.indices((40, 40, 40)) - 20
    blob = 2.0 * np.exp(-(grid ** 2).sum(axis=0) / 40.0)
    return (blob + rng.normal(0, 0.1, blob.shape)).astype(np.float32)


def test_a_preloaded_model_gives_the_same_output(tmp_path: Path) -> None:
    path = write_model(tmp_path, "half.onnx", scale_model(0.5))
    plain = demhx.Enhancer(path, device="cpu", threads=1)
    early = demhx.Enhancer(path, device="cpu", threads=1)
    assert early.preload(gpu_only=False) and not early.preload(gpu_only=False)  # once
    volume = _particle()
    np.testing.assert_array_equal(enhance_with(early, volume, 1.0),
                                  enhance_with(plain, volume, 1.0))
    assert early.runtime is early.runtime and not early.preload(gpu_only=False)  # kept


def test_loading_errors_are_raised_where_a_plain_load_raises_them(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    early = demhx.Enhancer(missing, device="cpu", threads=1)
    assert early.preload(gpu_only=False)  # starting never raises
    with pytest.raises(FileNotFoundError) as preloaded:
        early.runtime  # noqa: B018  (the property loads)
    with pytest.raises(FileNotFoundError) as plain:
        demhx.Enhancer(missing, device="cpu", threads=1).runtime  # noqa: B018
    assert str(preloaded.value) == str(plain.value)


def test_the_files_input_errors_still_come_before_the_models(tmp_path: Path) -> None:
    """A bad map and a bad model: the map's error is the one reported, as without the
    background load."""
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an MRC file")
    enhancer = demhx.Enhancer(tmp_path / "missing.onnx", device="cpu", threads=1)
    enhancer.preload(gpu_only=False)
    with pytest.raises(ValueError, match="bad.mrc"):
        enhancer.process_file(bad, tmp_path / "out.mrc")
    assert not (tmp_path / "out.mrc").exists()


def test_no_background_load_where_no_gpu_can_run(tmp_path: Path) -> None:
    assert not _preload.gpu_possible("cpu")
    assert _preload.gpu_possible("cuda:0") and _preload.gpu_possible("cuda:0,1")
    enhancer = demhx.Enhancer(identity_path(tmp_path), device="cpu")
    assert not enhancer.preload()  # the CPU: nothing to overlap
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert not _preload.gpu_possible("auto")


def test_warm_up_runs_one_batch_of_the_runs_shape(tmp_path: Path) -> None:
    runtime = demhx.Enhancer(identity_path(tmp_path), device="cpu", batch_size=3).runtime
    seen: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape)
        return runtime.run(batch)

    _preload.warm_up(SimpleNamespace(spec=runtime.spec, batch_size=runtime.batch_size,
                                     run=run))  # type: ignore[arg-type]
    cube = runtime.spec.cube_size
    assert seen == [(3, 1, cube, cube, cube)]


@pytest.mark.filterwarnings("ignore::demhx.errors.DemhxWarning")
def test_a_warning_of_the_load_still_reaches_the_caller(tmp_path: Path) -> None:
    from onnx_fixtures import metadata

    path = write_model(tmp_path, "raw.onnx", scale_model(1.0, meta=metadata(trained="false")))
    early = demhx.Enhancer(path, device="cpu", threads=1)
    with pytest.warns(DemhxWarning, match="marked untrained"):
        early.preload(gpu_only=False)
        early.runtime  # noqa: B018
