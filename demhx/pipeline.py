"""The public face of the pipeline: :class:`Enhancer` and the one-shot functions.

:class:`Enhancer` holds one loaded model (model, device, batch size, threads), so that many
maps are processed with a single load. Its two entry points take one
:class:`~demhx.options.EnhanceOptions`: :meth:`Enhancer.process` enhances an array (the array
path, :mod:`demhx.run_array`) and :meth:`Enhancer.process_file` an MRC file (the file path,
:mod:`demhx.run_file`); the several-maps loop (:mod:`demhx.batch`) and the command line use
the same options object. New options are added there, and nowhere else.

:func:`enhance`, :func:`enhance_file`, :meth:`Enhancer.enhance`, :meth:`Enhancer.run` and
:meth:`Enhancer.enhance_file` are the keyword forms of the first releases; they build the
options and call the two entry points, and keep working for existing callers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import NDArray

from demhx import _preload, run_array, run_file, validate
from demhx.device import parse_devices
from demhx.multi_device import Loaded, load_group
from demhx.normalise import NoiseStats
from demhx.options import (
    Enhanced,
    EnhanceOptions,
    EnhanceSummary,
    NoiseStatsLike,
    Progress,
    RunInfo,
    VoxelSize,
)
from demhx.run_array import StageClock, average_half_maps
from demhx.tiling import TilingScheme

# Names of the first releases, importable from here as before.
__all__ = ["EnhanceOptions", "EnhanceSummary", "Enhanced", "Enhancer", "NoiseStats",
           "NoiseStatsLike", "Progress", "RunInfo", "VoxelSize", "average_half_maps",
           "check_volume", "enhance", "enhance_file", "voxel_triplet"]
check_volume = validate.check_volume
voxel_triplet = validate.voxel_triplet
Map = NDArray[np.float32]


class Enhancer:
    """One loaded model, reusable for many maps.

    Parameters
    ----------
    model : registered model name, path to an ONNX file, or None for the default model.
    device : ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or several GPUs: ``"cuda:0,1"``,
        ``"cuda:all"`` (every batch split across them, :mod:`demhx.multi_device`).
    batch_size : cubes per inference call, per device (None: a default for the device).
    threads : CPU threads for ONNX Runtime (None: all physical cores).

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

    @classmethod
    def from_runtime(cls, runtime: Loaded) -> Enhancer:
        """An enhancer on a model already loaded (:func:`demhx.session.load_runtime`, or a
        :class:`~demhx.multi_device.RuntimeGroup` of several devices)."""
        enhancer = cls(runtime.spec.path)
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
                mask_name: str = "mask", clock: StageClock | None = None) -> Enhanced:
        """Enhance an array: the map, the spread (with ``options.confidence``) and the run.

        ``volume``: (z, y, x), the first half-map when ``half2`` is given; ``voxel_size``: Å,
        one value or (z, y, x); ``mask``: a binary mask on the map's grid (see
        :func:`enhance`); ``name`` and ``mask_name`` start the messages of input errors;
        ``clock`` receives the stage times.
        """
        with run_array.host_threads(self.threads):
            return run_array.enhance_array(lambda: self.runtime, volume, voxel_size,
                                           options or EnhanceOptions(), half2=half2,
                                           mask=mask, name=name, mask_name=mask_name,
                                           clock=clock)

    def process_file(self, source: str | Path, output: str | Path,
                     options: EnhanceOptions | None = None, *,
                     half2: str | Path | None = None, voxel_size: VoxelSize | None = None,
                     mask: str | Path | None = None, confidence: str | Path | None = None,
                     overwrite: bool = False) -> EnhanceSummary:
        """Enhance an MRC file into a new one (see :func:`enhance_file` for the parameters)."""
        return run_file.enhance_file(self, source, output, options or EnhanceOptions(),
                                     half2=half2, voxel_size=voxel_size, mask=mask,
                                     confidence=confidence, overwrite=overwrite)

    @overload
    def enhance(self, volume: NDArray[Any], voxel_size: VoxelSize, *,
                half2: NDArray[Any] | None = ..., noise_stats: NoiseStatsLike = ...,
                mask: NDArray[Any] | None = ..., tiling: str | TilingScheme = ...,
                progress: Progress | None = ..., confidence: Literal[False] = ...,
                tta: int | None = ...) -> Map: ...

    @overload
    def enhance(self, volume: NDArray[Any], voxel_size: VoxelSize, *,
                half2: NDArray[Any] | None = ..., noise_stats: NoiseStatsLike = ...,
                mask: NDArray[Any] | None = ..., tiling: str | TilingScheme = ...,
                progress: Progress | None = ..., confidence: Literal[True],
                tta: int | None = ...) -> tuple[Map, Map]: ...

    def enhance(self, volume: NDArray[Any], voxel_size: VoxelSize, *,
                half2: NDArray[Any] | None = None, noise_stats: NoiseStatsLike = None,
                mask: NDArray[Any] | None = None, tiling: str | TilingScheme = "default",
                progress: Progress | None = None, confidence: bool = False,
                tta: int | None = None) -> Map | tuple[Map, Map]:
        """The enhanced map, ``(z, y, x)`` float32 on the input grid (see :func:`enhance`)."""
        options = EnhanceOptions(noise_stats, tiling, tta, confidence, progress)
        return self.checked(volume, voxel_size, options, half2=half2, mask=mask).result()

    def run(self, volume: NDArray[Any], voxel_size: VoxelSize, *,
            half2: NDArray[Any] | None = None, noise_stats: NoiseStatsLike = None,
            mask: NDArray[Any] | None = None, tiling: str | TilingScheme = "default",
            progress: Progress | None = None, name: str = "volume", confidence: bool = False,
            tta: int | None = None) -> tuple[Map | tuple[Map, Map], RunInfo]:
        """Like :meth:`enhance`, also returning a :class:`RunInfo` about the run.

        ``name`` (e.g. the file the volume came from) starts the messages of input errors.
        """
        options = EnhanceOptions(noise_stats, tiling, tta, confidence, progress)
        enhanced = self.checked(volume, voxel_size, options, half2=half2, mask=mask, name=name)
        return enhanced.result(), enhanced.info

    def checked(self, volume: NDArray[Any], voxel_size: VoxelSize, options: EnhanceOptions,
                *, half2: NDArray[Any] | None = None, mask: NDArray[Any] | None = None,
                name: str = "volume") -> Enhanced:
        """:meth:`process` with the array API's gate for an all-zero output
        (:func:`demhx.run_array.check_all_zero`: refused where the input had density, else
        returned with a warning naming the cause)."""
        enhanced = self.process(volume, voxel_size, options, half2=half2, mask=mask, name=name)
        run_array.check_all_zero(enhanced, self.runtime, name)
        return enhanced

    def enhance_file(self, source: str | Path, output: str | Path, *,
                     half2: str | Path | None = None, voxel_size: VoxelSize | None = None,
                     mask: str | Path | None = None, noise_stats: NoiseStatsLike = None,
                     overwrite: bool = False, tiling: str | TilingScheme = "default",
                     progress: Progress | None = None, confidence: str | Path | None = None,
                     tta: int | None = None) -> EnhanceSummary:
        """Enhance an MRC file into a new one (see :func:`enhance_file`)."""
        options = EnhanceOptions(noise_stats, tiling, tta, False, progress)
        return self.process_file(source, output, options, half2=half2, voxel_size=voxel_size,
                                 mask=mask, confidence=confidence, overwrite=overwrite)


