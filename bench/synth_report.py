"""Report on a simulated dataset: difficulty, FSC calibration, cost, and a picture of one pair.

    python bench/synth_report.py DATASET_DIR [--picture bench/synth_pair.png] [--markdown OUT]

Prints the distribution of CC(input, target) (the paper's real inputs: median 0.60), the
error of the half-map FSC(0.143) against the requested resolution, and seconds per sample,
then re-simulates the sample closest to the median CC to draw central slices of its input,
target and model map, with the half-map FSC curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "export"))

from demhx_export import metrics  # noqa: E402
from demhx_export.dataset import DEFAULT_STRUCTURES  # noqa: E402
from demhx_export.synth import simulate_pair  # noqa: E402

RESOLUTION_BINS = (2.5, 3.5, 4.5, 6.01)


def summary(index: list[dict]) -> str:
    """Text block: CC distribution overall and per resolution bin, calibration, cost."""
    cc = np.array([e["cc_input_target"] for e in index])
    masked = np.array([e["cc_input_target_masked"] for e in index])
    error = np.array([e["fsc_half_maps"] - e["resolution"] for e in index])
    seconds = np.array([e["seconds"] for e in index])
    boxes = np.array([e["shape"][0] for e in index])
    q = np.percentile(cc, [0, 25, 50, 75, 100])
    methods: dict[str, int] = {}
    for e in index:
        method = e["normalisation"].split(" (")[0]
        methods[method] = methods.get(method, 0) + 1
    lines = [f"samples: {len(index)}  boxes {boxes.min()}-{boxes.max()} (median "
             f"{int(np.median(boxes))})  normalisation: {methods}",
             f"CC(input, target): median {q[2]:.3f}  quartiles {q[1]:.3f} / {q[3]:.3f}  "
             f"range {q[0]:.3f} - {q[4]:.3f}",
             f"CC(input, target) within the target mask: median {np.median(masked):.3f}"]
    resolution = np.array([e["resolution"] for e in index])
    for lo, hi in zip(RESOLUTION_BINS[:-1], RESOLUTION_BINS[1:], strict=True):
        sel = (resolution >= lo) & (resolution < hi)
        if sel.any():
            lines.append(f"  {lo:.1f}-{min(hi, 6.0):.1f} Å: n={sel.sum():3d}  CC median "
                         f"{np.median(cc[sel]):.3f}")
    lines += [f"FSC(0.143) - requested: median |err| {np.median(np.abs(error)):.3f} Å, "
              f"max |err| {np.abs(error).max():.3f} Å",
              f"seconds per sample (build, incl. writing): median {np.median(seconds):.2f}, "
              f"max {seconds.max():.2f}"]
    return "\n".join(lines)


def picture(index: list[dict], path: Path) -> str:
    """Draw the sample nearest the median CC; return a caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cc = np.array([e["cc_input_target"] for e in index])
    entry = index[int(np.argmin(np.abs(cc - np.median(cc))))]
    pair = simulate_pair(DEFAULT_STRUCTURES / entry["structure"], entry["resolution"],
                         entry["seed"])
    frequencies, values = metrics.fsc(pair.half1, pair.half2)
    c = pair.input.shape[0] // 2
    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    for row, (label, cut) in enumerate((("z", np.s_[c]), ("y", np.s_[:, c]))):
        for col, (title, volume) in enumerate((("input (half-map average)", pair.input),
                                               ("target (LocScale-style, masked)",
                                                pair.target),
                                               ("model map", pair.model_map))):
            axes[row, col].imshow(volume[cut], cmap="gray")
            axes[row, col].set_title(f"{title}, central {label} slice", fontsize=9)
            axes[row, col].axis("off")
    axes[0, 3].plot(frequencies[1:], values[1:])
    axes[0, 3].axhline(0.143, color="grey", lw=0.5)
    axes[0, 3].axvline(1 / entry["resolution"], color="red", lw=0.5)
    axes[0, 3].set_xlabel("1/Å")
    axes[0, 3].set_title("half-map FSC (red: requested resolution)", fontsize=9)
    axes[1, 3].axis("off")
    p = pair.params
    axes[1, 3].text(0, 0.95, "\n".join([
        f"{entry['structure']}", f"seed {entry['seed']}, box {p['box']}³, 1 Å/voxel",
        f"requested {entry['resolution']:.2f} Å, FSC0.143 "
        f"{metrics.fsc_resolution(frequencies, values, 0.143):.2f} Å",
        f"global B {p['global_b']:.0f} Å², local B q25/50/75 {p['local_b_quartiles']}",
        f"B source: {p['bfactor_source']}, unmodelled {p['unmodelled_fraction']:.2f}",
        f"belt {p['belt']}, blobs {p['blobs']}, sphere mask {p['sphere_mask']}",
        f"CC(input, target) {entry['cc_input_target']:.3f} (dataset median "
        f"{np.median(cc):.3f})"]), va="top", fontsize=9, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return f"{entry['id']} (CC {entry['cc_input_target']:.3f})"


def time_one(structure: str, resolution: float = 3.5, seed: int = 0) -> tuple[float, int]:
    """Seconds for one simulate_pair call and the box edge."""
    start = time.perf_counter()
    pair = simulate_pair(DEFAULT_STRUCTURES / structure, resolution, seed)
    return time.perf_counter() - start, pair.input.shape[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--picture", help="write the pair picture here (PNG)")
    parser.add_argument("--time", nargs="*", default=[], help="structures to time one sample of")
    args = parser.parse_args(argv)
    index = json.loads((Path(args.dataset) / "index.json").read_text())
    print(f"dataset: {args.dataset}")
    print(summary(index))
    for structure in args.time:
        seconds, box = time_one(structure)
        print(f"one sample of {structure}: {seconds:.2f} s, box {box}³")
    if args.picture:
        print(f"picture: {args.picture} from {picture(index, Path(args.picture))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
