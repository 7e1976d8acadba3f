"""Input range: how far above their solvent noise do maps peak, in training and in real maps?

    python bench/input_range.py [--count 12] [--seed 0]

The network only knows inputs like its synthetic training maps. This simulates ``--count``
training-split samples as ``demhx-export build-dataset`` does (resolution drawn in 2.5–6 Å,
noise normalised as for training) and prints, for each, the peak of its input — the 99.99th
percentile of the density, in noise standard deviations above the noise mean
(:func:`demhx.normalise.peak_sigmas`) — then the same for the real maps in
``../shared/data/maps`` whose noise the runtime can estimate.
``demhx.normalise.MAX_PEAK_SIGMAS`` is chosen from this table.
Needs the export package (gemmi); about 5 s per sample on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from demhx import mrcio, normalise

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESOLUTIONS = (2.5, 6.0)  # the training set's range of half-map resolutions, Å
MAX_ATOMS = 25_000  # build-dataset's default


def synthetic_peaks(count: int, seed: int) -> list[tuple[str, float, float]]:
    """(sample, resolution, peak in noise stds) for ``count`` training inputs.

    Planned, simulated and normalised exactly as ``demhx-export build-dataset`` does.
    """
    from demhx_export.dataset import NOISE_STD, normalise_pair, plan_samples
    from demhx_export.synth import simulate_pair

    rows = []
    plan = plan_samples("train", count, seed, RESOLUTIONS, MAX_ATOMS, SHARED / "structures")
    for item in plan:
        inputs, _, _ = normalise_pair(simulate_pair(item["path"], item["resolution"],
                                                    item["seed"]))
        peak = normalise.peak_sigmas(inputs, normalise.user_stats(0.0, NOISE_STD))
        rows.append((item["id"], item["resolution"], peak))
    return rows


def real_peaks() -> list[tuple[str, str]]:
    """(map, peak in estimated noise stds, or why there is none) for the shared real maps."""
    rows = []
    for path in sorted(p for p in (SHARED / "maps").iterdir() if p.suffix in (".mrc", ".map")):
        volume = mrcio.read_map(path)
        data = np.asarray(volume.data, dtype=np.float32)
        try:
            stats = normalise.estimate_noise(data, volume.voxel_size)
        except ValueError as error:
            rows.append((path.name, f"no estimate ({str(error).split(',')[0]})"))
            continue
        rows.append((path.name, f"{normalise.peak_sigmas(data, stats):.1f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    peaks = synthetic_peaks(args.count, args.seed)
    print("| synthetic training input | resolution Å | peak (noise stds) |\n|---|---|---|")
    for name, resolution, peak in peaks:
        print(f"| {name} | {resolution:.2f} | {peak:.1f} |")
    values = np.array([p for _, _, p in peaks] or [np.nan])
    print(f"\nsynthetic peaks: min {values.min():.1f}, median {np.median(values):.1f}, "
          f"max {values.max():.1f} noise stds (limit MAX_PEAK_SIGMAS = "
          f"{normalise.MAX_PEAK_SIGMAS:g})\n")
    print("| real map | peak (estimated noise stds) |\n|---|---|")
    for name, peak in real_peaks():
        print(f"| {name} | {peak} |")


if __name__ == "__main__":
    main()
