"""Experimental-like cryo-EM half-maps and LocScale-style targets simulated from atomic models.

One sample (:func:`simulate_pair`) is made in named steps, all driven by one seed:

1. the model is rotated at random and centred in a cubic box with generous solvent;
2. every atom gets a B-factor: a global envelope (unsharpened maps, 50-200 Å²), plus a local
   term from the deposited B-factors (rescaled) or, where the file has none, from burial
   (few neighbours = high B), plus a smooth random field and a radial term, so that the
   periphery and flexible parts are much worse than the core;
3. the map of the model with these B-factors is the signal; nuisance density that the target
   must not contain (a detergent/lipid belt around a band, disordered blobs) is added to it;
4. two half-maps get independent coloured noise (stronger at low frequency than white),
   scaled so that their FSC crosses 0.143 at the requested resolution; optionally a soft
   spherical mask is applied, as refinement programs do;
5. the input is the half-map average; the targets (:func:`make_targets`) are the input
   locally amplitude-scaled against the model map (model B-factors without the global
   envelope), with or without a low-pass at the resolution, times a tight soft mask made
   from the model map (LocScale-style), and the "truth": every ordered atom, modelled or
   not, without the global envelope, plus the blob density, tightly masked;
6. optionally the input is masked or cut to a zone as deposited maps are (exact zeros
   outside).

Steps 1-4 are made in :mod:`demhx_export.synth_density`. All arrays are ``(z, y, x)``
float32 at 1 Å/voxel.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import scipy.fft
from numpy.typing import NDArray

from demhx_export import locscale
from demhx_export.metrics import _read_structure, model_mask
from demhx_export.synth_density import (
    VOXEL_SIZE,
    Density,
    distance_to_atoms,
    frequency,
    half_maps,
    simulate_density,
    soft_grow,
    unmodelled_region,
)

# Bumped whenever a change alters the generated arrays (caches key on it).
GENERATOR_VERSION = 6
# Volume of protein per non-hydrogen atom, Å³ (about 14 Da per atom at 1.21 Å³/Da).
VOLUME_PER_ATOM = 17.0
# Voxels closer than this to an atom (modelled or not) count as molecule, Å.
SIGNAL_DISTANCE = 6.0
# Largest |target| allowed, relative to the input's largest |value| (catches blow-ups).
MAX_TARGET_RATIO = 50.0
# Blob region: blob density above this fraction of its peak.
BLOB_LEVEL = 0.3


@dataclass(frozen=True)
class SynthOptions:
    """Ranges of the randomly drawn degradations; every range is (low, high), uniform.

    Units: lengths in Å, B-factors in Å², probabilities in [0, 1].
    """

    max_box: int = 160
    min_box: int = 72
    max_atoms: int = 25_000
    margin: tuple[float, float] = (14.0, 32.0)
    global_b: tuple[float, float] = (50.0, 200.0)
    # global B is drawn around b_coefficient * resolution ** b_exponent (worse maps have
    # larger B); generator version 2 used (28, 1)
    b_coefficient: float = 6.0
    b_exponent: float = 2.0
    global_b_jitter: float = 0.15
    # a peripheral part of the molecule left out of the model (flexible, unmodelled domain):
    # probability, fraction of atoms, extra B in the map
    unmodelled_probability: float = 0.5
    unmodelled_fraction: tuple[float, float] = (0.05, 0.3)
    unmodelled_extra_b: tuple[float, float] = (30.0, 150.0)
    local_b_spread: tuple[float, float] = (20.0, 80.0)
    smooth_b_amplitude: tuple[float, float] = (0.0, 120.0)
    smooth_b_length: tuple[float, float] = (12.0, 30.0)
    radial_b_amplitude: tuple[float, float] = (0.0, 80.0)
    model_b_floor: tuple[float, float] = (10.0, 30.0)
    core_percentile: float = 20.0  # atoms below this percentile of local B get the global B
    noise_corner: tuple[float, float] = (1 / 12, 1 / 4)  # 1/Å, where noise starts to fall
    noise_slope: tuple[float, float] = (0.0, 1.0)  # power-law exponent of the noise power
    # low-frequency excess (CTF-corrected noise is boosted where the CTF is small):
    # gain over the high-frequency level at s = 0, and Gaussian width in 1/Å
    noise_low_gain: tuple[float, float] = (5.0, 100.0)
    noise_low_width: tuple[float, float] = (1 / 30, 1 / 12)
    belt_probability: float = 0.25
    belt_height: tuple[float, float] = (24.0, 40.0)
    belt_thickness: tuple[float, float] = (8.0, 18.0)
    belt_density: tuple[float, float] = (0.2, 0.5)  # relative to the molecule's density
    blob_probability: float = 0.5
    blob_count: tuple[int, int] = (1, 6)
    blob_radius: tuple[float, float] = (3.0, 8.0)
    blob_density: tuple[float, float] = (0.2, 0.8)
    sphere_mask_probability: float = 0.3
    # the input as deposited maps are (exact zeros outside; drawn with their own random
    # stream, so switching them on leaves the rest of a sample unchanged): a soft mask around
    # the density (volume factor x the molecular volume, dilation, cosine edge) ...
    deposited_mask_probability: float = 0.0
    deposited_volume_factor: tuple[float, float] = (1.0, 2.5)
    deposited_dilation: tuple[float, float] = (2.0, 8.0)
    deposited_soft_edge: tuple[float, float] = (3.0, 10.0)
    # ... or a zone: voxels within a distance of the atoms near a random atom (hard edge);
    # the targets are cut to the same zone
    zone_probability: float = 0.0
    zone_radius: tuple[float, float] = (15.0, 35.0)
    zone_distance: tuple[float, float] = (2.5, 5.0)
    tight_dilation: float = 2.0
    tight_soft_edge: float = 3.0
    wide_dilation: float = 6.0
    wide_soft_edge: float = 6.0
    mask_volume_factor: float = 1.0  # mask core volume / (VOLUME_PER_ATOM * atoms)
    locscale_window: int = locscale.DEFAULT_WINDOW
    locscale_step: int = locscale.DEFAULT_STEP
    target_lowpass: bool = True
    wide_target: bool = False
    # which target ``SynthPair.target`` holds (every recipe is in ``SynthPair.targets``)
    target_recipe: str = "locscale"
    # "truth" target: low-pass at resolution * this factor (< 1: somewhat beyond the map's
    # resolution, as model-map targets are made)
    truth_lowpass_factor: float = 0.8
    extra: dict[str, Any] = field(default_factory=dict)


# Target recipes (see :func:`make_targets`).
TARGET_RECIPES = ("locscale", "locscale-full", "truth")


@dataclass
class SynthPair:
    """One simulated sample; all maps (z, y, x) float32 at 1 Å/voxel.

    ``targets`` holds every recipe of :data:`TARGET_RECIPES`; ``target`` is the one the
    options asked for. ``truth`` is the density of every ordered atom (modelled or not) without
    the global envelope, plus the blob density; ``unmodelled_region`` and ``blob_region`` mark
    density that is in the half-maps but not in the model map (for model-bias checks).
    """

    half1: NDArray[np.float32]
    half2: NDArray[np.float32]
    input: NDArray[np.float32]
    target: NDArray[np.float32]
    model_map: NDArray[np.float32]
    signal_mask: NDArray[np.float32]  # wide soft mask of the molecule (in [0, 1])
    params: dict[str, Any]
    targets: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    truth: NDArray[np.float32] | None = None
    unmodelled_region: NDArray[np.bool_] | None = None
    blob_region: NDArray[np.bool_] | None = None


def simulate_pair(structure_path: str | Path, resolution: float, seed: int,
                  options: SynthOptions | None = None) -> SynthPair:
    """Simulate two half-maps, their average and a LocScale-style target from a model.

    Parameters
    ----------
    structure_path : PDB/mmCIF model (gzipped or not).
    resolution : FSC-0.143 resolution of the half-maps, Å (> 2 Å, the Nyquist limit).
    seed : random seed; the same seed and structure give identical arrays.
    options : ranges of the random degradations (defaults: :class:`SynthOptions`).

    Returns
    -------
    SynthPair with all drawn parameters in ``params`` (JSON-serialisable).
    """
    options = options or SynthOptions()
    path = Path(structure_path)
    _check_request(options, resolution)
    rng = np.random.default_rng([seed, zlib.crc32(path.name.encode())])
    st = _read_structure(path)
    params: dict[str, Any] = {"structure": path.name, "resolution": float(resolution),
                              "seed": int(seed), "generator_version": GENERATOR_VERSION}
    # 1-3. orientation and box, per-atom B-factors, signal, model map, truth, nuisance density
    density, params = simulate_density(st, rng, options, params)
    # 4. half-maps with calibrated coloured noise, optional spherical mask
    half1, half2, params = half_maps(density.signal, resolution, rng, options, params)
    average = 0.5 * (half1 + half2)
    # 5. targets: local amplitude scaling against the model map, or the truth; masks
    targets, wide, blob_region, truth = _targets(average, density, resolution, options)
    _check_finite(params["structure"], average, *targets.values())
    params["target_mask"] = "wide" if options.wide_target else "tight"
    params["target_recipe"] = options.target_recipe
    # the molecule region (modelled or not) and the solvent noise of the input
    molecule = np.maximum(wide, (density.distance < SIGNAL_DISTANCE).astype(np.float32))
    molecule = np.maximum(molecule, (targets["truth"] != 0).astype(np.float32))
    sphere = params.pop("_sphere")
    params["noise_mean"], params["noise_std"] = _solvent_noise(
        average - density.signal * sphere, molecule, sphere)
    # 6. optionally the input as deposited, soft-masked or cut to a zone (after the noise
    #    statistics above, which describe the unmasked half-maps)
    deposit_rng = np.random.default_rng([seed, zlib.crc32(path.name.encode()), 1])
    cut, zoned, params = _deposited_mask(truth, density.positions, deposit_rng, options, params)
    if cut is not None:
        half1, half2, average = half1 * cut, half2 * cut, average * cut
        if zoned:
            targets = {name: t * cut for name, t in targets.items()}
    return SynthPair(half1=half1, half2=half2, input=average.astype(np.float32),
                     target=targets[options.target_recipe], model_map=density.model_map,
                     signal_mask=molecule, params=_json_ready(params), targets=targets,
                     truth=truth.astype(np.float32),
                     unmodelled_region=unmodelled_region(density.positions,
                                                         density.unmodelled, params["box"]),
                     blob_region=blob_region)


def _check_request(options: SynthOptions, resolution: float) -> None:
    """Refuse an unknown target recipe or a resolution the 1 Å grid cannot hold."""
    if options.target_recipe not in TARGET_RECIPES:
        raise ValueError(f"target recipe {options.target_recipe!r} is not one of "
                         f"{', '.join(TARGET_RECIPES)}")
    if resolution <= 2.0 * VOXEL_SIZE:
        raise ValueError(f"resolution {resolution} Å is at or beyond Nyquist (2 Å at 1 Å/voxel)")


def _targets(average: NDArray[Any], density: Density, resolution: float,
             options: SynthOptions
             ) -> tuple[dict[str, NDArray[Any]], NDArray[Any], NDArray[np.bool_], NDArray[Any]]:
    """Every target recipe, the wide mask, the blob region and the truth with the blobs."""
    modelled = int((~density.unmodelled).sum())
    tight = _model_mask(density.model_map, modelled, options.tight_dilation,
                        options.tight_soft_edge, options)
    wide = _model_mask(density.model_map, modelled, options.wide_dilation,
                       options.wide_soft_edge, options)
    blobs = density.blobs
    blob_region = blobs > BLOB_LEVEL * max(float(blobs.max()), 1e-12) if blobs.any() else \
        np.zeros(blobs.shape, dtype=bool)
    truth = density.truth + blobs
    targets = make_targets(average, density.model_map, truth, tight, wide, blob_region,
                           len(density.positions), resolution, options)
    return targets, wide, blob_region, truth


def _deposited_mask(truth: NDArray[Any], positions: NDArray[Any], rng: np.random.Generator,
                    options: SynthOptions, params: dict[str, Any]
                    ) -> tuple[NDArray[Any] | None, bool, dict[str, Any]]:
    """A deposited-style mask for the input (float32, exact 0 outside), whether it is a zone.

    None when the sample stays unmasked. Soft masks are made from the truth map as
    refinement programs make them from the map (threshold, dilation, cosine edge); zones
    keep the voxels within a distance of the atoms near a random atom, with a hard edge.
    """
    draw = rng.random()
    params["deposited"] = "none"
    if draw < options.zone_probability:
        centre = positions[rng.integers(len(positions))]
        radius = float(rng.uniform(*options.zone_radius))
        near = positions[np.linalg.norm(positions - centre, axis=1) <= radius]
        distance = float(rng.uniform(*options.zone_distance))
        zone = distance_to_atoms(near, truth.shape[0]) <= distance
        params.update(deposited="zone", zone_radius=radius, zone_distance=distance,
                      zone_atoms=int(len(near)))
        return zone.astype(np.float32), True, params
    if draw < options.zone_probability + options.deposited_mask_probability:
        factor = float(rng.uniform(*options.deposited_volume_factor))
        dilation = float(rng.uniform(*options.deposited_dilation))
        edge = float(rng.uniform(*options.deposited_soft_edge))
        mask = model_mask(truth, factor * VOLUME_PER_ATOM * len(positions), VOXEL_SIZE,
                          dilation, edge)
        params.update(deposited="soft mask", deposited_volume_factor=factor,
                      deposited_dilation=dilation, deposited_soft_edge=edge)
        return mask, False, params
    return None, False, params


def make_targets(average: NDArray[Any], model_map: NDArray[Any], truth: NDArray[Any],
                 tight: NDArray[Any], wide: NDArray[Any], blob_region: NDArray[Any], atoms: int,
                 resolution: float, options: SynthOptions) -> dict[str, NDArray[np.float32]]:
    """Every target recipe of :data:`TARGET_RECIPES` for one sample, (z, y, x) float32.

    ``locscale``
        the input locally amplitude-scaled against the model map (LocScale-style), low-passed
        at the resolution (unless ``options.target_lowpass`` is False), times the tight (or,
        with ``options.wide_target``, wide) model mask: the paper's target;
    ``locscale-full``
        the same without the low-pass;
    ``truth``
        the map of every ordered atom — modelled or not, each with its local B but without
        the map's global envelope — plus the blob (ligand-like) density, low-passed at
        ``resolution * options.truth_lowpass_factor`` and times a tight mask of that map
        (threshold enclosing the molecular volume of all atoms, +2 Å, 3 Å cosine edge) and of
        the blobs. A model-map target in the manner of EMReady, made from the simulation's
        ground truth so that density missing from the model is not erased.
    """
    mask = wide if options.wide_target else tight
    scaled = locscale.local_amplitude_scaling(average, model_map, region=mask > 0,
                                              window=options.locscale_window,
                                              step=options.locscale_step)
    full = (scaled * mask).astype(np.float32)
    low = (lowpass(scaled, resolution) * mask).astype(np.float32)
    truth_mask = _model_mask(truth, atoms, options.tight_dilation, options.tight_soft_edge,
                             options)
    if blob_region.any():
        blob_mask = soft_grow(blob_region, options.tight_soft_edge)
        truth_mask = np.maximum(truth_mask, blob_mask)
    sharp = lowpass(truth, resolution * options.truth_lowpass_factor)
    return {"locscale": low if options.target_lowpass else full, "locscale-full": full,
            "truth": (sharp * truth_mask).astype(np.float32)}


def synth_command(structure: str, outdir: str, resolution: float = 3.5, seed: int = 0,
                  wide: bool = False) -> None:
    """Write one simulated sample as MRC files plus ``params.json``.

    Parameters
    ----------
    structure : PDB/mmCIF model file.
    outdir : output folder (created); receives half1.mrc, half2.mrc, input.mrc, target.mrc,
        model_map.mrc and params.json.
    resolution : FSC-0.143 resolution of the half-maps, Å.
    seed : random seed (same seed, same files).
    wide : make the target with the wide (looser) mask.
    """
    pair = simulate_pair(structure, resolution, seed, SynthOptions(wide_target=wide))
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("half1", "half2", "input", "target", "model_map"):
        write_mrc(out / f"{name}.mrc", getattr(pair, name))
    (out / "params.json").write_text(json.dumps(pair.params, indent=1) + "\n")


def write_mrc(path: Path, volume: NDArray[Any], voxel_size: float = VOXEL_SIZE) -> None:
    """Write a (z, y, x) float32 map with the given voxel size and origin 0."""
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        mrc.voxel_size = voxel_size


def lowpass(volume: NDArray[Any], resolution: float, edge: float = 0.1
            ) -> NDArray[np.float32]:
    """Low-pass filter at ``resolution`` Å with a raised-cosine edge of relative width ``edge``."""
    spectrum = scipy.fft.rfftn(volume, workers=1)
    s = frequency(volume.shape)
    cutoff = 1.0 / resolution
    t = np.clip((s - cutoff * (1 - edge)) / (cutoff * edge), 0, 1)
    spectrum *= (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
    return scipy.fft.irfftn(spectrum, s=volume.shape, workers=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# step 5: masks and bookkeeping


def _model_mask(model_map: NDArray[Any], atoms: int, dilation: float, soft_edge: float,
                options: SynthOptions) -> NDArray[Any]:
    """Soft mask: model map thresholded to enclose the molecular volume, dilated, soft edge."""
    volume = options.mask_volume_factor * VOLUME_PER_ATOM * atoms
    return model_mask(model_map, volume, VOXEL_SIZE, dilation, soft_edge)


def _solvent_noise(noise: NDArray[Any], wide_mask: NDArray[Any],
                   sphere: NDArray[Any]) -> tuple[float, float]:
    """Mean and std of the input's noise in the solvent (outside the wide mask, inside sphere)."""
    solvent = (wide_mask < 0.01) & (sphere > 0.99)
    values = noise[solvent] if solvent.sum() > 1000 else noise.ravel()
    return float(values.mean()), float(values.std())


def _check_finite(name: str, average: NDArray[Any], *targets: NDArray[Any]) -> None:
    """Refuse a sample whose targets are not finite or out of all proportion to the input."""
    bound = MAX_TARGET_RATIO * float(np.abs(average).max())
    if any(not np.isfinite(t).all() or float(np.abs(t).max()) > bound for t in targets):
        raise RuntimeError(f"{name}: the target is not finite or exceeds {MAX_TARGET_RATIO} "
                           "times the input's maximum; sample rejected")


def _json_ready(params: dict[str, Any]) -> dict[str, Any]:
    """Plain Python scalars and lists only."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    return out


def options_dict(options: SynthOptions) -> dict[str, Any]:
    """The options as a JSON-serialisable dict (for dataset indexes)."""
    return _json_ready(asdict(options))
