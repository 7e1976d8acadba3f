"""Map-quality metrics: Fourier shell correlation, real-space correlation, model-simulated maps.

All volumes are ``(z, y, x)`` arrays; spatial frequencies are in 1/Å and resolutions in Å.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import scipy.fft
from numpy.typing import NDArray

# Gaussian width of a model map at resolution R, as sigma = factor * R (ChimeraX ``molmap``).
MOLMAP_SIGMA_PER_RESOLUTION = 0.225
# Padding around the box when simulating a model map, Å (keeps periodic images out of the box).
MODEL_MAP_PADDING = 8.0


def shell_index(shape: tuple[int, ...], real: bool = True) -> NDArray[Any]:
    """Integer Fourier-shell index of every (r)FFT coefficient of a volume of ``shape``.

    Shell ``k`` holds the coefficients with ``k - 0.5 <= |q| < k + 0.5`` where ``|q|`` is the
    radius measured in units of the smallest box edge's frequency step.
    """
    radius = frequency_radius(shape, real=real) * min(shape)
    return np.rint(radius).astype(np.int64)


def frequency_radius(shape: tuple[int, ...], real: bool = True) -> NDArray[np.float64]:
    """|s| in cycles per voxel of every (r)FFT coefficient of a volume of ``shape``."""
    axes = [np.fft.fftfreq(n) for n in shape[:-1]]
    axes.append(np.fft.rfftfreq(shape[-1]) if real else np.fft.fftfreq(shape[-1]))
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))


def fsc(a: NDArray[Any], b: NDArray[Any], voxel_size: float = 1.0
        ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Fourier shell correlation of two maps of the same shape.

    Parameters
    ----------
    a, b : (z, y, x) maps.
    voxel_size : Å per voxel.

    Returns
    -------
    frequencies : (n_shells,) shell centres in 1/Å, from 0 to Nyquist.
    values : (n_shells,) FSC per shell (1 where both shells are empty).
    """
    if a.shape != b.shape:
        raise ValueError(f"fsc: shapes differ, {a.shape} vs {b.shape}; resample one map first")
    fa = scipy.fft.rfftn(np.asarray(a, dtype=np.float32), workers=1)
    fb = scipy.fft.rfftn(np.asarray(b, dtype=np.float32), workers=1)
    shells = shell_index(a.shape)
    n_shells = min(a.shape) // 2 + 1
    cross, power_a, power_b = shell_sums(shells, n_shells, fa, fb)
    values = cross / np.sqrt(np.maximum(power_a * power_b, 1e-30))
    values[(power_a == 0) & (power_b == 0)] = 1.0
    frequencies = np.arange(n_shells) / (min(a.shape) * voxel_size)
    return frequencies, values


