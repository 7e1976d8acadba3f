"""Tiled inference: extract cubes, run them in batches, blend the predictions back.

:func:`overlap_add` selects the cubes worth running (solvent cubes are skipped), runs them in
batches (:mod:`demhx._prefetch` overlaps extraction, the network and accumulation), sums the
window-weighted predictions and divides by the windows' sum; an adaptive scheme (the default)
is refined by its self-check (:mod:`demhx.refine`). :func:`overlap_add_augmented` does the same
with test-time augmentation and also blends the variance over the rotations.

Memory: the padded input and the accumulator (two float32 volumes of the padded shape) plus a
few batches; the sum of the blending windows is not stored but computed from the grid of cubes
that ran when the sums are divided. :func:`overlap_add_augmented` adds one more volume (the
blended variance); the self-check adds 1/8 and 1/16 of a volume.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import _kernels
from demhx._prefetch import Evaluate, Predictions, run_batches
from demhx.augment import Rotation, predict_augmented
from demhx.refine import SampledSums, new_corners
from demhx.tiling import TilingPlan, crop, refine_plan

__all__ = ["overlap_add", "overlap_add_augmented", "Predict", "Progress", "select_cubes",
           "TileCounts"]

Predict = Callable[[NDArray[np.float32]], NDArray[np.float32]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TileCounts:
    """How many cubes a run had, ran and skipped as solvent; ``added``: how many of those it
    had were added by an adaptive plan's refinement."""

    total: int
    run: int
    skipped: int
    added: int = 0


def select_cubes(padded: NDArray[Any], plan: TilingPlan, skip_below: float | None) -> NDArray[Any]:
    """Corners of the cubes to run: those whose largest ``|value|`` reaches ``skip_below``.

    ``skip_below`` is in the padded volume's units; ``None`` keeps every cube.
    """
    return _select(padded, plan.corners, plan.cube_size, skip_below)


def _select(padded: NDArray[Any], corners: NDArray[Any], cube_size: int,
            skip_below: float | None) -> NDArray[Any]:
    if skip_below is None:
        return corners
    maxima = np.empty(corners.shape[0], dtype=np.float32)
    _kernels.cube_abs_max(padded, corners, cube_size, maxima)
    return np.ascontiguousarray(corners[maxima >= skip_below])


