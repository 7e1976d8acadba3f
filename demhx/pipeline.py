"""The DeepEMhancer inference pipeline: map in, enhanced map out.

Steps (:meth:`Enhancer.enhance`): validate → average the half-maps (float32) → noise
statistics (automatic, user-given or inside a mask, as the model's ``normalisation`` asks) →
normalise so the solvent noise has mean 0 and the model's ``noise_std`` → resample to the
model's voxel size → tile, run the network in batches and blend the cubes → resample back to
the exact input grid → undo the normalisation's scale. Everything is float32; at most a few
copies of the volume are alive at once.

With ``confidence`` (or ``tta``), every cube is run once per rotation of a subset of the 24
proper cube rotations (:mod:`demhx.augment`): the output is the mean over the rotations, and
the confidence map is the spread, the per-voxel standard deviation over the rotations (each
cube's, blended with the tiling window), in the output's units.

Normalisation happens on the input grid, before resampling, so that ``noise_stats`` given by
a user mean what they measured on their map. Fourier upsampling keeps the standard deviation
of white noise; downsampling a map finer than the model's voxel size lowers it (by up to
``sqrt(voxel_size / model_voxel_size)³``).

:class:`Enhancer` holds one loaded model, so many maps can be processed with a single load;
:func:`enhance` and :func:`enhance_file` are one-shot conveniences around it.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np

from demhx import augment, mrcio, normalise, resample, tiling, validate
from demhx.blend import TileCounts, overlap_add, overlap_add_augmented
from demhx.normalise import NoiseStats
from demhx.session import DemhxWarning, Runtime, check_positive, load_runtime, parse_device
from demhx.tiling import TilingScheme

LOG = logging.getLogger("demhx")
Progress = Callable[[int, int], None]
NoiseStatsLike = NoiseStats | Sequence[float] | None
VoxelSize = float | Sequence[float]
_VOXEL_MATCH = 1e-4  # relative tolerance for two half-maps' voxel sizes (and cells)
_ORIGIN_MATCH = 1e-3  # Å: two half-maps' origins agree within this
_RIGHT_ANGLE = 90.0
_ANGLE_MATCH = 0.01  # degrees: a cell angle this close to 90° is a right angle


class _StageClock:
    """Wall time of the pipeline's stages, logged at DEBUG level (the CLI's ``--debug``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap to ``stage``."""
        now = time.perf_counter()
        self.add(stage, now - self._last)
        self._last = now

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def log(self) -> None:
        if LOG.isEnabledFor(logging.DEBUG):
            LOG.debug("stage times: " + ", ".join(f"{stage} {seconds:.3f} s" for stage, seconds
                                                  in self.seconds.items()))


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


def voxel_triplet(voxel_size: VoxelSize, what: str = "voxel size") -> tuple[float, float, float]:
    """A positive finite voxel size per axis (z, y, x) in Å from a scalar or three values."""
    values = np.atleast_1d(np.asarray(voxel_size, dtype=np.float64)).ravel()
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{what} {voxel_size!r} Å is not one positive value or three; "
                         "pass --voxel-size")
    return float(values[0]), float(values[1]), float(values[2])


def check_volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    """A 3-D finite float32 C-contiguous view or copy of ``volume``."""
    array = np.asarray(volume)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"{name}: shape {array.shape} is not a 3-D (z, y, x) map")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{name}: data type {array.dtype} is not real numbers")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite voxels; fix or replace the map")
    return array


def average_half_maps(half1: np.ndarray, half2: np.ndarray, names: tuple[str, str] = (
        "half-map 1", "half-map 2"), out: np.ndarray | None = None) -> np.ndarray:
    """``(half1 + half2) / 2`` in float32 (into ``out`` if given); shapes must match."""
    if half1.shape != half2.shape:
        raise ValueError(f"{names[1]}: shape {half2.shape} (z, y, x) differs from {names[0]} "
                         f"{half1.shape}; pass the two half-maps of one reconstruction")
    result = np.add(half1, half2, out=out, dtype=np.float32)
    result *= np.float32(0.5)
    return result


def _check_tiling(tiling_name: str | TilingScheme) -> None:
    if not isinstance(tiling_name, TilingScheme) and tiling_name not in tiling.SCHEMES:
        raise ValueError(f"--tiling {tiling_name!r} is not a tiling scheme; use one of "
                         f"{', '.join(tiling.SCHEMES)}")


class Enhancer:
    """One loaded model, reusable for many maps.

    Parameters
    ----------
    model : registered model name, path to an ONNX file, or None for the default model.
    device : ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    batch_size : cubes per inference call (None: a default for the device).
    threads : CPU threads for ONNX Runtime (None: all physical cores).

    The options are checked at once; the model is loaded on first use (:attr:`runtime`),
    so that :meth:`enhance_file` can check its output path before any slow work.
    """

    def __init__(self, model: str | Path | None = None, *, device: str = "auto",
                 batch_size: int | None = None, threads: int | None = None) -> None:
        parse_device(device)
        self.model, self.device = model, device
        self.batch_size = check_positive("--batch-size", batch_size)
        self.threads = check_positive("--threads", threads)
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        """The loaded model session (loaded on first access, then kept)."""
        if self._runtime is None:
            self._runtime = load_runtime(self.model, device=self.device,
                                         batch_size=self.batch_size, threads=self.threads)
        return self._runtime

    @overload
    def enhance(self, volume: np.ndarray, voxel_size: VoxelSize, *,
                half2: np.ndarray | None = ..., noise_stats: NoiseStatsLike = ...,
                mask: np.ndarray | None = ..., tiling: str | TilingScheme = ...,
                progress: Progress | None = ..., confidence: Literal[False] = ...,
                tta: int | None = ...) -> np.ndarray: ...

    @overload
    def enhance(self, volume: np.ndarray, voxel_size: VoxelSize, *,
                half2: np.ndarray | None = ..., noise_stats: NoiseStatsLike = ...,
                mask: np.ndarray | None = ..., tiling: str | TilingScheme = ...,
                progress: Progress | None = ..., confidence: Literal[True],
                tta: int | None = ...) -> tuple[np.ndarray, np.ndarray]: ...

    def enhance(self, volume: np.ndarray, voxel_size: VoxelSize, *,
                half2: np.ndarray | None = None, noise_stats: NoiseStatsLike = None,
                mask: np.ndarray | None = None, tiling: str | TilingScheme = "default",
                progress: Progress | None = None, confidence: bool = False,
                tta: int | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The enhanced map, ``(z, y, x)`` float32 on the input grid (see :func:`enhance`)."""
        result, spread, _ = self._run(volume, voxel_size, half2, noise_stats, mask, tiling,
                                      progress, "volume", confidence, tta)
        return result if spread is None else (result, spread)

    @overload
    def run(self, volume: np.ndarray, voxel_size: VoxelSize, *,
            half2: np.ndarray | None = ..., noise_stats: NoiseStatsLike = ...,
            mask: np.ndarray | None = ..., tiling: str | TilingScheme = ...,
            progress: Progress | None = ..., name: str = ..., confidence: Literal[False] = ...,
            tta: int | None = ...) -> tuple[np.ndarray, RunInfo]: ...

    @overload
    def run(self, volume: np.ndarray, voxel_size: VoxelSize, *,
            half2: np.ndarray | None = ..., noise_stats: NoiseStatsLike = ...,
            mask: np.ndarray | None = ..., tiling: str | TilingScheme = ...,
            progress: Progress | None = ..., name: str = ..., confidence: Literal[True],
            tta: int | None = ...) -> tuple[tuple[np.ndarray, np.ndarray], RunInfo]: ...

    def run(self, volume: np.ndarray, voxel_size: VoxelSize, *,
            half2: np.ndarray | None = None, noise_stats: NoiseStatsLike = None,
            mask: np.ndarray | None = None, tiling: str | TilingScheme = "default",
            progress: Progress | None = None, name: str = "volume", confidence: bool = False,
            tta: int | None = None
            ) -> tuple[np.ndarray | tuple[np.ndarray, np.ndarray], RunInfo]:
        """Like :meth:`enhance`, also returning a :class:`RunInfo` about the run.

        ``name`` (e.g. the file the volume came from) starts the messages of input errors.
        """
        result, spread, info = self._run(volume, voxel_size, half2, noise_stats, mask, tiling,
                                         progress, name, confidence, tta)
        return (result if spread is None else (result, spread)), info

    def _run(self, volume: np.ndarray, voxel_size: VoxelSize, half2: np.ndarray | None,
             noise_stats: NoiseStatsLike, mask: np.ndarray | None,
             tiling: str | TilingScheme, progress: Progress | None, name: str,
             confidence: bool, tta: int | None, clock: _StageClock | None = None
             ) -> tuple[np.ndarray, np.ndarray | None, RunInfo]:
        """The enhanced map, the spread (with ``confidence``, else None) and the run's info.

        ``clock`` receives the stage times (logged here when not given).
        """
        start = time.perf_counter()
        own_clock = clock is None
        if clock is None:
            clock = _StageClock()
        else:
            clock.lap("read")  # enhance_file started the clock and read the map
        # Validate, and average the half-maps.
        _check_tiling(tiling)
        rotations = _rotations(confidence, tta)
        voxel = voxel_triplet(voxel_size)
        validate.check_voxel_size(voxel, f"{name}: voxel size (z/y/x)",
                                  "give the voxel size in Å (--voxel-size; 1 nm = 10 Å)")
        user_stats = _user_stats(noise_stats)
        volume = check_volume(volume, name)
        if half2 is not None:
            volume = average_half_maps(volume, check_volume(half2, "half2"))
        volume = validate.repair_extreme_voxels(volume, name)
        if mask is not None:
            mask = _check_mask(mask, volume.shape)
        clock.lap("validate")
        runtime = self.runtime
        clock.lap("session")
        _check_model_grid(volume.shape, voxel, runtime, name)
        # Normalise on the input grid.
        stats = noise_statistics(volume, voxel, runtime, user_stats, mask, name)
        LOG.info(runtime.description)
        LOG.info(_describe_stats(stats))
        shape: tuple[int, int, int] = volume.shape
        peak = max(float(volume.max()) - stats.mean, stats.mean - float(volume.min()))
        validate.check_noise_range(peak, stats.std, stats.method, name)
        # Enhance on the model's grid (the normalised copy is freed once resampled) ...
        prediction, spread, cubes, model_shape = _enhance_normalised(
            _normalised(volume, stats, runtime, mask), voxel, runtime, tiling, progress,
            rotations, stats.noise_fraction, clock)
        # ... then come back to the input grid and units.
        if prediction.shape != shape:
            prediction = resample.resample_to_shape(prediction, shape)
        result = normalise.denormalise(prediction, stats, runtime.spec.noise_std)
        if spread is not None:
            spread = _spread_on_input_grid(spread, shape, stats, runtime) if confidence else None
        clock.lap("resample")
        info = RunInfo(shape, model_shape, stats, cubes, runtime.device,
                       _scheme_name(tiling), time.perf_counter() - start,
                       len(rotations) if rotations else 1, peak)
        _check_finite_output(result, spread, runtime)
        if own_clock:
            clock.log()
        return np.ascontiguousarray(result, dtype=np.float32), spread, info

    def enhance_file(self, source: str | Path, output: str | Path, *,
                     half2: str | Path | None = None, voxel_size: VoxelSize | None = None,
                     mask: str | Path | None = None, noise_stats: NoiseStatsLike = None,
                     overwrite: bool = False, tiling: str | TilingScheme = "default",
                     progress: Progress | None = None, confidence: str | Path | None = None,
                     tta: int | None = None) -> EnhanceSummary:
        """Enhance an MRC file into a new one (see :func:`enhance_file`)."""
        start = time.perf_counter()
        # Check the output paths and options before any slow work.
        inputs = [Path(p) for p in (source, half2, mask) if p is not None]
        output = mrcio.check_output_path(Path(output), inputs, overwrite)
        spread_path = _check_confidence_path(confidence, output, inputs, overwrite)
        _check_tiling(tiling)
        _rotations(spread_path is not None, tta)
        _check_half2_path(Path(source), half2)
        for folder in {path.parent for path in (output, spread_path) if path is not None}:
            mrcio.clean_stale_temporaries(folder)
        # Read the map (averaging half-maps in place) and the mask.
        clock = _StageClock()
        template = _read_input(Path(source), half2, voxel_size)
        mask_data = _read_mask(Path(mask), template) if mask is not None else None
        # Enhance, check the result, and write atomically: nothing is written if anything
        # above fails.
        result, spread, info = self._run(template.data, template.voxel_size, None, noise_stats,
                                         mask_data, tiling, progress, str(source),
                                         spread_path is not None, tta, clock)
        _check_output(result, info, self.runtime, output)
        label = _label(self.runtime, info.tiling, info.augmentations)
        items = [(output, result, label)]
        if spread_path is not None and spread is not None:
            items.insert(0, (spread_path, spread, f"{label}, confidence: std"[:80]))
        mrcio.write_maps(items, template, overwrite=overwrite)
        clock.lap("write")
        clock.log()
        return EnhanceSummary(Path(source), None if half2 is None else Path(half2), output,
                              info.shape, template.voxel_size, self.runtime.spec.label, info,
                              time.perf_counter() - start, spread_path)


