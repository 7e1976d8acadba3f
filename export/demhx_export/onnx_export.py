"""Export a U-net to the ONNX file demhx runs, verified against PyTorch, with an fp16 twin.

``export_onnx(net, config, out_path, metadata=None) -> ExportReport`` writes

``OUT.onnx``
    opset 17, one self-contained file (weights inside, no external data), input ``input``
    and output ``output``, both float32 of shape ``(batch, 1, n, n, n)`` with a dynamic batch
    axis and ``n`` = the model's cube size; the ``demhx.*`` metadata of the model contract
    (:mod:`demhx.model`) plus ``demhx.widths``, ``demhx.parameters`` and
    ``demhx.gflop_per_cube``.
``OUT.fp16.onnx``
    the fp16 twin for the CUDA provider: float16 weights and compute, and **float16 input
    and output** (``input``/``output`` of type ``tensor(float16)``): the caller casts a
    float32 batch to float16 and the result back. Same metadata.

Verification, before anything is moved into place: both files are written to temporary
names in the destination folder, then ONNX Runtime (CPU) runs them on one seeded random
batch of :data:`VERIFY_BATCH` cubes; the fp32 file must match PyTorch within a relative L2
error of :data:`TOLERANCE` (1e-4) and the twin within :data:`FP16_TOLERANCE` (1e-2), or
:class:`ExportMismatchError` is raised and the temporary files are removed, leaving any
existing ``OUT.onnx`` untouched.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from demhx.model import sha256_of

from demhx_export import __version__
from demhx_export.network import (
    PAPER_CUBE_SIZE,
    UNet3D,
    check_cube_size,
    count_parameters,
    flops_per_cube,
)

OPSET = 17
TOLERANCE = 1e-4  # relative L2 error, ONNX Runtime fp32 vs PyTorch
FP16_TOLERANCE = 1e-2  # relative L2 error, fp16 twin vs PyTorch
VERIFY_BATCH = 2  # cubes in the verification batch (exercises the dynamic batch axis)
VERIFY_SEED = 0
INPUT_NAME = "input"
OUTPUT_NAME = "output"
FP16_SUFFIX = ".fp16.onnx"
PREFIX = "demhx."
# contract defaults (the paper's conventions)
DEFAULTS = {"voxel_size": 1.0, "normalisation": "noise", "noise_std": 0.1, "background": 0.0,
            "version": "0.1"}
STRIDE_FRACTION = 4  # default stride = cube_size / 4 (16 voxels for the paper's 64³ cubes)


class ExportMismatchError(RuntimeError):
    """ONNX Runtime's output differs from PyTorch's beyond tolerance; nothing was written."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matched PyTorch.

    Attributes
    ----------
    path, sha256 : the fp32 model and its sha256 hex digest.
    relative_error : relative L2 error of ONNX Runtime (CPU, fp32) against PyTorch.
    fp16_path, fp16_sha256, fp16_relative_error : the twin (None when not written).
    parameters : trainable parameters of the network.
    gflop_per_cube : 2 × multiply-adds per cube, 10⁹.
    metadata : the ``demhx.*`` metadata written into both files.
    """

    path: Path
    sha256: str
    relative_error: float
    parameters: int
    gflop_per_cube: float
    metadata: dict[str, str] = field(default_factory=dict)
    fp16_path: Path | None = None
    fp16_sha256: str | None = None
    fp16_relative_error: float | None = None

    def registry_entry(self) -> dict[str, str]:
        """The model's entry for ``models/registry.json`` (file names relative to it)."""
        entry = {"file": self.path.name, "sha256": self.sha256}
        if self.fp16_path is not None and self.fp16_sha256 is not None:
            entry.update(fp16=self.fp16_path.name, fp16_sha256=self.fp16_sha256)
        return entry


def fp16_twin_path(out_path: str | Path) -> Path:
    """``OUT.fp16.onnx`` for ``OUT.onnx`` (the name the runtime looks for)."""
    path = Path(out_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + FP16_SUFFIX)


