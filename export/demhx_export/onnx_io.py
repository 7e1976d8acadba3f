"""Writing demhx ONNX models: names, metadata, the fp16 twin and the verification run.

Both ways of making a model, the PyTorch export (:mod:`demhx_export.onnx_export`) and the
Keras conversion (:mod:`demhx_export.keras_import`), end here, so that a model file has one
shape whatever made it:

- input ``input`` and output ``output``, float32 ``(batch, 1, n, n, n)``, opset :data:`OPSET`;
- the ``demhx.*`` metadata of the model contract (:mod:`demhx.model`), checked against the
  runtime's own parser (:func:`check_contract`) before anything is written, and the producer
  ``demhx-export``;
- ``OUT.fp16.onnx``, the twin for the CUDA provider (:func:`to_fp16`): float16 weights,
  compute, input and output.

:func:`write_verified` saves the model (and its twin) under temporary names in the
destination folder, runs them with ONNX Runtime on one seeded batch of :data:`VERIFY_BATCH`
cubes and moves them into place only when the outputs agree with the reference; otherwise the
temporary files are removed and any existing ``OUT.onnx`` is left untouched. Sessions are
opened by the runtime's :func:`demhx.model.open_session`, behind its install check, so a
broken install is reported the same way by both packages.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from demhx import model as model_contract
from demhx.model import spec_from_metadata
from numpy.typing import NDArray

from demhx_export import __version__

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
PREFIX = "demhx."
FP16_SUFFIX = ".fp16.onnx"
PRODUCER = "demhx-export"
# the paper's conventions, written into the metadata of every model made here
NOISE_STD = 0.1  # std of the solvent noise after normalisation (the contract's noise_std)
VOXEL_SIZE = 1.0  # Å per voxel the networks work at
STRIDE_FRACTION = 4  # default stride = cube_size / 4 (16 voxels for the paper's 64³ cubes)
TOLERANCE = 1e-4  # relative L2 error of the fp32 model against its reference
FP16_TOLERANCE = 1e-2  # relative L2 error of the fp16 twin against the same reference
VERIFY_BATCH = 2  # cubes in the verification batch (exercises the dynamic batch axis)
VERIFY_SEED = 0

Reference = Callable[[NDArray[np.float32]], NDArray[Any]]


class ExportMismatchError(RuntimeError):
    """ONNX Runtime's output differs from the reference beyond tolerance; nothing was written."""


@dataclass(frozen=True)
class Verification:
    """What :func:`write_verified` wrote and how well it matched.

    Attributes
    ----------
    relative_error : fp32 model against the reference (None without a reference: the fp32
        output was only checked to be finite and of the right shape).
    fp16_path : the twin (None when not written).
    fp16_relative_error : twin against the reference, or against the fp32 model.
    """

    relative_error: float | None
    fp16_path: Path | None
    fp16_relative_error: float | None


def fp16_twin_path(out_path: str | Path) -> Path:
    """``OUT.fp16.onnx`` for ``OUT.onnx`` (the name the runtime looks for)."""
    path = Path(out_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + FP16_SUFFIX)


def check_destination(out_path: Path) -> None:
    """Refuse a destination the runtime would not find (or would take for a twin)."""
    if not out_path.name.endswith(".onnx") or out_path.name.endswith(FP16_SUFFIX):
        raise ValueError(f"{out_path}: the model file name must end in .onnx (and not "
                         f"{FP16_SUFFIX}, the twin's suffix)")
    if not out_path.parent.is_dir():
        raise ValueError(f"{out_path.parent}: output folder does not exist; create it first")


def check_contract(out_path: Path, values: Mapping[str, str]) -> None:
    """Refuse metadata that the runtime's contract would reject, before writing anything."""
    spec_from_metadata(out_path, dict(values))


def set_metadata(model: onnx.ModelProto, values: Mapping[str, str], description: str) -> None:
    """Replace the model's metadata with ``values``; name the producer and describe it."""
    del model.metadata_props[:]
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = PRODUCER
    model.producer_version = __version__
    model.doc_string = description


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 twin of an fp32 model: float16 weights, compute, input and output."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about values clamped to the float16 range
        twin = float16.convert_float_to_float16(model, keep_io_types=False)
    twin.doc_string = model.doc_string + " (float16 twin: float16 input and output)"
    return twin


def verification_batch(cube_size: int) -> NDArray[np.float32]:
    """Seeded standard-normal cubes, ``(VERIFY_BATCH, 1, n, n, n)`` float32."""
    rng = np.random.default_rng(VERIFY_SEED)
    return rng.standard_normal((VERIFY_BATCH, 1, cube_size, cube_size, cube_size),
                               dtype=np.float32)


