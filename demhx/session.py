"""The inference session: which device runs, with which model file, in batches of what size.

:func:`load_runtime` resolves and checksums the model, creates one
``onnxruntime.InferenceSession``, reads the model contract from that same session, checks
its input and output shapes against the contract, and decides from
``session.get_providers()`` what actually runs (``onnxruntime-gpu`` lists CUDA even on a
machine without a GPU). Provider choice is the one function :func:`choose_providers`;
``device="cpu"`` or ``"cuda[:N]"`` override the automatic choice.

On CUDA the ``.fp16.onnx`` twin of the model is used when present (fed float16 cubes),
inputs/outputs go through ONNX Runtime's IO binding, every batch has the same shape (the last
one is padded with zeros) and cuDNN picks its convolution algorithms by heuristics
(:data:`CUDNN_CONV_ALGO_SEARCH`): both keep cuDNN from searching its algorithms again for
each new batch shape. On CPU ``threads`` sets ONNX Runtime's intra-op threads. ONNX
Runtime's own log lines (provider probing) are silenced.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import model as model_contract
from demhx.device import (
    CPU,
    CUDA,
    LOG_QUIET,
    DeviceError,
    DeviceRequest,
    available_cores,
    choose_providers,
    import_onnxruntime,
    parse_device,
)
from demhx.errors import DemhxWarning
from demhx.model import ModelSpec
from demhx.validate import check_positive

__all__ = ["bounded_threads", "check_io", "CPU_BATCH_SIZE", "CUDA_BATCH_SIZE",
           "CUDA_MAX_BATCH_SIZE", "load_runtime", "ModelIO", "Runtime"]

CPU_BATCH_SIZE = 1
"""Cubes per batch on CPU: larger batches are no faster there and cost memory."""
CUDA_BATCH_SIZE = 8
"""Cubes per batch on CUDA when the free GPU memory cannot be queried."""
CUDA_MAX_BATCH_SIZE = 32
_CUDA_MEMORY_SHARE = 0.5  # part of the free GPU memory a batch may use
_ACTIVATIONS_PER_VOXEL = 16  # live activation tensors of the widest level, per cube voxel
_OUT_OF_MEMORY = ("out of memory", "failed to allocate", "bfcarena", "cudaerrormemoryallocation",
                  "smaller than requested bytes", "cudnn_status_alloc_failed",
                  "cublas_status_alloc_failed")  # ONNX Runtime's and CUDA's words for it
_LOG_SILENT = 4  # fatal only: hides the CUDA-provider probe of onnxruntime-gpu


@dataclass(frozen=True)
class ModelIO:
    """Input/output names of a model, its input element type and its fixed batch size if any."""

    input_name: str
    output_name: str
    input_dtype: type
    fixed_batch: int | None


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def check_io(session: Any, spec: ModelSpec, path: Path) -> ModelIO:
    """Check that the model maps ``(batch, 1, c, c, c)`` to the same shape, ``c`` its cube size."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"{path}: model has {len(inputs)} inputs and {len(outputs)} outputs; "
                         "a demhx model has one of each; re-export the model")
    cube = spec.cube_size
    for role, arg in (("input", inputs[0]), ("output", outputs[0])):
        if not _shape_fits(arg.shape, cube):
            shape = "(" + ", ".join(str(dim) for dim in arg.shape) + ")"
            raise ValueError(f"{path}: model {role} has shape {shape}, not (batch, 1, {cube}, "
                             f"{cube}, {cube}) as its metadata cube size {cube} requires; "
                             "re-export the model")
    dtype = _DTYPES.get(inputs[0].type)
    if dtype is None:
        raise ValueError(f"{path}: model input type {inputs[0].type} is not float32 or float16; "
                         "re-export the model")
    batch = inputs[0].shape[0]
    return ModelIO(inputs[0].name, outputs[0].name, dtype,
                   batch if isinstance(batch, int) and batch > 0 else None)


def _shape_fits(shape: Sequence[Any], cube: int) -> bool:
    if len(shape) != 5:
        return False
    fixed = [(dim, want) for dim, want in zip(shape[1:], (1, cube, cube, cube), strict=True)
             if isinstance(dim, int) and dim > 0]
    return all(dim == want for dim, want in fixed)


