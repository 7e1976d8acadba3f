"""The ``demhx-export`` command: parse, call the library, report. No numerics here.

Subcommands::

    demhx-export summary --widths 32,64,128 [--cube 64]
    demhx-export export CHECKPOINT OUT.onnx [--name NAME] [--version V] [--cube N] [--no-fp16]
    demhx-export random-init OUT.onnx [--widths 32,64,128] [--seed 0] [--cube 64]
    demhx-export from-keras MODEL.hd5 OUT.onnx [--group-norm auto|keras-contrib|standard]
    demhx-export synth | build-dataset | train | one-run ...   (when those modules are installed)

Arguments are parsed by ``fire`` but errors are reported as one line on stderr with exit
status 2 (usage) or 1 (failure), never as fire's help pages; ``-h``/``--help`` prints the
command's docstring.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

PROGRAM = "demhx-export"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# command -> (module, function, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "summary": ("demhx_export.cli", "summary_command",
                "parameters and GFLOP per cube of a network configuration"),
    "export": ("demhx_export.cli", "export_command",
               "export a checkpoint to a verified ONNX model (+ fp16 twin)"),
    "random-init": ("demhx_export.cli", "random_init_command",
                    "export an untrained network of a given shape"),
    "synth": ("demhx_export.synth", "synth_command", "make synthetic training maps"),
    "build-dataset": ("demhx_export.dataset", "build_command",
                      "cut maps into a training dataset"),
    "train": ("demhx_export.train", "train_command", "train (or resume) a network"),
    "one-run": ("demhx_export.one_run", "one_run_command",
                "build data, train and pack the best weights within a time budget"),
    "from-keras": ("demhx_export.keras_import", "from_keras_command",
                   "convert a Keras .h5/.hd5 model (DeepEMhancer's) to ONNX, no TensorFlow"),
}
STRING_OPTIONS = ("name", "version", "channel")  # values kept as text ("1.10" must not become 1.1)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --------------------------------------------------------------------------- commands


def summary_command(widths: Any = "32,64,128", cube: int = 64) -> None:
    """Print the parameters and GFLOP per cube of a network configuration.

    Parameters
    ----------
    widths : three channel widths, e.g. 32,64,128 (the paper's).
    cube : cube edge in voxels (a multiple of 8).
    """
    from demhx_export.network import check_cube_size, parse_widths, summary

    parsed = parse_widths(widths)
    cube_size = check_cube_size(_as_int("cube", cube))
    figures = summary(parsed, cube_size)
    print(f"widths {','.join(map(str, parsed))}, {cube_size}³ cubes: "
          f"{figures['parameters']:,} parameters, "
          f"{figures['gflop_per_cube']:.2f} GFLOP per cube (2 × multiply-adds)")


def export_command(checkpoint: str, out: str, name: str | None = None,
                   version: str | None = None, cube: int | None = None,
                   fp16: bool = True, channel: str = "map") -> None:
    """Export CHECKPOINT (NAME, NAME.json or a run folder) to a verified OUT.onnx.

    Parameters
    ----------
    checkpoint : checkpoint written by training (NAME.safetensors + NAME.json), or a run
        folder (its best, else latest, checkpoint).
    out : destination .onnx file; OUT.fp16.onnx is written beside it.
    name : model name in the metadata (default: the checkpoint's, else OUT's stem).
    version : model version in the metadata (default: the checkpoint's, else 0.1).
    cube : cube edge the runtime tiles with (default: the training cube size).
    fp16 : write the fp16 twin (--no-fp16 to skip it).
    channel : for a network with an error head: "map" (the enhanced map, default) or
        "error" (its estimated absolute error, the model --confidence runs beside the map's).
    """
    from demhx_export.checkpoint import load_checkpoint
    from demhx_export.onnx_export import export_onnx

    net, config = load_checkpoint(str(checkpoint))
    overrides = {"name": name, "version": version,
                 "cube_size": _as_int("cube", cube) if cube is not None else None}
    report = export_onnx(net, config, str(out), metadata=overrides, fp16=bool(fp16),
                         channel=str(channel))
    _print_report(report)


def random_init_command(out: str, widths: Any = "32,64,128", seed: int = 0, cube: int = 64,
                        name: str = "random-init", version: str = "0",
                        fp16: bool = True) -> None:
    """Export an untrained (randomly initialised) network, marked demhx.trained=false.

    Parameters
    ----------
    out : destination .onnx file; OUT.fp16.onnx is written beside it.
    widths : three channel widths, e.g. 32,64,128 (the paper's).
    seed : torch seed of the initialisation.
    cube : cube edge in voxels (a multiple of 8).
    name, version : model identity in the metadata.
    fp16 : write the fp16 twin (--no-fp16 to skip it).
    """
    import torch

    from demhx_export.checkpoint import git_commit
    from demhx_export.network import UNet3D, parse_widths
    from demhx_export.onnx_export import export_onnx

    seed = _as_int("seed", seed)
    torch.manual_seed(seed)
    net = UNet3D(parse_widths(widths))
    config = {"data": "none (random initialisation)", "step": 0, "seed": seed,
              "commit": git_commit(), "cube_size": _as_int("cube", cube)}
    report = export_onnx(net, config, str(out), fp16=bool(fp16),
                         metadata={"name": name, "version": version, "trained": False})
    _print_report(report)


def _as_int(option: str, value: Any) -> int:
    """An integer option's value, or ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"--{option} {value!r}: not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--{option} {value!r}: not an integer") from None


def _print_report(report: Any) -> None:
    """Describe an ExportReport: sizes, errors, checksums and the registry entry."""
    meta = report.metadata
    state = "trained" if meta["demhx.trained"] == "true" else "UNTRAINED"
    print(f"wrote {report.path}: {report.parameters:,} parameters, "
          f"{report.gflop_per_cube:.2f} GFLOP per {meta['demhx.cube_size']}³ cube, {state}")
    print(f"  ONNX Runtime (CPU) vs PyTorch: relative L2 error {report.relative_error:.2e}")
    if report.fp16_path is not None:
        print(f"  fp16 twin {report.fp16_path} (float16 input and output): relative L2 error "
              f"{report.fp16_relative_error:.2e} vs PyTorch")
    print(f"  sha256 {report.sha256}  {report.path.name}")
    if report.fp16_sha256:
        print(f"  sha256 {report.fp16_sha256}  {report.fp16_path.name}")
    entry = json.dumps({meta["demhx.name"]: report.registry_entry()}, indent=2)
    print("registry entry (models/registry.json, under \"models\"):")
    print("\n".join("  " + line for line in entry.splitlines()))


# --------------------------------------------------------------------------- dispatch


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``demhx-export ARGS``; return the exit status."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # output piped into e.g. head, which has exited
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; commands: {', '.join(_available())}",
                     EXIT_USAGE)
    try:
        function = _load(command)
    except ImportError as error:
        return _fail(f"{command} is unavailable ({error}); install its dependencies",
                     EXIT_FAILURE)
    if "-h" in rest or "--help" in rest:
        print(f"usage: {PROGRAM} {command} ...\n\n{inspect.getdoc(function) or ''}")
        return 0
    try:
        return _fire(command, function, _normalise(rest, function))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        return _fail(f"{command}: {error}", EXIT_FAILURE)


def _fire(command: str, function: Callable[..., Any], args: list[str]) -> int:
    """Parse ``args`` with fire, then call ``function``; fire's complaints become one line.

    fire would call the function before noticing unused arguments, so the call is only
    recorded during parsing and made once fire has accepted every argument.
    """
    import fire

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    @functools.wraps(function)
    def record(*positional: Any, **keywords: Any) -> None:
        calls.append((positional, keywords))

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            fire.Fire(record, command=args, name=f"{PROGRAM} {command}")
    except fire.core.FireExit as exit_:
        if not exit_.code:
            return 0
        lines = [_ANSI.sub("", line) for line in captured.getvalue().splitlines()]
        errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
        message = errors[0] if errors else "invalid arguments"
        return _fail(f"{command}: {message}; see {PROGRAM} {command} --help", EXIT_USAGE)
    for positional, keywords in calls:
        function(*positional, **keywords)
    return 0


def _normalise(args: list[str], function: Callable[..., Any]) -> list[str]:
    """``--no-X`` -> ``--X=False``; quote text options so fire keeps them as strings.

    Only options that are parameters of ``function`` are touched (``--no-X`` stays as it is
    when the function has a parameter ``no_X``).
    """
    parameters = set(inspect.signature(function).parameters)
    out: list[str] = []
    quote_next = False
    for arg in args:
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if quote_next:
            out.append(repr(arg))
            quote_next = False
        elif not arg.startswith("--") or key not in parameters | {"no_" + p for p in parameters}:
            out.append(arg)
        elif key.startswith("no_") and key not in parameters and not has_value:
            out.append(f"--{key[3:]}=False")
        elif key in STRING_OPTIONS:
            out.append(f"--{key}={value!r}" if has_value else arg)
            quote_next = not has_value
        else:
            out.append(arg)
    return out


def _load(command: str) -> Callable[..., Any]:
    module_name, function_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if function is None:
        raise ImportError(f"{module_name} has no {function_name}")
    return function


def _available() -> list[str]:
    """Commands whose module is installed (optional modules may be absent)."""
    names = []
    for command, (module_name, _, _) in COMMANDS.items():
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ImportError:
            found = False
        if found:
            names.append(command)
    return names


def _usage() -> str:
    lines = [f"usage: {PROGRAM} COMMAND [ARGS]   ({PROGRAM} COMMAND --help for details)", "",
             "commands:"]
    lines += [f"  {name:<14} {COMMANDS[name][2]}" for name in _available()]
    return "\n".join(lines)


def _fail(message: str, status: int) -> int:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
