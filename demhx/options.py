"""What a run is asked to do, and what it did: one options object and the results.

:class:`EnhanceOptions` holds the choices that shape one run the same way whether it enhances
an array (:meth:`demhx.pipeline.Enhancer.process`), a file
(:meth:`~demhx.pipeline.Enhancer.process_file`), several maps (:func:`demhx.batch.enhance_many`)
or a command line: the noise statistics, the tiling, the rotations of test-time augmentation,
the confidence map and the progress callback. It is frozen and checked when made, so a bad
option fails before any map is read. The model, device, batch size and threads belong to the
loaded :class:`~demhx.pipeline.Enhancer`; the inputs (volume, half-map, mask, voxel size) and
the output paths are the arguments of each call.

:class:`Enhanced` is one array run's result (the map, the spread, :class:`RunInfo`);
:class:`EnhanceSummary` is one file run's, with the one line the command line prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from demhx import augment, normalise
from demhx.normalise import NoiseStats
from demhx.tiling import TilingScheme, check_tiling
from demhx.validate import Fidelity

if TYPE_CHECKING:
    from demhx.blend import TileCounts

__all__ = ["Enhanced", "EnhanceOptions", "EnhanceSummary", "NoiseStatsLike", "Progress", "RunInfo",
           "VoxelSize"]

Progress = Callable[[int, int], None]
NoiseStatsLike = NoiseStats | Sequence[float] | None
VoxelSize = float | Sequence[float]


@dataclass(frozen=True, kw_only=True)
class EnhanceOptions:
    """How to enhance a map (checked when made; keyword arguments only; see the module's
    docstring).

    Attributes
    ----------
    noise_stats : the solvent noise's ``(mean, std)`` (or :class:`NoiseStats`); None:
        chosen from the map (:func:`demhx.normalise.statistics_for`).
    tiling : ``"default"``, ``"fast"``, ``"reference"`` or a :class:`TilingScheme`.
    tta : rotations to average over (3, 4, 6, 12 or 24); None: none, or the default count
        with ``confidence``.
    confidence : also compute the spread over the rotations (the confidence map).
    progress : called as ``progress(done, total)`` (cubes, or cubes × rotations); may raise
        to stop the run. Not compared: two options differing only in it are equal.
    """

    noise_stats: NoiseStatsLike = None  # a NoiseStats (or None) once made
    tiling: str | TilingScheme = "default"
    tta: int | None = None
    confidence: bool = False
    progress: Progress | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Checked once, here: every path that takes options gets checked ones.
        object.__setattr__(self, "noise_stats", normalise.as_stats(self.noise_stats))
        check_tiling(self.tiling)
        self.rotations  # noqa: B018 -- refuses an unsupported count of rotations

    @property
    def rotations(self) -> tuple[augment.Rotation, ...] | None:
        """The rotations to average over: None for a plain run, the default count for a
        confidence map without ``tta``."""
        if self.tta is None:
            return augment.rotation_subset(augment.DEFAULT_COUNT) if self.confidence else None
        return augment.rotation_subset(self.tta)

    @property
    def tiling_name(self) -> str:
        """The tiling scheme's name (for the output's label and the summary)."""
        return self.tiling.name if isinstance(self.tiling, TilingScheme) else self.tiling

    def replace(self, **changes: Any) -> EnhanceOptions:
        """A copy with ``changes`` (checked like a new one)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunInfo:
    """What one run did: grids, statistics, cubes, device and time."""

    shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    noise: NoiseStats
    cubes: TileCounts
    device: str
    tiling: str
    seconds: float
    augmentations: int = 1
    input_peak: float = math.nan  # largest |input - noise mean|, the map's units
    fidelity: Fidelity | None = None  # the output's fidelity to the input (or none)


@dataclass(frozen=True)
class Enhanced:
    """One array run's result.

    Attributes
    ----------
    map : (z, y, x) float32, the enhanced map on the input grid.
    spread : (z, y, x) float32, the confidence map (the per-voxel standard deviation over the
        rotations, in the map's units), or None without ``confidence``.
    info : the run's :class:`RunInfo`.
    """

    map: NDArray[np.float32]
    spread: NDArray[np.float32] | None
    info: RunInfo

    def __repr__(self) -> str:
        cubes, info = self.info.cubes, self.info
        return (f"Enhanced(map={_describe(self.map)}, spread={_describe(self.spread)}, "
                f"{cubes.run} cubes run, {cubes.skipped} skipped, {info.tiling} tiling, "
                f"device {info.device}, {info.seconds:.2f} s)")

    def result(self) -> NDArray[np.float32] | tuple[NDArray[np.float32], NDArray[np.float32]]:
        """The map, or ``(map, spread)`` with a confidence map (what :func:`demhx.enhance`
        returns)."""
        return self.map if self.spread is None else (self.map, self.spread)


def _describe(array: NDArray[Any] | None) -> str:
    """An array in a few words: its shape (z, y, x), dtype and range."""
    if array is None:
        return "None"
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    return f"{'×'.join(map(str, array.shape))} {array.dtype} [{low:.4g}, {high:.4g}]"


@dataclass(frozen=True)
class EnhanceSummary:
    """The result of :func:`enhance_file`, with a one-line report."""

    source: Path
    half2: Path | None
    output: Path
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    model: str
    info: RunInfo
    seconds: float
    confidence: Path | None = None

    def line(self) -> str:
        """One line: file(s), box, voxel size, cubes (and rotations), device and seconds."""
        box = "×".join(str(n) for n in reversed(self.shape))
        voxel = (f"{self.voxel_size[0]:.4g} Å" if len(set(self.voxel_size)) == 1 else
                 "/".join(f"{v:.4g}" for v in reversed(self.voxel_size)) + " Å (x/y/z)")
        cubes = self.info.cubes
        written = f"{self.output}" + ("" if self.confidence is None
                                      else f" and confidence {self.confidence}")
        rotations = ("" if self.info.augmentations == 1
                     else f" × {self.info.augmentations} rotations (TTA)")
        return (f"wrote {written}: {box} voxels (x×y×z) at {voxel}, model {self.model}, "
                f"{cubes.run} cube{'' if cubes.run == 1 else 's'} run{rotations}, "
                f"{cubes.skipped} skipped as solvent"
                f"{f', {cubes.added} added by the self-check' if cubes.added else ''} "
                f"({self.info.tiling} tiling), device {self.info.device}, "
                f"{self.seconds:.1f} s")
