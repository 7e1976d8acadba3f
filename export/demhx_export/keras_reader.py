"""Read a Keras ``.h5``/``.hd5`` model file (data only) for :mod:`demhx_export.keras_import`.

What is read
------------
Only data: the ``model_config`` JSON attribute of the file, the weight arrays listed by the
``weight_names`` attribute of each layer's group under ``model_weights``, the numbers under
``configParams`` (DeepEMhancer stores its cube size and stride there) and the *names* of the
datasets under ``code``. Nothing stored in the file is executed, unmarshalled or evaluated:
DeepEMhancer's files carry Python source under ``code/`` (the ``GroupNormalization`` class
and the input normalisation function), which the original tool ``exec``\\ s; it is ignored
here and its dataset names are recorded in the provenance. A ``Lambda`` layer (marshalled
Python bytecode) is refused by the conversion (:mod:`demhx_export.keras_layers`).

Both HDF5 layouts are read: Keras 2 (``keras`` 2.x, ``tf.keras`` up to TF 2.15,
``tf_keras``): weights at ``model_weights/<layer>/<layer>/<var>:0``, inbound nodes as lists;
and Keras 3 (``model.save("x.h5")``): weights at ``model_weights/<layer>/<layer>/<var>``,
inbound nodes as ``{"args", "kwargs"}`` with ``__keras_tensor__`` entries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

KERAS_EXTRA = 'pip install "demhx-export[keras]"'
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
    weights: dict[str, dict[str, NDArray[np.float32]]]
    params: dict[str, float] = field(default_factory=dict)
    stored_code: tuple[str, ...] = ()


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


def _layer_weights(path: Path, root: Any, layer: str) -> dict[str, NDArray[np.float32]]:
    """``{variable: float32 array}`` of one layer; variable = last path part without ``:0``."""
    if layer not in root:
        return {}
    group = root[layer]
    weights: dict[str, NDArray[np.float32]] = {}
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


__all__ = ["KERAS_EXTRA", "KerasFile", "KerasLayer", "TensorRef", "read_keras_file"]