def _rotations(confidence: bool, tta: int | None) -> tuple[augment.Rotation, ...] | None:
    """The rotations to average over: none for a plain run, the default count for confidence."""
    if tta is None:
        return augment.rotation_subset(augment.DEFAULT_COUNT) if confidence else None
    return augment.rotation_subset(tta)


def _check_confidence_path(confidence: str | Path | None, output: Path, inputs: list[Path],
                           overwrite: bool) -> Path | None:
    """The confidence map's path, checked like the output's (and distinct from it)."""
    if confidence is None:
        return None
    path = mrcio.check_output_path(Path(confidence), inputs, overwrite)
    if path.resolve() == output.resolve():
        raise ValueError(f"{path}: --confidence is the output map itself; give the confidence "
                         "map another file name")
    return path


def _read_input(source: Path, half2: str | Path | None, voxel_size: VoxelSize | None
                ) -> mrcio.MrcMap:
    """The map, or the first half-map with the average of both in its (private) data."""
    first = mrcio.read_map(source, voxel_size)
    _warn_oblique_cell(first)
    if half2 is None:
        return first
    second = mrcio.read_map(Path(half2), voxel_size)
    _check_same_voxel_size(first, second)
    _check_same_grid(first, second, compare_cell=voxel_size is None)
    average_half_maps(first.data, second.data, (str(source), str(half2)), out=first.data)
    return first


