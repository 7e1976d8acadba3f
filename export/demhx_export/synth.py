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

All arrays are ``(z, y, x)`` float32 at 1 Å/voxel.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gemmi
import mrcfile
import numpy as np
import scipy.fft
from scipy import ndimage, optimize
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from demhx_export import locscale
from demhx_export.metrics import (
    _fft_friendly,
    _read_structure,
    density_on_grid,
    model_mask,
    shell_index,
)

# Bumped whenever a change alters the generated arrays (caches key on it).
GENERATOR_VERSION = 6
VOXEL_SIZE = 1.0  # Å
FSC_THRESHOLD = 0.143
# Volume of protein per non-hydrogen atom, Å³ (about 14 Da per atom at 1.21 Å³/Da).
VOLUME_PER_ATOM = 17.0
# Radius within which neighbours are counted for the burial proxy, Å.
BURIAL_RADIUS = 10.0
# Voxels closer than this to an atom (modelled or not) count as molecule, Å.
SIGNAL_DISTANCE = 6.0
# Least distance between the molecule's outermost atom and the spherical mask's edge, Å.
SPHERE_CLEARANCE = 6.0
# Largest |target| allowed, relative to the input's largest |value| (catches blow-ups).
MAX_TARGET_RATIO = 50.0
# Unmodelled region: within this distance of an unmodelled atom, Å ...
UNMODELLED_NEAR = 2.0
# ... and at least this far from every modelled atom, Å.
UNMODELLED_CLEARANCE = 4.0
# Blob region: blob density above this fraction of its peak.
BLOB_LEVEL = 0.3
# Smallest per-atom B used in any simulated map, Å² (limits aliasing on the 1 Å grid).
MIN_B = 10.0


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

    half1: np.ndarray
    half2: np.ndarray
    input: np.ndarray
    target: np.ndarray
    model_map: np.ndarray
    signal_mask: np.ndarray  # wide soft mask of the molecule (float32 in [0, 1])
    params: dict[str, Any]
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    truth: np.ndarray | None = None
    unmodelled_region: np.ndarray | None = None
    blob_region: np.ndarray | None = None


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
    if options.target_recipe not in TARGET_RECIPES:
        raise ValueError(f"target recipe {options.target_recipe!r} is not one of "
                         f"{', '.join(TARGET_RECIPES)}")
    path = Path(structure_path)
    if resolution <= 2.0 * VOXEL_SIZE:
        raise ValueError(f"resolution {resolution} Å is at or beyond Nyquist (2 Å at 1 Å/voxel)")
    rng = np.random.default_rng([seed, zlib.crc32(path.name.encode())])
    st = _read_structure(path)
    params: dict[str, Any] = {"structure": path.name, "resolution": float(resolution),
                              "seed": int(seed), "generator_version": GENERATOR_VERSION}
    # 1. orientation and box
    positions, params = _place(st, rng, options, params)
    n = params["box"]
    # 2. per-atom B-factors (local part shared with the model map, plus the global envelope)
    local_b, params = _local_bfactors(st, positions, rng, options, params)
    # 3. signal, model map, truth and nuisance density
    atoms = [a for res in _residues(st) for a in res if a.occ > 0]
    occupancy = np.array([a.occ for a in atoms])
    unmodelled, extra_b, params = _unmodelled(positions, rng, options, params)
    signal = _simulate(st[0], atoms, occupancy,
                       np.maximum(local_b + params["global_b"], MIN_B) + extra_b, n)
    model_b = np.maximum(local_b + params["model_b_floor"], MIN_B)
    model_map = _simulate(st[0], atoms, occupancy * ~unmodelled, model_b, n)
    truth = _simulate(st[0], atoms, occupancy, model_b + extra_b, n)
    distance = _distance_to_atoms(positions, n)
    belt, blobs = _nuisance(distance, signal, rng, options, params)
    signal = signal + _blur_like_signal(belt + blobs, params)
    # 4. half-maps with calibrated coloured noise, optional spherical mask
    half1, half2, params = _half_maps(signal, resolution, rng, options, params)
    average = 0.5 * (half1 + half2)
    # 5. targets: local amplitude scaling against the model map, or the truth; masks
    modelled = int((~unmodelled).sum())
    tight = _model_mask(model_map, modelled, options.tight_dilation, options.tight_soft_edge,
                        options)
    wide = _model_mask(model_map, modelled, options.wide_dilation, options.wide_soft_edge,
                       options)
    blob_region = blobs > BLOB_LEVEL * max(float(blobs.max()), 1e-12) if blobs.any() else \
        np.zeros(blobs.shape, dtype=bool)
    truth = truth + blobs
    targets = make_targets(average, model_map, truth, tight, wide, blob_region, len(positions),
                           resolution, options)
    _check_finite(params["structure"], average, *targets.values())
    params["target_mask"] = "wide" if options.wide_target else "tight"
    params["target_recipe"] = options.target_recipe
    # the molecule region (modelled or not) and the solvent noise of the input
    molecule = np.maximum(wide, (distance < SIGNAL_DISTANCE).astype(np.float32))
    molecule = np.maximum(molecule, (targets["truth"] != 0).astype(np.float32))
    sphere = params.pop("_sphere")
    params["noise_mean"], params["noise_std"] = _solvent_noise(average - signal * sphere,
                                                               molecule, sphere)
    # 6. optionally the input as deposited, soft-masked or cut to a zone (after the noise
    #    statistics above, which describe the unmasked half-maps)
    deposit_rng = np.random.default_rng([seed, zlib.crc32(path.name.encode()), 1])
    cut, zoned, params = _deposited_mask(truth, positions, deposit_rng, options, params)
    if cut is not None:
        half1, half2, average = half1 * cut, half2 * cut, average * cut
        if zoned:
            targets = {name: t * cut for name, t in targets.items()}
    return SynthPair(half1=half1, half2=half2, input=average.astype(np.float32),
                     target=targets[options.target_recipe], model_map=model_map,
                     signal_mask=molecule, params=_json_ready(params), targets=targets,
                     truth=truth.astype(np.float32),
                     unmodelled_region=_unmodelled_region(positions, unmodelled, n),
                     blob_region=blob_region)


