"""Tiled inference: extract cubes, run them in batches, blend the predictions back.

Three stages overlap in threads when there is more than one batch: a producer extracts the
next batch into one of a few preallocated ``(B, 1, c, c, c)`` buffers, the calling thread runs
the network, and an accumulator thread adds the predictions into the float32 sums. The numba
kernels and ONNX Runtime both release the GIL, so the device is kept fed while the host works.
Accumulation happens in cube order in a single thread, so results are bitwise reproducible
and independent of the batch size.

Memory: the padded input and the accumulator (two float32 volumes of the padded shape) plus a
few batches; the sum of the blending windows is not stored but computed from the grid of cubes
that ran when the sums are divided. :func:`overlap_add_augmented` adds one more volume (the
blended variance). An adaptive scheme (``target_cc``) adds the squared predictions and the
cube counts on every :data:`SAMPLE_STEP`-th voxel (1/8 and 1/32 of a volume).

Adaptive refinement (the default scheme): after its cubes have run, the CC of the output to
the reference tiling's output is predicted (:func:`predicted_cc`) from how the predictions of
overlapping cubes disagree; while the prediction is below the scheme's ``target_cc``, one
lattice position is added along the axis with the widest gap between cubes
(:func:`demhx.tiling.refine_plan`) and only the new cubes run. Maps on which the network's
prediction hardly depends on the cube's context stop at the first level; maps on which it does
get more of the reference's cubes.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from demhx import _kernels
from demhx.augment import Rotation, predict_augmented
from demhx.tiling import TilingPlan, crop, refine_plan

Predict = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]
Evaluate = Callable[[np.ndarray], Any]  # cubes -> predictions, or (mean, variance)
_BUFFERS = 3
_STOP = None
SAMPLE_STEP = 2  # voxels between the samples of the refinement estimate, per axis
_SLAB = 8  # planes of the sampled grid per step of predicted_cc


@dataclass(frozen=True)
class TileCounts:
    """How many cubes a run had, ran and skipped as solvent; ``added``: how many of those it
    had were added by an adaptive plan's refinement."""

    total: int
    run: int
    skipped: int
    added: int = 0


def select_cubes(padded: np.ndarray, plan: TilingPlan, skip_below: float | None) -> np.ndarray:
    """Corners of the cubes to run: those whose largest ``|value|`` reaches ``skip_below``.

    ``skip_below`` is in the padded volume's units; ``None`` keeps every cube.
    """
    return _select(padded, plan.corners, plan.cube_size, skip_below)


def _select(padded: np.ndarray, corners: np.ndarray, cube_size: int,
            skip_below: float | None) -> np.ndarray:
    if skip_below is None:
        return corners
    maxima = np.empty(corners.shape[0], dtype=np.float32)
    _kernels.cube_abs_max(padded, corners, cube_size, maxima)
    return np.ascontiguousarray(corners[maxima >= skip_below])


def predicted_cc(sums: np.ndarray, squares: np.ndarray, counts: np.ndarray,
                 background: float = 0.0) -> float:
    """Predicted CC of a uniform blend to the reference tiling's blend, from its own cubes.

    Parameters (on a grid of sampled voxels of the box, all the same shape)
    ----------
    sums : sum of the predictions of the cubes covering each voxel.
    squares : sum of their squares.
    counts : number of those cubes (0: not covered, the output is ``background``).

    Where ``k >= 2`` cubes overlap, their sample variance measures how much one cube's
    prediction strays with its context; relative to the squared output there, it gives
    ``rel``. Each voxel's output (a mean of ``k``) is then expected to stray from the mean over
    all of the reference's cubes by ``rel * output² / k``, and the CC is
    ``1 / sqrt(1 + mean error / variance of the output)``. Returns 1 where nothing can be
    estimated (no overlaps, or no signal).

    Measured against the true CC on the model grid, refining one step at a time
    (``bench/refinement_study.py``, model ``tight``, cached reference predictions), predicted
    / true: EMD-6824 0.966 / 0.969, 0.973 / 0.976, 0.984 / 0.977, 0.987 / 0.982, 0.991 /
    0.987, 0.992 / 0.989, 0.994 / 0.993 at 64, 80, 96, 120, 144, 180, 216 cubes; EMD-5168
    0.985 / 0.994, 0.989 / 0.994, 0.994 / 0.995 at 64, 80, 100 cubes; the 256³ map of
    ``bench/speed.py`` 0.996 / 0.999 at 88. Within 0.01: pessimistic where the network is
    stable, up to 0.007 optimistic on EMD-6824 — hence the default's target of 0.993 for the
    0.99 bar.
    """
    # One pass over slabs (a few MB of float64 at a time): sums over the overlaps of the
    # variance and of the squared output, over the covered voxels of output² / k, and over
    # all voxels of the output and its square.
    totals = np.zeros(5)
    for start in range(0, counts.shape[0], _SLAB):
        part = slice(start, start + _SLAB)
        count = counts[part].astype(np.float64)
        covered, multi = count >= 1, count >= 2
        mean = np.where(covered, sums[part] / np.maximum(count, 1), background)
        square = mean * mean
        variance = np.maximum(squares[part] - count * square, 0) / np.maximum(count - 1, 1)
        totals += (variance[multi].sum(), square[multi].sum(),
                   (square[covered] / count[covered]).sum(), mean.sum(), square.sum())
    overlap_variance, overlap_power, per_cube, total, power = totals
    size = counts.size
    spread = power / size - (total / size) ** 2
    if overlap_power <= 0 or spread <= 0:
        return 1.0
    error = overlap_variance / overlap_power * per_cube / size
    return 1.0 / float(np.sqrt(1.0 + error / spread))


