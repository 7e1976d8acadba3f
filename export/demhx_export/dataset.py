"""Build a training/validation dataset of simulated (input, target) pairs for one split.

``OUTDIR/index.json`` lists the samples; ``OUTDIR/<id>.npz`` holds, per sample:

``input``  (z, y, x) float32, normalised: solvent noise mean 0, std ``NOISE_STD`` (0.1);
``target_<recipe>`` (z, y, x) float32, one per target recipe of
``demhx_export.synth.TARGET_RECIPES``, scaled by the same factor as the input (background 0);
``signal`` (z, y, x) uint8, 1 in the molecule region (used for balanced cube sampling);
``negative`` (z, y, x) float32, when present: the raw input with its Fourier phases randomised
over the whole box, normalised by the runtime's own statistics — exactly what a user's
phase-randomised map looks like to the network (noise-level, coloured like the map), the
negatives of :mod:`demhx_export.sampler` (``negative_source="map"``). Left out where the
runtime would normalise the randomised map by its peak (zones) or refuses it.

The build can be interrupted and run again: samples already in the index are kept.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from demhx import normalise
from numpy.typing import NDArray

from demhx_export.metrics import cc, fsc, fsc_resolution
from demhx_export.onnx_io import NOISE_STD
from demhx_export.sampler import phase_randomise
from demhx_export.synth import VOXEL_SIZE, SynthOptions, SynthPair, options_dict, simulate_pair

DEFAULT_STRUCTURES = Path(__file__).resolve().parents[3] / "shared" / "data" / "structures"
SPLITS = ("train", "val", "test")


def read_manifest(structures_dir: str | Path = DEFAULT_STRUCTURES) -> list[dict[str, str]]:
    """Rows of ``manifest.tsv`` in the structures folder."""
    path = Path(structures_dir) / "manifest.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; pass --structures_dir")
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def plan_samples(split: str, count: int | None, seed: int,
                 resolution_range: tuple[float, float], max_atoms: int,
                 structures_dir: str | Path = DEFAULT_STRUCTURES) -> list[dict[str, Any]]:
    """Deterministic list of samples: structure, id, seed and resolution of each.

    Structures of the split (at most ``max_atoms`` atoms) are shuffled with ``seed`` and used
    in turn; when ``count`` exceeds their number a second round uses new seeds.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    rows = [r for r in read_manifest(structures_dir)
            if r["split"] == split and int(r["n_atoms"]) <= max_atoms]
    rows.sort(key=lambda r: r["file"])
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    order = rng.permutation(len(rows))
    count = len(rows) if count is None else count
    plan = []
    for i in range(count):
        row = rows[order[i % len(rows)]]
        sample_seed = seed * 1_000_003 + i
        stem = row["file"].removesuffix(".cif.gz")
        plan.append({"id": f"{stem}__s{sample_seed}", "structure": row["file"], "split": split,
                     "seed": sample_seed, "resolution": round(float(rng.uniform(
                         *resolution_range)), 3),
                     "path": str(Path(structures_dir) / row["file"])})
    return plan


def normalise_pair(pair: SynthPair
                   ) -> tuple[NDArray[np.float32], dict[str, NDArray[np.float32]], dict[str, Any]]:
    """Input and targets scaled so that the input's solvent noise has mean 0 and std 0.1.

    The statistics are the runtime's own choice (``demhx.normalise.choose_stats``: the
    solvent of an unmasked map, the solvent left inside a deposited-style mask, or the peak
    of a zone) and the scaling its own ``demhx.normalise.normalise``, so the network sees
    every input as the runtime will hand it over. When the runtime refuses the map the known
    simulated noise is used, as a user passing ``--noise-stats`` would. The targets get the
    same scale without the offset (their background is 0). The method is recorded.
    """
    try:
        stats = normalise.choose_stats(pair.input, (VOXEL_SIZE,) * 3)
        method = f"runtime:{stats.method}"
    except ValueError as refusal:
        stats = normalise.user_stats(pair.params["noise_mean"], pair.params["noise_std"])
        method = f"simulated (runtime refused: {str(refusal).split(';')[0]})"
    inputs = normalise.normalise(pair.input, stats, NOISE_STD)
    scale_only = replace(stats, mean=0.0)
    targets = {name: normalise.normalise(t, scale_only, NOISE_STD)
               for name, t in (pair.targets or {"locscale": pair.target}).items()}
    return inputs, targets, {"noise_mean": float(stats.mean), "noise_std": float(stats.std),
                             "normalisation": method,
                             "simulated_noise_std": pair.params["noise_std"]}


def whole_map_negative(raw_input: NDArray[Any], seed: int
                       ) -> tuple[NDArray[np.float32] | None, str]:
    """``raw_input`` with its phases randomised over the whole box and normalised as the
    runtime would normalise it, and the method the runtime chose; ``None`` where the runtime
    normalises it by its peak (a peak-scaled noise map is not what a user's noise looks like
    after an unmasked or masked map's normalisation) or refuses it."""
    randomised = phase_randomise(np.asarray(raw_input, dtype=np.float64),
                                 np.random.default_rng([seed, 7]))
    try:
        stats = normalise.choose_stats(randomised, (VOXEL_SIZE,) * 3)
    except ValueError as refusal:
        return None, f"refused: {str(refusal).split(';')[0]}"
    if stats.method == "peak":
        return None, "peak"
    return normalise.normalise(randomised, stats, NOISE_STD), f"runtime:{stats.method}"


