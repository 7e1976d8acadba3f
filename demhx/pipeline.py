"""The pipeline: a map in, the enhanced map out, as an array or an MRC file.

:class:`Enhancer` holds one loaded model (model, device, batch size, threads), so that many
maps are processed with a single load. It has two entry points, each taking one
:class:`~demhx.options.EnhanceOptions` (the one place the options of a run live):
:meth:`Enhancer.process` enhances an array and :meth:`Enhancer.process_file` an MRC file.
:func:`enhance` and :func:`enhance_file` load a model for one map and call them. The
several-maps loop (:mod:`demhx.batch`) and the command line use the same two.

The array path (:func:`_enhance_array`): check the inputs (:mod:`demhx.validate`) → average
the half-maps (float32) → repair isolated extreme voxels → noise statistics (automatic,
user-given or inside a mask: :func:`demhx.normalise.statistics_for`) → refuse or warn, before
any cube runs, for a map outside what the network handles → normalise so the solvent noise
has mean 0 and the model's ``noise_std`` → resample to the model's voxel size → tile, run the
network in batches and blend the cubes (:mod:`demhx.blend`) → resample back to the exact
input grid → undo the normalisation's scale → zero outside a masked map's support → check
that the output follows the input's density. Everything is float32; at most a few copies of
the volume are alive at once. Normalisation happens on the input grid, before resampling, so
that ``noise_stats`` given by a user mean what they measured on their map.

With rotations (a confidence map or ``tta``), every cube is run once per rotation of a subset
of the 24 proper cube rotations (:mod:`demhx.augment`): the output is the mean over the
rotations, and the confidence map is the spread, the per-voxel standard deviation over the
rotations (each cube's, blended with the tiling window), in the output's units.

The file path (:meth:`Enhancer.process_file`): check the output paths before any slow work,
read the input (averaging two half-maps in place after checking they share one grid), run
the array path, pass the output through the gate (:func:`demhx.validate.check_output`:
nothing all-zero, non-finite or out of proportion is written) and write the output (and the
confidence map) atomically with the input's header: axis order, origin, nstart, voxel size,
cell, labels, and one label naming demhx and the model. Nothing is written when any step
fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx import _preload, _warmup, augment, mrcio, normalise, resample, tiling, validate
from demhx.blend import TileCounts, overlap_add, overlap_add_augmented
from demhx.device import parse_devices
from demhx.errors import DemhxWarning
from demhx.model import ModelSpec
from demhx.multi_device import Loaded, load_group
from demhx.normalise import NoiseStats
from demhx.options import (
    Enhanced,
    EnhanceOptions,
    EnhanceSummary,
    Progress,
    RunInfo,
    VoxelSize,
)

__all__ = ["Enhancer", "average_half_maps", "enhance", "enhance_file"]

# --------------------------------------------------------------------------- the array path
LOG = logging.getLogger("demhx")
Volume = NDArray[np.float32]


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


@contextlib.contextmanager
def _host_threads(threads: int | None) -> Iterator[None]:
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


def _enhance_array(load: Callable[[], Loaded], volume: NDArray[Any], voxel_size: VoxelSize,
                  options: EnhanceOptions, *, half2: NDArray[Any] | None = None,
                  mask: NDArray[Any] | None = None, name: str = "volume",
                  mask_name: str = "mask", clock: _StageClock | None = None) -> Enhanced:
    """Enhance ``volume`` as ``options`` say, with the model ``load()`` returns.

    The inputs are checked before the model is loaded (``load`` is called once, after them).
    ``name`` (e.g. the file the volume came from) starts the messages of input errors, and
    ``mask_name`` those of the mask; ``clock`` receives the stage times (logged here when not
    given).
    """
    start = time.perf_counter()
    own_clock = clock is None
    if clock is None:
        clock = _StageClock()
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
        validate.check_fidelity(fidelity, name, _model_cause(runtime), runtime.spec.trained)
    info = RunInfo(shape, model_shape, stats, cubes, runtime.device, options.tiling_name,
                   time.perf_counter() - start, len(rotations) if rotations else 1, peak,
                   fidelity)
    if own_clock:
        clock.log()
    return Enhanced(np.ascontiguousarray(result, dtype=np.float32), spread, info)


def _zero_cause(info: RunInfo, runtime: Loaded) -> str:
    """Why a run's output is all zero: every cube skipped as solvent, or the model."""
    cubes = info.cubes
    if cubes.run == 0:
        return (f"all {cubes.skipped} cubes were skipped as solvent: the normalised map "
                f"never rises above solvent noise (noise std {info.noise.std:.4g}, "
                f"{info.noise.method}); check the voxel size and the noise statistics "
                "(noise_stats=, mask=), or run tiling=reference")
    return (f"{_model_cause(runtime)} returned zeros for all {cubes.run} cubes it ran; check "
            "the model (model=)")