def overlap_add(padded: np.ndarray, plan: TilingPlan, predict: Predict, batch_size: int, *,
                background: float = 0.0, skip_below: float | None = None,
                progress: Progress | None = None) -> tuple[np.ndarray, TileCounts]:
    """Run ``predict`` over the cubes of ``plan`` and blend the predictions.

    Skipped (solvent) cubes contribute nothing: a voxel gets the blend of the run cubes that
    cover it, and the background only where no run cube does. Measured against blending
    skipped cubes in as background: with a local "sharpen and mask" network (solvent to 0)
    both keep CC 0.9975 to the reference tiling on emd_5168 at 5 σ, and where the network's
    output in solvent-looking cubes is not background, leaving them out is closer to the
    reference (0.9970 vs 0.9944).

    Parameters
    ----------
    padded : (Z, Y, X) float32, C-contiguous, ``plan.padded_shape``
        The normalised, padded input (see :func:`demhx.tiling.pad_volume`).
    plan : the tiling.
    predict : maps a ``(b, 1, c, c, c)`` float32 batch to predictions of the same shape.
    batch_size : cubes per call of ``predict`` (>= 1).
    background : output value of voxels that no run cube covers (skipped solvent).
    skip_below : skip cubes whose largest ``|value|`` is below this (padded-volume units).
    progress : called as ``progress(done, total)`` with cube counts, in the calling thread.

    Returns
    -------
    output : (z, y, x) float32 of ``plan.shape``, the blended predictions.
    counts : cubes in the plan, run and skipped.
    """
    evaluate = functools.partial(_predict_checked, predict)
    return _blend(padded, plan, evaluate, batch_size, background, skip_below, progress, None)


