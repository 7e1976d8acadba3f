"""The ``demhx`` command: parse the arguments (with fire), call :func:`demhx.enhance_file`, report.

Exit status: 0 on success, 2 for usage and input errors (bad option, missing or invalid
file, existing output, unknown model, CUDA unavailable), 1 for failures while running,
128 + the signal's number when stopped by a signal: 130 for Ctrl-C (SIGINT), 143 for
SIGTERM, 129 for SIGHUP; every temporary file is removed and nothing is half-written.
Errors are one line on stderr, ``demhx: error: <message>``; the traceback is shown only with
``--debug``. Options are matched exactly (fire's prefix matching is not used; see
:mod:`demhx._argv`), and DeepEMhancer's flags are accepted where they mean the same.
Progress, the device line and the summary go to stderr too (hidden by ``--quiet``); warnings
always print as ``demhx: warning: <message>``.

Several maps (``demhx IN... --out-dir DIR`` or ``--suffix SUF``) run with one model load and
go on past a map that fails; a table (one row per map) ends the run on stderr, and the exit
status is 1 if any map failed. Under a job array (``--shard K/N``, else SLURM's array
variables) only this job's share of the maps runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demhx import _argv, _signals
from demhx._argv import UsageError
from demhx.errors import cli_terms

if TYPE_CHECKING:
    from demhx.batch import MapResult, Shard
    from demhx.pipeline import Enhancer

PROGRAM = "demhx"
USAGE = ("usage: demhx IN OUT [--half2 H2] [--model NAME|PATH] [--device auto|cpu|cuda|cuda:N]\n"
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
  --device DEV          auto (CUDA when usable, else CPU), cpu, cuda or cuda:N
  --batch-size N        cubes per inference call (default: 1 on CPU, from GPU memory on CUDA)
  --threads N           CPU threads for inference (default: all physical cores)
  --tiling SCHEME       default: the reference's cubes thinned to gaps <= 3/4 cube, solvent
                        cubes skipped, more of them added while overlapping cubes disagree
                        (predicted CC to the reference below 0.993);
                        fast: the default's first cubes only (no cubes added);
                        reference: the paper's stride 16 with plain averaging (slow)
  --voxel-size A        voxel size in Å, one value or X,Y,Z; overrides the header
  --noise-stats M,S     solvent noise mean and standard deviation of IN (skips estimation)
  --mask PATH           binary mask on IN's grid: normalise from the density inside it
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
  -g, --gpuIds ID       --device cuda:ID (-1: --device cpu; one GPU per run)
  -p, --processingType tightTarget       --model tight (no wideTarget or highRes model is
                        shipped: convert DeepEMhancer's file with demhx-export from-keras)
  --deepLearningModelPath and --cleaningStrengh are refused with what to use instead.

Exit status: 0 done, 2 usage or input error, 1 failure while running (or any of several
maps failed), 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (nothing half-written is left behind).
"""
_HELP_MODELS_AFTER = "  -h, --help            show this help and exit\n"
"""The help lists the shipped models after this line."""
_NAME_WIDTH = 18  # columns of the model-name column in the help's model list
_USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                 IsADirectoryError, NotADirectoryError)
_ONE_MAP_ONLY = {
    "half2": ("--half2 does not combine with several inputs, --out-dir or --suffix; run "
              "demhx H1 OUT --half2 H2 for each pair of half-maps"),
    "noise_stats": ("--noise-stats gives one map's solvent noise, not several; leave it out "
                    "(estimated per map) or run each map on its own"),
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Arguments:
    """The parsed command line, values converted and checked.

    ``input`` is the (first) input map; ``output`` is OUT, or None with ``--out-dir`` or
    ``--suffix`` (:attr:`batch`), where ``more_inputs`` holds the other input maps and
    ``shard`` this job's share of them (None: all).
    """

    input: str
    output: str | None
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
    more_inputs: tuple[str, ...] = ()
    out_dir: str | None = None
    suffix: str | None = None
    shard: Shard | None = None
    preview: str | None = None
    confidence: str | None = None
    tta: int | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """All input maps, in order."""
        return (self.input, *self.more_inputs)

    @property
    def batch(self) -> bool:
        """Whether outputs are named by ``--out-dir``/``--suffix`` (any number of inputs)."""
        return self.out_dir is not None or self.suffix is not None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in _argv.HELP_OPTIONS for arg in args):
        sys.stdout.write(help_text())
        return 0
    if "--version" in args:
        from demhx import __version__

        sys.stdout.write(f"{PROGRAM} {__version__}\n")
        return 0
    debug = "--debug" in args
    written: list[str] = []
    with _signals.handled():  # SIGTERM and SIGHUP stop the run as Ctrl-C does
        try:
            return _run(parse_arguments(args), written)
        except KeyboardInterrupt as interrupt:
            return _interrupted(interrupt, written)
        except Exception as error:  # every failure becomes one line and an exit status
            return _report(error, debug)


