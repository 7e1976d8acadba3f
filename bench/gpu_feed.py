"""How well demhx feeds the network, and how fast several maps run in one process.

    python bench/gpu_feed.py MAP [--device cuda] [--tiling reference] [--maps 3]
                                 [--util util.csv] [--threads N]

Prints, in one process with one loaded model:

1. **raw network**: seconds per cube of the session alone (batches of the runtime's batch
   size, inputs already built, median of 5 after a warm-up batch);
2. **the pipeline's network stage** on MAP with ``--tiling`` (the stage the pipeline's
   DEBUG line calls ``network``, the time spent inside the model's calls, feeding included):
   seconds per cube run and its ratio to the raw speed (the issue's bar: the reference
   tiling at 75 % of the raw network or better);
3. **several maps warm**: MAP enhanced ``--maps`` times with the default tiling (files in a
   temporary folder), the wall time of each; the first pays the session's first batch, the
   later ones show what a map costs in a warm process (the bar on an H200: 256³ ≤ 0.6 s);
4. with ``--util`` (``nvidia-smi ... -lms 100`` output of ``timestamp, utilization.gpu,
   memory.used``): the GPU's mean busy percentage during step 2 and during step 3.

``bench/gpu_check.sh`` runs it on a GPU machine; on the CPU (``--device cpu``) it checks the
same measures, with a small map, in a few seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from demhx.errors import DemhxWarning
from demhx.options import EnhanceOptions
from demhx.pipeline import Enhancer

RAW_REPEATS = 5


class StageLines(logging.Handler):
    """Keeps the pipeline's DEBUG ``stage times`` lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("stage times:"):
            self.lines.append(message)


def stage_seconds(line: str, stage: str) -> float:
    """The seconds of ``stage`` in a ``stage times: a 0.1 s, b 0.2 s`` line (0 if absent)."""
    for part in line.split(":", 1)[1].split(","):
        words = part.split()
        if len(words) == 3 and words[0] == stage:
            return float(words[1])
    return 0.0


def raw_seconds_per_cube(enhancer: Enhancer) -> float:
    """The session alone: median seconds per cube over full batches of random cubes."""
    runtime = enhancer.runtime
    size = runtime.spec.cube_size
    batch = np.random.default_rng(0).normal(
        0, 0.1, (runtime.batch_size, 1, size, size, size)).astype(np.float32)
    runtime.run(batch)  # the first batch pays the device's start
    times = []
    for _ in range(RAW_REPEATS):
        start = time.perf_counter()
        runtime.run(batch)
        times.append((time.perf_counter() - start) / runtime.batch_size)
    return statistics.median(times)


def utilisation(path: Path, start: float, stop: float) -> float | None:
    """Mean GPU utilisation (%) of the ``nvidia-smi`` samples between two epoch times."""
    values = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = [part.strip() for part in line.split(",")]
        try:
            when = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            busy = float(parts[1].split()[0])
        except (IndexError, ValueError):
            continue
        if start <= when <= stop:
            values.append(busy)
    return statistics.fmean(values) if values else None


def measure(args: argparse.Namespace, stages: StageLines) -> None:
    """Steps 1-4 of the module's docstring, printed as they finish."""
    enhancer = Enhancer(device=args.device, threads=args.threads)
    raw = raw_seconds_per_cube(enhancer)
    print(f"raw network: {raw * 1e3:.2f} ms per cube (batches of "
          f"{enhancer.runtime.batch_size}, {enhancer.runtime.device})", flush=True)
    windows = {}
    with tempfile.TemporaryDirectory() as folder:
        start = time.time()
        summary = enhancer.process_file(args.map, Path(folder) / "stage.mrc",
                                        EnhanceOptions(tiling=args.tiling))
        windows["network stage"] = (start, time.time())
        network = stage_seconds(stages.lines[-1], "network")
        per_cube = network / max(summary.info.cubes.run, 1)
        share = f"{raw / per_cube:.0%}" if per_cube > 0 else "n/a (the stage took < 1 ms)"
        print(f"{args.tiling} tiling: {summary.info.cubes.run} cubes, network stage "
              f"{network:.2f} s = {per_cube * 1e3:.2f} ms per cube, raw/stage {share}; "
              f"{stages.lines[-1]}", flush=True)
        start = time.time()
        for index in range(args.maps):
            began = time.perf_counter()
            enhancer.process_file(args.map, Path(folder) / f"warm{index}.mrc", EnhanceOptions())
            print(f"several maps, map {index + 1}: {time.perf_counter() - began:.2f} s wall",
                  flush=True)
        windows["several maps"] = (start, time.time())
    if args.util is not None and args.util.is_file():
        for name, (begin, end) in windows.items():
            busy = utilisation(args.util, begin, end)
            shown = "no samples" if busy is None else f"{busy:.0f} %"
            print(f"GPU busy during {name}: {shown}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("map", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiling", default="reference")
    parser.add_argument("--maps", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--util", type=Path)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DemhxWarning)  # the synthetic map's range: not measured here
    stages = StageLines()
    logger = logging.getLogger("demhx")
    level = logger.level
    logger.addHandler(stages)
    logger.setLevel(logging.DEBUG)
    try:
        measure(args, stages)
    finally:
        logger.removeHandler(stages)
        logger.setLevel(level)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
