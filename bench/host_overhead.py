"""Host overhead: a whole ``demhx`` run with an identity network against plain read + write.

The network of the run is an identity model carrying the metadata of a shipped model (cube
size, voxel size, normalisation), so what is timed is everything demhx does around the
network: start-up, reading and checking the map, noise statistics, tiling, extraction and
blending, the output gate and the atomic write. The baseline is a Python process that reads
the same map with mrcfile and writes it back. Both run as fresh processes, alternated, and
the medians are compared (the issue's bar: demhx within 4x of read + write on 256³). A third
process, the start-up floor, reads and writes the map after importing what demhx imports
and setting numba's compiler up: what any run costs before it processes a voxel.

    python bench/host_overhead.py [--edge 256] [--repeats 7] [--threads 2] [--tiling default]
                                  [--model models/tight-fast.onnx] [--python PY] [--keep DIR]

``--python`` runs demhx with another interpreter (e.g. one whose ``PYTHONPATH`` points at an
older checkout: ``--python "env PYTHONPATH=/tmp/old python"``); given twice or more, the
commands are alternated in one run for a before/after comparison. The stage times of one
more run of each (``--debug``) are printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

_READ_WRITE = r"""
import sys, mrcfile
with mrcfile.open(sys.argv[1], permissive=True) as source:
    data = source.data.copy()
    voxel = source.voxel_size
with mrcfile.new(sys.argv[2], overwrite=True) as target:
    target.set_data(data)
    target.voxel_size = voxel
"""

# The same after what every demhx run pays before it processes anything: its imports (numba,
# ONNX Runtime, mrcfile) and numba's compiler set-up; the process then exits as demhx does.
_FLOOR = ("import os, demhx.pipeline, onnxruntime\n"
          "from demhx import _warmup\n"
          "_warmup.start()\n_warmup.wait()\n" + _READ_WRITE + "os._exit(0)\n")


def timed(command: list[str], folder: Path) -> float:
    """Wall seconds of one process run in ``folder`` (not the checkout, which ``python -m``
    would put first on the path); SystemExit with its stderr when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiling", default="default")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tight-fast.onnx")
    parser.add_argument("--python", action="append",
                        help="the interpreter (and prefix) that runs demhx; repeatable")
    parser.add_argument("--keep", type=Path, help="folder for the map and model (kept)")
    args = parser.parse_args()
    from onnx_fixtures import identity_like
    from speed import synthetic_map

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / f"m{args.edge}.mrc"
        if not source.exists():
            synthetic_map(args.edge, source)
        network = identity_like(folder, args.model)
        read_write = [sys.executable, "-c", _READ_WRITE, str(source), str(folder / "rw.mrc")]
        floor = [sys.executable, "-c", _FLOOR, str(source), str(folder / "floor.mrc")]
        runs = {python: [*shlex.split(python), "-m", "demhx", str(source),
                         str(folder / "out.mrc"), "--model", str(network), "--device", "cpu",
                         "--threads", str(args.threads), "--tiling", args.tiling,
                         "--overwrite", "-q"] for python in args.python or [sys.executable]}
        for command in [read_write, floor, *runs.values()]:
            timed(command, folder)  # warm the page cache and numba's kernel cache
        times: dict[str, list[float]] = {"read + write": [], "start-up floor": []}
        times |= {python: [] for python in runs}
        for _ in range(args.repeats):
            times["read + write"].append(timed(read_write, folder))
            times["start-up floor"].append(timed(floor, folder))
            for python, command in runs.items():
                times[python].append(timed(command, folder))
        stages = {python: subprocess.run([*command[:-1], "--debug"], capture_output=True,
                                         text=True, cwd=folder).stderr
                  for python, command in runs.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; {args.edge}³ map, tiling {args.tiling}, "
          f"{args.threads} threads, {args.repeats} alternated runs")
    plain = statistics.median(times["read + write"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name}: median {median:.3f} s, {median / plain:.2f}x read + write "
              f"({', '.join(f'{s:.2f}' for s in seconds)})")
    for python, text in stages.items():
        lines = [line for line in text.splitlines() if "stage times" in line]
        print(f"{python}: {(lines or ['(no stage times)'])[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
