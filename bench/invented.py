"""Invented density: what a model writes where the data hold no structure, beside FSC.

    python bench/invented.py [--model input --model tight-fast ...] [--count 4]
                             [--split val] [--maps all|real|synthetic] [--threads 2]
                             [--tiling default|fast|reference] [--markdown OUT.md]

Three measures, each for every ``--model`` (registered name or ONNX file; ``input`` is the
map itself), side by side:

(a) **Noise in.** Every usable shared real map and every synthetic map is run as given (its
    *real output*) and as two phase-randomised copies (:data:`PHASE_SEEDS`): the same
    amplitude spectrum with random phases, so the same power at every resolution and no
    structure. On each copy: the share of output voxels above :data:`THRESHOLD_FRACTION` of
    the real output's :data:`THRESHOLD_PERCENTILE` th percentile, and the peak of the
    brightest connected blob above that threshold relative to the real output's peak (worst
    of the two copies). Bars: ≤ :data:`MAX_ABOVE_SHARE` of the voxels and no blob above
    :data:`MAX_BLOB_RATIO` of the peak. A refusal by the runtime that the map holds no signal
    counts as nothing out (0 %) and is marked "refused".
(b) **Empty space** (synthetic maps): the region where the noise-free truth (modelled and
    unmodelled atoms and blobs) is below :data:`EMPTY_FRACTION` of its maximum, more than
    :data:`EMPTY_DILATION` Å from where it is not. Printed: the share of the map's ``|value|``
    mass that lies there, and the 99th percentile of ``|value|`` there relative to the 99th
    percentile inside the truth's support.
(c) **Beyond the resolution** (synthetic maps): the mean FSC over the shells from the input's
    nominal resolution to Nyquist, against the noise-free truth and against the model map.
    Detail that matches the model map better than the truth is model bias.

Models run through ``demhx.enhance(volume, voxel_size, model=..., device="cpu",
threads=...)`` as in ``bench/quality.py`` (its cases, cache and zoned-map handling).
``--markdown`` also writes the per-map numbers to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: cases, map reading, model runs, machine line)
from demhx_export.sampler import phase_randomise  # noqa: E402  (export/ is on the path now)

INPUT = "input"  # the variant that is the map itself
DEFAULT_MODELS = (INPUT, "tight-fast")
# Shared real maps run as noise; left out: EMD-3001 (a MicroED crystal map with anisotropic
# voxels) and the two other files of the EMD-21457 crop (same data, other header conventions).
NOISE_MAPS = ("emd_5168.map", "emd_5168_monomer.mrc", "2566_3J6B_9.mrc", "emd_21457_seg.mrc",
              "6824.mrc")
PHASE_SEEDS = (1, 2)
THRESHOLD_PERCENTILE = 99.5  # of the real output
THRESHOLD_FRACTION = 0.2  # of that percentile: "density" on a noise copy
MAX_ABOVE_SHARE = 0.001  # bar: at most 0.1 % of the voxels above the threshold
MAX_BLOB_RATIO = 0.3  # bar: no blob peak above 30 % of the real output's peak
# Words of a runtime refusal for a map without signal; such a run counts as nothing out.
REFUSAL_WORDS = ("no signal", "all solvent", "only solvent", "pure noise", "only noise",
                 "nothing but noise")
EMPTY_FRACTION = 0.02  # of the truth's maximum: below it the truth is empty
EMPTY_DILATION = 2.0  # Å kept between the empty region and the truth's support
EMPTY_PERCENTILE = 99.0


@dataclass
class NoiseScore:
    """One variant on one map's noise copies (worst of the seeds) against its real output."""

    above: float = float("nan")  # share of voxels above the threshold
    blob: float = float("nan")  # brightest blob's peak / real output's peak
    blob_voxels: int = 0
    refused: int = 0  # copies the runtime refused as holding no signal
    blank: int = 0  # copies whose output is exactly zero (every cube skipped as solvent)
    error: str = ""


