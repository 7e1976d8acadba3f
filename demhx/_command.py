"""The ``demhx`` command's work, imported by :mod:`demhx.cli` once the signal handlers are in
place: read the words, run one map or several, report on stderr.

Options are matched exactly as :class:`Arguments` (a field per option, with its help line) and
:data:`DEEPEMHANCER` spell them; fire, which would take ``-s`` for ``--suffix``, is handed the
words read here as ``--field=value`` and calls the command.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demhx import _signals, _warmup
from demhx._progress import ProgressBar
from demhx.errors import USAGE_ERRORS, cli_terms, describe_error

if TYPE_CHECKING:
    from demhx import EnhanceOptions, Enhancer
    from demhx.batch import MapPlan, MapResult, Shard

__all__ = ["DEEPEMHANCER", "HELP", "OPTIONS", "USAGE", "Arguments",
           "UsageError", "help_text", "main", "parse_arguments"]

PROGRAM = "demhx"
SEVERAL = f"{PROGRAM} IN [IN ...] --out-dir DIR|--suffix SUF"
LOG = logging.getLogger(PROGRAM)
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_NAME_WIDTH = 18  # columns of the model names in the help


class UsageError(ValueError):
    """The command line itself is wrong (unknown option, missing argument, bad value)."""


def _option(metavar: str | None, text: str, default: Any = None) -> Any:
    """An option's field: its value's name in the help (None: a flag) and its help line."""
    return field(default=default, metadata={"metavar": metavar, "help": text})


@dataclass(frozen=True)
class Arguments:
    """The command line, read and checked: the paths, then the options in the help's order.
    With ``--out-dir`` or ``--suffix`` OUT is None and ``more_inputs`` holds the other maps."""

    input: str
    output: str | None
    more_inputs: tuple[str, ...] = ()
    half2: str | None = _option("H2", "second half-map, averaged with IN (recommended)")
    model: str | None = _option("NAME|PATH", "a shipped model (listed below) or an ONNX file")
    device: str = _option("DEV", "auto, cpu, cuda, cuda:N, cuda:N,M,... or cuda:all", "auto")
    batch_size: int | None = _option("N", "cubes per network call and GPU (default: auto)")
    threads: int | None = _option("N", "CPU threads (default: all physical cores)")
    tiling: str = _option("SCHEME", "default (self-checking), fast or reference (slow)",
                          "default")
    voxel_size: tuple[float, float, float] | None = _option(  # (z, y, x) in Å
        "A", "voxel size in Å, A or X,Y,Z (default: the header's)")
    noise_stats: tuple[float, float] | None = _option("M,S", "solvent noise mean and std of IN")
    mask: str | None = _option("PATH", "marks the particle: noise measured outside it; OUT is "
                               "not masked by it")
    out_dir: str | None = _option("DIR", "several maps: write DIR/<input name>")
    suffix: str | None = _option("SUF", "several maps: add SUF to each name (a.map: a_x.map)")
    shard: Shard | None = _option("K/N", "several maps: job K's share of N (default: SLURM's)")
    preview: str | None = _option("PNG|DIR", "also draw central slices (needs demhx[preview])")
    confidence: str | None = _option("PATH", "also write the spread over the --tta rotations")
    tta: int | None = _option("N", "rotations per cube: 3, 4, 6 (default), 12 or 24")
    overwrite: bool = _option(None, "replace existing outputs", False)
    quiet: bool = _option(None, "warnings and errors only (and the table if a map failed)", False)
    debug: bool = _option(None, "also the stage times, and the traceback of errors", False)

    @property
    def batch(self) -> bool:
        """Whether outputs are named by ``--out-dir``/``--suffix`` (any number of inputs)."""
        return self.out_dir is not None or self.suffix is not None


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


_OPTIONS = fields(Arguments)[3:]
_NAMES = tuple(option.name for option in _OPTIONS)
FLAGS = tuple(option.name for option in _OPTIONS if option.metadata["metavar"] is None)
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
"""DeepEMhancer's flags → the field they set (``-g`` and ``-p`` values translated), or for
those without a counterpart what to do instead."""
HELP_OPTIONS = ("-h", "--help", "-help")
_SPELLINGS = {*OPTIONS, *DEEPEMHANCER, *HELP_OPTIONS}  # a word that is one is not a value
_SEE_HELP = f"see {PROGRAM} --help"
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
        raise UsageError(f"could not read the arguments; {_SEE_HELP}") from None
    return parsed[0]


def _read(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The paths (with ``-i IN`` and ``-o OUT``), and each option's field → its value's text."""
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
            if name in ("device", "model") and (first in OPTIONS) != (spelling in OPTIONS):
                theirs, ours = sorted((first, spelling), key=lambda word: word in OPTIONS)
                raise UsageError(f"{theirs} and {ours} both choose the {name}; give one of them")
            raise UsageError(f"{spelling} is given twice (also as {first}); give it once")
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
                     f"-i, -o, -i2, -s, -m, -b, -g, -p, --noiseStats); {_SEE_HELP}")