def _check_half2_path(source: Path, half2: str | Path | None) -> None:
    """ValueError when ``--half2`` names the input map itself."""
    if half2 is not None and mrcio.same_file(Path(half2), source):
        raise ValueError(f"{half2}: --half2 is the input map {source} itself; pass the other "
                         "half-map of the reconstruction, or leave --half2 out")


def _check_same_voxel_size(first: mrcio.MrcMap, second: mrcio.MrcMap) -> None:
    if not np.allclose(first.voxel_size, second.voxel_size, rtol=_VOXEL_MATCH, atol=0):
        sizes = ["/".join(f"{v:.4g}" for v in m.voxel_size) for m in (first, second)]
        raise ValueError(f"{second.path}: voxel size {sizes[1]} Å (z/y/x) differs from "
                         f"{first.path} {sizes[0]} Å; pass the two half-maps of one "
                         "reconstruction, or --voxel-size if a header is wrong")


def _check_same_grid(first: mrcio.MrcMap, second: mrcio.MrcMap, compare_cell: bool) -> None:
    """ValueError when two half-maps' shape, nstart, origin or cell differ."""
    def fields(item: mrcio.MrcMap) -> dict[str, tuple[float, ...]]:
        header = item.header
        values = {"shape (z, y, x)": tuple(float(n) for n in item.data.shape),
                  "nstart (x, y, z)": (float(header.nxstart), float(header.nystart),
                                       float(header.nzstart)),
                  "origin (x, y, z)": tuple(float(header.origin[a]) for a in "xyz")}
        if compare_cell:
            values["cell (x, y, z)"] = tuple(float(header.cella[a]) for a in "xyz")
        return values

    tolerance = {"origin (x, y, z)": (0.0, _ORIGIN_MATCH), "cell (x, y, z)": (_VOXEL_MATCH, 0.0)}
    ours, theirs = fields(first), fields(second)
    for what, values in ours.items():
        rtol, atol = tolerance.get(what, (0.0, 0.0))
        if not np.allclose(values, theirs[what], rtol=rtol, atol=atol, equal_nan=True):
            show = [",".join(f"{v:g}" for v in item) for item in (theirs[what], values)]
            raise ValueError(f"{second.path}: {what} {show[0]} differs from {first.path} "
                             f"{show[1]}; the two half-maps must share one grid: pass the two "
                             "half-maps of one reconstruction, or fix the header that is wrong")


