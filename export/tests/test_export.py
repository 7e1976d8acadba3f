"""ONNX export: verified round trip, refusal of mismatches, metadata for the runtime, fp16 twin."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from demhx.model import read_metadata, sha256_of, spec_from_metadata

from demhx_export import onnx_io
from demhx_export.network import UNet3D, count_parameters
from demhx_export.onnx_export import (
    FP16_TOLERANCE,
    TOLERANCE,
    ExportMismatchError,
    ExportReport,
    export_onnx,
    fp16_twin_path,
)

from .conftest import TINY_CUBE, TINY_WIDTHS


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[UNet3D, ExportReport]:
    """One verified export of a tiny network, shared by the tests that only read it."""
    torch.manual_seed(1)
    net = UNet3D(TINY_WIDTHS).eval()
    config = {"train": {"train_dir": "data/train", "cube_size": TINY_CUBE}, "step": 120,
              "seed": 3, "commit": "abc1234"}
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    return net, export_onnx(net, config, out, metadata={"name": "tight", "version": "1.0"})


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_two_verified_files(exported: tuple[UNet3D, ExportReport]) -> None:
    _, report = exported
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["tiny.fp16.onnx",
                                                                    "tiny.onnx"]
    assert report.relative_error < TOLERANCE
    assert report.fp16_path == fp16_twin_path(report.path)
    assert report.fp16_relative_error is not None
    assert report.fp16_relative_error < FP16_TOLERANCE
    assert report.sha256 == sha256_of(report.path)
    assert report.fp16_sha256 == sha256_of(report.fp16_path)
    assert report.registry_entry() == {"file": "tiny.onnx", "sha256": report.sha256,
                                       "fp16": "tiny.fp16.onnx",
                                       "fp16_sha256": report.fp16_sha256}


def test_metadata_is_read_by_the_runtime(exported: tuple[UNet3D, ExportReport]) -> None:
    net, report = exported
    for path in (report.path, report.fp16_path):
        spec = spec_from_metadata(path, read_metadata(path))
        assert (spec.name, spec.version, spec.cube_size, spec.stride) == ("tight", "1.0", 16, 4)
        assert (spec.voxel_size, spec.normalisation, spec.noise_std) == (1.0, "noise", 0.1)
        assert spec.trained and spec.background == 0.0
        for part in ("data/train", "steps: 120", "seed: 3", "commit: abc1234"):
            assert part in spec.provenance
        assert spec.extra["widths"] == "4,8,16"
        assert int(spec.extra["parameters"]) == count_parameters(net)
        assert float(spec.extra["gflop_per_cube"]) == pytest.approx(report.gflop_per_cube)
    assert spec_from_metadata(report.path, read_metadata(report.path)).fp16_path \
        == report.fp16_path


def test_model_is_self_contained_with_a_dynamic_batch(
        exported: tuple[UNet3D, ExportReport]) -> None:
    _, report = exported
    model = onnx.load(str(report.path), load_external_data=False)
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in model.graph.initializer)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    (tensor,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in tensor.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 16, 16, 16]


def test_batch_of_three_matches_pytorch(exported: tuple[UNet3D, ExportReport]) -> None:
    net, report = exported
    x = np.random.default_rng(5).normal(0, 0.1, (3, 1, 16, 16, 16)).astype(np.float32)
    (y,) = _session(report.path).run(None, {"input": x})
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < TOLERANCE


def test_fp16_twin_takes_float16(exported: tuple[UNet3D, ExportReport]) -> None:
    net, report = exported
    session = _session(report.fp16_path)
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert session.get_outputs()[0].type == "tensor(float16)"
    x = np.random.default_rng(6).normal(0, 1, (2, 1, 16, 16, 16)).astype(np.float32)
    (y,) = session.run(None, {"input": x.astype(np.float16)})
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(y.astype(np.float32) - expected) / np.linalg.norm(expected) \
        < FP16_TOLERANCE


def test_mismatch_is_refused_and_nothing_written(
        tmp_path: Path, tiny_net: UNet3D, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")
    real = onnx_io.run_onnx
    monkeypatch.setattr(onnx_io, "run_onnx",
                        lambda path, inputs: real(path, inputs) * 1.001)
    with pytest.raises(ExportMismatchError, match="differs from PyTorch"):
        export_onnx(tiny_net, {"cube_size": 16}, out)
    assert out.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_inaccurate_fp16_twin_is_refused(tmp_path: Path, tiny_net: UNet3D) -> None:
    with pytest.raises(ExportMismatchError, match="fp16"):
        export_onnx(tiny_net, {"cube_size": 16}, tmp_path / "m.onnx", fp16_tolerance=0.0)
    assert not list(tmp_path.iterdir())


def test_untrained_without_twin_removes_a_stale_twin(tmp_path: Path, tiny_net: UNet3D) -> None:
    out = tmp_path / "m.onnx"
    fp16_twin_path(out).write_bytes(b"stale twin")
    report = export_onnx(tiny_net, {"cube_size": 8}, out, metadata={"trained": False},
                         fp16=False)
    assert report.fp16_path is None and report.registry_entry().keys() == {"file", "sha256"}
    assert os.listdir(tmp_path) == ["m.onnx"]
    spec = spec_from_metadata(out, read_metadata(out))
    assert not spec.trained and spec.name == "m" and spec.cube_size == 8 and spec.stride == 2


@pytest.mark.parametrize("config,match", [({"normalisation": "median"}, "normalisation"),
                                          ({"cube_size": 20}, "multiple of 8"),
                                          ({"noise_std": 0}, "noise_std")])
def test_invalid_metadata_is_refused_before_export(
        tmp_path: Path, tiny_net: UNet3D, config: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        export_onnx(tiny_net, config, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["m.fp16.onnx", "m.pt"])
def test_bad_destination_names_are_refused(tmp_path: Path, tiny_net: UNet3D, name: str) -> None:
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(tiny_net, {}, tmp_path / name)


@pytest.mark.parametrize("channel", ["map", "error"])
def test_a_network_with_an_error_head_exports_one_output_per_model(
        tmp_path: Path, channel: str) -> None:
    torch.manual_seed(2)
    net = UNet3D(TINY_WIDTHS, norm="none", error_head=True).eval()
    out = tmp_path / f"{channel}.onnx"
    report = export_onnx(net, {"train": {"cube_size": TINY_CUBE}}, out, fp16=False,
                         channel=channel)
    assert report.metadata["demhx.output"] == channel
    session = _session(out)
    assert len(session.get_outputs()) == 1
    batch = np.random.default_rng(0).normal(size=(2, 1, TINY_CUBE, TINY_CUBE, TINY_CUBE))
    batch = batch.astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.no_grad():
        both = net(torch.from_numpy(batch)).numpy()
    want = both[:, :1] if channel == "map" else both[:, 1:]
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= TOLERANCE * np.linalg.norm(want)
    # the map's graph leaves the error head out
    weights = {init.name for init in onnx.load(str(out)).graph.initializer}
    assert any("error" in name for name in weights) == (channel == "error")
    # and the parameter count in its metadata leaves the other head out, as its graph does
    other = "error." if channel == "map" else "head."
    used = sum(p.numel() for name, p in net.named_parameters() if not name.startswith(other))
    total = sum(p.numel() for p in net.parameters())
    assert int(report.metadata["demhx.parameters"]) == used < total


def test_error_channel_of_a_network_without_error_head_is_refused(tmp_path: Path,
                                                                   tiny_net: UNet3D) -> None:
    with pytest.raises(ValueError, match="no error head"):
        export_onnx(tiny_net, {}, tmp_path / "e.onnx", fp16=False, channel="error")
    assert not (tmp_path / "e.onnx").exists()
