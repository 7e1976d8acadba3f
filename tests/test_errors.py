"""Bad inputs through the command line: exit status, one line, nothing written, inputs intact."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from onnx_fixtures import (
    identity_path,
    metadata,
    scale_model,
    write_model,
    write_registry,
)

from demhx import cli, model, session
from demhx._progress import ProgressBar

HAS_CUDA = session.CUDA in session.import_onnxruntime().get_available_providers()


def _write_map(path: Path, shape: tuple[int, int, int] = (20, 22, 24),
               voxel_size: float = 1.0) -> Path:
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.1
    data[8:12, 8:12, 8:12] += 2.0
    with mrcfile.new(path, overwrite=True) as stream:
        stream.set_data(data)
        stream.voxel_size = voxel_size
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A folder with a map, a second map, a registry of models and an output path."""
    models = tmp_path / "models"
    plain = identity_path(models)
    write_registry(models, {"plain": plain}, default="plain")
    monkeypatch.setattr(model, "models_dir", lambda: models)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return {"map": _write_map(inputs / "in.mrc"), "inputs": inputs, "models": models,
            "output": tmp_path / "out" / "result.mrc", "out": tmp_path / "out"}


def _fails(case: dict[str, Path], argv: list[str], status: int, message: str,
           capsys: pytest.CaptureFixture[str]) -> str:
    case["out"].mkdir(exist_ok=True)
    before = _digest(case["inputs"]), _digest(case["models"])
    assert cli.main(argv) == status
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("demhx: error: "), err
    assert message in lines[0], lines[0]
    assert list(case["out"].iterdir()) == [] or case["output"].name == "keep"
    assert (_digest(case["inputs"]), _digest(case["models"])) == before
    return lines[0]


def _argv(case: dict[str, Path], *extra: str) -> list[str]:
    return [str(case["map"]), str(case["output"]), *extra]


def test_missing_input(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(case["inputs"] / "absent.mrc"), str(case["output"])]
    _fails(case, argv, 2, "absent.mrc", capsys)


