"""Where inference runs: the device a user asks for, the providers that give it, the install.

:func:`parse_device` reads ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; :func:`choose_providers`
is the one place that turns a request into ONNX Runtime providers; :func:`parse_devices` reads
several GPUs (``cuda:0,1``, ``cuda:all``) for :mod:`demhx.multi_device`; :func:`import_onnxruntime`
imports ONNX Runtime after checking that exactly one of its builds is installed (every
session demhx and its export tools open goes through it).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["available_cores", "choose_providers", "CPU", "CUDA", "cuda_device_count",
           "CUDNN_CONV_ALGO_SEARCH", "DeviceError", "DeviceRequest", "DEVICES",
           "import_onnxruntime", "InstallError", "LOG_QUIET", "parse_device",
           "parse_devices"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "cuda:N,M,...", "cuda:all")
CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"
"""cuDNN convolution algorithm search of the CUDA provider. The default, ``EXHAUSTIVE``, times
every algorithm for each new input shape: on an H200 the first batch of the default model took
0.93 s with it and 0.21 s with ``HEURISTIC``, at the same steady speed (2.07 ms per cube)."""
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
_ORT_FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime "
            "(on a CUDA machine: pip install \"onnxruntime-gpu[cuda,cudnn]\")")
LOG_QUIET = 3  # ONNX Runtime severity: errors only


class DeviceError(ValueError):
    """The requested device cannot run here (a usage error: the fix is an option or install)."""


class InstallError(RuntimeError):
    """ONNX Runtime is missing or broken in this environment."""


@dataclass(frozen=True)
class DeviceRequest:
    """A parsed ``--device``: kind ``"auto"``, ``"cpu"`` or ``"cuda"``, and a CUDA index."""

    kind: str
    index: int = 0


def parse_device(device: str) -> DeviceRequest:
    """Parse ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ValueError with the choices otherwise."""
    text = str(device).strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return DeviceRequest(text)
    kind, _, index = text.partition(":")
    if kind == "cuda" and index.isdigit():
        return DeviceRequest("cuda", int(index))
    raise ValueError(f"device={device!r} is not a device; use one of {', '.join(DEVICES)}")


def parse_devices(device: str) -> tuple[DeviceRequest, ...]:
    """One request per device: ``cuda:0,1`` (or ``cuda:0,cuda:1``) and ``cuda:all`` name
    several GPUs, anything else one device (:func:`parse_device`).

    ``cuda:all`` is every GPU this process sees (``CUDA_VISIBLE_DEVICES`` when set, else the
    GPUs ``nvidia-smi -L`` lists); DeviceError when there is none.
    """
    text = str(device).strip().lower()
    if text == "cuda:all":
        count = cuda_device_count()
        if not count:
            raise DeviceError(f"device={device!r}: no GPU is visible (nvidia-smi lists none, or "
                              "CUDA_VISIBLE_DEVICES is empty); check nvidia-smi, or use "
                              "device=cpu")
        return tuple(DeviceRequest("cuda", index) for index in range(count))
    if "," not in text:
        return (parse_device(device),)
    parts = [part.strip().removeprefix("cuda:") for part in text.removeprefix("cuda:").split(",")]
    if not text.startswith("cuda:") or not all(part.isdigit() for part in parts):
        raise ValueError(f"device={device!r} is not a list of GPUs; write cuda:0,1 (or "
                         "cuda:all for every GPU)")
    indices = [int(part) for part in parts]
    if len(set(indices)) != len(indices):
        raise ValueError(f"device={device!r} names a GPU twice; name each GPU once")
    return tuple(DeviceRequest("cuda", index) for index in indices)


def cuda_device_count() -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES``'s entries when it is set (CUDA
    numbers them from 0 in that order), else the GPUs ``nvidia-smi -L`` lists (0 if none)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([part for part in visible.split(",") if part.strip()])
    command = shutil.which("nvidia-smi")
    if command is None:
        return 0
    try:
        listed = subprocess.run([command, "-L"], capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def choose_providers(request: DeviceRequest, available: Sequence[str]) -> list[Any]:
    """ONNX Runtime providers to try, best first, for a device request.

    ``cpu`` gives CPU only; ``cuda`` gives CUDA (the requested GPU) then CPU, and raises
    :class:`DeviceError` if this ONNX Runtime has no CUDA provider; ``auto`` is ``cuda`` when
    the provider exists and ``cpu`` otherwise.
    """
    has_cuda = CUDA in available
    if request.kind == "cuda" and not has_cuda:
        raise DeviceError(
            "device=cuda: this ONNX Runtime has no CUDA support (providers: "
            f"{', '.join(available)}); swap it for the CUDA build with pip uninstall -y "
            "onnxruntime && pip install onnxruntime-gpu (Linux/Windows x86-64 with an NVIDIA "
            "driver) or use device=cpu")
    if request.kind == "cpu" or not has_cuda:
        return [CPU]
    return [(CUDA, {"device_id": request.index,
                    "cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH}), CPU]


@functools.lru_cache(maxsize=1)
def import_onnxruntime() -> Any:
    """``onnxruntime``, after checking the install; :class:`InstallError` names the fix.

    Both ``onnxruntime`` and ``onnxruntime-gpu`` install the same module, so having both
    leaves a mixture of files in which the last one installed decides, silently, whether
    CUDA can run (``pip install`` of demhx after ``onnxruntime-gpu`` puts the CPU build back
    on top), and uninstalling either breaks the other: fail when both are installed or the
    import is broken. The fix removes both and installs one.
    """
    installed = [name for name in _ORT_DISTRIBUTIONS if _distribution_version(name)]
    if len(installed) > 1:
        raise InstallError("both onnxruntime and onnxruntime-gpu are installed; they overwrite "
                           f"each other's files (one module, onnxruntime); fix: {_ORT_FIX}")
    try:
        import onnxruntime as ort

        ort.InferenceSession  # noqa: B018 - a half-overwritten install lacks it
    except (ImportError, AttributeError, OSError) as error:
        raise InstallError(f"ONNX Runtime cannot be imported: {error}; fix: {_ORT_FIX}"
                           ) from None
    ort.set_default_logger_severity(LOG_QUIET)
    return ort


def _distribution_version(name: str) -> str | None:
    import importlib.metadata  # only for this diagnosis: it costs start-up time

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