def _warn_oblique_cell(item: mrcio.MrcMap) -> None:
    """Warn when the cell angles are not 90° (0° everywhere counts as unset)."""
    angles = [float(item.header.cellb[a]) for a in ("alpha", "beta", "gamma")]
    if all(angle == 0 for angle in angles) or all(
            abs(angle - _RIGHT_ANGLE) <= _ANGLE_MATCH for angle in angles):
        return
    text = "/".join(f"{angle:g}" for angle in angles)
    warnings.warn(f"{item.path}: cell angles {text}° (alpha/beta/gamma) are not all 90°; "
                  "demhx and the network treat the grid as orthogonal, so the density is "
                  "processed slightly sheared (the output keeps the input's cell); for an "
                  "exact result resample the map onto an orthogonal grid first",
                  DemhxWarning, stacklevel=3)


def _check_model_grid(shape: tuple[int, ...], voxel: tuple[float, float, float],
                      runtime: Runtime, name: str) -> None:
    """ValueError, before any allocation, when the model grid would be too large."""
    model_voxel = runtime.spec.voxel_size
    model_shape = resample.target_shape((shape[0], shape[1], shape[2]), voxel, model_voxel)
    validate.check_grid(model_shape[::-1],
                        f"{name}: resampled to the model's {model_voxel:g} Å voxels the map "
                        "would have (x×y×z)",
                        "check the voxel size (pass --voxel-size if the header is wrong) or "
                        "crop the map")


