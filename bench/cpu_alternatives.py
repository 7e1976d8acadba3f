"""CPU speed at equal output: bigger cubes and static int8 against today's default.

Two ways to cut the network's CPU time that keep the model's weights, each run end to end
through the public API on the same maps and compared with the shipped model's default run
(time, cubes run, CC to its output on the input grid):

``bigger cubes``
    The model is fully convolutional, so a copy of it with free spatial axes (and the cube
    size in its metadata changed) runs cubes of ``C``³ on the reference's lattice at stride
    ``S``: fewer, larger cubes overlap less (``(C/S)³`` network voxels per map voxel against
    ``(64/48)³`` for the default).
``static int8``
    ONNX Runtime's static quantisation (QDQ, weights int8 per channel, activations uint8),
    calibrated on cubes the default run fed the network on the same maps (MinMax and
    Percentile calibration).

``--speeds`` times the network alone instead, one call at a time on cubes of noise (medians
of 5 alternating calls): the shipped model against its int8 copies and against itself with
free spatial axes at larger cubes (per 64³ of voxels), 8 cubes with 2 threads (with and
without ONNX Runtime's spinning) against two 1-thread sessions side by side and one thread,
and single 3-D convolution layers against the same layers computed as 2-D convolutions over
slices (the three neighbouring slices stacked as channels).

Needs the ``onnx`` package (installed with ``export/``). Slow: about ten minutes on 2 cores
(``--speeds``: two).

    python bench/cpu_alternatives.py --threads 2 [--maps 256,5168,6824] \
        [--cubes 96:80,128:112] [--calibration MinMax,Percentile] [--keep DIR]
    python bench/cpu_alternatives.py --speeds --keep DIR   (DIR: the int8 copies, if kept)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (bench/speed.py: the maps, the CC, the machine line)

from demhx import EnhanceOptions, Enhancer, session  # noqa: E402
from demhx.tiling import TilingScheme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "tight-fast.onnx"
REAL = {"5168": "emd_5168.map", "6824": "6824.mrc"}
LATTICE = 16  # the shipped models' reference stride


def free_spatial_axes(source: Path, cube: int, target: Path) -> Path:
    """A copy of ``source`` whose input and output take any cube edge, labelled ``cube``."""
    import onnx

    model = onnx.load(str(source))
    for value in (*model.graph.input, *model.graph.output):
        for axis in (2, 3, 4):
            dim = value.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = f"edge{axis}"
    for prop in model.metadata_props:
        if prop.key == "demhx.cube_size":
            prop.value = str(cube)
    onnx.save(model, str(target))
    return target


def quantised(source: Path, cubes: list[np.ndarray], method: str, target: Path) -> Path:
    """``source`` quantised to int8 (QDQ), calibrated on ``cubes``; its metadata kept."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.left = iter(cubes)

        def get_next(self) -> dict[str, np.ndarray] | None:
            cube = next(self.left, None)
            return None if cube is None else {"input": cube}

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    model = onnx.load(str(target))
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.load(str(source)).metadata_props)
    onnx.save(model, str(target))
    return target


def load_maps(names: list[str], scratch: Path) -> dict[str, tuple[np.ndarray, float]]:
    import mrcfile

    maps = {}
    for name in names:
        path = (ROOT.parent / "shared" / "data" / "maps" / REAL[name] if name in REAL else
                speed.synthetic_map(int(name), scratch / f"m{name}.mrc"))
        with mrcfile.open(path, permissive=True) as stream:
            maps[name] = (np.asarray(stream.data, dtype=np.float32),
                          float(stream.voxel_size.x))
    return maps


def timed(enhancer: Enhancer, volume: np.ndarray, voxel: float,
          tiling: str | TilingScheme) -> tuple[Any, float]:
    start = time.perf_counter()
    enhanced = enhancer.process(volume, voxel, EnhanceOptions(tiling=tiling))
    return enhanced, time.perf_counter() - start


