"""The array path: a checked volume in, the enhanced volume out (no files).

Steps (:func:`enhance_array`): check the inputs (:mod:`demhx.validate`) → average the
half-maps (float32) → repair isolated extreme voxels → noise statistics (automatic,
user-given or inside a mask: :func:`demhx.normalise.statistics_for`) → normalise so the
solvent noise has mean 0 and the model's ``noise_std`` → resample to the model's voxel size →
tile, run the network in batches and blend the cubes (:mod:`demhx.blend`) → resample back to
the exact input grid → undo the normalisation's scale. Everything is float32; at most a few
copies of the volume are alive at once.

With rotations (a confidence map or ``tta``), every cube is run once per rotation of a subset
of the 24 proper cube rotations (:mod:`demhx.augment`): the output is the mean over the
rotations, and the confidence map is the spread, the per-voxel standard deviation over the
rotations (each cube's, blended with the tiling window), in the output's units.

Normalisation happens on the input grid, before resampling, so that ``noise_stats`` given by
a user mean what they measured on their map. Fourier upsampling keeps the standard deviation
of white noise; downsampling a map finer than the model's voxel size lowers it (by up to
``sqrt(voxel_size / model_voxel_size)³``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import _warmup, augment, normalise, resample, tiling, validate
from demhx.blend import TileCounts, overlap_add, overlap_add_augmented
from demhx.errors import DemhxWarning
from demhx.model import ModelSpec
from demhx.multi_device import Loaded
from demhx.normalise import NoiseStats
from demhx.options import Enhanced, EnhanceOptions, Progress, RunInfo, VoxelSize

LOG = logging.getLogger("demhx")
Volume = NDArray[np.float32]


class StageClock:
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


@contextlib.contextmanager
def host_threads(threads: int | None) -> Iterator[None]:
    """Host kernels (noise statistics, tiling) use at most ``threads`` threads while inside
    (numba's thread count, which they follow); None leaves numba's count as it is."""
    if threads is None:
        yield
        return
    import numba

    previous = numba.get_num_threads()
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(threads, most)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def average_half_maps(half1: NDArray[Any], half2: NDArray[Any], names: tuple[str, str] = (
        "half-map 1", "half-map 2"), out: NDArray[np.float32] | None = None) -> Volume:
    """``(half1 + half2) / 2`` in float32 (into ``out`` if given); shapes must match."""
    if half1.shape != half2.shape:
        raise ValueError(f"{names[1]}: shape {half2.shape} (z, y, x) differs from {names[0]} "
                         f"{half1.shape}; pass the two half-maps of one reconstruction")
    result = np.add(half1, half2, out=out, dtype=np.float32)
    result *= np.float32(0.5)
    return result


def enhance_array(load: Callable[[], Loaded], volume: NDArray[Any], voxel_size: VoxelSize,
                  options: EnhanceOptions, *, half2: NDArray[Any] | None = None,
                  mask: NDArray[Any] | None = None, name: str = "volume",
                  mask_name: str = "mask", clock: StageClock | None = None) -> Enhanced:
    """Enhance ``volume`` as ``options`` say, with the model ``load()`` returns.

    The inputs are checked before the model is loaded (``load`` is called once, after them).
    ``name`` (e.g. the file the volume came from) starts the messages of input errors, and
    ``mask_name`` those of the mask; ``clock`` receives the stage times (logged here when not
    given).
    """
    start = time.perf_counter()
    own_clock = clock is None
    if clock is None:
        clock = StageClock()
    else:
        clock.lap("read")  # the file path started the clock and read the map
    volume, voxel, checked_mask = _checked_inputs(volume, voxel_size, half2, mask,
                                                  (name, mask_name))
    clock.lap("validate")
    _warmup.start()  # numba's set-up while the model loads (started already by the file path)
    runtime = load()
    clock.lap("session")
    _check_model_grid(volume.shape, voxel, runtime.spec, name)
    validate.check_voxel_ratio(voxel, runtime.spec.voxel_size, name)
    # Normalise on the input grid; refuse or warn, before any cube runs, when out of range.
    stats = normalise.statistics_for(volume, voxel, runtime.spec, options.noise_stats,
                                     checked_mask, name)
    LOG.info(runtime.description)
    LOG.info(normalise.describe(stats))
    shape: tuple[int, int, int] = volume.shape
    peak = max(float(volume.max()) - stats.mean, stats.mean - float(volume.min()))
    _check_input_range(volume, stats, peak, name)
    # Enhance on the model's grid (the normalised copy is freed once resampled) ...
    rotations = options.rotations
    prediction, spread, cubes, model_shape = _on_model_grid(
        normalise.normalise_for(volume, stats, runtime.spec, checked_mask), voxel, runtime,
        options, stats.noise_fraction, clock)
    # ... then come back to the input grid and units.
    if prediction.shape != shape:
        prediction = resample.resample_to_shape(prediction, shape)
    result = normalise.denormalise(prediction, stats, runtime.spec.noise_std)
    if spread is not None:
        spread = (_spread_on_input_grid(spread, shape, stats, runtime.spec)
                  if options.confidence else None)
    _zero_outside_support(volume, result, spread)
    clock.lap("resample")
    _check_finite_output(result, spread, runtime)
    # Check that the output follows the input's density (erased or inverted: refused; an
    # all-zero output is left to the output gate of the file path, which names its cause).
    fidelity = validate.output_fidelity(volume, result, voxel, stats.mean,
                                        _measured_std(stats))
    if result.min() != 0 or result.max() != 0:
        validate.check_fidelity(fidelity, name, model_cause(runtime), runtime.spec.trained)
    info = RunInfo(shape, model_shape, stats, cubes, runtime.device, options.tiling_name,
                   time.perf_counter() - start, len(rotations) if rotations else 1, peak,
                   fidelity)
    if own_clock:
        clock.log()
    return Enhanced(np.ascontiguousarray(result, dtype=np.float32), spread, info)


def zero_cause(info: RunInfo, runtime: Loaded) -> str:
    """Why a run's output is all zero: every cube skipped as solvent, or the model."""
    cubes = info.cubes
    if cubes.run == 0:
        return (f"all {cubes.skipped} cubes were skipped as solvent: the normalised map "
                f"never rises above solvent noise (noise std {info.noise.std:.4g}, "
                f"{info.noise.method}); check the voxel size and the noise statistics "
                "(noise_stats=, mask=), or run tiling=reference")
    return (f"{model_cause(runtime)} returned zeros for all {cubes.run} cubes it ran; check "
            "the model (model=)")


def check_all_zero(enhanced: Enhanced, runtime: Loaded, name: str) -> None:
    """The array API's gate for an all-zero output (the file path refuses one outright).

    Where the input has density for the output to follow (``info.fidelity``), a model that
    returned zeros erased it: refused as :func:`demhx.validate.check_fidelity` refuses any
    erased output. Otherwise (a map without density, every cube skipped as solvent: noise in,
    nothing out) the zeros are returned with a :class:`DemhxWarning` naming the cause.
    """
    result, info = enhanced.map, enhanced.info
    if result.size and (result.min() != 0 or result.max() != 0):
        return
    if info.cubes.run and info.fidelity is not None:
        validate.check_fidelity(info.fidelity, name, model_cause(runtime),
                                runtime.spec.trained)
    warnings.warn(f"{name}: the output is all zero ({zero_cause(info, runtime)})",
                  DemhxWarning, stacklevel=3)


def _checked_inputs(volume: NDArray[Any], voxel_size: VoxelSize, half2: NDArray[Any] | None,
                    mask: NDArray[Any] | None, names: tuple[str, str]
                    ) -> tuple[Volume, tuple[float, float, float], Volume | None]:
    """The volume (half-maps averaged, extreme voxels repaired), voxel size and mask, checked;
    ``names``: the map's and the mask's, for the messages."""
    name, mask_name = names
    voxel = validate.voxel_triplet(voxel_size)
    validate.check_voxel_size(voxel, f"{name}: voxel size (z/y/x)",
                              "give the voxel size in Å (voxel_size=; 1 nm = 10 Å)")
    checked = validate.check_volume(volume, name)
    if half2 is not None:
        checked = average_half_maps(checked, validate.check_volume(half2, "half2"))
    checked = validate.repair_extreme_voxels(checked, name)
    map_name = "the map" if name == "volume" else f"the map {name}"
    checked_mask = (None if mask is None
                    else validate.check_mask(mask, checked.shape, mask_name, map_name))
    return checked, voxel, checked_mask


def _measured_std(stats: NoiseStats) -> float:
    """The noise std that was measured (before any widening), or the one chosen."""
    return stats.widened_from or stats.std


def _check_input_range(volume: Volume, stats: NoiseStats, peak: float, name: str) -> None:
    """ValueError or a warning, before any cube runs, for a map outside what the network
    handles: noise statistics far from the map's solvent or range, inverted contrast, a
    map that hardly rises above its noise (:mod:`demhx.validate`)."""
    validate.check_noise_range(peak, stats.std, stats.method, name)
    measured = _measured_std(stats)
    validate.check_noise_level(volume, stats.mean, measured, stats.method, name)
    if stats.method == "mask":  # statistics of the density, not of the noise
        return
    validate.check_contrast(*validate.density_mass(volume, stats.mean, measured),
                            stats.method, name)
    validate.warn_low_peak(validate.density_tails(volume, stats.mean, measured)[0],
                           stats.method, name)


def _zero_outside_support(volume: Volume, result: Volume, spread: Volume | None) -> None:
    """Set ``result`` (and ``spread``) to 0 where ``volume`` is masked out, in place.

    A masked map (:func:`demhx.normalise.masked_outside`) holds no information outside its
    mask; the network's output there (up to 12 % of the output's peak on
    emd_5168_monomer.mrc) is invented.
    """
    outside = normalise.masked_outside(volume)
    if outside is None:
        return
    result[outside] = 0
    if spread is not None:
        spread[outside] = 0
    LOG.info(f"masked map: output set to 0 outside its mask ({outside.mean():.0%} of the box)")


def _check_model_grid(shape: tuple[int, ...], voxel: tuple[float, float, float],
                      spec: ModelSpec, name: str) -> None:
    """ValueError, before any allocation, when the model grid would be too large."""
    model_shape = resample.target_shape((shape[0], shape[1], shape[2]), voxel, spec.voxel_size)
    validate.check_grid(model_shape[::-1],
                        f"{name}: resampled to the model's {spec.voxel_size:g} Å voxels the map "
                        "would have (x×y×z)",
                        "check the voxel size (pass voxel_size= if the header is wrong) or "
                        "crop the map")


def model_cause(runtime: Loaded) -> str:
    """Who made an output, for the messages that blame the model."""
    return f"model {runtime.spec.label} [{runtime.model_file.name}] on {runtime.device}"


def _check_finite_output(result: Volume, spread: Volume | None, runtime: Loaded) -> None:
    """RuntimeError blaming the model when the output (or the spread) is not finite."""
    for values in (result,) if spread is None else (result, spread):
        if not validate.all_finite(values):
            bad = validate.count_nonfinite(values)
            raise RuntimeError(f"{model_cause(runtime)} produced {bad} NaN or infinite "
                               "voxels; nothing written; check the model file, or try "
                               "device=cpu")


def _on_model_grid(normalised: Volume, voxel: tuple[float, float, float], runtime: Loaded,
                   options: EnhanceOptions, noise_fraction: float, clock: StageClock
                   ) -> tuple[Volume, Volume | None, TileCounts, tuple[int, int, int]]:
    """Resample to the model's voxel size, run the tiles; the prediction on the model grid.

    With rotations, also the spread over them (normalised units); otherwise None.
    ``noise_fraction``: the solvent noise std as a fraction of the model's ``noise_std``
    (below 1 when the std was widened), so that solvent cubes are still told by their noise.
    """
    spec = runtime.spec
    clock.lap("normalise")  # the noise statistics and the normalised copy
    # Resample to the model's voxel size (skipped when the grid does not change).
    model_shape = resample.target_shape(normalised.shape, voxel, spec.voxel_size)
    if model_shape != normalised.shape:
        normalised = resample.resample_to_shape(normalised, model_shape)
    clock.lap("resample")
    # Tile, run and blend (the network's time counted apart from the cubes' host work).
    scheme = tiling.scheme_for(options.tiling, spec.cube_size, spec.stride)
    plan = tiling.plan_tiling(model_shape, spec.cube_size, scheme)
    padded = tiling.pad_volume(normalised, plan)
    del normalised
    skip = tiling.skip_level(scheme, spec.noise_std, noise_fraction)
    clock.lap("tiling")
    network = _TimedPredict(runtime.run)
    mean, spread, cubes = _blend(padded, plan, network, runtime.batch_size, options.rotations,
                                 spec.background, skip, options.progress)
    clock.add("network", network.seconds)
    clock.lap("accumulate")  # extraction, solvent test, blending, self-check
    clock.add("accumulate", -network.seconds)
    return mean, spread, cubes, model_shape


def _blend(padded: Volume, plan: tiling.TilingPlan, network: _TimedPredict, batch_size: int,
           rotations: tuple[augment.Rotation, ...] | None, background: float,
           skip: float | None, progress: Progress | None
           ) -> tuple[Volume, Volume | None, TileCounts]:
    """The blended prediction, the spread over ``rotations`` (None without) and the counts."""
    if rotations is not None:
        return overlap_add_augmented(padded, plan, network, batch_size, rotations,
                                     background=background, skip_below=skip, progress=progress)
    mean, cubes = overlap_add(padded, plan, network, batch_size, background=background,
                              skip_below=skip, progress=progress)
    return mean, None, cubes


class _TimedPredict:
    """``predict`` that adds up the seconds spent in it (called from one thread)."""

    def __init__(self, predict: Callable[[Volume], Volume]) -> None:
        self.predict, self.seconds = predict, 0.0

    def __call__(self, batch: Volume) -> Volume:
        start = time.perf_counter()
        try:
            return self.predict(batch)
        finally:
            self.seconds += time.perf_counter() - start


def _spread_on_input_grid(spread: Volume, shape: tuple[int, int, int], stats: NoiseStats,
                          spec: ModelSpec) -> Volume:
    """The spread resampled to the input grid (clipped at 0) and in the output's units."""
    if spread.shape != shape:
        spread = np.maximum(resample.resample_to_shape(spread, shape), np.float32(0))
    spread = normalise.denormalise(spread, stats, spec.noise_std)
    return np.ascontiguousarray(spread, dtype=np.float32)
