"""Which per-voxel confidence estimator predicts the local error of the output?

    python bench/confidence_estimators.py [--model NAME_OR_PATH] [--error-model ONNX]
                                          [--tta 6] [--count 4] [--threads 1]
                                          [--cache /tmp/conf]

The output is ``demhx.enhance`` of the half-map average (one plain run, no rotations). The
estimators compared on the same maps:

``|output|``            the output's magnitude: the baseline for the plain rank correlation
                        (error grows with density);
``constant``            1 everywhere: the baseline of the relative measure below, whose two
                        sides share the factor 1/|output|;
``tta spread``          ``enhance(..., confidence=True, tta=N)``: the standard deviation over
                        N rotations (what ``--confidence`` writes today); ``own mean`` scores
                        it against the rotations' mean, the output it ships with;
``error head``          the error channel of the network (``--error-model``, exported with
                        ``demhx-export export CKPT OUT.onnx --channel error``), run as a model
                        of its own, clipped at 0;
``half same/√2 σS``     ``|out1 - out2|``, each half-map enhanced alone with the noise
                        statistics the runtime chose for the average (``same``) or with that
                        std times √2 (``√2``: the half-maps' independent noise is √2 larger),
                        Gaussian-smoothed by S voxels (0: none);
``rank …``              the mean of two estimators' percentile ranks over the box.

Error: ``|output - reference|``, with the reference the simulation's ``truth`` target (the
recipe the candidate networks are trained on) or the LocScale-style target (``LS``, as
``bench/confidence.py``). Columns: Spearman correlation of estimator and error inside the
tight model mask (``m``) and over the bright output voxels (``b``: ``|output|`` above
:data:`BRIGHT_FRACTION` of its :data:`BRIGHT_PERCENTILE` th percentile); the same for
estimator/|output| against error/|output| (``/|o|``, the relative error; the bar is
:data:`BAR`, to be read against the ``constant`` row); the rank correlation in the mask after
smoothing both by :data:`REGIONAL_SMOOTHING` voxels (``m σ2``), and of both divided by the
smoothed ``|output|`` (``m σ2/|o|``); the AUC of the estimator (``AUC``) and of
estimator/|output| (``AUC/|o|``) for telling invented from real density among the bright
voxels: invented where the noise-free truth is empty (``bench/invented.py``'s empty region:
below 2 % of its maximum and 2 Å away from where it is not), real where it exceeds 2 % of
its maximum (no AUC with fewer than :data:`MIN_CLASS_VOXELS` of either).

Maps: the synthetic test-split maps of ``bench/quality.py`` (same plan and seed); their
half-maps and truth targets are simulated again and cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import confidence  # noqa: E402  (bench/confidence.py: rank correlations)
import invented  # noqa: E402  (bench/invented.py: the truth's empty region)
import quality  # noqa: E402  (bench/quality.py: cases, cache, machine line)
from demhx_export.synth import simulate_pair  # noqa: E402  (export/ is on the path now)

BRIGHT_PERCENTILE = 99.9  # of |output|
BRIGHT_FRACTION = 0.1  # of that percentile: a bright output voxel
HALF_SMOOTHING = (0.0, 1.0, 2.0)  # voxels, Gaussian sigmas of the half-map disagreement
REGIONAL_SMOOTHING = 2.0  # voxels, as bench/confidence.py's regional column
HALF_NOISE_FACTOR = math.sqrt(2.0)  # half-map noise std over the average's
MIN_CLASS_VOXELS = 20  # fewer invented (or real) bright voxels: no AUC
BAR = 0.70  # Spearman of the relative error the estimator must reach
HEADER = ("rs m", "rs b", "rs/|o| m", "rs/|o| b", "m σ2", "m σ2/|o|", "AUC", "AUC/|o|",
          "LS rs m", "LS /|o| b")


@dataclass
class Pair:
    """One synthetic map with what the study needs; maps (z, y, x) float32 at 1 Å/voxel."""

    name: str
    resolution: float
    volume: np.ndarray  # the half-map average
    half1: np.ndarray
    half2: np.ndarray
    truth_target: np.ndarray
    locscale_target: np.ndarray
    mask: np.ndarray  # tight soft model mask
    # bench/invented.py's regions of the noise-free truth (every ordered atom and blob)
    empty: np.ndarray
    support: np.ndarray


@dataclass
class Estimate:
    """One estimator's map and the output it is judged against."""

    name: str
    values: np.ndarray
    output: np.ndarray


# --------------------------------------------------------------------------- metrics


