"""Device choice, session creation, shape checks and batch sizes of demhx.session."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_mrc
from onnx_fixtures import CUBE, identity_path, metadata, scale_model, write_model

from demhx import device, session
from demhx.device import CPU, CUDA, DeviceError, DeviceRequest
from demhx.errors import DemhxWarning

HAS_CUDA = CUDA in session.import_onnxruntime().get_available_providers()


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    return identity_path(tmp_path)


@pytest.mark.parametrize(("text", "request_"), [
    ("auto", DeviceRequest("auto")), ("CPU", DeviceRequest("cpu")),
    ("cuda", DeviceRequest("cuda", 0)), ("cuda:3", DeviceRequest("cuda", 3)),
])
def test_parse_device(text: str, request_: DeviceRequest) -> None:
    assert session.parse_device(text) == request_


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cpu:0", ""])
def test_parse_device_refuses_unknown(text: str) -> None:
    with pytest.raises(ValueError, match="device=.* use one of auto, cpu, cuda, cuda:N, "
                       "cuda:N,M,..., cuda:all"):
        session.parse_device(text)


def test_choose_providers() -> None:
    both = [CUDA, CPU]
    assert session.choose_providers(DeviceRequest("cpu"), both) == [CPU]
    assert session.choose_providers(DeviceRequest("auto"), [CPU]) == [CPU]
    heuristic = {"cudnn_conv_algo_search": "HEURISTIC"}
    assert session.choose_providers(DeviceRequest("auto"), both) == [
        (CUDA, {"device_id": 0, **heuristic}), CPU]
    assert session.choose_providers(DeviceRequest("cuda", 2), both)[0] == (
        CUDA, {"device_id": 2, **heuristic})
    with pytest.raises(DeviceError, match="pip install onnxruntime-gpu.*device=cpu"):
        session.choose_providers(DeviceRequest("cuda"), [CPU])


def test_load_runtime_on_cpu(identity: Path) -> None:
    runtime = session.load_runtime(identity, device="cpu", threads=1)
    assert runtime.device == "cpu" and runtime.batch_size == session.CPU_BATCH_SIZE
    assert runtime.spec.cube_size == CUBE and runtime.model_file == identity
    assert runtime.session.get_session_options().intra_op_num_threads == 1
    assert runtime.description.startswith("device cpu (CPUExecutionProvider, fp32, 1 threads)")
    batch = np.random.default_rng(0).standard_normal((3, 1, CUBE, CUBE, CUBE), np.float32)
    np.testing.assert_array_equal(runtime.run(batch), batch)
    bound = dataclasses.replace(runtime, io_binding=True)
    np.testing.assert_array_equal(bound.run(batch), batch)


def test_io_binding_reuses_its_buffers_and_returns_independent_results(identity: Path) -> None:
    """One binding per batch shape, kept; a result is not overwritten by the next batch (the
    accumulator may still be reading it)."""
    runtime = session.load_runtime(identity, device="cpu", threads=1)
    bound = dataclasses.replace(runtime, io_binding=True)
    rng = np.random.default_rng(1)
    first, second = (rng.standard_normal((2, 1, CUBE, CUBE, CUBE), np.float32) for _ in "ab")
    kept = bound.run(first)
    again = bound.run(second)
    np.testing.assert_array_equal(kept, first)
    np.testing.assert_array_equal(again, second)
    assert len(bound._bound) == 1
    np.testing.assert_array_equal(bound.run(first[:1]), first[:1])
    assert len(bound._bound) == 2 and not runtime._bound  # replace() gives its own buffers


def test_batch_size_and_threads_must_be_positive(identity: Path) -> None:
    for option, value in (("batch_size", 0), ("batch_size", -2), ("threads", 0),
                          ("batch_size", 1.5), ("batch_size", True)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            session.load_runtime(identity, device="cpu", **{option: value})


@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has CUDA")
def test_cuda_without_cuda_is_a_clear_error(identity: Path) -> None:
    with pytest.raises(DeviceError, match="no CUDA support.*device=cpu"):
        session.load_runtime(identity, device="cuda")


def test_cuda_provider_without_gpu_falls_back(identity: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists CUDA without a GPU: the session decides what runs."""
    write_model(tmp_path, "identity.fp16.onnx", scale_model(1.0, fp16=True, meta=metadata()))
    ort = session.import_onnxruntime()
    if HAS_CUDA:
        pytest.skip("a real CUDA provider is present")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    runtime = session.load_runtime(identity, device="auto")
    assert runtime.device == "cpu" and runtime.model_file == identity  # float32, not the twin
    assert runtime.io.input_dtype is np.float32 and not runtime.io_binding
    assert "no usable GPU" in runtime.description
    with pytest.raises(DeviceError, match="could not start it.*device=cpu"):
        session.load_runtime(identity, device="cuda:0")