def _deposited_mask(truth: np.ndarray, positions: np.ndarray, rng: np.random.Generator,
                    options: SynthOptions, params: dict[str, Any]
                    ) -> tuple[np.ndarray | None, bool, dict[str, Any]]:
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
        zone = _distance_to_atoms(near, truth.shape[0]) <= distance
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


def make_targets(average: np.ndarray, model_map: np.ndarray, truth: np.ndarray,
                 tight: np.ndarray, wide: np.ndarray, blob_region: np.ndarray, atoms: int,
                 resolution: float, options: SynthOptions) -> dict[str, np.ndarray]:
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
        blob_mask = _soft_grow(blob_region, options.tight_soft_edge)
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


def write_mrc(path: Path, volume: np.ndarray, voxel_size: float = VOXEL_SIZE) -> None:
    """Write a (z, y, x) float32 map with the given voxel size and origin 0."""
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        mrc.voxel_size = voxel_size


def lowpass(volume: np.ndarray, resolution: float, edge: float = 0.1) -> np.ndarray:
    """Low-pass filter at ``resolution`` Å with a raised-cosine edge of relative width ``edge``."""
    spectrum = scipy.fft.rfftn(volume, workers=1)
    s = _frequency(volume.shape)
    cutoff = 1.0 / resolution
    t = np.clip((s - cutoff * (1 - edge)) / (cutoff * edge), 0, 1)
    spectrum *= (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
    return scipy.fft.irfftn(spectrum, s=volume.shape, workers=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# step 1: orientation and box


def _place(st: gemmi.Structure, rng: np.random.Generator, options: SynthOptions,
           params: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Rotate the model at random, choose the box and return atom positions in voxels (z, y, x)."""
    xyz = np.array([a.pos.tolist() for res in _residues(st) for a in res], dtype=np.float64)
    if len(xyz) > options.max_atoms:
        raise ValueError(f"{params['structure']}: {len(xyz)} atoms, more than max_atoms="
                         f"{options.max_atoms}; raise SynthOptions.max_atoms to use it")
    xyz -= xyz.mean(axis=0)
    margin = float(rng.uniform(*options.margin))
    # draw a few rotations and keep the first whose extent fits, else the most compact one
    best: tuple[float, np.ndarray, Rotation] | None = None
    for _ in range(8):
        rotation = Rotation.random(random_state=int(rng.integers(2**31)))
        rotated = rotation.apply(xyz)
        extent = float((rotated.max(axis=0) - rotated.min(axis=0)).max())
        if best is None or extent < best[0]:
            best = (extent, rotated, rotation)
        if extent + 2 * margin <= options.max_box:
            break
    assert best is not None  # the loop runs at least once
    extent, rotated, rotation = best
    box = int(np.clip(_fft_friendly(2 * int(np.ceil((extent + 2 * margin) / 2))),
                      options.min_box, options.max_box))
    centre = (box - 1) / 2.0
    rotated = rotated - (rotated.max(axis=0) + rotated.min(axis=0)) / 2 + centre
    # atoms that do not fit the capped box are removed (the map is then a crop of a larger one)
    occupied = np.array([a.occ > 0 for res in _residues(st) for a in res])
    inside = np.all((rotated >= 3) & (rotated <= box - 4), axis=1) & occupied
    radius = float(np.linalg.norm(rotated[inside] - centre, axis=1).max())
    params.update(box=box, margin=margin, rotation_quaternion=rotation.as_quat().tolist(),
                  atoms=int(len(xyz)), atoms_cropped=int((~inside).sum()),
                  molecule_radius=radius)
    _set_positions(st, rotated, inside)
    kept = rotated[inside]
    return kept[:, ::-1].copy(), params


def _residues(st: gemmi.Structure):
    for chain in st[0]:
        yield from chain


def _set_positions(st: gemmi.Structure, xyz: np.ndarray, keep: np.ndarray) -> None:
    """Move the atoms of model 1 to ``xyz`` (Å) and set the occupancy of dropped atoms to 0."""
    i = 0
    for res in _residues(st):
        for atom in res:
            x, y, z = xyz[i]
            atom.pos = gemmi.Position(x, y, z)
            if not keep[i]:
                atom.occ = 0.0
            i += 1


# ---------------------------------------------------------------------------------------------
# step 2: B-factors


def _local_bfactors(st: gemmi.Structure, positions: np.ndarray, rng: np.random.Generator,
                    options: SynthOptions,
                    params: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-atom B (Å²) without the global envelope: structure/burial + smooth field + radial."""
    deposited = np.array([a.b_iso for res in _residues(st) for a in res if a.occ > 0])
    varied = deposited.std() > 1.0 and len(np.unique(deposited)) > 10
    if varied:
        lo, hi = np.percentile(deposited, [5, 95])
        relative = (deposited - lo) / max(hi - lo, 1e-6)
    else:
        counts = cKDTree(positions).query_ball_point(positions, BURIAL_RADIUS,
                                                     return_length=True)
        lo, hi = np.percentile(counts, [5, 95])
        relative = (hi - counts) / max(hi - lo, 1e-6)
    spread = float(rng.uniform(*options.local_b_spread))
    structural = spread * np.clip(relative, 0.0, 1.5)
    # smooth random field: low-passed white noise sampled at the atoms, rescaled to [0, 1]
    length = float(rng.uniform(*options.smooth_b_length))
    coarse_noise = rng.standard_normal((_coarse(params["box"]),) * 3)
    field_ = ndimage.gaussian_filter(coarse_noise, length / _COARSE_STEP, mode="wrap")
    sampled = ndimage.map_coordinates(field_, positions.T / _COARSE_STEP, order=1, mode="wrap")
    sampled = (sampled - sampled.min()) / max(np.ptp(sampled), 1e-12)
    smooth_amplitude = float(rng.uniform(*options.smooth_b_amplitude))
    radius = np.linalg.norm(positions - positions.mean(axis=0), axis=1)
    radial_amplitude = float(rng.uniform(*options.radial_b_amplitude))
    radial = radial_amplitude * (radius / max(radius.max(), 1e-6)) ** 2
    global_b = _draw_global_b(params["resolution"], rng, options)
    params.update(bfactor_source="deposited" if varied else "burial", local_b_spread=spread,
                  smooth_b_amplitude=smooth_amplitude, smooth_b_length=length,
                  radial_b_amplitude=radial_amplitude, global_b=global_b,
                  model_b_floor=float(rng.uniform(*options.model_b_floor)))
    local = structural + smooth_amplitude * sampled ** 1.5 + radial
    # the best-ordered atoms sit at the global B: the map's overall B stays near the global one
    local = local - np.percentile(local, options.core_percentile)
    params["local_b_quartiles"] = np.percentile(local, [25, 50, 75]).round(1).tolist()
    return local, params


_COARSE_STEP = 4.0  # Å between samples of the smooth B field


def _coarse(box: int) -> int:
    return int(np.ceil(box / _COARSE_STEP)) + 1


def _draw_global_b(resolution: float, rng: np.random.Generator, options: SynthOptions) -> float:
    """Global B (Å²): around ``b_coefficient * resolution ** b_exponent``, jittered, clipped."""
    centre = options.b_coefficient * resolution**options.b_exponent
    value = centre * np.exp(options.global_b_jitter * rng.standard_normal())
    return float(np.clip(value, *options.global_b))


# ---------------------------------------------------------------------------------------------
# step 3: maps from the model, nuisance density


def _simulate(model: gemmi.Model, atoms: list[gemmi.Atom], occupancy: np.ndarray,
              bfactors: np.ndarray, box: int) -> np.ndarray:
    """Density of ``model`` with per-atom occupancy and B (Å²) on a box³ grid at 1 Å, (z, y, x)."""
    for atom, occ, b in zip(atoms, occupancy, bfactors, strict=True):
        atom.occ = float(occ)
        atom.b_iso = float(b)
    return density_on_grid(model, (box, box, box), (box * VOXEL_SIZE,) * 3)


def _unmodelled(positions: np.ndarray, rng: np.random.Generator, options: SynthOptions,
                params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Atoms of a peripheral slab left out of the model map, and their extra B in the map."""
    unmodelled = np.zeros(len(positions), dtype=bool)
    extra_b = np.zeros(len(positions))
    params["unmodelled_fraction"] = 0.0
    if rng.random() < options.unmodelled_probability:
        direction = rng.standard_normal(3)
        along = (positions - positions.mean(axis=0)) @ (direction / np.linalg.norm(direction))
        fraction = float(rng.uniform(*options.unmodelled_fraction))
        unmodelled = along > np.quantile(along, 1 - fraction)
        extra_b[unmodelled] = float(rng.uniform(*options.unmodelled_extra_b))
        params.update(unmodelled_fraction=fraction, unmodelled_extra_b=float(extra_b.max()))
    return unmodelled, extra_b, params


def _distance_to_atoms(positions: np.ndarray, box: int) -> np.ndarray:
    """Distance (Å) from every voxel to the nearest atom centre (voxel-rounded)."""
    occupied = np.ones((box,) * 3, dtype=bool)
    idx = np.clip(np.rint(positions).astype(int), 0, box - 1)
    occupied[tuple(idx.T)] = False
    return ndimage.distance_transform_edt(occupied).astype(np.float32)


def _nuisance(distance: np.ndarray, signal: np.ndarray, rng: np.random.Generator,
              options: SynthOptions, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Density absent from the model, unblurred: a detergent belt and disordered blobs."""
    level = float(np.percentile(signal[distance < 1.5], 50))  # typical molecule density
    belt = np.zeros_like(signal)
    blobs = np.zeros_like(signal)
    params["belt"] = bool(rng.random() < options.belt_probability)
    if params["belt"]:
        belt = _belt(distance, rng, options, params) * level
    params["blobs"] = 0
    if rng.random() < options.blob_probability:
        blobs = _blobs(distance, rng, options, params) * level
    return belt.astype(np.float32), blobs.astype(np.float32)


def _blur_like_signal(extra: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """``extra`` blurred by the map's global B (as the signal is)."""
    if not extra.any():
        return extra
    sigma = np.sqrt(params["global_b"] / (8 * np.pi**2)) / VOXEL_SIZE
    return ndimage.gaussian_filter(extra, sigma).astype(np.float32)


def _unmodelled_region(positions: np.ndarray, unmodelled: np.ndarray, box: int) -> np.ndarray:
    """Voxels near unmodelled atoms and away from modelled ones (bool, (z, y, x))."""
    if not unmodelled.any():
        return np.zeros((box,) * 3, dtype=bool)
    near = _distance_to_atoms(positions[unmodelled], box) <= UNMODELLED_NEAR
    far = _distance_to_atoms(positions[~unmodelled], box) >= UNMODELLED_CLEARANCE
    return near & far


def _soft_grow(region: np.ndarray, soft_edge: float) -> np.ndarray:
    """1 inside ``region``, a cosine fall-off over ``soft_edge`` Å outside it."""
    outside = ndimage.distance_transform_edt(~region) * VOXEL_SIZE
    t = np.clip(outside / max(soft_edge, 1e-6), 0, 1)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def _belt(distance: np.ndarray, rng: np.random.Generator, options: SynthOptions,
          params: dict[str, Any]) -> np.ndarray:
    """A band of textured low density hugging the molecule, like a detergent micelle."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    height = float(rng.uniform(*options.belt_height))
    thickness = float(rng.uniform(*options.belt_thickness))
    density = float(rng.uniform(*options.belt_density))
    centre = np.array(distance.shape) / 2 + rng.uniform(-5, 5, 3)
    grid = np.indices(distance.shape, dtype=np.float32)
    along = sum((grid[i] - centre[i]) * axis[i] for i in range(3))
    band = _smoothstep(height / 2 + 2 - np.abs(along), 4.0)
    shell = _smoothstep(distance - 2.0, 2.0) * _smoothstep(thickness - distance, 3.0)
    grain = ndimage.gaussian_filter(rng.standard_normal(distance.shape), 2.0)
    texture = 1 + 0.4 * grain / grain.std()
    params.update(belt_height=height, belt_thickness=thickness, belt_density=density,
                  belt_axis=axis.tolist())
    return (band * shell * np.clip(texture, 0, None) * density).astype(np.float32)


def _blobs(distance: np.ndarray, rng: np.random.Generator, options: SynthOptions,
           params: dict[str, Any]) -> np.ndarray:
    """A few disordered Gaussian blobs 3-15 Å from the molecule's surface."""
    candidates = np.argwhere((distance > 5) & (distance < 15))
    count = int(rng.integers(options.blob_count[0], options.blob_count[1] + 1))
    out = np.zeros(distance.shape, dtype=np.float32)
    if len(candidates) == 0:
        return out
    for _ in range(count):
        centre = candidates[rng.integers(len(candidates))]
        radius = float(rng.uniform(*options.blob_radius))
        height = float(rng.uniform(*options.blob_density))
        lo = np.maximum(centre - int(3 * radius), 0)
        hi = np.minimum(centre + int(3 * radius) + 1, distance.shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        r2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += height * np.exp(-r2 / (2 * radius**2))
    params["blobs"] = count
    return out


def _smoothstep(x: np.ndarray, width: float) -> np.ndarray:
    """0 for x <= 0, 1 for x >= width, cosine in between."""
    t = np.clip(x / width, 0, 1)
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# step 4: noise and half-maps


def _half_maps(signal: np.ndarray, resolution: float, rng: np.random.Generator,
               options: SynthOptions,
               params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Two half-maps m * (signal + sigma * noise_i) with FSC(0.143) at ``resolution``."""
    shape_params = {"noise_corner": float(rng.uniform(*options.noise_corner)),
                    "noise_slope": float(rng.uniform(*options.noise_slope)),
                    "noise_low_gain": float(rng.uniform(*options.noise_low_gain)),
                    "noise_low_width": float(rng.uniform(*options.noise_low_width))}
    sphere = np.ones_like(signal)
    params["sphere_mask"] = bool(rng.random() < options.sphere_mask_probability)
    if params["sphere_mask"]:
        sphere = _soft_sphere(signal.shape[0], rng, params)
    white1 = rng.standard_normal(signal.shape).astype(np.float32)
    white2 = rng.standard_normal(signal.shape).astype(np.float32)
    # strong low-frequency noise can push the FSC below 0.143 at low resolution first:
    # then halve the low-frequency gain until the crossing is where it was asked
    for _ in range(6):
        noise1 = _coloured_noise(white1, **shape_params)
        noise2 = _coloured_noise(white2, **shape_params)
        sigma, achieved = _calibrate_noise(signal * sphere, noise1 * sphere, noise2 * sphere,
                                           resolution)
        if abs(achieved - resolution) < 0.05:
            break
        shape_params["noise_low_gain"] /= 2
    params.update(shape_params, noise_scale=sigma, _sphere=sphere)
    half1 = (sphere * (signal + sigma * noise1)).astype(np.float32)
    half2 = (sphere * (signal + sigma * noise2)).astype(np.float32)
    return half1, half2, params


def _coloured_noise(white: np.ndarray, noise_corner: float,
                    noise_slope: float, noise_low_gain: float,
                    noise_low_width: float) -> np.ndarray:
    """Gaussian noise, unit std, zero mean, stronger at low frequency than white.

    Power spectrum: ``(1 + (s / corner)²)^(-slope / 2) + gain exp(-s² / (2 width²))``.
    """
    shape = white.shape
    spectrum = scipy.fft.rfftn(white, workers=1)
    s = _frequency(shape)
    power = ((1 + (s / noise_corner) ** 2) ** (-noise_slope / 2)
             + noise_low_gain * np.exp(-s**2 / (2 * noise_low_width**2)))
    spectrum *= np.sqrt(power).astype(np.float32)
    spectrum[0, 0, 0] = 0
    noise = scipy.fft.irfftn(spectrum, s=shape, workers=1)
    return (noise / noise.std()).astype(np.float32)


def _frequency(shape: tuple[int, ...]) -> np.ndarray:
    """|s| in 1/Å of every rFFT coefficient at 1 Å/voxel."""
    fz = np.fft.fftfreq(shape[0])[:, None, None]
    fy = np.fft.fftfreq(shape[1])[None, :, None]
    fx = np.fft.rfftfreq(shape[2])[None, None, :]
    return np.sqrt(fz**2 + fy**2 + fx**2) / VOXEL_SIZE


def _soft_sphere(box: int, rng: np.random.Generator, params: dict[str, Any]) -> np.ndarray:
    """Soft spherical mask: radius just inside the box, cosine edge of 4-10 voxels.

    The radius never cuts the molecule (refinement masks enclose the particle): it is at least
    the largest atom distance from the box centre plus ``SPHERE_CLEARANCE``.
    """
    edge = float(rng.uniform(4, 10))
    radius = max(box / 2 - 2 - edge, params["molecule_radius"] + SPHERE_CLEARANCE)
    c = (box - 1) / 2
    zz, yy, xx = np.ogrid[:box, :box, :box]
    r = np.sqrt((zz - c) ** 2 + (yy - c) ** 2 + (xx - c) ** 2)
    params.update(sphere_radius=radius, sphere_edge=edge)
    return (1 - _smoothstep(r - radius, edge)).astype(np.float32)


def _calibrate_noise(signal: np.ndarray, noise1: np.ndarray, noise2: np.ndarray,
                     resolution: float) -> tuple[float, float]:
    """Noise scale whose half-map FSC first crosses 0.143 at ``resolution`` (this realisation).

    Returns the scale and the crossing (Å) it achieves.

    The FSC of ``signal + k * noise_i`` is a closed function of ``k`` given six per-shell
    sums, so the measured crossing can be matched by bisection on ``log k``.
    """
    from demhx_export.metrics import fsc_resolution, shell_sums

    a = scipy.fft.rfftn(signal, workers=1)
    b1 = scipy.fft.rfftn(noise1, workers=1)
    b2 = scipy.fft.rfftn(noise2, workers=1)
    shells = shell_index(signal.shape)
    n_shells = min(signal.shape) // 2 + 1
    ab1, aa, _ = shell_sums(shells, n_shells, a, b1)
    ab2, _, _ = shell_sums(shells, n_shells, a, b2)
    b1b2, b1b1, b2b2 = shell_sums(shells, n_shells, b1, b2)
    frequencies = np.arange(n_shells) / (min(signal.shape) * VOXEL_SIZE)

    def crossing(log_k: float) -> float:
        k = np.exp(log_k)
        cross = aa + k * (ab1 + ab2) + k * k * b1b2
        power1 = aa + 2 * k * ab1 + k * k * b1b1
        power2 = aa + 2 * k * ab2 + k * k * b2b2
        values = cross / np.sqrt(np.maximum(power1 * power2, 1e-30))
        return min(fsc_resolution(frequencies, values, FSC_THRESHOLD), 100.0) - resolution

    lo, hi = np.log(1e-6 * signal.std() + 1e-12), np.log(1e4 * signal.std() + 1e-12)
    if crossing(lo) > 0 or crossing(hi) < 0:
        raise RuntimeError(f"cannot calibrate noise for {resolution} Å: signal too weak")
    log_k = optimize.brentq(crossing, lo, hi, xtol=1e-4)
    return float(np.exp(log_k)), float(crossing(log_k) + resolution)


# ---------------------------------------------------------------------------------------------
# step 5: masks and bookkeeping


def _model_mask(model_map: np.ndarray, atoms: int, dilation: float, soft_edge: float,
                options: SynthOptions) -> np.ndarray:
    """Soft mask: model map thresholded to enclose the molecular volume, dilated, soft edge."""
    volume = options.mask_volume_factor * VOLUME_PER_ATOM * atoms
    return model_mask(model_map, volume, VOXEL_SIZE, dilation, soft_edge)


def _solvent_noise(noise: np.ndarray, wide_mask: np.ndarray,
                   sphere: np.ndarray) -> tuple[float, float]:
    """Mean and std of the input's noise in the solvent (outside the wide mask, inside sphere)."""
    solvent = (wide_mask < 0.01) & (sphere > 0.99)
    values = noise[solvent] if solvent.sum() > 1000 else noise.ravel()
    return float(values.mean()), float(values.std())


def _check_finite(name: str, average: np.ndarray, *targets: np.ndarray) -> None:
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
