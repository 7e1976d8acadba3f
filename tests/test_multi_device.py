"""Several devices as one runtime: device lists, batch parts, same output as one device.

The group's logic (parts, parallel runs, order, errors) is the same whatever the devices
are, so it is tested here with CPU runtimes; tests/test_gpu.py runs it on GPUs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_with
from onnx_fixtures import CUBE, identity_path, scale_model, smooth_model, write_model

from demhx import cli, device, pipeline
from demhx.device import DeviceError, DeviceRequest
from demhx.multi_device import RuntimeGroup, group_of
from demhx.session import CUDA, import_onnxruntime, load_runtime

pytestmark = pytest.mark.filterwarnings("ignore:.*the network was trained on")
HAS_CUDA = CUDA in import_onnxruntime().get_available_providers()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {"smooth": write_model(folder, "smooth.onnx", smooth_model()),
            "double": write_model(folder, "double.onnx", scale_model(2.0)),
            "identity": identity_path(folder)}


def _cubes(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 1, CUBE, CUBE, CUBE)).astype(np.float32)


@pytest.mark.parametrize(("text", "indices"), [
    ("cuda:0,1", (0, 1)), ("cuda:2,0", (2, 0)), ("cuda:0,cuda:3", (0, 3)),
    (" CUDA:1, 2 ", (1, 2)),
])
def test_parse_devices_reads_lists_of_gpus(text: str, indices: tuple[int, ...]) -> None:
    assert device.parse_devices(text) == tuple(DeviceRequest("cuda", i) for i in indices)


@pytest.mark.parametrize("text", ["cpu", "auto", "cuda", "cuda:3"])
def test_parse_devices_reads_one_device_as_before(text: str) -> None:
    assert device.parse_devices(text) == (device.parse_device(text),)


@pytest.mark.parametrize(("text", "message"), [
    ("cuda:1,1", "names a GPU twice"), ("cpu,cuda", "is not a list of GPUs"),
    ("cuda:0,x", "is not a list of GPUs"), ("cuda:0,", "is not a list of GPUs"),
])
def test_parse_devices_refuses_bad_lists(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        device.parse_devices(text)


def test_cuda_all_counts_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1,2")
    assert device.parse_devices("cuda:all") == tuple(DeviceRequest("cuda", i) for i in range(3))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match="device='cuda:all': no GPU is visible"):
        device.parse_devices("cuda:all")


@pytest.fixture(scope="module")
def group(models: dict[str, Path]) -> RuntimeGroup:
    members = [load_runtime(models["smooth"], device="cpu", batch_size=size, threads=1)
               for size in (2, 3)]
    return group_of(members)


def test_parts_cover_the_batch_in_order(group: RuntimeGroup) -> None:
    first, second = group.members
    assert group.batch_size == 5
    assert group.parts(7) == [(0, 2, first), (2, 3, second), (5, 2, first)]
    assert group.parts(1) == [(0, 1, first)]
    for count in range(1, 13):
        parts = group.parts(count)
        assert [start for start, _, _ in parts] == list(
            np.cumsum([0] + [size for _, size, _ in parts])[:-1])
        assert sum(size for _, size, _ in parts) == count


@pytest.mark.parametrize("count", [1, 4, 5, 9])
def test_group_predicts_what_one_device_predicts(group: RuntimeGroup, models: dict[str, Path],
                                                  count: int) -> None:
    single = load_runtime(models["smooth"], device="cpu", threads=1)
    cubes = _cubes(count, seed=count)
    np.testing.assert_array_equal(group.run(cubes), single.run(cubes))


def test_group_describes_its_devices(group: RuntimeGroup) -> None:
    assert group.device == "cpu,cpu"
    assert group.description.startswith("devices cpu,cpu (2 devices), batch 2+3, model ")


def test_a_failing_device_is_named(models: dict[str, Path]) -> None:
    members = [load_runtime(models["smooth"], device="cpu", batch_size=2, threads=1)
               for _ in range(2)]
    broken = group_of(members)

    def fail(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("inference failed on the second device")

    object.__setattr__(members[1], "run", fail)
    with pytest.raises(RuntimeError, match="cpu: inference failed on the second device"):
        broken.run(_cubes(4))
    np.testing.assert_array_equal(broken.run(_cubes(2)), members[0].run(_cubes(2)))
    broken.close()


def test_a_group_runs_one_model(models: dict[str, Path]) -> None:
    members = [load_runtime(models[name], device="cpu", threads=1)
               for name in ("smooth", "double")]
    with pytest.raises(ValueError, match="one model file on every device"):
        group_of(members)
    with pytest.raises(ValueError, match="at least two runtimes"):
        group_of(members[:1])


@pytest.mark.parametrize("tiling", ["default", "reference"])
def test_whole_map_on_a_group_equals_one_device(group: RuntimeGroup, models: dict[str, Path],
                                                tiling: str) -> None:
    rng = np.random.default_rng(3)
    volume = rng.normal(0, 0.1, (30, 26, 22)).astype(np.float32)
    volume[8:20, 6:18, 5:15] += 2.0
    single = pipeline.Enhancer(models["smooth"], device="cpu", threads=1)
    several = pipeline.Enhancer.from_runtime(group)
    expected, info = run_with(single, volume, 1.0, tiling=tiling)
    result, group_info = run_with(several, volume, 1.0, tiling=tiling)
    np.testing.assert_array_equal(result, expected)
    assert group_info.device == "cpu,cpu" and group_info.cubes == info.cubes


@pytest.mark.skipif(HAS_CUDA, reason="needs an ONNX Runtime without CUDA")
def test_gpu_list_without_cuda_is_a_usage_error(models: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import mrcfile

    source = tmp_path / "in.mrc"
    with mrcfile.new(source) as stream:
        stream.set_data(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
        stream.voxel_size = 1.0
    status = cli.main([str(source), str(tmp_path / "out.mrc"), "--model",
                       str(models["identity"]), "--device", "cuda:0,1"])
    error = capsys.readouterr().err
    assert status == 2 and "--device cuda" in error and "no CUDA support" in error
