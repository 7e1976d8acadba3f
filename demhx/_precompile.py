"""Compile the numba kernels of every kind of run ahead of the first one, for container images.

``python -m demhx._precompile [MODEL]`` runs demhx on small synthetic maps through each of
its branches: the three tilings, the default's self-check adding cubes, rotations with the
confidence map, a mask, half-maps, a map off the model's voxel size, a masked map, given noise
statistics, and the file path. The network is a stand-in that only scales each cube (so that
overlapping cubes disagree and the self-check refines): the kernels before and after the
network see the same argument types as in a real run, and numba compiles and caches each of
them. It takes about 11 s on two cores.

With ``NUMBA_CACHE_DIR=FOLDER`` and ``NUMBA_CPU_NAME=generic`` the compiled kernels in FOLDER
run on any x86-64 machine. The container images build such a folder and name it in
``DEMHX_NUMBA_SEED``: :mod:`demhx._jit` copies it into the writable cache, so no run in the
image compiles (a fresh container, or a cluster node whose ``/tmp`` is new, otherwise spends
about 11 s on it before its first map).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from numpy.typing import NDArray

from demhx.model import ModelSpec, load_spec
from demhx.options import EnhanceOptions
from demhx.pipeline import Enhancer
from demhx.session import ModelIO, Runtime

_SHAPE = (44, 40, 36)  # (z, y, x): small, not cubic, not a multiple of any stride
# More boxes for the default tiling: whether a kernel sees a whole array or a slice of one (a
# different compiled version) depends on how the box falls on the cube lattice.
_MORE_SHAPES = ((64, 64, 64), (61, 47, 50), (96, 80, 72))


class _ScalingSession:
    """An ONNX Runtime session stand-in: each cube times a factor that depends on its content
    (so overlapping cubes disagree, as a real network's do)."""

    def run(self, names: list[str], feeds: dict[str, NDArray[Any]]) -> list[NDArray[Any]]:
        batch = next(iter(feeds.values()))
        level = np.abs(batch).mean(axis=(1, 2, 3, 4), keepdims=True)
        return [batch * (1.0 + (level * 7.0) % 1.0).astype(batch.dtype)]


def stand_in(spec: ModelSpec, batch_size: int = 3) -> Runtime:
    """A CPU runtime of ``spec``'s contract whose network is :class:`_ScalingSession`."""
    return Runtime(spec, _ScalingSession(), spec.path, "cpu", batch_size, None,
                   ModelIO("volume", "enhanced", np.float32, None))


def _density(voxel: float, seed: int = 0, shape: tuple[int, int, int] = _SHAPE
             ) -> NDArray[np.float32]:
    """Blobs along a curve plus white noise, on a box of ``shape``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    volume = rng.normal(0.0, 0.1, shape).astype(np.float32)
    for t in np.linspace(0.0, 1.0, 12):
        centre = np.array(shape) * (0.3 + 0.4 * np.array([t, np.sin(6 * t) ** 2, 1 - t]))
        distance = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        volume += np.exp(-distance * voxel**2 / 8.0).astype(np.float32)
    return volume


def _ball(fraction: float) -> NDArray[np.float32]:
    z, y, x = np.indices(_SHAPE, dtype=np.float32)
    centre = (np.array(_SHAPE, dtype=np.float32) - 1) / 2
    radius = fraction * min(_SHAPE) / 2
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2
    return inside.astype(np.float32)


def precompile(model: str | None = None) -> int:
    """Run every branch once (see the module's docstring); returns how many runs were made."""
    spec = load_spec(model)
    enhancer = Enhancer.from_runtime(stand_in(spec))
    voxel = spec.voxel_size
    volume, half2 = _density(voxel), _density(voxel, seed=1)
    ball = _ball(0.8)
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"tiling": "default"}, {}),
        ({"tiling": "fast"}, {}),
        ({"tiling": "reference"}, {}),
        ({"tta": 3, "confidence": True}, {}),
        ({"noise_stats": (0.0, 0.1)}, {}),
        ({}, {"half2": half2}),
        ({}, {"mask": ball}),
        ({}, {"volume": volume * ball}),  # a masked map, found masked
        ({}, {"voxel_size": voxel * 1.3}),  # resampled to the model's voxel size
    ]
    runs += [({}, {"volume": _density(voxel, 2, shape)}) for shape in _MORE_SHAPES]
    for options, inputs in runs:
        arrays = {"volume": volume, "voxel_size": voxel, **inputs}
        enhancer.process(arrays.pop("volume"), arrays.pop("voxel_size"),
                         EnhanceOptions(**options), **arrays)
    with tempfile.TemporaryDirectory() as folder:
        source, output = Path(folder) / "in.mrc", Path(folder) / "out.mrc"
        with mrcfile.new(source) as stream:
            stream.set_data(volume)
            stream.voxel_size = voxel
        enhancer.process_file(source, output, EnhanceOptions(), confidence=Path(folder) / "c.mrc")
    return len(runs) + 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    start = time.perf_counter()
    count = precompile(args[0] if args else None)
    print(f"demhx: numba kernels compiled for {count} kinds of run in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