def _value(spelling: str, queue: list[str], pair: bool) -> str:
    """The next word as the value of ``spelling``; with ``pair`` two numbers as ``A,B``."""
    if not queue or queue[0].startswith("--") or queue[0].partition("=")[0] in _SPELLINGS:
        raise UsageError(f"{spelling} needs a value; {_SEE_HELP}")
    value = queue.pop(0)
    if pair and "," not in value and queue and _NUMBER.match(queue[0]):
        value = f"{value},{queue.pop(0)}"
    return value


def _joined(paths: list[str], spelt: dict[str, tuple[str, str]]) -> list[str]:
    """The paths with ``-i IN`` first and ``-o OUT`` last (taken out of ``spelt``)."""
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
    """DeepEMhancer's ``-p``: its default, tightTarget, is demhx's default model."""
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
                             f"missing IN; usage: {SEVERAL} [options], {_SEE_HELP}")
    elif len(paths) != 2:
        usage = f"usage: {PROGRAM} IN OUT [options], or"
        raise UsageError(f"unexpected extra argument {paths[2]!r}; {usage} for several maps "
                         f"{SEVERAL} [options]; {_SEE_HELP}" if paths[2:] else
                         f"missing {'OUT' if paths else 'IN'}; {usage} {SEVERAL} [options]; "
                         f"{_SEE_HELP}")
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
    """An option's text as its field's value (the voxel size as (z, y, x))."""
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


_OPTION_LINES = "\n".join(f"  {_flag(option.name) + ' ' + (option.metadata['metavar'] or ''):<20}"
                          f"{option.metadata['help']}" for option in _OPTIONS)
USAGE = (f"usage: {PROGRAM} IN OUT [options]\n"
         f"       {PROGRAM} IN [IN ...] (--out-dir DIR | --suffix SUF | both) [--shard K/N] "
         "[options]")
HELP = f"""{USAGE}

Locally sharpen and mask a cryo-EM map (DeepEMhancer method) on ONNX Runtime. IN is a map or
the first half-map (MRC, also gzip/bzip2), OUT a float32 MRC with IN's header. With --out-dir
or --suffix: any number of maps, one model load, a table at the end.

options:
{_OPTION_LINES}
  --version           print the version and exit
  -h, --help          show this help and exit

shipped models (--model NAME):

DeepEMhancer's flags, with the same meaning: -i, --inputMap IN; -o, --outputMap OUT;
-i2, --halfMap2 (--half2); -s, --samplingRate (--voxel-size); --noiseStats M S;
-m, --binaryMask (--mask); -b, --batch_size (--batch-size); -g, --gpuIds IDS (--device
cuda:IDS, -1: cpu); -p, --processingType tightTarget (the default model).

Options are matched exactly. Exit status: 0 done, 2 usage or input error, 1 failure (or a
failed map), 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP. Details: the README's "Command line".
"""
_MODELS = "shipped models (--model NAME):\n"


def help_text(folder: Path | None = None) -> str:
    """:data:`HELP` with the models of the registry in ``folder`` (default: those shipped)."""
    from demhx import model

    folder = folder or model.models_dir()
    registry = model.load_registry(folder)
    titles = {name: f"{name} (default)" if name == registry["default"] else name
              for name in registry["models"]}
    width = max([_NAME_WIDTH, *(len(title) + 2 for title in titles.values())])
    lines = [f"  {titles[name]:<{width}}{model.describe(folder, entry)}\n"
             for name, entry in registry["models"].items()]
    return HELP.replace(_MODELS, _MODELS + "".join(lines or ["  none; pass --model PATH.onnx\n"]))


def main(args: list[str], watch: _signals.OutputWatch) -> int:
    """Run the command line ``args``; returns the exit status. Errors become one line and a
    status; a signal's interruption propagates, for :func:`demhx.cli.main` to report."""
    if any(arg in HELP_OPTIONS for arg in args):
        sys.stdout.write(help_text())
        return 0
    if "--version" in args:
        from demhx import __version__

        sys.stdout.write(f"{PROGRAM} {__version__}\n")
        return 0
    try:
        arguments = parse_arguments(args)
        with _console(arguments):
            return (_run_many if arguments.batch else _run)(arguments, watch)
    except Exception as error:  # every failure becomes one line and an exit status
        _signals.raise_taken()  # a signal's exception, turned into this error on its way
        return _report(error, "--debug" in args)


def _run(args: Arguments, watch: _signals.OutputWatch) -> int:
    """Enhance IN into OUT (and the preview), with progress and a summary unless quiet."""
    picture = _preview_path(args)  # checked before the run; None without --preview
    watch.watch([args.confidence, args.output, picture])
    bar = ProgressBar(enabled=False if args.quiet else None)
    try:
        summary = _enhancer(args).process_file(
            args.input, str(args.output), _options(args, bar), half2=args.half2,
            voxel_size=args.voxel_size, mask=args.mask, confidence=args.confidence,
            overwrite=args.overwrite)
    finally:
        bar.close()
    LOG.info(summary.line())
    if picture is not None:
        from demhx.preview import write_file_preview

        picture.parent.mkdir(parents=True, exist_ok=True)  # a --preview folder
        write_file_preview(args.input, str(args.output), picture, half2=args.half2,
                           voxel_size=args.voxel_size, overwrite=args.overwrite)
        LOG.info(f"wrote preview {picture}")
    _signals.raise_taken()  # a signal whose exception was swallowed on its way
    return 0


