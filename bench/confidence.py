"""Does the confidence map (spread over rotations) point at the voxels where the output is wrong?

    python bench/confidence.py [--model NAME_OR_PATH] [--tta 6] [--count 4]
                               [--maps all|synthetic|real] [--threads 2]

For each map, ``demhx.enhance(..., confidence=True, tta=N)`` gives the output (the mean over
N rotations) and the spread; the error is ``|output - reference|`` per voxel. Printed per map:
Spearman (rank) and Pearson correlation of spread and error inside the tight model mask
("m") and over the whole box; the same rank correlation for ``|output|`` (a baseline: error
grows with density, so a useful spread must do better than the density itself); the rank
correlation in the mask of spread and error both smoothed by a Gaussian of 2 voxels (local
regions rather than single voxels); and how much larger the mean error is in the 10 % of mask
voxels with the highest spread than in the other 90 %.

Maps: synthetic test-split maps of ``bench/quality.py`` (same plan, seed and cache; the
reference is the LocScale-style target), and the bundled example EMD-5168 (F-actin, as
deposited) whose one fitted subunit 3MFP gives a model map on the map's grid: the reference
is the model map scaled by least squares to the output inside the subunit's mask, so only
the mask columns mean something there (the other subunits have no model).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: cases, map reading, machine line)

REAL_MAP, REAL_MODEL = "emd_5168.map", "3MFP.pdb"
TOP_FRACTION = 0.1  # highest-spread share of the mask voxels compared with the rest
SMOOTHING = 2.0  # voxels, Gaussian sigma of the regional comparison
MAX_SAMPLES = 500_000  # voxels drawn for the rank correlations of large boxes
HEADER = ("map", "res Å", "rs m", "r m", "rs box", "r box", "rs |out| m", "rs m σ2",
          "err top10/rest")


@dataclass
class Row:
    """The numbers of one map."""

    name: str
    resolution: float
    cells: tuple[float, ...]
    seconds: float


def correlations(spread: np.ndarray, error: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """Spearman and Pearson correlation of two maps over the voxels ``where`` is True."""
    a, b = spread[where].astype(np.float64), error[where].astype(np.float64)
    if a.size > MAX_SAMPLES:
        pick = np.random.default_rng(0).choice(a.size, MAX_SAMPLES, replace=False)
        a, b = a[pick], b[pick]
    if a.std() == 0 or b.std() == 0:
        return float("nan"), float("nan")
    return float(stats.spearmanr(a, b)[0]), float(np.corrcoef(a, b)[0, 1])


def top_ratio(spread: np.ndarray, error: np.ndarray, inside: np.ndarray) -> float:
    """Mean error of the top ``TOP_FRACTION`` spread voxels over that of the others."""
    values, errors = spread[inside], error[inside]
    cut = np.quantile(values, 1 - TOP_FRACTION)
    top = values > cut
    if not top.any() or top.all():
        return float("nan")
    return float(errors[top].mean() / errors[~top].mean())


def evaluate(name: str, resolution: float, output: np.ndarray, spread: np.ndarray,
             reference: np.ndarray, mask: np.ndarray, seconds: float) -> Row:
    """All numbers of one map: spread against ``|output - reference|``."""
    error = np.abs(output - reference)
    inside = mask > 0.5
    everywhere = np.ones_like(inside)
    rs_mask, r_mask = correlations(spread, error, inside)
    rs_box, r_box = correlations(spread, error, everywhere)
    rs_density, _ = correlations(np.abs(output), error, inside)
    rs_regional, _ = correlations(ndimage.gaussian_filter(spread, SMOOTHING),
                                  ndimage.gaussian_filter(error, SMOOTHING), inside)
    cells = (rs_mask, r_mask, rs_box, r_box, rs_density, rs_regional,
             top_ratio(spread, error, inside))
    return Row(name, resolution, cells, seconds)


def run(volume: np.ndarray, voxel_size: float, mask: np.ndarray, model: str | None, tta: int,
        threads: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Output, spread and seconds; maps that look masked get noise statistics from outside
    the model mask, as ``bench/quality.py`` does."""
    import demhx

    start = time.perf_counter()
    options = {"model": model, "device": "cpu", "threads": threads, "tta": tta}
    try:
        output, spread = demhx.enhance(volume, voxel_size, confidence=True, **options)
    except ValueError as error:
        if "looks masked" not in str(error):
            raise
        solvent = volume[(volume != 0) & (mask < 0.01)]
        output, spread = demhx.enhance(volume, voxel_size, confidence=True, noise_stats=(
            float(solvent.mean()), float(solvent.std())), **options)
    return output, spread, time.perf_counter() - start


