"""What the network handles: the input-range checks that run before any cube, and the output
check that runs after the last. Measured with ``bench/input_range.py`` (``bench/RESULTS.md``,
"Input range: what the network handles"); :mod:`demhx.validate` re-exports the public names.

Inputs (refused with ``ValueError``, or warned about, before any cube runs)
    :func:`check_voxel_ratio` — the network sees every map resampled to the model's voxel
    size (1 Å). Declaring a test map's voxel size ``s`` times its true one (3 simulated
    test-split maps, 2.9–3.6 Å): for ``s`` 1–2 the output's CC to the truth is 0.005–0.15
    above the input's; from 3 to 10 the network returns the map about unchanged (CC to the
    truth within -0.03..+0.04 of the input's) while a run costs ``s³`` as many cubes; at 0.5
    and below, where resampling keeps none of the map's finer detail, the output is worse
    than the input (by 0.05–0.20; by 0.16–0.36 at 0.2–0.25). Refused outside
    :data:`VOXEL_RATIO_REFUSED` (a voxel size slipped by 10 or in the wrong units), warned
    outside :data:`VOXEL_RATIO_WARNED`. The network thus handles apparent resolutions (the
    map's resolution on the model grid) of about 2.5–9 Å; the runtime bounds them through
    the voxel size only (no resolution is estimated from the map).

    :func:`density_mass`, :func:`check_contrast` — noise is symmetric about its mean and
    density only adds above it: of the voxels beyond :data:`CONTRAST_SIGMAS` noise stds, the
    24 synthetic training inputs have at most 0.0002 times as many below the mean as above,
    the real maps at most 0.41 (EMD-5168's sharpening ripples), pure noise about 1 (however
    wrong its std); the real maps multiplied by -1 have 2.55 times as many below or more.
    Refused above :data:`INVERTED_MASS_RATIO`, when :data:`MIN_INVERTED_FRACTION` of the
    voxels or more lie below (a few deep voxels are noise or ripples).

    :func:`check_noise_level` — the solvent lies within a few noise stds of the noise mean:
    within :data:`NOISE_BAND_SIGMAS` lie 89–97 % of the voxels of the training inputs and
    46–92 % of the real maps'. A mean that leaves fewer than
    :data:`MIN_NOISE_BAND_FRACTION` there (±10 noise stds off on the test maps; a mean above
    every voxel) describes another map: refused.

    :func:`warn_low_peak` — the training inputs peak at 6.5–22 noise stds; a map peaking
    lower is partly taken for noise (EMD-3001, 5.6: its output kept 0.08 of the input's
    amplitude). Pure noise peaks at 3.7 (white) to 4.3 (smoothed) and rightly comes out
    empty, so only peaks from :data:`NOISE_PEAK_SIGMAS` to :data:`MIN_PEAK_SIGMAS` warn.

Output (after the last cube, before anything is returned or written)
    :func:`output_fidelity`, :func:`check_fidelity` — where the input stands clearly above
    its noise, the output must follow it at low resolution (means over blocks of about
    :data:`COMPARE_ANGSTROM`): on 3 test maps and every shared real map, ``tight-fast`` 0.3
    and ``tight`` 0.2, the least-squares gain from input to output is 0.49–1.29 and their
    correlation 0.69–1.00 (0.77–1.17 and 0.90–1.00 over the voxel-size sweep above). An
    erased output (EMD-3001 through ``tight-fast``: gain 0.07) or an inverted one (a test
    map times -1: 0.16) fails (``RuntimeError``, nothing written) below
    :data:`MIN_OUTPUT_GAIN` or :data:`MIN_OUTPUT_CC`, and warns below
    :data:`WARN_OUTPUT_GAIN` or :data:`WARN_OUTPUT_CC` (EMD-3001 through ``tight``: 0.51). A
    map of pure noise has no such voxels (fewer than :data:`MIN_SIGNAL_FRACTION`): the
    network's empty output passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx.errors import DemhxWarning

VOXEL_RATIO_REFUSED = (0.25, 4.0)  # map voxel / model voxel refused outside (any axis)
VOXEL_RATIO_WARNED = (0.5, 3.0)  # ... and warned about outside
TRAINED_RESOLUTIONS = (2.5, 6.0)  # Å, FSC-0.143 of the training half-maps of every shipped model
# (tight-fast 0.4 also saw 6-7.5 Å); the messages name this shared range
TAIL_QUANTILE = 1e-4  # the map's reach above and below the noise mean: these end quantiles
CONTRAST_SIGMAS = 5.0  # density: voxels beyond this many noise stds from the noise mean
INVERTED_MASS_RATIO = 2.0  # inverted: this many times as many of them below as above ...
MIN_INVERTED_FRACTION = 1e-3  # ... and at least this fraction of the voxels below
NOISE_BAND_SIGMAS = 2.0  # the solvent: voxels within this many noise stds of the noise mean
MIN_NOISE_BAND_FRACTION = 0.01  # fewer voxels there than this: the noise mean is wrong
MIN_PEAK_SIGMAS = 6.5  # maps peaking lower than this (noise stds) are warned about ...
NOISE_PEAK_SIGMAS = 5.0  # ... unless lower than this too: pure noise (3.7 white, 4.3 smooth)
SIGNAL_SIGMAS = 3.0  # the input's signal: this many noise stds above the noise mean ...
SIGNAL_TAIL_QUANTILE = 1e-3  # ... or as far as this quantile reaches below it, if less
MIN_SIGNAL_FRACTION = 1e-2  # less signal than this fraction of the voxels: no output check
MIN_OUTPUT_GAIN, WARN_OUTPUT_GAIN = 0.25, 0.4  # output / input amplitude in the signal
MIN_OUTPUT_CC, WARN_OUTPUT_CC = 0.3, 0.6  # output-input correlation in the signal
COMPARE_ANGSTROM = 3.0  # output and input compared as means over blocks of about this edge
SAMPLE_VOXELS = 1 << 20  # voxels of input and output these checks look at (evenly strided)


def _sample(volume: NDArray[Any]) -> NDArray[np.float64]:
    flat = volume.reshape(-1)
    return np.asarray(flat[::max(1, flat.size // SAMPLE_VOXELS)], dtype=np.float64)


# --------------------------------------------------------------------------- inputs


def check_voxel_ratio(voxel: Sequence[float], model_voxel: float, name: str) -> None:
    """ValueError outside :data:`VOXEL_RATIO_REFUSED`, a warning outside
    :data:`VOXEL_RATIO_WARNED`, for the map's voxel size ``voxel`` (Å, z/y/x) over the
    model's ``model_voxel``; ``name`` starts the messages."""
    ratios = [float(v) / float(model_voxel) for v in voxel]
    shown = "/".join(f"{v:.4g}" for v in voxel)
    start = f"{name}: voxel size {shown} Å is"
    coarse = max(ratios) > 1 / min(ratios)
    times = f"{max(ratios):.3g} times" if coarse else f"1/{1 / min(ratios):.3g} of"
    lowest, highest = VOXEL_RATIO_REFUSED
    if min(ratios) < lowest or max(ratios) > highest:
        effect = (f"the network leaves maps this coarse about unchanged, and resampled to its "
                  f"voxels the map would grow {max(ratios) ** 3:.0f}-fold" if coarse else
                  "resampling to its voxels would keep almost none of the map's detail")
        raise ValueError(f"{start} {times} the model's {model_voxel:g} Å, outside the "
                         f"{lowest:g}–{highest:g} times it handles: {effect}; check the voxel "
                         "size (a value in nm, or off by 10?) and pass voxel_size= in Å if "
                         "the header is wrong")
    low, high = VOXEL_RATIO_WARNED
    if min(ratios) < low:
        warnings.warn(f"{start} {times} the model's {model_voxel:g} Å: resampling to it keeps "
                      f"no detail finer than {2 * model_voxel:g} Å, and a map resolved finer "
                      f"than the network's {TRAINED_RESOLUTIONS[0]:g}–"
                      f"{TRAINED_RESOLUTIONS[1]:g} Å comes out worse than it went in; check "
                      "the voxel size and the output", DemhxWarning, stacklevel=3)
    elif max(ratios) > high:
        warnings.warn(f"{start} {times} the model's {model_voxel:g} Å: the map cannot resolve "
                      f"better than {2 * max(voxel):.3g} Å, beyond the network's "
                      f"{TRAINED_RESOLUTIONS[0]:g}–{TRAINED_RESOLUTIONS[1]:g} Å, and comes "
                      "out about unchanged; check the voxel size (voxel_size=)",
                      DemhxWarning, stacklevel=3)


