"""Test-time augmentation: the proper rotations of a cube grid, and predictions averaged over them.

A cube of the grid can be turned in 24 ways that map voxels onto voxels and keep handedness
(proteins are chiral, so reflections are excluded): the axis permutations combined with axis
flips whose determinant is +1. The network was trained on all 24 (``demhx_export.sampler``).
A :class:`Rotation` acts on the last three axes of an array as "transpose by ``permutation``,
then reverse the axes marked in ``flips``"; :attr:`Rotation.inverse` undoes it exactly.

Test-time augmentation runs the network on rotated copies of each cube, turns every prediction
back, and keeps their mean and their variance (:func:`predict_augmented`). The subsets offered
(:data:`SUBSETS`) are subgroups of the 24, each holding the identity:

==  ==========================================================================================
 3  the identity and the two 120° turns about a body diagonal: each axis of the map passes
    along each axis of the network once
 4  the identity and the 180° turns about the three axes: every axis reversed, none swapped
 6  the 3 above plus the three 180° turns about face diagonals: all six axis orders, once each
12  all axis orders that are cyclic, each with 0 or 2 reversed axes (the tetrahedral group)
24  all proper rotations of the cube (the octahedral group)
==  ==========================================================================================

The spread that the pipeline reports (``--confidence``) is the per-voxel standard deviation over
the rotations of each cube's prediction, blended with the tiling window like the predictions.
Chosen by measurement (model ``tight`` 0.1, two synthetic test-split maps at 5.3 and
2.7 Å, 100³, every cube run in all 24 rotations; Spearman rank correlation with
|output - target| inside the molecule mask, first / second map):

============================================================  ===============  ===============
spread definition                                             6 rotations      24 rotations
============================================================  ===============  ===============
std over rotations per cube, blended (shipped)                0.133 / 0.566    0.153 / 0.617
std over rotations of the blended maps (N volumes of memory)  0.139 / 0.547    0.155 / 0.612
per-cube second moment, blended (adds tiling disagreement)    0.100 / 0.580    0.106 / 0.610
shipped std / (|mean| + 10 % of the mask's mean |mean|)       -0.198 / -0.336  -0.206 / -0.341
|output| itself, for comparison                               0.246 / 0.539    0.245 / 0.538
============================================================  ===============  ===============

The shipped spread is as good as the spread of the per-rotation maps, which would need N
volumes of memory, and over the whole box it ranks with the error better than the second
moment (Spearman 0.148 / 0.331 vs 0.128 / 0.205 at 6 rotations). With 3, 4, 6, 12 and 24
rotations it gave 0.131, 0.136, 0.133, 0.142, 0.153 on the first map and 0.504, 0.536, 0.566,
0.605, 0.617 on the second; the mean's CC to the target inside the mask went from 0.9372
(plain) to 0.9385, 0.9396, 0.9396, 0.9398, 0.9399, and from 0.9575 to 0.9587, 0.9585,
0.9588, 0.9590, 0.9591. Six rotations (every axis order once) are the default: most of the
gain for a quarter of the cost of 24.

All functions are pure and work on arrays; none knows about models or files.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DEFAULT_COUNT", "Predict", "predict_augmented", "Rotation", "rotation_subset",
           "ROTATIONS", "SUBSETS"]

Predict = Callable[[NDArray[np.float32]], NDArray[np.float32]]

DEFAULT_COUNT = 6
"""Rotations of ``--confidence`` when ``--tta`` is not given (cost: that many network runs)."""


@dataclass(frozen=True)
class Rotation:
    """A proper rotation of the cube grid, acting on the last three axes of an array.

    Attributes
    ----------
    permutation : the input axes that become output axes 0, 1, 2 (as in ``np.transpose``).
    flips : for each output axis, whether it is reversed after the transposition.
    """

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def __post_init__(self) -> None:
        if sorted(self.permutation) != [0, 1, 2] or len(self.flips) != 3:
            raise ValueError(f"rotation {self.permutation}, {self.flips}: needs a permutation "
                             "of (0, 1, 2) and three flips")
        if round(np.linalg.det(self.matrix)) != 1:
            raise ValueError(f"rotation {self.permutation}, {self.flips}: is a reflection "
                             "(determinant -1); only proper rotations keep a chiral map")

    @cached_property
    def matrix(self) -> NDArray[np.int64]:
        """Signed permutation matrix ``A`` (3, 3) int: centred coordinates ``u = A @ u_rotated``.

        Rotating by ``a`` then by ``b`` is the rotation of matrix ``a.matrix @ b.matrix``.
        """
        matrix = np.zeros((3, 3), dtype=np.int64)
        for axis, (source, flip) in enumerate(zip(self.permutation, self.flips, strict=True)):
            matrix[source, axis] = -1 if flip else 1
        return matrix

    @classmethod
    def from_matrix(cls, matrix: NDArray[Any]) -> Rotation:
        """The rotation of a signed permutation matrix (see :attr:`matrix`)."""
        matrix = np.asarray(matrix)
        sources = tuple(int(np.flatnonzero(matrix[:, axis])[0]) for axis in range(3))
        flips = tuple(bool(matrix[source, axis] < 0) for axis, source in enumerate(sources))
        return cls(sources, flips)  # type: ignore[arg-type]

    @cached_property
    def inverse(self) -> Rotation:
        """The rotation that undoes this one."""
        return Rotation.from_matrix(self.matrix.T)

    def then(self, other: Rotation) -> Rotation:
        """This rotation followed by ``other``."""
        return Rotation.from_matrix(self.matrix @ other.matrix)

    def view(self, array: NDArray[Any]) -> NDArray[Any]:
        """The rotated array as a view (no copy) of ``array`` (``ndim >= 3``, last three turned)."""
        if array.ndim < 3:
            raise ValueError(f"rotation needs an array with three spatial axes, got shape "
                             f"{array.shape}")
        lead = array.ndim - 3
        turned = np.transpose(array, tuple(range(lead)) + tuple(lead + p for p in self.permutation))
        axes = tuple(lead + axis for axis, flip in enumerate(self.flips) if flip)
        return np.flip(turned, axes) if axes else turned

    def apply(self, array: NDArray[Any]) -> NDArray[Any]:
        """The rotated array as a new C-contiguous array."""
        return np.ascontiguousarray(self.view(array))


def _sign(permutation: Sequence[int]) -> int:
    inversions = sum(1 for a, b in itertools.combinations(permutation, 2) if a > b)
    return -1 if inversions % 2 else 1


def _all_rotations() -> tuple[Rotation, ...]:
    rotations = []
    for permutation in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            if _sign(permutation) * (-1) ** sum(flips) == 1:
                rotations.append(Rotation(permutation, flips))  # type: ignore[arg-type]
    return tuple(rotations)


ROTATIONS = _all_rotations()
"""The 24 proper rotations of the cube grid, the identity first."""

_SUBGROUPS: dict[int, Callable[[Rotation], bool]] = {
    3: lambda r: _sign(r.permutation) == 1 and not any(r.flips),
    4: lambda r: r.permutation == (0, 1, 2),
    6: lambda r: not any(r.flips) if _sign(r.permutation) == 1 else all(r.flips),
    12: lambda r: _sign(r.permutation) == 1,
    24: lambda r: True,
}
SUBSETS: dict[int, tuple[Rotation, ...]] = {
    count: tuple(r for r in ROTATIONS if member(r)) for count, member in _SUBGROUPS.items()}
"""Rotation subsets by size (see the module docstring); each a group, the identity first."""


def rotation_subset(count: int) -> tuple[Rotation, ...]:
    """The subset of :data:`SUBSETS` with ``count`` rotations; ValueError naming the choices."""
    if isinstance(count, bool) or count not in SUBSETS:
        raise ValueError(f"tta={count!r}: not a number of rotations demhx offers; use one of "
                         f"{', '.join(str(n) for n in SUBSETS)}")
    return SUBSETS[count]


def predict_augmented(predict: Predict, cubes: NDArray[np.float32], rotations: Sequence[Rotation],
                      batch_size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Mean and variance over ``rotations`` of the turned-back predictions of each cube.

    Parameters
    ----------
    predict : maps a ``(b, 1, c, c, c)`` float32 batch to predictions of that shape.
    cubes : (n, 1, c, c, c) float32, the cubes to predict.
    rotations : the rotations to average over (at least one).
    batch_size : rotated copies per call of ``predict`` (copies of several cubes and
        rotations share a call).

    Returns
    -------
    mean, variance : (n, 1, c, c, c) float32, C-contiguous. ``variance`` is the population
        variance (divided by the number of rotations). The mean is computed as the first
        rotation's prediction plus the mean difference from it, so a model that commutes with
        the rotations returns exactly its plain prediction and a variance of 0.
    """
    if not rotations:
        raise ValueError("test-time augmentation needs at least one rotation")
    count = cubes.shape[0]
    # Predict every (rotation, cube) pair in batches, turning each prediction back.
    aligned = np.empty((len(rotations),) + cubes.shape, dtype=np.float32)
    pairs = [(r, i) for r in range(len(rotations)) for i in range(count)]
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        batch = np.empty((len(chunk),) + cubes.shape[1:], dtype=np.float32)
        for slot, (r, i) in enumerate(chunk):
            batch[slot] = rotations[r].view(cubes[i])
        predictions = predict(batch)
        for slot, (r, i) in enumerate(chunk):
            aligned[r, i] = rotations[r].inverse.view(predictions[slot])
    # Mean as an offset from the first rotation, then the variance around it.
    first_prediction = aligned[0]
    mean = np.zeros_like(first_prediction)
    for other in aligned[1:]:
        mean += other - first_prediction
    mean /= np.float32(len(rotations))
    mean += first_prediction
    variance = np.zeros_like(mean)
    for other in aligned:
        deviation = other - mean
        variance += deviation * deviation
    variance /= np.float32(len(rotations))
    return mean, variance
