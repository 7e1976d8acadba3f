"""The command line's options, matched exactly, and DeepEMhancer's flags translated.

fire matches an option by any unambiguous prefix (``-s`` would be ``--suffix``, ``-p``
``--preview``), so :func:`fire_argv` reads the command line first: every option must be spelt
exactly as :data:`OPTIONS` (or DeepEMhancer's :data:`DEEPEMHANCER`) spells it, and is handed
to fire as ``--python_name=value``. Anything else that starts with ``-`` is a usage error
listing the valid options. DeepEMhancer's flags with the same meaning are translated
(``-i``/``-o`` become IN/OUT, ``-g`` the device, ``-p tightTarget`` the default model);
those demhx has no counterpart for are refused with what to use instead.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

PROGRAM = "demhx"
FLAGS = ("overwrite", "quiet", "debug")
VALUED = ("half2", "model", "device", "batch_size", "threads", "tiling", "voxel_size",
          "noise_stats", "mask", "out_dir", "suffix", "shard", "preview", "confidence", "tta")
OPTIONS: dict[str, str] = {
    **{f"--{name.replace('_', '-')}": name for name in FLAGS + VALUED},
    **{f"--{name}": name for name in FLAGS + VALUED if "_" in name},  # --batch_size too
    "-q": "quiet",
}
"""demhx's options as typed (``--batch-size``, also ``--batch_size``) → their Python name."""
DEEPEMHANCER: dict[str, str] = {
    "-i": "input", "--inputMap": "input", "-o": "output", "--outputMap": "output",
    "-i2": "half2", "--halfMap2": "half2", "-s": "voxel_size", "--samplingRate": "voxel_size",
    "--noiseStats": "noise_stats", "-m": "mask", "--binaryMask": "mask", "-b": "batch_size",
    "-g": "gpu_ids", "--gpuIds": "gpu_ids", "-p": "processing_type",
    "--processingType": "processing_type",
}
"""DeepEMhancer's flags that demhx accepts, with the same meaning → the Python name."""
REFUSED = {
    "--deepLearningModelPath": "demhx runs ONNX models: convert the .hd5 file with demhx-export "
                               "from-keras FILE.hd5 FILE.onnx and pass --model FILE.onnx",
    "--cleaningStrengh": "demhx has no small-component clean-up step; leave the option out",
    "--cleaningStrength": "demhx has no small-component clean-up step; leave the option out",
    "--download": "demhx ships its models (see --model); nothing to download",
}
"""DeepEMhancer's flags without a demhx counterpart → what to do instead."""
HELP_OPTIONS = ("-h", "--help", "-help")
_DEEPEMHANCER_ONLY = ("input", "output", "gpu_ids", "processing_type")
_DEEPEMHANCER_MODELS = ("wideTarget", "highRes")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class UsageError(ValueError):
    """The command line itself is wrong (unknown option, missing argument, bad value)."""


def fire_argv(argv: Sequence[str]) -> list[str]:
    """The command line as fire should see it: paths, then ``--python_name=value`` options.

    Raises UsageError for an unknown, repeated or valueless option, and for DeepEMhancer
    flags demhx cannot honour.
    """
    paths, values = _read(argv)
    paths = _deepemhancer_paths(paths, values)
    _deepemhancer_options(values)
    return paths + [f"--{name}={value}" for name, (_, value) in values.items()]


def _read(argv: Sequence[str]) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Positional paths, and each option's Python name → (spelling, value text)."""
    paths: list[str] = []
    values: dict[str, tuple[str, str]] = {}
    queue, only_paths = list(argv), False
    while queue:
        arg = queue.pop(0)
        if only_paths or not arg.startswith("-") or arg == "-":
            paths.append(_path(arg))
            continue
        if arg == "--":  # everything after is a path, even when it starts with -
            only_paths = True
            continue
        spelling, equals, inline = arg.partition("=")
        name = resolve(spelling)
        if name in FLAGS:
            value = inline if equals else "True"
        else:
            value = inline if equals else _value(spelling, queue)
            if name == "noise_stats" and not equals:
                value = _second_number(value, queue)
        if name in values:
            raise UsageError(f"{spelling} is given twice (also as {values[name][0]}); give it "
                             "once")
        values[name] = (spelling, value)
    return paths, values


def _path(arg: str) -> str:
    if arg == "-":
        raise UsageError("'-': reading a map from standard input is not supported; give a "
                         "file name")
    return f"./{arg}" if arg.startswith("-") else arg  # after --: keep fire from reading it