def _check_finite_output(result: np.ndarray, spread: np.ndarray | None,
                         runtime: Runtime) -> None:
    """RuntimeError blaming the model when the output (or the spread) is not finite."""
    for values in (result,) if spread is None else (result, spread):
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(values.size - np.count_nonzero(finite))
            raise RuntimeError(f"{_model_cause(runtime)} produced {bad} NaN or infinite "
                               "voxels; nothing written; check the model file, or try "
                               "--device cpu")


def _model_cause(runtime: Runtime) -> str:
    return f"model {runtime.spec.label} [{runtime.model_file.name}] on {runtime.device}"


def _check_output(result: np.ndarray, info: RunInfo, runtime: Runtime, output: Path) -> None:
    """The output gate: RuntimeError naming the cause for an all-zero or absurd output."""
    cubes = info.cubes
    if cubes.run == 0:
        zero_cause = (f"all {cubes.skipped} cubes were skipped as solvent: the normalised map "
                      f"never rises above solvent noise (noise std {info.noise.std:.4g}, "
                      f"{info.noise.method}); check the voxel size and the noise statistics "
                      "(--noise-stats, --mask), or run --tiling reference")
    else:
        zero_cause = (f"{_model_cause(runtime)} returned zeros for all {cubes.run} cubes it "
                      "ran; check the model (--model)")
    validate.check_output(result, info.input_peak, str(output), _model_cause(runtime),
                          zero_cause)


def _read_mask(path: Path, template: mrcio.MrcMap) -> np.ndarray:
    mask = mrcio.read_map(path, template.voxel_size)
    if mask.data.shape != template.data.shape:
        raise ValueError(f"{path}: mask shape {mask.data.shape} (z, y, x) differs from the map "
                         f"{template.path} {template.data.shape}; make the mask on the map's grid")
    return mask.data


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = check_volume(mask, "mask")
    if mask.shape != shape:
        raise ValueError(f"mask: shape {mask.shape} (z, y, x) differs from the map {shape}; "
                         "make the mask on the map's grid")
    if not np.any(mask > 0):
        raise ValueError("mask: is empty (no voxel > 0); pass a mask that covers the particle")
    return mask