def density_tails(volume: NDArray[Any], mean: float, std: float) -> tuple[float, float]:
    """How far the map reaches above and below the noise ``mean``, in noise stds ``std``:
    its :data:`TAIL_QUANTILE` quantiles from each end, taken on an evenly strided sample."""
    low, high = np.quantile(_sample(volume), (TAIL_QUANTILE, 1 - TAIL_QUANTILE))
    return (float(high) - mean) / std, (mean - float(low)) / std


def density_mass(volume: NDArray[Any], mean: float, std: float) -> tuple[float, float]:
    """The fractions of the voxels more than :data:`CONTRAST_SIGMAS` noise stds ``std`` above
    and below the noise ``mean`` (on an evenly strided sample)."""
    sample = _sample(volume)
    level = CONTRAST_SIGMAS * std
    above = np.count_nonzero(sample > mean + level) / sample.size
    return above, np.count_nonzero(sample < mean - level) / sample.size


def check_contrast(above: float, below: float, method: str, name: str) -> None:
    """ValueError when the map's density points the wrong way (a map multiplied by -1, or
    a noise mean given far too high).

    ``above`` and ``below``: :func:`density_mass` with the statistics from ``method``.
    Refused when at least :data:`MIN_INVERTED_FRACTION` of the voxels lie below the noise
    mean and :data:`INVERTED_MASS_RATIO` times as many as above it.
    """
    if not (below >= MIN_INVERTED_FRACTION and below > INVERTED_MASS_RATIO * above):
        return
    fix = ("check the noise mean given (noise_stats=) or " if method == "user" else "")
    raise ValueError(f"{name}: {below:.2%} of the voxels lie more than {CONTRAST_SIGMAS:g} "
                     f"noise stds below the noise mean ({method}) and only {above:.2%} as far "
                     "above it: the contrast looks inverted (density negative), which the "
                     f"network was never trained on; {fix}multiply the map by -1")


