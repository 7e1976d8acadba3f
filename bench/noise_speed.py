"""Noise estimation speed: ``choose_stats`` now against the estimator of an earlier commit.

    python bench/noise_speed.py [--repeats 5] [--edge 256] [--base d241659] [--maps DIR]

For every map of ``../shared/data/maps`` and a synthetic ``edge``³ map (the 256³ map of
``bench/speed.py``: blobs on a helix in white noise, 1 Å), runs ``normalise.choose_stats``
of this tree ("new") and of ``demhx/normalise.py`` at commit ``--base`` with the estimator
modules it imports at that commit ("old", loaded from git as the package ``demhx_base``; the
default is the last single-threaded version, ``5a5a334`` the SciPy one). Prints the
statistics both give, their difference, the median time of ``--repeats`` runs of each (after
one untimed run, so numba's compilation is not counted) and the ratio.

The new kernels split their planes between :func:`numba.get_num_threads` threads
(``NUMBA_NUM_THREADS=1`` for one); the old ones run on one core. On a shared machine compare
the ratio (old and new alternate within one run), not the absolute times. Exits with status
1 when a map's statistics differ by more than the tolerance: method, solvent fraction, std
within :data:`STD_TOLERANCE` (relative) and mean within :data:`MEAN_TOLERANCE` noise stds.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAPS = ROOT.parent / "shared" / "data" / "maps"
BASE = "d241659"  # the last commit with one thread and separate selection passes
ESTIMATOR_MODULES = ("normalise", "_solvent", "_noisestats", "_noise_kernels")
STD_TOLERANCE = 0.005  # relative
MEAN_TOLERANCE = 0.005  # noise stds

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demhx import mrcio, normalise  # noqa: E402
from demhx.normalise import NoiseStats  # noqa: E402


def old_normalise(commit: str) -> ModuleType | None:
    """``demhx/normalise.py`` at ``commit`` with the estimator modules it imports from
    (``_solvent``, ``_noisestats``, ``_noise_kernels``, where the commit has them), imported as
    a package of their own (``demhx_base``); None without git or the commit."""
    sources = {}
    for name in ESTIMATOR_MODULES:
        try:
            sources[name] = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{commit}:demhx/{name}.py"],
                capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            if name == "normalise":
                return None
    folder = Path(tempfile.mkdtemp(prefix="demhx-base-")) / "demhx_base"
    folder.mkdir()
    (folder / "__init__.py").write_text("", encoding="utf-8")
    for name, source in sources.items():
        for other in sources:
            source = source.replace(f"demhx.{other} ", f"demhx_base.{other} ")
            source = source.replace(f"from demhx import {other}\n",
                                    f"from demhx_base import {other}\n")
            source = source.replace(f"from demhx import {other} as",
                                    f"from demhx_base import {other} as")
        (folder / f"{name}.py").write_text(source, encoding="utf-8")
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module("demhx_base.normalise")


def cases(maps: Path, edge: int) -> Iterator[tuple[str, np.ndarray, tuple[float, float, float]]]:
    """(name, volume, voxel size) for every map in ``maps`` and the synthetic map."""
    for path in sorted(maps.iterdir()) if maps.is_dir() else []:
        if path.suffix in (".mrc", ".map"):
            item = mrcio.read_map(path)
            yield path.name, item.data, item.voxel_size
    from speed import synthetic_map

    with tempfile.TemporaryDirectory() as folder:
        item = mrcio.read_map(synthetic_map(edge, Path(folder) / f"synthetic{edge}.mrc"))
    yield f"synthetic {edge}³", item.data, item.voxel_size


def timed_pair(old: Callable[[], NoiseStats], new: Callable[[], NoiseStats], repeats: int
               ) -> tuple[NoiseStats, NoiseStats, list[float], list[float]]:
    """Both results and ``repeats`` times of each, old and new runs alternating (after one
    untimed run of each, which compiles the numba kernels)."""
    results = old(), new()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, record in zip((old, new), times, strict=True):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return results[0], results[1], times[0], times[1]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, load average {load}; Python "
            f"{platform.python_version()}, NumPy {np.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--edge", type=int, default=256)
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--maps", type=Path, default=MAPS)
    args = parser.parse_args()
    old = old_normalise(args.base)
    if old is None:
        print(f"old: commit {args.base} not available (no git history here): new times only")
        old = normalise
    print(f"machine: {machine()}")
    print(f"old: demhx/normalise.py at {args.base}; new: this tree ({numba.get_num_threads()} "
          f"threads); median of {args.repeats} runs each (alternating)")
    print(f"{'map':26s} {'method':11s} {'old mean':>12s} {'new mean':>12s} {'old std':>11s} "
          f"{'new std':>11s} {'Δstd rel':>9s} {'old s':>7s} {'new s':>7s} {'ratio':>6s}")
    failures = 0
    for name, volume, voxel in cases(args.maps, args.edge):
        before, after, old_times, new_times = timed_pair(
            functools.partial(old.choose_stats, volume, voxel, name=name),
            functools.partial(normalise.choose_stats, volume, voxel, name=name), args.repeats)
        old_s, new_s = statistics.median(old_times), statistics.median(new_times)
        relative = abs(after.std / before.std - 1)
        same = (after.method == before.method and relative <= STD_TOLERANCE
                and abs(after.mean - before.mean) <= MEAN_TOLERANCE * before.std
                and after.solvent_fraction == before.solvent_fraction)
        failures += not same
        print(f"{name:26s} {after.method:11s} {before.mean:12.6g} {after.mean:12.6g} "
              f"{before.std:11.6g} {after.std:11.6g} {relative:9.1e} {old_s:7.3f} "
              f"{new_s:7.3f} {old_s / new_s:5.1f}×{'' if same else '  DIFFERENT'}")
    print("statistics: " + ("all the same within tolerance" if not failures
                            else f"{failures} maps differ beyond tolerance"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
