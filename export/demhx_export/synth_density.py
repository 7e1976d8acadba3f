"""Steps 1-4 of :func:`demhx_export.synth.simulate_pair`: a model's noise-free maps and half-maps.

:func:`simulate_density` places the model in its box (random orientation, solvent margin),
draws its per-atom B-factors (global envelope, deposited or burial-based local term, smooth
and radial fields), and simulates the signal the half-maps see, the model map, the truth and
the nuisance density (detergent belt, disordered blobs); :func:`half_maps` adds independent
coloured noise calibrated so that the half-maps' FSC crosses 0.143 at the requested
resolution, optionally inside a soft spherical mask. Every draw comes from the generator it is
given, in a fixed order: the same seed gives the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gemmi
import numpy as np
import scipy.fft
from numpy.typing import NDArray
from scipy import ndimage, optimize
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from demhx_export.metrics import _fft_friendly, density_on_grid, shell_index

if TYPE_CHECKING:
    from demhx_export.synth import SynthOptions

VOXEL_SIZE = 1.0  # Å
FSC_THRESHOLD = 0.143
# Radius within which neighbours are counted for the burial proxy, Å.
BURIAL_RADIUS = 10.0
# Least distance between the molecule's outermost atom and the spherical mask's edge, Å.
SPHERE_CLEARANCE = 6.0
# Unmodelled region: within this distance of an unmodelled atom, Å ...
UNMODELLED_NEAR = 2.0
# ... and at least this far from every modelled atom, Å.
UNMODELLED_CLEARANCE = 4.0
# Smallest per-atom B used in any simulated map, Å² (limits aliasing on the 1 Å grid).
MIN_B = 10.0


@dataclass(frozen=True)
class Density:
    """The noise-free maps of one sample (steps 1-3 of :func:`~demhx_export.synth.simulate_pair`).

    ``signal`` is what the half-maps see (every atom with the global envelope, plus the
    nuisance density); ``model_map`` only the modelled atoms, without the envelope;
    ``truth`` every ordered atom without the envelope (the blobs are added with the targets);
    ``distance`` is each voxel's distance to the nearest atom, Å.
    """

    positions: NDArray[np.float64]
    unmodelled: NDArray[np.bool_]
    signal: NDArray[Any]
    model_map: NDArray[np.float32]
    truth: NDArray[Any]
    distance: NDArray[Any]
    blobs: NDArray[Any]


def simulate_density(st: gemmi.Structure, rng: np.random.Generator, options: SynthOptions,
                     params: dict[str, Any]) -> tuple[Density, dict[str, Any]]:
    """Place the model in its box, draw its B-factors and simulate its noise-free maps."""
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
    distance = distance_to_atoms(positions, n)
    belt, blobs = _nuisance(distance, signal, rng, options, params)
    signal = signal + _blur_like_signal(belt + blobs, params)
    return Density(positions=positions, unmodelled=unmodelled, signal=signal,
                   model_map=model_map, truth=truth, distance=distance, blobs=blobs), params


# ---------------------------------------------------------------------------------------------
# step 1: orientation and box


def _place(st: gemmi.Structure, rng: np.random.Generator, options: SynthOptions,
           params: dict[str, Any]) -> tuple[NDArray[Any], dict[str, Any]]:
    """Rotate the model at random, choose the box and return atom positions in voxels (z, y, x)."""
    xyz = np.array([a.pos.tolist() for res in _residues(st) for a in res], dtype=np.float64)
    if len(xyz) > options.max_atoms:
        raise ValueError(f"{params['structure']}: {len(xyz)} atoms, more than max_atoms="
                         f"{options.max_atoms}; raise SynthOptions.max_atoms to use it")
    xyz -= xyz.mean(axis=0)
    margin = float(rng.uniform(*options.margin))
    # draw a few rotations and keep the first whose extent fits, else the most compact one
    best: tuple[float, NDArray[Any], Rotation] | None = None
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


def _set_positions(st: gemmi.Structure, xyz: NDArray[Any], keep: NDArray[Any]) -> None:
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


def _local_bfactors(st: gemmi.Structure, positions: NDArray[Any], rng: np.random.Generator,
                    options: SynthOptions,
                    params: dict[str, Any]) -> tuple[NDArray[Any], dict[str, Any]]:
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


def _simulate(model: gemmi.Model, atoms: list[gemmi.Atom], occupancy: NDArray[Any],
              bfactors: NDArray[Any], box: int) -> NDArray[Any]:
    """Density of ``model`` with per-atom occupancy and B (Å²) on a box³ grid at 1 Å, (z, y, x)."""
    for atom, occ, b in zip(atoms, occupancy, bfactors, strict=True):
        atom.occ = float(occ)
        atom.b_iso = float(b)
    return density_on_grid(model, (box, box, box), (box * VOXEL_SIZE,) * 3)


def _unmodelled(positions: NDArray[Any], rng: np.random.Generator, options: SynthOptions,
                params: dict[str, Any]) -> tuple[NDArray[Any], NDArray[Any], dict[str, Any]]:
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


def distance_to_atoms(positions: NDArray[Any], box: int) -> NDArray[Any]:
    """Distance (Å) from every voxel to the nearest atom centre (voxel-rounded)."""
    occupied = np.ones((box,) * 3, dtype=bool)
    idx = np.clip(np.rint(positions).astype(int), 0, box - 1)
    occupied[tuple(idx.T)] = False
    return ndimage.distance_transform_edt(occupied).astype(np.float32)


def _nuisance(distance: NDArray[Any], signal: NDArray[Any], rng: np.random.Generator,
              options: SynthOptions, params: dict[str, Any]) -> tuple[NDArray[Any], NDArray[Any]]:
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


def _blur_like_signal(extra: NDArray[Any], params: dict[str, Any]) -> NDArray[Any]:
    """``extra`` blurred by the map's global B (as the signal is)."""
    if not extra.any():
        return extra
    sigma = np.sqrt(params["global_b"] / (8 * np.pi**2)) / VOXEL_SIZE
    return ndimage.gaussian_filter(extra, sigma).astype(np.float32)