def check_noise_level(volume: NDArray[Any], mean: float, std: float, method: str, name: str
                      ) -> None:
    """ValueError when fewer than :data:`MIN_NOISE_BAND_FRACTION` of the voxels lie within
    :data:`NOISE_BAND_SIGMAS` noise stds ``std`` of the noise ``mean`` (from ``method``)."""
    sample = _sample(volume)
    near = np.count_nonzero(np.abs(sample - mean) <= NOISE_BAND_SIGMAS * std) / sample.size
    if near >= MIN_NOISE_BAND_FRACTION:
        return
    raise ValueError(f"{name}: the noise mean {mean:.4g} ({method}) is not where the map's "
                     f"solvent is: {near:.1%} of the voxels lie within {NOISE_BAND_SIGMAS:g} "
                     f"noise stds ({std:.4g}) of it (the map spans {sample.min():.4g} to "
                     f"{sample.max():.4g}); give the mean and std of the map's own solvent "
                     "(noise_stats=MEAN,STD), or leave noise_stats= out")


def warn_low_peak(upper: float, method: str, name: str) -> None:
    """Warn when the map peaks (``upper``, noise stds) below :data:`MIN_PEAK_SIGMAS` but not
    below :data:`NOISE_PEAK_SIGMAS`, where pure noise stays."""
    if not NOISE_PEAK_SIGMAS <= upper < MIN_PEAK_SIGMAS:
        return
    warnings.warn(f"{name}: the map peaks at only {upper:.2g} noise stds ({method}), below "
                  f"the {MIN_PEAK_SIGMAS:g}–22 the network was trained on, so it may take "
                  "its density for noise and remove it; if the map has no solvent (a crystal "
                  "map, a crop inside the particle), give the solvent's statistics "
                  "(noise_stats=MEAN,STD)", DemhxWarning, stacklevel=3)


# --------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Fidelity:
    """How the output follows the input where the input has density.

    Attributes
    ----------
    signal_fraction : fraction of the voxels where the input stands clearly above its noise
        (:func:`output_fidelity`); the two measures below are taken there.
    cc : Pearson correlation of output and input there.
    gain : least-squares factor from input (less the noise mean) to output there: about 1
        for a faithful output, near 0 for an erased one, negative for an inverted one.
    """

    signal_fraction: float
    cc: float
    gain: float


