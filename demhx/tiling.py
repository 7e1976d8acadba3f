"""Tiling geometry: where the cubes go, how their predictions are blended, which may be skipped.

Three schemes are built in (:func:`scheme_for`):

``reference``
    The paper exactly: cubes of the model's cube size at the model's stride (64 and 16 for
    DeepEMhancer), every cube run, predictions averaged with uniform weights. A 256³ map needs
    13³ = 2197 cubes. This is the correctness reference.
``default``
    Faster and faithful: a subset of the reference's own cubes. The padding and the lattice
    of cube corners are the reference's (every ``model_stride`` voxels); along each axis the
    fewest lattice positions, first and last included, are kept with gaps of at most
    ``cube_size * DEFAULT_STRIDE_FRACTION`` (48 for 64³ cubes: gaps of 32 or 48, 16-voxel or
    wider overlaps), predictions are averaged with uniform weights as in the reference, and
    cubes whose normalised input is pure solvent are skipped. 256³: 5³ = 125 cubes before
    skipping, against 13³ = 2197. A cube is skipped when its largest ``|value|`` is below
    ``DEFAULT_SKIP_THRESHOLD`` (5) solvent-noise standard deviations: the largest of 64³
    samples of white Gaussian noise is about 4.7 σ, and the 16 lowest cube maxima of emd_5168
    (solvent, correlated noise) are 3.3–4.8 σ. Where no noise was measured (zones without
    solvent normalised by their peak, mask-normalised models), the pipeline passes a threshold
    of 1 % of the map's peak instead (``NoiseStats.noise_fraction``), so only cubes in the
    masked-out region are skipped and a zone is never blanked. A skipped cube contributes
    nothing; voxels that no run cube covers get the model's background. The default is adaptive
    (``target_cc`` = :data:`DEFAULT_TARGET_CC`): once its cubes have run, the CC of its
    output to the reference output is predicted from how overlapping predictions disagree
    (:func:`demhx.refine.predicted_cc`), and while the prediction falls short, the
    widest gap between cube positions is split (:func:`refine_plan`) and the new cubes run.
``fast``
    The default's first cubes only, never refined.

Why the reference's lattice and uniform weights: the network's prediction for a voxel
depends on where the voxel sits in its cube modulo the reference stride (its pooling), so
cubes off the reference lattice disagree with the reference, and a cosine taper over the
overlaps moves the blend away from the reference's plain average. Cubes taken from the
reference's lattice and averaged uniformly stay closest to it for a given number of cubes
(measured with ``bench/tiling_study.py``: ``bench/RESULTS.md``, "Default vs reference
tiling").

Every box shape is covered: each axis is padded on its own to ``cube_size + (n - 1) * step``
with ``n`` the fewest cubes at the scheme's lattice step (the stride without a lattice) that
cover it (a box smaller than one cube is padded to one cube), the box centred in the padding.
All functions here are pure and work on shapes and small arrays.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["axis_layout", "check_tiling", "crop", "DEFAULT", "DEFAULT_SKIP_THRESHOLD",
           "DEFAULT_STRIDE_FRACTION", "DEFAULT_TARGET_CC", "FAST", "pad_volume",
           "plan_tiling", "REFERENCE", "refine_plan", "refine_positions", "scheme_for",
           "SCHEMES", "skip_level", "TilingPlan", "TilingScheme", "window_1d",
           "window_3d", "WINDOWS"]

REFERENCE = "reference"
DEFAULT = "default"
FAST = "fast"
SCHEMES = (DEFAULT, FAST, REFERENCE)
WINDOWS = ("uniform", "cosine")

DEFAULT_STRIDE_FRACTION = 0.75
"""Largest gap between neighbouring cubes of the default scheme, as a fraction of the cube
size (48 voxels for 64³ cubes), rounded down to the reference stride."""
DEFAULT_SKIP_THRESHOLD = 5.0
"""Largest ``|value|`` of a solvent cube, in solvent-noise standard deviations."""
DEFAULT_TARGET_CC = 0.993
"""Predicted CC to the reference output below which the default adds cubes (see
:func:`demhx.refine.predicted_cc`); above the 0.99 bar by the estimate's error on the
measured maps."""


@dataclass(frozen=True)
class TilingScheme:
    """How a volume is cut into cubes and reassembled.

    Attributes
    ----------
    name : ``"reference"``, ``"default"`` or a free name for a custom scheme.
    stride : distance between neighbouring cube corners, voxels (1 … cube size); with a
        ``lattice``, the largest distance.
    window : ``"uniform"`` (plain averaging) or ``"cosine"`` (raised-cosine blending).
    skip_threshold : cubes whose largest ``|value|`` is below this many solvent-noise standard
        deviations are not run; ``None`` runs every cube.
    lattice : None, or the reference stride: the cubes are then a subset of the reference
        tiling's cubes (same padding, corners on its lattice), spread evenly at most
        ``stride`` apart, so that each one is exactly a cube the reference runs.
    target_cc : None, or adaptive refinement (needs a ``lattice`` and the uniform window):
        once the cubes have run, the CC of the output to the reference output is predicted
        from how the overlapping predictions disagree, and while it is below ``target_cc``
        lattice positions are added (:func:`refine_plan`) and the new cubes run.
    """

    name: str
    stride: int
    window: str = "uniform"
    skip_threshold: float | None = None
    lattice: int | None = None
    target_cc: float | None = None

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(f"tiling window {self.window!r} is not one of {WINDOWS}")
        if self.stride < 1:
            raise ValueError(f"tiling stride {self.stride} must be at least 1 voxel")
        if self.skip_threshold is not None and not self.skip_threshold >= 0:
            raise ValueError(f"tiling skip threshold {self.skip_threshold} must be >= 0 or None")
        if self.lattice is not None and not 1 <= self.lattice <= self.stride:
            raise ValueError(f"tiling lattice {self.lattice} must be within 1..{self.stride} "
                             "(the stride)")
        if self.target_cc is not None:
            if not 0 < self.target_cc < 1:
                raise ValueError(f"tiling target CC {self.target_cc} must be within (0, 1)")
            if self.lattice is None or self.window != "uniform":
                raise ValueError("an adaptive tiling (target CC) needs a lattice and the "
                                 "uniform window")

    @property
    def step(self) -> int:
        """Spacing of the lattice the cube corners lie on (the stride without a lattice)."""
        return self.lattice or self.stride


def check_tiling(tiling: Any) -> None:
    """ValueError unless ``tiling`` is a :class:`TilingScheme` or names one (:data:`SCHEMES`)."""
    if not isinstance(tiling, TilingScheme) and tiling not in SCHEMES:
        raise ValueError(f"tiling={tiling!r} is not a tiling scheme; use one of "
                         f"{', '.join(SCHEMES)}")


def scheme_for(tiling: str | TilingScheme, cube_size: int, model_stride: int) -> TilingScheme:
    """Resolve a scheme name for a model with the given cube size and reference stride.

    Parameters
    ----------
    tiling : ``"default"``, ``"reference"`` or a ready :class:`TilingScheme`.
    cube_size : edge of the network's cubes, voxels.
    model_stride : the paper's stride recorded in the model, voxels.
    """
    check_tiling(tiling)
    if isinstance(tiling, TilingScheme):
        if tiling.stride > cube_size:
            raise ValueError(f"tiling stride {tiling.stride} exceeds the cube size {cube_size}; "
                             "voxels between cubes would never be predicted")
        return tiling
    if tiling == REFERENCE:
        return TilingScheme(REFERENCE, model_stride, "uniform", None)
    if tiling in (DEFAULT, FAST):
        lattice = max(1, min(cube_size, model_stride))
        spacing = max(lattice, round(cube_size * DEFAULT_STRIDE_FRACTION))
        stride = min(cube_size, spacing) // lattice * lattice
        return TilingScheme(tiling, stride, "uniform", DEFAULT_SKIP_THRESHOLD, lattice,
                            DEFAULT_TARGET_CC if tiling == DEFAULT else None)
    raise AssertionError(f"scheme {tiling!r} passed check_tiling but has no layout")


def skip_level(scheme: TilingScheme, noise_std: float, noise_fraction: float = 1.0
               ) -> float | None:
    """The largest ``|value|`` below which a cube is skipped as solvent, in normalised units.

    ``noise_std``: the model's normalised noise std; ``noise_fraction``: the solvent's noise
    std as a fraction of it (below 1 when the std was widened to keep the peak in range), so
    that solvent cubes are still told by their noise. None: the scheme skips nothing.
    """
    if scheme.skip_threshold is None:
        return None
    return scheme.skip_threshold * noise_std * noise_fraction


def axis_layout(length: int, cube_size: int, stride: int,
                lattice: int | None = None) -> tuple[int, int, NDArray[Any]]:
    """Cube positions along one axis of ``length`` voxels.

    Without ``lattice``, cubes every ``stride`` voxels. With it, the layout of stride
    ``lattice`` (the reference's) is thinned out: the same padding, and the fewest of its
    positions, first and last included, spread as evenly as the lattice allows with gaps of
    at most ``stride`` (a multiple of ``lattice``).

    Returns
    -------
    padded_length : ``cube_size + (n - 1) * step`` >= ``length``, with ``n`` the fewest cubes
        that cover the axis at step ``lattice`` (or ``stride``).
    offset : index of the first voxel of the box in the padded axis (box centred).
    starts : (m,) int64, increasing first padded index of every cube.
    """
    if length < 1:
        raise ValueError(f"axis length {length} must be at least 1 voxel")
    step = lattice or stride
    count = 1 if length <= cube_size else 1 + math.ceil((length - cube_size) / step)
    padded_length = cube_size + (count - 1) * step
    offset = (padded_length - length) // 2
    if lattice is None or count == 1:
        return padded_length, offset, np.arange(count, dtype=np.int64) * step
    span = count - 1  # lattice steps from the first cube to the last
    gap = max(1, stride // lattice)  # largest gap, lattice steps
    chosen = 1 + math.ceil(span / gap)
    steps = sorted({round(k * span / (chosen - 1)) for k in range(chosen)})
    return padded_length, offset, np.array(steps, dtype=np.int64) * lattice


def window_1d(cube_size: int, stride: int, window: str) -> NDArray[Any]:
    """Blending weights along one cube edge, float64, all > 0.

    ``"cosine"`` is flat in the middle and rises as ``sin²`` over ``taper = min(cube_size -
    stride, cube_size // 2)`` voxels at each end, sampled at voxel centres: when ``stride >=
    cube_size / 2`` the tapers of two neighbouring cubes add up to exactly one.
    """
    weights = np.ones(cube_size)
    taper = min(cube_size - stride, cube_size // 2)
    if window == "uniform" or taper <= 0:
        return weights
    rise = np.sin(0.5 * np.pi * (np.arange(taper) + 0.5) / taper) ** 2
    weights[:taper] = rise
    weights[cube_size - taper:] = rise[::-1]
    return weights


def window_3d(cube_size: int, stride: int, window: str) -> NDArray[Any]:
    """Separable blending window ``(c, c, c)`` float32, C-contiguous."""
    line = window_1d(cube_size, stride, window)
    cube = line[:, None, None] * line[None, :, None] * line[None, None, :]
    return np.ascontiguousarray(cube, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class TilingPlan:
    """The cubes that tile one volume.

    Attributes
    ----------
    shape : (z, y, x) shape of the volume.
    padded_shape : (z, y, x) shape of the padded volume the cubes are cut from.
    offset : (z, y, x) index of the volume's first voxel in the padded volume.
    cube_size : cube edge, voxels.
    corners : (n, 3) int64, C-contiguous: padded ``(z, y, x)`` corner of every cube, z slowest.
    weights : (c, c, c) float32 blending window.
    scheme : the scheme the plan follows.
    """

    shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    cube_size: int
    corners: NDArray[Any]
    weights: NDArray[Any]
    scheme: TilingScheme

    @property
    def cube_count(self) -> int:
        """Number of cubes in the plan."""
        return int(self.corners.shape[0])

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Lattice points along (z, y, x): point ``(i, j, k)`` is the corner
        ``(i, j, k) * scheme.step``; every cube's corner is one of them."""
        step = self.scheme.step
        return tuple((n - self.cube_size) // step + 1  # type: ignore[return-value]
                     for n in self.padded_shape)

    @property
    def region(self) -> tuple[slice, slice, slice]:
        """Slices of the padded volume that hold the original volume."""
        (z0, y0, x0), (nz, ny, nx) = self.offset, self.shape
        return slice(z0, z0 + nz), slice(y0, y0 + ny), slice(x0, x0 + nx)


def plan_tiling(shape: tuple[int, ...], cube_size: int, scheme: TilingScheme) -> TilingPlan:
    """Cube corners, padding and weights covering every voxel of a ``(z, y, x)`` box."""
    if len(shape) != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {tuple(shape)}")
    if not 1 <= scheme.stride <= cube_size:
        raise ValueError(f"tiling stride {scheme.stride} must be within 1..{cube_size}")
    layouts = [axis_layout(int(n), cube_size, scheme.stride, scheme.lattice) for n in shape]
    grids = np.meshgrid(*(starts for _, _, starts in layouts), indexing="ij")
    corners = np.ascontiguousarray(np.stack([g.ravel() for g in grids], axis=1), dtype=np.int64)
    return TilingPlan(
        shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
        padded_shape=tuple(padded for padded, _, _ in layouts),  # type: ignore[arg-type]
        offset=tuple(offset for _, offset, _ in layouts),  # type: ignore[arg-type]
        cube_size=cube_size,
        corners=corners,
        weights=window_3d(cube_size, scheme.stride, scheme.window),
        scheme=scheme,
    )


def refine_positions(indices: NDArray[Any]) -> NDArray[Any]:
    """Lattice indices of one axis with one more: the middle of the first widest gap.

    ``indices`` is increasing; it comes back unchanged when no gap is wider than 1.
    """
    indices = np.asarray(indices, dtype=np.int64)
    gaps = np.diff(indices)
    if gaps.size == 0 or gaps.max() <= 1:
        return indices
    widest = int(np.argmax(gaps))
    return np.insert(indices, widest + 1, indices[widest] + gaps[widest] // 2)


def refine_plan(plan: TilingPlan) -> TilingPlan | None:
    """The plan with one more lattice position along the axis with the widest gap, or None.

    The widest gap between neighbouring cube positions (the first such axis, z before y
    before x) is split in the middle (:func:`refine_positions`). The refined plan holds every
    cube of ``plan`` (its corners are the product of the positions of each axis, on the same
    lattice and padding), so refining again and again ends at the reference tiling's cubes.
    None when no gap is wider than one lattice step.
    """
    step = plan.scheme.step
    axes = [np.unique(plan.corners[:, axis] // step) for axis in range(3)]
    widths = [int(np.diff(positions).max()) if positions.size > 1 else 0 for positions in axes]
    widest = int(np.argmax(widths))
    if widths[widest] <= 1:
        return None
    axes[widest] = refine_positions(axes[widest])
    grids = np.meshgrid(*axes, indexing="ij")
    corners = np.stack([g.ravel() for g in grids], axis=1) * step
    return dataclasses.replace(plan, corners=np.ascontiguousarray(corners, dtype=np.int64))


def pad_volume(volume: NDArray[Any], plan: TilingPlan, fill: float = 0.0) -> NDArray[Any]:
    """The volume placed in a new float32 C-contiguous array of ``plan.padded_shape``.

    The padding holds ``fill`` (0: the solvent mean of a normalised map).
    """
    if tuple(volume.shape) != plan.shape:
        raise ValueError(f"volume shape {volume.shape} does not match the plan {plan.shape}")
    padded = np.full(plan.padded_shape, fill, dtype=np.float32)
    padded[plan.region] = volume
    return padded


def crop(padded: NDArray[Any], plan: TilingPlan) -> NDArray[Any]:
    """The original box of a padded volume (a view)."""
    return padded[plan.region]