def test_wrong_input_shape_is_refused(tmp_path: Path) -> None:
    path = write_model(tmp_path, "small.onnx", scale_model(1.0, cube=8, meta=metadata()))
    with pytest.raises(ValueError, match=r"small.onnx: model input has shape \(batch, 1, 8, 8, 8"
                                         r"\), not \(batch, 1, 16, 16, 16\)"):
        session.load_runtime(path, device="cpu")
    flat = write_model(tmp_path, "flat.onnx", scale_model(1.0, shape=["b", 1, 16, 16]))
    with pytest.raises(ValueError, match="flat.onnx: model input has shape"):
        session.load_runtime(flat, device="cpu")


def test_missing_metadata_is_refused(tmp_path: Path) -> None:
    path = write_model(tmp_path, "bare.onnx", scale_model(1.0, meta={"author": "x"}))
    with pytest.raises(ValueError, match="bare.onnx: not a demhx model"):
        session.load_runtime(path, device="cpu")


def test_untrained_model_warns(tmp_path: Path) -> None:
    path = identity_path(tmp_path, trained="false")
    with pytest.warns(DemhxWarning, match="identity.onnx: .* untrained"):
        session.load_runtime(path, device="cpu")


def test_trained_model_does_not_warn(identity: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session.load_runtime(identity, device="cpu")


def test_fixed_batch_model(tmp_path: Path) -> None:
    path = write_model(tmp_path, "fixed.onnx", scale_model(2.0, shape=[2, 1, 16, 16, 16]))
    runtime = session.load_runtime(path, device="cpu")
    assert runtime.batch_size == 2
    with pytest.raises(ValueError, match="only takes batches of 2"):
        session.load_runtime(path, device="cpu", batch_size=3)


@pytest.mark.parametrize(("installed", "fails"), [
    ({"onnxruntime"}, False), ({"onnxruntime-gpu"}, False),
    ({"onnxruntime", "onnxruntime-gpu"}, True)])
def test_both_onnxruntime_packages_installed_is_an_error(
        monkeypatch: pytest.MonkeyPatch, installed: set[str], fails: bool) -> None:
    """As the README says: both installed stops with the fix (remove both, install one)."""
    monkeypatch.setattr(device, "_distribution_version",
                        lambda name: "1.0" if name in installed else None)
    session.import_onnxruntime.cache_clear()
    try:
        if fails:
            with pytest.raises(device.InstallError, match=(
                    "both onnxruntime and onnxruntime-gpu are installed.*fix: pip uninstall -y "
                    "onnxruntime onnxruntime-gpu, then pip install onnxruntime")):
                session.import_onnxruntime()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert session.import_onnxruntime().InferenceSession
    finally:
        session.import_onnxruntime.cache_clear()


def test_both_onnxruntime_packages_stop_the_command_line(
        monkeypatch: pytest.MonkeyPatch, identity: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from demhx import cli

    monkeypatch.setattr(device, "_distribution_version", lambda name: "1.0")
    session.import_onnxruntime.cache_clear()
    source = write_mrc(tmp_path / "in.mrc",
                       np.random.default_rng(0).standard_normal((20, 20, 20)).astype(np.float32))
    try:
        status = cli.main([str(source), str(tmp_path / "out.mrc"), "--model", str(identity)])
    finally:
        session.import_onnxruntime.cache_clear()
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith("demhx: error: both onnxruntime and onnxruntime-gpu are installed")


def test_broken_onnxruntime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    session.import_onnxruntime.cache_clear()
    try:
        with pytest.raises(device.InstallError, match="cannot be imported.*pip uninstall"):
            session.import_onnxruntime()
    finally:
        monkeypatch.undo()
        session.import_onnxruntime.cache_clear()


def test_inference_failure_names_the_model(identity: Path) -> None:
    runtime = session.load_runtime(identity, device="cpu")
    with pytest.raises(RuntimeError, match="identity.onnx: inference failed on cpu"):
        runtime.run(np.zeros((1, 1, 8, 8, 8), np.float32))


def test_fp16_twin_of_a_registered_model_is_checked(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from demhx import model

    plain = identity_path(tmp_path)
    twin = write_model(tmp_path, "identity.fp16.onnx", scale_model(fp16=True, meta=metadata()))
    monkeypatch.setattr(model, "models_dir", lambda: tmp_path)
    entry = {"file": plain.name, "sha256": model.sha256_of(plain)}
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"default": None, "models": {"plain": entry}}))
    assert session._checked_twin(plain, registered=False) == twin
    assert session._checked_twin(plain, registered=True) is None  # no recorded sha256
    entry["fp16_sha256"] = model.sha256_of(twin)
    registry.write_text(json.dumps({"default": None, "models": {"plain": entry}}))
    assert session._checked_twin(plain, registered=True) == twin
    twin.write_bytes(twin.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="identity.fp16.onnx: sha256 .* does not match"):
        session._checked_twin(plain, registered=True)


