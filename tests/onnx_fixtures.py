"""Small ONNX models carrying the demhx metadata, built with ``onnx.helper`` for the tests.

Every model has one input ``volume`` of shape ``(batch, 1, c, c, c)`` (dynamic batch axis) and
one output ``enhanced`` of the same shape. ``write_model`` writes a model to a folder and
returns its path; ``write_registry`` makes a registry of models with their sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CUBE = 16
STRIDE = 4
VOXEL_SIZE = 1.0
OPSET = 17


def metadata(**overrides: object) -> dict[str, str]:
    """The demhx metadata of a test model; ``None`` values drop a key."""
    values: dict[str, object] = {
        "format": 1, "name": "fixture", "version": "0.1", "cube_size": CUBE, "stride": STRIDE,
        "voxel_size": VOXEL_SIZE, "normalisation": "noise", "noise_std": 0.1,
        "background": 0.0, "trained": "true", "provenance": "tests/onnx_fixtures.py",
    }
    values.update(overrides)
    return {f"demhx.{key}": str(value) for key, value in values.items() if value is not None}


def _graph(nodes: list, initializers: list, shape: list, elem: int = TensorProto.FLOAT
           ) -> onnx.GraphProto:
    inputs = [helper.make_tensor_value_info("volume", elem, shape)]
    outputs = [helper.make_tensor_value_info("enhanced", elem, shape)]
    return helper.make_graph(nodes, "demhx_fixture", inputs, outputs, initializer=initializers)


def _model(graph: onnx.GraphProto, meta: dict[str, str]) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def scale_model(factor: float = 1.0, cube: int = CUBE, shape: list | None = None,
                meta: dict[str, str] | None = None, fp16: bool = False) -> onnx.ModelProto:
    """``enhanced = volume * factor`` (identity for ``factor`` 1)."""
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    dtype = np.float16 if fp16 else np.float32
    constant = numpy_helper.from_array(np.array(factor, dtype=dtype), "factor")
    node = helper.make_node("Mul", ["volume", "factor"], ["enhanced"])
    shape = shape or ["batch", 1, cube, cube, cube]
    return _model(_graph([node], [constant], shape, elem), meta or metadata(cube_size=cube))


def smooth_model(cube: int = CUBE, meta: dict[str, str] | None = None,
                 seed: int = 0) -> onnx.ModelProto:
    """A smooth nonlinear network: two zero-padded 5³ convolutions with ``tanh`` between.

    Zero padding gives it the edge effects of a real U-net, so tiling schemes differ. The
    ``tanh`` bends the normalised density (up to about 3) without flattening it, so the output
    follows the input as a trained network's does (demhx refuses outputs that erase it).
    """
    rng = np.random.default_rng(seed)
    kernel = np.exp(-0.5 * np.sum(np.square(np.mgrid[-2:3, -2:3, -2:3]), axis=0) / 1.5 ** 2)
    first = (kernel / kernel.sum())[None, None].astype(np.float32)
    second = (first * (1.0 + 0.2 * rng.standard_normal(first.shape))).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["volume", "w1"], ["c1"], pads=[2] * 6),
        helper.make_node("Mul", ["c1", "gain"], ["g1"]),
        helper.make_node("Tanh", ["g1"], ["t1"]),
        helper.make_node("Conv", ["t1", "w2"], ["c2"], pads=[2] * 6),
        helper.make_node("Mul", ["c2", "inverse_gain"], ["enhanced"]),
    ]
    initializers = [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2"),
                    numpy_helper.from_array(np.array(0.3, np.float32), "gain"),
                    numpy_helper.from_array(np.array(1 / 0.3, np.float32), "inverse_gain")]
    graph = _graph(nodes, initializers, ["batch", 1, cube, cube, cube])
    return _model(graph, meta or metadata(cube_size=cube))


def masking_model(cube: int = CUBE, meta: dict[str, str] | None = None,
                  threshold: float = 0.05, width: float = 0.01) -> onnx.ModelProto:
    """A local "sharpen and mask" stand-in: smoothed input times a soft threshold of it.

    ``enhanced = s * sigmoid((|s| - threshold) / width)`` with ``s`` the input smoothed by a
    zero-padded Gaussian 5³ convolution: solvent noise (std 0.1 before smoothing) maps to
    about 0, like the background of a trained model, and density passes.
    """
    kernel = np.exp(-0.5 * np.sum(np.square(np.mgrid[-2:3, -2:3, -2:3]), axis=0) / 1.5 ** 2)
    weights = (kernel / kernel.sum())[None, None].astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["volume", "w"], ["s"], pads=[2] * 6),
        helper.make_node("Abs", ["s"], ["a"]),
        helper.make_node("Sub", ["a", "threshold"], ["d"]),
        helper.make_node("Mul", ["d", "inverse_width"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["gate"]),
        helper.make_node("Mul", ["s", "gate"], ["enhanced"]),
    ]
    initializers = [numpy_helper.from_array(weights, "w"),
                    numpy_helper.from_array(np.array(threshold, np.float32), "threshold"),
                    numpy_helper.from_array(np.array(1 / width, np.float32), "inverse_width")]
    graph = _graph(nodes, initializers, ["batch", 1, cube, cube, cube])
    return _model(graph, meta or metadata(cube_size=cube))


def write_model(folder: Path, name: str, model: onnx.ModelProto) -> Path:
    """Save ``model`` as ``folder/name`` and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(model, str(path))
    return path


def identity_path(folder: Path, **meta: object) -> Path:
    """An identity model with the given metadata overrides, saved in ``folder``."""
    cube = int(meta.get("cube_size", CUBE))  # type: ignore[arg-type]
    return write_model(folder, "identity.onnx", scale_model(1.0, cube, meta=metadata(**meta)))


def identity_like(folder: Path, template: Path) -> Path:
    """An identity model with the demhx metadata of the model file ``template`` (cube size,
    voxel size, normalisation...), saved in ``folder``: a run costs what the host work costs."""
    from demhx.model import METADATA_PREFIX, read_metadata

    meta = dict(read_metadata(template))
    cube = int(meta[METADATA_PREFIX + "cube_size"])
    return write_model(folder, "identity.onnx", scale_model(1.0, cube, meta=meta))


def write_registry(folder: Path, models: dict[str, Path], default: str | None = None) -> Path:
    """A ``registry.json`` in ``folder`` for models already saved there."""
    from demhx.model import sha256_of

    entries = {name: {"file": path.name, "sha256": sha256_of(path)}
               for name, path in models.items()}
    path = folder / "registry.json"
    path.write_text(json.dumps({"default": default, "models": entries}), encoding="utf-8")
    return path
