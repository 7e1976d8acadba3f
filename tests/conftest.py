"""Shared fixtures: small synthetic volumes and MRC files with any header geometry."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
from scipy import ndimage

MAPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maps"

Triplet = tuple[float, float, float]


def run_with(enhancer: Any, volume: np.ndarray, voxel_size: Any, *, half2: Any = None,
             mask: Any = None, name: str = "volume", **options: Any) -> tuple[Any, Any]:
    """``enhancer.process`` with the options given by name: (``.result()``, ``.info``)."""
    from demhx.options import EnhanceOptions

    enhanced = enhancer.process(volume, voxel_size, EnhanceOptions(**options), half2=half2,
                                mask=mask, name=name)
    return enhanced.result(), enhanced.info


def enhance_with(enhancer: Any, volume: np.ndarray, voxel_size: Any, **arguments: Any) -> Any:
    """The map (or map and spread) of :func:`run_with`."""
    return run_with(enhancer, volume, voxel_size, **arguments)[0]


def real_map(name: str) -> Path:
    """A real map from the shared test data; skips the test when it is not available."""
    path = MAPS / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_from_canonical(canonical: np.ndarray, axis_order: Sequence[int]) -> np.ndarray:
    """The (sections, rows, columns) array of a file with ``mapc, mapr, maps = axis_order``.

    Built element by element from the definition (column index runs along spatial axis
    ``mapc`` ...), independently of the transposition used by :mod:`demhx.mrcio`.
    """
    mapc, mapr, maps = axis_order
    extent = {3: canonical.shape[0], 2: canonical.shape[1], 1: canonical.shape[2]}
    stored = np.empty((extent[maps], extent[mapr], extent[mapc]), canonical.dtype)
    for section, row, column in np.ndindex(*stored.shape):
        spatial = {maps: section, mapr: row, mapc: column}  # 1 = x, 2 = y, 3 = z
        stored[section, row, column] = canonical[spatial[3], spatial[2], spatial[1]]
    return stored


def write_mrc(path: Path, canonical: np.ndarray, *, axis_order: Sequence[int] = (1, 2, 3),
              voxel_size: Triplet = (1.0, 1.0, 1.0), nstart: Sequence[int] = (0, 0, 0),
              origin: Triplet = (0.0, 0.0, 0.0), dtype: str | None = None,
              extended_header: bytes = b"", ispg: int = 1) -> Path:
    """Write a (z, y, x) volume as an MRC file with the given header geometry.

    ``axis_order`` is (mapc, mapr, maps); ``voxel_size`` is Å along (z, y, x); ``nstart``
    and ``origin`` are (x, y, z) as in the header; ``dtype`` (e.g. ``">f4"``, ``"i2"``)
    sets the stored type and byte order.
    """
    stored = stored_from_canonical(np.asarray(canonical), axis_order)
    if dtype is not None:
        stored = stored.astype(dtype)
    compression = "gzip" if path.name.endswith(".gz") else None
    with mrcfile.new(path, overwrite=True, compression=compression) as mrc:
        mrc.header.ispg = ispg
        mrc.set_data(stored)
        header = mrc.header
        header.mapc, header.mapr, header.maps = axis_order
        counts = {"x": canonical.shape[2], "y": canonical.shape[1], "z": canonical.shape[0]}
        sizes = {"x": voxel_size[2], "y": voxel_size[1], "z": voxel_size[0]}
        for letter in "xyz":
            header[f"m{letter}"] = counts[letter]
            header.cella[letter] = sizes[letter] * counts[letter]
        header.nxstart, header.nystart, header.nzstart = nstart
        header.origin = origin
        if extended_header:
            mrc.set_extended_header(np.frombuffer(extended_header, dtype="V1"))
            header.exttyp = b"MRCO"
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small map (20×24×28 voxels): noise with one bright block, as ``in.mrc``."""
    data = np.random.default_rng(0).standard_normal((20, 24, 28)).astype(np.float32) * 0.1
    data[8:12, 10:14, 12:16] += 2.0
    return write_mrc(tmp_path / "in.mrc", data)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The identity network of :mod:`onnx_fixtures` with a shipped model's metadata."""
    from onnx_fixtures import identity_path

    return identity_path(tmp_path / "models")


@pytest.fixture
def mrc_writer() -> Callable[..., Path]:
    """:func:`write_mrc` as a fixture."""
    return write_mrc


