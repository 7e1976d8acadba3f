"""Judge a demhx model on synthetic test-split maps and on real maps with fitted models.

    python bench/quality.py [--model PATH_OR_NAME] [--maps all|synthetic|real]
                            [--split test] [--count 12] [--markdown OUT.md]
                            [--tiling default|reference]

For every map three variants are scored (the model only with ``--model``):

``input``     the map as given (synthetic: the half-map average, unsharpened, unmasked);
``baseline``  global B-factor sharpening with the B fitted on the Guinier plot between 10 Å
              and the resolution (as RELION's automatic mode), low-passed at the resolution;
``model``     ``demhx.enhance(volume, voxel_size, model=..., device="cpu", threads=2)``, with
              ``--tiling`` (default or reference).

Scores: FSC against the model-simulated map (0.5 and 0.143 crossings, Å), unmasked and with
both maps multiplied by a tight soft model mask; CC to the LocScale-style target (synthetic
maps only), over the box and within the mask; CC to the model map within the mask.

Synthetic maps are simulated once, deterministically, and cached under
``/work/data_cache/quality_<split>_g<generator version>/``. Real maps are the deposited
(sharpened) maps in ``shared/data/maps`` and a degraded copy of each (blurred with
B = +100 Å² and with added noise), which is closer to the unsharpened input the model expects.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "export"))
sys.path.insert(0, str(ROOT))

from demhx_export import metrics  # noqa: E402
from demhx_export.dataset import DEFAULT_STRUCTURES, plan_samples  # noqa: E402
from demhx_export.synth import GENERATOR_VERSION, simulate_pair  # noqa: E402

MAPS_DIR = ROOT.parent / "shared" / "data" / "maps"
CACHE_ROOT = Path(os.environ.get("DEMHX_CACHE", "/work/data_cache"))
SYNTHETIC_SEED = 2024
# Real maps with fitted models: file, model, nominal resolution (Å, from EMDB).
REAL_MAPS = (("2566_3J6B_9.mrc", "3J6B_9.pdb", 3.2),
             ("emd_5168_monomer.mrc", "3MFP.pdb", 6.6),
             ("emd_21457_seg.mrc", "6vyb_Ndom.pdb", 3.2))
DEGRADE_B = 100.0  # Å², blur of the degraded copies of the real maps
DEGRADE_NOISE = 0.3  # noise std relative to the blurred map's std within the mask
MASK_DILATION = 2.0  # Å
MASK_SOFT_EDGE = 3.0  # Å
VOLUME_PER_ATOM = 17.0  # Å³
MIN_SOLVENT_VOXELS = 100  # for noise statistics of zoned maps
COLUMNS = ("FSC0.5", "FSC0.143", "FSC0.5 m", "FSC0.143 m", "CC tgt", "CC tgt m",
           "CC model m", "unmod", "blobs")


@dataclass
class Case:
    """One map to score, with its reference model map, mask and (optional) target."""

    name: str
    group: str
    volume: np.ndarray
    voxel_size: float
    resolution: float
    model_map: np.ndarray
    mask: np.ndarray
    target: np.ndarray | None = None
    # density in the half-maps but not in the model (synthetic maps only): the noise-free
    # truth and the regions of unmodelled atoms and of blobs
    truth: np.ndarray | None = None
    unmodelled: np.ndarray | None = None
    blobs: np.ndarray | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def score(volume: np.ndarray, case: Case) -> dict[str, float]:
    """All numbers of one map variant against the case's model map, mask and target."""
    out: dict[str, float] = {}
    for suffix, a, b in (("", volume, case.model_map),
                         (" m", volume * case.mask, case.model_map * case.mask)):
        frequencies, values = metrics.fsc(a, b, case.voxel_size)
        out["FSC0.5" + suffix] = metrics.fsc_resolution(frequencies, values, 0.5)
        out["FSC0.143" + suffix] = metrics.fsc_resolution(frequencies, values, 0.143)
    if case.target is not None:
        out["CC tgt"] = metrics.cc(volume, case.target)
        out["CC tgt m"] = metrics.cc(volume, case.target, case.mask)
    out["CC model m"] = metrics.cc(volume, case.model_map, case.mask)
    if case.truth is not None:
        out["unmod"] = kept_share(volume, case.truth, case.unmodelled, case.mask)
        out["blobs"] = kept_share(volume, case.truth, case.blobs, case.mask)
    return out


def kept_share(volume: np.ndarray, truth: np.ndarray, region: np.ndarray | None,
               mask: np.ndarray) -> float:
    """How much of the density in ``region`` (absent from the model) a map keeps.

    The map's mean density in the region relative to its mean inside the model mask's core,
    divided by the same ratio for the noise-free truth: 1 keeps it at its true level,
    0 erases it. NaN when the map has no such region (fewer than 20 voxels).
    """
    if region is None or np.count_nonzero(region) < 20:
        return float("nan")
    core = mask > 0.99
    truth_ratio = float(truth[region].mean()) / float(truth[core].mean())
    return float(volume[region].mean()) / float(volume[core].mean()) / truth_ratio