def help_text(folder: Path | None = None) -> str:
    """:data:`HELP` with the shipped models, read now from the registry in ``folder`` (default:
    the installed models), one line each and the default marked."""
    from demhx import model

    folder = folder or model.models_dir()
    registry = model.load_registry(folder)
    lines = ["", "shipped models (--model NAME):"]
    titles = {name: f"{name} (default)" if name == registry["default"] else name
              for name in registry["models"]}
    width = max([_NAME_WIDTH, *(len(title) + 2 for title in titles.values())])
    for name, entry in registry["models"].items():
        lines.append(f"  {titles[name]:<{width}}{_describe_model(folder, entry)}")
    if not registry["models"]:
        lines.append("  none; pass --model PATH.onnx")
    return HELP.replace(_HELP_MODELS_AFTER, _HELP_MODELS_AFTER + "\n".join(lines) + "\n", 1)


def _describe_model(folder: Path, entry: dict[str, Any]) -> str:
    """One line about a registered model: its registry description, else its metadata."""
    from demhx import model

    if entry.get("description"):
        return " ".join(str(entry["description"]).split())
    path = folder / str(entry.get("file", ""))
    try:
        metadata = model.read_metadata(path)
    except Exception as error:  # the help still prints when a model cannot be read
        return f"{path.name}: cannot be read ({describe_error(error)[:80]}); reinstall demhx"
    values = {key.removeprefix(model.METADATA_PREFIX): value for key, value in metadata.items()}
    parts = [f"v{values.get('version', '?')}"]
    if "widths" in values:
        parts.append(f"widths {values['widths']}")
    if "parameters" in values:
        parts.append(f"{int(values['parameters']) / 1e6:.2f} M weights")
    cube = values.get("cube_size", "?")
    if "gflop_per_cube" in values:
        parts.append(f"{float(values['gflop_per_cube']):.0f} GFLOP per {cube}³ cube")
    parts.append(f"{values.get('voxel_size', '?')} Å/voxel")
    return ", ".join(parts)


def _interrupted(interrupt: KeyboardInterrupt, written: list[str]) -> int:
    """One line saying what stopped the run and what (if anything) was written."""
    name = _signals.signal_name(interrupt)
    what = "interrupted" if name == "SIGINT" else f"stopped by {name}"
    done = ("no output written" if not written
            else f"{' and '.join(written)} written, nothing else")
    after_echo = "\n" if name == "SIGINT" else ""  # the terminal has just printed ^C
    _say(f"{after_echo}{PROGRAM}: {what}; {done}\n")
    return _signals.exit_status(interrupt)