def _enhancer(args: Arguments) -> Enhancer:
    from demhx import Enhancer

    return Enhancer(args.model, device=args.device, batch_size=args.batch_size,
                    threads=args.threads)


def _options(args: Arguments, bar: ProgressBar) -> EnhanceOptions:
    from demhx import EnhanceOptions

    return EnhanceOptions(noise_stats=args.noise_stats, tiling=args.tiling, tta=args.tta,
                          progress=bar)


def _preview_path(args: Arguments) -> Path | None:
    """The checked ``--preview`` file of the one-map form (None without ``--preview``)."""
    if args.preview is None:
        return None
    from demhx import preview

    inputs = [Path(name).expanduser() for name in (args.input, args.half2, args.mask) if name]
    return preview.checked_preview_path(args.preview, str(args.output), inputs,
                                        args.confidence, args.overwrite)


def _run_many(args: Arguments, watch: _signals.OutputWatch) -> int:
    """Enhance several maps with one model load; a table on stderr; 1 if any map failed."""
    from demhx import batch

    every = [Path(path) for path in (args.input, *args.more_inputs)]
    if args.shard is not None and not batch.shard_indices(len(every), args.shard):
        LOG.info(batch.shard_line(args.shard, 0, len(every)))
        return 0
    plan = batch.plan_maps(every, args.out_dir, args.suffix, args.shard, preview=args.preview,
                           mask=args.mask)  # checked before any work
    watch.watch([*plan.outputs, *(plan.previews or [])])
    results, interrupt = _enhance_many(args, plan)
    _signals.close()  # the outcome is final: a later signal cannot cut the table short
    failed = sum(result.status != batch.OK for result in results)
    if failed or not args.quiet:
        _say(batch.summary_table(results, describe_error))
        if args.shard is not None:
            _say(f"{PROGRAM}: {batch.shard_line(args.shard, len(plan.sources), len(every))}\n")
    if interrupt is not None:
        what = _signals.how_stopped(_signals.signal_name(interrupt))
        _say(f"{PROGRAM}: {what}; only the maps marked ok were written\n")
        return _signals.exit_status(interrupt)
    if failed:
        _say(f"{PROGRAM}: error: {failed} of {len(results)} maps failed; see the table above\n")
    return 1 if failed else 0


def _enhance_many(args: Arguments, plan: MapPlan
                  ) -> tuple[list[MapResult], KeyboardInterrupt | None]:
    """Run the maps of ``plan``, a line each: their results and what interrupted them."""
    from demhx import batch

    bar = ProgressBar(enabled=False if args.quiet else None)

    def said(result: MapResult) -> None:
        bar.close()
        if result.error is not None:
            LOG.info(f"failed: {describe_error(result.error)}")
        elif result.summary is not None:
            LOG.info(result.summary.line())

    enhancer = _enhancer(args)
    _warmup.start()  # numba's set-up while the model loads (a single map starts it itself)
    enhancer.runtime  # noqa: B018 -- loads the model; its errors stop the run here
    try:
        return batch.enhance_many(enhancer, plan, _options(args, bar), voxel_size=args.voxel_size,
                                  mask=args.mask, overwrite=args.overwrite, on_result=said), None
    except batch.BatchInterrupted as stopped:
        return stopped.results, stopped.interrupt
    finally:
        bar.close()


@contextlib.contextmanager
def _console(args: Arguments) -> Iterator[None]:
    """Log lines and warnings as ``demhx: ...`` lines on stderr, options shown as flags."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"{PROGRAM}: %(message)s"))
    saved = LOG.level, LOG.propagate
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG if args.debug else logging.WARNING if args.quiet else
                 logging.INFO)
    LOG.propagate = False
    try:
        with warnings.catch_warnings():  # restores the warning filters and showwarning
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, *where, **more: LOG.warning(
                f"warning: {' '.join(str(message).split())}")
            yield
    finally:
        LOG.removeHandler(handler)
        LOG.setLevel(saved[0])
        LOG.propagate = saved[1]


class _Formatter(logging.Formatter):
    """Log lines with the library's option names shown as flags (:func:`cli_terms`)."""

    def format(self, record: logging.LogRecord) -> str:
        return cli_terms(super().format(record))


def _say(text: str) -> None:
    """Write to stderr; a terminal that hung up (SIGHUP) cannot stop the clean-up."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(cli_terms(text))
        sys.stderr.flush()


def _report(error: BaseException, debug: bool) -> int:
    """Print an error as one line (the traceback first with --debug); its exit status."""
    _signals.close()  # the outcome is final: a signal now cannot cut the line
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    usage = isinstance(error, USAGE_ERRORS)
    tail = "" if usage or debug else " (run with --debug for the traceback)"
    sys.stderr.write(f"{PROGRAM}: error: {describe_error(error)}{tail}\n")
    return 2 if usage else 1