def noise_statistics(volume: np.ndarray, voxel_size: tuple[float, float, float],
                     runtime: Runtime, noise_stats: NoiseStatsLike,
                     mask: np.ndarray | None, name: str = "volume") -> NoiseStats:
    """The statistics to normalise with: the user's, or :func:`demhx.normalise.choose_stats`.

    ``choose_stats`` handles unmasked, masked and zoned maps and a user ``mask`` alike (a model
    with ``normalisation = mask`` gets the paper's mode 2, :func:`demhx.normalise.mask_stats`).
    A measured std widened because the map peaks beyond what the network was trained on
    (:func:`demhx.normalise.limit_peak`) comes with a warning; the user's std is kept as given,
    with a warning. ``name`` starts the messages (and the error when the map is constant).
    """
    if runtime.spec.normalisation == "mask" and mask is None:
        raise ValueError(f"{runtime.spec.path.name}: model {runtime.spec.label} expects masked "
                         "input (normalisation 'mask'); pass --mask PATH")
    user = _user_stats(noise_stats)
    if user is not None:
        peak = normalise.peak_sigmas(volume, user)
        if peak > normalise.MAX_PEAK_SIGMAS:
            warnings.warn(f"{name}: with --noise-stats std {user.std:.4g} the map peaks at "
                          f"{peak:.0f} noise stds, beyond the {_trained_range()} noise stds "
                          "the network was trained on (a measured std is widened above "
                          f"{normalise.MAX_PEAK_SIGMAS:.0f}), so the output may be unreliable; "
                          "check the noise std, or leave --noise-stats out", DemhxWarning,
                          stacklevel=3)
        return user
    if runtime.spec.normalisation == "mask" and mask is not None:
        return normalise.mask_stats(volume, mask)
    stats = normalise.choose_stats(volume, voxel_size, mask, name=name)
    if stats.widened_from is not None:
        peak = normalise.MAX_PEAK_SIGMAS * stats.std / stats.widened_from
        warnings.warn(f"{name}: the map peaks at {peak:.0f} noise stds (solvent std "
                      f"{stats.widened_from:.4g}), far beyond the {_trained_range()} the "
                      "network was trained on (flattened solvent: masked, filtered or "
                      f"rescaled?); normalised with std {stats.std:.4g} instead, so that it "
                      f"peaks at {normalise.MAX_PEAK_SIGMAS:.0f}. To choose, "
                      "pass --noise-stats MEAN,STD", DemhxWarning, stacklevel=3)
    return stats


def _trained_range() -> str:
    """The training inputs' peak range, e.g. ``6.5–22``, as the README gives it."""
    low, high = normalise.TRAINED_PEAK_SIGMAS
    return f"{low:g}–{high:g}"


def _user_stats(noise_stats: NoiseStatsLike) -> NoiseStats | None:
    """User-given statistics as :class:`NoiseStats` (checked), or None."""
    if noise_stats is None or isinstance(noise_stats, NoiseStats):
        return noise_stats
    values = [float(v) for v in noise_stats]
    if len(values) != 2:
        raise ValueError(f"--noise-stats {noise_stats!r}: give two values, MEAN,STD")
    return normalise.user_stats(values[0], values[1])


def _normalised(volume: np.ndarray, stats: NoiseStats, runtime: Runtime,
                mask: np.ndarray | None) -> np.ndarray:
    normalised = normalise.normalise(volume, stats, runtime.spec.noise_std)
    if runtime.spec.normalisation == "mask" and mask is not None:
        normalised = normalised * mask
    return np.ascontiguousarray(normalised, dtype=np.float32)


def _enhance_normalised(normalised: np.ndarray, voxel: tuple[float, float, float],
                        runtime: Runtime, tiling_name: str | TilingScheme,
                        progress: Progress | None,
                        rotations: tuple[augment.Rotation, ...] | None = None,
                        noise_fraction: float = 1.0, clock: _StageClock | None = None
                        ) -> tuple[np.ndarray, np.ndarray | None, TileCounts,
                                   tuple[int, int, int]]:
    """Resample to the model's voxel size, run the tiles; the prediction on the model grid.

    With ``rotations``, also the spread over them (normalised units); otherwise None.
    ``noise_fraction``: the solvent noise std as a fraction of the model's ``noise_std``
    (below 1 when the std was widened), so that solvent cubes are still told by their noise.
    """
    spec = runtime.spec
    clock = _StageClock() if clock is None else clock
    clock.lap("normalise")  # the noise statistics and the normalised copy
    # Resample to the model's voxel size (skipped when the grid does not change).
    model_shape = resample.target_shape(normalised.shape, voxel, spec.voxel_size)
    if model_shape != normalised.shape:
        normalised = resample.resample_to_shape(normalised, model_shape)
    clock.lap("resample")
    # Tile, run and blend (the network's time counted apart from the cubes' host work).
    scheme = tiling.scheme_for(tiling_name, spec.cube_size, spec.stride)
    plan = tiling.plan_tiling(model_shape, spec.cube_size, scheme)
    padded = tiling.pad_volume(normalised, plan)
    del normalised
    skip = (None if scheme.skip_threshold is None
            else scheme.skip_threshold * spec.noise_std * noise_fraction)
    clock.lap("tiling")
    network = _TimedPredict(runtime.run)
    if rotations is not None:
        mean, spread, cubes = overlap_add_augmented(
            padded, plan, network, runtime.batch_size, rotations, background=spec.background,
            skip_below=skip, progress=progress)
    else:
        (mean, cubes), spread = overlap_add(padded, plan, network, runtime.batch_size,
                                            background=spec.background, skip_below=skip,
                                            progress=progress), None
    clock.add("network", network.seconds)
    clock.lap("accumulate")  # extraction, solvent test, blending, self-check
    clock.add("accumulate", -network.seconds)
    return mean, spread, cubes, model_shape


