"""Input range: what the network handles, measured on training inputs, real maps and slips.

    python bench/input_range.py [--count 12] [--seed 0]
    python bench/input_range.py --network [--test-count 3] [--threads 2] [--tables 1,2,3]

Without ``--network`` (no network runs): the network only knows inputs like its synthetic
training maps. This simulates ``--count`` training-split samples as ``demhx-export
build-dataset`` does (resolution drawn in 2.5–6 Å, noise normalised as for training) and
prints, for each, where its input lies — the peak (99.99th percentile) and the depth of the
lower tail (0.01st percentile) in noise standard deviations from the noise mean
(:func:`demhx.validate.density_tails`), the fractions of voxels more than 5 noise stds above
and below it (:func:`demhx.validate.density_mass`, the contrast's sign), and the fraction
within 2 noise stds of it (the solvent band of :func:`demhx.validate.check_noise_level`) —
then the same for
the real maps in ``../shared/data/maps`` with the statistics the runtime chooses
(:func:`demhx.normalise.choose_stats`), as given and multiplied by -1.
``demhx.normalise.MAX_PEAK_SIGMAS`` and the contrast and noise-band limits of
:mod:`demhx.validate` are chosen from these tables.

With ``--network``, the default model (``--model``) runs with ``--tiling fast`` on
``--test-count`` test-split samples (structures never trained on; unmasked; their truth is
known) and on the real maps, and the output check of :func:`demhx.validate.output_fidelity`
(amplitude ``gain`` and correlation ``cc`` of output to input where the input has density) is
printed beside the CC of output and input to the truth inside the molecule:

1. as they are (the outputs the check must pass), masked maps with and without zeroing the
   output outside their mask;
2. with the voxel size declared ``s`` times too large or small (a slipped voxel size, or a
   map far finer or coarser than the model's voxels): where the network stops helping
   (:data:`demhx.validate.VOXEL_RATIO_REFUSED`, ``VOXEL_RATIO_WARNED``);
3. inverted, with noise statistics whose mean is off by ``k`` noise stds, and pure noise
   (the check must not call an empty output of noise wrong).

Needs the export package (gemmi); about 5 s per sample and 1-10 s per run on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from demhx import mrcio, normalise, validate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESOLUTIONS = (2.5, 6.0)  # the training set's range of half-map resolutions, Å
MAX_ATOMS = 25_000  # build-dataset's default
SCALES = (0.2, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 4.0, 6.0, 10.0)
MODEL_GRID_EDGE = 96  # crops keep the model grid at most this many voxels along each axis
NOISE_OFFSETS = (-50.0, -10.0, -3.0, 0.0, 3.0, 10.0, 50.0)  # noise-mean errors, noise stds


def _where(volume: np.ndarray, stats: normalise.NoiseStats) -> tuple[float, ...]:
    """(peak, lower tail, fraction beyond 5 stds above, below, fraction within 2 stds of the
    noise mean), with the measured std."""
    std = stats.widened_from or stats.std
    upper, lower = validate.density_tails(volume, stats.mean, std)
    above, below = validate.density_mass(volume, stats.mean, std)
    band = float(np.mean(np.abs(volume - stats.mean) <= validate.NOISE_BAND_SIGMAS * std))
    return upper, lower, above, below, band


def synthetic_inputs(count: int, seed: int) -> list[tuple[str, float, tuple[float, ...]]]:
    """(sample, resolution, (peak, lower tail, band)) for ``count`` training inputs.

    Planned, simulated and normalised exactly as ``demhx-export build-dataset`` does.
    """
    from demhx_export.dataset import NOISE_STD, normalise_pair, plan_samples
    from demhx_export.synth import simulate_pair

    rows = []
    plan = plan_samples("train", count, seed, RESOLUTIONS, MAX_ATOMS, SHARED / "structures")
    for item in plan:
        inputs, _, _ = normalise_pair(simulate_pair(item["path"], item["resolution"],
                                                    item["seed"]))
        where = _where(inputs, normalise.user_stats(0.0, NOISE_STD))
        rows.append((item["id"], item["resolution"], where))
    return rows


def real_maps() -> Iterator[tuple[str, np.ndarray, tuple[float, float, float]]]:
    """(name, data, voxel size) of the shared real maps."""
    for path in sorted(p for p in (SHARED / "maps").iterdir() if p.suffix in (".mrc", ".map")):
        item = mrcio.read_map(path)
        yield path.name, np.asarray(item.data, dtype=np.float32), item.voxel_size


def print_input_tables(count: int, seed: int) -> None:
    rows = synthetic_inputs(count, seed)
    print("| synthetic training input | resolution Å | peak | lower tail | beyond 5 stds: above "
          "/ below | within 2 stds |\n|---|---|---|---|---|---|")
    for name, resolution, (upper, lower, above, below, band) in rows:
        print(f"| {name} | {resolution:.2f} | {upper:.1f} | {lower:.1f} | {above:.3%} / "
              f"{below:.4%} | {band:.0%} |")
    for column, label in ((0, "peaks"), (1, "lower tails")):
        values = np.array([where[column] for _, _, where in rows] or [np.nan])
        print(f"\nsynthetic {label}: min {values.min():.1f}, median {np.median(values):.1f}, "
              f"max {values.max():.1f} noise stds")
    ratios = np.array([w[3] / max(w[2], 1e-12) for _, _, w in rows] or [np.nan])
    bands = np.array([w[4] for _, _, w in rows] or [np.nan])
    print(f"below / above: max {ratios.max():.2g}; within 2 stds: min {bands.min():.0%} "
          f"(MAX_PEAK_SIGMAS = {normalise.MAX_PEAK_SIGMAS:g})\n")
    print("| real map | method | peak | lower tail | beyond 5 stds: above / below | within 2 "
          "stds | times -1: above / below |\n|---|---|---|---|---|---|---|")
    for name, volume, voxel in real_maps():
        stats = normalise.choose_stats(volume, voxel)
        upper, lower, above, below, band = _where(volume, stats)
        flipped = normalise.choose_stats(-volume, voxel)
        _, _, flipped_above, flipped_below, _ = _where(-volume, flipped)
        print(f"| {name} | {stats.method} | {upper:.1f} | {lower:.1f} | {above:.2%} / "
              f"{below:.2%} ({_ratio(below, above)}) | {band:.0%} | {flipped_above:.2%} / "
              f"{flipped_below:.2%} ({_ratio(flipped_below, flipped_above)}) |")


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2g}" if denominator > 0 else "inf"


# --------------------------------------------------------------------------- network runs


class Runner:
    """The model, run on arrays with the fast tiling; the output check measured apart."""

    def __init__(self, model: str | None, threads: int) -> None:
        import demhx

        self.enhancer = demhx.Enhancer(model, device="cpu", threads=threads)
        self.model_voxel = self.enhancer.runtime.spec.voxel_size

    def run(self, volume: np.ndarray, voxel: Any, noise_stats: Any = None,
            zero_outside: bool = True, unchecked: tuple[str, ...] = ()) -> dict[str, Any]:
        """Output, statistics, cubes, seconds, warnings and the output check's verdict.

        The output check is measured, not enforced; ``unchecked`` names checks of
        :mod:`demhx.validate` turned off; ``zero_outside`` False keeps the network's output
        outside a masked map's mask.
        """
        from demhx.options import EnhanceOptions

        options = EnhanceOptions(tiling="fast", noise_stats=noise_stats)
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for check in ("check_fidelity", *unchecked):
                stack.enter_context(mock.patch.object(validate, check, lambda *a, **k: None))
            if not zero_outside:
                stack.enter_context(mock.patch.object(normalise, "masked_outside",
                                                      lambda volume: None))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            try:
                enhanced = self.enhancer.process(volume, voxel, options)
            except ValueError as refusal:
                return {"refused": str(refusal)}
        return {"output": enhanced.map, "info": enhanced.info,
                "seconds": time.perf_counter() - start,
                "verdict": _verdict(enhanced.info.fidelity),
                "warnings": [str(w.message) for w in caught]}


def _verdict(fidelity: validate.Fidelity | None) -> str:
    """What the output check says: ``pass``, ``warn`` or ``fail`` (``-`` without signal)."""
    if fidelity is None:
        return "no signal"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            validate.check_fidelity(fidelity, "map", "model")
        except RuntimeError:
            return "fail"
    return "warn" if caught else "pass"


def _cc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _fidelity_text(result: dict[str, Any]) -> str:
    if "refused" in result:
        return "refused | | |"
    fidelity = result["info"].fidelity
    if fidelity is None:
        return f"no signal | | | {result['verdict']}"
    return (f"{fidelity.signal_fraction:.1%} | {fidelity.gain:.2f} | {fidelity.cc:.2f} | "
            f"{result['verdict']}")


def _notes(result: dict[str, Any]) -> str:
    if "refused" in result:
        return "refused: " + result["refused"].split(": ", 1)[-1][:70]
    seen = [w.split(": ", 1)[-1][:60] for w in result["warnings"]]
    return "; ".join(seen) or ""


def test_samples(count: int, seed: int) -> list[Any]:
    """``count`` unmasked test-split samples (simulated pairs with their truth)."""
    from demhx_export.dataset import plan_samples
    from demhx_export.synth import simulate_pair

    plan = plan_samples("test", count, seed, RESOLUTIONS, MAX_ATOMS, SHARED / "structures")
    return [(item["id"], item["resolution"],
             simulate_pair(item["path"], item["resolution"], item["seed"])) for item in plan]


def _crop(array: np.ndarray, edge: int) -> np.ndarray:
    """The central ``edge``³ (at most the array) of a (z, y, x) array."""
    starts = [max(0, (n - edge) // 2) for n in array.shape]
    return np.ascontiguousarray(array[tuple(slice(s, s + edge) for s in starts)])


def print_network_tables(runner: Runner, samples: list[Any]) -> None:
    print("\n1. As they are: output check (signal fraction, gain, cc, verdict) and the CC to "
          "the truth inside the molecule (input → output)\n")
    print("| map | cubes | seconds | signal | gain | cc | verdict | CC to truth | warnings |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, resolution, pair in samples:
        inside = pair.signal_mask > 0.5
        result = runner.run(pair.input, 1.0)
        truth = (f"{_cc(pair.input, pair.truth, inside):.3f} → "
                 f"{_cc(result['output'], pair.truth, inside):.3f}")
        print(f"| {name} ({resolution:.1f} Å) | {result['info'].cubes.run} | "
              f"{result['seconds']:.1f} | {_fidelity_text(result)} | {truth} | "
              f"{_notes(result)} |")
    for name, volume, voxel in real_maps():
        edge = max(16, int(MODEL_GRID_EDGE * runner.model_voxel / max(voxel)))
        volume = _crop(volume, edge)
        label = name if edge >= max(volume.shape) else f"{name} (central {edge}³)"
        result = runner.run(volume, voxel)
        leak = ""
        outside = normalise.masked_outside(volume)
        if outside is not None:
            kept = runner.run(volume, voxel, zero_outside=False)["output"]
            leak = (f"{'; ' if _notes(result) else ''}outside its mask, before zeroing: up to "
                    f"{np.abs(kept[outside]).max() / np.abs(kept).max():.1%} of the peak, "
                    f"now {np.abs(result['output'][outside]).max():g}")
        print(f"| {label} | {result['info'].cubes.run} | {result['seconds']:.1f} | "
              f"{_fidelity_text(result)} | | {_notes(result)}{leak} |")


def print_scale_table(runner: Runner, samples: list[Any]) -> None:
    print("\n2. Voxel size declared s times the true one (voxel-size check off; the "
          "simulated noise statistics given, as crops may hold no solvent)\n")
    print("| map | s | model grid | cubes | signal | gain | cc | verdict | CC to truth |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, resolution, pair in samples:
        for scale in SCALES:
            edge = max(16, int(MODEL_GRID_EDGE / scale))
            volume, truth = _crop(pair.input, edge), _crop(pair.truth, edge)
            inside = _crop(pair.signal_mask, edge) > 0.5
            known = (pair.params["noise_mean"], pair.params["noise_std"])  # crops: no solvent
            result = runner.run(volume, scale, known, unchecked=("check_voxel_ratio",))
            if "refused" in result:
                print(f"| {name} | {scale:g} | | | refused | | | {result['refused'][:60]} |")
                continue
            print(f"| {name} ({resolution:.1f} Å) | {scale:g} | "
                  f"{'×'.join(map(str, result['info'].model_shape))} | "
                  f"{result['info'].cubes.run} | {_fidelity_text(result)} | "
                  f"{_cc(volume, truth, inside):.3f} → "
                  f"{_cc(result['output'], truth, inside):.3f} |")


def print_contrast_noise_table(runner: Runner, samples: list[Any]) -> None:
    print("\n3. Inverted maps, wrong noise means, pure noise (checks off but the output "
          "check)\n")
    print("| map | case | signal | gain | cc | verdict | CC to truth | pre-run checks |\n"
          "|---|---|---|---|---|---|---|---|")
    quiet = ("check_contrast", "check_noise_level", "check_noise_range")
    for name, _, pair in samples[:2]:
        volume = _crop(pair.input, MODEL_GRID_EDGE)
        truth, inside = _crop(pair.truth, MODEL_GRID_EDGE), _crop(pair.signal_mask,
                                                                  MODEL_GRID_EDGE) > 0.5
        stats = normalise.choose_stats(volume, (1.0,) * 3)
        cases = [("inverted", -volume, None)]
        cases += [(f"noise mean {k:+g} stds", volume, (stats.mean + k * stats.std, stats.std))
                  for k in NOISE_OFFSETS]
        for label, data, noise in cases:
            checked = runner.run(data, 1.0, noise)
            result = (runner.run(data, 1.0, noise, unchecked=quiet) if "refused" in checked
                      else checked)
            print(f"| {name} | {label} | {_fidelity_text(result)} | "
                  f"{_cc(result['output'], truth, inside):.3f} | {_notes(checked)} |")
    rng = np.random.default_rng(0)
    white = rng.standard_normal((80, 80, 80)).astype(np.float32)
    from scipy import ndimage

    for label, data in (("white", white), ("smoothed over 1.5 voxels",
                                           ndimage.gaussian_filter(white, 1.5))):
        result = runner.run(data, 1.0)
        print(f"| pure noise 80³ | {label} | {_fidelity_text(result)} | | {_notes(result)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--network", action="store_true", help="run the network tables")
    parser.add_argument("--test-count", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tables", default="1,2,3", help="network tables to print")
    args = parser.parse_args()
    if not args.network:
        print_input_tables(args.count, args.seed)
        return
    runner = Runner(args.model, args.threads)
    samples = test_samples(args.test_count, args.seed)
    tables = (print_network_tables, print_scale_table, print_contrast_noise_table)
    for number in args.tables.split(","):
        tables[int(number) - 1](runner, samples)


if __name__ == "__main__":
    main()