def shell_sums(shells: NDArray[Any], n_shells: int, fa: NDArray[Any],
               fb: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Per-shell sums Re(fa fb*), |fa|^2 and |fb|^2 over shells ``0 .. n_shells - 1``."""
    keep = shells < n_shells
    idx = shells[keep]
    fa, fb = fa[keep], fb[keep]
    cross = np.bincount(idx, (fa * fb.conj()).real, minlength=n_shells)
    power_a = np.bincount(idx, np.abs(fa) ** 2, minlength=n_shells)
    power_b = np.bincount(idx, np.abs(fb) ** 2, minlength=n_shells)
    return cross, power_a, power_b


def fsc_resolution(frequencies: NDArray[Any], values: NDArray[Any], threshold: float) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold``, linearly interpolated.

    Shell 0 is skipped. Returns the Nyquist resolution if the curve never falls below the
    threshold, and ``inf`` if it is below already at the first shell.
    """
    for k in range(1, len(values)):
        if values[k] < threshold:
            if k == 1:
                return float("inf")
            v0, v1 = values[k - 1], values[k]
            t = (v0 - threshold) / (v0 - v1) if v0 != v1 else 0.0
            crossing = frequencies[k - 1] + t * (frequencies[k] - frequencies[k - 1])
            return float(1.0 / crossing)
    return float(1.0 / frequencies[-1])


def cc(a: NDArray[Any], b: NDArray[Any], mask: NDArray[Any] | None = None) -> float:
    """Pearson correlation of two maps, over all voxels or over ``mask > 0.5``."""
    if a.shape != b.shape:
        raise ValueError(f"cc: shapes differ, {a.shape} vs {b.shape}")
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if mask is not None:
        keep = np.asarray(mask) > 0.5
        x, y = x[keep], y[keep]
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def model_mask(model_map: NDArray[Any], volume: float, voxel_size: float = 1.0,
               dilation: float = 2.0, soft_edge: float = 3.0) -> NDArray[np.float32]:
    """Tight soft mask from a model-simulated map: threshold, dilation, cosine edge.

    Parameters
    ----------
    model_map : (z, y, x) model-simulated map.
    volume : molecular volume the thresholded core should enclose, Å³ (the threshold is the
        level that encloses this volume after a 1 Å Gaussian smoothing).
    voxel_size : Å per voxel.
    dilation : distance added around the core, Å.
    soft_edge : width of the cosine fall-off beyond the dilation, Å.

    Returns
    -------
    (z, y, x) float32 mask in [0, 1].
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(model_map.astype(np.float32), 1.0 / voxel_size)
    fraction = min(volume / voxel_size**3 / smooth.size, 0.9)
    core = smooth > np.quantile(smooth, 1 - fraction)
    outside = ndimage.distance_transform_edt(~core) * voxel_size
    t = np.clip((outside - dilation) / max(soft_edge, 1e-6), 0, 1)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def guinier_b(volume: NDArray[Any], voxel_size: float, resolution: float,
              low_resolution: float = 10.0) -> float:
    """Global B-factor (Å²) from the slope of ln(radial amplitude) against s² (Guinier plot).

    The fit uses shells between ``low_resolution`` and ``resolution`` (Å), as RELION's
    automatic B-factor estimation does; amplitudes fall as exp(-B s² / 4).
    """
    spectrum = np.abs(scipy.fft.rfftn(volume.astype(np.float32), workers=1))
    shells = shell_index(volume.shape)
    n_shells = min(volume.shape) // 2 + 1
    keep = shells < n_shells
    amplitude = np.bincount(shells[keep], spectrum[keep], minlength=n_shells)
    counts = np.bincount(shells[keep], minlength=n_shells)
    frequencies = np.arange(n_shells) / (min(volume.shape) * voxel_size)
    use = ((frequencies >= 1 / low_resolution) & (frequencies <= 1 / resolution)
           & (counts > 0) & (amplitude > 0))
    if use.sum() < 3:
        raise ValueError(f"guinier_b: fewer than 3 shells between {low_resolution} and "
                         f"{resolution} Å in a box of {volume.shape}")
    slope = np.polyfit(frequencies[use] ** 2, np.log(amplitude[use] / counts[use]), 1)[0]
    return float(-4.0 * slope)


def sharpen(volume: NDArray[Any], voxel_size: float, b_factor: float,
            resolution: float | None = None, edge: float = 0.1) -> NDArray[np.float32]:
    """Apply exp(+B s² / 4) (sharpen by ``b_factor`` Å²), optionally low-pass at ``resolution``."""
    spectrum = scipy.fft.rfftn(volume.astype(np.float32), workers=1)
    s = frequency_radius(volume.shape) / voxel_size
    weight = np.exp(b_factor * s**2 / 4)
    if resolution is not None:
        cutoff = 1.0 / resolution
        t = np.clip((s - cutoff * (1 - edge)) / (cutoff * edge), 0, 1)
        weight = weight * (0.5 + 0.5 * np.cos(np.pi * t))
    spectrum *= weight.astype(np.float32)
    return scipy.fft.irfftn(spectrum, s=volume.shape, workers=1).astype(np.float32)


def model_map(structure: str | Path | gemmi.Structure, shape: tuple[int, int, int],
              origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
              voxel_size: float | tuple[float, float, float] = 1.0,
              resolution: float = 3.0) -> NDArray[Any]:
    """Map simulated from an atomic model on the grid of a given map.

    Atoms are blurred to a Gaussian of sigma ``0.225 * resolution`` (ChimeraX ``molmap``),
    with electron scattering factors and the model's occupancies (B-factors are ignored).

    Parameters
    ----------
    structure : model file (PDB/mmCIF, gzipped or not) or a ``gemmi.Structure``.
    shape : (z, y, x) shape of the target grid.
    origin : (x, y, z) position in Å of voxel (0, 0, 0), as in an MRC header origin.
    voxel_size : Å per voxel, one value or (x, y, z).
    resolution : resolution of the simulated map, Å.

    Returns
    -------
    (z, y, x) float32 map on the given grid.
    """
    st = _read_structure(structure)
    spacing = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))
    nz, ny, nx = shape
    pad = np.ceil(MODEL_MAP_PADDING / spacing).astype(int)
    size = np.array([nx, ny, nz]) + 2 * pad
    size = np.array([_fft_friendly(int(n)) for n in size])
    sigma = MOLMAP_SIGMA_PER_RESOLUTION * resolution
    b_value = float(8 * np.pi**2 * sigma**2)
    shift = -np.asarray(origin, dtype=np.float64) + pad * spacing
    model = st[0]
    for chain in model:
        for residue in chain:
            for atom in residue:
                p = atom.pos
                atom.pos = gemmi.Position(p.x + shift[0], p.y + shift[1], p.z + shift[2])
                atom.b_iso = b_value
    grid = density_on_grid(model, (int(size[0]), int(size[1]), int(size[2])),
                           (float(size[0] * spacing[0]), float(size[1] * spacing[1]),
                            float(size[2] * spacing[2])))
    return np.ascontiguousarray(grid[pad[2]:pad[2] + nz, pad[1]:pad[1] + ny, pad[0]:pad[0] + nx])


def density_on_grid(model: gemmi.Model, size_xyz: tuple[int, int, int],
                    cell_xyz: tuple[float, float, float], blur: float = 0.0) -> NDArray[Any]:
    """Electron-scattering density of ``model`` on a periodic P1 grid, returned as (z, y, x)."""
    calculator = gemmi.DensityCalculatorE()
    spacing = min(c / n for c, n in zip(cell_xyz, size_xyz, strict=True))
    calculator.d_min = 2.0 * spacing
    calculator.rate = 1.0
    calculator.blur = blur
    calculator.grid.set_unit_cell(gemmi.UnitCell(*cell_xyz, 90, 90, 90))
    calculator.grid.set_size(*size_xyz)
    calculator.put_model_density_on_grid(model)
    values = np.array(calculator.grid, copy=True)
    if values.shape != tuple(size_xyz):
        raise RuntimeError(f"gemmi resized the grid to {values.shape}, expected {size_xyz}")
    return np.ascontiguousarray(values.transpose(2, 1, 0).astype(np.float32))


def _read_structure(structure: Any) -> gemmi.Structure:
    """A fresh copy of a structure (file path or gemmi.Structure) without hydrogens and waters."""
    if isinstance(structure, gemmi.Structure):
        st = structure.clone()
    else:
        path = Path(structure)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model file")
        st = gemmi.read_structure(str(path))
    st.remove_hydrogens()
    st.remove_waters()
    while len(st) > 1:
        del st[1]
    return st


def _fft_friendly(n: int) -> int:
    """Smallest even integer >= n whose prime factors are 2, 3 and 5 (gemmi grids need these)."""
    n += n % 2
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 2
