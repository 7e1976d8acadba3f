"""The ``demhx`` command: parse the arguments (with fire), call :func:`demhx.enhance_file`, report.

Exit status: 0 on success, 2 for usage and input errors (bad option, missing or invalid
file, existing output, unknown model, CUDA unavailable), 1 for failures while running,
130 when interrupted. Errors are one line on stderr, ``demhx: error: <message>``; the
traceback is shown only with ``--debug``. Progress, the device line and the summary go to
stderr too (hidden by ``--quiet``); warnings always print as ``demhx: warning: <message>``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

PROGRAM = "demhx"
USAGE = ("usage: demhx IN OUT [--half2 H2] [--model NAME|PATH] [--device auto|cpu|cuda|cuda:N]\n"
         "             [--batch-size N] [--threads N] [--tiling default|reference]\n"
         "             [--voxel-size A | --voxel-size X,Y,Z] [--noise-stats MEAN,STD]\n"
         "             [--mask PATH] [--overwrite] [--quiet] [--debug] [--version]")
HELP = USAGE + """

Locally sharpen and mask a cryo-EM map (DeepEMhancer method) on ONNX Runtime.

positional arguments:
  IN                    input map (.mrc, .map, .map.gz), or the first half-map
  OUT                   output map (float32 MRC, input header kept); must not exist
                        unless --overwrite

options:
  --half2 H2            second half-map; averaged with IN in float32 (recommended)
  --model NAME|PATH     registered model name or an ONNX file (default: the default model)
  --device DEV          auto (CUDA when usable, else CPU), cpu, cuda or cuda:N
  --batch-size N        cubes per inference call (default: 1 on CPU, from GPU memory on CUDA)
  --threads N           CPU threads for inference (default: all physical cores)
  --tiling SCHEME       default: stride cube/2, blended, solvent cubes skipped;
                        reference: the paper's stride 16 with plain averaging (slow)
  --voxel-size A        voxel size in Å, one value or X,Y,Z; overrides the header
  --noise-stats M,S     solvent noise mean and standard deviation of IN (skips estimation)
  --mask PATH           binary mask on IN's grid: normalise from the density inside it
  --overwrite           replace OUT if it exists
  --quiet               no progress bar, device line or summary (warnings still print)
  --debug               show the traceback of errors
  --version             print the version and exit
  -h, --help            show this help and exit
"""
_FLAGS = ("overwrite", "quiet", "debug", "version")
_VALUED = ("half2", "model", "device", "batch_size", "threads", "tiling", "voxel_size",
           "noise_stats", "mask")
_USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                 IsADirectoryError, NotADirectoryError)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class UsageError(ValueError):
    """The command line itself is wrong (unknown option, missing argument, bad value)."""


@dataclass(frozen=True)
class Arguments:
    """The parsed command line, values converted and checked."""

    input: str
    output: str
    half2: str | None = None
    model: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    threads: int | None = None
    tiling: str = "default"
    voxel_size: tuple[float, float, float] | None = None
    noise_stats: tuple[float, float] | None = None
    mask: str | None = None
    overwrite: bool = False
    quiet: bool = False
    debug: bool = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help", "-help") for arg in args):
        sys.stdout.write(HELP)
        return 0
    if "--version" in args:
        from demhx import __version__

        sys.stdout.write(f"{PROGRAM} {__version__}\n")
        return 0
    debug = "--debug" in args
    try:
        return _run(parse_arguments(args))
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROGRAM}: interrupted; no output written\n")
        return 130
    except Exception as error:  # every failure becomes one line and an exit status
        return _report(error, debug)


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """Parse the command line with fire into checked :class:`Arguments`; UsageError if wrong."""
    import fire
    from fire.decorators import SetParseFns

    captured: list[dict[str, Any]] = []

    @SetParseFns(input=str, output=str, **{name: str for name in _VALUED})
    def command(input: str, output: str, *, half2: str | None = None, model: str | None = None,
                device: str = "auto", batch_size: str | None = None, threads: str | None = None,
                tiling: str = "default", voxel_size: str | None = None,
                noise_stats: str | None = None, mask: str | None = None,
                overwrite: bool = False, quiet: bool = False, debug: bool = False) -> None:
        captured.append(dict(locals()))

    messages = io.StringIO()
    try:
        with contextlib.redirect_stdout(messages), contextlib.redirect_stderr(messages):
            fire.Fire(command, command=_fire_argv(argv) + ["--"], name=PROGRAM)
    except fire.core.FireExit:
        raise UsageError(_fire_error(messages.getvalue())) from None
    if not captured:
        raise UsageError(f"could not read the arguments; see {PROGRAM} --help")
    return _convert(captured[0])


def _fire_argv(argv: Sequence[str]) -> list[str]:
    """Spell every option as ``--name=value`` so fire binds values like a usual command line.

    Flags take no value (``--quiet``); ``--noise-stats MEAN STD`` is accepted as two values.
    """
    result: list[str] = []
    queue = list(argv)
    while queue:
        arg = queue.pop(0)
        name = arg[2:].replace("-", "_") if arg.startswith("--") and "=" not in arg else ""
        if arg == "-q" or name in _FLAGS:
            result.append(f"--{name or 'quiet'}=True")
        elif name in _VALUED:
            if not queue or queue[0].startswith("--"):
                raise UsageError(f"{arg} needs a value; see {PROGRAM} --help")
            value = queue.pop(0)
            if name == "noise_stats" and "," not in value and queue and _NUMBER.match(queue[0]):
                value += "," + queue.pop(0)
            result.append(f"--{name}={value}")
        else:
            result.append(arg)
    return result


def _fire_error(text: str) -> str:
    """fire's error text as one line that says what to do."""
    found = re.search(r"ERROR: (.*)", _ANSI.sub("", text))
    message = found.group(1).strip() if found else "could not read the arguments"
    consumed = re.match(r"Could not consume arg: (.*)", message)
    if consumed:
        arg = consumed.group(1)
        if arg.startswith("-"):
            return f"unknown option {arg.split('=')[0]}; see {PROGRAM} --help"
        return (f"unexpected extra argument {arg!r}; usage: {PROGRAM} IN OUT [options], "
                f"see {PROGRAM} --help")
    missing = re.search(r"required argument: (\w+)", message)
    if missing:
        name = {"input": "IN", "output": "OUT"}.get(missing.group(1), missing.group(1))
        return f"missing {name}; usage: {PROGRAM} IN OUT [options], see {PROGRAM} --help"
    return f"{message}; see {PROGRAM} --help"


