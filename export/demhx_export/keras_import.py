"""Convert a Keras ``.h5``/``.hd5`` 3D U-net (the released DeepEMhancer models) to a demhx model.

``convert_keras(src, out_path, ...) -> KerasImportReport`` reads the Keras file with ``h5py``
only (no TensorFlow, no Keras; :mod:`demhx_export.keras_reader`), builds the same network as an
ONNX graph with ``onnx.helper`` layer by layer (:mod:`demhx_export.keras_layers`) and writes
``OUT.onnx`` through :mod:`demhx_export.onnx_io` (opset 17, input ``input`` and output
``output``, float32 ``(batch, 1, n, n, n)``, the ``demhx.*`` metadata of :mod:`demhx.model`),
after a smoke run with ONNX Runtime.

Nothing stored in the file is executed: code-carrying layers (``Lambda``) are refused and
DeepEMhancer's stored Python source is only named in the provenance.

Group normalisation
-------------------
``GroupNormalization`` names two different computations in Keras files (:data:`GROUP_NORMS`,
described in :mod:`demhx_export.keras_layers`): ``keras-contrib`` (DeepEMhancer's) and
``standard`` (Wu & He; Keras 3, tf.keras 2.11+, tensorflow-addons).
``group_norm="auto"`` picks ``standard`` for ``Addons>GroupNormalization``, ``keras-contrib``
for a file carrying DeepEMhancer's ``code/custom_objects`` or written by Keras < 2.11 (which
had no built-in GroupNormalization), ``standard`` for Keras 3 files, and refuses to guess for
other Keras 2 files.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from demhx.model import NORMALISATIONS, sha256_of
from onnx import TensorProto, helper

from demhx_export import __version__
from demhx_export.keras_graph import GraphBuilder, Tensor
from demhx_export.keras_layers import (
    SUPPORTED_LAYERS,
    base_class_name,
    check_classes,
    convert_layer,
)
from demhx_export.keras_reader import KERAS_EXTRA, KerasFile, KerasLayer, read_keras_file
from demhx_export.onnx_io import (
    INPUT_NAME,
    NOISE_STD,
    OPSET,
    OUTPUT_NAME,
    PREFIX,
    PRODUCER,
    STRIDE_FRACTION,
    VOXEL_SIZE,
    check_contract,
    check_destination,
    relative_error,
    run_onnx,
    set_metadata,
    write_verified,
)

IR_VERSION = 8  # the IR version of opset 17, readable by every onnxruntime >= 1.17
GROUP_NORMS = ("auto", "keras-contrib", "standard")
# the released DeepEMhancer models (paper and its inference code): 64³ cubes at 1 Å/voxel
# (onnx_io.VOXEL_SIZE), stride 16, solvent noise normalised to mean 0 and std 0.1
# (onnx_io.NOISE_STD)
PAPER_CUBE_SIZE = 64  # voxels
FIRST_BUILTIN_GROUP_NORM = (2, 11)  # first Keras 2 release with a built-in GroupNormalization


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


# --------------------------------------------------------------------------- whole model


def choose_group_norm(keras: KerasFile, requested: str = "auto") -> str | None:
    """The GroupNormalization computation for a file (module docstring); None if it has none.

    Raises ValueError for an unknown ``requested`` value or when ``auto`` cannot decide.
    """
    if requested not in GROUP_NORMS:
        raise ValueError(f"--group-norm {requested!r}: choose one of {', '.join(GROUP_NORMS)}")
    classes = {layer.class_name for layer in keras.layers
               if base_class_name(layer) == "GroupNormalization"}
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
    check_classes(keras)
    builder = GraphBuilder(keras, group_norm or "standard")
    source = _input_layer(keras)
    tensors = {(source.name, 0, 0): Tensor(INPUT_NAME, (1, cube_size, cube_size, cube_size))}
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
            tensors[(layer.name, index, 0)] = convert_layer(builder, layer,
                                                            [tensors[r] for r in refs])
            counts[base_class_name(layer)] += 1
        pending = [item for item in pending if item not in ready]
    result = tensors.get(keras.outputs[0])
    if result is None:
        raise ValueError(f"{keras.path}: model output {keras.outputs[0][0]!r} is never computed")
    return _model(builder, result, cube_size), builder.parameters, counts


def _model(b: GraphBuilder, result: Tensor, cube_size: int) -> onnx.ModelProto:
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
                              producer_name=PRODUCER, producer_version=__version__)
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
        "cube_size": cube_size, "stride": stride, "voxel_size": VOXEL_SIZE,
        "normalisation": normalisation, "noise_std": NOISE_STD, "background": 0.0,
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
             f"voxel size {VOXEL_SIZE} Å and noise std {NOISE_STD} from the paper",
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
    check_destination(out_path)
    keras = read_keras_file(src)
    mode = choose_group_norm(keras, group_norm)
    cube = resolve_cube_size(keras, cube_size)
    model, parameters, counts = build_graph(keras, cube, mode)
    source_sha256 = sha256_of(src)
    metadata = keras_metadata(keras, source_sha256, cube, mode, parameters,
                              {"name": name, "version": version, "stride": stride,
                               "normalisation": normalisation})
    check_contract(out_path, metadata)  # the runtime's contract, checked before writing
    set_metadata(model, metadata, f"3D U-net converted from the Keras file {src.name}")
    written = write_verified(model, out_path, cube, fp16, advice="convert without --fp16")
    twin = written.fp16_path
    return KerasImportReport(path=out_path, sha256=sha256_of(out_path), source=src,
                             source_sha256=source_sha256, parameters=parameters,
                             layers=dict(counts), group_norm=mode, metadata=metadata,
                             fp16_path=twin, fp16_sha256=sha256_of(twin) if twin else None,
                             fp16_relative_error=written.fp16_relative_error)


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


__all__ = ["GROUP_NORMS", "KERAS_EXTRA", "SUPPORTED_LAYERS", "KerasFile", "KerasImportReport",
           "KerasLayer", "build_graph", "choose_group_norm", "convert_keras",
           "from_keras_command", "keras_metadata", "read_keras_file", "relative_error",
           "resolve_cube_size", "run_onnx"]
