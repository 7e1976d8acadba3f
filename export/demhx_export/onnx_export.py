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

Verification, before anything is moved into place (shared with the Keras conversion:
:func:`demhx_export.onnx_io.write_verified`): both files are written to temporary names in
the destination folder, then ONNX Runtime (CPU) runs them on one seeded random batch of
:data:`VERIFY_BATCH` cubes; the fp32 file must match PyTorch within a relative L2 error of
:data:`TOLERANCE` (1e-4) and the twin within :data:`FP16_TOLERANCE` (1e-2), or
:class:`ExportMismatchError` is raised and the temporary files are removed, leaving any
existing ``OUT.onnx`` untouched.
"""

from __future__ import annotations

import datetime
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from demhx.model import sha256_of
from numpy.typing import NDArray

from demhx_export import __version__
from demhx_export.network import (
    PAPER_CUBE_SIZE,
    OneChannel,
    UNet3D,
    check_cube_size,
    count_parameters,
    flops_per_cube,
)
from demhx_export.onnx_io import (
    FP16_TOLERANCE,
    INPUT_NAME,
    NOISE_STD,
    OPSET,
    OUTPUT_NAME,
    PREFIX,
    STRIDE_FRACTION,
    TOLERANCE,
    VERIFY_BATCH,
    VOXEL_SIZE,
    ExportMismatchError,
    check_contract,
    check_destination,
    fp16_twin_path,
    set_metadata,
    to_fp16,
    write_verified,
)

# contract defaults (the paper's conventions)
DEFAULTS = {"voxel_size": VOXEL_SIZE, "normalisation": "noise", "noise_std": NOISE_STD,
            "background": 0.0, "version": "0.1"}


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
                tolerance: float = TOLERANCE, fp16_tolerance: float = FP16_TOLERANCE,
                channel: str = "map") -> ExportReport:
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
    channel : for a network with an error head, which output becomes the model: ``"map"``
        (the enhanced map; the error head is left out of the graph) or ``"error"`` (the
        estimated absolute error of the map, in the same units: a model of its own that
        ``--confidence`` runs beside the map's). Recorded as ``demhx.output``.

    Raises
    ------
    ValueError : invalid metadata or destination.
    ExportMismatchError : ONNX Runtime disagrees with PyTorch; nothing was written.
    """
    out_path = Path(out_path)
    check_destination(out_path)
    if getattr(net, "error_head", False) or channel != "map":
        net = OneChannel(net, channel)  # type: ignore[assignment]
    values = model_metadata(net, config, out_path, {"output": channel, **(metadata or {})})
    check_contract(out_path, values)
    cube_size = int(values[PREFIX + "cube_size"])
    model = _export_graph(net, cube_size)
    set_metadata(model, values, f"demhx 3D U-net, widths {values[PREFIX + 'widths']}, "
                                f"{values[PREFIX + 'cube_size']}³ cubes")
    written = write_verified(model, out_path, cube_size, fp16,
                             reference=lambda inputs: _torch_forward(net, inputs),
                             reference_name="PyTorch", tolerance=tolerance,
                             fp16_tolerance=fp16_tolerance)
    assert written.relative_error is not None  # always measured against a reference
    return ExportReport(path=out_path, sha256=sha256_of(out_path),
                        relative_error=written.relative_error,
                        parameters=int(values[PREFIX + "parameters"]),
                        gflop_per_cube=float(values[PREFIX + "gflop_per_cube"]),
                        metadata=values, fp16_path=written.fp16_path,
                        fp16_sha256=sha256_of(written.fp16_path) if written.fp16_path else None,
                        fp16_relative_error=written.fp16_relative_error)


# --------------------------------------------------------------------------- helpers


def _export_graph(net: UNet3D, cube_size: int) -> onnx.ModelProto:
    """torch.onnx export (TorchScript exporter: no onnxscript needed) through a scratch
    file, loaded and checked."""
    example = torch.zeros(VERIFY_BATCH, 1, cube_size, cube_size, cube_size)
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad(), \
                tempfile.TemporaryDirectory(prefix="demhx-export-") as folder:
            path = Path(folder) / "graph.onnx"
            warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
            torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
            model = onnx.load_model(str(path))
    finally:
        net.train(was_training)
    onnx.checker.check_model(model)
    return model


def _torch_forward(net: UNet3D, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return net(torch.from_numpy(inputs)).numpy()
    finally:
        net.train(was_training)


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


__all__ = ["ExportMismatchError", "ExportReport", "export_onnx", "fp16_twin_path",
           "model_metadata", "provenance_text", "to_fp16"]