@dataclass(frozen=True, eq=False)
class Runtime:
    """A loaded model, ready to run batches of cubes.

    Attributes
    ----------
    spec : the model contract (``spec.path`` is the float32 file).
    session : the ``onnxruntime.InferenceSession``.
    model_file : the file the session runs (the ``.fp16.onnx`` twin on CUDA when present).
    device : ``"cpu"`` or ``"cuda:N"``: what actually runs.
    batch_size : cubes per inference call.
    threads : CPU intra-op threads (None: ONNX Runtime's default, the physical cores).
    io : input/output names and the input element type.
    io_binding : True when inputs and outputs go through ONNX Runtime IO binding.
    note : why the device differs from the request, if it does.
    pad_batches : True when smaller batches are padded with zeros to ``batch_size`` cubes, so
        that the model always sees one input shape (on CUDA).
    """

    spec: ModelSpec
    session: Any
    model_file: Path
    device: str
    batch_size: int
    threads: int | None
    io: ModelIO
    io_binding: bool = False
    note: str = ""
    pad_batches: bool = False
    _bound: dict[tuple[int, ...], _Bound] = field(default_factory=dict, init=False,
                                                   compare=False, repr=False)

    @property
    def description(self) -> str:
        """One line: device, provider, precision, batch size and model."""
        provider = CUDA if self.device.startswith("cuda") else CPU
        details = [provider, "fp16" if self.io.input_dtype is np.float16 else "fp32"]
        if self.device == "cpu":
            details.append(f"{self.threads} threads" if self.threads else "all cores")
        if self.io_binding:
            details.append("IO binding")
        line = (f"device {self.device} ({', '.join(details)}), batch {self.batch_size}, "
                f"model {self.spec.label} [{self.model_file.name}]")
        return f"{line}; {self.note}" if self.note else line

    def run(self, batch: NDArray[Any]) -> NDArray[Any]:
        """Predictions ``(b, 1, c, c, c)`` float32 for a batch of the same shape."""
        count = batch.shape[0]
        feed = self._feed(batch)
        try:
            if self.io_binding:
                result = self._run_bound(feed)
            else:
                result = self.session.run([self.io.output_name], {self.io.input_name: feed})[0]
        except Exception as error:  # ORT raises its own exception types
            raise RuntimeError(self._failure(error, feed.shape[0])) from error
        output = np.asarray(result[:count], dtype=np.float32)
        if not np.isfinite(output).all():
            raise RuntimeError(self._non_finite(output, feed))
        return output

    def _feed(self, batch: NDArray[Any]) -> NDArray[Any]:
        """The batch in the model's input type, padded with zero cubes to ``batch_size``
        when :attr:`pad_batches` is set."""
        if not self.pad_batches or batch.shape[0] >= self.batch_size:
            return np.ascontiguousarray(batch, dtype=self.io.input_dtype)
        feed: NDArray[Any] = np.zeros((self.batch_size,) + batch.shape[1:],
                                    dtype=self.io.input_dtype)
        feed[:batch.shape[0]] = batch
        return feed

    def _failure(self, error: Exception, cubes: int) -> str:
        """Why a batch failed, with the fix: out of GPU memory named as such."""
        text = str(error).strip()
        first = (text.splitlines() or [type(error).__name__])[0][:200]
        if self.device != "cpu" and any(sign in text.lower() for sign in _OUT_OF_MEMORY):
            smaller = f"batch_size={cubes // 2}" if cubes > 1 else "device=cpu"
            return (f"{self.model_file}: {self.device} ran out of GPU memory for a batch of "
                    f"{cubes} cubes of {self.spec.cube_size}³ ({first}); try {smaller}, free "
                    "the GPU (nvidia-smi lists what uses it) or use device=cpu")
        return (f"{self.model_file}: inference failed on {self.device} ({first}); try a "
                "smaller batch_size= or device=cpu")

    def _non_finite(self, output: NDArray[Any], feed: NDArray[Any]) -> str:
        """Why a batch came back with NaN or infinite values: the model, named."""
        bad = int(output.size - np.count_nonzero(np.isfinite(output)))
        fix = ("its float16 twin may overflow: try device=cpu"
               if self.io.input_dtype is np.float16 else "check the model file or re-export it")
        if not np.isfinite(feed).all():
            fix = "the normalised input overflowed float16: try device=cpu"
        return (f"{self.model_file}: model {self.spec.label} on {self.device} produced {bad} "
                f"NaN or infinite values for a batch of cubes; nothing written; {fix}")

    def _run_bound(self, feed: NDArray[Any]) -> NDArray[Any]:
        """Run through IO binding on buffers kept on the device for this batch shape: the
        input is copied into its buffer, the output read from its own, and neither is
        allocated again (with :attr:`pad_batches` every batch has one shape)."""
        bound = self._bound.get(feed.shape)
        if bound is None:
            bound = self._bound[feed.shape] = _Bound.allocate(self, feed.shape)
        bound.input.update_inplace(feed)
        self.session.run_with_iobinding(bound.binding)
        result = bound.output.numpy()  # a copy from a GPU; a view of the buffer on the CPU
        return result.copy() if bound.on_cpu else result