def unmodelled_region(positions: NDArray[Any], unmodelled: NDArray[Any], box: int) -> NDArray[Any]:
    """Voxels near unmodelled atoms and away from modelled ones (bool, (z, y, x))."""
    if not unmodelled.any():
        return np.zeros((box,) * 3, dtype=bool)
    near = distance_to_atoms(positions[unmodelled], box) <= UNMODELLED_NEAR
    far = distance_to_atoms(positions[~unmodelled], box) >= UNMODELLED_CLEARANCE
    return near & far


def soft_grow(region: NDArray[Any], soft_edge: float) -> NDArray[Any]:
    """1 inside ``region``, a cosine fall-off over ``soft_edge`` Å outside it."""
    outside = ndimage.distance_transform_edt(~region) * VOXEL_SIZE
    t = np.clip(outside / max(soft_edge, 1e-6), 0, 1)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def _belt(distance: NDArray[Any], rng: np.random.Generator, options: SynthOptions,
          params: dict[str, Any]) -> NDArray[Any]:
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


def _blobs(distance: NDArray[Any], rng: np.random.Generator, options: SynthOptions,
           params: dict[str, Any]) -> NDArray[Any]:
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


def _smoothstep(x: NDArray[Any], width: float) -> NDArray[Any]:
    """0 for x <= 0, 1 for x >= width, cosine in between."""
    t = np.clip(x / width, 0, 1)
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# step 4: noise and half-maps


def half_maps(signal: NDArray[Any], resolution: float, rng: np.random.Generator,
              options: SynthOptions,
              params: dict[str, Any]) -> tuple[NDArray[Any], NDArray[Any], dict[str, Any]]:
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


def _coloured_noise(white: NDArray[Any], noise_corner: float,
                    noise_slope: float, noise_low_gain: float,
                    noise_low_width: float) -> NDArray[Any]:
    """Gaussian noise, unit std, zero mean, stronger at low frequency than white.

    Power spectrum: ``(1 + (s / corner)²)^(-slope / 2) + gain exp(-s² / (2 width²))``.
    """
    shape = white.shape
    spectrum = scipy.fft.rfftn(white, workers=1)
    s = frequency(shape)
    power = ((1 + (s / noise_corner) ** 2) ** (-noise_slope / 2)
             + noise_low_gain * np.exp(-s**2 / (2 * noise_low_width**2)))
    spectrum *= np.sqrt(power).astype(np.float32)
    spectrum[0, 0, 0] = 0
    noise = scipy.fft.irfftn(spectrum, s=shape, workers=1)
    return (noise / noise.std()).astype(np.float32)


def frequency(shape: tuple[int, ...]) -> NDArray[Any]:
    """|s| in 1/Å of every rFFT coefficient at 1 Å/voxel."""
    fz = np.fft.fftfreq(shape[0])[:, None, None]
    fy = np.fft.fftfreq(shape[1])[None, :, None]
    fx = np.fft.rfftfreq(shape[2])[None, None, :]
    return np.sqrt(fz**2 + fy**2 + fx**2) / VOXEL_SIZE


def _soft_sphere(box: int, rng: np.random.Generator, params: dict[str, Any]) -> NDArray[Any]:
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


def _calibrate_noise(signal: NDArray[Any], noise1: NDArray[Any], noise2: NDArray[Any],
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


__all__ = ["MIN_B", "VOXEL_SIZE", "Density", "distance_to_atoms", "frequency", "half_maps",
           "simulate_density", "soft_grow", "unmodelled_region"]
