"""The model loaded on a background thread while the file path reads and checks the map.

On a GPU, opening the session and its first batch (CUDA and cuDNN start-up, cuDNN's
algorithm search) cost about 1.3 s of a 3-s run of a 256³ map, all before the first real
batch; reading, checking and normalising the map take about as long. Both the session's
creation and a batch run in ONNX Runtime's C++ code, which releases the GIL, so
:class:`Background` overlaps them with the map's reading: it loads the runtime and runs one
batch of zeros of the run's batch shape, and :meth:`Background.result` hands the warmed
runtime over (or raises, in the caller's thread, what loading raised, so the messages stay
those of a plain load, after the map's own checks).

Only worth it where a GPU can run the model (:func:`gpu_possible`): on the CPU the session
opens in about 0.04 s and a batch of zeros would cost a batch of real work.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable

import numpy as np

from demhx.device import CUDA, parse_devices
from demhx.multi_device import Loaded

_EXIT_WAIT_S = 30.0  # at exit, the longest wait for a load still running (an early error)


def gpu_possible(device: str) -> bool:
    """Whether ``device`` may run on CUDA: asked for, or ``auto`` with ONNX Runtime's CUDA
    provider installed (False when ONNX Runtime cannot be imported: the load reports it)."""
    if any(request.kind == "cuda" for request in parse_devices(device)):
        return True
    if device != "auto":
        return False
    try:
        from demhx.session import import_onnxruntime

        return CUDA in import_onnxruntime().get_available_providers()
    except Exception:  # reported where the model is loaded for the run
        return False


def warm_up(runtime: Loaded) -> None:
    """One batch of zeros of the run's batch shape through ``runtime`` (device start-up and
    kernel selection happen here rather than in the first real batch)."""
    cube = runtime.spec.cube_size
    runtime.run(np.zeros((runtime.batch_size, 1, cube, cube, cube), dtype=np.float32))


class Background:
    """``load()`` (then :func:`warm_up` on a GPU) on a daemon thread; :meth:`result` waits."""

    def __init__(self, load: Callable[[], Loaded]) -> None:
        self._runtime: Loaded | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,),
                                        name="demhx-model-load", daemon=True)
        self._thread.start()
        # a process that ends early (a bad map) lets the session finish opening first
        atexit.register(self._thread.join, _EXIT_WAIT_S)

    def _run(self, load: Callable[[], Loaded]) -> None:
        try:
            runtime = load()
            if runtime.device != "cpu":
                warm_up(runtime)
            self._runtime = runtime
        except BaseException as error:  # handed to the caller's thread by result()
            self._error = error

    def result(self) -> Loaded:
        """The loaded runtime, once loading is over; what loading raised, raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._runtime is not None  # set whenever no error was
        return self._runtime


def start(load: Callable[[], Loaded], device: str, *, gpu_only: bool = True
          ) -> Background | None:
    """A :class:`Background` load, or None where it would not pay (see the module's
    docstring; ``gpu_only=False`` starts one anyway)."""
    if gpu_only and not gpu_possible(device):
        return None
    return Background(load)


__all__ = ["Background", "gpu_possible", "start", "warm_up"]