def test_input_is_a_directory(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(case, [str(case["inputs"]), str(case["output"])], 2, "inputs", capsys)


def test_output_equals_input(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(case, [str(case["map"]), str(case["map"])], 2, "in.mrc", capsys)


def test_output_folder_missing(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(case["map"]), str(case["out"] / "no" / "such" / "out.mrc")]
    _fails(case, argv, 2, "no/such", capsys)


def test_unknown_model_name(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(case, _argv(case, "--model", "tight"), 2,
           "tight: unknown model name; registered models: plain", capsys)


def test_tampered_registered_model(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = case["models"] / "identity.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    _fails(case, _argv(case, "--model", "plain"), 2, "does not match the registry", capsys)
    _fails(case, _argv(case), 2, "does not match the registry", capsys)  # the default model


@pytest.mark.parametrize(("name", "build", "message"), [
    ("small.onnx", lambda: scale_model(1.0, cube=8, meta=metadata()), "model input has shape"),
    ("bare.onnx", lambda: scale_model(1.0, meta={"x": "y"}), "not a demhx model"),
    ("junk.onnx", None, "not a loadable ONNX model"),
])
def test_bad_model_files(case: dict, capsys: pytest.CaptureFixture[str], name: str,
                         build: Callable | None, message: str) -> None:
    path = case["inputs"] / name
    if build is None:
        path.write_bytes(b"\x08\x07garbage")
    else:
        write_model(case["inputs"], name, build())
    _fails(case, _argv(case, "--model", str(path)), 2, f"{name}: {message}", capsys)


def test_missing_model_file(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(case, _argv(case, "--model", "gone.onnx"), 2, "gone.onnx: model file not found",
           capsys)


@pytest.mark.parametrize(("extra", "message"), [
    (["--batch-size", "0"], "--batch-size '0'"),
    (["--threads", "0"], "--threads '0'"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--tiling", "quick"], "--tiling 'quick'"),
    (["--noise-stats", "0,-1"], "-1"),
    (["--voxel-size", "0"], "voxel size"),
])
def test_bad_options(case: dict, capsys: pytest.CaptureFixture[str], extra: list[str],
                     message: str) -> None:
    _fails(case, _argv(case, *extra), 2, message, capsys)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_requested_without_cuda(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(case, _argv(case, "--device", "cuda"), 2, "no CUDA support", capsys)
    assert "--device cpu" in line and "pip install onnxruntime-gpu" in line


def test_half_maps_that_do_not_match(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    other = _write_map(case["inputs"] / "h2.mrc", (20, 22, 25))
    _fails(case, _argv(case, "--half2", str(other)), 2, "differs from", capsys)
    other = _write_map(case["inputs"] / "h3.mrc", voxel_size=1.1)
    _fails(case, _argv(case, "--half2", str(other)), 2, "voxel size", capsys)


def test_mask_on_another_grid(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    mask = _write_map(case["inputs"] / "mask.mrc", (10, 22, 24))
    _fails(case, _argv(case, "--mask", str(mask)), 2, "mask.mrc", capsys)


def test_mask_model_without_mask(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_model(case["inputs"], "masked.onnx",
                       scale_model(1.0, meta=metadata(normalisation="mask")))
    _fails(case, _argv(case, "--model", str(path)), 2, "--mask", capsys)


def test_output_exists(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    case["out"].mkdir()
    case["output"].write_bytes(b"old")
    assert cli.main(_argv(case)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert case["output"].read_bytes() == b"old"


def test_interrupt_leaves_nothing(case: dict, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(self: ProgressBar, done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressBar, "__call__", interrupt)
    case["out"].mkdir()
    before = _digest(case["inputs"])
    assert cli.main(_argv(case, "--tiling", "reference")) == 130
    assert "interrupted; no output written" in capsys.readouterr().err
    assert list(case["out"].iterdir()) == [] and _digest(case["inputs"]) == before


def test_runtime_failure_exits_1(case: dict, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: session.Runtime, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("identity.onnx: inference failed on cpu (device lost)")

    monkeypatch.setattr(session.Runtime, "run", broken)
    line = _fails(case, _argv(case, "--tiling", "reference", "-q"), 1, "device lost", capsys)
    assert line.endswith("(run with --debug for the traceback)")
    assert cli.main(_argv(case, "--tiling", "reference", "--debug")) == 1
    assert "Traceback" in capsys.readouterr().err


def test_already_masked_or_constant_map(case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    data = np.zeros((30, 30, 30), np.float32)
    data[10:20, 10:20, 10:20] = np.random.default_rng(2).uniform(1, 2, (10, 10, 10))
    masked = case["inputs"] / "masked.mrc"
    with mrcfile.new(masked) as stream:
        stream.set_data(data)
        stream.voxel_size = 1.0
    line = _fails(case, [str(masked), str(case["output"])], 2, "masked.mrc: ", capsys)
    assert "--mask" in line
    constant = case["inputs"] / "constant.mrc"
    with mrcfile.new(constant) as stream:
        stream.set_data(np.ones((12, 12, 12), np.float32))
        stream.voxel_size = 1.0
    _fails(case, [str(constant), str(case["output"])], 2, "constant.mrc: is constant", capsys)


def _bad_bytes(good: bytes, kind: str) -> bytes:
    """Malformed variants of a valid MRC file's bytes."""
    header = bytearray(good[:1024])
    if kind == "empty":
        return b""
    if kind == "header only":
        return bytes(header)
    if kind == "truncated":
        return good[: len(good) - 700]
    if kind == "random bytes":
        return np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if kind == "text":
        return b"this is not a map\n" * 100
    if kind == "absurd dimensions":
        header[0:12] = np.array([100000, 100000, 100000], dtype="<i4").tobytes()
        return bytes(header) + good[1024:]
    if kind == "complex mode":
        header[12:16] = np.array([4], dtype="<i4").tobytes()
        return bytes(header) + good[1024:]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty", "header only", "truncated", "random bytes", "text",
                                  "absurd dimensions", "complex mode"])
def test_malformed_files(case: dict, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    bad = case["inputs"] / "bad.mrc"
    bad.write_bytes(_bad_bytes(case["map"].read_bytes(), kind))
    _fails(case, [str(bad), str(case["output"])], 2, "bad.mrc", capsys)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # raised while writing the bad file
@pytest.mark.parametrize("kind", ["nan", "inf", "image", "stack"])
def test_unusable_data(case: dict, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    bad = case["inputs"] / "bad.mrc"
    data = np.random.default_rng(2).standard_normal((12, 14, 16)).astype(np.float32)
    if kind in ("nan", "inf"):
        data[3, 4, 5] = np.nan if kind == "nan" else np.inf
    with mrcfile.new(bad) as stream:
        if kind == "image":
            stream.set_data(data[0])
        else:
            stream.set_data(data)
            if kind == "stack":
                stream.set_image_stack()
    _fails(case, [str(bad), str(case["output"])], 2, "bad.mrc", capsys)


@pytest.mark.parametrize("voxel_size", [0.0, -1.0, float("nan")])
def test_bad_voxel_size_in_header(case: dict, capsys: pytest.CaptureFixture[str],
                                  voxel_size: float) -> None:
    bad = case["inputs"] / "bad.mrc"
    _write_map(bad)
    with mrcfile.open(bad, mode="r+") as stream:
        stream.header.cella = (voxel_size * 24, voxel_size * 22, voxel_size * 20)
    _fails(case, [str(bad), str(case["output"])], 2, "--voxel-size", capsys)