class _Recording:
    """A session that records the shapes it is fed and runs the real one (or raises)."""

    def __init__(self, real: object, error: Exception | None = None) -> None:
        self.real, self.error, self.shapes = real, error, []

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.shapes.extend(array.shape for array in feed.values())
        if self.error is not None:
            raise self.error
        return self.real.run(outputs, feed)  # type: ignore[attr-defined]


def test_padded_batches_reach_the_model_in_one_shape(identity: Path) -> None:
    runtime = session.load_runtime(identity, device="cpu")
    assert not runtime.pad_batches  # CPU: no padding, no wasted cubes
    recording = _Recording(runtime.session)
    padded = dataclasses.replace(runtime, session=recording, batch_size=4, pad_batches=True)
    rng = np.random.default_rng(1)
    for count in (4, 3, 1):
        batch = rng.standard_normal((count, 1, CUBE, CUBE, CUBE), np.float32)
        np.testing.assert_array_equal(padded.run(batch), batch)
    assert recording.shapes == [(4, 1, CUBE, CUBE, CUBE)] * 3
    batch = rng.standard_normal((2, 1, CUBE, CUBE, CUBE), np.float32)
    bound = dataclasses.replace(runtime, batch_size=4, pad_batches=True, io_binding=True)
    np.testing.assert_array_equal(bound.run(batch), batch)


@pytest.mark.parametrize(("device", "message"), [
    ("cuda:0", r"cuda:0 ran out of GPU memory for a batch of 4 cubes of 16³ .*try "
               r"batch_size=2, free the GPU"),
    ("cpu", r"inference failed on cpu \(.*out of memory\); try a smaller batch_size="),
])
def test_out_of_gpu_memory_is_named_with_the_fix(identity: Path, device: str,
                                                 message: str) -> None:
    runtime = session.load_runtime(identity, device="cpu")
    error = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: "
                         "out of memory\nmore lines")
    failing = dataclasses.replace(runtime, session=_Recording(None, error), device=device,
                                  batch_size=4, pad_batches=device != "cpu")
    with pytest.raises(RuntimeError, match=message):
        failing.run(np.zeros((3, 1, CUBE, CUBE, CUBE), np.float32))


def test_cuda_batch_size_arithmetic(identity: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A share of the free memory over the activations of one cube, within 1 .. 32."""
    spec = dataclasses.replace(session.load_runtime(identity, device="cpu").spec, cube_size=64,
                               extra={"widths": "32,64,128"})
    cube_fp16 = 64 ** 3 * 32 * 16 * 2  # bytes of activations of one 64³ cube, fp16

    def batch(free: int | None, fp16: bool = True) -> int:
        monkeypatch.setattr(session, "_cuda_free_bytes", lambda index: free)
        return session._cuda_batch_size("cuda:1", spec, fp16)

    assert batch(None) == session.CUDA_BATCH_SIZE  # no nvidia-smi
    assert batch(10 * cube_fp16) == 5 and batch(10 * cube_fp16, fp16=False) == 2
    assert batch(0) == 1 and batch(cube_fp16) == 1
    assert batch(140 * 2 ** 30) == session.CUDA_MAX_BATCH_SIZE  # an H200
    sizes = [batch(free) for free in range(0, 100 * cube_fp16, cube_fp16 // 3)]
    assert sizes == sorted(sizes) and sizes[-1] == session.CUDA_MAX_BATCH_SIZE