def _say(text: str) -> None:
    """Write to stderr; a terminal that hung up (SIGHUP) cannot stop the clean-up."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """Parse the command line with fire into checked :class:`Arguments`; UsageError if wrong."""
    import fire
    from fire.decorators import SetParseFn, SetParseFns

    captured: list[dict[str, Any]] = []

    @SetParseFn(str)  # the input and output paths (fire's *varargs) stay text
    @SetParseFns(**{name: str for name in _argv.VALUED})
    def command(*paths: str, half2: str | None = None, model: str | None = None,
                device: str = "auto", batch_size: str | None = None, threads: str | None = None,
                tiling: str = "default", voxel_size: str | None = None,
                noise_stats: str | None = None, mask: str | None = None,
                overwrite: bool = False, quiet: bool = False, debug: bool = False,
                out_dir: str | None = None, suffix: str | None = None,
                shard: str | None = None, preview: str | None = None, confidence: str | None = None,
                tta: str | None = None) -> None:
        captured.append(dict(locals()))

    messages = io.StringIO()
    try:
        with contextlib.redirect_stdout(messages), contextlib.redirect_stderr(messages):
            fire.Fire(command, command=_argv.fire_argv(argv) + ["--"], name=PROGRAM)
    except fire.core.FireExit:
        raise UsageError(_fire_error(messages.getvalue())) from None
    if not captured:
        raise UsageError(f"could not read the arguments; see {PROGRAM} --help")
    return _convert(captured[0])


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
    paths = _paths(raw)
    batch = raw["out_dir"] is not None or raw["suffix"] is not None
    return Arguments(
        input=paths[0], output=None if batch else paths[1],
        more_inputs=tuple(paths[1:]) if batch else (),
        out_dir=raw["out_dir"], suffix=raw["suffix"], preview=raw["preview"],
        shard=_shard(raw["shard"], batch),
        half2=raw["half2"], model=raw["model"], device=str(raw["device"]),
        batch_size=_positive_int("--batch-size", raw["batch_size"]),
        threads=_positive_int("--threads", raw["threads"]),
        tiling=str(raw["tiling"]),
        voxel_size=_voxel_size(raw["voxel_size"]),
        noise_stats=_noise_stats(raw["noise_stats"]),
        mask=raw["mask"],
        confidence=_one_map_only("--confidence", raw["confidence"], batch),
        tta=_positive_int("--tta", _one_map_only("--tta", raw["tta"], batch)),
        **{name: _flag(name, raw[name]) for name in ("overwrite", "quiet", "debug")},
    )


def _one_map_only(option: str, value: str | None, batch: bool) -> str | None:
    if value is not None and batch:
        raise UsageError(f"{option} works with the one-map form {PROGRAM} IN OUT; run each map "
                         "on its own to get its confidence map")
    return value


def _shard(text: str | None, batch: bool) -> Shard | None:
    """This job's share of several maps: ``--shard``, else SLURM's array variables."""
    if not batch:
        if text is not None:
            raise UsageError(f"--shard {text} shares several maps among jobs; use it with "
                             f"{PROGRAM} IN [IN ...] --out-dir DIR|--suffix SUF, or leave it "
                             "out")
        return None  # one map: a SLURM array's variables do not apply
    from demhx import batch as several

    try:
        return several.choose_shard(text, os.environ)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _paths(raw: dict[str, Any]) -> list[str]:
    """The positional paths: IN OUT, or with --out-dir/--suffix one or more inputs."""
    paths = [str(path) for path in raw["paths"]]
    several = f"{PROGRAM} IN [IN ...] --out-dir DIR|--suffix SUF [options]"
    if raw["out_dir"] is not None or raw["suffix"] is not None:
        if not paths:
            raise UsageError(f"missing IN; usage: {several}, see {PROGRAM} --help")
        for option in ("half2", "noise_stats") if len(paths) > 1 else ("half2",):
            if raw[option] is not None:
                raise UsageError(_ONE_MAP_ONLY[option])
        return paths
    if len(paths) < 2:
        missing = "IN" if not paths else "OUT"
        raise UsageError(f"missing {missing}; usage: {PROGRAM} IN OUT [options], or {several}; "
                         f"see {PROGRAM} --help")
    if len(paths) > 2:
        raise UsageError(f"unexpected extra argument {paths[2]!r}; usage: {PROGRAM} IN OUT "
                         f"[options], or for several maps {several}; see {PROGRAM} --help")
    return paths


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


def _run(args: Arguments, written: list[str]) -> int:
    """Enhance IN into OUT, with progress and a summary on stderr unless quiet.

    ``written`` collects the files written so far (named if a signal stops the run).
    """
    if args.batch:
        return _run_many(args)
    from demhx._progress import ProgressBar
    from demhx.pipeline import enhance_file

    picture = _preview_path(args)  # checked before the run; None without --preview
    bar = ProgressBar(enabled=False if args.quiet else None)
    with _console(args.quiet, args.debug):
        try:
            summary = enhance_file(
                args.input, str(args.output), half2=args.half2, voxel_size=args.voxel_size,
                mask=args.mask, noise_stats=args.noise_stats, overwrite=args.overwrite,
                model=args.model, device=args.device, batch_size=args.batch_size,
                threads=args.threads, tiling=args.tiling, progress=bar,
                confidence=args.confidence, tta=args.tta)
        finally:
            bar.close()
        written += [str(path) for path in (summary.confidence, summary.output) if path]
        logging.getLogger(PROGRAM).info(summary.line())
        if picture is not None:
            from demhx.preview import write_file_preview

            write_file_preview(args.input, str(args.output), picture, half2=args.half2,
                               voxel_size=args.voxel_size, overwrite=args.overwrite)
            logging.getLogger(PROGRAM).info(f"wrote preview {picture}")
    return 0


def _preview_path(args: Arguments) -> Path | None:
    """The checked ``--preview`` file of the one-map form (its folder created if needed)."""
    if args.preview is None:
        return None
    from demhx import preview

    _require_matplotlib()
    path = preview.preview_file_path(args.preview, str(args.output))
    if Path(args.preview).suffix.lower() != ".png":
        path.parent.mkdir(parents=True, exist_ok=True)
    return preview.check_preview_path(path, args.overwrite)


def _require_matplotlib() -> None:
    """UsageError naming the fix when --preview cannot work (before any slow work)."""
    from demhx.preview import require_matplotlib

    try:
        require_matplotlib()
    except ImportError as error:
        raise UsageError(str(error)) from None


def _run_many(args: Arguments) -> int:
    """Enhance several maps with one model load; a table on stderr; 1 if any map failed."""
    from demhx import batch
    from demhx.pipeline import Enhancer

    planned = _plan_many(args)
    if planned is None:  # this job's shard has no maps
        return 0
    sources, outputs, previews, total = planned
    enhancer = Enhancer(args.model, device=args.device, batch_size=args.batch_size,
                        threads=args.threads)
    with _console(args.quiet, args.debug):
        enhancer.runtime  # noqa: B018 -- loads the model; its errors stop the run here
        batch.create_folders(outputs + (previews or []))
        results, interrupt = _enhance_many(args, enhancer, sources, outputs, previews)
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
        sys.stderr.write(f"{PROGRAM}: error: {failed} of {len(results)} maps failed; see the "
                         "table above\n")
    return 1 if failed else 0


def _plan_many(args: Arguments
               ) -> tuple[list[Path], list[Path], list[Path] | None, int] | None:
    """This job's inputs, outputs and previews, checked before any work, and the number of
    maps given; None (after saying so) when its shard has no maps."""
    from demhx import batch

    # Keep this job's share, check its inputs, then name every map's output (and preview)
    # so that names clash or not whatever the shard.
    every = [Path(path) for path in args.inputs]
    share = batch.shard_indices(len(every), args.shard)
    if args.shard is not None and not share:
        with _console(args.quiet, args.debug):
            logging.getLogger(PROGRAM).info(batch.shard_line(args.shard, 0, len(every)))
        return None
    sources = [every[index] for index in share]
    batch.check_inputs(sources)
    outputs = batch.output_paths(every, args.out_dir, args.suffix)
    previews = None
    if args.preview is not None:
        _require_matplotlib()
        previews = [batch.preview_paths(args.preview, every, outputs)[index] for index in share]
    return sources, [outputs[index] for index in share], previews, len(every)


def _enhance_many(args: Arguments, enhancer: Enhancer, sources: list[Path],
                  outputs: list[Path], previews: list[Path] | None
                  ) -> tuple[list[MapResult], KeyboardInterrupt | None]:
    """Run the maps one by one (progress bar, one line each); maps not reached on Ctrl-C
    (or SIGTERM, SIGHUP) are marked not run, and the interruption is returned."""
    from demhx import batch
    from demhx._progress import ProgressBar

    log = logging.getLogger(PROGRAM)
    bar = ProgressBar(enabled=False if args.quiet else None)
    results: list[MapResult] = []
    try:
        for result in batch.enhance_many(
                enhancer, sources, outputs, previews=previews, voxel_size=args.voxel_size,
                mask=args.mask, noise_stats=args.noise_stats, overwrite=args.overwrite,
                tiling=args.tiling, progress=bar):
            bar.close()
            results.append(result)
            if result.error is not None:
                log.info(f"failed: {describe_error(result.error)}")
            elif result.summary is not None:
                log.info(result.summary.line())
    except KeyboardInterrupt as interrupt:
        bar.close()
        done = len(results)
        results += [batch.MapResult(source, output, batch.NOT_RUN)
                    for source, output in zip(sources[done:], outputs[done:], strict=True)]
        return results, interrupt
    return results, None


@contextlib.contextmanager
def _console(quiet: bool, debug: bool = False) -> Iterator[None]:
    """Info lines as ``demhx: ...`` (unless quiet; with ``debug`` also the stage times) and
    warnings as one line, on stderr."""
    logger = logging.getLogger(PROGRAM)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROGRAM}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = " ".join(cli_terms(str(message)).split())
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
    return " ".join(cli_terms(text).split())[:500]