def resolve(spelling: str) -> str:
    """The Python name of an option typed as ``spelling``; UsageError if there is none."""
    name = OPTIONS.get(spelling) or DEEPEMHANCER.get(spelling)
    if name is not None:
        return name
    if spelling in REFUSED:
        raise UsageError(f"{spelling} (DeepEMhancer) is not supported: {REFUSED[spelling]}")
    if spelling == "--version":
        raise UsageError(f"--version takes no value; run {PROGRAM} --version")
    known = list(OPTIONS) + list(DEEPEMHANCER) + ["--version", "--help"]
    close = difflib.get_close_matches(spelling, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    names = ", ".join([_cli(name) for name in VALUED + FLAGS] + ["-q", "--version", "--help"])
    return _raise(f"unknown option {spelling}{hint}; options are {names} (and DeepEMhancer's "
                  f"-i, -o, -i2, -s, -m, -b, -g, -p, --noiseStats); see {PROGRAM} --help")


def _raise(message: str) -> str:
    raise UsageError(message)


def _cli(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _value(spelling: str, queue: list[str]) -> str:
    """The next argument as the value of ``spelling``; UsageError when there is none."""
    if not queue or _is_option(queue[0]):
        raise UsageError(f"{spelling} needs a value; see {PROGRAM} --help")
    return queue.pop(0)


def _is_option(arg: str) -> bool:
    spelling = arg.partition("=")[0]
    return (arg.startswith("--") or spelling in OPTIONS or spelling in DEEPEMHANCER
            or spelling in HELP_OPTIONS)


def _second_number(value: str, queue: list[str]) -> str:
    """``--noise-stats MEAN STD`` (two arguments, DeepEMhancer's form) as ``MEAN,STD``."""
    if "," not in value and queue and _NUMBER.match(queue[0]):
        return f"{value},{queue.pop(0)}"
    return value


def _deepemhancer_paths(paths: list[str], values: dict[str, tuple[str, str]]) -> list[str]:
    """IN and OUT given as DeepEMhancer's ``-i IN`` and ``-o OUT`` joined to the paths."""
    several = "out_dir" in values or "suffix" in values
    if "input" in values:
        paths = [values.pop("input")[1], *paths]
    if "output" in values:
        spelling, output = values.pop("output")
        if several:
            raise UsageError(f"{spelling} names OUT of the one-map form; with --out-dir or "
                             "--suffix the outputs are named from the inputs, leave it out")
        if len(paths) != 1:
            given = f"OUT is already given ({paths[1]})" if len(paths) > 1 else "IN is missing"
            raise UsageError(f"{spelling} {output}: {given}; usage: {PROGRAM} -i IN -o OUT or "
                             f"{PROGRAM} IN OUT")
        paths.append(output)
    return paths


def _deepemhancer_options(values: dict[str, tuple[str, str]]) -> None:
    """``-g`` becomes ``--device`` and ``-p`` ``--model``, in place."""
    for flag, target, convert in (("gpu_ids", "device", gpu_device),
                                  ("processing_type", "model", processing_model)):
        if flag not in values:
            continue
        spelling, text = values.pop(flag)
        if target in values:
            raise UsageError(f"{spelling} and {values[target][0]} both choose the {target}; "
                             "give one of them")
        values[target] = (spelling, convert(spelling, text))


def gpu_device(spelling: str, text: str) -> str:
    """DeepEMhancer's GPU ids (``-g 0``, ``-g 0,1``; ``-1`` for the CPU) as a demhx
    ``--device`` (``cuda:0``, ``cuda:0,1``, ``cpu``)."""
    ids = [part.strip() for part in text.split(",")]
    if ids == ["-1"]:
        return "cpu"
    if len(ids) == 1 and ids[0].isdigit():
        return f"cuda:{int(ids[0])}"
    if all(part.isdigit() for part in ids):  # several GPUs share every map's cubes
        return "cuda:" + ",".join(str(int(part)) for part in ids)
    raise UsageError(f"{spelling} {text!r}: expected GPU ids (0 or 0,1,...) or -1 for the "
                     "CPU; or use --device auto|cpu|cuda|cuda:N|cuda:N,M|cuda:all")


def processing_model(spelling: str, text: str) -> str:
    """DeepEMhancer's ``-p`` as a demhx model name: ``tightTarget`` (DeepEMhancer's default) is
    demhx's default model, which is trained on a tight target too and measured better than
    ``tight`` (models/README.md)."""
    if text == "tightTarget":
        from demhx import model

        return str(model.load_registry(model.models_dir())["default"])
    if text in _DEEPEMHANCER_MODELS:
        raise UsageError(f"{spelling} {text}: demhx ships no {text} model (its models, "
                         "tight-fast and tight, are trained on tight targets like tightTarget); "
                         f"convert DeepEMhancer's deepEMhancer_{text}.hd5 with demhx-export "
                         "from-keras and pass --model FILE.onnx, or leave -p out")
    raise UsageError(f"{spelling} {text!r}: not a DeepEMhancer processing type (tightTarget, "
                     "wideTarget, highRes); demhx chooses models with --model NAME|PATH")