def spearman(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Spearman correlation of two maps over the voxels ``where`` is True."""
    return confidence.correlations(a, b, where)[0]


def relative(values: np.ndarray, output: np.ndarray) -> np.ndarray:
    """``values / |output|`` (0 where the output is exactly 0)."""
    magnitude = np.abs(output).astype(np.float64)
    return np.divide(values, magnitude, out=np.zeros(values.shape), where=magnitude > 0)


def bright_voxels(output: np.ndarray) -> np.ndarray:
    """``|output|`` above BRIGHT_FRACTION of its BRIGHT_PERCENTILE th percentile."""
    magnitude = np.abs(output)
    return magnitude > BRIGHT_FRACTION * float(np.percentile(magnitude, BRIGHT_PERCENTILE))


def auc(score: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for telling ``positive`` voxels from
    ``negative`` ones (Mann-Whitney; ties count half); NaN with too few of either."""
    a, b = score[positive].astype(np.float64), score[negative].astype(np.float64)
    if a.size < MIN_CLASS_VOXELS or b.size < MIN_CLASS_VOXELS:
        return float("nan")
    ranks = stats.rankdata(np.concatenate([a, b]))
    return float((ranks[:a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size))


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Each voxel's rank over the box, scaled to (0, 1] (ties share their mean rank)."""
    return (stats.rankdata(values.ravel()) / values.size).reshape(values.shape)


def regional(values: np.ndarray, error: np.ndarray, output: np.ndarray, where: np.ndarray
             ) -> tuple[float, float]:
    """Spearman correlation of estimator and error, both smoothed by REGIONAL_SMOOTHING
    voxels, and of both divided by the smoothed ``|output|``, over ``where``."""
    smooth = [ndimage.gaussian_filter(a, REGIONAL_SMOOTHING)
              for a in (values, error, np.abs(output).astype(np.float64))]
    return (spearman(smooth[0], smooth[1], where),
            spearman(relative(smooth[0], smooth[2]), relative(smooth[1], smooth[2]), where))


def score(estimate: Estimate, pair: Pair) -> tuple[float, ...]:
    """The HEADER cells of one estimator on one map."""
    output, values = estimate.output, estimate.values.astype(np.float64)
    inside, bright = pair.mask > 0.5, bright_voxels(output)
    invented_, real = bright & pair.empty, bright & pair.support
    error = np.abs(output - pair.truth_target)
    error_ls = np.abs(output - pair.locscale_target)
    ratio = relative(values, output)
    return (spearman(values, error, inside), spearman(values, error, bright),
            spearman(ratio, relative(error, output), inside),
            spearman(ratio, relative(error, output), bright),
            *regional(values, error, output, inside),
            auc(values, invented_, real), auc(ratio, invented_, real),
            spearman(values, error_ls, inside),
            spearman(ratio, relative(error_ls, output), bright))


# --------------------------------------------------------------------------- maps and runs


def load_pairs(count: int, cache: Path) -> list[Pair]:
    """The test-split maps of ``bench/quality.py`` with their half-maps and truth targets
    (simulated again once, cached under ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    pairs = []
    for case in quality.synthetic_cases("test", count):
        if case.target is None or case.truth is None:
            continue
        path = cache / f"{case.name}.npz"
        if not path.is_file():
            item = next(i for i in quality.plan_samples(
                "test", count, quality.SYNTHETIC_SEED, (2.5, 6.0), 25_000,
                quality.DEFAULT_STRUCTURES) if i["id"] == case.name)
            simulated = simulate_pair(item["path"], item["resolution"], item["seed"])
            np.savez(path, half1=simulated.half1, half2=simulated.half2,
                     truth_target=simulated.targets["truth"])
        with np.load(path) as data:
            if not np.allclose(0.5 * (data["half1"] + data["half2"]), case.volume, atol=1e-6):
                raise RuntimeError(f"{path}: half-maps do not average to {case.name}'s input; "
                                   "delete the cache file")
            pairs.append(Pair(case.name, case.resolution, case.volume, data["half1"],
                              data["half2"], data["truth_target"], case.target, case.mask,
                              *invented.empty_region(case.truth, 1.0)))
    return pairs


@contextlib.contextmanager
def without_output_check() -> Iterator[None]:
    """The runtime's output check compares an output with the input's density; an error
    map is not a map of the density, so the check is off for the error model's runs."""
    from demhx import validate

    original = validate.check_fidelity
    validate.check_fidelity = lambda *args, **kwargs: None
    try:
        yield
    finally:
        validate.check_fidelity = original


def run(enhancer: Any, volume: np.ndarray, **options: Any) -> tuple[Any, Any]:
    """``enhancer.process`` at 1 Å/voxel with the runtime's warnings silenced: the map (or
    map and spread) and the run's record."""
    from demhx.options import EnhanceOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enhanced = enhancer.process(volume, 1.0, EnhanceOptions(**options))
        return enhanced.result(), enhanced.info


def estimates(pair: Pair, model: Any, error_model: Any | None, tta: int
              ) -> tuple[list[Estimate], str]:
    """Every estimator of one map and a note on the noise statistics used."""
    output, info = run(model, pair.volume)
    noise = (info.noise.mean, info.noise.std)
    (tta_mean, spread), _ = run(model, pair.volume, confidence=True, tta=tta)
    found = [Estimate("|output|", np.abs(output), output),
             Estimate("constant", np.ones_like(output), output),
             Estimate("tta spread", spread, output),
             Estimate("tta spread, own mean", spread, tta_mean)]
    if error_model is not None:
        with without_output_check():
            error, _ = run(error_model, pair.volume)
        found.append(Estimate("error head", np.maximum(error, 0.0), output))
    for label, factor in (("same", 1.0), ("√2", HALF_NOISE_FACTOR)):
        stats_ = (noise[0], noise[1] * factor)
        difference = np.abs(run(model, pair.half1, noise_stats=stats_)[0]
                            - run(model, pair.half2, noise_stats=stats_)[0])
        for sigma in HALF_SMOOTHING:
            smoothed = ndimage.gaussian_filter(difference, sigma) if sigma else difference
            found.append(Estimate(f"half {label} σ{sigma:g}", smoothed, output))
    found += combinations(found)
    note = f"noise mean {noise[0]:.3g}, std {noise[1]:.3g} ({info.noise.method})"
    return found, note


def combinations(found: list[Estimate]) -> list[Estimate]:
    """Rank averages of the TTA spread, the error head and the half-map disagreement
    (√2 statistics, σ1: fixed before looking at the numbers)."""
    by_name = {estimate.name: estimate for estimate in found}
    half = by_name["half √2 σ1"]
    out = []
    for other, label in (("tta spread", "tta"), ("error head", "error")):
        if other in by_name:
            mean = 0.5 * (percentile_rank(by_name[other].values) + percentile_rank(half.values))
            out.append(Estimate(f"rank {label}+half √2 σ1", mean, half.output))
    return out


# --------------------------------------------------------------------------- table


def medians(rows: list[tuple[float, ...]]) -> tuple[float, ...]:
    """Per column, the median over the maps of the finite cells (NaN when none)."""
    columns = [[value for value in column if np.isfinite(value)] for column in zip(*rows,
                                                                                  strict=True)]
    return tuple(float(np.median(column)) if column else float("nan") for column in columns)


def format_row(name: str, cells: tuple[float, ...]) -> str:
    text = [f"{value:.3f}" if np.isfinite(value) else "-" for value in cells]
    return "  ".join([name.ljust(26), *(c.rjust(len(t)) for c, t in zip(text, HEADER,
                                                                         strict=True))])


def header_line() -> str:
    return "  ".join(["estimator".ljust(26), *HEADER])


def class_counts(pair: Pair, output: np.ndarray) -> str:
    """How many bright output voxels are invented and real."""
    bright = bright_voxels(output)
    return (f"bright {int(bright.sum())} voxels: {int((bright & pair.empty).sum())} invented, "
            f"{int((bright & pair.support).sum())} real")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="registered model name or ONNX file (default model)")
    parser.add_argument("--error-model", help="ONNX file of the same network's error channel")
    parser.add_argument("--tta", type=int, default=6, help="rotations of the spread")
    parser.add_argument("--count", type=int, default=4, help="synthetic test-split maps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/conf"),
                        help="folder for the half-maps and truth targets")
    args = parser.parse_args(argv)
    import demhx

    start = time.perf_counter()
    model = demhx.Enhancer(args.model, device="cpu", threads=args.threads)
    error_model = (demhx.Enhancer(args.error_model, device="cpu", threads=args.threads)
                   if args.error_model else None)
    print(f"model: {args.model or 'default'}, error model: {args.error_model or 'none'}, "
          f"{args.tta} rotations, {args.threads} thread(s)\nmachine: {quality.machine()}")
    table: dict[str, list[tuple[float, ...]]] = {}
    for pair in load_pairs(args.count, args.cache):
        began = time.perf_counter()
        found, note = estimates(pair, model, error_model, args.tta)
        print(f"\n{pair.name} ({pair.resolution:.2f} Å, box {pair.volume.shape[0]}; {note}; "
              f"{class_counts(pair, found[0].output)}; {time.perf_counter() - began:.0f} s)")
        print(header_line())
        for estimate in found:
            cells = score(estimate, pair)
            table.setdefault(estimate.name, []).append(cells)
            print(format_row(estimate.name, cells), flush=True)
    print(f"\nmedian over {args.count} maps\n{header_line()}")
    for name, rows in table.items():
        print(format_row(name, medians(rows)))
    print(f"({time.perf_counter() - start:.0f} s; rs = Spearman with |output - truth target| "
          "(LS: LocScale target); m = tight model mask; b = bright output voxels; /|o| = "
          f"both divided by |output| (bar {BAR:.2f}); AUC: invented vs real bright voxels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