def model_metadata(net: UNet3D, config: Mapping[str, Any], out_path: str | Path,
                   overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``demhx.*`` metadata for a network and its checkpoint config.

    Parameters
    ----------
    net : the network (widths and parameter count are read from it).
    config : checkpoint JSON object (keys listed in :mod:`demhx_export.checkpoint`).
    out_path : destination; its stem is the default model name.
    overrides : keys with or without the ``demhx.`` prefix (``name``, ``version``, ``trained``,
        ``provenance``, ``cube_size`` ...) that replace the derived values.
    """
    values = {**DEFAULTS, **_config_values(config)}
    values.update({key.removeprefix(PREFIX): value for key, value in (overrides or {}).items()
                   if value is not None})
    cube_size = check_cube_size(int(values.get("cube_size", PAPER_CUBE_SIZE)))
    values.setdefault("name", _model_stem(Path(out_path)))
    values.setdefault("trained", True)
    values.setdefault("provenance", provenance_text(config))
    values.update(format=1, cube_size=cube_size,
                  stride=values.get("stride", max(1, cube_size // STRIDE_FRACTION)),
                  widths=",".join(str(w) for w in net.widths),
                  parameters=count_parameters(net),
                  gflop_per_cube=f"{flops_per_cube(net.widths, cube_size) / 1e9:.3f}")
    return {PREFIX + key: _text(value) for key, value in values.items()}


def provenance_text(config: Mapping[str, Any]) -> str:
    """``data: ...; steps: ...; seed: ...; commit: ...; exported: ...`` from a checkpoint config."""
    found = config.get("train")
    train: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    data = config.get("data", train.get("train_dir", "unknown"))
    parts = {"data": data, "steps": config.get("step", "unknown"),
             "seed": config.get("seed", train.get("seed", "unknown")),
             "commit": config.get("commit", "unknown"),
             "exported": f"{datetime.date.today().isoformat()} by demhx-export {__version__}"}
    return "; ".join(f"{key}: {value}" for key, value in parts.items())


def export_onnx(net: UNet3D, config: Mapping[str, Any], out_path: str | Path,
                metadata: Mapping[str, Any] | None = None, fp16: bool = True,
                tolerance: float = TOLERANCE, fp16_tolerance: float = FP16_TOLERANCE
                ) -> ExportReport:
    """Export, verify and write ``out_path`` (and its fp16 twin); see the module docstring.

    Parameters
    ----------
    net : the network; exported in eval mode (its mode is restored afterwards).
    config : checkpoint JSON object, or ``{}`` for the defaults.
    out_path : destination ``.onnx`` file; its folder must exist.
    metadata : overrides of the ``demhx.*`` metadata (e.g. ``{"name": "tight",
        "version": "1.0", "trained": False}``).
    fp16 : also write ``OUT.fp16.onnx``; when False a stale twin next to ``out_path`` is
        removed so that the runtime cannot pick it up.
    tolerance, fp16_tolerance : largest accepted relative L2 errors against PyTorch.

    Raises
    ------
    ValueError : invalid metadata or destination.
    ExportMismatchError : ONNX Runtime disagrees with PyTorch; nothing was written.
    """
    out_path = Path(out_path)
    if not out_path.name.endswith(".onnx") or out_path.name.endswith(FP16_SUFFIX):
        raise ValueError(f"{out_path}: the model file name must end in .onnx (and not "
                         f"{FP16_SUFFIX}, the twin's suffix)")
    if not out_path.parent.is_dir():
        raise ValueError(f"{out_path.parent}: output folder does not exist; create it first")
    values = model_metadata(net, config, out_path, metadata)
    _check_contract(out_path, values)
    cube_size = int(values[PREFIX + "cube_size"])
    twin = fp16_twin_path(out_path)
    temporary = [_temporary(out_path), _temporary(twin)]
    try:
        # 1. export, embed the metadata, save as one file, verify with ONNX Runtime
        model = _export_graph(net, cube_size, temporary[0])
        _set_metadata(model, values)
        onnx.save_model(model, str(temporary[0]))
        inputs = _verification_batch(cube_size)
        reference = _torch_forward(net, inputs)
        error = _relative_error(_ort_forward(temporary[0], inputs), reference)
        if not error <= tolerance:
            raise ExportMismatchError(
                f"{out_path}: ONNX Runtime output differs from PyTorch (relative L2 error "
                f"{error:.2e} > {tolerance:.0e}); nothing was written")
        # 2. the fp16 twin, verified the same way
        error16 = None
        if fp16:
            onnx.save_model(to_fp16(model), str(temporary[1]))
            error16 = _relative_error(_ort_forward(temporary[1], inputs.astype(np.float16)),
                                      reference)
            if not error16 <= fp16_tolerance:
                raise ExportMismatchError(
                    f"{twin}: fp16 twin differs from PyTorch (relative L2 error {error16:.2e} "
                    f"> {fp16_tolerance:.0e}); nothing was written")
        # 3. move into place (the twin first, so the runtime never pairs a new file
        # with a stale twin)
        if fp16:
            os.replace(temporary[1], twin)
        elif twin.exists():
            twin.unlink()
        os.replace(temporary[0], out_path)
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    return ExportReport(path=out_path, sha256=sha256_of(out_path), relative_error=error,
                        parameters=int(values[PREFIX + "parameters"]),
                        gflop_per_cube=float(values[PREFIX + "gflop_per_cube"]),
                        metadata=values, fp16_path=twin if fp16 else None,
                        fp16_sha256=sha256_of(twin) if fp16 else None,
                        fp16_relative_error=error16)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 twin of an fp32 model: float16 weights, compute, input and output."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about values clamped to the float16 range
        twin = float16.convert_float_to_float16(model, keep_io_types=False)
    twin.doc_string = model.doc_string + " (float16 twin: float16 input and output)"
    return twin


# --------------------------------------------------------------------------- helpers


def _export_graph(net: UNet3D, cube_size: int, path: Path) -> onnx.ModelProto:
    """torch.onnx export (TorchScript exporter: no onnxscript needed) to ``path``; load it."""
    example = torch.zeros(VERIFY_BATCH, 1, cube_size, cube_size, cube_size)
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
            torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
    finally:
        net.train(was_training)
    model = onnx.load_model(str(path))
    onnx.checker.check_model(model)
    return model


def _set_metadata(model: onnx.ModelProto, values: Mapping[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "demhx-export"
    model.producer_version = __version__
    model.doc_string = (f"demhx 3D U-net, widths {values[PREFIX + 'widths']}, "
                        f"{values[PREFIX + 'cube_size']}³ cubes")


def _check_contract(out_path: Path, values: Mapping[str, str]) -> None:
    """Refuse metadata that the runtime's contract would reject, before exporting."""
    from demhx.model import spec_from_metadata

    spec_from_metadata(out_path, dict(values))


def _verification_batch(cube_size: int) -> np.ndarray:
    """Seeded standard-normal cubes, ``(VERIFY_BATCH, 1, n, n, n)`` float32."""
    rng = np.random.default_rng(VERIFY_SEED)
    return rng.standard_normal((VERIFY_BATCH, 1, cube_size, cube_size, cube_size),
                               dtype=np.float32)


def _torch_forward(net: UNet3D, inputs: np.ndarray) -> np.ndarray:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return net(torch.from_numpy(inputs)).numpy()
    finally:
        net.train(was_training)


def _ort_forward(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run a model file with ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
    return np.asarray(output)


def _relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """``‖actual − reference‖₂ / ‖reference‖₂`` in float64 (absolute if the reference is 0);
    inf for a shape mismatch or non-finite output."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape or not np.isfinite(actual).all():
        return float("inf")
    scale = float(np.linalg.norm(reference)) or 1.0
    return float(np.linalg.norm(actual - reference)) / scale


def _config_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """Contract values found in a checkpoint config (``train.cube_size`` as a fallback)."""
    keys = ("name", "version", "cube_size", "stride", "voxel_size", "normalisation",
            "noise_std", "background", "trained")
    values = {key: config[key] for key in keys if config.get(key) is not None}
    train = config.get("train")
    if "cube_size" not in values and isinstance(train, Mapping) and train.get("cube_size"):
        values["cube_size"] = train["cube_size"]
    return values


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _model_stem(path: Path) -> str:
    return path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


__all__ = ["ExportMismatchError", "ExportReport", "export_onnx", "fp16_twin_path",
           "model_metadata", "provenance_text", "to_fp16"]