class _TimedPredict:
    """``predict`` that adds up the seconds spent in it (called from one thread)."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        self.predict, self.seconds = predict, 0.0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.predict(batch)
        finally:
            self.seconds += time.perf_counter() - start


def _spread_on_input_grid(spread: np.ndarray, shape: tuple[int, int, int], stats: NoiseStats,
                          runtime: Runtime) -> np.ndarray:
    """The spread resampled to the input grid (clipped at 0) and in the output's units."""
    if spread.shape != shape:
        spread = np.maximum(resample.resample_to_shape(spread, shape), np.float32(0))
    spread = normalise.denormalise(spread, stats, runtime.spec.noise_std)
    return np.ascontiguousarray(spread, dtype=np.float32)


def _scheme_name(tiling_name: str | TilingScheme) -> str:
    return tiling_name.name if isinstance(tiling_name, TilingScheme) else tiling_name


def _describe_stats(stats: NoiseStats) -> str:
    """One line: the statistics and which path chose them."""
    line = f"noise mean {stats.mean:.4g}, std {stats.std:.4g} ({stats.method}"
    if stats.method == "auto" and math.isfinite(stats.solvent_fraction):
        line += f", from {stats.solvent_fraction:.0%} of the box"
    elif stats.method == "auto-masked":
        line += f": masked map, noise from {stats.solvent_fraction:.0%} of the voxels inside " \
                "the mask"
    elif stats.method == "peak":
        line += (f": masked zone without solvent ({stats.solvent_fraction:.0%} of the box), "
                 f"scaled so its peak is {normalise.TARGET_PEAK_SIGMAS:.0f} stds above the "
                 "masked value")
    elif stats.method == "mask":
        line += ": median and inter-quantile range inside the mask"
    if stats.widened_from is not None:
        line += f"; widened from {stats.widened_from:.4g} to keep the peak in range"
    return line + ")"


def _label(runtime: Runtime, tiling_name: str, augmentations: int = 1) -> str:
    from demhx import __version__

    rotations = f", {augmentations} rotations" if augmentations > 1 else ""
    return (f"demhx {__version__}: model {runtime.spec.label}, {tiling_name} tiling"
            f"{rotations}")[:80]


@overload
def enhance(volume: np.ndarray, voxel_size: VoxelSize, *, model: str | Path | None = ...,
            half2: np.ndarray | None = ..., noise_stats: NoiseStatsLike = ...,
            mask: np.ndarray | None = ..., device: str = ..., batch_size: int | None = ...,
            threads: int | None = ..., tiling: str | TilingScheme = ...,
            progress: Progress | None = ..., confidence: Literal[False] = ...,
            tta: int | None = ...) -> np.ndarray: ...


@overload
def enhance(volume: np.ndarray, voxel_size: VoxelSize, *, model: str | Path | None = ...,
            half2: np.ndarray | None = ..., noise_stats: NoiseStatsLike = ...,
            mask: np.ndarray | None = ..., device: str = ..., batch_size: int | None = ...,
            threads: int | None = ..., tiling: str | TilingScheme = ...,
            progress: Progress | None = ..., confidence: Literal[True],
            tta: int | None = ...) -> tuple[np.ndarray, np.ndarray]: ...


