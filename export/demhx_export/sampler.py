"""Random training cubes from a dataset built by :mod:`demhx_export.dataset`.

Cubes are balanced between the molecule and the solvent (``signal_fraction`` of the cubes are
centred on a molecule voxel, the rest on a solvent voxel) and, for training, augmented as in
the DeepEMhancer paper: one of the 24 rotations of the cube (no mirror images: proteins are
chiral), Gaussian blurring of the input and corruption of a patch of the input.

Negatives (``negative_fraction`` of the cubes) have an empty target and come from one of two
sources (``negative_source``), scaled by a random factor:

``"cube"``  the input cube with its Fourier phases randomised: the same amplitude spectrum as
    the molecule or solvent it came from, at the molecule's amplitude. Too strong a lesson:
    smooth, bright low-resolution density (a 6-7 Å map) looks locally like such a cube, and
    networks trained on them erase it.
``"map"``   a cube of the whole map phase-randomised and then normalised by the runtime's own
    statistics (the dataset's ``negative`` arrays, :func:`demhx_export.dataset.whole_map_negative`):
    what a user's noise map looks like to the network — coloured like the map, at the level
    of noise (std about ``NOISE_STD``), not of the molecule.

Either teaches that power without structure is noise: noise in, nothing out.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from demhx_export.onnx_io import NOISE_STD  # std of normalised solvent noise: fills patches

# Centres kept per map and class (molecule / solvent), drawn once.
CENTRES_PER_CLASS = 4096
BLUR_PROBABILITY = 0.2
BLUR_SIGMA = (0.5, 1.5)  # voxels
PATCH_PROBABILITY = 0.2
PATCH_EDGE = (1 / 8, 1 / 4)  # fraction of the cube edge
NEGATIVE_SCALE = (0.5, 2.0)  # negatives' random amplitude factor, drawn log-uniformly (default)
NEGATIVE_SOURCES = ("cube", "map")


Rotation = tuple[tuple[int, ...], tuple[bool, ...]]


def cube_rotations() -> list[Rotation]:
    """The 24 proper rotations of a cube as (axis permutation, axes to flip)."""
    rotations: list[Rotation] = []
    for perm in itertools.permutations(range(3)):
        parity = _permutation_sign(perm)
        for flips in itertools.product((False, True), repeat=3):
            if parity * (-1) ** sum(flips) == 1:
                rotations.append((perm, flips))
    return rotations


def rotate(cube: NDArray[Any], rotation: Rotation) -> NDArray[Any]:
    """Apply one of :func:`cube_rotations` to the last three axes of ``cube``."""
    perm, flips = rotation
    lead = cube.ndim - 3
    out = np.transpose(cube, tuple(range(lead)) + tuple(lead + p for p in perm))
    axes = tuple(lead + i for i, f in enumerate(flips) if f)
    return np.ascontiguousarray(np.flip(out, axes) if axes else out)


class CubeSampler:
    """Balanced, augmented (input, target) cubes from a dataset folder.

    Parameters
    ----------
    dataset_dir : folder with index.json and the .npz samples.
    cube_size : cube edge, voxels.
    batch_size : cubes per batch.
    seed : seed of the batch stream (the same seed gives the same batches).
    signal_fraction : fraction of cubes centred on the molecule.
    augment : apply rotations, blur and patch corruption in :meth:`batch`.
    preload : keep all maps in memory (otherwise each cube reads its file).
    target : target recipe to train towards (``target_<recipe>`` in the samples; datasets
        of generator version 5 and older hold one target, ``target``, the ``locscale`` one).
    negative_fraction : fraction of cubes made negatives (phase-randomised input, empty
        target; see the module's docstring).
    negative_scale : (low, high) range of the negatives' amplitude factor, drawn
        log-uniformly.
    negative_source : "cube" or "map" (see the module's docstring); "map" needs a dataset
        with ``negative`` arrays.
    """

    def __init__(self, dataset_dir: str | Path, cube_size: int = 64, batch_size: int = 4,
                 seed: int = 0, signal_fraction: float = 0.7, augment: bool = True,
                 preload: bool = True, target: str = "locscale",
                 negative_fraction: float = 0.0,
                 negative_scale: tuple[float, float] = NEGATIVE_SCALE,
                 negative_source: str = "cube") -> None:
        self.dir = Path(dataset_dir)
        index_path = self.dir / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no dataset index; build one with "
                                    "demhx-export build")
        self.entries = json.loads(index_path.read_text())
        if not self.entries:
            raise ValueError(f"{index_path}: the dataset is empty")
        for name, value in (("signal_fraction", signal_fraction),
                            ("negative_fraction", negative_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} is not in [0, 1]")
        self.negative_fraction = float(negative_fraction)
        low, high = (float(v) for v in negative_scale)
        if not 0 < low <= high:
            raise ValueError(f"negative_scale {negative_scale}: need 0 < low <= high")
        self.negative_scale = (low, high)
        if negative_source not in NEGATIVE_SOURCES:
            raise ValueError(f"negative_source {negative_source!r}: not one of "
                             f"{', '.join(NEGATIVE_SOURCES)}")
        self.negative_source = negative_source
        self.cube_size, self.batch_size = cube_size, batch_size
        self.signal_fraction, self.augment, self.preload = signal_fraction, augment, preload
        self.target = target
        self.rng = np.random.default_rng(seed)
        self.rotations = cube_rotations()
        self._maps: list[tuple[NDArray[Any], NDArray[Any]] | None] = []
        self._centres: list[tuple[NDArray[Any], NDArray[Any]]] = []
        self._negatives: dict[int, NDArray[Any] | None] = {}  # map index -> array (preload)
        for i, entry in enumerate(self.entries):
            inputs, target_map, signal = self._load(entry["id"])
            self._centres.append(_draw_centres(signal, np.random.default_rng([seed, i])))
            self._maps.append((inputs, target_map) if preload else None)
            if negative_source == "map":
                negative = self._load_negative(entry["id"])
                if negative is not None:
                    self._negatives[i] = negative if preload else None
        if negative_source == "map" and not self._negatives:
            raise ValueError(f"{self.dir}: no map has a 'negative' array; rebuild the dataset "
                             "with this generator or use negative_source='cube'")
        self._negative_ids = sorted(self._negatives)

    def __len__(self) -> int:
        return len(self.entries)

    def batch(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """One batch: input and target, each (B, 1, c, c, c) float32."""
        return self._batch(self.rng, self.augment)

    def fixed_batches(self, n: int, seed: int, negatives: bool = False
                      ) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
        """``n`` deterministic batches without augmentation (for validation); with
        ``negatives``, every cube a negative (phase-randomised, unscaled, empty target)."""
        rng = np.random.default_rng(seed)
        return [self._batch(rng, augment=False, negatives=1.0 if negatives else 0.0)
                for _ in range(n)]

    def _batch(self, rng: np.random.Generator, augment: bool, negatives: float | None = None
               ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        c = self.cube_size
        fraction = self.negative_fraction if negatives is None else negatives
        inputs = np.empty((self.batch_size, 1, c, c, c), dtype=np.float32)
        targets = np.empty_like(inputs)
        from_maps = self.negative_source == "map"
        for b in range(self.batch_size):
            # a whole-map negative needs no input cube: drawn before one is cut and augmented
            if from_maps and fraction and rng.random() < fraction:
                scale = self._negative_factor(rng, augment)
                inputs[b, 0], targets[b, 0] = self._negative_cube(rng, augment) * scale, 0.0
                continue
            x, y = self._cube(rng)
            if augment:
                x, y = self._augment(x, y, rng)
            if not from_maps and fraction and rng.random() < fraction:
                scale = self._negative_factor(rng, augment)
                x, y = phase_randomise(x, rng) * scale, np.zeros_like(y)
            inputs[b, 0], targets[b, 0] = x, y
        return inputs, targets

    def _negative_factor(self, rng: np.random.Generator, augment: bool) -> np.float32:
        """A negative's amplitude factor: log-uniform in ``negative_scale`` when augmenting,
        else 1."""
        if not augment:
            return np.float32(1.0)
        return np.float32(np.exp(rng.uniform(*np.log(self.negative_scale))))

    def _cube(self, rng: np.random.Generator) -> tuple[NDArray[Any], NDArray[Any]]:
        """A cube from a random map, centred on a molecule or solvent voxel."""
        i = int(rng.integers(len(self.entries)))
        signal_centres, solvent_centres = self._centres[i]
        use_signal = rng.random() < self.signal_fraction
        pool = signal_centres if (use_signal and len(signal_centres)) or not len(
            solvent_centres) else solvent_centres
        centre = pool[rng.integers(len(pool))]
        inputs, target = self._maps[i] or self._load(self.entries[i]["id"])[:2]
        c = self.cube_size
        corner = np.clip(centre - c // 2, 0, np.array(inputs.shape) - c)
        window = tuple(slice(int(s), int(s) + c) for s in corner)
        return inputs[window].copy(), target[window].copy()

    def _negative_cube(self, rng: np.random.Generator, augment: bool) -> NDArray[Any]:
        """A cube at a random place of a random map's whole-map negative (rotated when
        augmenting)."""
        i = self._negative_ids[int(rng.integers(len(self._negative_ids)))]
        negative = self._negatives[i]
        if negative is None:
            negative = self._load_negative(self.entries[i]["id"])
            assert negative is not None  # listed at start: the sample has one
        c = self.cube_size
        corner = [int(rng.integers(0, n - c + 1)) for n in negative.shape]
        cube = negative[tuple(slice(s, s + c) for s in corner)]
        if augment:
            cube = rotate(cube, self.rotations[int(rng.integers(len(self.rotations)))])
        return np.array(cube, dtype=np.float32)

    def _augment(self, x: NDArray[Any], y: NDArray[Any],
                 rng: np.random.Generator) -> tuple[NDArray[Any], NDArray[Any]]:
        """Random rotation of both cubes; blur and patch corruption of the input."""
        rotation = self.rotations[int(rng.integers(len(self.rotations)))]
        x, y = rotate(x, rotation), rotate(y, rotation)
        if rng.random() < BLUR_PROBABILITY:
            x = ndimage.gaussian_filter(x, float(rng.uniform(*BLUR_SIGMA)))
        if rng.random() < PATCH_PROBABILITY:
            c = self.cube_size
            edge = max(1, int(round(c * rng.uniform(*PATCH_EDGE))))
            start = rng.integers(0, c - edge + 1, size=3)
            patch = tuple(slice(int(s), int(s) + edge) for s in start)
            x[patch] = rng.normal(0.0, NOISE_STD, size=(edge,) * 3)
        return x.astype(np.float32, copy=False), y

    def _load(self, sample_id: str) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        """Input, target and signal mask of one sample, padded to at least one cube."""
        path = self.dir / f"{sample_id}.npz"
        with np.load(path) as data:
            key = f"target_{self.target}"
            if key not in data and self.target == "locscale" and "target" in data:
                key = "target"  # datasets of generator version 5 and older
            if key not in data:
                raise ValueError(f"{path}: has no {self.target!r} target; rebuild the dataset "
                                 "with this generator or pick another --target")
            arrays = [_pad_to(data[k], self.cube_size) for k in ("input", key, "signal")]
        return arrays[0], arrays[1], arrays[2]

    def _load_negative(self, sample_id: str) -> NDArray[Any] | None:
        """The sample's whole-map negative, padded to at least one cube (None: it has none)."""
        with np.load(self.dir / f"{sample_id}.npz") as data:
            if "negative" not in data:
                return None
            return _pad_to(data["negative"], self.cube_size)


def _pad_to(volume: NDArray[Any], size: int) -> NDArray[Any]:
    """``volume`` zero-padded (centred) to at least ``size`` along every axis."""
    short = [max(0, size - n) for n in volume.shape]
    return np.pad(volume, [(s // 2, s - s // 2) for s in short]) if any(short) else volume


def phase_randomise(volume: NDArray[Any], rng: np.random.Generator) -> NDArray[np.float32]:
    """``volume`` with random Fourier phases: the same amplitude at every frequency (and the
    same mean), no structure. The phases are those of white noise, so they are Hermitian and
    the result is real; float32 like the input."""
    spectrum = np.fft.rfftn(volume)
    noise = np.fft.rfftn(rng.standard_normal(volume.shape))
    magnitude = np.abs(noise)
    phases = np.divide(noise, magnitude, out=np.ones_like(noise), where=magnitude > 0)
    randomised = np.abs(spectrum) * phases
    randomised.flat[0] = spectrum.flat[0]  # keep the mean
    return np.fft.irfftn(randomised, s=volume.shape,
                         axes=tuple(range(volume.ndim))).astype(np.float32)


def _draw_centres(signal: NDArray[Any], rng: np.random.Generator
                  ) -> tuple[NDArray[Any], NDArray[Any]]:
    """Up to CENTRES_PER_CLASS voxel coordinates in the molecule and in the solvent."""
    out = []
    for wanted in (1, 0):
        flat = np.flatnonzero(signal.ravel() == wanted)
        if len(flat) > CENTRES_PER_CLASS:
            flat = rng.choice(flat, CENTRES_PER_CLASS, replace=False)
        out.append(np.stack(np.unravel_index(np.sort(flat), signal.shape), axis=1))
    return out[0], out[1]


def _permutation_sign(perm: tuple[int, ...]) -> int:
    """+1 for an even permutation, -1 for an odd one."""
    sign, seen = 1, list(perm)
    for i in range(len(seen)):
        while seen[i] != i:
            j = seen[i]
            seen[i], seen[j] = seen[j], seen[i]
            sign = -sign
    return sign