def gaussian_blobs(shape: tuple[int, int, int], centres: np.ndarray, sigma: float = 1.8
                   ) -> np.ndarray:
    """Sum of unit-height Gaussian blobs at ``centres`` (N, 3) in (z, y, x) voxels."""
    volume = np.zeros(shape, np.float32)
    reach = int(np.ceil(4 * sigma))
    for centre in centres:
        low = [max(0, int(c) - reach) for c in centre]
        high = [min(n, int(c) + reach + 1) for c, n in zip(centre, shape, strict=True)]
        if any(h <= lo for lo, h in zip(low, high, strict=True)):
            continue
        grid = np.ogrid[tuple(slice(lo, h) for lo, h in zip(low, high, strict=True))]
        distance = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        volume[tuple(slice(lo, h) for lo, h in zip(low, high, strict=True))] += np.exp(
            -distance / (2 * sigma ** 2)).astype(np.float32)
    return volume


def _points_in_ball(rng: np.random.Generator, count: int, centre: Sequence[float],
                    radius: float, inner: float = 0.0) -> np.ndarray:
    points = rng.uniform(-radius, radius, (count * 8, 3))
    norms = np.linalg.norm(points, axis=1)
    points = points[(norms <= radius) & (norms >= inner)][:count]
    return points + np.asarray(centre, dtype=float)


PARTICLES = ("centred", "off-centre", "edge", "filament", "hollow", "non-cubic")


def particle_centres(kind: str, rng: np.random.Generator
                     ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Box shape and blob centres of a synthetic particle of the given kind."""
    if kind == "centred":
        return (48, 48, 48), _points_in_ball(rng, 120, (24, 24, 24), 12)
    if kind == "off-centre":
        return (48, 48, 48), _points_in_ball(rng, 100, (12, 36, 11), 10)
    if kind == "edge":  # particle cut by the x = 0 face
        return (48, 48, 48), _points_in_ball(rng, 100, (24, 24, 3), 11)
    if kind == "filament":  # a three-strand helix along z, crossing the whole box
        z = np.arange(-4.0, 52.0, 1.5)[:, None]
        phase = z / 5 + np.arange(3)[None, :] * 2.1
        points = np.stack(np.broadcast_arrays(z, 24 + 7 * np.cos(phase), 22 + 7 * np.sin(phase)),
                          axis=-1)
        return (48, 48, 48), points.reshape(-1, 3)
    if kind == "hollow":  # a shell with an empty centre
        return (48, 48, 48), _points_in_ball(rng, 300, (24, 24, 24), 19, inner=14)
    if kind == "non-cubic":
        return (32, 44, 60), _points_in_ball(rng, 90, (16, 22, 38), 10)
    raise ValueError(kind)


def synthetic_map(kind: str, *, noise_mean: float = 0.3, noise_std: float = 0.05,
                  correlation: float = 0.0, seed: int = 1,
                  noise_boundary: str = "reflect") -> np.ndarray:
    """A particle of Gaussian blobs (peaks ≈ 12 noise stds) in noise of known mean and std.

    ``correlation`` is the Gaussian smoothing (voxels) of the noise before it is scaled back
    to ``noise_std``: 0 gives white noise, 1 noise correlated over a few voxels.
    ``noise_boundary`` is the smoothing's boundary mode; ``"wrap"`` keeps the noise std the
    same everywhere in the box, edges included.
    """
    rng = np.random.default_rng(seed)
    shape, centres = particle_centres(kind, rng)
    signal = gaussian_blobs(shape, centres)
    signal *= np.float32(12 * noise_std / signal.max())
    noise = rng.standard_normal(shape).astype(np.float32)
    if correlation > 0:
        noise = ndimage.gaussian_filter(noise, correlation, mode=noise_boundary)
    noise *= np.float32(noise_std / noise.std())
    return signal + noise + np.float32(noise_mean)


@pytest.fixture
def blob_volume() -> np.ndarray:
    """A small non-cubic (z, y, x) float32 map: a few blobs in white noise (std 0.05)."""
    rng = np.random.default_rng(7)
    shape = (20, 24, 28)
    centres = rng.uniform(6, 14, (6, 3)) * np.array(shape) / 20
    volume = gaussian_blobs(shape, centres, 2.0)
    return volume + rng.normal(0.0, 0.05, shape).astype(np.float32)