def output_fidelity(volume: NDArray[Any], result: NDArray[Any],
                    voxel_size: Sequence[float], mean: float, std: float) -> Fidelity | None:
    """The output's :class:`Fidelity` to the input, or None where the input has no signal.

    The input's signal: the voxels above the noise ``mean`` by :data:`SIGNAL_SIGMAS` noise
    stds ``std``, or by as much as the input reaches below the mean (its
    :data:`SIGNAL_TAIL_QUANTILE`; noise is symmetric, density only adds), whichever is
    less. Pure noise puts about that quantile of its voxels there: below
    :data:`MIN_SIGNAL_FRACTION` there is nothing to compare (noise in, nothing out). Input and
    output are compared at low resolution, as means over blocks of about
    :data:`COMPARE_ANGSTROM` (sharpening and blurring leave those alike), in every block
    holding signal. ``volume`` and ``result``: (z, y, x), the same grid, the map's units;
    ``voxel_size``: Å along (z, y, x).
    """
    # Where the input stands above its noise, at its own resolution.
    values = _sample(volume) - mean
    mirror = -float(np.quantile(values, SIGNAL_TAIL_QUANTILE))
    level = min(SIGNAL_SIGMAS * std, max(mirror, 0.0))
    fraction = np.count_nonzero(values > level) / values.size
    if fraction < MIN_SIGNAL_FRACTION:
        return None
    # Input and output averaged over blocks, in the blocks holding signal.
    factors = [max(1, math.ceil(COMPARE_ANGSTROM / float(v))) for v in voxel_size]
    inside = _blocks(volume > np.float32(mean + level), factors)
    inputs = _blocks(volume, factors)[inside] - mean
    outputs = _blocks(result, factors)[inside]
    inputs, outputs = _sample(inputs), _sample(outputs)
    spread = float(inputs.std() * outputs.std())
    cc = float(np.mean((inputs - inputs.mean()) * (outputs - outputs.mean())) / spread) \
        if spread > 0 else 0.0
    gain = float(np.dot(inputs, outputs) / np.dot(inputs, inputs))
    return Fidelity(fraction, cc, gain)


def _blocks(array: NDArray[Any], factors: Sequence[int]) -> NDArray[Any]:
    """Means over blocks of ``factors`` voxels along (z, y, x) (the last block of an axis may
    be shorter); for a boolean ``array``, whether any voxel of the block is set."""
    for axis, factor in enumerate(factors):
        if factor == 1:
            continue
        starts = np.arange(0, array.shape[axis], factor)
        if array.dtype == bool:
            array = np.logical_or.reduceat(array, starts, axis=axis)
            continue
        counts = np.diff(np.append(starts, array.shape[axis])).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = counts.size
        array = np.add.reduceat(array, starts, axis=axis, dtype=np.float32) / counts.reshape(shape)
    return array


def check_fidelity(fidelity: Fidelity | None, name: str, cause: str, strict: bool = True
                   ) -> None:
    """RuntimeError (only a warning when not ``strict``: an untrained model) for an output
    that erased or inverted the input's density; a warning for one that follows it loosely.

    ``name``: the input; ``cause``: the model, as :func:`demhx.run_array.model_cause` says.
    """
    if fidelity is None:
        return
    found = (f"where {name} has density ({fidelity.signal_fraction:.0%} of its voxels) the "
             f"output has {fidelity.gain:.2g} times its amplitude and a correlation of "
             f"{fidelity.cc:.2f} to it")
    if fidelity.gain < MIN_OUTPUT_GAIN or fidelity.cc < MIN_OUTPUT_CC:
        text = (f"{cause} erased or inverted the map: {found} (faithful outputs: 0.5–1.3 and "
                "0.7–1.0); the map is outside what the network handles: check the warnings "
                "above, the voxel size and the noise statistics (noise_stats=)")
        if strict:
            raise RuntimeError(f"{text}; nothing written")
        warnings.warn(text, DemhxWarning, stacklevel=2)
    elif fidelity.gain < WARN_OUTPUT_GAIN or fidelity.cc < WARN_OUTPUT_CC:
        warnings.warn(f"{cause} follows the map only loosely: {found} (faithful outputs: "
                      "0.5–1.3 and 0.7–1.0); compare the output with the input before using it",
                      DemhxWarning, stacklevel=2)