def enhance(volume: np.ndarray, voxel_size: VoxelSize, *, model: str | Path | None = None,
            half2: np.ndarray | None = None, noise_stats: NoiseStatsLike = None,
            mask: np.ndarray | None = None, device: str = "auto",
            batch_size: int | None = None, threads: int | None = None,
            tiling: str | TilingScheme = "default",
            progress: Progress | None = None, confidence: bool = False,
            tta: int | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Enhance a cryo-EM map: local sharpening and masking by the model's network.

    Parameters
    ----------
    volume : (z, y, x) array
        The unsharpened, unmasked map (or the first half-map when ``half2`` is given).
    voxel_size : float or (z, y, x) floats
        Voxel size in Å, one value or one per axis.
    model : registered model name, ONNX file path, or None for the default model.
    half2 : (z, y, x) array, optional
        Second half-map; the two are averaged in float32.
    noise_stats : NoiseStats or (mean, std), optional
        Solvent noise statistics of the map; estimated from the solvent when not given.
    mask : (z, y, x) array, optional
        Binary mask of the particle: normalise from the density inside it (required by
        models with ``normalisation = mask``, whose input is also multiplied by it).
    device, batch_size, threads : see :class:`Enhancer`.
    tiling : ``"default"`` (a subset of the reference's cubes, solvent skipped, more cubes
        added while the predicted CC to the reference is below 0.993), ``"fast"`` (the
        default's first cubes only), ``"reference"`` (the paper's stride and plain averaging)
        or a :class:`~demhx.tiling.TilingScheme`.
    progress : called as ``progress(cubes_done, cubes_total)``; may raise to stop. With
        test-time augmentation it counts network evaluations (cubes × rotations).
    confidence : also return the confidence map: run every cube in ``tta`` rotations
        (default :data:`demhx.augment.DEFAULT_COUNT`), return their mean as the enhanced map
        and their spread (see Returns).
    tta : number of rotations to average over: 3, 4, 6, 12 or 24 (the subsets of
        :mod:`demhx.augment`); the cost grows in proportion. Without ``confidence`` the
        mean over the rotations is returned alone; None with ``confidence`` False: no
        augmentation (the plain, single run).

    Returns
    -------
    (z, y, x) float32
        The enhanced map on the input grid; with ``confidence``, the pair ``(enhanced, spread)``:
        ``spread`` is the per-voxel standard deviation over the rotations of each cube's
        prediction (blended with the tiling's window), in the enhanced map's units, on the same
        grid; 0 in skipped solvent cubes. High spread marks where the turned predictions
        disagree; ``bench/confidence.py`` measures how that tracks the output's error.
    """
    enhancer = Enhancer(model, device=device, batch_size=batch_size, threads=threads)
    result, spread, _ = enhancer._run(volume, voxel_size, half2, noise_stats, mask, tiling,
                                      progress, "volume", confidence, tta)
    return result if spread is None else (result, spread)


def enhance_file(source: str | Path, output: str | Path, *, half2: str | Path | None = None,
                 voxel_size: VoxelSize | None = None, mask: str | Path | None = None,
                 noise_stats: NoiseStatsLike = None, overwrite: bool = False,
                 model: str | Path | None = None, device: str = "auto",
                 batch_size: int | None = None, threads: int | None = None,
                 tiling: str | TilingScheme = "default",
                 progress: Progress | None = None, confidence: str | Path | None = None,
                 tta: int | None = None) -> EnhanceSummary:
    """Enhance the map in an MRC file and write the result to a new MRC file.

    The output path is checked before anything else; the output is written atomically
    (temporary file, then rename) with the input's header (axis order, origin, nstart,
    voxel size, cell, labels) and one label naming demhx and the model. Nothing is written
    when any step fails or is interrupted.

    Parameters
    ----------
    source, output : input and output MRC/CCP4 paths.
    half2 : second half-map; averaged in float32 with ``source``.
    voxel_size : Å, one value or (z, y, x); overrides the header's.
    mask : binary mask file on the map's grid (see :func:`enhance`).
    noise_stats, model, device, batch_size, threads, tiling, progress, tta : see
        :func:`enhance`.
    overwrite : replace existing output files.
    confidence : path of the confidence map (the spread, see :func:`enhance`): written with
        the output's header (grid, nstart, origin, voxel size, axis order); the output is then
        the mean over the rotations. Checked like ``output`` and distinct from it.

    Returns
    -------
    EnhanceSummary
        Box, voxel size, model, cubes run and skipped, rotations, device, seconds;
        ``.line()`` says it.
    """
    enhancer = Enhancer(model, device=device, batch_size=batch_size, threads=threads)
    return enhancer.enhance_file(source, output, half2=half2, voxel_size=voxel_size, mask=mask,
                                 noise_stats=noise_stats, overwrite=overwrite, tiling=tiling,
                                 progress=progress, confidence=confidence, tta=tta)
