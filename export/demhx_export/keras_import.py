"""Convert a Keras ``.h5``/``.hd5`` 3D U-net (the released DeepEMhancer models) to a demhx model.

``convert_keras(src, out_path, ...) -> KerasImportReport`` reads the Keras file with ``h5py``
only (no TensorFlow, no Keras), builds the same network as an ONNX graph with
``onnx.helper`` and writes ``OUT.onnx`` (opset 17, input ``input`` and output ``output``,
float32 ``(batch, 1, n, n, n)``, the ``demhx.*`` metadata of :mod:`demhx.model`).

What is read
------------
Only data: the ``model_config`` JSON attribute of the file, the weight arrays listed by the
``weight_names`` attribute of each layer's group under ``model_weights``, the numbers under
``configParams`` (DeepEMhancer stores its cube size and stride there) and the *names* of the
datasets under ``code``. Nothing stored in the file is executed, unmarshalled or evaluated:
DeepEMhancer's files carry Python source under ``code/`` (the ``GroupNormalization`` class
and the input normalisation function), which the original tool ``exec``\\ s; it is ignored
here and its dataset names are recorded in the provenance. A ``Lambda`` layer (marshalled
Python bytecode) and any layer class not listed below are refused with one line naming the
layer and its class.

Both HDF5 layouts are read: Keras 2 (``keras`` 2.x, ``tf.keras`` up to TF 2.15,
``tf_keras``): weights at ``model_weights/<layer>/<layer>/<var>:0``, inbound nodes as lists;
and Keras 3 (``model.save("x.h5")``): weights at ``model_weights/<layer>/<layer>/<var>``,
inbound nodes as ``{"args", "kwargs"}`` with ``__keras_tensor__`` entries.

Layers converted (``channels_last`` only; Keras ``(batch, z, y, x, c)`` becomes ONNX
``(batch, c, z, y, x)``, kernels ``(kz, ky, kx, in, out)`` become ``(out, in, kz, ky, kx)``):
InputLayer; Conv3D (padding ``same``/``valid``, strides, dilation, groups, bias, built-in
activation); Conv3DTranspose (incl. ``output_padding``); UpSampling3D; MaxPooling3D;
AveragePooling3D; ZeroPadding3D; Cropping3D; GroupNormalization; BatchNormalization; PReLU
(shared or per-voxel slopes); LeakyReLU; ReLU; ELU; Activation; Concatenate (channel axis);
Add, Subtract, Multiply, Average, Maximum, Minimum; Dropout, SpatialDropout1D/2D/3D,
AlphaDropout, GaussianDropout, GaussianNoise, ActivityRegularization (identity at inference).
"Same" padding follows TensorFlow (the odd voxel of padding goes at the end).

Group normalisation: two different computations
-----------------------------------------------
``GroupNormalization`` names two different layers in Keras files (:data:`GROUP_NORMS`):

``keras-contrib``
    ``keras_contrib.layers.GroupNormalization``, which DeepEMhancer trained with (its stored
    ``code/custom_objects`` is a copy of it). With channels last it reshapes the
    ``(batch, z, y, x, c)`` tensor to ``(batch, groups, z, y, x, c / groups)`` *without*
    moving the channel axis, so each "group" is a contiguous ``1/groups`` of the sample in
    memory order (a slab of ``edge/groups`` z-planes with all channels when ``groups``
    divides the edge), and ``gamma``/``beta`` are applied by position in that reshaped view.
    The converter reproduces exactly this computation.
``standard``
    group normalisation as published (Wu & He): channels split into groups, statistics over
    each group's channels and all voxels; ``keras.layers.GroupNormalization`` (Keras 3, and
    tf.keras 2.11+) and ``tensorflow_addons`` (``Addons>GroupNormalization``).

``group_norm="auto"`` picks ``standard`` for ``Addons>GroupNormalization``, ``keras-contrib``
for a file carrying DeepEMhancer's ``code/custom_objects`` or written by Keras < 2.11 (which
had no built-in GroupNormalization), ``standard`` for Keras 3 files, and refuses to guess for
other Keras 2 files.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from demhx.model import NORMALISATIONS, sha256_of, spec_from_metadata
from onnx import TensorProto, helper, numpy_helper

from demhx_export import __version__

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17, readable by every onnxruntime >= 1.17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
PREFIX = "demhx."
FP16_SUFFIX = ".fp16.onnx"
KERAS_EXTRA = 'pip install "demhx-export[keras]"'
GROUP_NORMS = ("auto", "keras-contrib", "standard")
# the released DeepEMhancer models (paper and its inference code): 64³ cubes at 1 Å/voxel,
# stride 16, solvent noise normalised to mean 0 and std 0.1
PAPER_CUBE_SIZE = 64  # voxels
PAPER_VOXEL_SIZE = 1.0  # Å
PAPER_NOISE_STD = 0.1
STRIDE_FRACTION = 4  # stride = cube size / 4 when the file does not record one
FIRST_BUILTIN_GROUP_NORM = (2, 11)  # first Keras 2 release with a built-in GroupNormalization
VERIFY_BATCH = 2  # cubes in the smoke run after conversion
VERIFY_SEED = 0
FP16_TOLERANCE = 1e-2  # relative L2 error, fp16 twin vs the fp32 model
CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")
IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                   "AlphaDropout", "GaussianDropout", "GaussianNoise", "ActivityRegularization")
CONFIG_PARAMS = "configParams"  # DeepEMhancer: NNET_INPUT_SIZE, NNET_INPUT_STRIDE
CODE_GROUP = "code"  # DeepEMhancer: Python source, never executed here

TensorRef = tuple[str, int, int]  # (layer name, node index, tensor index)


@dataclass(frozen=True)
class KerasLayer:
    """One layer of the Keras model: class, config and the inputs of each of its calls."""

    name: str
    class_name: str
    config: dict[str, Any]
    nodes: tuple[tuple[TensorRef, ...], ...]


@dataclass(frozen=True)
class KerasFile:
    """What :func:`read_keras_file` takes from a Keras HDF5 file (data only).

    Attributes
    ----------
    path : the file.
    keras_version, backend : root attributes written by Keras ("" when absent).
    layers : the model's layers in file order.
    inputs, outputs : the model's input and output tensors.
    weights : ``{layer name: {variable name: array}}``, variable names without ``:0``.
    params : numbers stored under ``configParams`` (DeepEMhancer's cube size and stride).
    stored_code : names of the datasets under ``code`` (never read, never executed).
    """

    path: Path
    keras_version: str
    backend: str
    layers: tuple[KerasLayer, ...]
    inputs: tuple[TensorRef, ...]
    outputs: tuple[TensorRef, ...]
    weights: dict[str, dict[str, np.ndarray]]
    params: dict[str, float] = field(default_factory=dict)
    stored_code: tuple[str, ...] = ()


@dataclass(frozen=True)
class KerasImportReport:
    """What :func:`convert_keras` wrote.

    Attributes
    ----------
    path, sha256 : the ONNX model and its sha256 hex digest.
    source, source_sha256 : the Keras file and its sha256 hex digest.
    parameters : number of weights converted.
    layers : converted layers per Keras class.
    group_norm : the group normalisation computation used (``keras-contrib``/``standard``),
        or ``None`` when the model has no GroupNormalization.
    metadata : the ``demhx.*`` metadata written.
    fp16_path, fp16_sha256, fp16_relative_error : the twin (None when not written).
    """

    path: Path
    sha256: str
    source: Path
    source_sha256: str
    parameters: int
    layers: dict[str, int]
    group_norm: str | None
    metadata: dict[str, str]
    fp16_path: Path | None = None
    fp16_sha256: str | None = None
    fp16_relative_error: float | None = None


# --------------------------------------------------------------------------- reading


def read_keras_file(path: str | Path) -> KerasFile:
    """Read the topology, weights and DeepEMhancer parameters of a Keras HDF5 file.

    Raises
    ------
    ImportError : h5py is not installed.
    FileNotFoundError, ValueError : missing file, not HDF5, no ``model_config``, bad config.
    """
    path = Path(path)
    h5py = _import_h5py()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Keras model file not found; check the path")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path}: not an HDF5 file ({error}); pass a Keras .h5/.hd5 model "
                         "saved with model.save()") from None
    with handle:
        if "model_config" not in handle.attrs:
            raise ValueError(f"{path}: no model_config attribute (a weights-only file?); "
                             "pass a Keras model saved with model.save()")
        config = _json(path, handle.attrs["model_config"])
        try:
            layers, inputs, outputs = _topology(path, config)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path}: model_config is malformed ({type(error).__name__}: "
                             f"{error}); the file is damaged or not a Keras model") from None
        group = handle["model_weights"] if "model_weights" in handle else handle
        weights = {layer.name: _layer_weights(path, group, layer.name) for layer in layers}
        return KerasFile(path=path, keras_version=_text(handle.attrs.get("keras_version", "")),
                         backend=_text(handle.attrs.get("backend", "")), layers=layers,
                         inputs=inputs, outputs=outputs, weights=weights,
                         params=_config_params(handle), stored_code=_code_names(handle))


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ImportError(f"reading Keras files needs h5py, which is not installed; "
                          f"{KERAS_EXTRA}") from None
    return h5py


def _json(path: Path, value: Any) -> dict[str, Any]:
    try:
        config = json.loads(_text(value))
    except ValueError:
        raise ValueError(f"{path}: model_config is not valid JSON; the file is damaged") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"{path}: model_config is not a Keras model configuration")
    return config


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _topology(path: Path, config: dict[str, Any]
              ) -> tuple[tuple[KerasLayer, ...], tuple[TensorRef, ...], tuple[TensorRef, ...]]:
    """Layers, inputs and outputs of a Functional/Model or Sequential configuration."""
    kind = config["class_name"]
    body = config.get("config")
    if kind == "Sequential":
        return _sequential(path, body)
    if kind not in ("Functional", "Model") or not isinstance(body, dict):
        raise ValueError(f"{path}: model class {kind!r} is not a Functional or Sequential "
                         "Keras model; only those can be converted")
    layers = tuple(KerasLayer(name=str(entry["name"]), class_name=str(entry["class_name"]),
                              config=dict(entry.get("config") or {}),
                              nodes=tuple(_node_inputs(path, entry["name"], node)
                                          for node in entry.get("inbound_nodes", [])))
                   for entry in body["layers"])
    return layers, _refs(body["input_layers"]), _refs(body["output_layers"])


def _sequential(path: Path, body: Any
                ) -> tuple[tuple[KerasLayer, ...], tuple[TensorRef, ...], tuple[TensorRef, ...]]:
    """A Sequential model as a chain of layers (an InputLayer is made when the file has none)."""
    entries = body if isinstance(body, list) else (body or {}).get("layers", [])
    if not entries:
        raise ValueError(f"{path}: the Sequential model has no layers")
    layers: list[KerasLayer] = []
    if entries[0]["class_name"] != "InputLayer":
        shape = (entries[0].get("config", {}).get("batch_input_shape")
                 or (body.get("build_input_shape") if isinstance(body, dict) else None))
        layers.append(KerasLayer("input", "InputLayer", {"batch_input_shape": shape}, ()))
    for entry in entries:
        previous = (((layers[-1].name, 0, 0),),) if layers else ()
        layers.append(KerasLayer(str(entry["config"]["name"]), str(entry["class_name"]),
                                 dict(entry["config"]), previous))
    return tuple(layers), ((layers[0].name, 0, 0),), ((layers[-1].name, 0, 0),)


def _refs(value: Any) -> tuple[TensorRef, ...]:
    """``[["name", 0, 0], ...]`` or a single ``["name", 0, 0]`` as tensor references."""
    items = [value] if value and isinstance(value[0], str) else value
    return tuple((str(item[0]), int(item[1]), int(item[2])) for item in items)


def _node_inputs(path: Path, layer: str, node: Any) -> tuple[TensorRef, ...]:
    """Input tensors of one call of a layer, in the Keras 2 or the Keras 3 layout."""
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        if list(_keras_tensors(node.get("kwargs", {}))):
            raise ValueError(f"{path}: layer {layer!r} is called with tensor keyword "
                             "arguments, which cannot be converted")
        return tuple(_keras_tensors(node.get("args", [])))
    return tuple((str(item[0]), int(item[1]), int(item[2])) for item in node)  # Keras 2


def _keras_tensors(value: Any) -> Iterator[TensorRef]:
    """The ``__keras_tensor__`` references inside a Keras 3 call structure, in order."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            name, node, index = value["config"]["keras_history"]
            yield str(name), int(node), int(index)
        else:
            for item in value.values():
                yield from _keras_tensors(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keras_tensors(item)


def _attribute_list(group: Any, name: str) -> list[str]:
    """A list-valued HDF5 attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values += list(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [_text(value) for value in values]


def _layer_weights(path: Path, root: Any, layer: str) -> dict[str, np.ndarray]:
    """``{variable: float32 array}`` of one layer; variable = last path part without ``:0``."""
    if layer not in root:
        return {}
    group = root[layer]
    weights: dict[str, np.ndarray] = {}
    for full_name in _attribute_list(group, "weight_names"):
        variable = full_name.rsplit("/", 1)[-1].split(":", 1)[0]
        if full_name not in group:
            raise ValueError(f"{path}: weight {full_name!r} of layer {layer!r} is listed but "
                             "missing; the file is damaged")
        if variable in weights:
            raise ValueError(f"{path}: layer {layer!r} has two weights named {variable!r}; "
                             "cannot tell them apart")
        weights[variable] = np.asarray(group[full_name][()], dtype=np.float32)
    return weights


def _config_params(handle: Any) -> dict[str, float]:
    """Numbers stored under ``configParams`` (first element of each numeric dataset)."""
    params: dict[str, float] = {}
    group = handle.get(CONFIG_PARAMS)
    if group is None or not hasattr(group, "items"):
        return params
    for key, dataset in group.items():
        if hasattr(dataset, "dtype") and dataset.dtype.kind in "iuf" and dataset.size:
            params[key] = float(np.asarray(dataset[()]).ravel()[0])
    return params


def _code_names(handle: Any) -> tuple[str, ...]:
    """Names (never contents) of the datasets stored under ``code``."""
    group = handle.get(CODE_GROUP)
    if group is None or not hasattr(group, "visit"):
        return ()
    names: list[str] = []
    group.visit(lambda name: names.append(f"{CODE_GROUP}/{name}")
                if hasattr(group[name], "dtype") else None)
    return tuple(names)


# --------------------------------------------------------------------------- graph building


@dataclass(frozen=True)
class _Tensor:
    """An ONNX value: its name and static ``(channels, z, y, x)`` shape (batch excluded)."""

    name: str
    shape: tuple[int, int, int, int]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[int, int, int]:
        return self.shape[1], self.shape[2], self.shape[3]


class _Builder:
    """Collects ONNX nodes and initializers; checks layers against one Keras file."""

    def __init__(self, keras: KerasFile, group_norm: str) -> None:
        self.keras = keras
        self.group_norm = group_norm
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.parameters = 0
        self._names: Counter[str] = Counter()
        self._counted: set[tuple[str, str]] = set()

    def fresh(self, hint: str) -> str:
        self._names[hint] += 1
        count = self._names[hint]
        return hint if count == 1 else f"{hint}_{count}"

    def constant(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def add(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        output = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def weight(self, layer: KerasLayer, variable: str, shape: tuple[int, ...]) -> np.ndarray:
        """A layer's weight, checked against the shape the layer's config implies."""
        value = self.keras.weights.get(layer.name, {}).get(variable)
        if value is None:
            raise ValueError(f"{self.keras.path}: layer {layer.name!r} ({layer.class_name}) "
                             f"has no weight {variable!r}; the file is incomplete")
        if value.shape != shape:
            raise ValueError(f"{self.keras.path}: layer {layer.name!r} weight {variable!r} has "
                             f"shape {value.shape}, expected {shape}; the file is inconsistent")
        if (layer.name, variable) not in self._counted:  # a shared layer counts once
            self._counted.add((layer.name, variable))
            self.parameters += value.size
        return value

    def fail(self, layer: KerasLayer, problem: str) -> ValueError:
        return ValueError(f"{self.keras.path}: layer {layer.name!r} ({layer.class_name}): "
                          f"{problem}; this file cannot be converted")


def _triple(value: Any) -> tuple[int, int, int]:
    items = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(items) != 3:
        raise TypeError(f"expected 3 values, got {value!r}")
    return int(items[0]), int(items[1]), int(items[2])


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    """ZeroPadding3D/Cropping3D amounts: int, 3 ints or 3 pairs -> 3 (before, after) pairs."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    return tuple((int(item[0]), int(item[1])) if isinstance(item, (list, tuple))
                 else (int(item), int(item)) for item in items)


def _channel_axis(b: _Builder, layer: KerasLayer, key: str = "axis") -> None:
    """Refuse normalisation/concatenation along anything but the channels-last axis."""
    axis = layer.config.get(key, -1)
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if len(axes) != 1 or int(axes[0]) % 5 != 4:
        raise b.fail(layer, f"{key}={axis!r} is not the channel axis (-1)")


def _check_layout(b: _Builder, layer: KerasLayer) -> None:
    if layer.config.get("data_format") not in (None, "channels_last"):
        raise b.fail(layer, f"data_format {layer.config['data_format']!r} (only channels_last)")


def _window(size: int, kernel: int, stride: int, dilation: int, padding: str
            ) -> tuple[int, int, int]:
    """TensorFlow convolution/pooling geometry along one axis: (pad before, pad after, out)."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        return 0, 0, (size - span) // stride + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2, out


def _geometry(b: _Builder, layer: KerasLayer, x: _Tensor, kernel: tuple[int, int, int],
              strides: tuple[int, int, int], dilation: tuple[int, int, int]
              ) -> tuple[list[int], tuple[int, int, int]]:
    """ONNX ``pads`` and the output size of a convolution or pooling window."""
    padding = str(layer.config.get("padding", "valid")).lower()
    if padding not in ("same", "valid"):
        raise b.fail(layer, f"padding {padding!r} (only same and valid)")
    axes = [_window(*args, padding) for args in zip(x.spatial, kernel, strides, dilation,
                                                    strict=True)]
    if min(out for _, _, out in axes) < 1:
        raise b.fail(layer, f"window larger than its {x.spatial} input")
    pads = [before for before, _, _ in axes] + [after for _, after, _ in axes]
    return pads, (axes[0][2], axes[1][2], axes[2][2])


# --------------------------------------------------------------------------- layers

_ACTIVATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "relu": ("Relu", {}), "elu": ("Elu", {"alpha": 1.0}), "selu": ("Selu", {}),
    "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}), "softplus": ("Softplus", {}),
    "softsign": ("Softsign", {}), "exponential": ("Exp", {}),
    "leaky_relu": ("LeakyRelu", {"alpha": 0.2}),
}


def _activation(b: _Builder, layer: KerasLayer, x: _Tensor, spec: Any) -> _Tensor:
    """Apply a Keras built-in activation given by name (``linear`` is the identity)."""
    name = spec.get("config", spec.get("class_name")) if isinstance(spec, dict) else spec
    name = str(name or "linear").lower()
    if name == "linear":
        return x
    hint = f"{layer.name}/{name}"
    if name in ("swish", "silu"):
        gate = b.add("Sigmoid", [x.name], hint + "_gate")
        return _Tensor(b.add("Mul", [x.name, gate], hint), x.shape)
    if name == "relu6":
        return _Tensor(b.add("Clip", [x.name, b.constant(hint + "_min", 0.0),
                                      b.constant(hint + "_max", 6.0)], hint), x.shape)
    if name not in _ACTIVATIONS:
        raise b.fail(layer, f"activation {spec!r} is not supported")
    op, attributes = _ACTIVATIONS[name]
    return _Tensor(b.add(op, [x.name], hint, **attributes), x.shape)


def _conv3d(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    """Conv3D: kernel (kz, ky, kx, in/groups, out) -> ONNX (out, in/groups, kz, ky, kx)."""
    _check_layout(b, layer)
    cfg = layer.config
    kernel, strides = _triple(cfg["kernel_size"]), _triple(cfg.get("strides", 1))
    dilation, groups = _triple(cfg.get("dilation_rate", 1)), int(cfg.get("groups") or 1)
    filters = int(cfg["filters"])
    if x.channels % groups or filters % groups:
        raise b.fail(layer, f"groups={groups} does not divide {x.channels} -> {filters} channels")
    weight = b.weight(layer, "kernel", (*kernel, x.channels // groups, filters))
    pads, out = _geometry(b, layer, x, kernel, strides, dilation)
    inputs = [x.name, b.constant(f"{layer.name}/kernel", weight.transpose(4, 3, 0, 1, 2))]
    if cfg.get("use_bias", True):
        inputs.append(b.constant(f"{layer.name}/bias", b.weight(layer, "bias", (filters,))))
    y = b.add("Conv", inputs, layer.name, kernel_shape=list(kernel), strides=list(strides),
              dilations=list(dilation), pads=pads, group=groups)
    return _activation(b, layer, _Tensor(y, (filters, *out)), cfg.get("activation"))


def _transposed_axis(size: int, kernel: int, stride: int, dilation: int, padding: str,
                     output_padding: int | None) -> tuple[int, int, int, int]:
    """Keras/TensorFlow transposed-convolution geometry along one axis.

    Returns (crop before, crop after, ONNX output_padding, output size): the full transposed
    convolution has ``(size - 1) * stride + span`` voxels; TensorFlow crops it like the
    padding of the forward convolution (odd voxel at the end) and pads with zeros when
    the requested output is longer.
    """
    span = (kernel - 1) * dilation + 1
    if output_padding is None:
        out = size * stride + (max(span - stride, 0) if padding == "valid" else 0)
    else:
        out = (size - 1) * stride + span - 2 * (span // 2 if padding == "same" else 0) \
            + output_padding
    full = (size - 1) * stride + span
    before = max(full - out, 0) // 2 if padding == "same" else 0
    after = full - out - before
    return before, max(after, 0), max(-after, 0), out


def _conv3d_transpose(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    """Conv3DTranspose: kernel (kz, ky, kx, out, in) -> ONNX (in, out, kz, ky, kx)."""
    _check_layout(b, layer)
    cfg = layer.config
    kernel, strides = _triple(cfg["kernel_size"]), _triple(cfg.get("strides", 1))
    dilation, filters = _triple(cfg.get("dilation_rate", 1)), int(cfg["filters"])
    padding = str(cfg.get("padding", "valid")).lower()
    if padding not in ("same", "valid"):
        raise b.fail(layer, f"padding {padding!r} (only same and valid)")
    extra = cfg.get("output_padding")
    extras = _triple(extra) if extra is not None else (None, None, None)
    axes = [_transposed_axis(s, k, st, d, padding, e) for s, k, st, d, e in zip(
        x.spatial, kernel, strides, dilation, extras, strict=True)]
    weight = b.weight(layer, "kernel", (*kernel, filters, x.channels))
    inputs = [x.name, b.constant(f"{layer.name}/kernel", weight.transpose(4, 3, 0, 1, 2))]
    if cfg.get("use_bias", True):
        inputs.append(b.constant(f"{layer.name}/bias", b.weight(layer, "bias", (filters,))))
    y = b.add("ConvTranspose", inputs, layer.name, kernel_shape=list(kernel),
              strides=list(strides), dilations=list(dilation),
              pads=[a[0] for a in axes] + [a[1] for a in axes],
              output_padding=[a[2] for a in axes])
    out = (axes[0][3], axes[1][3], axes[2][3])
    return _activation(b, layer, _Tensor(y, (filters, *out)), cfg.get("activation"))


def _upsampling3d(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    """UpSampling3D (nearest: each voxel repeated) as Reshape -> Expand -> Reshape."""
    _check_layout(b, layer)
    size = _triple(layer.config.get("size", 2))
    (depth, height, width), channels = x.spatial, x.channels
    split = b.add("Reshape", [x.name, b.constant(f"{layer.name}/split", [
        0, channels, depth, 1, height, 1, width, 1], np.int64)], f"{layer.name}/split")
    repeated = b.add("Expand", [split, b.constant(f"{layer.name}/repeats", [
        1, 1, 1, size[0], 1, size[1], 1, size[2]], np.int64)], f"{layer.name}/repeat")
    out = (depth * size[0], height * size[1], width * size[2])
    y = b.add("Reshape", [repeated, b.constant(f"{layer.name}/shape", [0, channels, *out],
                                               np.int64)], layer.name)
    return _Tensor(y, (channels, *out))


def _pooling(op: str) -> Callable[[_Builder, KerasLayer, _Tensor], _Tensor]:
    """MaxPooling3D / AveragePooling3D (padding excluded from averages, as in TensorFlow)."""

    def convert(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
        _check_layout(b, layer)
        pool = _triple(layer.config.get("pool_size", 2))
        strides = _triple(layer.config.get("strides") or pool)
        pads, out = _geometry(b, layer, x, pool, strides, (1, 1, 1))
        extra = {"count_include_pad": 0} if op == "AveragePool" else {}
        y = b.add(op, [x.name], layer.name, kernel_shape=list(pool), strides=list(strides),
                  pads=pads, **extra)
        return _Tensor(y, (x.channels, *out))

    return convert


def _zero_padding3d(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    _check_layout(b, layer)
    pairs = _pairs(layer.config.get("padding", 1))
    pads = [0, 0] + [p[0] for p in pairs] + [0, 0] + [p[1] for p in pairs]
    y = b.add("Pad", [x.name, b.constant(f"{layer.name}/pads", pads, np.int64)], layer.name)
    out = tuple(s + p[0] + p[1] for s, p in zip(x.spatial, pairs, strict=True))
    return _Tensor(y, (x.channels, out[0], out[1], out[2]))


def _cropping3d(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    _check_layout(b, layer)
    pairs = _pairs(layer.config.get("cropping", 1))
    out = tuple(s - p[0] - p[1] for s, p in zip(x.spatial, pairs, strict=True))
    if min(out) < 1:
        raise b.fail(layer, f"cropping {pairs} removes all of its {x.spatial} input")
    starts = [p[0] for p in pairs]
    ends = [s + o for s, o in zip(starts, out, strict=True)]
    y = b.add("Slice", [x.name, b.constant(f"{layer.name}/starts", starts, np.int64),
                        b.constant(f"{layer.name}/ends", ends, np.int64),
                        b.constant(f"{layer.name}/axes", [2, 3, 4], np.int64)], layer.name)
    return _Tensor(y, (x.channels, out[0], out[1], out[2]))


def _per_channel(b: _Builder, layer: KerasLayer, x: _Tensor, values: np.ndarray,
                 op: str, hint: str) -> str:
    """``x (op) values`` with ``values`` of shape (channels,) broadcast over the voxels."""
    return b.add(op, [x.name, b.constant(f"{layer.name}/{hint}",
                                         values.reshape(-1, 1, 1, 1))], f"{layer.name}/{hint}")


def _group_normalization(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    """GroupNormalization, either computation (see the module docstring)."""
    _channel_axis(b, layer)
    cfg, channels = layer.config, x.channels
    groups, epsilon = int(cfg.get("groups", 32)), float(cfg.get("epsilon", 1e-3))
    if groups < 1 or channels % groups:
        raise b.fail(layer, f"groups={groups} does not divide its {channels} channels")
    gamma = b.weight(layer, "gamma", (channels,)) if cfg.get("scale", True) else None
    beta = b.weight(layer, "beta", (channels,)) if cfg.get("center", True) else None
    if b.group_norm == "standard":
        normed = _normalise_groups(b, layer, x.name, groups, epsilon)
        y = _Tensor(_reshape(b, normed, [0, *x.shape], f"{layer.name}/ungroup"), x.shape)
        if gamma is not None:
            y = _Tensor(_per_channel(b, layer, y, gamma, "Mul", "gamma"), x.shape)
        if beta is not None:
            y = _Tensor(_per_channel(b, layer, y, beta, "Add", "beta"), x.shape)
        return y
    return _contrib_group_normalization(b, layer, x, groups, epsilon, gamma, beta)


def _contrib_group_normalization(b: _Builder, layer: KerasLayer, x: _Tensor, groups: int,
                                 epsilon: float, gamma: np.ndarray | None,
                                 beta: np.ndarray | None) -> _Tensor:
    """keras-contrib's computation: the channels-last tensor reshaped to (groups, ...) as is."""
    channels, per_group = x.channels, x.channels // groups
    last = b.add("Transpose", [x.name], f"{layer.name}/channels_last", perm=[0, 2, 3, 4, 1])
    normed = _normalise_groups(b, layer, last, groups, epsilon)
    y = _reshape(b, normed, [0, groups, -1, per_group], f"{layer.name}/view")
    if gamma is not None:  # gamma[g * per_group + j] scales element j of row g of the view
        y = b.add("Mul", [y, b.constant(f"{layer.name}/gamma", gamma.reshape(
            groups, 1, per_group))], f"{layer.name}/gamma")
    if beta is not None:
        y = b.add("Add", [y, b.constant(f"{layer.name}/beta", beta.reshape(
            groups, 1, per_group))], f"{layer.name}/beta")
    y = _reshape(b, y, [0, *x.spatial, channels], f"{layer.name}/unview")
    return _Tensor(b.add("Transpose", [y], layer.name, perm=[0, 4, 1, 2, 3]), x.shape)


def _normalise_groups(b: _Builder, layer: KerasLayer, name: str, groups: int,
                      epsilon: float) -> str:
    """``(x - mean) / sqrt(var + epsilon)`` over each of ``groups`` contiguous chunks of a
    sample (InstanceNormalization on the ``(batch, groups, -1)`` view); returns that view."""
    view = _reshape(b, name, [0, groups, -1], f"{layer.name}/groups")
    return b.add("InstanceNormalization", [
        view, b.constant(f"{layer.name}/ones", np.ones(groups)),
        b.constant(f"{layer.name}/zeros", np.zeros(groups))], f"{layer.name}/normalise",
        epsilon=epsilon)


def _reshape(b: _Builder, name: str, shape: list[int], hint: str) -> str:
    return b.add("Reshape", [name, b.constant(hint + "_shape", shape, np.int64)], hint)


def _batch_normalization(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    """BatchNormalization at inference: folded to ``x * a + c`` per channel (float64 fold)."""
    _channel_axis(b, layer)
    cfg, channels = layer.config, (x.channels,)
    mean = b.weight(layer, "moving_mean", channels).astype(np.float64)
    variance = b.weight(layer, "moving_variance", channels).astype(np.float64)
    gamma = b.weight(layer, "gamma", channels) if cfg.get("scale", True) else np.ones(channels)
    beta = b.weight(layer, "beta", channels) if cfg.get("center", True) else np.zeros(channels)
    scale = gamma / np.sqrt(variance + float(cfg.get("epsilon", 1e-3)))
    shift = beta - mean * scale
    y = _Tensor(_per_channel(b, layer, x, scale.astype(np.float32), "Mul", "scale"), x.shape)
    return _Tensor(_per_channel(b, layer, y, shift.astype(np.float32), "Add", "shift"), x.shape)


def _prelu(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    """PReLU: slopes (z, y, x, c) with shared axes of size 1 -> (c, z, y, x)."""
    shared = {int(axis) for axis in (layer.config.get("shared_axes") or [])}
    shape = tuple(1 if axis in shared else size
                  for axis, size in zip((1, 2, 3, 4), (*x.spatial, x.channels), strict=True))
    alpha = b.weight(layer, "alpha", shape).transpose(3, 0, 1, 2)
    y = b.add("PRelu", [x.name, b.constant(f"{layer.name}/alpha", alpha)], layer.name)
    return _Tensor(y, x.shape)


def _leaky_relu(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    slope = layer.config.get("negative_slope", layer.config.get("alpha", 0.3))
    return _Tensor(b.add("LeakyRelu", [x.name], layer.name, alpha=float(slope)), x.shape)


def _relu(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    """ReLU layer: negative_slope and max_value supported, threshold must be 0."""
    cfg = layer.config
    if float(cfg.get("threshold") or 0.0) != 0.0:
        raise b.fail(layer, f"threshold {cfg['threshold']} (only 0)")
    slope = float(cfg.get("negative_slope") or 0.0)
    y = (b.add("LeakyRelu", [x.name], f"{layer.name}/leaky", alpha=slope) if slope
         else b.add("Relu", [x.name], f"{layer.name}/relu"))
    if cfg.get("max_value") is not None:
        y = b.add("Min", [y, b.constant(f"{layer.name}/max", float(cfg["max_value"]))],
                  f"{layer.name}/max")
    return _Tensor(y, x.shape)


def _elu(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    alpha = float(layer.config.get("alpha", 1.0))
    return _Tensor(b.add("Elu", [x.name], layer.name, alpha=alpha), x.shape)


def _activation_layer(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    return _activation(b, layer, x, layer.config.get("activation"))


def _identity(b: _Builder, layer: KerasLayer, x: _Tensor) -> _Tensor:
    return x


def _concatenate(b: _Builder, layer: KerasLayer, inputs: list[_Tensor]) -> _Tensor:
    _channel_axis(b, layer)
    if len({t.spatial for t in inputs}) != 1:
        raise b.fail(layer, f"inputs of different sizes {[t.spatial for t in inputs]}")
    y = b.add("Concat", [t.name for t in inputs], layer.name, axis=1)
    return _Tensor(y, (sum(t.channels for t in inputs), *inputs[0].spatial))


def _merge(op: str) -> Callable[[_Builder, KerasLayer, list[_Tensor]], _Tensor]:
    """Add, Subtract, Multiply, Average, Maximum, Minimum of same-shape tensors."""

    def convert(b: _Builder, layer: KerasLayer, inputs: list[_Tensor]) -> _Tensor:
        if len({t.shape for t in inputs}) != 1:
            raise b.fail(layer, f"inputs of different shapes {[t.shape for t in inputs]}")
        if op == "Sub" and len(inputs) != 2:
            raise b.fail(layer, f"{len(inputs)} inputs (Subtract takes 2)")
        names = [t.name for t in inputs]
        if op == "Average":
            total = b.add("Sum", names, f"{layer.name}/sum")
            y = b.add("Div", [total, b.constant(f"{layer.name}/count", float(len(names)))],
                      layer.name)
        elif op == "Mul":
            y = names[0]
            for other in names[1:]:
                y = b.add("Mul", [y, other], layer.name)
        else:
            y = b.add(op, names, layer.name)
        return _Tensor(y, inputs[0].shape)

    return convert


_SINGLE: dict[str, Callable[[_Builder, KerasLayer, _Tensor], _Tensor]] = {
    "Conv3D": _conv3d, "Convolution3D": _conv3d,
    "Conv3DTranspose": _conv3d_transpose, "Convolution3DTranspose": _conv3d_transpose,
    "UpSampling3D": _upsampling3d,
    "MaxPooling3D": _pooling("MaxPool"), "MaxPool3D": _pooling("MaxPool"),
    "AveragePooling3D": _pooling("AveragePool"), "AvgPool3D": _pooling("AveragePool"),
    "ZeroPadding3D": _zero_padding3d, "Cropping3D": _cropping3d,
    "GroupNormalization": _group_normalization, "BatchNormalization": _batch_normalization,
    "PReLU": _prelu, "LeakyReLU": _leaky_relu, "ReLU": _relu, "ELU": _elu,
    "Activation": _activation_layer,
    **{name: _identity for name in IDENTITY_LAYERS},
}
_MULTI: dict[str, Callable[[_Builder, KerasLayer, list[_Tensor]], _Tensor]] = {
    "Concatenate": _concatenate, "Add": _merge("Sum"), "Subtract": _merge("Sub"),
    "Multiply": _merge("Mul"), "Average": _merge("Average"), "Maximum": _merge("Max"),
    "Minimum": _merge("Min"),
}
SUPPORTED_LAYERS = ("InputLayer", *sorted((*_SINGLE, *_MULTI)))


def _class_name(layer: KerasLayer) -> str:
    """The Keras class without its registration package (``Addons>GroupNormalization``)."""
    return layer.class_name.rsplit(">", 1)[-1]


def _check_classes(keras: KerasFile) -> None:
    """Refuse code-carrying and unknown layers before anything is converted."""
    for layer in keras.layers:
        name = _class_name(layer)
        if name in CODE_LAYERS:
            raise ValueError(f"{keras.path}: layer {layer.name!r} is a {layer.class_name} "
                             "layer, whose Python code is stored in the file; demhx-export "
                             "never executes code from a model file, so it cannot be converted")
        if name not in SUPPORTED_LAYERS:
            raise ValueError(f"{keras.path}: layer {layer.name!r} has class "
                             f"{layer.class_name!r}, which demhx-export cannot convert "
                             f"(supported: {', '.join(SUPPORTED_LAYERS)})")


# --------------------------------------------------------------------------- whole model


def choose_group_norm(keras: KerasFile, requested: str = "auto") -> str | None:
    """The GroupNormalization computation for a file (module docstring); None if it has none.

    Raises ValueError for an unknown ``requested`` value or when ``auto`` cannot decide.
    """
    if requested not in GROUP_NORMS:
        raise ValueError(f"--group-norm {requested!r}: choose one of {', '.join(GROUP_NORMS)}")
    classes = {layer.class_name for layer in keras.layers
               if _class_name(layer) == "GroupNormalization"}
    if not classes or requested != "auto":
        return requested if classes else None
    if classes <= {"Addons>GroupNormalization"}:
        return "standard"
    if any(name.endswith("custom_objects") for name in keras.stored_code):
        return "keras-contrib"
    version = _version_tuple(keras.keras_version)
    if version is not None and version >= (3,):
        return "standard"
    if version is not None and version < FIRST_BUILTIN_GROUP_NORM:
        return "keras-contrib"
    raise ValueError(f"{keras.path}: cannot tell which GroupNormalization the file uses (Keras "
                     f"{keras.keras_version or 'version unknown'}); pass --group-norm "
                     "keras-contrib (keras_contrib's layer) or --group-norm standard "
                     "(tf.keras / Keras 3 / tensorflow-addons)")


def _version_tuple(text: str) -> tuple[int, ...] | None:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            return None
        parts.append(int(digits))
    return tuple(parts) or None


def resolve_cube_size(keras: KerasFile, cube_size: int | None = None) -> int:
    """The cube edge: the input layer's fixed shape, else ``cube_size``, ``configParams``, 64."""
    layer = _input_layer(keras)
    shape = layer.config.get("batch_input_shape") or layer.config.get("batch_shape")
    if not shape or len(shape) != 5:
        raise ValueError(f"{keras.path}: input {layer.name!r} has shape {shape}, not "
                         "(batch, z, y, x, 1); only 3-D single-channel U-nets can be converted")
    if shape[4] != 1:
        raise ValueError(f"{keras.path}: input {layer.name!r} has {shape[4]} channels, not 1 "
                         "(channels last); only single-channel maps can be converted")
    fixed = {int(size) for size in shape[1:4] if size is not None}
    if len(fixed) > 1:
        raise ValueError(f"{keras.path}: input shape {shape[1:4]} is not a cube; demhx runs "
                         "cubic tiles")
    stored = keras.params.get("NNET_INPUT_SIZE")
    if fixed:  # the network's weights may fix the size (per-voxel PReLU slopes)
        size = fixed.pop()
        if cube_size and cube_size != size:
            raise ValueError(f"{keras.path}: the model takes {size}³ cubes, not --cube "
                             f"{cube_size}; leave --cube out")
        return size
    return int(cube_size or stored or PAPER_CUBE_SIZE)


def _input_layer(keras: KerasFile) -> KerasLayer:
    if len(keras.inputs) != 1 or len(keras.outputs) != 1:
        raise ValueError(f"{keras.path}: the model has {len(keras.inputs)} inputs and "
                         f"{len(keras.outputs)} outputs; a demhx model has one of each")
    for layer in keras.layers:
        if layer.name == keras.inputs[0][0] and layer.class_name == "InputLayer":
            return layer
    raise ValueError(f"{keras.path}: model input {keras.inputs[0][0]!r} is not an InputLayer")


def build_graph(keras: KerasFile, cube_size: int, group_norm: str | None
                ) -> tuple[onnx.ModelProto, int, Counter[str]]:
    """The ONNX model (no metadata yet), its parameter count and its layers per class."""
    _check_classes(keras)
    builder = _Builder(keras, group_norm or "standard")
    source = _input_layer(keras)
    tensors = {(source.name, 0, 0): _Tensor(INPUT_NAME, (1, cube_size, cube_size, cube_size))}
    counts: Counter[str] = Counter({"InputLayer": 1})
    pending = [(layer, index, refs) for layer in keras.layers if layer is not source
               for index, refs in enumerate(layer.nodes)]
    while pending:
        ready = [item for item in pending if all(ref in tensors for ref in item[2])]
        if not ready:
            names = ", ".join(sorted({item[0].name for item in pending}))
            raise ValueError(f"{keras.path}: layers {names} are not connected to the model "
                             "input; the configuration is inconsistent")
        for layer, index, refs in ready:
            tensors[(layer.name, index, 0)] = _convert_layer(builder, layer,
                                                             [tensors[r] for r in refs])
            counts[_class_name(layer)] += 1
        pending = [item for item in pending if item not in ready]
    result = tensors.get(keras.outputs[0])
    if result is None:
        raise ValueError(f"{keras.path}: model output {keras.outputs[0][0]!r} is never computed")
    return _model(builder, result, cube_size), builder.parameters, counts


def _convert_layer(b: _Builder, layer: KerasLayer, inputs: list[_Tensor]) -> _Tensor:
    name = _class_name(layer)
    if name in _MULTI:
        if len(inputs) < 2:
            raise b.fail(layer, f"{len(inputs)} input (needs at least 2)")
        return _MULTI[name](b, layer, inputs)
    if len(inputs) != 1:
        raise b.fail(layer, f"{len(inputs)} inputs (takes 1)")
    if name == "InputLayer":
        raise b.fail(layer, "a second input")
    try:
        return _SINGLE[name](b, layer, inputs[0])
    except (KeyError, TypeError, IndexError) as error:
        raise b.fail(layer, f"malformed configuration ({type(error).__name__}: {error})"
                     ) from None


def _model(b: _Builder, result: _Tensor, cube_size: int) -> onnx.ModelProto:
    """Wrap the nodes into a checked model mapping (batch, 1, n³) to (batch, 1, n³)."""
    expected = (1, cube_size, cube_size, cube_size)
    if result.shape != expected:
        raise ValueError(f"{b.keras.path}: the model maps (1, {cube_size}³) to shape "
                         f"{result.shape} (channels, z, y, x); demhx needs the output shape "
                         "to equal the input's")
    b.nodes.append(helper.make_node("Identity", [result.name], [OUTPUT_NAME], name=OUTPUT_NAME))
    shape: list[str | int | None] = ["batch", 1, cube_size, cube_size, cube_size]
    graph = helper.make_graph(
        b.nodes, "keras_unet", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                              shape)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="demhx-export", producer_version=__version__)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- conversion


def keras_metadata(keras: KerasFile, source_sha256: str, cube_size: int,
                   group_norm: str | None, parameters: int,
                   overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``demhx.*`` metadata of a converted file (``overrides``: name, version, stride,
    normalisation; None values are ignored)."""
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    stem = keras.path.name.split(".", 1)[0]
    stored_stride = keras.params.get("NNET_INPUT_STRIDE")
    stride = given.get("stride") or (int(stored_stride) if stored_stride else
                                     max(1, cube_size // STRIDE_FRACTION))
    normalisation = given.get("normalisation") or ("mask" if "masked" in stem.lower()
                                                   else "noise")
    values = {
        "format": 1, "name": given.get("name") or stem,
        "version": given.get("version") or f"keras-{source_sha256[:8]}",
        "cube_size": cube_size, "stride": stride, "voxel_size": PAPER_VOXEL_SIZE,
        "normalisation": normalisation, "noise_std": PAPER_NOISE_STD, "background": 0.0,
        "trained": "true", "parameters": parameters,
        "provenance": _provenance(keras, source_sha256, group_norm),
        "unverified": _unverified(keras, given, stored_stride),
    }
    if group_norm:
        values["group_norm"] = group_norm
    return {PREFIX + key: str(value) for key, value in values.items()}


def _provenance(keras: KerasFile, source_sha256: str, group_norm: str | None) -> str:
    parts = [f"converted from Keras file {keras.path.name} sha256 {source_sha256}",
             f"Keras {keras.keras_version or 'unknown'} ({keras.backend or 'unknown'} backend)",
             f"converted {datetime.date.today().isoformat()} by demhx-export {__version__} "
             "without TensorFlow"]
    if group_norm:
        parts.append(f"GroupNormalization computed as {group_norm}")
    if keras.stored_code:
        parts.append(f"stored Python code not executed: {', '.join(keras.stored_code)}")
    return "; ".join(parts)


def _unverified(keras: KerasFile, given: Mapping[str, Any], stored_stride: float | None) -> str:
    """What the conversion assumed rather than checked, for the model card."""
    notes = ["outputs not compared with Keras/TensorFlow on this file",
             f"voxel size {PAPER_VOXEL_SIZE} Å and noise std {PAPER_NOISE_STD} from the paper",
             "normalisation " + ("given by the user" if "normalisation" in given
                                 else "guessed from the file name (noise unless 'masked')"),
             "background 0.0 assumed"]
    if "stride" not in given and not stored_stride:
        notes.append("stride = cube/4 (the paper's)")
    return "; ".join(notes)


def convert_keras(src: str | Path, out_path: str | Path, name: str | None = None,
                  version: str | None = None, cube_size: int | None = None,
                  stride: int | None = None, normalisation: str | None = None,
                  group_norm: str = "auto", fp16: bool = False) -> KerasImportReport:
    """Convert a Keras HDF5 model to ``out_path`` (and ``OUT.fp16.onnx`` when ``fp16``).

    Parameters
    ----------
    src : Keras ``.h5``/``.hd5`` file saved with ``model.save``.
    out_path : destination ``.onnx`` file; its folder must exist.
    name, version : model identity (default: the file's stem, ``keras-<sha256 prefix>``).
    cube_size : cube edge for a model whose input shape is not fixed (default: the file's
        ``configParams/NNET_INPUT_SIZE``, else 64).
    stride : reference tiling stride (default: ``configParams/NNET_INPUT_STRIDE``, else
        cube / 4).
    normalisation : ``noise`` or ``mask`` (default: ``mask`` when the file name contains
        "masked", as DeepEMhancer's masked model, else ``noise``).
    group_norm : ``auto``, ``keras-contrib`` or ``standard`` (module docstring).
    fp16 : also write the float16 twin, checked against the fp32 model.

    Raises
    ------
    ImportError : h5py missing.
    FileNotFoundError, ValueError : unreadable file, unsupported layer, bad option.
    """
    src, out_path = Path(src), Path(out_path)
    if normalisation not in (None, *NORMALISATIONS):
        raise ValueError(f"--normalisation {normalisation!r}: choose one of "
                         f"{', '.join(NORMALISATIONS)}")
    _check_destination(out_path)
    keras = read_keras_file(src)
    mode = choose_group_norm(keras, group_norm)
    cube = resolve_cube_size(keras, cube_size)
    model, parameters, counts = build_graph(keras, cube, mode)
    source_sha256 = sha256_of(src)
    metadata = keras_metadata(keras, source_sha256, cube, mode, parameters,
                              {"name": name, "version": version, "stride": stride,
                               "normalisation": normalisation})
    spec_from_metadata(out_path, metadata)  # the runtime's contract, checked before writing
    _set_metadata(model, metadata, src.name)
    twin, error16 = _write(model, out_path, fp16, cube)
    return KerasImportReport(path=out_path, sha256=sha256_of(out_path), source=src,
                             source_sha256=source_sha256, parameters=parameters,
                             layers=dict(counts), group_norm=mode, metadata=metadata,
                             fp16_path=twin, fp16_sha256=sha256_of(twin) if twin else None,
                             fp16_relative_error=error16)


def _check_destination(out_path: Path) -> None:
    if not out_path.name.endswith(".onnx") or out_path.name.endswith(FP16_SUFFIX):
        raise ValueError(f"{out_path}: the model file name must end in .onnx (and not "
                         f"{FP16_SUFFIX}, the twin's suffix)")
    if not out_path.parent.is_dir():
        raise ValueError(f"{out_path.parent}: output folder does not exist; create it first")


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str], source: str) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"3D U-net converted from the Keras file {source}"


def _write(model: onnx.ModelProto, out_path: Path, fp16: bool, cube_size: int
           ) -> tuple[Path | None, float | None]:
    """Save to temporary names, smoke-run with ONNX Runtime, then move into place."""
    twin = out_path.with_name(out_path.name[: -len(".onnx")] + FP16_SUFFIX)
    temporary = [out_path.with_name(f".{p.name}.{os.getpid()}.tmp") for p in (out_path, twin)]
    try:
        onnx.save_model(model, str(temporary[0]))
        inputs = np.random.default_rng(VERIFY_SEED).standard_normal(
            (VERIFY_BATCH, 1, cube_size, cube_size, cube_size), dtype=np.float32)
        reference = run_onnx(temporary[0], inputs)
        if reference.shape != inputs.shape or not np.isfinite(reference).all():
            raise RuntimeError(f"{out_path}: the converted model gives non-finite or "
                               "mis-shaped output on a test batch; nothing was written")
        error16 = None
        if fp16:
            from demhx_export.onnx_export import to_fp16

            onnx.save_model(to_fp16(model), str(temporary[1]))
            error16 = relative_error(run_onnx(temporary[1], inputs.astype(np.float16)),
                                     reference)
            if not error16 <= FP16_TOLERANCE:
                raise RuntimeError(f"{twin}: fp16 twin differs from the fp32 model (relative "
                                   f"L2 error {error16:.2e} > {FP16_TOLERANCE:.0e}); nothing "
                                   "was written; convert without --fp16")
            os.replace(temporary[1], twin)
        elif twin.exists():
            twin.unlink()  # a stale twin must not be paired with the new model
        os.replace(temporary[0], out_path)
        return (twin if fp16 else None), error16
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)


def run_onnx(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Run an ONNX model file on ``inputs`` with ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
    return np.asarray(output, dtype=np.float32)


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """``‖actual − reference‖₂ / ‖reference‖₂`` in float64; inf on shape mismatch or NaN."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape or not np.isfinite(actual).all():
        return math.inf
    return float(np.linalg.norm(actual - reference)) / (float(np.linalg.norm(reference)) or 1.0)


# --------------------------------------------------------------------------- command


def from_keras_command(model: str, out: str, name: str | None = None,
                       version: str | None = None, cube: int | None = None,
                       stride: int | None = None, normalisation: str | None = None,
                       group_norm: str = "auto", fp16: bool = False) -> None:
    """Convert a Keras MODEL.hd5/.h5 (e.g. DeepEMhancer's) to OUT.onnx, without TensorFlow.

    Only data is read from the file (h5py: configuration and weights); no code stored in it
    is executed, and Lambda layers are refused.

    Parameters
    ----------
    model : Keras model file saved with model.save (.h5 or .hd5).
    out : destination .onnx file.
    name : model name in the metadata (default: the file's stem).
    version : model version in the metadata (default: keras-<sha256 prefix of the file>).
    cube : cube edge, only for models without a fixed input shape (default 64).
    stride : reference tiling stride (default: stored in the file, else cube/4).
    normalisation : noise or mask (default: mask when the file name contains "masked").
    group_norm : auto, keras-contrib or standard: which GroupNormalization computation the
        file uses (auto: keras-contrib for DeepEMhancer's files).
    fp16 : also write OUT.fp16.onnx for the CUDA provider (--fp16).
    """
    report = convert_keras(model, out, name=name, version=version,
                           cube_size=_option_int("cube", cube),
                           stride=_option_int("stride", stride),
                           normalisation=normalisation, group_norm=str(group_norm),
                           fp16=bool(fp16))
    meta = report.metadata
    layers = ", ".join(f"{count} {kind}" for kind, count in sorted(report.layers.items()))
    print(f"wrote {report.path}: {report.parameters:,} parameters, "
          f"{meta[PREFIX + 'cube_size']}³ cubes, stride {meta[PREFIX + 'stride']}, "
          f"normalisation {meta[PREFIX + 'normalisation']}")
    print(f"  layers: {layers}")
    if report.group_norm:
        print(f"  GroupNormalization computed as {report.group_norm}")
    print(f"  source sha256 {report.source_sha256}  {report.source.name}")
    print(f"  sha256 {report.sha256}  {report.path.name}")
    if report.fp16_path is not None:
        print(f"  sha256 {report.fp16_sha256}  {report.fp16_path.name} (fp16 twin, relative "
              f"L2 error {report.fp16_relative_error:.2e} vs fp32)")
    print(f"  not verified here: {meta[PREFIX + 'unverified']}")


def _option_int(option: str, value: Any) -> int | None:
    """An optional integer option's value, or ValueError naming the option."""
    from demhx_export.cli import _as_int

    return None if value is None else _as_int(option, value)


__all__ = ["GROUP_NORMS", "KerasFile", "KerasImportReport", "KerasLayer", "SUPPORTED_LAYERS",
           "build_graph", "choose_group_norm", "convert_keras", "from_keras_command",
           "keras_metadata", "read_keras_file", "relative_error", "resolve_cube_size",
           "run_onnx"]