def _session(model: Any, threads: int, spinning: bool = True,
             profile_prefix: Path | None = None) -> Any:
    """A CPU session of ``model`` (a path or the model's bytes); with ``profile_prefix``,
    profiled into a file of that prefix."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _medians(calls: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median seconds of each call, the calls alternating, after one untimed call each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _conv_layers(channels_in: int, channels_out: int, edge: int = 64) -> tuple[bytes, bytes]:
    """One 3×3×3 convolution as ONNX, and the same as a 2-D convolution over the slices of a
    (depth, channels, y, x) volume, each slice stacked with its two neighbours as channels."""
    from onnx import TensorProto, helper, numpy_helper

    weights = _noise((channels_out, channels_in, 3, 3, 3)) * 0.1
    conv3 = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 6, kernel_shape=[3, 3, 3])],
        "conv3", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                [1, channels_in, edge, edge, edge])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weights, "w")])
    flat = np.concatenate([weights[:, :, k] for k in range(3)], axis=1)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"]),
             *(helper.make_node("Slice", ["padded", f"s{k}", f"e{k}", "axis"], [f"slab{k}"])
               for k in range(3)),
             helper.make_node("Concat", ["slab0", "slab1", "slab2"], ["stacked"], axis=1),
             helper.make_node("Conv", ["stacked", "w"], ["y"], pads=[1] * 4,
                              kernel_shape=[3, 3])]
    constants = [numpy_helper.from_array(flat, "w"),
                 numpy_helper.from_array(np.array([1, 0, 0, 0, 1, 0, 0, 0]), "pads"),
                 numpy_helper.from_array(np.array([0]), "axis")]
    for k in range(3):
        constants += [numpy_helper.from_array(np.array([k]), f"s{k}"),
                      numpy_helper.from_array(np.array([k + edge]), f"e{k}")]
    conv2 = helper.make_graph(
        nodes, "conv2", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       [edge, channels_in, edge, edge])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], constants)
    return tuple(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                 .SerializeToString() for graph in (conv3, conv2))  # type: ignore[return-value]


def profile(threads: int, scratch: Path, calls: int = 4) -> str:
    """The shares of the network's time by operator type (ONNX Runtime's profiler)."""
    session_ = _session(str(SHIPPED), threads, profile_prefix=scratch / "profile")
    for _ in range(calls):
        session_.run(None, {"input": _noise((1, 1, 64, 64, 64))})
    events = json.loads(Path(session_.end_profiling()).read_text())
    spent: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kind = event["args"]["op_name"]
            spent[kind] = spent.get(kind, 0.0) + event["dur"]
    total = sum(spent.values())
    return ", ".join(f"{kind} {share / total:.0%}"
                     for kind, share in sorted(spent.items(), key=lambda item: -item[1]))


def speeds(threads: int, scratch: Path) -> None:
    """The network alone, per call (see the module's docstring)."""
    cube = {"input": _noise((1, 1, 64, 64, 64))}
    models = {"fp32": SHIPPED, **{path.stem: path for path in sorted(scratch.glob("int8_*.onnx"))}}
    sessions = {name: _session(str(path), threads) for name, path in models.items()}
    for name, seconds in _medians({name: (lambda s=s: s.run(None, cube))
                                   for name, s in sessions.items()}).items():
        print(f"one 64³ cube, {name}: {seconds:.3f} s")
    print("time by operator in one cube:", profile(threads, scratch))
    free = _session(str(free_spatial_axes(SHIPPED, 64, scratch / "edge64.onnx")), threads)
    inputs = {edge: {"input": _noise((1, 1, edge, edge, edge))} for edge in (64, 96, 128)}
    for edge, seconds in _medians({edge: (lambda x=x: free.run(None, x))
                                   for edge, x in inputs.items()}, 3).items():
        print(f"free spatial axes, one {edge}³ cube: {seconds:.3f} s, "
              f"{seconds / (edge / 64) ** 3:.3f} s per 64³ of voxels")
    cubes = [{"input": _noise((1, 1, 64, 64, 64), seed)} for seed in range(8)]
    spinning, calm = _session(str(SHIPPED), 2), _session(str(SHIPPED), 2, spinning=False)
    single = [_session(str(SHIPPED), 1) for _ in range(2)]

    def in_turn(session_: Any) -> None:
        for feed in cubes:
            session_.run(None, feed)

    def side_by_side() -> None:
        workers = [threading.Thread(target=lambda s=s, part=cubes[i::2]: [
            s.run(None, feed) for feed in part]) for i, s in enumerate(single)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    for name, seconds in _medians({
            "2 threads": lambda: in_turn(spinning), "2 threads, no spinning": lambda: in_turn(calm),
            "two 1-thread sessions side by side": side_by_side,
            "1 thread": lambda: in_turn(single[0])}, 3).items():
        print(f"8 cubes, {name}: {seconds / 8:.3f} s a cube")
    for channels in ((16, 16), (32, 32), (1, 16)):
        as_3d, as_2d = (_session(model, threads) for model in _conv_layers(*channels))
        volume = _noise((1, channels[0], 64, 64, 64))
        slices = np.ascontiguousarray(volume[0].transpose(1, 0, 2, 3))
        same = np.abs(as_3d.run(None, {"x": volume})[0][0].transpose(1, 0, 2, 3)
                      - as_2d.run(None, {"x": slices})[0]).max()
        times = _medians({"3-D": lambda s=as_3d, x=volume: s.run(None, {"x": x}),
                          "2-D": lambda s=as_2d, x=slices: s.run(None, {"x": x})})
        print(f"conv {channels[0]}→{channels[1]} at 64³: 3-D {times['3-D']:.4f} s, 2-D over "
              f"slices {times['2-D']:.4f} s ({times['3-D'] / times['2-D']:.2f}×), largest "
              f"difference {same:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--maps", default="256,5168,6824")
    parser.add_argument("--cubes", default="96:80,128:112", help="EDGE:STRIDE,...")
    parser.add_argument("--calibration", default="MinMax,Percentile")
    parser.add_argument("--calibration-cubes", type=int, default=48)
    parser.add_argument("--keep", type=Path, help="folder for the derived models")
    parser.add_argument("--speeds", action="store_true", help="time the network alone")
    args = parser.parse_args()
    print(speed.machine())
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="demhx-cpu-alt-"))
    scratch.mkdir(parents=True, exist_ok=True)
    if args.speeds:
        speeds(args.threads, scratch)
        return
    maps = load_maps(args.maps.split(","), scratch)

    seen: list[np.ndarray] = []
    plain_run = session.Runtime.run

    def recording(self: session.Runtime, batch: np.ndarray) -> np.ndarray:
        seen.extend(np.array(cube[None]) for cube in batch)
        return plain_run(self, batch)

    base: dict[str, np.ndarray] = {}
    shipped = Enhancer(SHIPPED, device="cpu", threads=args.threads)
    session.Runtime.run = recording  # type: ignore[method-assign]
    try:
        for name, (volume, voxel) in maps.items():
            enhanced, seconds = timed(shipped, volume, voxel, "default")
            base[name] = enhanced.map
            report(name, "default (shipped)", enhanced, seconds, 1.0)
    finally:
        session.Runtime.run = plain_run  # type: ignore[method-assign]

    candidates: list[tuple[str, Path, str | TilingScheme]] = []
    for spec in filter(None, args.cubes.split(",")):
        edge, stride = (int(part) for part in spec.split(":"))
        path = free_spatial_axes(SHIPPED, edge, scratch / f"edge{edge}.onnx")
        scheme = TilingScheme(name=f"{edge}:{stride}", stride=stride, lattice=LATTICE,
                              skip_threshold=5.0)
        candidates.append((f"cubes {edge}³ stride {stride}", path, scheme))
    picks = np.random.default_rng(0).permutation(len(seen))[:args.calibration_cubes]
    for method in filter(None, args.calibration.split(",")):
        path = quantised(SHIPPED, [seen[i] for i in picks], method, scratch / f"int8_{method}.onnx")
        candidates.append((f"int8 static, {method}", path, "default"))
    for label, path, tiling in candidates:
        enhancer = Enhancer(path, device="cpu", threads=args.threads)
        for name, (volume, voxel) in maps.items():
            enhanced, seconds = timed(enhancer, volume, voxel, tiling)
            report(name, label, enhanced, seconds, speed.correlation(enhanced.map, base[name]))


def report(name: str, label: str, enhanced: Any, seconds: float, cc: float) -> None:
    print(json.dumps({"map": name, "run": label, "cubes": enhanced.info.cubes.run,
                      "skipped": enhanced.info.cubes.skipped, "seconds": round(seconds, 1),
                      "cc_to_default": round(cc, 5)}), flush=True)


if __name__ == "__main__":
    main()