@overload
def enhance(volume: NDArray[Any], voxel_size: VoxelSize, *, model: str | Path | None = ...,
            half2: NDArray[Any] | None = ..., noise_stats: NoiseStatsLike = ...,
            mask: NDArray[Any] | None = ..., device: str = ..., batch_size: int | None = ...,
            threads: int | None = ..., tiling: str | TilingScheme = ...,
            progress: Progress | None = ..., confidence: Literal[False] = ...,
            tta: int | None = ...) -> Map: ...


@overload
def enhance(volume: NDArray[Any], voxel_size: VoxelSize, *, model: str | Path | None = ...,
            half2: NDArray[Any] | None = ..., noise_stats: NoiseStatsLike = ...,
            mask: NDArray[Any] | None = ..., device: str = ..., batch_size: int | None = ...,
            threads: int | None = ..., tiling: str | TilingScheme = ...,
            progress: Progress | None = ..., confidence: Literal[True],
            tta: int | None = ...) -> tuple[Map, Map]: ...


def enhance(volume: NDArray[Any], voxel_size: VoxelSize, *, model: str | Path | None = None,
            half2: NDArray[Any] | None = None, noise_stats: NoiseStatsLike = None,
            mask: NDArray[Any] | None = None, device: str = "auto",
            batch_size: int | None = None, threads: int | None = None,
            tiling: str | TilingScheme = "default",
            progress: Progress | None = None, confidence: bool = False,
            tta: int | None = None) -> Map | tuple[Map, Map]:
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
        A mask on the map's grid that marks the particle (1 on it, 0 in the solvent): the
        solvent noise is measured outside it (models with ``normalisation = mask`` take their
        statistics inside it and need it); the output is not masked by it. A masked map (a
        constant outside a region) comes out exactly 0 outside its own mask either way.
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
    options = EnhanceOptions(noise_stats, tiling, tta, confidence, progress)
    enhancer = Enhancer(model, device=device, batch_size=batch_size, threads=threads)
    return enhancer.checked(volume, voxel_size, options, half2=half2, mask=mask).result()


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
    options = EnhanceOptions(noise_stats, tiling, tta, False, progress)
    enhancer = Enhancer(model, device=device, batch_size=batch_size, threads=threads)
    return enhancer.process_file(source, output, options, half2=half2, voxel_size=voxel_size,
                                 mask=mask, confidence=confidence, overwrite=overwrite)
