"""Refinement study: the default's predicted CC against its true CC, step by step.

    python bench/refinement_study.py --map ../shared/data/maps/6824.mrc --cache /tmp/st6824

Needs the reference predictions cached by ``bench/tiling_study.py --cache DIR`` for the same
map and model (no network is run here). The map is normalised, resampled and tiled exactly as
the pipeline does; starting from the default's first cubes, the plan is refined one step at a
time (:func:`demhx.tiling.refine_plan`, solvent cubes skipped as in a run) until it holds all
of the reference's cubes. Each step prints the cubes run, the CC the default predicts for
itself (:func:`demhx.refine.predicted_cc` on every ``SAMPLE_STEP``-th voxel of the box)
and the true CC of that blend to the reference blend, both on the model grid; ``*`` marks where
the default stops (the first step predicted at or above its target).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (bench/speed.py: the CC)
from tiling_study import CachedSession, source_map  # noqa: E402

from demhx import mrcio, normalise, pipeline, resample, tiling  # noqa: E402
from demhx.blend import select_cubes  # noqa: E402
from demhx.refine import COUNT_DTYPE, SAMPLE_STEP, predicted_cc  # noqa: E402


def model_grid_input(path: Path, enhancer: pipeline.Enhancer
                     ) -> tuple[np.ndarray, float]:
    """The normalised map on the model's grid, as :meth:`Enhancer.process` makes it, and the
    fraction of the model's noise std its solvent noise has (below 1 once widened)."""
    source = mrcio.read_map(path)
    runtime = enhancer.runtime
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = normalise.statistics_for(source.data, source.voxel_size, runtime.spec, None,
                                         None)
    normalised = normalise.normalise_for(source.data, stats, runtime.spec, None)
    shape = resample.target_shape(normalised.shape, source.voxel_size,
                                  runtime.spec.voxel_size)
    if shape != normalised.shape:
        normalised = resample.resample_to_shape(normalised, shape)
    return normalised, stats.noise_fraction


def cached_predictions(padded: np.ndarray, plan: tiling.TilingPlan, cache: Path
                       ) -> dict[tuple[int, int, int], np.ndarray]:
    """Every cube of ``plan``: its cached prediction, by corner."""
    cached = CachedSession(None, cache).cache
    size = plan.cube_size
    found = {}
    for z, y, x in plan.corners.tolist():
        key = CachedSession.key(np.ascontiguousarray(padded[z:z + size, y:y + size, x:x + size]))
        if key not in cached:
            raise SystemExit(f"{cache}: no cached prediction for the cube at {(z, y, x)}; run "
                             "bench/tiling_study.py with this map, model and --cache first")
        found[(z, y, x)] = np.asarray(cached[key]).reshape(size, size, size)
    return found


def blend(plan: tiling.TilingPlan, corners: np.ndarray,
          predictions: dict[tuple[int, int, int], np.ndarray], background: float
          ) -> tuple[np.ndarray, float]:
    """Uniform blend of the cubes at ``corners`` (the box) and its predicted CC."""
    size = plan.cube_size
    sums = np.zeros(plan.padded_shape)
    squares = np.zeros(plan.padded_shape)
    counts = np.zeros(plan.padded_shape, dtype=np.int64)
    for z, y, x in corners.tolist():
        cube = predictions[(z, y, x)].astype(np.float64)
        region = (slice(z, z + size), slice(y, y + size), slice(x, x + size))
        sums[region] += cube
        squares[region] += cube * cube
        counts[region] += 1
    out = np.where(counts > 0, sums / np.maximum(counts, 1), background)
    box = plan.region
    every = tuple(slice(-(-s.start // SAMPLE_STEP) * SAMPLE_STEP, s.stop, SAMPLE_STEP)
                  for s in box)
    predicted = predicted_cc(sums[every], squares[every], counts[every].astype(COUNT_DTYPE),
                             background)
    return out[box], predicted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--map", required=True, help="5168, an edge (synthetic) or a path")
    parser.add_argument("--cache", type=Path, required=True,
                        help="the --cache folder of bench/tiling_study.py")
    args = parser.parse_args(argv)
    path = source_map(args.map, args.cache)
    enhancer = pipeline.Enhancer(model=args.model, device="cpu", threads=1)
    spec = enhancer.runtime.spec
    volume, noise_fraction = model_grid_input(path, enhancer)
    reference_plan = tiling.plan_tiling(volume.shape, spec.cube_size,
                                        tiling.scheme_for("reference", spec.cube_size,
                                                          spec.stride))
    padded = tiling.pad_volume(volume, reference_plan)
    predictions = cached_predictions(padded, reference_plan, args.cache / "cubes")
    reference, _ = blend(reference_plan, reference_plan.corners, predictions, spec.background)
    scheme = tiling.scheme_for("default", spec.cube_size, spec.stride)
    plan: tiling.TilingPlan | None = tiling.plan_tiling(volume.shape, spec.cube_size, scheme)
    skip = tiling.skip_level(scheme, spec.noise_std, noise_fraction)
    print(f"{path.name}: model grid {volume.shape}, {reference_plan.cube_count} reference cubes")
    print(f"{'cubes run':>9} {'predicted':>9} {'true CC':>8}")
    stopped = False
    while plan is not None:
        corners = select_cubes(padded, plan, skip)
        out, predicted = blend(plan, corners, predictions, spec.background)
        mark = ""
        if not stopped and predicted >= (scheme.target_cc or 0):
            mark, stopped = " *", True
        print(f"{len(corners):9d} {predicted:9.4f} {speed.correlation(out, reference):8.4f}"
              f"{mark}", flush=True)
        plan = tiling.refine_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
