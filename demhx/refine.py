"""The default tiling's self-check: how close is a blend to the reference tiling's?

After the default scheme's cubes have run, the CC of the output to the reference tiling's
output is predicted (:func:`predicted_cc`) from how the predictions of overlapping cubes
disagree; while the prediction is below the scheme's ``target_cc``, one lattice position is
added along the axis with the widest gap between cubes (:func:`demhx.tiling.refine_plan`) and
only the new cubes run (:mod:`demhx.blend` drives the loop). Maps on which the network's
prediction hardly depends on the cube's context stop at the first level; maps on which it
does get more of the reference's cubes.

Memory: the squared predictions and the cube counts on every :data:`SAMPLE_STEP`-th voxel
(1/8 and 1/16 of a float32 volume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import _kernels
from demhx.tiling import TilingPlan

__all__ = ["COUNT_DTYPE", "MAX_COVERING", "most_covering", "new_corners", "predicted_cc",
           "SAMPLE_STEP", "SampledSums"]

SAMPLE_STEP = 2  # voxels between the samples of the refinement estimate, per axis
COUNT_DTYPE = np.uint16
"""Type of the cube counts: 2 bytes per sampled voxel, up to 65535 cubes over one voxel
(DeepEMhancer's 64³ cubes on its 16-voxel lattice: at most 64)."""
MAX_COVERING = int(np.iinfo(COUNT_DTYPE).max)


def predicted_cc(sums: NDArray[Any], squares: NDArray[Any], counts: NDArray[Any],
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

    Measured against the true CC (``bench/refinement_study.py``; ``bench/RESULTS.md``, "Input
    range and the self-checking default"): within 0.01 of it, pessimistic where the network
    is stable and slightly optimistic where single cubes stray, hence a target a little above
    the bar it serves.
    """
    # One pass: sums over the overlaps of the variance and of the squared output, over the
    # covered voxels of output² / k, and over all voxels of the output and its square.
    totals = np.zeros(5)
    if np.ndim(counts) != 3:
        sums, squares, counts = (np.reshape(a, (1, 1, -1)) for a in (sums, squares, counts))
    _kernels.overlap_sums(sums, squares, counts, float(background), totals)
    overlap_variance, overlap_power, per_cube, total, power = totals
    size = counts.size
    spread = power / size - (total / size) ** 2
    if overlap_power <= 0 or spread <= 0:
        return 1.0
    error = overlap_variance / overlap_power * per_cube / size
    return 1.0 / float(np.sqrt(1.0 + error / spread))


@dataclass(frozen=True)
class SampledSums:
    """Squared predictions and cube counts on every :data:`SAMPLE_STEP`-th padded voxel."""

    squares: NDArray[Any]
    counts: NDArray[Any]

    @classmethod
    def for_plan(cls, plan: TilingPlan) -> SampledSums:
        """Zeroed sums for ``plan``; ValueError when its lattice lets more cubes cover one
        voxel than the counts hold (:data:`MAX_COVERING`), naming the lattice that fits."""
        covering = most_covering(plan)
        if covering > MAX_COVERING:
            finest = -(-plan.cube_size // int(MAX_COVERING ** (1 / 3)))
            raise ValueError(
                f"tiling {plan.scheme.name!r}: its self-check counts at most {MAX_COVERING} "
                f"cubes over a voxel, but {plan.cube_size}³ cubes on a {plan.scheme.step}-voxel "
                f"lattice can put {covering} over one; use a lattice of at least {finest} "
                "voxels, or no target CC")
        shape = tuple(-(-n // SAMPLE_STEP) for n in plan.padded_shape)
        return cls(np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=COUNT_DTYPE))

    def add_blended(self, predictions: NDArray[Any], corners: NDArray[Any], first: int,
                    count: int, weights: NDArray[Any], accumulator: NDArray[Any]) -> None:
        """Add a batch's squared predictions and cube counts on the sampled voxels, and its
        window-weighted predictions into ``accumulator``, in one pass
        (:func:`demhx._kernels.accumulate_blend`)."""
        _kernels.accumulate_blend(predictions, corners, first, count, weights, accumulator,
                                  SAMPLE_STEP, self.squares, self.counts)

    def short_of_target(self, accumulator: NDArray[Any], plan: TilingPlan, background: float
                        ) -> bool:
        """Whether the blend so far is predicted below the scheme's ``target_cc`` (never for a
        scheme without one)."""
        target = plan.scheme.target_cc
        return target is not None and self.predicted_cc(accumulator, plan, background) < target

    def predicted_cc(self, accumulator: NDArray[Any], plan: TilingPlan, background: float
                     ) -> float:
        """:func:`predicted_cc` of the blend so far, on the sampled voxels inside the box."""
        box = tuple(slice(-(-start // SAMPLE_STEP), -(-(start + n) // SAMPLE_STEP))
                    for start, n in zip(plan.offset, plan.shape, strict=True))
        first = tuple(b.start * SAMPLE_STEP for b in box)
        sums = accumulator[first[0]::SAMPLE_STEP, first[1]::SAMPLE_STEP, first[2]::SAMPLE_STEP]
        shape = self.counts[box].shape
        return predicted_cc(sums[:shape[0], :shape[1], :shape[2]], self.squares[box],
                            self.counts[box], background)


def most_covering(plan: TilingPlan) -> int:
    """The most cubes that can cover one voxel once ``plan`` is refined to every lattice
    position: per axis, the lattice positions within one cube edge of a voxel."""
    step = plan.scheme.step
    per_axis = [min(points, -(-plan.cube_size // step)) for points in plan.grid_shape]
    return int(np.prod(per_axis, dtype=np.int64))


def new_corners(plan: TilingPlan, finer: TilingPlan) -> NDArray[Any]:
    """Corners of ``finer`` that ``plan`` does not have, in ``finer``'s order."""
    old = {tuple(corner) for corner in plan.corners.tolist()}
    keep = [i for i, corner in enumerate(finer.corners.tolist()) if tuple(corner) not in old]
    return np.ascontiguousarray(finer.corners[keep])


