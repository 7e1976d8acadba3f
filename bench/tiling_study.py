"""Tiling study: how far can the default scheme thin out the cubes and stay faithful?

Runs the paper's reference tiling once through the public API (timed end to end, as
``bench/speed.py`` times it), then any number of candidate schemes (stride, blending window,
solvent-skip threshold) on the same map, and prints for each: cubes run and skipped, the
estimated inference time (cubes × the reference's seconds per cube) and the CC of its output
to the reference output, on the input grid.

Network evaluations are shared between schemes: a cube whose normalised input is bit-identical
to one already run (the same position relative to the map, whatever the padding) is answered
from a cache keyed by the cube's bytes instead of being run again. The cache changes no
output, only how long the study takes; ``--cache DIR`` keeps it on disk between calls.

    python bench/tiling_study.py --model tight --threads 2 --map 256 \
        --schemes 32:5,40:5,48:5,48:7 [--cache /tmp/study]

A scheme is ``default``, ``fast``, ``STRIDE:THRESHOLD`` with the cosine window (threshold
``none`` runs every cube), or ``STRIDE:THRESHOLD:uniform`` (a grid of its own, not on the
reference's lattice). Maps are those of ``bench/speed.py`` (``5168``, an edge for
a synthetic map) or an MRC path.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (bench/speed.py: the maps and the CC)

from demhx.options import EnhanceOptions  # noqa: E402
from demhx.pipeline import Enhancer  # noqa: E402
from demhx.tiling import TilingScheme  # noqa: E402


class CachedSession:
    """An ONNX Runtime session stand-in that runs each distinct input cube only once."""

    def __init__(self, session: Any, cache_dir: Path | None) -> None:
        self.session, self.cache_dir = session, cache_dir
        self.cache: dict[bytes, np.ndarray] = {}
        self.evaluated = 0
        self.seconds = 0.0
        if cache_dir is not None and (cache_dir / "keys.npy").exists():
            keys = np.load(cache_dir / "keys.npy")
            values = np.load(cache_dir / "values.npy", mmap_mode="r")
            self.cache = {bytes(k): values[i] for i, k in enumerate(keys)}

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    @staticmethod
    def key(cube: np.ndarray) -> bytes:
        """The cache key of one input cube: a hash of its float32 bytes."""
        return hashlib.blake2b(cube.tobytes(), digest_size=16).digest()

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        (name, batch), = feed.items()
        keys = [self.key(cube) for cube in batch]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            start = time.perf_counter()
            out = self.session.run(names, {name: np.ascontiguousarray(batch[missing])})[0]
            self.seconds += time.perf_counter() - start
            self.evaluated += len(missing)
            for i, prediction in zip(missing, out, strict=True):
                self.cache[keys[i]] = np.array(prediction)
        return [np.stack([self.cache[key] for key in keys])]

    def save(self) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        keys = list(self.cache)
        np.save(self.cache_dir / "keys.npy",
                np.array([np.frombuffer(k, dtype=np.uint8) for k in keys]))
        np.save(self.cache_dir / "values.npy", np.stack([self.cache[k] for k in keys]))


def parse_scheme(text: str) -> TilingScheme | str:
    if text in ("default", "fast", "reference"):
        return text
    stride, threshold, *window = text.split(":")
    skip = None if threshold == "none" else float(threshold)
    return TilingScheme(f"s{stride}t{threshold}", int(stride), window[0] if window else "cosine",
                        skip)


def source_map(name: str, work: Path) -> Path:
    """The MRC file of ``--map``: ``5168``, an edge (synthesised into ``work`` once) or a path."""
    if name in speed.MAPS:
        return speed.MAPS[name]
    if not name.isdigit():
        return Path(name)
    path = work / f"{name}.mrc"
    return path if path.exists() else speed.synthetic_map(int(name), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--map", default="256")
    parser.add_argument("--schemes", default="32:5,48:5")
    parser.add_argument("--cache", type=Path, default=None, help="keep predictions here")
    args = parser.parse_args(argv)
    import mrcfile

    print(speed.machine())
    work = Path(args.cache or "/tmp/demhx-study")
    work.mkdir(parents=True, exist_ok=True)
    source = source_map(args.map, work)
    with mrcfile.open(source, permissive=True) as stream:
        volume = np.asarray(stream.data, dtype=np.float32)
        voxel = tuple(float(v) for v in (stream.voxel_size.z, stream.voxel_size.y,
                                          stream.voxel_size.x))
    runner = Enhancer(model=args.model, device="cpu", threads=args.threads)
    cached = CachedSession(runner.runtime.session,
                           None if args.cache is None else args.cache / "cubes")
    # The runtime is frozen; a copy with the caching session, for this study only.
    runner = Enhancer.from_runtime(dataclasses.replace(runner.runtime, session=cached),
                                   threads=args.threads)
    reference_file = work / f"reference-{source.stem}.npy"
    if reference_file.exists():
        reference = np.load(reference_file)
        print(f"reference output read from {reference_file}")
        per_cube = float(np.load(work / f"reference-{source.stem}-s.npy"))
    else:
        start = time.perf_counter()
        enhanced = runner.process(volume, voxel, EnhanceOptions(tiling="reference"))
        reference, info = enhanced.map, enhanced.info
        wall = time.perf_counter() - start
        per_cube = cached.seconds / max(cached.evaluated, 1)
        print(f"reference: {wall:.1f} s end to end, {info.cubes.run} cubes, "
              f"{per_cube:.3f} s per cube of inference", flush=True)
        np.save(reference_file, reference)
        np.save(work / f"reference-{source.stem}-s.npy", per_cube)
        cached.save()
    print(f"{'scheme':>12} {'cubes':>6} {'run':>5} {'skip':>5} {'new':>5} {'est. s':>7} "
          f"{'CC ref':>7}")
    saved = cached.evaluated
    for text in args.schemes.split(","):
        scheme = parse_scheme(text)
        before = cached.evaluated
        enhanced = runner.process(volume, voxel, EnhanceOptions(tiling=scheme))
        out, info = enhanced.map, enhanced.info
        cc = speed.correlation(out, reference)
        print(f"{text:>12} {info.cubes.total:6d} {info.cubes.run:5d} {info.cubes.skipped:5d} "
              f"{cached.evaluated - before:5d} {info.cubes.run * per_cube:7.1f} {cc:7.4f}",
              flush=True)
    if cached.evaluated > saved:  # new cubes were run: keep them for the next call
        cached.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