def make_sample(item: dict[str, Any], outdir: str, options: SynthOptions) -> dict[str, Any]:
    """Simulate, normalise and write one sample; return its index entry.

    A structure the generator cannot handle gives ``{"id", "structure", "error"}`` instead.
    """
    try:
        return _make_sample(item, outdir, options)
    except (ValueError, RuntimeError) as error:
        return {"id": item["id"], "structure": item["structure"], "error": repr(error)}


def _make_sample(item: dict[str, Any], outdir: str, options: SynthOptions) -> dict[str, Any]:
    start = time.perf_counter()
    pair = simulate_pair(item["path"], item["resolution"], item["seed"], options)
    inputs, targets, stats = normalise_pair(pair)
    target = targets[options.target_recipe]
    signal = (pair.signal_mask > 0.5).astype(np.uint8)
    negative, negative_method = whole_map_negative(pair.input, int(item["seed"]))
    tmp = Path(outdir) / f"{item['id']}.tmp.npz"
    arrays = {"input": inputs, "signal": signal,
              **{f"target_{name}": t for name, t in targets.items()},
              **({} if negative is None else {"negative": negative})}
    np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy types the keywords as allow_pickle
    os.replace(tmp, Path(outdir) / f"{item['id']}.npz")
    frequencies, values = fsc(pair.half1, pair.half2)
    entry = {k: item[k] for k in ("id", "structure", "split", "resolution", "seed")}
    entry.update(stats, shape=list(inputs.shape), cc_input_target=round(cc(inputs, target), 4),
                 cc_input_target_masked=round(cc(inputs, target, target != 0), 4),
                 fsc_half_maps=round(fsc_resolution(frequencies, values, 0.143), 3),
                 signal_fraction=round(float(signal.mean()), 4),
                 negative_normalisation=negative_method,
                 seconds=round(time.perf_counter() - start, 2), params=pair.params)
    return entry


def build_command(split: str, outdir: str, count: int | None = None, workers: int = 1,
                  seed: int = 0, resolution_range: tuple[float, float] = (2.5, 6.0),
                  max_atoms: int = 25_000, wide: bool = False,
                  structures_dir: str = str(DEFAULT_STRUCTURES),
                  max_minutes: float | None = None, masked: float = 0.0,
                  zoned: float = 0.0) -> None:
    """Simulate ``count`` samples of ``split`` into ``outdir`` (resumable).

    Parameters
    ----------
    split : "train", "val" or "test" (structures are taken from that split only).
    outdir : output folder; receives index.json and one .npz per sample.
    count : number of samples (default: one per structure of the split).
    workers : worker processes.
    seed : seed of the plan (structure order, per-sample seeds and resolutions).
    resolution_range : (low, high) FSC-0.143 resolution, Å, drawn uniformly.
    max_atoms : skip larger structures.
    wide : targets with the wide mask.
    structures_dir : folder with manifest.tsv and the model files.
    max_minutes : stop starting new samples after this many minutes (the index stays valid).
    masked : fraction of inputs soft-masked as deposited maps are (exact zeros outside).
    zoned : fraction of inputs cut to a zone around part of the model (targets cut alike).
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    low, high = resolution_range
    plan = plan_samples(split, count, seed, (float(low), float(high)), max_atoms, structures_dir)
    options = SynthOptions(wide_target=wide, max_atoms=max_atoms,
                           deposited_mask_probability=float(masked),
                           zone_probability=float(zoned))
    index = _read_index(out)
    done = {e["id"] for e in index}
    todo = [item for item in plan if item["id"] not in done]
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    meta = {"split": split, "seed": seed, "resolution_range": list(resolution_range),
            "noise_std": NOISE_STD, "options": options_dict(options)}
    (out / "build.json").write_text(json.dumps(meta, indent=1) + "\n")
    failures = []
    for entry in _run(todo, str(out), options, workers, deadline):
        if "error" in entry:
            failures.append(entry)
            (out / "failed.json").write_text(json.dumps(failures, indent=1) + "\n")
            continue
        index.append(entry)
        _write_index(out, index)


def _run(todo: list[dict[str, Any]], outdir: str, options: SynthOptions, workers: int,
         deadline: float | None) -> Iterator[dict[str, Any]]:
    """Index entries of the finished samples, in plan order (serial) or completion order."""
    if workers <= 1:
        for item in todo:
            if deadline is not None and time.monotonic() > deadline:
                return
            yield make_sample(item, outdir, options)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(make_sample, item, outdir, options) for item in todo]
        for future in futures:
            if deadline is not None and time.monotonic() > deadline:
                for f in futures:
                    f.cancel()
                return
            yield future.result()


def _read_index(out: Path) -> list[dict[str, Any]]:
    path = out / "index.json"
    if not path.is_file():
        return []
    return [e for e in json.loads(path.read_text()) if (out / f"{e['id']}.npz").is_file()]


def _write_index(out: Path, index: list[dict[str, Any]]) -> None:
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / "index.json")