def overlap_add_augmented(padded: np.ndarray, plan: TilingPlan, predict: Predict,
                          batch_size: int, rotations: Sequence[Rotation], *,
                          background: float = 0.0, skip_below: float | None = None,
                          progress: Progress | None = None
                          ) -> tuple[np.ndarray, np.ndarray, TileCounts]:
    """:func:`overlap_add` with test-time augmentation: each cube is run once per rotation.

    Every run cube is predicted in each of ``rotations`` (turned, predicted, turned back, see
    :func:`demhx.augment.predict_augmented`); the mean over the rotations is blended as the
    plain prediction is, and the variance over the rotations is blended with the same window.
    Rotated copies of one or more cubes share calls of ``predict`` (``batch_size`` copies each).

    Returns
    -------
    mean : (z, y, x) float32 of ``plan.shape``: the blended mean over rotations, equal to the
        mean of the maps :func:`overlap_add` would give for each rotation (up to rounding;
        an adaptive plan is refined once, from the mean over rotations, for all of them).
    spread : (z, y, x) float32: square root of the blended per-cube variance over rotations,
        in the units of the predictions; 0 where no run cube covers a voxel (skipped solvent).
    counts : cubes in the plan, run and skipped (cubes, not network evaluations).

    ``progress`` is called with network evaluations (cubes × rotations).
    """
    rotations = tuple(rotations)
    evaluations = len(rotations)

    def evaluate(cubes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict_augmented(functools.partial(_predict_checked, predict), cubes, rotations,
                                 batch_size)

    scaled = None if progress is None else functools.partial(_scaled, progress, evaluations)
    cubes_per_batch = max(1, batch_size // evaluations)
    spread = np.zeros(plan.padded_shape, dtype=np.float32)
    mean, counts = _blend(padded, plan, evaluate, cubes_per_batch, background, skip_below,
                          scaled, spread)
    return mean, np.ascontiguousarray(crop(spread, plan)), counts


def _scaled(progress: Progress, factor: int, done: int, total: int) -> None:
    progress(done * factor, total * factor)


def _blend(padded: np.ndarray, plan: TilingPlan, evaluate: Evaluate, batch_size: int,
           background: float, skip_below: float | None, progress: Progress | None,
           spread: np.ndarray | None) -> tuple[np.ndarray, TileCounts]:
    """Select, run and blend the cubes (refining an adaptive plan); the output and the counts.

    With ``spread`` (zeros of ``plan.padded_shape``), ``evaluate`` returns ``(mean,
    variance)`` per batch and ``spread`` receives the square root of the blended variance.
    """
    padded = np.ascontiguousarray(padded, dtype=np.float32)
    accumulator = np.zeros(plan.padded_shape, dtype=np.float32)
    sampled = None if plan.scheme.target_cc is None else _Sampled.for_plan(plan)
    sums = _Sums(plan.weights, accumulator, spread, sampled)
    # Choose the cubes worth running, run them and sum the weighted predictions; then, for
    # an adaptive plan, add lattice positions while the predicted CC falls short.
    first_count = plan.cube_count
    corners = select_cubes(padded, plan, skip_below)
    _run_batches(padded, corners, plan.cube_size, evaluate, batch_size, sums, progress)
    while sampled is not None and sampled.short_of_target(accumulator, plan, background):
        finer = refine_plan(plan)
        if finer is None:
            break
        new = _select(padded, _new_corners(plan, finer), plan.cube_size, skip_below)
        done = int(corners.shape[0])
        plan, corners = finer, np.concatenate([corners, new])
        _run_batches(padded, new, plan.cube_size, evaluate, batch_size, sums,
                     _offset(progress, done))
    del padded
    counts = TileCounts(plan.cube_count, int(corners.shape[0]),
                        plan.cube_count - int(corners.shape[0]), plan.cube_count - first_count)
    # Divide by the sum of the windows of the cubes that ran (computed from the grid of run
    # cubes, not stored); voxels no run cube covers get the background (spread 0).
    ran = np.zeros(plan.grid_shape, dtype=np.uint8)
    step = plan.scheme.step
    ran[corners[:, 0] // step, corners[:, 1] // step, corners[:, 2] // step] = 1
    _kernels.divide_by_window_sum(accumulator, ran, step, plan.weights, background)
    if spread is not None:
        _kernels.divide_by_window_sum(spread, ran, step, plan.weights, 0.0)
        np.sqrt(spread, out=spread)
    return np.ascontiguousarray(crop(accumulator, plan)), counts


def _new_corners(plan: TilingPlan, finer: TilingPlan) -> np.ndarray:
    """Corners of ``finer`` that ``plan`` does not have, in ``finer``'s order."""
    old = {tuple(corner) for corner in plan.corners.tolist()}
    keep = [i for i, corner in enumerate(finer.corners.tolist()) if tuple(corner) not in old]
    return np.ascontiguousarray(finer.corners[keep])


def _offset(progress: Progress | None, done: int) -> Progress | None:
    """``progress`` for a pass that starts after ``done`` cubes have run: it reports the
    cubes run so far out of those run so far plus this pass's."""
    if progress is None:
        return None
    return lambda finished, total: progress(done + finished, done + total)


@dataclass(frozen=True)
class _Sampled:
    """Squared predictions and cube counts on every :data:`SAMPLE_STEP`-th padded voxel."""

    squares: np.ndarray
    counts: np.ndarray

    @classmethod
    def for_plan(cls, plan: TilingPlan) -> _Sampled:
        shape = tuple(-(-n // SAMPLE_STEP) for n in plan.padded_shape)
        return cls(np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.uint8))

    def add(self, predictions: np.ndarray, corners: np.ndarray, first: int, count: int) -> None:
        _kernels.accumulate_sampled_squares(predictions, corners, first, count, SAMPLE_STEP,
                                            self.squares, self.counts)

    def short_of_target(self, accumulator: np.ndarray, plan: TilingPlan, background: float
                        ) -> bool:
        """Whether the blend so far is predicted below the scheme's ``target_cc`` (never for a
        scheme without one)."""
        target = plan.scheme.target_cc
        return target is not None and self.predicted_cc(accumulator, plan, background) < target

    def predicted_cc(self, accumulator: np.ndarray, plan: TilingPlan, background: float
                     ) -> float:
        """:func:`predicted_cc` of the blend so far, on the sampled voxels inside the box."""
        box = tuple(slice(-(-start // SAMPLE_STEP), -(-(start + n) // SAMPLE_STEP))
                    for start, n in zip(plan.offset, plan.shape, strict=True))
        first = tuple(b.start * SAMPLE_STEP for b in box)
        sums = accumulator[first[0]::SAMPLE_STEP, first[1]::SAMPLE_STEP, first[2]::SAMPLE_STEP]
        shape = self.counts[box].shape
        return predicted_cc(sums[:shape[0], :shape[1], :shape[2]], self.squares[box],
                            self.counts[box], background)


@dataclass(frozen=True)
class _Sums:
    weights: np.ndarray
    accumulator: np.ndarray
    variance: np.ndarray | None = None
    sampled: _Sampled | None = None

    def add(self, predictions: Any, corners: np.ndarray, first: int, count: int) -> None:
        """Add a batch: predictions, or ``(mean, variance)`` when a variance is blended."""
        if self.variance is None:
            mean = predictions
        else:
            mean, variance = predictions
            _kernels.accumulate_weighted(variance, corners, first, count, self.weights,
                                         self.variance)
        _kernels.accumulate_weighted(mean, corners, first, count, self.weights,
                                     self.accumulator)
        if self.sampled is not None:
            self.sampled.add(mean, corners, first, count)


def _batches(total: int, batch_size: int) -> list[tuple[int, int]]:
    return [(first, min(batch_size, total - first)) for first in range(0, total, batch_size)]


def _predict_checked(predict: Predict, batch: np.ndarray) -> np.ndarray:
    """Run ``predict`` and return a float32 C-contiguous result that does not alias ``batch``."""
    result = predict(batch)
    if getattr(result, "shape", None) != batch.shape:
        raise RuntimeError(f"the model returned shape {getattr(result, 'shape', None)} for "
                           f"input {batch.shape}; a demhx model must keep the input shape")
    if np.may_share_memory(result, batch):
        result = np.array(result, dtype=np.float32)
    return np.ascontiguousarray(result, dtype=np.float32)


def _run_batches(padded: np.ndarray, corners: np.ndarray, cube_size: int, evaluate: Evaluate,
                 batch_size: int, sums: _Sums, progress: Progress | None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be a positive integer")
    batches = _batches(int(corners.shape[0]), batch_size)
    total = int(corners.shape[0])
    if progress is not None:
        progress(0, total)
    if len(batches) <= 1:
        _run_serial(padded, corners, cube_size, evaluate, batches, sums, progress, total)
    else:
        _Pipeline(padded, corners, cube_size, batch_size, sums).run(evaluate, batches, progress,
                                                                   total)


def _run_serial(padded: np.ndarray, corners: np.ndarray, cube_size: int, evaluate: Evaluate,
                batches: list[tuple[int, int]], sums: _Sums, progress: Progress | None,
                total: int) -> None:
    for first, count in batches:
        batch = np.empty((count, 1, cube_size, cube_size, cube_size), dtype=np.float32)
        _kernels.extract_cubes(padded, corners, first, count, batch)
        sums.add(evaluate(batch), corners, first, count)
        if progress is not None:
            progress(first + count, total)


class _Pipeline:
    """Producer (extract) → caller (predict) → accumulator threads, with error propagation."""

    def __init__(self, padded: np.ndarray, corners: np.ndarray, cube_size: int,
                 batch_size: int, sums: _Sums) -> None:
        self.padded, self.corners, self.sums = padded, corners, sums
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
                self.free.put(buffer)
                self.done.put((first, count, predictions))
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
            if self.errors:
                continue
            first, count, predictions = item
            try:
                self.sums.add(predictions, self.corners, first, count)
            except BaseException as error:  # handed to the calling thread
                self.errors.append(error)

    def _raise_error(self) -> None:
        if self.errors:
            raise self.errors[0]

    def _shut_down(self, producer: threading.Thread, consumer: threading.Thread) -> None:
        self.stop.set()
        self.free.put(None)  # wakes a producer waiting for a buffer
        self.done.put(_STOP)
        producer.join()
        consumer.join()
