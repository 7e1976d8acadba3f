"""The CUDA path on a real GPU: same output as the CPU, the fp16 twin, batch sizes, memory.

Every test carries the ``gpu`` marker and is skipped unless ONNX Runtime can run a session on
CUDA here (``onnxruntime-gpu`` with a visible GPU): ``pytest -m gpu`` on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_fixtures import CUBE, identity_path, metadata, scale_model, smooth_model, write_model

from demhx import session
from demhx.pipeline import enhance

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An identity model, skipping the module unless it really runs on CUDA."""
    path = identity_path(tmp_path_factory.mktemp("gpu"))
    if session.CUDA not in session.import_onnxruntime().get_available_providers():
        pytest.skip("this ONNX Runtime has no CUDA provider")
    try:
        runtime = session.load_runtime(path, device="cuda")
    except session.DeviceError as error:
        pytest.skip(f"no usable GPU: {error}")
    assert runtime.device.startswith("cuda")
    return path


def _volume(shape: tuple[int, int, int] = (40, 36, 44)) -> np.ndarray:
    rng = np.random.default_rng(3)
    volume = rng.normal(0.0, 0.1, shape).astype(np.float32)
    volume[10:25, 12:24, 15:30] += 1.5
    return volume


def test_identity_on_cuda_equals_cpu(gpu_identity: Path) -> None:
    cuda = session.load_runtime(gpu_identity, device="cuda")
    cpu = session.load_runtime(gpu_identity, device="cpu")
    assert cuda.io_binding and cuda.pad_batches and cuda.io.input_dtype is np.float32
    options = cuda.session.get_provider_options()[session.CUDA]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    batch = np.random.default_rng(0).standard_normal((5, 1, CUBE, CUBE, CUBE), np.float32)
    np.testing.assert_array_equal(cuda.run(batch), cpu.run(batch))
    np.testing.assert_array_equal(cuda.run(batch[:2]), batch[:2])  # padded to the batch size
    volume = _volume()
    np.testing.assert_array_equal(enhance(volume, 1.0, model=gpu_identity, device="cuda"),
                                  enhance(volume, 1.0, model=gpu_identity, device="cpu"))


def test_convolutions_on_cuda_match_cpu(gpu_identity: Path, tmp_path: Path) -> None:
    path = write_model(tmp_path, "smooth.onnx", smooth_model())
    volume = _volume()
    on_gpu = enhance(volume, 1.0, model=path, device="cuda")
    on_cpu = enhance(volume, 1.0, model=path, device="cpu")
    # cuDNN may run float32 convolutions in TF32 (10-bit mantissa): 1e-3 of the range.
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-3 * float(np.abs(on_cpu).max()))
    assert np.corrcoef(on_gpu.ravel(), on_cpu.ravel())[0, 1] > 0.99999


def test_fp16_twin_is_used_and_within_tolerance(gpu_identity: Path, tmp_path: Path) -> None:
    plain = write_model(tmp_path, "scale.onnx", scale_model(1.5, meta=metadata()))
    twin = write_model(tmp_path, "scale.fp16.onnx", scale_model(1.5, meta=metadata(), fp16=True))
    cuda = session.load_runtime(plain, device="cuda")
    assert cuda.model_file == twin and cuda.io.input_dtype is np.float16
    assert "fp16" in cuda.description
    volume = _volume()
    half = enhance(volume, 1.0, model=plain, device="cuda")
    full = enhance(volume, 1.0, model=plain, device="cpu")
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=2e-3 * float(np.abs(full).max()))


def test_batch_size_follows_the_free_memory(gpu_identity: Path, tmp_path: Path) -> None:
    meta = metadata(cube_size=64, widths="32,64,128")
    path = write_model(tmp_path, "wide.onnx", scale_model(1.0, 64, meta=meta))
    free = session._cuda_free_bytes(0)
    runtime = session.load_runtime(path, device="cuda:0")
    if free is None:
        assert runtime.batch_size == session.CUDA_BATCH_SIZE  # no nvidia-smi
        return
    per_cube = 64 ** 3 * 32 * 16 * 4  # fp32 activations of one cube
    expected = max(1, min(session.CUDA_MAX_BATCH_SIZE, free // 2 // per_cube))
    assert abs(runtime.batch_size - expected) <= 1  # free memory moves a little
    assert 1 <= runtime.batch_size <= session.CUDA_MAX_BATCH_SIZE
    assert session.load_runtime(path, device="cuda:0", batch_size=3).batch_size == 3


def test_out_of_gpu_memory_is_a_clear_error(gpu_identity: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16 MiB memory arena and a network whose tensors for the batch need 64 MiB each:
    one line naming the memory and the fix.

    The bound input and output buffers of IO binding live outside the session's arena, so
    the network must have tensors of its own (two convolutions here): a one-node model
    writes straight into the bound output and never reaches the limit.
    """
    limit = 16 * 2 ** 20
    path = write_model(tmp_path, "smooth.onnx", smooth_model(64, meta=metadata(cube_size=64)))
    batch = np.ones((64, 1, 64, 64, 64), np.float32)
    assert batch.nbytes >= 4 * limit  # every tensor between the two convolutions
    free = session.load_runtime(path, device="cuda", batch_size=64)
    assert free.run(batch).shape == batch.shape  # the batch runs when the memory is there
    chosen = session.choose_providers

    def limited(request: session.DeviceRequest, available: list[str]) -> list[object]:
        providers = chosen(request, available)
        if isinstance(providers[0], tuple):
            providers[0][1].update(gpu_mem_limit=limit, arena_extend_strategy="kSameAsRequested")
        return providers

    monkeypatch.setattr(session, "choose_providers", limited)
    runtime = session.load_runtime(path, device="cuda", batch_size=64)
    options = runtime.session.get_provider_options()[session.CUDA]
    assert int(options["gpu_mem_limit"]) == limit
    with pytest.raises(RuntimeError, match=r"ran out of GPU memory for a batch of 64 cubes of "
                                           r"64³ .*try batch_size=32"):
        runtime.run(batch)


def test_a_group_of_gpu_runtimes_predicts_what_one_does(gpu_identity: Path,
                                                         tmp_path: Path) -> None:
    """Two sessions on the first GPU stand in for two GPUs (a one-GPU machine can run it):
    the parts run in parallel threads through IO binding and come back in order."""
    from demhx.multi_device import group_of

    path = write_model(tmp_path, "smooth.onnx", smooth_model())
    single = session.load_runtime(path, device="cuda:0", batch_size=4)
    group = group_of([session.load_runtime(path, device="cuda:0", batch_size=size)
                      for size in (2, 3)])
    batch = np.random.default_rng(1).standard_normal((9, 1, CUBE, CUBE, CUBE), np.float32)
    np.testing.assert_allclose(group.run(batch), single.run(batch), rtol=1e-5, atol=1e-6)
    group.close()


def test_every_gpu_as_a_group(gpu_identity: Path) -> None:
    """``cuda:all`` on this machine: one runtime per visible GPU (a group when several)."""
    from demhx.device import cuda_device_count
    from demhx.multi_device import RuntimeGroup, load_group

    loaded = load_group(gpu_identity, "cuda:all")
    count = cuda_device_count()
    assert count >= 1
    assert isinstance(loaded, RuntimeGroup) == (count > 1)
    volume = _volume()
    expected = enhance(volume, 1.0, model=gpu_identity, device="cpu")
    np.testing.assert_array_equal(enhance(volume, 1.0, model=gpu_identity, device="cuda:all"),
                                  expected)