def baseline(case: Case) -> np.ndarray:
    """Global B sharpening (Guinier fit between 10 Å and the resolution), low-passed."""
    low = max(10.0, 1.7 * case.resolution)
    b_factor = metrics.guinier_b(case.volume, case.voxel_size, case.resolution, low)
    return metrics.sharpen(case.volume, case.voxel_size, b_factor, case.resolution)


def synthetic_cases(split: str, count: int) -> list[Case]:
    """Test-split maps simulated deterministically (cached after the first run)."""
    cache = CACHE_ROOT / f"quality_{split}_g{GENERATOR_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    cases = []
    for item in plan_samples(split, count, SYNTHETIC_SEED, (2.5, 6.0), 25_000,
                             DEFAULT_STRUCTURES):
        path = cache / f"{item['id']}.npz"
        if not path.is_file():
            pair = simulate_pair(item["path"], item["resolution"], item["seed"])
            atoms = pair.params["atoms"] - pair.params["atoms_cropped"]
            modelled = atoms * (1 - pair.params["unmodelled_fraction"])
            mask = metrics.model_mask(pair.model_map, VOLUME_PER_ATOM * modelled, 1.0,
                                      MASK_DILATION, MASK_SOFT_EDGE)
            np.savez(path, input=pair.input, target=pair.target, model_map=pair.model_map,
                     mask=mask, resolution=item["resolution"], truth=pair.truth,
                     unmodelled=pair.unmodelled_region, blobs=pair.blob_region)
        with np.load(path) as data:
            cases.append(Case(item["id"], f"synthetic {split}", data["input"], 1.0,
                              float(data["resolution"]), data["model_map"], data["mask"],
                              data["target"], data["truth"], data["unmodelled"],
                              data["blobs"]))
    return cases


def real_cases() -> list[Case]:
    """The real maps as deposited and degraded, with model maps on their grids."""
    import gemmi

    cases = []
    for map_name, model_name, resolution in REAL_MAPS:
        volume, voxel_size, origin = read_map(MAPS_DIR / map_name)
        model = metrics.model_map(MAPS_DIR / model_name, volume.shape, origin, voxel_size,
                                  resolution=max(2 * voxel_size, 2.0))
        st = gemmi.read_structure(str(MAPS_DIR / model_name))
        st.remove_hydrogens()
        atoms = st[0].count_atom_sites()
        mask = metrics.model_mask(model, VOLUME_PER_ATOM * atoms, voxel_size, MASK_DILATION,
                                  MASK_SOFT_EDGE)
        stem = map_name.split(".")[0]
        cases.append(Case(stem, "real, deposited", volume, voxel_size, resolution, model, mask))
        cases.append(Case(stem, "real, degraded", degrade(volume, voxel_size, mask), voxel_size,
                          resolution, model, mask))
    return cases


def read_map(path: Path) -> tuple[np.ndarray, float, tuple[float, float, float]]:
    """(z, y, x) float32 data, voxel size (Å, x) and origin (x, y, z, Å) of an MRC map."""
    import mrcfile

    with mrcfile.open(path, permissive=True) as mrc:
        header = mrc.header
        order = (int(header.maps) - 1, int(header.mapr) - 1, int(header.mapc) - 1)
        # data axes are (section, row, column) = axes order[0..2] in x=0, y=1, z=2 terms
        data = np.transpose(mrc.data.astype(np.float32), np.argsort([2 - a for a in order]))
        voxel = float(mrc.voxel_size.x)
        origin = tuple(float(header.origin[k]) for k in "xyz")
        if not any(origin):
            start = (int(header.nxstart), int(header.nystart), int(header.nzstart))
            origin = tuple(s * voxel for s in start)
    return np.ascontiguousarray(data), voxel, origin


def degrade(volume: np.ndarray, voxel_size: float, mask: np.ndarray) -> np.ndarray:
    """Blur with B = +DEGRADE_B and add smooth noise (deterministic)."""
    from scipy import ndimage

    blurred = metrics.sharpen(volume, voxel_size, -DEGRADE_B)
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.standard_normal(volume.shape), 1.0)
    noise *= DEGRADE_NOISE * blurred[mask > 0.5].std() / noise.std()
    return (blurred + noise).astype(np.float32)


def run_model(model: str, case: Case, tiling: str = "default", threads: int = 2
              ) -> tuple[np.ndarray | str, str]:
    """The model's output for one case (or the error text) and a note on how it was run.

    Zoned maps (deposited crops, mostly exact zeros) have no solvent for the runtime's noise
    estimate; they are run with ``noise_stats`` measured on the non-zero voxels outside the
    model mask, as a user would pass ``--noise-stats``.
    """
    try:
        import demhx

        try:
            return demhx.enhance(case.volume, case.voxel_size, model=model, device="cpu",
                                 threads=threads, tiling=tiling), ""
        except ValueError as error:
            if "looks masked" not in str(error):
                raise
            solvent = case.volume[(case.volume != 0) & (case.mask < 0.01)]
            if solvent.size < MIN_SOLVENT_VOXELS:
                return (f"zoned map with {solvent.size} non-zero voxels outside the model "
                        "mask: no noise statistics, not run"), ""
            stats = (float(solvent.mean()), float(solvent.std()))
            note = (f"{case.name} ({case.group}): zoned map, run with noise_stats "
                    f"{stats[0]:.4g},{stats[1]:.4g} from {solvent.size} non-zero voxels "
                    "outside the model mask")
            return demhx.enhance(case.volume, case.voxel_size, model=model, device="cpu",
                                 threads=threads, noise_stats=stats, tiling=tiling), note
    except Exception as error:  # the harness reports any runtime failure and goes on
        return f"{type(error).__name__}: {error}", ""