def synthetic_rows(count: int, model: str | None, tta: int, threads: int) -> list[Row]:
    rows = []
    for case in quality.synthetic_cases("test", count):
        if case.target is None:
            continue
        output, spread, seconds = run(case.volume, case.voxel_size, case.mask, model, tta,
                                      threads)
        rows.append(evaluate(case.name.split("__")[1], case.resolution, output, spread,
                             case.target, case.mask, seconds))
        print(format_row(rows[-1]), flush=True)
    return rows


def real_row(model: str | None, tta: int, threads: int) -> Row:
    """The bundled EMD-5168 map against its one fitted subunit (3MFP)."""
    import gemmi
    from demhx_export import metrics

    volume, voxel_size, origin = quality.read_map(quality.MAPS_DIR / REAL_MAP)
    model_map = metrics.model_map(quality.MAPS_DIR / REAL_MODEL, volume.shape, origin,
                                  voxel_size, resolution=max(2 * voxel_size, 2.0))
    structure = gemmi.read_structure(str(quality.MAPS_DIR / REAL_MODEL))
    structure.remove_hydrogens()
    mask = metrics.model_mask(model_map, quality.VOLUME_PER_ATOM * structure[0].count_atom_sites(),
                              voxel_size, quality.MASK_DILATION, quality.MASK_SOFT_EDGE)
    output, spread, seconds = run(volume, voxel_size, mask, model, tta, threads)
    # Least-squares scale and offset of the model map to the output inside the mask.
    inside = mask > 0.5
    design = np.stack([model_map[inside], np.ones(int(inside.sum()))], axis=1)
    (scale, offset), *_ = np.linalg.lstsq(design, output[inside], rcond=None)
    reference = (model_map * scale + offset).astype(np.float32)
    return evaluate("EMD-5168/3MFP", 6.6, output, spread, reference, mask, seconds)


def format_row(row: Row) -> str:
    cells = [f"{value:.3f}" if np.isfinite(value) else "-" for value in row.cells[:-1]]
    cells.append(f"{row.cells[-1]:.2f}" if np.isfinite(row.cells[-1]) else "-")
    resolution = f"{row.resolution:5.2f}" if np.isfinite(row.resolution) else "-"
    line = [row.name[:16].ljust(16), resolution.rjust(6)]
    line += [cell.rjust(len(title)) for cell, title in zip(cells, HEADER[2:], strict=True)]
    return "  ".join(line) + f"  ({row.seconds:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="registered model name or ONNX file (default model)")
    parser.add_argument("--tta", type=int, default=None, help="rotations (default: demhx's)")
    parser.add_argument("--count", type=int, default=4, help="synthetic test-split maps")
    parser.add_argument("--maps", choices=("all", "synthetic", "real"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from demhx.augment import DEFAULT_COUNT

    tta = args.tta or DEFAULT_COUNT
    print(f"model: {args.model or 'default'}, {tta} rotations, machine: {quality.machine()}")
    print("  ".join([HEADER[0].ljust(16), HEADER[1].rjust(6), *HEADER[2:]]))
    start = time.perf_counter()
    rows = synthetic_rows(args.count, args.model, tta, args.threads) if args.maps != "real" \
        else []
    if args.maps != "synthetic":
        rows.append(real_row(args.model, tta, args.threads))
        print(format_row(rows[-1]), flush=True)
    synthetic = [row.cells for row in rows if row.name != "EMD-5168/3MFP"]
    if len(synthetic) > 1:
        medians = tuple(float(np.nanmedian(column)) for column in zip(*synthetic, strict=True))
        print(format_row(Row("median synthetic", float("nan"), medians, 0.0)).split("  (")[0])
    print(f"({time.perf_counter() - start:.0f} s; rs = Spearman, r = Pearson of spread and "
          "|output - reference|; m = inside the model mask; |out| = the output's magnitude "
          "instead of the spread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