@dataclass(frozen=True)
class _Bound:
    """An IO binding with its input and output buffers on the runtime's device."""

    binding: Any
    input: Any
    output: Any
    on_cpu: bool

    @classmethod
    def allocate(cls, runtime: Runtime, shape: tuple[int, ...]) -> _Bound:
        ort = import_onnxruntime()
        kind, _, index = runtime.device.partition(":")
        where, number = ("cuda" if kind == "cuda" else "cpu"), int(index or 0)
        output_type = runtime.session.get_outputs()[0].type
        output_dtype = _DTYPES.get(output_type, runtime.io.input_dtype)
        source = ort.OrtValue.ortvalue_from_shape_and_type(shape, runtime.io.input_dtype, where,
                                                           number)
        target = ort.OrtValue.ortvalue_from_shape_and_type(shape, output_dtype, where, number)
        binding = runtime.session.io_binding()
        binding.bind_ortvalue_input(runtime.io.input_name, source)
        binding.bind_ortvalue_output(runtime.io.output_name, target)
        return cls(binding, source, target, where == "cpu")


def bounded_threads(threads: int | None) -> int | None:
    """``threads`` limited to :func:`available_cores`, with a warning when it asks for more.

    More inference threads than cores only make them wait for each other (a 2-core machine
    given 2000 threads stalls, 100000 crash ONNX Runtime).
    """
    cores = available_cores()
    if threads is None or threads <= cores:
        return threads
    warnings.warn(f"threads={threads} is more than the {cores} CPU cores available; using "
                  f"{cores}", DemhxWarning, stacklevel=3)
    return cores


def load_runtime(model: str | Path | None = None, *, device: str = "auto",
                 batch_size: int | None = None, threads: int | None = None) -> Runtime:
    """Load a model once and decide where it runs.

    Parameters
    ----------
    model : a registered model name, a path to an ONNX file, or None for the default model.
    device : ``"auto"`` (CUDA when usable, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    batch_size : cubes per inference call; None picks one for the device.
    threads : CPU intra-op threads; None lets ONNX Runtime use the physical cores; more
        than the cores available are reduced to them, with a warning.

    Raises
    ------
    ValueError : bad option, unknown model, checksum mismatch, not a demhx model, wrong shape.
    FileNotFoundError : the model file does not exist.
    DeviceError : CUDA asked for but not available.
    InstallError : ONNX Runtime missing or broken.
    """
    # Validate the options before touching the model.
    request = parse_device(device)
    batch_size = check_positive("batch_size", batch_size)
    threads = bounded_threads(check_positive("threads", threads))
    ort = import_onnxruntime()
    # Resolve the model file and check its sha256 against the registry.
    path, expected = model_contract.resolve_model(model)
    model_contract.verify_sha256(path, expected)
    # Open one session on the chosen providers and read the contract from it.
    providers = choose_providers(request, ort.get_available_providers())
    session, used = _open(ort, path, providers, threads, expected is not None)
    actual, note = _actual_device(session, request)
    if used != path and actual == "cpu":  # fp16 twin but no CUDA after all: run float32
        session, used = _open(ort, path, [CPU], threads, expected is not None)
    spec = _spec(path, used, session)
    io = check_io(session, spec, used)
    # Decide the batch size and warn about untrained models.
    batch = _batch_size(batch_size, io, actual, spec)
    if not spec.trained:
        warnings.warn(f"{path.name}: model {spec.label} is marked untrained (random weights); "
                      "its output is not an enhanced map, use it only to test the pipeline",
                      DemhxWarning, stacklevel=2)
    return Runtime(spec, session, used, actual, batch, threads if actual == "cpu" else None, io,
                   io_binding=actual != "cpu", note=note, pad_batches=actual != "cpu")


