"""The ``demhx`` command's work, imported by :mod:`demhx.cli` once the signal handlers are in
place: read the words, run one map or several, report on stderr.

Options are matched exactly as :data:`OPTIONS` (the fields of :class:`Arguments`) and
:data:`DEEPEMHANCER` spell them: the words are read here, and fire, which would take ``-s``
for ``--suffix``, is handed ``--field=value`` pairs to call the command with. Values are
checked where the library checks them, so the command line and the API refuse alike.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demhx import _signals, _warmup
from demhx.errors import USAGE_ERRORS, cli_terms, describe_error

if TYPE_CHECKING:
    from demhx import EnhanceOptions, Enhancer
    from demhx.batch import MapResult, Shard

__all__ = ["DEEPEMHANCER", "HELP", "OPTIONS", "USAGE", "Arguments",
           "UsageError", "describe_error", "help_text", "main", "parse_arguments"]

PROGRAM = "demhx"
SEVERAL = f"{PROGRAM} IN [IN ...] --out-dir DIR|--suffix SUF"
FLAGS = ("overwrite", "quiet", "debug")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_NAME_WIDTH = 18  # columns of the model-name column in the help's model list


class UsageError(ValueError):
    """The command line itself is wrong (unknown option, missing argument, bad value)."""


@dataclass(frozen=True)
class Arguments:
    """The command line, read and checked; the fields after ``more_inputs`` are its options.

    ``output`` is OUT, or None with ``--out-dir`` or ``--suffix`` (:attr:`batch`), where
    ``more_inputs`` holds the other input maps and ``shard`` this job's share of them.
    """

    input: str
    output: str | None
    more_inputs: tuple[str, ...] = ()
    half2: str | None = None
    model: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    threads: int | None = None
    tiling: str = "default"
    voxel_size: tuple[float, float, float] | None = None  # (z, y, x) in Å
    noise_stats: tuple[float, float] | None = None
    mask: str | None = None
    out_dir: str | None = None
    suffix: str | None = None
    shard: Shard | None = None
    preview: str | None = None
    confidence: str | None = None
    tta: int | None = None
    overwrite: bool = False
    quiet: bool = False
    debug: bool = False

    @property
    def batch(self) -> bool:
        """Whether outputs are named by ``--out-dir``/``--suffix`` (any number of inputs)."""
        return self.out_dir is not None or self.suffix is not None


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


_NAMES = tuple(field.name for field in fields(Arguments))[3:]
OPTIONS = {**{_flag(name): name for name in _NAMES}, **{f"--{name}": name for name in _NAMES},
           "-q": "quiet"}
"""demhx's options as typed (``--batch-size``, also ``--batch_size``) → their field."""
_NO_CLEANING = "demhx has no small-component clean-up step; leave the option out"
DEEPEMHANCER = {
    "-i": "input", "--inputMap": "input", "-o": "output", "--outputMap": "output",
    "-i2": "half2", "--halfMap2": "half2", "-s": "voxel_size", "--samplingRate": "voxel_size",
    "--noiseStats": "noise_stats", "-m": "mask", "--binaryMask": "mask", "-b": "batch_size",
    "-g": "device", "--gpuIds": "device", "-p": "model", "--processingType": "model",
    "--deepLearningModelPath": "demhx runs ONNX models: convert the .hd5 file with "
                               "demhx-export from-keras FILE.hd5 FILE.onnx and pass --model "
                               "FILE.onnx",
    "--cleaningStrengh": _NO_CLEANING, "--cleaningStrength": _NO_CLEANING,
    "--download": "demhx ships its models (see --model); nothing to download",
}
"""DeepEMhancer's flags → the field they set (the values of ``-g``, GPU ids, and ``-p``, a
processing type, translated), or for those without a counterpart what to do instead."""
HELP_OPTIONS = ("-h", "--help", "-help")
_SPELLINGS = {*OPTIONS, *DEEPEMHANCER, *HELP_OPTIONS}  # a word that is one is not a value
_ONE_MAP_ONLY = {
    "half2": ("--half2 does not combine with several inputs, --out-dir or --suffix; run "
              "demhx H1 OUT --half2 H2 for each pair of half-maps"),
    "noise_stats": ("--noise-stats gives one map's solvent noise, not several; leave it out "
                    "(estimated per map) or run each map on its own"),
    **{name: (f"--{name} works with the one-map form {PROGRAM} IN OUT; run each map on its "
              "own to get its confidence map") for name in ("confidence", "tta")},
}


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """Read the command line into checked :class:`Arguments`; UsageError if it is wrong."""
    import fire
    from fire.decorators import SetParseFn

    paths, values = _read(argv)
    parsed: list[Arguments] = []

    @SetParseFn(str)  # every word stays text, for _convert
    def command(*paths: str, **options: str) -> None:
        parsed.append(_convert(list(paths), options))

    words = [*paths, *(f"--{name}={value}" for name, value in values.items()), "--"]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fire.Fire(command, words, name=PROGRAM)
    except fire.core.FireExit:  # not expected: fire is given only words read here
        raise UsageError(f"could not read the arguments; see {PROGRAM} --help") from None
    return parsed[0]


