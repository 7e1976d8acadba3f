"""The ONNX graph under construction while a Keras model is converted, and its geometry.

:class:`GraphBuilder` collects the nodes and initializers and checks each layer's weights
against one Keras file; :class:`Tensor` is a value of the graph with its static shape. The
helpers turn Keras layer options (kernel sizes, ``same``/``valid`` padding, channel axes) into
ONNX attributes the way TensorFlow computes them; the layers themselves are converted in
:mod:`demhx_export.keras_layers`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from demhx_export.keras_reader import KerasFile, KerasLayer


@dataclass(frozen=True)
class Tensor:
    """An ONNX value: its name and static ``(channels, z, y, x)`` shape (batch excluded)."""

    name: str
    shape: tuple[int, int, int, int]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[int, int, int]:
        return self.shape[1], self.shape[2], self.shape[3]


class GraphBuilder:
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

    def weight(self, layer: KerasLayer, variable: str, shape: tuple[int, ...]
               ) -> NDArray[np.float32]:
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


def triple(value: Any) -> tuple[int, int, int]:
    items = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(items) != 3:
        raise TypeError(f"expected 3 values, got {value!r}")
    return int(items[0]), int(items[1]), int(items[2])


def padding_pairs(value: Any) -> tuple[tuple[int, int], ...]:
    """ZeroPadding3D/Cropping3D amounts: int, 3 ints or 3 pairs -> 3 (before, after) pairs."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    return tuple((int(item[0]), int(item[1])) if isinstance(item, (list, tuple))
                 else (int(item), int(item)) for item in items)


def check_channel_axis(b: GraphBuilder, layer: KerasLayer, key: str = "axis") -> None:
    """Refuse normalisation/concatenation along anything but the channels-last axis."""
    axis = layer.config.get(key, -1)
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if len(axes) != 1 or int(axes[0]) % 5 != 4:
        raise b.fail(layer, f"{key}={axis!r} is not the channel axis (-1)")


def check_layout(b: GraphBuilder, layer: KerasLayer) -> None:
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


def window_geometry(b: GraphBuilder, layer: KerasLayer, x: Tensor,
                    kernel: tuple[int, int, int], strides: tuple[int, int, int],
                    dilation: tuple[int, int, int]) -> tuple[list[int], tuple[int, int, int]]:
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


__all__ = ["GraphBuilder", "Tensor", "check_channel_axis", "check_layout", "padding_pairs",
           "triple", "window_geometry"]
