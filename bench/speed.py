"""Speed benchmark: demhx default tiling against the paper's reference tiling.

Runs each (map, tiling) case in its own process so that start-up time and peak RSS are those
of one run, then prints a table: wall time, cubes run/skipped, seconds per cube, peak RSS,
start-up (import + model load) and CC between the default and reference outputs.

    python bench/speed.py --model m.onnx --threads 2 [--maps 5168,256] [--tilings reference,default]
                          [--device cpu|cuda] [--reference OUT.npy] [--keep DIR]

``--reference`` takes the reference output of a single map from a file saved earlier (by
``--keep`` or by ``bench/tiling_study.py``) instead of running the reference tiling again:
on 2 cores it is over an hour for the 256³ map with the full network.

Maps: ``5168`` is ../shared/data/maps/emd_5168.map (100³ at 1.742 Å); ``256`` is a 256³ map
at 1 Å synthesised deterministically (Gaussian blobs on a helix-like path plus noise);
``512`` is the same at 512³ (memory check). A full-size network is
``demhx-export random-init m.onnx --widths 32,64,128 --seed 0`` (speed does not depend on
the weights). Results go in bench/RESULTS.md with the machine description printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAPS = {"5168": ROOT.parent / "shared" / "data" / "maps" / "emd_5168.map"}

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import mrcfile, numpy as np
import demhx
from demhx.options import EnhanceOptions
from demhx.pipeline import Enhancer
runner = Enhancer(model=sys.argv[1], device=sys.argv[6], threads=int(sys.argv[2]))
startup = time.perf_counter() - t0
with mrcfile.open(sys.argv[3], permissive=True) as stream:
    volume = np.asarray(stream.data, dtype=np.float32)
    voxel = float(stream.voxel_size.x)
t1 = time.perf_counter()
enhanced = runner.process(volume, voxel, EnhanceOptions(tiling=sys.argv[4]))
out, info = enhanced.map, enhanced.info
wall = time.perf_counter() - t1
np.save(sys.argv[5], out)
print(json.dumps({"startup": startup, "wall": wall, "run": info.cubes.run,
                  "skipped": info.cubes.skipped,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_map(edge: int, path: Path) -> Path:
    """A deterministic edge³ map at 1 Å: blobs along a helix plus white noise, float32."""
    import mrcfile

    rng = np.random.default_rng(edge)
    volume = rng.normal(0.0, 0.1, (edge,) * 3).astype(np.float32)
    t = np.linspace(0, 6 * np.pi, 400)
    radius = edge * 0.25
    centres = np.stack([edge / 2 + (t / t[-1] - 0.5) * edge * 0.7,
                        edge / 2 + radius * np.sin(t), edge / 2 + radius * np.cos(t)], 1)
    zz, yy, xx = np.ogrid[:edge, :edge, :edge]
    for z, y, x in centres.astype(int):
        lo = [max(0, c - 6) for c in (z, y, x)]
        hi = [min(edge, c + 7) for c in (z, y, x)]
        sub = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        r2 = (zz[sub[0]] - z) ** 2 + (yy[:, sub[1]] - y) ** 2 + (xx[:, :, sub[2]] - x) ** 2
        volume[sub] += np.exp(-r2 / 8.0).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as stream:
        stream.set_data(volume)
        stream.voxel_size = 1.0
    return path


def run_case(model: str, threads: int, source: Path, tiling: str, out: Path,
             device: str = "cpu") -> dict:
    """One run in a fresh process; its JSON report."""
    result = subprocess.run([sys.executable, "-c", _CHILD, model, str(threads), str(source),
                             tiling, str(out), device], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{source.name} {tiling}: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name or ONNX file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--maps", default="5168,256")
    parser.add_argument("--tilings", default="reference,default")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--reference", type=Path, help="saved reference output (one map)")
    parser.add_argument("--keep", type=Path, help="keep the outputs (.npy) in this folder")
    args = parser.parse_args(argv)
    if args.reference and "," in args.maps:
        parser.error("--reference is the output of one map: give one --maps value")
    print(machine())
    print(f"{'map':>6} {'tiling':>9} {'wall s':>8} {'cubes':>6} {'skip':>5} {'s/cube':>7} "
          f"{'RSS MB':>7} {'start s':>7} {'CC ref':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        for name in args.maps.split(","):
            source = MAPS.get(name) or synthetic_map(int(name), Path(tmp) / f"{name}.mrc")
            outputs = {"reference": args.reference} if args.reference else {}
            for tiling in args.tilings.split(","):
                outputs[tiling] = keep / f"{name}-{tiling}.npy"
                r = run_case(args.model, args.threads, source, tiling, outputs[tiling],
                             args.device)
                cc = (correlation(np.load(outputs[tiling]), np.load(outputs["reference"]))
                      if "reference" in outputs else float("nan"))
                print(f"{name:>6} {tiling:>9} {r['wall']:8.1f} {r['run']:6d} {r['skipped']:5d} "
                      f"{r['wall'] / max(r['run'], 1):7.2f} {r['rss_mb']:7.0f} "
                      f"{r['startup']:7.2f} {cc:7.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