def open_session(path: str | Path) -> Any:
    """An ONNX Runtime session on the CPU provider, quiet, for a model file: the runtime's
    (:func:`demhx.model.open_session`, behind its install check)."""
    return model_contract.open_session(Path(path))


def run_onnx(path: str | Path, inputs: NDArray[Any]) -> NDArray[np.float32]:
    """Run an ONNX model file on ``inputs`` with ONNX Runtime's CPU provider."""
    (output,) = open_session(path).run([OUTPUT_NAME], {INPUT_NAME: inputs})
    return np.asarray(output, dtype=np.float32)


def relative_error(actual: NDArray[Any], reference: NDArray[Any]) -> float:
    """``‖actual − reference‖₂ / ‖reference‖₂`` in float64 (absolute if the reference is 0);
    inf for a shape mismatch or non-finite output."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape or not np.isfinite(actual).all():
        return math.inf
    return float(np.linalg.norm(actual - reference)) / (float(np.linalg.norm(reference)) or 1.0)


def write_verified(model: onnx.ModelProto, out_path: Path, cube_size: int, fp16: bool, *,
                   reference: Reference | None = None, reference_name: str = "the fp32 model",
                   tolerance: float = TOLERANCE, fp16_tolerance: float = FP16_TOLERANCE,
                   advice: str = "") -> Verification:
    """Save ``model`` (and its twin when ``fp16``) to ``out_path`` once ONNX Runtime agrees.

    Parameters
    ----------
    model : the fp32 model, metadata set.
    out_path : destination, checked by :func:`check_destination`.
    cube_size : cube edge of the verification batch.
    fp16 : also write ``OUT.fp16.onnx``; when False a stale twin next to ``out_path`` is
        removed so that the runtime cannot pair it with the new model.
    reference : computes the expected output of a batch (e.g. the PyTorch network); the fp32
        model must match it within ``tolerance``. Without one the fp32 output must only be
        finite and of the input's shape, and is the twin's reference.
    reference_name : what the reference is, for the error messages.
    fp16_tolerance : largest accepted relative L2 error of the twin.
    advice : appended to the twin's error message (what to do instead).

    Raises
    ------
    ExportMismatchError : an output differs beyond tolerance; nothing was written.
    RuntimeError : without a reference, non-finite or mis-shaped output; nothing was written.
    """
    twin = fp16_twin_path(out_path)
    temporary = [_temporary(out_path), _temporary(twin)]
    try:
        onnx.save_model(model, str(temporary[0]))
        inputs = verification_batch(cube_size)
        expected, error = _check_fp32(temporary[0], out_path, inputs, reference,
                                      reference_name, tolerance)
        error16 = None
        if fp16:
            onnx.save_model(to_fp16(model), str(temporary[1]))
            error16 = relative_error(run_onnx(temporary[1], inputs.astype(np.float16)),
                                     expected)
            if not error16 <= fp16_tolerance:
                raise ExportMismatchError(
                    f"{twin}: fp16 twin differs from {reference_name} (relative L2 error "
                    f"{error16:.2e} > {fp16_tolerance:.0e}); nothing was written"
                    + (f"; {advice}" if advice else ""))
        # the twin first, so the runtime never pairs a new file with a stale twin
        if fp16:
            os.replace(temporary[1], twin)
        elif twin.exists():
            twin.unlink()
        os.replace(temporary[0], out_path)
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    return Verification(relative_error=error, fp16_path=twin if fp16 else None,
                        fp16_relative_error=error16)


def _check_fp32(path: Path, out_path: Path, inputs: NDArray[np.float32],
                reference: Reference | None, reference_name: str, tolerance: float
                ) -> tuple[NDArray[Any], float | None]:
    """Run the fp32 file; its reference output for the twin and its error (None: no reference)."""
    output = run_onnx(path, inputs)
    if reference is None:
        if output.shape != inputs.shape or not np.isfinite(output).all():
            raise RuntimeError(f"{out_path}: the converted model gives non-finite or "
                               "mis-shaped output on a test batch; nothing was written")
        return output, None
    expected = reference(inputs)
    error = relative_error(output, expected)
    if not error <= tolerance:
        raise ExportMismatchError(
            f"{out_path}: ONNX Runtime output differs from {reference_name} (relative L2 "
            f"error {error:.2e} > {tolerance:.0e}); nothing was written")
    return expected, error


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


__all__ = ["FP16_SUFFIX", "FP16_TOLERANCE", "INPUT_NAME", "NOISE_STD", "OPSET", "OUTPUT_NAME",
           "PREFIX", "TOLERANCE", "ExportMismatchError", "Verification", "check_contract",
           "check_destination", "fp16_twin_path", "open_session", "relative_error",
           "run_onnx", "set_metadata", "to_fp16", "verification_batch", "write_verified"]