def evaluate(cases: list[Case], model: str | None, tiling: str = "default") -> list[str]:
    """Score every case's variants in place; return the notes and errors met."""
    errors = []
    for case in cases:
        case.scores["input"] = score(case.volume, case)
        try:
            case.scores["baseline"] = score(baseline(case), case)
        except ValueError as error:
            errors.append(f"{case.name}: baseline: {error}")
        if model is not None:
            output, note = run_model(model, case, tiling)
            if note:
                errors.append(note)
            if isinstance(output, str):
                errors.append(f"{case.name} ({case.group}): model: {output}")
            else:
                case.scores["model"] = score(output, case)
    return errors


def table(cases: list[Case], markdown: bool = False) -> str:
    """Median over the maps of each group (and each real map on its own), per variant."""
    rows = []
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
        if case.group.startswith("real"):
            groups.setdefault(f"{case.group}: {case.name}", []).append(case)
    for group, members in groups.items():
        if group.startswith("real") and ":" not in group:
            continue
        for variant in ("input", "baseline", "model"):
            scored = [c.scores[variant] for c in members if variant in c.scores]
            if not scored:
                continue
            cells = [_fmt(col, _median([s.get(col, np.nan) for s in scored]))
                     for col in COLUMNS]
            rows.append((group, variant, str(len(scored)), *cells))
    header = ("set", "variant", "n", *COLUMNS)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))
                     for r in (header, *rows))


def gains(cases: list[Case]) -> list[str]:
    """Per synthetic set: the median per-map gain of the model over the input (Å, > 0 is
    better) at FSC0.5 unmasked and masked, and on how many maps the masked FSC0.5 improved."""
    lines = []
    groups: dict[str, list[Case]] = {}
    for case in cases:
        if "model" in case.scores and case.group.startswith("synthetic"):
            groups.setdefault(case.group, []).append(case)
    for group, members in groups.items():
        change = {col: [c.scores["input"][col] - c.scores["model"][col] for c in members]
                  for col in ("FSC0.5", "FSC0.5 m")}
        better = sum(g > 0 for g in change["FSC0.5 m"])
        unmasked, masked = np.median(change["FSC0.5"]), np.median(change["FSC0.5 m"])
        lines.append(f"{group}: model vs input per map, median FSC0.5 gain {unmasked:+.2f} Å, "
                     f"masked {masked:+.2f} Å (masked better on {better} of {len(members)} "
                     "maps)")
    return lines


def _median(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.median(finite)) if finite else float("nan")


def _fmt(column: str, value: float) -> str:
    if np.isnan(value):
        return "-"
    if column.startswith("FSC"):
        return "inf" if np.isinf(value) else f"{value:.2f}"
    if column in ("unmod", "blobs"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def machine() -> str:
    """One line describing where the numbers were measured."""
    return (f"{platform.node()} {platform.machine()} {platform.processor() or ''} "
            f"{os.cpu_count()} cores, python {platform.python_version()}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="registered model name or ONNX file")
    parser.add_argument("--maps", choices=("all", "synthetic", "real"), default="all")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--count", type=int, default=12, help="synthetic maps")
    parser.add_argument("--markdown", help="also write the table to this markdown file")
    parser.add_argument("--tiling", default="default", choices=("default", "fast", "reference"),
                        help="tiling of the model runs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cases = []
    if args.maps in ("all", "synthetic"):
        cases += synthetic_cases(args.split, args.count)
    if args.maps in ("all", "real"):
        cases += real_cases()
    errors = evaluate(cases, args.model, args.tiling)
    text = table(cases)
    print(f"model: {args.model or '(none: input and baseline only)'}, {args.tiling} tiling")
    print(f"machine: {machine()}")
    print(text)
    for line in gains(cases):
        print(line)
    for error in errors:
        print(f"note: {error}")
    print(f"({time.perf_counter() - start:.0f} s; FSC in Å against the model map, 'm' = within "
          f"the tight model mask; medians over maps)")
    if args.markdown:
        body = [f"model: `{args.model or 'none'}`  ", f"machine: {machine()}", "",
                table(cases, markdown=True), ""] + [f"- {g}" for g in gains(cases)] \
            + [f"- {e}" for e in errors]
        Path(args.markdown).write_text("\n".join(body) + "\n")
        per_map = {f"{c.group}/{c.name}": c.scores for c in cases}
        Path(args.markdown).with_suffix(".json").write_text(json.dumps(per_map, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