def overlap_add(padded: NDArray[Any], plan: TilingPlan, predict: Predict, batch_size: int, *,
                background: float = 0.0, skip_below: float | None = None,
                progress: Progress | None = None) -> tuple[NDArray[Any], TileCounts]:
    """Run ``predict`` over the cubes of ``plan`` and blend the predictions.

    Skipped (solvent) cubes contribute nothing: a voxel gets the blend of the run cubes that
    cover it, and the background only where no run cube does: where the network's output in
    solvent-looking cubes is not background, leaving them out is closer to the reference
    than blending them in as background (``bench/RESULTS.md``).

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
    return _run_and_blend(padded, plan, evaluate, batch_size, background, skip_below,
                          progress, None)


def overlap_add_augmented(padded: NDArray[Any], plan: TilingPlan, predict: Predict,
                          batch_size: int, rotations: Sequence[Rotation], *,
                          background: float = 0.0, skip_below: float | None = None,
                          progress: Progress | None = None
                          ) -> tuple[NDArray[Any], NDArray[Any], TileCounts]:
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

    def evaluate(cubes: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        return predict_augmented(functools.partial(_predict_checked, predict), cubes, rotations,
                                 batch_size)

    scaled = None if progress is None else functools.partial(_scaled, progress, evaluations)
    cubes_per_batch = max(1, batch_size // evaluations)
    spread = np.zeros(plan.padded_shape, dtype=np.float32)
    mean, counts = _run_and_blend(padded, plan, evaluate, cubes_per_batch, background,
                                  skip_below, scaled, spread)
    return mean, np.ascontiguousarray(crop(spread, plan)), counts


def _scaled(progress: Progress, factor: int, done: int, total: int) -> None:
    progress(done * factor, total * factor)


def _run_and_blend(padded: NDArray[Any], plan: TilingPlan, evaluate: Evaluate,
                   batch_size: int, background: float, skip_below: float | None,
                   progress: Progress | None, spread: NDArray[Any] | None
                   ) -> tuple[NDArray[Any], TileCounts]:
    """Select, run and blend the cubes (refining an adaptive plan); the output and the counts.

    With ``spread`` (zeros of ``plan.padded_shape``), ``evaluate`` returns ``(mean,
    variance)`` per batch and ``spread`` receives the square root of the blended variance.
    """
    padded = np.ascontiguousarray(padded, dtype=np.float32)
    accumulator = np.zeros(plan.padded_shape, dtype=np.float32)
    sampled = None if plan.scheme.target_cc is None else SampledSums.for_plan(plan)
    sums = _Sums(plan.weights, accumulator, spread, sampled)
    # Choose the cubes worth running, run them and sum the weighted predictions; then, for
    # an adaptive plan, add lattice positions while the predicted CC falls short.
    first_count = plan.cube_count
    corners = select_cubes(padded, plan, skip_below)
    run_batches(padded, corners, plan.cube_size, evaluate, batch_size, sums.add, progress)
    while sampled is not None and sampled.short_of_target(accumulator, plan, background):
        finer = refine_plan(plan)
        if finer is None:
            break
        new = _select(padded, new_corners(plan, finer), plan.cube_size, skip_below)
        done = int(corners.shape[0])
        plan, corners = finer, np.concatenate([corners, new])
        run_batches(padded, new, plan.cube_size, evaluate, batch_size, sums.add,
                    _offset(progress, done))
    del padded
    counts = TileCounts(plan.cube_count, int(corners.shape[0]),
                        plan.cube_count - int(corners.shape[0]), plan.cube_count - first_count)
    # Divide by the sum of the windows of the cubes that ran (computed from the grid of run
    # cubes, not stored); voxels no run cube covers get the background (spread 0).
    ran = np.zeros(plan.grid_shape, dtype=np.uint8)
    step = plan.scheme.step
    ran[corners[:, 0] // step, corners[:, 1] // step, corners[:, 2] // step] = 1
    if spread is not None:
        _kernels.divide_by_window_sum(spread, ran, step, plan.weights, 0.0)
        np.sqrt(spread, out=spread)
    if plan.shape == plan.padded_shape:  # no padding: divided in place
        _kernels.divide_by_window_sum(accumulator, ran, step, plan.weights, background)
        return accumulator, counts
    output = np.empty(plan.shape, dtype=np.float32)  # the box only, divided into its copy
    _kernels.divide_into(accumulator, ran, step, plan.weights, background, *plan.offset, output)
    return output, counts


def _offset(progress: Progress | None, done: int) -> Progress | None:
    """``progress`` for a pass that starts after ``done`` cubes have run: it reports the
    cubes run so far out of those run so far plus this pass's."""
    if progress is None:
        return None
    return lambda finished, total: progress(done + finished, done + total)


@dataclass(frozen=True)
class _Sums:
    weights: NDArray[Any]
    accumulator: NDArray[Any]
    variance: NDArray[Any] | None = None
    sampled: SampledSums | None = None

    def add(self, predictions: Predictions, corners: NDArray[Any], first: int, count: int
            ) -> None:
        """Add a batch: predictions, or ``(mean, variance)`` when a variance is blended."""
        if isinstance(predictions, tuple):
            mean, variance = predictions
            if self.variance is None:
                raise TypeError("a (mean, variance) batch without a variance to blend into")
            _kernels.accumulate_weighted(variance, corners, first, count, self.weights,
                                         self.variance)
        else:
            mean = predictions
        if self.sampled is None:
            _kernels.accumulate_weighted(mean, corners, first, count, self.weights,
                                         self.accumulator)
        else:
            self.sampled.add_blended(mean, corners, first, count, self.weights,
                                     self.accumulator)


def _predict_checked(predict: Predict, batch: NDArray[Any]) -> NDArray[Any]:
    """Run ``predict`` and return a float32 C-contiguous result that does not alias ``batch``."""
    result = predict(batch)
    if getattr(result, "shape", None) != batch.shape:
        raise RuntimeError(f"the model returned shape {getattr(result, 'shape', None)} for "
                           f"input {batch.shape}; a demhx model must keep the input shape")
    if np.may_share_memory(result, batch):
        result = np.array(result, dtype=np.float32)
    return np.ascontiguousarray(result, dtype=np.float32)


