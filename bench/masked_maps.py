"""Masked and zoned maps: which normalisation ``choose_stats`` picks, and what demhx writes.

``python bench/masked_maps.py [--outputs DIR]``

1. Every real map of ``../shared/data/maps``: the path taken (``auto``, ``auto-masked``,
   ``peak``), mean, std, the fraction it came from, the peak in stds and the time.
2. Masked variants of the unmasked maps (``map * mask``, exact zeros outside): a soft sphere
   (radius 0.45 of the smallest box edge, raised-cosine edge 6 voxels) and a tight mask
   (the map smoothed over 1 voxel above a quarter of its peak over the noise mean, grown by 2
   voxels, raised-cosine edge 3 voxels). ``ratio`` is the masked std over the unmasked
   estimate; ``local`` the masked std over the std of the unmasked estimate's own solvent
   voxels where the mask is 1 (real maps' noise is not the same everywhere in the box: it is
   often lower in the corners, which dominate the unmasked estimate).
3. With ``--outputs DIR`` (holding ``NAME.out.mrc`` written by ``demhx``): the fraction of
   non-zero output voxels and the CC of output to input, over the box and over the voxels
   inside the input's mask.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from demhx import mrcio, normalise

MAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "maps"
NAMES = ("2566_3J6B_9.mrc", "emd_21457_seg.mrc", "emd_21457_seg_nstart.mrc",
         "emd_21457_seg_orig0.mrc", "emd_5168_monomer.mrc", "emd_5168.map", "6824.mrc",
         "EMD-3001.map")
SPHERE_RADIUS = 0.45  # of the smallest box edge
SPHERE_EDGE_VOXELS = 6.0
TIGHT_LEVEL = 0.25  # of the peak above the noise mean, on the map smoothed over 1 voxel
TIGHT_EXTEND_VOXELS = 2
TIGHT_EDGE_VOXELS = 3.0


def soft_sphere(shape: tuple[int, ...]) -> np.ndarray:
    """Raised-cosine sphere about the box centre, exactly 0 outside."""
    centre = [(n - 1) / 2 for n in shape]
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.indices(shape), centre, strict=True)))
    radius = SPHERE_RADIUS * min(shape)
    ramp = np.clip((distance - (radius - SPHERE_EDGE_VOXELS)) / SPHERE_EDGE_VOXELS, 0, 1)
    return np.where(ramp < 1, np.cos(0.5 * np.pi * ramp) ** 2, 0.0).astype(np.float32)


def tight_mask(volume: np.ndarray, noise: normalise.NoiseStats) -> np.ndarray:
    """A mask hugging the density, raised-cosine edge, exactly 0 outside."""
    smooth = ndimage.gaussian_filter(volume, 1.0) - np.float32(noise.mean)
    core = ndimage.binary_dilation(smooth > TIGHT_LEVEL * smooth.max(),
                                   iterations=TIGHT_EXTEND_VOXELS)
    ramp = np.clip(ndimage.distance_transform_edt(~core) / TIGHT_EDGE_VOXELS, 0, 1)
    return np.where(ramp < 1, np.cos(0.5 * np.pi * ramp) ** 2, 0.0).astype(np.float32)


def _row(label: str, volume: np.ndarray, voxel_size: tuple[float, float, float],
         reference: float | None = None, local: float | None = None) -> normalise.NoiseStats:
    start = time.perf_counter()
    stats = normalise.choose_stats(volume, voxel_size)
    seconds = time.perf_counter() - start
    measured = stats.widened_from or stats.std
    ratio = "" if reference is None or stats.method == "peak" else f"{measured / reference:.3f}"
    near = "" if local is None or stats.method == "peak" else f"{measured / local:.3f}"
    print(f"| {label} | {stats.method} | {stats.mean:.4g} | {measured:.4g} | "
          f"{stats.solvent_fraction:.0%} | {normalise.peak_sigmas(volume, stats):.1f} | "
          f"{ratio} | {near} | {seconds:.2f} |")
    return stats


def statistics_table() -> None:
    print("| map | method | mean | std (measured) | from | peak (stds) | ratio | local | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in NAMES:
        source = mrcio.read_map(MAPS / name)
        volume, voxel = source.data, source.voxel_size
        stats = _row(name, volume, voxel)
        if stats.method != "auto":
            continue
        reference = stats.widened_from or stats.std
        solvent = normalise.solvent_voxels(volume, voxel)
        for label, mask in (("soft sphere", soft_sphere(volume.shape)),
                            ("tight mask", tight_mask(volume, stats))):
            full = solvent & (mask == 1)
            local = float(volume[full].std(dtype=np.float64)) if full.any() else None
            _row(f"{name}, {label}", volume * mask, voxel, reference, local)


def output_table(folder: Path) -> None:
    print("| map | non-zero output | CC to input (box) | CC inside the input's mask |")
    print("|---|---|---|---|")
    for name in NAMES:
        path = folder / f"{name}.out.mrc"
        if not path.is_file():
            continue
        volume, output = mrcio.read_map(MAPS / name).data, mrcio.read_map(path).data
        inside = volume != normalise.most_common_value(volume)
        box = np.corrcoef(volume.ravel(), output.ravel())[0, 1]
        masked = np.corrcoef(volume[inside], output[inside])[0, 1]
        print(f"| {name} | {np.count_nonzero(output) / output.size:.0%} | {box:.3f} | "
              f"{masked:.3f} |")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, help="folder of NAME.out.mrc written by demhx")
    args = parser.parse_args(argv)
    statistics_table()
    if args.outputs is not None:
        print()
        output_table(args.outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
