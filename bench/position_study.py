"""Position consistency: does a voxel's prediction depend on where the cubes cut the map?

For each map the model runs twice with one cube per position (``tiling="fast"``): on the
map, and on the map with its first ``--offset`` voxels along every axis cut away, so every
cube boundary falls elsewhere relative to the density. Both runs get the same noise
statistics (the first run's), so only the cut differs. Printed per map: the CC of the two
outputs over their common voxels, over the box and inside the tight model mask. A network
whose output depends only on the density around a voxel gives CC 1.

    python bench/position_study.py --model tight-fast [--model other.onnx] [--count 6]

Maps: the first ``--count`` synthetic maps of the quality harness's val split (1 Å/voxel, so
no resampling blurs the comparison; simulated on first use by ``bench/quality.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the harness's cached synthetic maps, the CC)

import demhx  # noqa: E402
from demhx import normalise  # noqa: E402

DEFAULT_OFFSET = 24  # voxels: not a multiple of the cube size or of the tiling lattice


def cut_agreement(model: str, case: quality.Case, offset: int, threads: int
                  ) -> tuple[float, float]:
    """CC (box, inside the mask) of the outputs for the map and for its offset crop."""
    stats = normalise.choose_stats(case.volume, (case.voxel_size,) * 3)
    runs = []
    for start in (0, offset):
        crop = np.ascontiguousarray(case.volume[start:, start:, start:])
        runs.append(demhx.enhance(crop, case.voxel_size, model=model, device="cpu",
                                  threads=threads, tiling="fast",
                                  noise_stats=(stats.mean, stats.std)))
    common = runs[0][offset:, offset:, offset:]
    mask = case.mask[offset:, offset:, offset:]
    return (quality.metrics.cc(common, runs[1]), quality.metrics.cc(common, runs[1], mask))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="registered model name or ONNX file (repeatable)")
    parser.add_argument("--count", type=int, default=6, help="synthetic val maps")
    parser.add_argument("--offset", type=int, default=DEFAULT_OFFSET)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cases = quality.synthetic_cases("val", args.count)
    print(f"machine: {quality.machine()}; offset {args.offset} voxels, fast tiling")
    print("model  map  CC box  CC mask")
    for model in args.model:
        start = time.perf_counter()
        box, masked = [], []
        for case in cases:
            a, b = cut_agreement(model, case, args.offset, args.threads)
            box.append(a)
            masked.append(b)
            print(f"{model}  {case.name}  {a:.4f}  {b:.4f}", flush=True)
        print(f"{model}  median of {len(cases)}  {np.median(box):.4f}  {np.median(masked):.4f}"
              f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
