"""Running batches of cubes with the host work overlapped: extraction, network, accumulation.

Three stages overlap in threads when there is more than one batch: a producer extracts the
next batch into one of a few preallocated ``(B, 1, c, c, c)`` buffers, the calling thread runs
the network, and an accumulator thread adds the predictions into the sums. The numba kernels
and ONNX Runtime both release the GIL, so the device is kept fed while the host works.
Accumulation happens in cube order in a single thread, so results are bitwise reproducible
and independent of the batch size.

A buffer goes back to the pool only once its batch's predictions have been added: a network
that writes its predictions into the batch it is given, or returns a view of it, is summed
before the buffer is filled with the next cubes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import _kernels

Progress = Callable[[int, int], None]
Predictions = NDArray[np.float32] | tuple[NDArray[np.float32], NDArray[np.float32]]
"""A batch's predictions, or their ``(mean, variance)`` over rotations."""
Evaluate = Callable[[NDArray[np.float32]], Predictions]  # cubes -> predictions
# add(predictions, corners, first, count): sum one batch's predictions into the output
Add = Callable[[Predictions, NDArray[np.int64], int, int], None]
_BUFFERS = 3
_STOP = None


def _batches(total: int, batch_size: int) -> list[tuple[int, int]]:
    return [(first, min(batch_size, total - first)) for first in range(0, total, batch_size)]


def run_batches(padded: NDArray[Any], corners: NDArray[Any], cube_size: int, evaluate: Evaluate,
                batch_size: int, add: Add, progress: Progress | None) -> None:
    """Run the cubes at ``corners`` through ``evaluate`` in batches; ``add`` sums each."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be a positive integer")
    batches = _batches(int(corners.shape[0]), batch_size)
    total = int(corners.shape[0])
    if progress is not None:
        progress(0, total)
    if len(batches) <= 1:
        _run_serial(padded, corners, cube_size, evaluate, batches, add, progress, total)
    else:
        _Threads(padded, corners, cube_size, batch_size, add).run(evaluate, batches, progress,
                                                                   total)


def _run_serial(padded: NDArray[Any], corners: NDArray[Any], cube_size: int, evaluate: Evaluate,
                batches: list[tuple[int, int]], add: Add, progress: Progress | None,
                total: int) -> None:
    for first, count in batches:
        batch = np.empty((count, 1, cube_size, cube_size, cube_size), dtype=np.float32)
        _kernels.extract_cubes(padded, corners, first, count, batch)
        add(evaluate(batch), corners, first, count)
        if progress is not None:
            progress(first + count, total)


class _Threads:
    """Producer (extract) → caller (predict) → accumulator threads, with error propagation."""

    def __init__(self, padded: NDArray[Any], corners: NDArray[Any], cube_size: int,
                 batch_size: int, add: Add) -> None:
        self.padded, self.corners, self.add = padded, corners, add
        self.free: queue.Queue = queue.Queue()
        for _ in range(_BUFFERS):
            self.free.put(np.empty((batch_size, 1) + (cube_size,) * 3, dtype=np.float32))
        self.ready: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue(maxsize=_BUFFERS)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def run(self, evaluate: Evaluate, batches: list[tuple[int, int]],
            progress: Progress | None, total: int) -> None:
        producer = threading.Thread(target=self._produce, args=(batches,), daemon=True)
        consumer = threading.Thread(target=self._consume, daemon=True)
        producer.start()
        consumer.start()
        try:
            for _ in batches:
                item = self.ready.get()
                if item is _STOP:
                    break
                first, count, buffer = item
                predictions = evaluate(buffer[:count])
                self.done.put((first, count, predictions, buffer))  # the buffer goes with them
                if progress is not None:
                    progress(first + count, total)
                self._raise_error()
        finally:
            self._shut_down(producer, consumer)
        self._raise_error()

    def _produce(self, batches: list[tuple[int, int]]) -> None:
        try:
            for first, count in batches:
                buffer = self.free.get()
                if self.stop.is_set():
                    return
                _kernels.extract_cubes(self.padded, self.corners, first, count, buffer)
                self.ready.put((first, count, buffer))
        except BaseException as error:  # handed to the calling thread
            self.errors.append(error)
            self.ready.put(_STOP)

    def _consume(self) -> None:
        while True:
            item = self.done.get()
            if item is _STOP:
                return
            first, count, predictions, buffer = item
            if not self.errors:
                try:
                    self.add(predictions, self.corners, first, count)
                except BaseException as error:  # handed to the calling thread
                    self.errors.append(error)
            self.free.put(buffer)

    def _raise_error(self) -> None:
        if self.errors:
            raise self.errors[0]

    def _shut_down(self, producer: threading.Thread, consumer: threading.Thread) -> None:
        self.stop.set()
        self.free.put(None)  # wakes a producer waiting for a buffer
        self.done.put(_STOP)
        producer.join()
        consumer.join()