def _read(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The paths (DeepEMhancer's ``-i IN`` and ``-o OUT`` among them), and each option's
    field → its value's text."""
    paths: list[str] = []
    spelt: dict[str, tuple[str, str]] = {}  # field → (spelling, value)
    queue, only_paths = list(argv), False
    while queue:
        word = queue.pop(0)
        if word == "-":
            raise UsageError("'-': reading a map from standard input is not supported; give a "
                             "file name")
        if only_paths or not word.startswith("-"):
            paths.append(f"./{word}" if word.startswith("-") else word)  # fire reads -x as a flag
            continue
        if word == "--":  # everything after is a path, even when it starts with -
            only_paths = True
            continue
        spelling, equals, value = word.partition("=")
        name = _field(spelling)
        if not equals:
            value = "True" if name in FLAGS else _value(spelling, queue, name == "noise_stats")
        if name in spelt:
            first = spelt[name][0]
            translated = (first in DEEPEMHANCER) != (spelling in DEEPEMHANCER)  # -g, -p
            if name not in ("device", "model") or not translated:
                raise UsageError(f"{spelling} is given twice (also as {first}); give it once")
            theirs, ours = (first, spelling) if first in DEEPEMHANCER else (spelling, first)
            raise UsageError(f"{theirs} and {ours} both choose the {name}; give one of them")
        if spelling in DEEPEMHANCER and name in ("device", "model"):
            value = (_gpu_device if name == "device" else _processing_model)(spelling, value)
        spelt[name] = (spelling, value)
    return _joined(paths, spelt), {name: value for name, (_, value) in spelt.items()}


def _field(spelling: str) -> str:
    """The field of the option typed as ``spelling``; UsageError if there is none."""
    name = OPTIONS.get(spelling) or DEEPEMHANCER.get(spelling)
    if name is not None and " " in name:
        raise UsageError(f"{spelling} (DeepEMhancer) is not supported: {name}")
    if name is not None:
        return name
    if spelling == "--version":
        raise UsageError(f"--version takes no value; run {PROGRAM} --version")
    known = [key for key, name in {**OPTIONS, **DEEPEMHANCER}.items() if " " not in name]
    close = difflib.get_close_matches(spelling, [*known, "--version", "--help"], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    names = ", ".join([*map(_flag, _NAMES), "-q", "--version", "--help"])
    raise UsageError(f"unknown option {spelling}{hint}; options are {names} (and DeepEMhancer's "
                     f"-i, -o, -i2, -s, -m, -b, -g, -p, --noiseStats); see {PROGRAM} --help")


def _value(spelling: str, queue: list[str], pair: bool) -> str:
    """The next word as the value of ``spelling``; with ``pair`` two numbers as ``A,B``
    (DeepEMhancer's ``--noiseStats MEAN STD``)."""
    if not queue or queue[0].startswith("--") or queue[0].partition("=")[0] in _SPELLINGS:
        raise UsageError(f"{spelling} needs a value; see {PROGRAM} --help")
    value = queue.pop(0)
    if pair and "," not in value and queue and _NUMBER.match(queue[0]):
        value = f"{value},{queue.pop(0)}"
    return value


def _joined(paths: list[str], spelt: dict[str, tuple[str, str]]) -> list[str]:
    """The paths with DeepEMhancer's ``-i IN`` first and ``-o OUT`` last (taken from
    ``spelt``)."""
    if "input" in spelt:
        paths = [spelt.pop("input")[1], *paths]
    if "output" not in spelt:
        return paths
    spelling, output = spelt.pop("output")
    if "out_dir" in spelt or "suffix" in spelt:
        raise UsageError(f"{spelling} names OUT of the one-map form; with --out-dir or "
                         "--suffix the outputs are named from the inputs, leave it out")
    if len(paths) != 1:
        given = f"OUT is already given ({paths[1]})" if paths else "IN is missing"
        raise UsageError(f"{spelling} {output}: {given}; usage: {PROGRAM} -i IN -o OUT or "
                         f"{PROGRAM} IN OUT")
    return [*paths, output]


def _gpu_device(spelling: str, text: str) -> str:
    """DeepEMhancer's GPU ids (``-g 0``, ``-g 0,1``; ``-1`` for the CPU) as a ``--device``."""
    ids = [part.strip() for part in text.split(",")]
    if ids == ["-1"]:
        return "cpu"
    if not all(part.isdigit() for part in ids):
        raise UsageError(f"{spelling} {text!r}: expected GPU ids (0 or 0,1,...) or -1 for the "
                         "CPU; or use --device auto|cpu|cuda|cuda:N|cuda:N,M|cuda:all")
    return "cuda:" + ",".join(str(int(part)) for part in ids)  # several share every batch


def _processing_model(spelling: str, text: str) -> str:
    """DeepEMhancer's ``-p``: ``tightTarget`` (its default) is demhx's default model, trained
    on a tight target too and measured better than ``tight`` (models/README.md)."""
    if text == "tightTarget":
        from demhx import model

        return str(model.load_registry(model.models_dir())["default"])
    if text in ("wideTarget", "highRes"):
        raise UsageError(f"{spelling} {text}: demhx ships no {text} model (its models, "
                         "tight-fast and tight, are trained on tight targets like tightTarget); "
                         f"convert DeepEMhancer's deepEMhancer_{text}.hd5 with demhx-export "
                         "from-keras and pass --model FILE.onnx, or leave -p out")
    raise UsageError(f"{spelling} {text!r}: not a DeepEMhancer processing type (tightTarget, "
                     "wideTarget, highRes); demhx chooses models with --model NAME|PATH")


def _convert(paths: list[str], raw: dict[str, str]) -> Arguments:
    """The paths and the options' text as :class:`Arguments`, each value checked."""
    several = "out_dir" in raw or "suffix" in raw
    if several:
        one_map = ["half2", "confidence", "tta", *(["noise_stats"] if paths[1:] else [])]
        clash = [name for name in one_map if name in raw]
        if not paths or clash:
            raise UsageError(_ONE_MAP_ONLY[clash[0]] if paths else
                             f"missing IN; usage: {SEVERAL} [options], see {PROGRAM} --help")
    elif len(paths) != 2:
        usage = f"usage: {PROGRAM} IN OUT [options], or"
        raise UsageError(f"unexpected extra argument {paths[2]!r}; {usage} for several maps "
                         f"{SEVERAL} [options]; see {PROGRAM} --help" if paths[2:] else
                         f"missing {'OUT' if paths else 'IN'}; {usage} {SEVERAL} [options]; "
                         f"see {PROGRAM} --help")
    elif "shard" in raw:
        raise UsageError(f"--shard {raw['shard']} shares several maps among jobs; use it with "
                         f"{SEVERAL}, or leave it out")
    values = {name: _typed(name, text) for name, text in raw.items()}
    if not several:
        return Arguments(paths[0], paths[1], **values)
    from demhx import batch

    values["shard"] = batch.choose_shard(raw.get("shard"), os.environ)  # else SLURM's
    return Arguments(paths[0], None, tuple(paths[1:]), **values)


def _typed(name: str, text: str) -> Any:
    """An option's text as its field's value: flags true or false, counts positive integers,
    the voxel size (z, y, x) from X,Y,Z or one value, the noise statistics from MEAN,STD."""
    option = _flag(name)
    if name in FLAGS:
        if text.lower() not in ("true", "false"):
            raise UsageError(f"{option} takes no value (got {text!r})")
        return text.lower() == "true"
    if name in ("batch_size", "threads", "tta"):
        with contextlib.suppress(ValueError):
            if int(text) > 0:
                return int(text)
        raise UsageError(f"{option} {text!r}: must be a positive integer")
    if name not in ("voxel_size", "noise_stats"):
        return text
    counts, form = (((1, 3), "one value in Å or three, X,Y,Z") if name == "voxel_size" else
                    ((2,), "two values, MEAN,STD"))
    parts = [part for part in re.split(r"[,\s]+", text.strip().strip("()[]")) if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise UsageError(f"{option} {text!r}: expected {form}")
    if name == "noise_stats":
        return tuple(values)
    x, y, z = values * 3 if len(values) == 1 else values
    return z, y, x


USAGE = ("usage: demhx IN OUT [--half2 H2] [--model NAME|PATH]\n"
         "             [--device auto|cpu|cuda|cuda:N|cuda:N,M,...|cuda:all]\n"
         "             [--batch-size N] [--threads N] [--tiling default|fast|reference]\n"
         "             [--voxel-size A | --voxel-size X,Y,Z] [--noise-stats MEAN,STD]\n"
         "             [--mask PATH] [--preview PNG|DIR] [--confidence PATH] [--tta N]\n"
         "             [--overwrite] [--quiet] [--debug] [--version]\n"
         "       demhx IN [IN ...] (--out-dir DIR | --suffix SUF | both) [--shard K/N]\n"
         "             [options]")
HELP = USAGE + """

Locally sharpen and mask a cryo-EM map (DeepEMhancer method) on ONNX Runtime.

positional arguments:
  IN                    input map (.mrc, .map, .map.gz), or the first half-map
  OUT                   output map (float32 MRC, input header kept); must not exist
                        unless --overwrite
  IN [IN ...]           with --out-dir or --suffix: any number of maps, enhanced one after
                        the other with one model load; a map that fails is reported and
                        the others run; a table ends the run, exit status 1 if any failed

options:
  --half2 H2            second half-map; averaged with IN in float32 (recommended)
  --model NAME|PATH     a shipped model's name (listed below) or an ONNX file (default: the
                        shipped model marked "default")
  --device DEV          auto (CUDA when usable, else CPU), cpu, cuda or cuda:N; several
                        GPUs: cuda:N,M,... or cuda:all (each batch split across them;
                        --batch-size is per GPU)
  --batch-size N        cubes per inference call (default: 1 on CPU, from GPU memory on CUDA)
  --threads N           CPU threads for inference (default: all physical cores)
  --tiling SCHEME       default: the reference's cubes thinned to gaps <= 3/4 cube, solvent
                        cubes skipped, more of them added while overlapping cubes disagree
                        (predicted CC to the reference below 0.993);
                        fast: the default's first cubes only (no cubes added);
                        reference: the paper's stride 16 with plain averaging (slow)
  --voxel-size A        voxel size in Å, one value or X,Y,Z; overrides the header
  --noise-stats M,S     solvent noise mean and standard deviation of IN (skips estimation)
  --mask PATH           a mask on IN's grid that marks the particle (1 on it, 0 in the
                        solvent, soft edges allowed): the solvent noise is measured outside
                        it (models with normalisation "mask" take their statistics inside
                        it); the output is not masked by it (a masked IN comes out exactly
                        0 outside its own mask, with or without --mask)
  --out-dir DIR         several maps: write DIR/<input name> (DIR is created if missing)
  --suffix SUF          several maps: add SUF to each name before the extension, beside
                        the input or in --out-dir (a.map -> a_demhx.map for _demhx)
  --shard K/N           several maps: run only job K's share of N (map i, from 0, is in
                        share i % N + 1); default under a SLURM job array: from
                        SLURM_ARRAY_TASK_ID (- SLURM_ARRAY_TASK_MIN + 1) and
                        SLURM_ARRAY_TASK_COUNT. A share without maps exits 0
  --preview PNG|DIR     also draw the central xy, xz and yz slices of the input (top row)
                        and the output (bottom row) into a PNG file; a PATH not ending .png
                        is a folder (created if missing) holding <output stem>.png for each
                        map. Grey scale per map: its slices' 1st-99.5th percentiles. Needs
                        matplotlib: pip install "demhx[preview]"
  --confidence PATH     also write a confidence map to PATH (MRC, OUT's header and grid):
                        each cube is run in --tta rotations (default 6), OUT is their mean
                        and PATH the spread, the per-voxel standard deviation over the
                        rotations in OUT's units (0 in skipped solvent): where the turned
                        predictions disagree. Costs N times the network time
  --tta N               rotations per cube: 3, 4, 6, 12 or 24 (groups of the cube's proper
                        rotations; 24 is all, see README); without --confidence OUT is
                        their mean alone
  --overwrite           replace OUT (and the preview) if it exists
  --quiet               no progress bar, device line or summary (warnings still print);
                        with several maps the table prints only if a map failed
  --debug               show the traceback of errors
  --version             print the version and exit
  -h, --help            show this help and exit

Options are matched exactly (no abbreviations); --batch_size style spellings work too.

DeepEMhancer's options, with the same meaning:
  -i, --inputMap IN     IN               -o, --outputMap OUT   OUT
  -i2, --halfMap2 H2    --half2 H2       -s, --samplingRate A  --voxel-size A
  --noiseStats M S      --noise-stats M,S
  -m, --binaryMask PATH --mask PATH      -b, --batch_size N    --batch-size N
  -g, --gpuIds IDS      --device cuda:IDS (-g 0,1: --device cuda:0,1; -1: --device cpu)
  -p, --processingType tightTarget       the default model (tight target; no wideTarget or
                        highRes model is shipped: convert DeepEMhancer's file with
                        demhx-export from-keras)
  --deepLearningModelPath and --cleaningStrengh are refused with what to use instead.

Exit status: 0 done, 2 usage or input error, 1 failure while running (or any of several
maps failed), 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (nothing half-written is left behind).
"""
_MODELS_AFTER = "  -h, --help            show this help and exit\n"
"""The help lists the shipped models after this line."""


def help_text(folder: Path | None = None) -> str:
    """:data:`HELP` with the shipped models, read now from the registry in ``folder`` (default:
    the installed models), one line each and the default marked."""
    from demhx import model

    folder = folder or model.models_dir()
    registry = model.load_registry(folder)
    titles = {name: f"{name} (default)" if name == registry["default"] else name
              for name in registry["models"]}
    width = max([_NAME_WIDTH, *(len(title) + 2 for title in titles.values())])
    lines = [f"  {titles[name]:<{width}}{model.describe(folder, entry)}"
             for name, entry in registry["models"].items()]
    listing = "\n".join(["", "shipped models (--model NAME):",
                         *(lines or ["  none; pass --model PATH.onnx"])])
    return HELP.replace(_MODELS_AFTER, _MODELS_AFTER + listing + "\n", 1)


def main(args: list[str], watch: _signals.OutputWatch) -> int:
    """Run the command line ``args``; returns the exit status.

    Errors become one line and a status; a signal's :class:`~demhx._signals.Interrupted`
    propagates (also where code on its way turned it into another error), for
    :func:`demhx.cli.main` to report.
    """
    if any(arg in HELP_OPTIONS for arg in args):
        sys.stdout.write(help_text())
        return 0
    if "--version" in args:
        from demhx import __version__

        sys.stdout.write(f"{PROGRAM} {__version__}\n")
        return 0
    try:
        arguments = parse_arguments(args)
        return _run_many(arguments, watch) if arguments.batch else _run(arguments, watch)
    except Exception as error:  # every failure becomes one line and an exit status
        _signals.raise_taken()  # a signal's exception, turned into this error on its way
        return _report(error, "--debug" in args)


def _run(args: Arguments, watch: _signals.OutputWatch) -> int:
    """Enhance IN into OUT (and the preview), with progress and a summary unless quiet."""
    from demhx._progress import ProgressBar

    picture = _preview_path(args)  # checked before the run; None without --preview
    watch.watch([args.confidence, args.output, picture])
    bar = ProgressBar(enabled=False if args.quiet else None)
    with _console(args):
        try:
            summary = _enhancer(args).process_file(
                args.input, str(args.output), _options(args, bar), half2=args.half2,
                voxel_size=args.voxel_size, mask=args.mask, confidence=args.confidence,
                overwrite=args.overwrite)
        finally:
            bar.close()
        logging.getLogger(PROGRAM).info(summary.line())
        if picture is not None:
            from demhx.preview import write_file_preview

            picture.parent.mkdir(parents=True, exist_ok=True)  # a --preview folder
            write_file_preview(args.input, str(args.output), picture, half2=args.half2,
                               voxel_size=args.voxel_size, overwrite=args.overwrite)
            logging.getLogger(PROGRAM).info(f"wrote preview {picture}")
    _signals.raise_taken()  # a signal whose exception was swallowed on its way
    return 0


def _enhancer(args: Arguments) -> Enhancer:
    from demhx import Enhancer

    return Enhancer(args.model, device=args.device, batch_size=args.batch_size,
                    threads=args.threads)


def _options(args: Arguments, progress: Callable[[int, int], None]) -> EnhanceOptions:
    from demhx import EnhanceOptions

    return EnhanceOptions(noise_stats=args.noise_stats, tiling=args.tiling, tta=args.tta,
                          progress=progress)


def _preview_path(args: Arguments) -> Path | None:
    """The checked ``--preview`` file of the one-map form (None without ``--preview``)."""
    if args.preview is None:
        return None
    from demhx import preview

    _require_matplotlib()
    inputs = [Path(name).expanduser() for name in (args.input, args.half2, args.mask) if name]
    return preview.checked_preview_path(args.preview, str(args.output), inputs,
                                        args.confidence, args.overwrite)


def _require_matplotlib() -> None:
    """UsageError naming the fix when --preview cannot work (before any slow work)."""
    from demhx.preview import require_matplotlib

    try:
        require_matplotlib()
    except ImportError as error:
        raise UsageError(str(error)) from None


def _run_many(args: Arguments, watch: _signals.OutputWatch) -> int:
    """Enhance several maps with one model load; a table on stderr; 1 if any map failed."""
    from demhx import batch

    planned = _plan_many(args)
    if planned is None:  # this job's shard has no maps
        return 0
    sources, outputs, previews, total = planned
    watch.watch([*outputs, *(previews or [])])
    enhancer = _enhancer(args)
    with _console(args):
        _warmup.start()  # numba's set-up while the model loads (a single map starts it itself)
        enhancer.runtime  # noqa: B018 -- loads the model; its errors stop the run here
        batch.create_folders(outputs + (previews or []))
        results, interrupt = _enhance_many(args, enhancer, sources, outputs, previews, watch)
    _signals.close()  # the outcome is final: a later signal cannot cut the table short
    failed = sum(result.status != batch.OK for result in results)
    if failed or not args.quiet:
        _say(batch.summary_table(results, describe_error))
        if args.shard is not None:
            _say(f"{PROGRAM}: {batch.shard_line(args.shard, len(sources), total)}\n")
    if interrupt is not None:
        name = _signals.signal_name(interrupt)
        what = "interrupted" if name == "SIGINT" else f"stopped by {name}"
        _say(f"{PROGRAM}: {what}; only the maps marked ok were written\n")
        return _signals.exit_status(interrupt)
    if failed:
        _say(f"{PROGRAM}: error: {failed} of {len(results)} maps failed; see the table above\n")
    return 1 if failed else 0


def _plan_many(args: Arguments
               ) -> tuple[list[Path], list[Path], list[Path] | None, int] | None:
    """This job's inputs, outputs and previews, checked before any work, and the number of
    maps given; None (after saying so) when its shard has no maps."""
    from demhx import batch

    every = [Path(path) for path in (args.input, *args.more_inputs)]
    if args.shard is not None and not batch.shard_indices(len(every), args.shard):
        with _console(args):
            logging.getLogger(PROGRAM).info(batch.shard_line(args.shard, 0, len(every)))
        return None
    if args.preview is not None:
        _require_matplotlib()
    plan = batch.plan_maps(every, args.out_dir, args.suffix, args.shard, preview=args.preview,
                           mask=args.mask)
    return plan.sources, plan.outputs, plan.previews, len(every)


def _enhance_many(args: Arguments, enhancer: Enhancer, sources: list[Path],
                  outputs: list[Path], previews: list[Path] | None, watch: _signals.OutputWatch
                  ) -> tuple[list[MapResult], KeyboardInterrupt | None]:
    """Run the maps one by one (progress bar, one line each); on Ctrl-C (or SIGTERM, SIGHUP)
    the maps not reached are marked not run (the one under way ok if its output was already
    moved into place), and the interruption is returned."""
    from demhx import batch
    from demhx._progress import ProgressBar

    log = logging.getLogger(PROGRAM)
    bar = ProgressBar(enabled=False if args.quiet else None)
    results: list[MapResult] = []
    try:
        for result in batch.enhance_many(
                enhancer, sources, outputs, _options(args, bar), previews=previews,
                voxel_size=args.voxel_size, mask=args.mask, overwrite=args.overwrite):
            bar.close()
            if result.error is None or _signals.taken() is None:
                results.append(result)  # (a map whose error was a signal's counts as not run)
            _signals.raise_taken()  # a signal turned into this map's error, or swallowed
            if result.error is not None:
                log.info(f"failed: {describe_error(result.error)}")
            elif result.summary is not None:
                log.info(result.summary.line())
    except KeyboardInterrupt as interrupt:
        bar.close()
        done = len(results)
        results += [batch.MapResult(source, output,
                                    batch.OK if watch.changed(output) else batch.NOT_RUN)
                    for source, output in zip(sources[done:], outputs[done:], strict=True)]
        return results, interrupt
    return results, None


@contextlib.contextmanager
def _console(args: Arguments) -> Iterator[None]:
    """Info lines as ``demhx: ...`` (unless quiet; with ``--debug`` also the stage times) and
    warnings as one line, on stderr; the library's option names shown as flags."""
    logger = logging.getLogger(PROGRAM)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"{PROGRAM}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.debug else logging.WARNING if args.quiet else
                    logging.INFO)
    logger.propagate = False

    def show(message: Warning | str, *where: Any, **more: Any) -> None:
        sys.stderr.write(f"{PROGRAM}: warning: {' '.join(cli_terms(str(message)).split())}\n")

    try:
        with warnings.catch_warnings():  # restores the warning filters and showwarning
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _Formatter(logging.Formatter):
    """Log lines with the library's option names shown as flags (:func:`cli_terms`)."""

    def format(self, record: logging.LogRecord) -> str:
        return cli_terms(super().format(record))


def _say(text: str) -> None:
    """Write to stderr; a terminal that hung up (SIGHUP) cannot stop the clean-up."""
    try:
        sys.stderr.write(cli_terms(text))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _report(error: BaseException, debug: bool) -> int:
    """Print an error as one line (the traceback first when debugging); its exit status.
    The outcome is final from here: a signal now is ignored rather than cutting the line."""
    _signals.close()
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    usage = isinstance(error, USAGE_ERRORS)
    tail = "" if usage or debug else " (run with --debug for the traceback)"
    sys.stderr.write(f"{PROGRAM}: error: {describe_error(error)}{tail}\n")
    return 2 if usage else 1
