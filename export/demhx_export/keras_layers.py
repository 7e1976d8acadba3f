"""Layer-by-layer conversion of a Keras 3D U-net to ONNX nodes.

Layers converted (``channels_last`` only; Keras ``(batch, z, y, x, c)`` becomes ONNX
``(batch, c, z, y, x)``, kernels ``(kz, ky, kx, in, out)`` become ``(out, in, kz, ky, kx)``):
InputLayer; Conv3D (padding ``same``/``valid``, strides, dilation, groups, bias, built-in
activation); Conv3DTranspose (incl. ``output_padding``); UpSampling3D; MaxPooling3D;
AveragePooling3D; ZeroPadding3D; Cropping3D; GroupNormalization; BatchNormalization; PReLU
(shared or per-voxel slopes); LeakyReLU; ReLU; ELU; Activation; Concatenate (channel axis);
Add, Subtract, Multiply, Average, Maximum, Minimum; Dropout, SpatialDropout1D/2D/3D,
AlphaDropout, GaussianDropout, GaussianNoise, ActivityRegularization (identity at inference).
"Same" padding follows TensorFlow (the odd voxel of padding goes at the end). A ``Lambda``
layer (marshalled Python bytecode) and any layer class not listed here are refused with one
line naming the layer and its class (:func:`check_classes`).

Group normalisation: two different computations
-----------------------------------------------
``GroupNormalization`` names two different layers in Keras files:

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

Which one a file uses is decided by :func:`demhx_export.keras_import.choose_group_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx_export.keras_graph import (
    GraphBuilder,
    Tensor,
    check_channel_axis,
    check_layout,
    padding_pairs,
    triple,
    window_geometry,
)
from demhx_export.keras_reader import KerasFile, KerasLayer

CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")
IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                   "AlphaDropout", "GaussianDropout", "GaussianNoise", "ActivityRegularization")

_ACTIVATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "relu": ("Relu", {}), "elu": ("Elu", {"alpha": 1.0}), "selu": ("Selu", {}),
    "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}), "softplus": ("Softplus", {}),
    "softsign": ("Softsign", {}), "exponential": ("Exp", {}),
    "leaky_relu": ("LeakyRelu", {"alpha": 0.2}),
}


def _activation(b: GraphBuilder, layer: KerasLayer, x: Tensor, spec: Any) -> Tensor:
    """Apply a Keras built-in activation given by name (``linear`` is the identity)."""
    name = spec.get("config", spec.get("class_name")) if isinstance(spec, dict) else spec
    name = str(name or "linear").lower()
    if name == "linear":
        return x
    hint = f"{layer.name}/{name}"
    if name in ("swish", "silu"):
        gate = b.add("Sigmoid", [x.name], hint + "_gate")
        return Tensor(b.add("Mul", [x.name, gate], hint), x.shape)
    if name == "relu6":
        return Tensor(b.add("Clip", [x.name, b.constant(hint + "_min", 0.0),
                                     b.constant(hint + "_max", 6.0)], hint), x.shape)
    if name not in _ACTIVATIONS:
        raise b.fail(layer, f"activation {spec!r} is not supported")
    op, attributes = _ACTIVATIONS[name]
    return Tensor(b.add(op, [x.name], hint, **attributes), x.shape)


def _conv3d(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    """Conv3D: kernel (kz, ky, kx, in/groups, out) -> ONNX (out, in/groups, kz, ky, kx)."""
    check_layout(b, layer)
    cfg = layer.config
    kernel, strides = triple(cfg["kernel_size"]), triple(cfg.get("strides", 1))
    dilation, groups = triple(cfg.get("dilation_rate", 1)), int(cfg.get("groups") or 1)
    filters = int(cfg["filters"])
    if x.channels % groups or filters % groups:
        raise b.fail(layer, f"groups={groups} does not divide {x.channels} -> {filters} channels")
    weight = b.weight(layer, "kernel", (*kernel, x.channels // groups, filters))
    pads, out = window_geometry(b, layer, x, kernel, strides, dilation)
    inputs = [x.name, b.constant(f"{layer.name}/kernel", weight.transpose(4, 3, 0, 1, 2))]
    if cfg.get("use_bias", True):
        inputs.append(b.constant(f"{layer.name}/bias", b.weight(layer, "bias", (filters,))))
    y = b.add("Conv", inputs, layer.name, kernel_shape=list(kernel), strides=list(strides),
              dilations=list(dilation), pads=pads, group=groups)
    return _activation(b, layer, Tensor(y, (filters, *out)), cfg.get("activation"))


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


def _conv3d_transpose(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    """Conv3DTranspose: kernel (kz, ky, kx, out, in) -> ONNX (in, out, kz, ky, kx)."""
    check_layout(b, layer)
    cfg = layer.config
    kernel, strides = triple(cfg["kernel_size"]), triple(cfg.get("strides", 1))
    dilation, filters = triple(cfg.get("dilation_rate", 1)), int(cfg["filters"])
    padding = str(cfg.get("padding", "valid")).lower()
    if padding not in ("same", "valid"):
        raise b.fail(layer, f"padding {padding!r} (only same and valid)")
    extra = cfg.get("output_padding")
    extras = triple(extra) if extra is not None else (None, None, None)
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
    return _activation(b, layer, Tensor(y, (filters, *out)), cfg.get("activation"))


def _upsampling3d(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    """UpSampling3D (nearest: each voxel repeated) as Reshape -> Expand -> Reshape."""
    check_layout(b, layer)
    size = triple(layer.config.get("size", 2))
    (depth, height, width), channels = x.spatial, x.channels
    split = b.add("Reshape", [x.name, b.constant(f"{layer.name}/split", [
        0, channels, depth, 1, height, 1, width, 1], np.int64)], f"{layer.name}/split")
    repeated = b.add("Expand", [split, b.constant(f"{layer.name}/repeats", [
        1, 1, 1, size[0], 1, size[1], 1, size[2]], np.int64)], f"{layer.name}/repeat")
    out = (depth * size[0], height * size[1], width * size[2])
    y = b.add("Reshape", [repeated, b.constant(f"{layer.name}/shape", [0, channels, *out],
                                               np.int64)], layer.name)
    return Tensor(y, (channels, *out))


def _pooling(op: str) -> Callable[[GraphBuilder, KerasLayer, Tensor], Tensor]:
    """MaxPooling3D / AveragePooling3D (padding excluded from averages, as in TensorFlow)."""

    def convert(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
        check_layout(b, layer)
        pool = triple(layer.config.get("pool_size", 2))
        strides = triple(layer.config.get("strides") or pool)
        pads, out = window_geometry(b, layer, x, pool, strides, (1, 1, 1))
        extra = {"count_include_pad": 0} if op == "AveragePool" else {}
        y = b.add(op, [x.name], layer.name, kernel_shape=list(pool), strides=list(strides),
                  pads=pads, **extra)
        return Tensor(y, (x.channels, *out))

    return convert


def _zero_padding3d(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    check_layout(b, layer)
    amounts = padding_pairs(layer.config.get("padding", 1))
    pads = [0, 0] + [p[0] for p in amounts] + [0, 0] + [p[1] for p in amounts]
    y = b.add("Pad", [x.name, b.constant(f"{layer.name}/pads", pads, np.int64)], layer.name)
    out = tuple(s + p[0] + p[1] for s, p in zip(x.spatial, amounts, strict=True))
    return Tensor(y, (x.channels, out[0], out[1], out[2]))


def _cropping3d(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    check_layout(b, layer)
    amounts = padding_pairs(layer.config.get("cropping", 1))
    out = tuple(s - p[0] - p[1] for s, p in zip(x.spatial, amounts, strict=True))
    if min(out) < 1:
        raise b.fail(layer, f"cropping {amounts} removes all of its {x.spatial} input")
    starts = [p[0] for p in amounts]
    ends = [s + o for s, o in zip(starts, out, strict=True)]
    y = b.add("Slice", [x.name, b.constant(f"{layer.name}/starts", starts, np.int64),
                        b.constant(f"{layer.name}/ends", ends, np.int64),
                        b.constant(f"{layer.name}/axes", [2, 3, 4], np.int64)], layer.name)
    return Tensor(y, (x.channels, out[0], out[1], out[2]))


def _per_channel(b: GraphBuilder, layer: KerasLayer, x: Tensor,
                 values: NDArray[np.float32], op: str, hint: str) -> str:
    """``x (op) values`` with ``values`` of shape (channels,) broadcast over the voxels."""
    return b.add(op, [x.name, b.constant(f"{layer.name}/{hint}",
                                         values.reshape(-1, 1, 1, 1))], f"{layer.name}/{hint}")


def _group_normalization(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    """GroupNormalization, either computation (see the module docstring)."""
    check_channel_axis(b, layer)
    cfg, channels = layer.config, x.channels
    groups, epsilon = int(cfg.get("groups", 32)), float(cfg.get("epsilon", 1e-3))
    if groups < 1 or channels % groups:
        raise b.fail(layer, f"groups={groups} does not divide its {channels} channels")
    gamma = b.weight(layer, "gamma", (channels,)) if cfg.get("scale", True) else None
    beta = b.weight(layer, "beta", (channels,)) if cfg.get("center", True) else None
    if b.group_norm == "standard":
        normed = _normalise_groups(b, layer, x.name, groups, epsilon)
        y = Tensor(_reshape(b, normed, [0, *x.shape], f"{layer.name}/ungroup"), x.shape)
        if gamma is not None:
            y = Tensor(_per_channel(b, layer, y, gamma, "Mul", "gamma"), x.shape)
        if beta is not None:
            y = Tensor(_per_channel(b, layer, y, beta, "Add", "beta"), x.shape)
        return y
    return _contrib_group_normalization(b, layer, x, groups, epsilon, gamma, beta)


def _contrib_group_normalization(b: GraphBuilder, layer: KerasLayer, x: Tensor,
                                 groups: int, epsilon: float,
                                 gamma: NDArray[np.float32] | None,
                                 beta: NDArray[np.float32] | None) -> Tensor:
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
    return Tensor(b.add("Transpose", [y], layer.name, perm=[0, 4, 1, 2, 3]), x.shape)


def _normalise_groups(b: GraphBuilder, layer: KerasLayer, name: str, groups: int,
                      epsilon: float) -> str:
    """``(x - mean) / sqrt(var + epsilon)`` over each of ``groups`` contiguous chunks of a
    sample (InstanceNormalization on the ``(batch, groups, -1)`` view); returns that view."""
    view = _reshape(b, name, [0, groups, -1], f"{layer.name}/groups")
    return b.add("InstanceNormalization", [
        view, b.constant(f"{layer.name}/ones", np.ones(groups)),
        b.constant(f"{layer.name}/zeros", np.zeros(groups))], f"{layer.name}/normalise",
        epsilon=epsilon)


def _reshape(b: GraphBuilder, name: str, shape: list[int], hint: str) -> str:
    return b.add("Reshape", [name, b.constant(hint + "_shape", shape, np.int64)], hint)


def _batch_normalization(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    """BatchNormalization at inference: folded to ``x * a + c`` per channel (float64 fold)."""
    check_channel_axis(b, layer)
    cfg, channels = layer.config, (x.channels,)
    mean = b.weight(layer, "moving_mean", channels).astype(np.float64)
    variance = b.weight(layer, "moving_variance", channels).astype(np.float64)
    gamma = b.weight(layer, "gamma", channels) if cfg.get("scale", True) else np.ones(channels)
    beta = b.weight(layer, "beta", channels) if cfg.get("center", True) else np.zeros(channels)
    scale = gamma / np.sqrt(variance + float(cfg.get("epsilon", 1e-3)))
    shift = beta - mean * scale
    y = Tensor(_per_channel(b, layer, x, scale.astype(np.float32), "Mul", "scale"), x.shape)
    return Tensor(_per_channel(b, layer, y, shift.astype(np.float32), "Add", "shift"), x.shape)


def _prelu(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    """PReLU: slopes (z, y, x, c) with shared axes of size 1 -> (c, z, y, x)."""
    shared = {int(axis) for axis in (layer.config.get("shared_axes") or [])}
    shape = tuple(1 if axis in shared else size
                  for axis, size in zip((1, 2, 3, 4), (*x.spatial, x.channels), strict=True))
    alpha = b.weight(layer, "alpha", shape).transpose(3, 0, 1, 2)
    y = b.add("PRelu", [x.name, b.constant(f"{layer.name}/alpha", alpha)], layer.name)
    return Tensor(y, x.shape)


def _leaky_relu(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    slope = layer.config.get("negative_slope", layer.config.get("alpha", 0.3))
    return Tensor(b.add("LeakyRelu", [x.name], layer.name, alpha=float(slope)), x.shape)


def _relu(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
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
    return Tensor(y, x.shape)


def _elu(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    alpha = float(layer.config.get("alpha", 1.0))
    return Tensor(b.add("Elu", [x.name], layer.name, alpha=alpha), x.shape)


def _activation_layer(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    return _activation(b, layer, x, layer.config.get("activation"))


def _identity(b: GraphBuilder, layer: KerasLayer, x: Tensor) -> Tensor:
    return x


def _concatenate(b: GraphBuilder, layer: KerasLayer, inputs: list[Tensor]) -> Tensor:
    check_channel_axis(b, layer)
    if len({t.spatial for t in inputs}) != 1:
        raise b.fail(layer, f"inputs of different sizes {[t.spatial for t in inputs]}")
    y = b.add("Concat", [t.name for t in inputs], layer.name, axis=1)
    return Tensor(y, (sum(t.channels for t in inputs), *inputs[0].spatial))


def _merge(op: str) -> Callable[[GraphBuilder, KerasLayer, list[Tensor]], Tensor]:
    """Add, Subtract, Multiply, Average, Maximum, Minimum of same-shape tensors."""

    def convert(b: GraphBuilder, layer: KerasLayer, inputs: list[Tensor]) -> Tensor:
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
        return Tensor(y, inputs[0].shape)

    return convert


_SINGLE: dict[str, Callable[[GraphBuilder, KerasLayer, Tensor], Tensor]] = {
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
_MULTI: dict[str, Callable[[GraphBuilder, KerasLayer, list[Tensor]], Tensor]] = {
    "Concatenate": _concatenate, "Add": _merge("Sum"), "Subtract": _merge("Sub"),
    "Multiply": _merge("Mul"), "Average": _merge("Average"), "Maximum": _merge("Max"),
    "Minimum": _merge("Min"),
}
SUPPORTED_LAYERS = ("InputLayer", *sorted((*_SINGLE, *_MULTI)))


def base_class_name(layer: KerasLayer) -> str:
    """The Keras class without its registration package (``Addons>GroupNormalization``)."""
    return layer.class_name.rsplit(">", 1)[-1]


def check_classes(keras: KerasFile) -> None:
    """Refuse code-carrying and unknown layers before anything is converted."""
    for layer in keras.layers:
        name = base_class_name(layer)
        if name in CODE_LAYERS:
            raise ValueError(f"{keras.path}: layer {layer.name!r} is a {layer.class_name} "
                             "layer, whose Python code is stored in the file; demhx-export "
                             "never executes code from a model file, so it cannot be converted")
        if name not in SUPPORTED_LAYERS:
            raise ValueError(f"{keras.path}: layer {layer.name!r} has class "
                             f"{layer.class_name!r}, which demhx-export cannot convert "
                             f"(supported: {', '.join(SUPPORTED_LAYERS)})")


def convert_layer(b: GraphBuilder, layer: KerasLayer, inputs: list[Tensor]) -> Tensor:
    """The ONNX nodes of one call of ``layer`` on ``inputs``; its output."""
    name = base_class_name(layer)
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


__all__ = ["CODE_LAYERS", "IDENTITY_LAYERS", "SUPPORTED_LAYERS", "base_class_name",
           "check_classes", "convert_layer"]
