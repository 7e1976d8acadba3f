"""Peak memory of one ``demhx`` run on a large map (the 512³ bar: at most 3 GB on CPU).

Writes a deterministic EDGE³ float32 map at 1 Å (white noise, std 0.1, plus a cube of density
of BLOCK voxels in the middle: few cubes to run, so the measurement is quick, while every
full-size volume of the pipeline is still allocated), runs the ``demhx`` command on it in a
child process and prints the child's peak resident memory, wall time and summary line.

    python bench/memory.py --model tight --threads 2 [--edge 512] [--block 48] [--tiling default]

The network's own working memory (ONNX Runtime's arena for one batch) is included: use the
full-size model, not a fixture.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def block_map(edge: int, block: int, path: Path) -> Path:
    """Noise with a centred block of density, float32, 1 Å voxels."""
    import mrcfile

    volume = np.random.default_rng(edge).normal(0.0, 0.1, (edge,) * 3).astype(np.float32)
    low, high = (edge - block) // 2, (edge + block) // 2
    volume[low:high, low:high, low:high] += 1.0
    with mrcfile.new(path, overwrite=True) as stream:
        stream.set_data(volume)
        stream.voxel_size = 1.0
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="registered model name or ONNX file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--edge", type=int, default=512)
    parser.add_argument("--block", type=int, default=48)
    parser.add_argument("--tiling", default="default")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = block_map(args.edge, args.block, Path(tmp) / "big.mrc")
        command = [sys.executable, "-m", "demhx", str(source), str(Path(tmp) / "out.mrc"),
                   "--threads", str(args.threads), "--tiling", args.tiling]
        if args.model:
            command += ["--model", args.model]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    summary = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"{args.edge}³ map, {args.block}³ block, {args.tiling} tiling: exit {result.returncode}, "
          f"peak RSS {peak:.2f} GB, {wall:.1f} s wall\n{summary}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