def _check_all_zero(enhanced: Enhanced, runtime: Loaded, name: str) -> None:
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
        validate.check_fidelity(info.fidelity, name, _model_cause(runtime),
                                runtime.spec.trained)
    warnings.warn(f"{name}: the output is all zero ({_zero_cause(info, runtime)})",
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


def _model_cause(runtime: Loaded) -> str:
    """Who made an output, for the messages that blame the model."""
    return f"model {runtime.spec.label} [{runtime.model_file.name}] on {runtime.device}"


def _check_finite_output(result: Volume, spread: Volume | None, runtime: Loaded) -> None:
    """RuntimeError blaming the model when the output (or the spread) is not finite."""
    for values in (result,) if spread is None else (result, spread):
        if not validate.all_finite(values):
            bad = validate.count_nonfinite(values)
            raise RuntimeError(f"{_model_cause(runtime)} produced {bad} NaN or infinite "
                               "voxels; nothing written; check the model file, or try "
                               "device=cpu")


def _on_model_grid(normalised: Volume, voxel: tuple[float, float, float], runtime: Loaded,
                   options: EnhanceOptions, noise_fraction: float, clock: _StageClock
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
    mean, spread, cubes = _run_cubes(padded, plan, network, runtime.batch_size,
                                     options.rotations, spec.background, skip,
                                     options.progress)
    clock.add("network", network.seconds)
    clock.lap("accumulate")  # extraction, solvent test, blending, self-check
    clock.add("accumulate", -network.seconds)
    return mean, spread, cubes, model_shape


def _run_cubes(padded: Volume, plan: tiling.TilingPlan, network: _TimedPredict,
               batch_size: int, rotations: tuple[augment.Rotation, ...] | None,
               background: float, skip: float | None, progress: Progress | None
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


# --------------------------------------------------------------------------- the file path
_VOXEL_MATCH = 1e-4  # relative tolerance for two half-maps' voxel sizes (and cells)
_ORIGIN_MATCH = 1e-3  # Å: two half-maps' origins agree within this
_RIGHT_ANGLE = 90.0
_ANGLE_MATCH = 0.01  # degrees: a cell angle this close to 90° is a right angle


def _check_confidence_path(confidence: str | Path | None, output: Path, inputs: list[Path],
                           overwrite: bool) -> Path | None:
    """The confidence map's path, checked like the output's (and distinct from it)."""
    if confidence is None:
        return None
    path = mrcio.check_output_path(Path(confidence), inputs, overwrite)
    mrcio.check_distinct_outputs([("output map", output), ("confidence=", path)], inputs)
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
    """ValueError when ``half2`` names the input map itself."""
    if half2 is not None and mrcio.same_file(Path(half2), source):
        raise ValueError(f"{half2}: half2= is the input map {source} itself; pass the other "
                         "half-map of the reconstruction, or leave half2= out")


def _check_same_voxel_size(first: mrcio.MrcMap, second: mrcio.MrcMap) -> None:
    if not np.allclose(first.voxel_size, second.voxel_size, rtol=_VOXEL_MATCH, atol=0):
        sizes = ["/".join(f"{v:.4g}" for v in m.voxel_size) for m in (first, second)]
        raise ValueError(f"{second.path}: voxel size {sizes[1]} Å (z/y/x) differs from "
                         f"{first.path} {sizes[0]} Å; pass the two half-maps of one "
                         "reconstruction, or voxel_size= if a header is wrong")


def _grid_fields(item: mrcio.MrcMap, compare_cell: bool) -> dict[str, tuple[float, ...]]:
    """The fields two half-maps must share: shape, nstart, origin (and the cell)."""
    header = item.header
    values = {"shape (z, y, x)": tuple(float(n) for n in item.data.shape),
              "nstart (x, y, z)": (float(header.nxstart), float(header.nystart),
                                   float(header.nzstart)),
              "origin (x, y, z)": tuple(float(header.origin[a]) for a in "xyz")}
    if compare_cell:
        values["cell (x, y, z)"] = tuple(float(header.cella[a]) for a in "xyz")
    return values


def _check_same_grid(first: mrcio.MrcMap, second: mrcio.MrcMap, compare_cell: bool) -> None:
    """ValueError when two half-maps' shape, nstart, origin or cell differ."""
    tolerance = {"origin (x, y, z)": (0.0, _ORIGIN_MATCH), "cell (x, y, z)": (_VOXEL_MATCH, 0.0)}
    ours, theirs = _grid_fields(first, compare_cell), _grid_fields(second, compare_cell)
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
                  DemhxWarning, stacklevel=4)


def _check_output(result: NDArray[np.float32], info: RunInfo, runtime: Loaded,
                  output: Path) -> None:
    """The output gate: RuntimeError naming the cause for an all-zero or absurd output."""
    validate.check_output(result, info.input_peak, str(output), _model_cause(runtime),
                          _zero_cause(info, runtime))


def _label(runtime: Loaded, info: RunInfo) -> str:
    """The output's label: demhx, its version, the model, the tiling (and rotations)."""
    from demhx import __version__

    rotations = f", {info.augmentations} rotations" if info.augmentations > 1 else ""
    return (f"demhx {__version__}: model {runtime.spec.label}, {info.tiling} tiling"
            f"{rotations}")[:80]


# --------------------------------------------------------------------------- the public face
Map = NDArray[np.float32]


class Enhancer:
    """One loaded model, reusable for many maps.

    Parameters
    ----------
    model : registered model name, path to an ONNX file, or None for the default model.
    device : ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or several GPUs: ``"cuda:0,1"``,
        ``"cuda:all"`` (every batch split across them, :mod:`demhx.multi_device`).
    batch_size : cubes per inference call, per device (None: a default for the device).
    threads : CPU threads for ONNX Runtime and the host kernels (None: all physical cores).

    The options are checked at once; the model is loaded on first use (:attr:`runtime`),
    so that :meth:`process_file` can check its output path before any slow work.
    """

    def __init__(self, model: str | Path | None = None, *, device: str = "auto",
                 batch_size: int | None = None, threads: int | None = None) -> None:
        parse_devices(device)
        self.model, self.device = model, device
        self.batch_size = validate.check_positive("batch_size", batch_size)
        self.threads = validate.check_positive("threads", threads)
        self._runtime: Loaded | None = None
        self._loading: _preload.Background | None = None

    def __repr__(self) -> str:
        model = self.model if self._runtime is None else self._runtime.spec.label
        return (f"Enhancer(model={model!r}, device={self.device!r}, "
                f"batch_size={self.batch_size}, threads={self.threads}, "
                f"loaded={self._runtime is not None})")

    @classmethod
    def from_runtime(cls, runtime: Loaded, *, threads: int | None = None) -> Enhancer:
        """An enhancer on a model already loaded (:func:`demhx.session.load_runtime`, or a
        :class:`~demhx.multi_device.RuntimeGroup` of several devices); ``threads`` bounds its
        host kernels (as in :class:`Enhancer`)."""
        enhancer = cls(runtime.spec.path, threads=threads)
        enhancer.device, enhancer._runtime = runtime.device, runtime
        return enhancer

    @property
    def runtime(self) -> Loaded:
        """The loaded model session(s) (loaded on first access, then kept)."""
        if self._runtime is None:
            loading, self._loading = self._loading, None
            self._runtime = loading.result() if loading is not None else self._load()
        return self._runtime

    def preload(self, *, gpu_only: bool = True) -> bool:
        """Begin loading the model (and, on a GPU, running a first batch) on a background
        thread, to overlap work such as reading the map (:mod:`demhx._preload`); where it
        would not pay (no GPU possible, unless ``gpu_only=False``) or the model is loaded or
        loading already, do nothing. :attr:`runtime` waits for it and raises what loading
        raised. Returns whether a load was started."""
        if self._runtime is not None or self._loading is not None:
            return False
        self._loading = _preload.start(self._load, self.device, gpu_only=gpu_only)
        return self._loading is not None

    def _load(self) -> Loaded:
        return load_group(self.model, self.device, batch_size=self.batch_size,
                          threads=self.threads)

    def process(self, volume: NDArray[Any], voxel_size: VoxelSize,
                options: EnhanceOptions | None = None, *, half2: NDArray[Any] | None = None,
                mask: NDArray[Any] | None = None, name: str = "volume",
                mask_name: str = "mask") -> Enhanced:
        """Enhance an array: the map, the spread (with ``options.confidence``) and the run.

        ``volume``: (z, y, x), the first half-map when ``half2`` is given; ``voxel_size``: Å,
        one value or (z, y, x); ``mask``: a binary mask on the map's grid (see
        :func:`enhance`); ``name`` and ``mask_name`` start the messages of input errors.

        An all-zero output is refused where the input had density (the model erased it) and
        returned with a :class:`~demhx.errors.DemhxWarning` naming the cause otherwise (every
        cube skipped as solvent: noise in, nothing out).
        """
        with _host_threads(self.threads):
            enhanced = _enhance_array(lambda: self.runtime, volume, voxel_size,
                                      options or EnhanceOptions(), half2=half2, mask=mask,
                                      name=name, mask_name=mask_name)
        _check_all_zero(enhanced, self.runtime, name)
        return enhanced

    def process_file(self, source: str | Path, output: str | Path,
                     options: EnhanceOptions | None = None, *,
                     half2: str | Path | None = None, voxel_size: VoxelSize | None = None,
                     mask: str | Path | None = None, confidence: str | Path | None = None,
                     overwrite: bool = False) -> EnhanceSummary:
        """Enhance the map in an MRC file into a new one (see :func:`enhance_file` for the
        parameters); the confidence map is computed when ``confidence`` names its file."""
        start = time.perf_counter()
        # Check the output paths and options before any slow work.
        inputs = [Path(p) for p in (source, half2, mask) if p is not None]
        output = mrcio.check_output_path(Path(output), inputs, overwrite)
        spread_path = _check_confidence_path(confidence, output, inputs, overwrite)
        options = _file_options(options or EnhanceOptions(), spread_path)
        _check_half2_path(Path(source), half2)
        for folder in {path.parent for path in (output, spread_path) if path is not None}:
            mrcio.clean_stale_temporaries(folder)
        _warmup.start()  # numba's set-up, while the map is read and the model loaded
        self.preload()  # on a GPU: the session and a first batch, while the map is read
        # Read the map (averaging half-maps in place) and the mask.
        clock = _StageClock()
        template = _read_input(Path(source), half2, voxel_size)
        mask_data = None if mask is None else mrcio.read_map(Path(mask), template.voxel_size).data
        # Enhance, check the result, and write atomically: nothing is written if anything
        # above fails.
        with _host_threads(self.threads):
            enhanced = _enhance_array(lambda: self.runtime, template.data, template.voxel_size,
                                      options, mask=mask_data, name=str(source),
                                      mask_name=str(mask), clock=clock)
        runtime = self.runtime
        _check_output(enhanced.map, enhanced.info, runtime, output)
        label = _label(runtime, enhanced.info)
        items = [(output, enhanced.map, label)]
        if spread_path is not None and enhanced.spread is not None:
            items.insert(0, (spread_path, enhanced.spread, f"{label}, confidence: std"[:80]))
        mrcio.write_maps(items, template, overwrite=overwrite)
        clock.lap("write")
        clock.log()
        return EnhanceSummary(Path(source), None if half2 is None else Path(half2), output,
                              enhanced.info.shape, template.voxel_size, runtime.spec.label,
                              enhanced.info, time.perf_counter() - start, spread_path)


def _file_options(options: EnhanceOptions, spread_path: Path | None) -> EnhanceOptions:
    """The options of a file run: the confidence map is computed when it has a file to go to;
    ``options.confidence`` without one is refused (the map would be computed and lost)."""
    if options.confidence and spread_path is None:
        raise ValueError("options.confidence=True asks for a confidence map, but no file was "
                         "given for it; pass confidence= with the path to write it to")
    return options.replace(confidence=spread_path is not None)


def enhance(volume: NDArray[Any], voxel_size: VoxelSize, *, model: str | Path | None = None,
            half2: NDArray[Any] | None = None, mask: NDArray[Any] | None = None,
            device: str = "auto", batch_size: int | None = None, threads: int | None = None,
            **options: Any) -> Map | tuple[Map, Map]:
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
    mask : (z, y, x) array, optional
        A mask on the map's grid that marks the particle (1 on it, 0 in the solvent): the
        solvent noise is measured outside it (models with ``normalisation = mask`` take their
        statistics inside it and need it); the output is not masked by it. A masked map (a
        constant outside a region) comes out exactly 0 outside its own mask either way.
    device, batch_size, threads : see :class:`Enhancer`.
    **options : the fields of :class:`~demhx.options.EnhanceOptions` (``noise_stats``,
        ``tiling``, ``tta``, ``confidence``, ``progress``), by name.

    Returns
    -------
    (z, y, x) float32
        The enhanced map on the input grid; with ``confidence=True``, the pair
        ``(enhanced, spread)``: ``spread`` is the per-voxel standard deviation over the
        rotations of each cube's prediction (blended with the tiling's window), in the
        enhanced map's units, on the same grid; 0 in skipped solvent cubes. High spread marks
        where the turned predictions disagree. :meth:`Enhancer.process` returns the same with
        the run's record (:class:`~demhx.options.Enhanced`).
    """
    settings = EnhanceOptions(**options)
    enhancer = Enhancer(model, device=device, batch_size=batch_size, threads=threads)
    return enhancer.process(volume, voxel_size, settings, half2=half2, mask=mask).result()


def enhance_file(source: str | Path, output: str | Path, *, half2: str | Path | None = None,
                 voxel_size: VoxelSize | None = None, mask: str | Path | None = None,
                 confidence: str | Path | None = None, overwrite: bool = False,
                 model: str | Path | None = None, device: str = "auto",
                 batch_size: int | None = None, threads: int | None = None,
                 **options: Any) -> EnhanceSummary:
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
    confidence : path of the confidence map (the spread, see :func:`enhance`): written with
        the output's header (grid, nstart, origin, voxel size, axis order); the output is then
        the mean over the rotations. Checked like ``output`` and distinct from it.
    overwrite : replace existing output files.
    model, device, batch_size, threads : see :class:`Enhancer`.
    **options : the fields of :class:`~demhx.options.EnhanceOptions` but ``confidence``
        (``noise_stats``, ``tiling``, ``tta``, ``progress``), by name.

    Returns
    -------
    EnhanceSummary
        Box, voxel size, model, cubes run and skipped, rotations, device, seconds;
        ``.line()`` says it.
    """
    settings = EnhanceOptions(**options)
    enhancer = Enhancer(model, device=device, batch_size=batch_size, threads=threads)
    return enhancer.process_file(source, output, settings, half2=half2, voxel_size=voxel_size,
                                 mask=mask, confidence=confidence, overwrite=overwrite)
