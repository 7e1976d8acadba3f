"""Keras HDF5 -> ONNX conversion (demhx_export.keras_import).

Part (a) needs no TensorFlow: Keras files are written by hand with h5py in both the Keras 2
and the Keras 3 layout, and the converted models are compared with a plain NumPy
implementation of the Keras layers (channels last, float64) written here. Part (b) builds the
paper's U-net in Keras itself and is skipped when TensorFlow is not installed.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from demhx.model import open_session, read_metadata, sha256_of, spec_from_metadata
from demhx.session import check_io

from demhx_export import cli
from demhx_export.keras_import import (
    KERAS_EXTRA,
    choose_group_norm,
    convert_keras,
    read_keras_file,
    relative_error,
    run_onnx,
)

CUBE = 8  # voxels, edge of the hand-made test networks
TOLERANCE = 1e-5  # relative L2 error, ONNX Runtime (float32) vs the NumPy reference (float64)
KERAS_TOLERANCE = 1e-4  # relative L2 error, ONNX Runtime vs Keras itself


# --------------------------------------------------------------------------- test networks


class Net:
    """A Keras functional model described layer by layer, with its weights."""

    def __init__(self, cube: int = CUBE) -> None:
        self.layers: list[dict[str, Any]] = [
            {"name": "input", "class_name": "InputLayer", "inputs": [], "weights": {},
             "config": {"batch_input_shape": [None, cube, cube, cube, 1], "dtype": "float32"}}]
        self.rng = np.random.default_rng(0)

    def add(self, class_name: str, name: str, inputs: str | list[str],
            weights: dict[str, tuple[int, ...]] | None = None, **config: Any) -> str:
        """Append a layer with seeded random weights of the given shapes; return its name."""
        values = {key: (self.rng.uniform(0.5, 1.5, shape) if key == "moving_variance"
                        else 0.5 * self.rng.standard_normal(shape)).astype(np.float32)
                  for key, shape in (weights or {}).items()}
        self.layers.append({"name": name, "class_name": class_name, "config": config,
                            "inputs": [inputs] if isinstance(inputs, str) else inputs,
                            "weights": values})
        return name

    @property
    def output(self) -> str:
        return str(self.layers[-1]["name"])


def every_layer_net() -> Net:
    """A small U-net-like graph using every supported layer kind (8³ -> 8³)."""
    net = Net()
    x = net.add("Conv3D", "conv_a", "input", {"kernel": (3, 3, 3, 1, 4), "bias": (4,)},
                filters=4, kernel_size=[3, 3, 3], padding="same", activation="linear")
    x = net.add("GroupNormalization", "gn_a", x, {"gamma": (4,), "beta": (4,)},
                groups=2, axis=-1, epsilon=1e-5)
    skip = net.add("PReLU", "prelu_a", x, {"alpha": (1, 1, 1, 4)}, shared_axes=[1, 2, 3])
    x = net.add("Conv3D", "down", skip, {"kernel": (3, 3, 3, 4, 6), "bias": (6,)},
                filters=6, kernel_size=[3, 3, 3], strides=[2, 2, 2], padding="same",
                activation="elu")
    x = net.add("BatchNormalization", "bn", x, {"gamma": (6,), "beta": (6,),
                                                "moving_mean": (6,), "moving_variance": (6,)},
                axis=[4], epsilon=1e-3)
    low = net.add("LeakyReLU", "leaky", x, alpha=0.2)
    x = net.add("Conv3D", "dilated", low, {"kernel": (3, 3, 3, 3, 6)}, filters=6,
                kernel_size=[3, 3, 3], padding="same", dilation_rate=[2, 2, 2], groups=2,
                use_bias=False, activation="tanh")
    x = net.add("ZeroPadding3D", "pad_a", x, padding=[[1, 0], [0, 1], [1, 1]])
    x = net.add("Conv3D", "valid", x, {"kernel": (2, 2, 3, 6, 6), "bias": (6,)}, filters=6,
                kernel_size=[2, 2, 3], padding="valid", activation="sigmoid")
    mean = net.add("AveragePooling3D", "avg", x, pool_size=[3, 3, 3], strides=[2, 2, 2],
                   padding="same")
    peak = net.add("MaxPooling3D", "max", low, pool_size=[2, 2, 2], padding="valid")
    diff = net.add("Subtract", "sub", [mean, peak])
    prod = net.add("Multiply", "mul", [mean, peak])
    avg = net.add("Average", "average", [diff, prod, mean])
    x = net.add("Maximum", "maximum", [avg, peak])
    x = net.add("Minimum", "minimum", [x, mean])
    x = net.add("Add", "add", [x, avg])
    x = net.add("UpSampling3D", "up", x, size=[2, 2, 2])
    x = net.add("SpatialDropout3D", "sdrop", x, rate=0.5)
    up_a = net.add("Conv3DTranspose", "tconv_a", x, {"kernel": (3, 3, 3, 4, 6), "bias": (4,)},
                   filters=4, kernel_size=[3, 3, 3], strides=[2, 2, 2], padding="same",
                   output_padding=None, activation="relu")
    x = net.add("Conv3DTranspose", "tconv_b", peak, {"kernel": (2, 2, 2, 2, 6), "bias": (2,)},
                filters=2, kernel_size=[2, 2, 2], strides=[2, 2, 2], padding="valid",
                output_padding=None, activation="linear")
    up_b = net.add("Conv3DTranspose", "tconv_c", x, {"kernel": (3, 3, 3, 2, 2), "bias": (2,)},
                   filters=2, kernel_size=[3, 3, 3], strides=[2, 2, 2], padding="same",
                   output_padding=[1, 1, 1], activation="linear")
    x = net.add("Concatenate", "concat", [skip, up_a, up_b], axis=-1)
    x = net.add("Cropping3D", "crop", x, cropping=[[1, 1], [0, 2], [2, 0]])
    x = net.add("ZeroPadding3D", "pad_b", x, padding=[[1, 1], [1, 1], [1, 1]])
    x = net.add("GroupNormalization", "gn_b", x, {"gamma": (10,)}, groups=5, axis=-1,
                epsilon=1e-3, center=False)
    x = net.add("PReLU", "prelu_b", x, {"alpha": (CUBE, CUBE, CUBE, 10)}, shared_axes=None)
    x = net.add("ELU", "elu", x, alpha=0.7)
    x = net.add("ReLU", "relu", x, max_value=2.0, negative_slope=0.1, threshold=0.0)
    x = net.add("Activation", "softplus", x, activation="softplus")
    x = net.add("Dropout", "drop", x, rate=0.3)
    net.add("Conv3D", "head", x, {"kernel": (1, 1, 1, 10, 1), "bias": (1,)}, filters=1,
            kernel_size=[1, 1, 1], padding="valid", activation="linear")
    return net


# --------------------------------------------------------------------------- Keras files


def write_keras_file(path: Path, net: Net, layout: str = "keras2", keras_version: str = "",
                     params: dict[str, int] | None = None, code: dict[str, str] | None = None
                     ) -> Path:
    """Write ``net`` the way Keras's ``model.save("x.h5")`` does: layout ``keras2``,
    ``keras3`` or ``sequential`` (a Keras 2 Sequential model: a chain without an InputLayer)."""
    keras3 = layout == "keras3"
    entries = [_layer_entry(layer, keras3) for layer in net.layers]
    ends = (["input", 0, 0], [net.output, 0, 0]) if keras3 else ([["input", 0, 0]],
                                                                 [[net.output, 0, 0]])
    config = {"class_name": "Functional" if keras3 else "Model",
              "config": {"name": "model", "layers": entries, "input_layers": ends[0],
                         "output_layers": ends[1]}}
    if layout == "sequential":
        chain = [{"class_name": entry["class_name"], "config": entry["config"]}
                 for entry in entries[1:]]
        chain[0]["config"]["batch_input_shape"] = net.layers[0]["config"]["batch_input_shape"]
        config = {"class_name": "Sequential", "config": {"name": "sequential", "layers": chain}}
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps(config).encode()
        handle.attrs["keras_version"] = keras_version or ("3.15.1" if keras3 else "2.2.4")
        handle.attrs["backend"] = "tensorflow"
        weights = handle.create_group("model_weights")
        weights.attrs["layer_names"] = [layer["name"].encode() for layer in net.layers]
        for layer in net.layers:
            group = weights.create_group(layer["name"])
            names = [f"{layer['name']}/{key}" + ("" if keras3 else ":0")
                     for key in layer["weights"]]
            group.attrs["weight_names"] = [name.encode() for name in names]
            for name, value in zip(names, layer["weights"].values(), strict=True):
                group.create_dataset(name, data=value)
        for key, value in (params or {}).items():
            handle.create_dataset(f"configParams/{key}", data=np.array([value]))
        for key, source in (code or {}).items():
            handle.create_dataset(f"code/{key}", data=np.array([source.encode()]))
    return path


def _layer_entry(layer: dict[str, Any], keras3: bool) -> dict[str, Any]:
    config = {"name": layer["name"], "trainable": True, **layer["config"]}
    if keras3 and layer["class_name"] == "InputLayer":
        config["batch_shape"] = config.pop("batch_input_shape")
    if keras3 and layer["class_name"] == "LeakyReLU":
        config["negative_slope"] = config.pop("alpha")
    if keras3 and layer["class_name"] == "BatchNormalization":
        config["axis"] = config["axis"][0]  # Keras 3 keeps an int, tf.keras 2 a list
    if keras3:
        tensors = [{"class_name": "__keras_tensor__",
                    "config": {"shape": None, "dtype": "float32", "keras_history": [name, 0, 0]}}
                   for name in layer["inputs"]]
        nodes = [{"args": [tensors] if len(tensors) > 1 else tensors, "kwargs": {}}] \
            if tensors else []
    else:
        nodes = [[[name, 0, 0, {}] for name in layer["inputs"]]] if layer["inputs"] else []
    return {"class_name": layer["class_name"], "config": config, "name": layer["name"],
            "inbound_nodes": nodes}


# --------------------------------------------------------------------------- NumPy reference


def _same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "same" padding: out = ceil(size / stride), odd voxel at the end."""
    span = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _pad_for(x: np.ndarray, cfg: dict[str, Any], kernel: list[int], strides: list[int],
             dilation: list[int], value: float = 0.0) -> np.ndarray:
    if cfg.get("padding") != "same":
        return x
    pads = [_same_padding(n, k, s, d) for n, k, s, d in zip(x.shape[1:4], kernel, strides,
                                                            dilation, strict=True)]
    return np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=value)


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilation: list[int]):
    """Yield (offset, strided view) for every kernel offset of a channels-last volume."""
    out = [(n - ((k - 1) * d + 1)) // s + 1 for n, k, s, d in zip(x.shape[1:4], kernel, strides,
                                                                 dilation, strict=True)]
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, m, s in zip(offset, dilation, out, strides, strict=True))
        yield offset, x[(slice(None), *index)]


