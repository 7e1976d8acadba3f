"""The model contract and registry of demhx.model."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx_fixtures import identity_path, metadata, scale_model, write_model, write_registry

from demhx import model


def test_spec_from_metadata_reads_everything(tmp_path: Path) -> None:
    spec = model.spec_from_metadata(tmp_path / "m.onnx", metadata(widths="32,64,128"))
    assert (spec.name, spec.version, spec.cube_size, spec.stride) == ("fixture", "0.1", 16, 4)
    assert (spec.voxel_size, spec.normalisation, spec.noise_std) == (1.0, "noise", 0.1)
    assert spec.trained and spec.background == 0.0 and spec.extra == {"widths": "32,64,128"}
    assert spec.label == "fixture 0.1"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"cube_size": None}, "metadata lacks demhx.cube_size"),
    ({"stride": "x"}, "demhx.stride='x' is not a valid int"),
    ({"voxel_size": "nan"}, "not finite"),
    ({"voxel_size": "0"}, "voxel_size 0.0 Å is not positive"),
    ({"normalisation": "z"}, "normalisation 'z'"),
    ({"format": "9"}, "newer than this demhx"),
])
def test_bad_metadata_is_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.spec_from_metadata(tmp_path / "m.onnx", metadata(**overrides))


def test_load_spec_from_a_path(tmp_path: Path) -> None:
    path = identity_path(tmp_path)
    spec = model.load_spec(path)
    assert spec.path == path and spec.fp16_path is None
    twin = write_model(tmp_path, "identity.fp16.onnx", scale_model(fp16=True, meta=metadata()))
    assert model.load_spec(path).fp16_path == twin


def test_garbage_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="junk.onnx: not a loadable ONNX model"):
        model.load_spec(path)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.onnx: model file not found"):
        model.resolve_model(tmp_path / "absent.onnx")


def test_registry_resolves_names_and_checks_sha256(tmp_path: Path) -> None:
    path = identity_path(tmp_path)
    write_registry(tmp_path, {"plain": path}, default="plain")
    assert model.resolve_model("plain", tmp_path) == (path, model.sha256_of(path))
    assert model.resolve_model(None, tmp_path)[0] == path
    with pytest.raises(ValueError, match="tight: unknown model name; registered models: plain"):
        model.resolve_model("tight", tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="identity.onnx: sha256 .* does not match the registry"):
        model.verify_sha256(*model.resolve_model("plain", tmp_path))


def test_no_default_model(tmp_path: Path) -> None:
    write_registry(tmp_path, {})
    with pytest.raises(FileNotFoundError, match="no default model.*; pass model=PATH.onnx$"):
        model.resolve_model(None, tmp_path)