@dataclass
class MapResult:
    """Every variant's numbers on one map."""

    name: str
    group: str  # "real" or "synthetic <split>"
    noise: dict[str, NoiseScore] = field(default_factory=dict)
    synthetic: dict[str, dict[str, float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- measures


def phase_randomised(volume: np.ndarray, seed: int) -> np.ndarray:
    """A map with ``volume``'s amplitude spectrum and mean but random phases (float32): the
    training negatives' randomisation (:func:`demhx_export.sampler.phase_randomise`, phases
    of white Gaussian noise drawn with ``seed``)."""
    return phase_randomise(volume.astype(np.float64), np.random.default_rng(seed))


def threshold_of(real_output: np.ndarray) -> float:
    """The density threshold for noise copies: a fraction of the real output's percentile."""
    return THRESHOLD_FRACTION * float(np.percentile(real_output, THRESHOLD_PERCENTILE))


def brightest_blob(output: np.ndarray, threshold: float) -> tuple[float, int]:
    """Peak and size (voxels) of the face-connected region above ``threshold`` with the
    highest peak; ``(0.0, 0)`` when nothing exceeds it."""
    labels, count = ndimage.label(output > threshold)
    if count == 0:
        return 0.0, 0
    peaks = ndimage.maximum(output, labels, index=np.arange(1, count + 1))
    best = int(np.argmax(peaks))
    return float(peaks[best]), int(np.count_nonzero(labels == best + 1))


def noise_score(outputs: list[np.ndarray | None], real_output: np.ndarray) -> NoiseScore:
    """Worst share above the threshold and brightest blob over the noise copies' outputs
    (None: a copy the runtime refused, nothing out)."""
    threshold, peak = threshold_of(real_output), float(real_output.max())
    if not (threshold > 0 and peak > 0):
        return NoiseScore(error=f"real output has no positive density (99.5th percentile "
                                f"{threshold / THRESHOLD_FRACTION:.3g}, peak {peak:.3g})")
    result = NoiseScore(above=0.0, blob=0.0)
    for output in outputs:
        if output is None:
            result.refused += 1
            continue
        result.blank += int(not output.any())
        result.above = max(result.above, float(np.count_nonzero(output > threshold)
                                               / output.size))
        blob_peak, voxels = brightest_blob(output, threshold)
        if blob_peak / peak > result.blob:
            result.blob, result.blob_voxels = blob_peak / peak, voxels
    return result


def empty_region(truth: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(empty, support): voxels more than EMPTY_DILATION Å from where the truth exceeds
    EMPTY_FRACTION of its maximum, and the voxels where it does."""
    support = truth > EMPTY_FRACTION * float(truth.max())
    radius = max(1, int(round(EMPTY_DILATION / voxel_size)))
    grid = np.indices((2 * radius + 1,) * 3) - radius
    ball = (grid ** 2).sum(axis=0) <= radius ** 2
    return ~ndimage.binary_dilation(support, structure=ball), support


def empty_scores(volume: np.ndarray, empty: np.ndarray, support: np.ndarray
                 ) -> dict[str, float]:
    """Share of ``|volume|`` mass in the empty region, and its EMPTY_PERCENTILE there
    relative to that of the volume inside the support."""
    magnitude = np.abs(volume.astype(np.float64))
    total = float(magnitude.sum())
    inside = float(np.percentile(volume[support], EMPTY_PERCENTILE))
    return {"empty mass": float(magnitude[empty].sum()) / total if total > 0 else float("nan"),
            "empty p99": (float(np.percentile(magnitude[empty], EMPTY_PERCENTILE)) / inside
                          if inside > 0 and empty.any() else float("nan"))}


def fsc_beyond(volume: np.ndarray, reference: np.ndarray, voxel_size: float,
               resolution: float) -> float:
    """Mean FSC of ``volume`` to ``reference`` over the shells from 1/resolution to Nyquist."""
    frequencies, values = quality.metrics.fsc(volume, reference, voxel_size)
    beyond = frequencies >= 1.0 / resolution
    return float(np.mean(values[beyond])) if beyond.any() else float("nan")


def synthetic_scores(volume: np.ndarray, case: quality.Case) -> dict[str, float]:
    """Measures (b) and (c) of one variant's map of a synthetic case."""
    assert case.truth is not None  # synthetic cases carry their truth
    empty, support = empty_region(case.truth, case.voxel_size)
    scores = empty_scores(volume, empty, support)
    scores["FSC truth"] = fsc_beyond(volume, case.truth, case.voxel_size, case.resolution)
    scores["FSC model"] = fsc_beyond(volume, case.model_map, case.voxel_size, case.resolution)
    scores["bias"] = scores["FSC model"] - scores["FSC truth"]
    return scores


# --------------------------------------------------------------------------- runs


def is_refusal(message: str) -> bool:
    """Whether a runtime error says the map holds no signal (a legitimate "nothing out")."""
    return any(words in message.lower() for words in REFUSAL_WORDS)


def run_variant(variant: str, case: quality.Case, tiling: str, threads: int,
                notes: dict[str, list[str]], copy: bool = False) -> np.ndarray | str:
    """The variant's output for a case, or the runtime's error text; its warnings go to
    ``notes`` (on noise copies, warnings that differ only in their numbers are counted once)."""
    if variant == INPUT:
        return case.volume
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output, note = quality.run_model(variant, case, tiling, threads)
    for message in [note] + [str(w.message).split(";")[0] for w in caught]:
        if not message:
            continue
        where = "noise copies" if copy else case.name
        key = f"{variant} on {where}: " + (re.sub(r"[0-9.]+", "#", message) if copy
                                            else message)
        notes.setdefault(key, []).append(f"{variant} on {case.name}: {message}")
    return output


def measure_case(case: quality.Case, variants: list[str], tiling: str, threads: int,
                 notes: dict[str, list[str]]) -> MapResult:
    """All variants on one case and on its phase-randomised copies."""
    synthetic = case.truth is not None
    result = MapResult(case.name, case.group)
    copies = [quality.Case(f"{case.name} (phases {seed})", case.group,
                           phase_randomised(case.volume, seed), case.voxel_size,
                           case.resolution, case.model_map, np.zeros_like(case.mask))
              for seed in PHASE_SEEDS]
    for variant in variants:
        real = run_variant(variant, case, tiling, threads, notes)
        if isinstance(real, str):
            result.noise[variant] = NoiseScore(error=f"real map: {real}")
            continue
        if synthetic:
            result.synthetic[variant] = synthetic_scores(real, case)
        outputs: list[np.ndarray | None] = []
        for copy in copies:
            output = run_variant(variant, copy, tiling, threads, notes, copy=True)
            if isinstance(output, str) and not is_refusal(output):
                result.noise[variant] = NoiseScore(error=f"{copy.name}: {output}")
                break
            outputs.append(None if isinstance(output, str) else output)
        else:
            result.noise[variant] = noise_score(outputs, real)
    return result


def real_cases() -> list[quality.Case]:
    """The shared real maps of NOISE_MAPS as deposited (zoned ones with their model mask,
    from ``bench/quality.py``, for its noise statistics of zoned maps)."""
    known = {f"{case.name}": case for case in quality.real_cases()
             if case.group == "real, deposited"}
    cases = []
    for name in NOISE_MAPS:
        stem = name.split(".")[0]
        if stem in known:
            cases.append(known[stem])
            continue
        volume, voxel_size, _ = quality.read_map(quality.MAPS_DIR / name)
        cases.append(quality.Case(stem, "real, deposited", volume, voxel_size, float("nan"),
                                  np.zeros_like(volume), np.zeros_like(volume)))
    return cases


def measure(variants: list[str], count: int, split: str = "val", maps: str = "all",
            tiling: str = "default", threads: int = 2, log: bool = True
            ) -> tuple[list[MapResult], list[str]]:
    """Every variant on the real maps and ``count`` synthetic maps; (results, notes)."""
    cases = real_cases() if maps in ("all", "real") else []
    if maps in ("all", "synthetic"):
        cases += quality.synthetic_cases(split, count)
    results: list[MapResult] = []
    notes: dict[str, list[str]] = {}
    for case in cases:
        start = time.perf_counter()
        results.append(measure_case(case, variants, tiling, threads, notes))
        if log:
            print(f"  {case.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    return results, [lines[0] + (f" (and {len(lines) - 1} more like it)" if len(lines) > 1
                                 else "") for lines in notes.values()]


# --------------------------------------------------------------------------- report


def worst(results: list[MapResult], variant: str, group: str | None = None) -> NoiseScore:
    """The variant's worst share and blob over the maps (of a group prefix), with where."""
    scores = [(r, r.noise[variant]) for r in results if variant in r.noise
              and (group is None or r.group.startswith(group))]
    summary = NoiseScore(above=0.0, blob=0.0) if scores else NoiseScore()
    for result, score in scores:
        if score.error:
            summary.error = f"{result.name}: {score.error}"
            continue
        summary.above = max(summary.above, score.above)
        summary.refused += score.refused
        summary.blank += score.blank
        if score.blob >= summary.blob:
            summary.blob, summary.blob_voxels = score.blob, score.blob_voxels
    return summary


def verdict(results: list[MapResult], variant: str) -> tuple[bool, str]:
    """Whether the variant meets the noise bars on every map, and a one-line reason."""
    summary = worst(results, variant)
    if summary.error or np.isnan(summary.above):
        return False, f"not measured ({summary.error or 'no maps'})"
    where_above = max(results, key=lambda r: r.noise[variant].above
                      if variant in r.noise and not r.noise[variant].error else -1.0)
    where_blob = max(results, key=lambda r: r.noise[variant].blob
                     if variant in r.noise and not r.noise[variant].error else -1.0)
    passed = summary.above <= MAX_ABOVE_SHARE and summary.blob <= MAX_BLOB_RATIO
    return passed, (f"worst {100 * summary.above:.3f} % above ({where_above.name}; bar ≤ "
                    f"{100 * MAX_ABOVE_SHARE:.1f} %), brightest blob "
                    f"{100 * summary.blob:.1f} % of the real peak ({where_blob.name}; bar ≤ "
                    f"{100 * MAX_BLOB_RATIO:.0f} %): {'pass' if passed else 'FAIL'}")


def synthetic_medians(results: list[MapResult], variant: str) -> dict[str, float]:
    """Median over the synthetic maps of each measure (b) and (c) of a variant."""
    rows = [r.synthetic[variant] for r in results if variant in r.synthetic]
    keys = ("empty mass", "empty p99", "FSC truth", "FSC model", "bias")
    return {key: float(np.nanmedian([row[key] for row in rows])) if rows else float("nan")
            for key in keys} | {"n": float(len(rows))}


def noise_rows(results: list[MapResult], variants: list[str]) -> list[tuple[str, ...]]:
    """Table (a): each real map, then the synthetic maps' worst, per variant."""
    rows: list[tuple[str, ...]] = []
    groups = sorted({r.group for r in results if not r.group.startswith("real")})
    entries = [(r.name, [r]) for r in results if r.group.startswith("real")]
    entries += [(f"{g} ({sum(r.group == g for r in results)}), worst",
                 [r for r in results if r.group == g]) for g in groups]
    for label, members in entries:
        for variant in variants:
            score = worst(members, variant)
            note = score.error[:60] if score.error else ", ".join(
                f"{count} of {len(PHASE_SEEDS) * len(members)} copies {what}"
                for count, what in ((score.refused, "refused"), (score.blank, "all zero"))
                if count)
            rows.append((label, variant, _percent(score.above, 3), _percent(score.blob, 1),
                         str(score.blob_voxels) if not np.isnan(score.blob) else "-", note))
    return rows


def synthetic_rows(results: list[MapResult], variants: list[str]) -> list[tuple[str, ...]]:
    """Table (b, c): medians over the synthetic maps, per variant."""
    rows: list[tuple[str, ...]] = []
    for variant in variants:
        medians = synthetic_medians(results, variant)
        if medians["n"]:
            rows.append((variant, str(int(medians["n"])), _percent(medians["empty mass"], 1),
                         _percent(medians["empty p99"], 1), f"{medians['FSC truth']:.3f}",
                         f"{medians['FSC model']:.3f}", f"{medians['bias']:+.3f}"))
    return rows


NOISE_HEADER = ("map", "variant", "above %", "blob %", "blob voxels", "note")
SYNTHETIC_HEADER = ("variant", "n", "empty mass %", "empty p99 %", "FSC truth >res",
                    "FSC model >res", "model − truth")


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]],
                 markdown: bool = False) -> str:
    """Plain aligned text, or a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True))
                     for row in (header, *rows))


def report(results: list[MapResult], variants: list[str], notes: list[str],
           markdown: bool = False) -> str:
    """Both tables, the verdict of every model on the noise bars, and the notes."""
    parts = ["(a) noise in: phase-randomised copies (worst of seeds "
             f"{', '.join(map(str, PHASE_SEEDS))}); above = share of voxels above "
             f"{THRESHOLD_FRACTION:g} × the real output's {THRESHOLD_PERCENTILE:g}th percentile,"
             " blob = brightest connected blob's peak / the real output's peak", "",
             format_table(NOISE_HEADER, noise_rows(results, variants), markdown), ""]
    synthetic = synthetic_rows(results, variants)
    if synthetic:
        parts += ["(b, c) synthetic maps, medians: |value| mass and 99th percentile where the "
                  "noise-free truth is empty (relative to inside it); mean FSC from the "
                  "input's resolution to Nyquist against the truth and the model map", "",
                  format_table(SYNTHETIC_HEADER, synthetic, markdown), ""]
    bullet = "- " if markdown else ""
    parts += [f"{bullet}{v}: noise bars: {verdict(results, v)[1]}" for v in variants
              if v != INPUT]
    parts += [f"{bullet}note: {note}" for note in notes]
    return "\n".join(parts)


def _percent(value: float, digits: int) -> str:
    return "-" if np.isnan(value) else f"{100 * value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="registered model name, ONNX file "
                        f"or '{INPUT}' (repeatable; default: {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--count", type=int, default=4, help="synthetic maps")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--maps", choices=("all", "synthetic", "real"), default="all")
    parser.add_argument("--tiling", default="default", choices=("default", "fast", "reference"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    variants = args.model or list(DEFAULT_MODELS)
    start = time.perf_counter()
    results, notes = measure(variants, args.count, args.split, args.maps, args.tiling,
                             args.threads)
    seconds = time.perf_counter() - start
    head = [f"models: {', '.join(variants)}; {args.tiling} tiling, {args.threads} threads",
            f"machine: {quality.machine()}; {seconds:.0f} s"]
    print("\n".join(head + [report(results, variants, notes)]))
    if args.markdown:
        body = "  \n".join(head) + "\n\n" + report(results, variants, notes, markdown=True)
        Path(args.markdown).write_text(body + "\n")
        Path(args.markdown).with_suffix(".json").write_text(json.dumps(
            [asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