def ref_conv3d(x: np.ndarray, w: dict[str, np.ndarray], cfg: dict[str, Any]) -> np.ndarray:
    kernel, strides = cfg["kernel_size"], cfg.get("strides", [1, 1, 1])
    dilation, groups = cfg.get("dilation_rate", [1, 1, 1]), cfg.get("groups", 1)
    weight = w["kernel"].astype(np.float64)
    size_in, size_out = weight.shape[3], weight.shape[4] // groups
    x = _pad_for(x, cfg, kernel, strides, dilation)
    parts = []
    for g in range(groups):
        part = x[..., g * size_in:(g + 1) * size_in]
        taps = [np.einsum("ndhwi,io->ndhwo", view, weight[offset][:, g * size_out:
                                                                  (g + 1) * size_out])
                for offset, view in _windows(part, kernel, strides, dilation)]
        parts.append(sum(taps))
    y = np.concatenate(parts, axis=-1)
    if cfg.get("use_bias", True):
        y = y + w["bias"]
    return REF_ACTIVATIONS[cfg.get("activation", "linear")](y)


def ref_conv3d_transpose(x: np.ndarray, w: dict[str, np.ndarray], cfg: dict[str, Any]
                         ) -> np.ndarray:
    """Scatter every input voxel times the kernel, then crop as TensorFlow does."""
    kernel, strides = cfg["kernel_size"], cfg.get("strides", [1, 1, 1])
    weight, same = w["kernel"].astype(np.float64), cfg["padding"] == "same"
    extra = cfg.get("output_padding") or [None] * 3
    sizes, full, outs = x.shape[1:4], [], []
    for n, k, s, e in zip(sizes, kernel, strides, extra, strict=True):
        full.append((n - 1) * s + k)
        if e is None:
            outs.append(n * s if same else n * s + max(k - s, 0))
        else:
            outs.append((n - 1) * s + k - 2 * (k // 2 if same else 0) + e)
    before = [max(f - o, 0) // 2 if same else 0 for f, o in zip(full, outs, strict=True)]
    shape = [max(f, b + o) for f, b, o in zip(full, before, outs, strict=True)]
    buffer = np.zeros((x.shape[0], *shape, weight.shape[3]))
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o, o + (n - 1) * s + 1, s)
                      for o, n, s in zip(offset, sizes, strides, strict=True))
        buffer[(slice(None), *index)] += np.einsum("ndhwi,oi->ndhwo", x, weight[offset])
    y = buffer[:, before[0]:before[0] + outs[0], before[1]:before[1] + outs[1],
               before[2]:before[2] + outs[2]] + w["bias"]
    return REF_ACTIVATIONS[cfg.get("activation", "linear")](y)


def ref_pool(x: np.ndarray, cfg: dict[str, Any], kind: str) -> np.ndarray:
    pool = cfg["pool_size"]
    strides = cfg.get("strides") or pool
    padded = _pad_for(x, cfg, pool, strides, [1, 1, 1], np.nan)
    views = np.stack([view for _, view in _windows(padded, pool, strides, [1, 1, 1])])
    return np.nanmax(views, axis=0) if kind == "max" else np.nanmean(views, axis=0)


def ref_group_normalization(x: np.ndarray, w: dict[str, np.ndarray], cfg: dict[str, Any],
                            mode: str) -> np.ndarray:
    """keras-contrib: reshape (n, z, y, x, c) to (n, g, z, y, x, c/g) as is; standard: per
    channel group."""
    n, d, h, wd, c = x.shape
    g, eps = cfg["groups"], cfg.get("epsilon", 1e-3)
    gamma = w.get("gamma", np.ones(c)).astype(np.float64)
    beta = w.get("beta", np.zeros(c)).astype(np.float64)
    if mode == "keras-contrib":
        v = x.reshape(n, g, d, h, wd, c // g)
        axes, shape = (2, 3, 4, 5), (1, g, 1, 1, 1, c // g)
    else:
        v = x.reshape(n, d, h, wd, g, c // g)
        axes, shape = (1, 2, 3, 5), (1, 1, 1, 1, g, c // g)
    v = (v - v.mean(axis=axes, keepdims=True)) / np.sqrt(v.var(axis=axes, keepdims=True) + eps)
    return (v * gamma.reshape(shape) + beta.reshape(shape)).reshape(x.shape)


REF_ACTIVATIONS = {
    "linear": lambda v: v, "relu": lambda v: np.maximum(v, 0.0),
    "elu": lambda v: np.where(v > 0, v, np.expm1(v)), "tanh": np.tanh,
    "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "softplus": lambda v: np.logaddexp(0.0, v),
    "softsign": lambda v: v / (1 + np.abs(v)), "exponential": np.exp,
    "selu": lambda v: 1.0507009873554805 * np.where(v > 0, v, 1.6732632423543772 * np.expm1(v)),
    "swish": lambda v: v / (1 + np.exp(-v)), "relu6": lambda v: np.clip(v, 0.0, 6.0),
}


def ref_layer(layer: dict[str, Any], xs: list[np.ndarray], mode: str) -> np.ndarray:
    """One Keras layer in NumPy (channels last, float64)."""
    kind, cfg, w, x = layer["class_name"], layer["config"], layer["weights"], xs[0]
    simple = {
        "Conv3D": lambda: ref_conv3d(x, w, cfg),
        "Conv3DTranspose": lambda: ref_conv3d_transpose(x, w, cfg),
        "GroupNormalization": lambda: ref_group_normalization(x, w, cfg, mode),
        "BatchNormalization": lambda: (x - w["moving_mean"]) / np.sqrt(
            w["moving_variance"].astype(np.float64) + cfg["epsilon"]) * w["gamma"] + w["beta"],
        "PReLU": lambda: np.where(x > 0, x, w["alpha"].astype(np.float64) * x),
        "LeakyReLU": lambda: np.where(x > 0, x, cfg["alpha"] * x),
        "ELU": lambda: np.where(x > 0, x, cfg["alpha"] * np.expm1(x)),
        "ReLU": lambda: np.minimum(np.where(x > 0, x, cfg["negative_slope"] * x),
                                   cfg["max_value"]),
        "Activation": lambda: REF_ACTIVATIONS[cfg["activation"]](x),
        "MaxPooling3D": lambda: ref_pool(x, cfg, "max"),
        "AveragePooling3D": lambda: ref_pool(x, cfg, "mean"),
        "UpSampling3D": lambda: x.repeat(cfg["size"][0], 1).repeat(cfg["size"][1], 2)
        .repeat(cfg["size"][2], 3),
        "ZeroPadding3D": lambda: np.pad(x, [(0, 0), *cfg["padding"], (0, 0)]),
        "Cropping3D": lambda: x[:, slice(cfg["cropping"][0][0], x.shape[1] - cfg["cropping"][0][1]),
                                slice(cfg["cropping"][1][0], x.shape[2] - cfg["cropping"][1][1]),
                                slice(cfg["cropping"][2][0], x.shape[3] - cfg["cropping"][2][1])],
        "Concatenate": lambda: np.concatenate(xs, axis=-1),
        "Add": lambda: sum(xs), "Subtract": lambda: xs[0] - xs[1],
        "Multiply": lambda: np.prod(xs, axis=0), "Average": lambda: sum(xs) / len(xs),
        "Maximum": lambda: np.max(xs, axis=0), "Minimum": lambda: np.min(xs, axis=0),
    }
    if kind in ("Dropout", "SpatialDropout3D"):
        return x
    return simple[kind]()


def reference_forward(net: Net, x: np.ndarray, mode: str) -> np.ndarray:
    """The whole network in NumPy: ``x`` (n, z, y, x, 1) -> (n, z, y, x, 1), float64."""
    values = {"input": x.astype(np.float64)}
    for layer in net.layers[1:]:
        values[layer["name"]] = ref_layer(layer, [values[n] for n in layer["inputs"]], mode)
    return values[net.output]


def onnx_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the converted model on channels-last input, return channels-last output."""
    return run_onnx(path, np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))).transpose(0, 2, 3, 4, 1)


def _inputs(batch: int = 2, cube: int = CUBE) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, cube, cube, cube, 1),
                                                    dtype=np.float32)


# --------------------------------------------------------------------------- (a) no TensorFlow


@pytest.mark.parametrize("layout", ["keras2", "keras3"])
@pytest.mark.parametrize("mode", ["keras-contrib", "standard"])
def test_every_layer_kind_matches_numpy(tmp_path: Path, layout: str, mode: str) -> None:
    net = every_layer_net()
    src = write_keras_file(tmp_path / "tiny.h5", net, layout)
    report = convert_keras(src, tmp_path / "tiny.onnx", group_norm=mode)
    x = _inputs()
    error = relative_error(onnx_forward(report.path, x), reference_forward(net, x, mode))
    assert error < TOLERANCE, error
    assert report.group_norm == mode and report.layers["GroupNormalization"] == 2
    parameters = sum(v.size for layer in net.layers for v in layer["weights"].values())
    assert report.parameters == parameters


def test_sequential_model_matches_numpy(tmp_path: Path) -> None:
    net = Net()
    x = net.add("Conv3D", "conv", "input", {"kernel": (3, 3, 3, 1, 3), "bias": (3,)}, filters=3,
                kernel_size=[3, 3, 3], padding="same", activation="relu")
    net.add("Conv3D", "head", x, {"kernel": (1, 1, 1, 3, 1), "bias": (1,)}, filters=1,
            kernel_size=[1, 1, 1], padding="valid", activation="linear")
    src = write_keras_file(tmp_path / "seq.h5", net, "sequential")
    x = _inputs()
    error = relative_error(onnx_forward(convert_keras(src, tmp_path / "s.onnx").path, x),
                           reference_forward(net, x, "standard"))
    assert error < TOLERANCE, error


def test_group_norm_computations_differ(tmp_path: Path) -> None:
    """The two GroupNormalization computations really give different networks."""
    net = every_layer_net()
    src = write_keras_file(tmp_path / "tiny.h5", net)
    outputs = [onnx_forward(convert_keras(src, tmp_path / f"{mode}.onnx", group_norm=mode).path,
                            _inputs()) for mode in ("keras-contrib", "standard")]
    assert relative_error(outputs[0], outputs[1]) > 1e-2


@pytest.mark.parametrize("activation", sorted(set(REF_ACTIVATIONS) - {"linear"}))
def test_activations_match_numpy(tmp_path: Path, activation: str) -> None:
    net = Net()
    net.add("Activation", "act", "input", activation=activation)
    src = write_keras_file(tmp_path / "act.h5", net)
    x = _inputs()
    error = relative_error(onnx_forward(convert_keras(src, tmp_path / "a.onnx").path, x),
                           reference_forward(net, x, "standard"))
    assert error < TOLERANCE, (activation, error)


def test_converted_model_meets_the_runtime_contract(tmp_path: Path) -> None:
    src = write_keras_file(tmp_path / "deepEMhancer_tightTarget.hd5", every_layer_net(),
                           params={"NNET_INPUT_SIZE": CUBE, "NNET_INPUT_STRIDE": 2})
    out = tmp_path / "tight.onnx"
    convert_keras(src, out)
    spec = spec_from_metadata(out, read_metadata(out))
    check_io(open_session(out), spec, out)  # raises if the shapes break the contract
    assert (spec.name, spec.cube_size, spec.stride) == ("deepEMhancer_tightTarget", CUBE, 2)
    assert (spec.voxel_size, spec.noise_std, spec.normalisation) == (1.0, 0.1, "noise")
    assert spec.trained
    assert f"Keras file {src.name} sha256 {sha256_of(src)}" in spec.provenance
    assert spec.extra["group_norm"] == "keras-contrib"  # Keras 2.2.4: keras-contrib's layer
    assert "not compared with Keras" in spec.extra["unverified"]


def test_stride_defaults_and_masked_models(tmp_path: Path) -> None:
    src = write_keras_file(tmp_path / "deepEMhancer_masked.hd5", every_layer_net())
    spec = spec_from_metadata(tmp_path / "m.onnx",
                              convert_keras(src, tmp_path / "m.onnx").metadata)
    assert spec.normalisation == "mask" and spec.stride == CUBE // 4
    spec = spec_from_metadata(tmp_path / "n.onnx", convert_keras(
        src, tmp_path / "n.onnx", normalisation="noise", stride=3).metadata)
    assert spec.normalisation == "noise" and spec.stride == 3


def test_cube_size_of_models_without_a_fixed_input(tmp_path: Path) -> None:
    net = Net()
    net.layers[0]["config"]["batch_input_shape"] = [None, None, None, None, 1]
    net.add("Conv3D", "conv", "input", {"kernel": (3, 3, 3, 1, 1), "bias": (1,)}, filters=1,
            kernel_size=[3, 3, 3], padding="same", activation="linear")
    src = write_keras_file(tmp_path / "any_size.h5", net, params={"NNET_INPUT_SIZE": 16})
    report = convert_keras(src, tmp_path / "a.onnx")
    x = _inputs(cube=16)
    assert report.metadata["demhx.cube_size"] == "16"
    assert relative_error(onnx_forward(report.path, x),
                          reference_forward(net, x, "standard")) < TOLERANCE
    report = convert_keras(src, tmp_path / "b.onnx", cube_size=24)
    assert report.metadata["demhx.cube_size"] == "24"
    fixed = write_keras_file(tmp_path / "fixed.h5", every_layer_net())
    with pytest.raises(ValueError, match="takes 8³ cubes, not --cube 16"):
        convert_keras(fixed, tmp_path / "c.onnx", cube_size=16)


def test_stored_code_is_never_executed(tmp_path: Path) -> None:
    witness = tmp_path / "executed"
    source = f"open({str(witness)!r}, 'w').write('ran')\ncustom_objects = {{}}\n"
    src = write_keras_file(tmp_path / "m.hd5", every_layer_net(), keras_version="2.15.0",
                           code={"custom_objects": source, "normFun": source})
    report = convert_keras(src, tmp_path / "m.onnx")
    assert not witness.exists()
    assert report.group_norm == "keras-contrib"  # DeepEMhancer's stored class
    assert "not executed: code/custom_objects, code/normFun" in report.metadata[
        "demhx.provenance"]


def test_group_norm_choice(tmp_path: Path) -> None:
    net = every_layer_net()
    keras3 = read_keras_file(write_keras_file(tmp_path / "k3.h5", net, "keras3"))
    assert choose_group_norm(keras3) == "standard"
    recent = read_keras_file(write_keras_file(tmp_path / "k2.h5", net, keras_version="2.15.0"))
    with pytest.raises(ValueError, match="pass --group-norm"):
        choose_group_norm(recent)
    assert choose_group_norm(recent, "standard") == "standard"
    with pytest.raises(ValueError, match="--group-norm 'group'"):
        choose_group_norm(recent, "group")
    for layer in net.layers:
        if layer["class_name"] == "GroupNormalization":
            layer["class_name"] = "Addons>GroupNormalization"
    addons = read_keras_file(write_keras_file(tmp_path / "tfa.h5", net, keras_version="2.15.0"))
    assert choose_group_norm(addons) == "standard"


@pytest.mark.parametrize("class_name", ["Lambda", "TFOpLambda"])
def test_code_layers_are_refused(tmp_path: Path, class_name: str) -> None:
    net = Net()
    net.add(class_name, "lambda_1", "input", function=["4wEAAAAAAAAA", None, None],
            function_type="lambda")
    src = write_keras_file(tmp_path / "l.h5", net)
    with pytest.raises(ValueError, match="layer 'lambda_1' is a .*never executes code") as error:
        convert_keras(src, tmp_path / "l.onnx")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "l.onnx").exists()


def test_unknown_layer_is_refused(tmp_path: Path) -> None:
    net = Net()
    net.add("Dense", "dense_1", "input", {"kernel": (1, 1), "bias": (1,)}, units=1)
    src = write_keras_file(tmp_path / "d.h5", net)
    with pytest.raises(ValueError, match="layer 'dense_1' has class 'Dense'") as error:
        convert_keras(src, tmp_path / "d.onnx")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("change,fragment", [
    (lambda net: net.layers[0]["config"].update(batch_input_shape=[None, 8, 8, 16, 1]),
     "not a cube"),
    (lambda net: net.add("Conv3D", "shrink", "input", {"kernel": (3, 3, 3, 1, 1), "bias": (1,)},
                         filters=1, kernel_size=[3, 3, 3], padding="valid"),
     "output shape to equal"),
    (lambda net: net.add("Conv3D", "wide", "input", {"kernel": (3, 3, 3, 2, 1), "bias": (1,)},
                         filters=1, kernel_size=[3, 3, 3], padding="same"),
     "expected (3, 3, 3, 1, 1)"),
    (lambda net: net.add("Conv3D", "cf", "input", {"kernel": (1, 1, 1, 1, 1), "bias": (1,)},
                         filters=1, kernel_size=[1, 1, 1], data_format="channels_first"),
     "channels_first"),
    (lambda net: net.add("Conv3D", "no_size", "input", {"kernel": (1, 1, 1, 1, 1)}, filters=1),
     "malformed configuration (KeyError: 'kernel_size')"),
])
def test_inconsistent_files_are_refused(tmp_path: Path, change: Any, fragment: str) -> None:
    net = Net()
    change(net)
    if len(net.layers) == 1:
        net.add("Activation", "act", "input", activation="linear")
    src = write_keras_file(tmp_path / "bad.h5", net)
    with pytest.raises(ValueError, match=None) as error:
        convert_keras(src, tmp_path / "bad.onnx")
    assert fragment in str(error.value) and str(src) in str(error.value)


def test_not_a_model_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_keras_file(text)
    with h5py.File(tmp_path / "weights.h5", "w") as handle:
        handle.create_group("model_weights")
    with pytest.raises(ValueError, match="no model_config attribute"):
        read_keras_file(tmp_path / "weights.h5")
    with h5py.File(tmp_path / "odd.h5", "w") as handle:
        handle.attrs["model_config"] = json.dumps({"class_name": "Functional", "config": {}})
    with pytest.raises(ValueError, match="model_config is malformed"):
        read_keras_file(tmp_path / "odd.h5")


def test_missing_h5py_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = write_keras_file(tmp_path / "m.h5", every_layer_net())
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes "import h5py" fail
    with pytest.raises(ImportError, match=r'pip install "demhx-export\[keras\]"'):
        convert_keras(src, tmp_path / "m.onnx")
    status = cli.main(["from-keras", str(src), str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and KERAS_EXTRA in err


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_keras_file(tmp_path / "deepEMhancer_highRes.hd5", every_layer_net(), "keras3")
    out = tmp_path / "high.onnx"
    status = cli.main(["from-keras", str(src), str(out), "--name", "highRes", "--version",
                       "1.10", "--group-norm", "keras-contrib", "--fp16"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "keras-contrib" in captured.out and "fp16 twin" in captured.out
    spec = spec_from_metadata(out, read_metadata(out))
    assert (spec.name, spec.version, spec.extra["group_norm"]) == ("highRes", "1.10",
                                                                   "keras-contrib")
    assert spec.fp16_path == tmp_path / "high.fp16.onnx"
    for option in ("--group-norm", "--normalisation"):
        status = cli.main(["from-keras", str(src), str(tmp_path / "x.onnx"), option, "x"])
        err = capsys.readouterr().err
        assert status == 1 and f"{option} 'x': choose one of" in err and err.count("\n") == 1
    status = cli.main(["from-keras", str(tmp_path / "missing.hd5"), str(tmp_path / "y.onnx")])
    assert status == 1 and "missing.hd5: Keras model file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


# --------------------------------------------------------------------------- (b) Keras itself

PAPER_GROUPS = 8  # GroupNorm groups: the largest divisor of the width that is <= 8


def _keras(layout: str) -> Any:
    """Keras 3 (``keras``) or Keras 2 (``tf_keras``, or ``keras`` < 3); skip when absent."""
    pytest.importorskip("tensorflow")
    try:
        import keras
    except ImportError:
        keras = None
    if keras is not None and (int(keras.__version__.split(".")[0]) >= 3) == (layout == "keras3"):
        return keras
    if layout == "keras2":
        return pytest.importorskip("tf_keras")  # Keras 2 for TensorFlow >= 2.16
    pytest.skip("Keras 3 is not installed")


@pytest.mark.parametrize("layout", ["keras2", "keras3"])
def test_every_layer_kind_matches_keras(tmp_path: Path, layout: str) -> None:
    """The every-layer network built by Keras itself (its built-in GroupNormalization)."""
    keras = _keras(layout)
    net = every_layer_net()
    tensors = {"input": keras.Input(tuple(net.layers[0]["config"]["batch_input_shape"][1:]))}
    for layer in net.layers[1:]:
        config = {key: value for key, value in _layer_entry(layer, layout == "keras3")[
            "config"].items() if key != "trainable"}
        instance = getattr(keras.layers, layer["class_name"]).from_config(config)
        inputs = [tensors[name] for name in layer["inputs"]]
        tensors[layer["name"]] = instance(inputs if len(inputs) > 1 else inputs[0])
        instance.set_weights(list(layer["weights"].values()))
    model = keras.Model(tensors["input"], tensors[net.output])
    model.save(str(tmp_path / "every.h5"))
    report = convert_keras(tmp_path / "every.h5", tmp_path / "every.onnx", group_norm="standard")
    x = _inputs()
    expected = model.predict(x, verbose=0)
    assert relative_error(onnx_forward(report.path, x), expected) < KERAS_TOLERANCE
    # the NumPy reference of part (a) computes what Keras computes
    assert relative_error(reference_forward(net, x, "standard"), expected) < KERAS_TOLERANCE


def _paper_unet(keras: Any, group_norm: Any, widths: tuple[int, int, int], cube: int,
                shared_prelu: bool) -> Any:
    """The paper's U-net in Keras: 3 levels, blocks of 3 x (Conv3D 3³ -> GN -> PReLU),
    strided-convolution down-sampling, transposed-convolution up-sampling, skip concats."""
    layers = keras.layers
    shared = [1, 2, 3] if shared_prelu else None

    def unit(x: Any, width: int, conv: Any) -> Any:
        groups = max(g for g in range(1, PAPER_GROUPS + 1) if width % g == 0)
        return layers.PReLU(shared_axes=shared)(group_norm(groups)(conv(width)(x)))

    def same(width: int, strides: int = 1) -> Any:
        return lambda w: layers.Conv3D(w, 3, strides=strides, padding="same")

    inputs = keras.Input((cube, cube, cube, 1))
    x, skips = inputs, []
    for width in widths:
        for _ in range(3):
            x = unit(x, width, same(width))
        skips.append(x)
        x = unit(x, width, same(width, 2))
    for level in reversed(range(3)):
        x = unit(x, widths[level], lambda w: layers.Conv3DTranspose(w, 2, strides=2))
        x = layers.Concatenate()([x, skips[level]])
        for _ in range(3):
            x = unit(x, widths[level], same(widths[level]))
    return keras.Model(inputs, layers.Conv3D(1, 1)(x))


def _randomise(model: Any) -> None:
    """Seeded random weights everywhere (GN gammas and PReLU slopes included)."""
    rng = np.random.default_rng(2)
    for layer in model.layers:
        layer.set_weights([(0.3 * rng.standard_normal(w.shape) + (w.ndim == 1 and
                            "gamma" in v.name)).astype(np.float32)
                           for w, v in zip(layer.get_weights(), layer.weights, strict=True)])


def _compare_with_keras(model: Any, path: Path, tmp_path: Path, **options: Any) -> float:
    _randomise(model)
    model.save(str(path.with_suffix(".h5")))  # Keras picks the HDF5 format by this suffix
    path.with_suffix(".h5").rename(path)
    if options.pop("stored_code", False):  # DeepEMhancer keeps its layer's source beside
        with h5py.File(path, "a") as handle:
            handle.create_dataset("code/custom_objects",
                                  data=np.array([b"raise SystemExit('never run')"]))
    report = convert_keras(path, tmp_path / "converted.onnx", **options)
    x = _inputs(cube=model.input_shape[1])
    return relative_error(onnx_forward(report.path, x), model.predict(x, verbose=0))


def test_keras3_file_matches_keras(tmp_path: Path) -> None:
    """Keras 3 (``model.save("x.h5")``) with keras.layers.GroupNormalization."""
    keras = _keras("keras3")

    def group_norm(groups: int) -> Any:
        return keras.layers.GroupNormalization(groups=groups)

    model = _paper_unet(keras, group_norm, (4, 8, 16), 16, shared_prelu=True)
    error = _compare_with_keras(model, tmp_path / "paper.h5", tmp_path)
    assert error < KERAS_TOLERANCE, error


def test_keras2_contrib_group_norm_file_matches_keras(tmp_path: Path) -> None:
    """A DeepEMhancer-like file: Keras 2 layout, per-voxel PReLU slopes, and a custom
    GroupNormalization computing what keras_contrib's does, its source stored in the file."""
    keras = _keras("keras2")
    import tensorflow as tf

    class GroupNormalization(keras.layers.Layer):  # keras_contrib's computation, channels last
        def __init__(self, groups: int = 8, epsilon: float = 1e-5, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.groups, self.epsilon, self.axis = groups, epsilon, -1

        def build(self, shape: Any) -> None:
            self.gamma = self.add_weight(name="gamma", shape=(shape[-1],), initializer="ones")
            self.beta = self.add_weight(name="beta", shape=(shape[-1],), initializer="zeros")

        def call(self, x: Any) -> Any:
            shape, channels, groups = tf.shape(x), x.shape[-1], self.groups
            view = [1, groups, 1, 1, 1, channels // groups]
            grouped = tf.reshape(x, tf.stack([shape[0], groups, shape[1], shape[2], shape[3],
                                              channels // groups]))
            mean, variance = tf.nn.moments(grouped, [2, 3, 4, 5], keepdims=True)
            grouped = (grouped - mean) / tf.sqrt(variance + self.epsilon)
            grouped = grouped * tf.reshape(self.gamma, view) + tf.reshape(self.beta, view)
            return tf.reshape(grouped, shape)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "groups": self.groups, "axis": self.axis,
                    "epsilon": self.epsilon}

    model = _paper_unet(keras, lambda groups: GroupNormalization(groups), (4, 8, 16), 16,
                        shared_prelu=False)
    error = _compare_with_keras(model, tmp_path / "deepEMhancer_like.hd5", tmp_path,
                                stored_code=True)
    assert error < KERAS_TOLERANCE, error


def test_keras2_builtin_group_norm_file_matches_keras(tmp_path: Path) -> None:
    """tf.keras 2.11+ built-in GroupNormalization (``--group-norm standard``)."""
    keras = _keras("keras2")
    if not hasattr(keras.layers, "GroupNormalization"):
        pytest.skip("this Keras 2 has no built-in GroupNormalization")
    model = _paper_unet(keras, lambda groups: keras.layers.GroupNormalization(groups),
                        (4, 8, 16), 16, shared_prelu=True)
    error = _compare_with_keras(model, tmp_path / "builtin.h5", tmp_path, group_norm="standard")
    assert error < KERAS_TOLERANCE, error