def _convert(raw: dict[str, Any]) -> Arguments:
    """Check and convert fire's strings into typed :class:`Arguments`."""
    return Arguments(
        input=str(raw["input"]), output=str(raw["output"]),
        half2=raw["half2"], model=raw["model"], device=str(raw["device"]),
        batch_size=_positive_int("--batch-size", raw["batch_size"]),
        threads=_positive_int("--threads", raw["threads"]),
        tiling=str(raw["tiling"]),
        voxel_size=_voxel_size(raw["voxel_size"]),
        noise_stats=_noise_stats(raw["noise_stats"]),
        mask=raw["mask"],
        **{name: _flag(name, raw[name]) for name in ("overwrite", "quiet", "debug")},
    )


def _positive_int(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{option} {text!r}: must be a positive integer")
    return value


def _floats(option: str, text: str, count: Sequence[int], form: str) -> list[float]:
    parts = [part for part in re.split(r"[,\s]+", text.strip().strip("()[]")) if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in count:
        raise UsageError(f"{option} {text!r}: expected {form}")
    return values


def _voxel_size(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    values = _floats("--voxel-size", text, (1, 3), "one value in Å or three, X,Y,Z")
    if len(values) == 1:
        values *= 3
    x, y, z = values
    return z, y, x


def _noise_stats(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    mean, std = _floats("--noise-stats", text, (2,), "two values, MEAN,STD")
    return mean, std


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise UsageError(f"--{name} takes no value (got {value!r})")


def _run(args: Arguments) -> int:
    """Enhance IN into OUT, with progress and a summary on stderr unless quiet."""
    from demhx._progress import ProgressBar
    from demhx.pipeline import enhance_file

    bar = ProgressBar(enabled=False if args.quiet else None)
    with _console(args.quiet):
        try:
            summary = enhance_file(
                args.input, args.output, half2=args.half2, voxel_size=args.voxel_size,
                mask=args.mask, noise_stats=args.noise_stats, overwrite=args.overwrite,
                model=args.model, device=args.device, batch_size=args.batch_size,
                threads=args.threads, tiling=args.tiling, progress=bar)
        finally:
            bar.close()
        logging.getLogger(PROGRAM).info(summary.line())
    return 0


@contextlib.contextmanager
def _console(quiet: bool) -> Iterator[None]:
    """Info lines as ``demhx: ...`` (unless quiet) and warnings as one line, on stderr."""
    logger = logging.getLogger(PROGRAM)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROGRAM}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = " ".join(str(message).split())
        sys.stderr.write(f"{PROGRAM}: warning: {text}\n")

    try:
        with warnings.catch_warnings():  # restores the warning filters and showwarning
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _report(error: BaseException, debug: bool) -> int:
    """Print an error as one line (with the traceback first when debugging); its exit status."""
    usage = isinstance(error, _USAGE_ERRORS)
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    message = describe_error(error)
    if not usage and not debug:
        message += " (run with --debug for the traceback)"
    sys.stderr.write(f"{PROGRAM}: error: {message}\n")
    return 2 if usage else 1


def describe_error(error: BaseException) -> str:
    """One line for an exception: its message, or ``file: reason`` for operating-system errors."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.filename}: {error.strerror.lower()}"
        if isinstance(error, PermissionError):
            text += "; check the permissions or choose another path"
    elif isinstance(error, MemoryError):
        text = ("out of memory; try --batch-size 1, fewer --threads, or a machine with more "
                "memory")
    else:
        text = str(error).strip() or type(error).__name__
        if not isinstance(error, (*_USAGE_ERRORS, RuntimeError)):
            text = f"{type(error).__name__}: {text}"
    return " ".join(text.split())[:500]