def _open(ort: Any, path: Path, providers: list[Any], threads: int | None,
          registered: bool) -> tuple[Any, Path]:
    """A session on ``providers``, on the fp16 twin when CUDA is among them and a twin exists.

    The twin of a registered model is used only when the registry records its sha256, and
    is checked against it.
    """
    wants_cuda = any(isinstance(p, tuple) and p[0] == CUDA for p in providers)
    used = (_checked_twin(path, registered) if wants_cuda else None) or path
    options = ort.SessionOptions()
    options.log_severity_level = _LOG_SILENT if wants_cuda else LOG_QUIET
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    if wants_cuda:
        ort.set_default_logger_severity(_LOG_SILENT)
    try:
        with warnings.catch_warnings():  # ORT's Python-side provider-probe warning
            warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
            return model_contract.open_session(used, options, providers), used
    finally:
        ort.set_default_logger_severity(LOG_QUIET)


def _checked_twin(path: Path, registered: bool) -> Path | None:
    twin = model_contract.fp16_twin(path)
    if twin is None or not registered:
        return twin
    expected = model_contract.registered_fp16_sha256(path)
    if expected is None:
        return None
    model_contract.verify_sha256(twin, expected)
    return twin


def _spec(path: Path, used: Path, session: Any) -> ModelSpec:
    """The contract read from the running session (``spec.path`` is the float32 file)."""
    spec = model_contract.spec_from_metadata(used, model_contract.metadata_of(session))
    if used == path:
        return spec
    return dataclasses.replace(spec, path=path, fp16_path=used)


def _actual_device(session: Any, request: DeviceRequest) -> tuple[str, str]:
    """What runs, from ``session.get_providers()``, and a note when it is not what was asked."""
    if CUDA in session.get_providers():
        options = session.get_provider_options().get(CUDA, {})
        return f"cuda:{options.get('device_id', request.index)}", ""
    if request.kind == "cuda":
        raise DeviceError(
            f"device=cuda:{request.index}: ONNX Runtime has CUDA support but could not start "
            "it (no GPU visible, or the CUDA/cuDNN libraries onnxruntime-gpu needs are "
            "missing); check nvidia-smi and the onnxruntime-gpu requirements, or use device=cpu")
    if request.kind == "auto" and CUDA in _available_providers():
        return "cpu", "CUDA support is installed but no usable GPU was found"
    return "cpu", ""


def _available_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


def _batch_size(requested: int | None, io: ModelIO, device: str, spec: ModelSpec) -> int:
    """The requested batch size, the model's fixed one, or a default for the device."""
    if io.fixed_batch is not None:
        if requested not in (None, io.fixed_batch):
            raise ValueError(f"batch_size={requested}: model {spec.path.name} only takes "
                             f"batches of {io.fixed_batch}; drop batch_size=")
        return io.fixed_batch
    if requested is not None:
        return requested
    if device == "cpu":
        return CPU_BATCH_SIZE
    return _cuda_batch_size(device, spec, io.input_dtype is np.float16)


def _cuda_batch_size(device: str, spec: ModelSpec, fp16: bool) -> int:
    """Cubes that fit in a share of the free GPU memory (nvidia-smi), else the fixed default.

    A cube needs ``cube_size³ × width × 16`` activations (``width`` the first of the model's
    ``widths``, 32 if unknown) of 2 (fp16) or 4 bytes; :data:`_CUDA_MEMORY_SHARE` of the free
    memory is given to them, and the batch is kept within 1 .. :data:`CUDA_MAX_BATCH_SIZE`.
    """
    free = _cuda_free_bytes(int(device.partition(":")[2] or 0))
    if free is None:
        return CUDA_BATCH_SIZE
    widths = spec.extra.get("widths", "32").split(",")
    width = int(widths[0]) if widths[0].strip().isdigit() else 32
    per_cube = spec.cube_size ** 3 * width * _ACTIVATIONS_PER_VOXEL * (2 if fp16 else 4)
    return max(1, min(CUDA_MAX_BATCH_SIZE, int(free * _CUDA_MEMORY_SHARE // per_cube)))


def _cuda_free_bytes(index: int) -> int | None:
    command = shutil.which("nvidia-smi")
    if command is None:
        return None
    try:
        result = subprocess.run([command, "--query-gpu=memory.free", "--format=csv,noheader,"
                                 "nounits", "-i", str(index)], capture_output=True, text=True,
                                timeout=5, check=True)
        return int(result.stdout.strip().splitlines()[0]) * 2 ** 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
