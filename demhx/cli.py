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

import atexit
import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from demhx import _argv, _signals, _warmup
from demhx._arguments import PROGRAM, Arguments, parse_arguments
from demhx._argv import UsageError
from demhx._help import HELP, USAGE, help_text
from demhx.errors import _USAGE_ERRORS, cli_terms, describe_error

__all__ = ["HELP", "USAGE", "Arguments", "describe_error", "help_text", "main",
           "parse_arguments", "run"]

if TYPE_CHECKING:
    from demhx.batch import MapResult
    from demhx.options import EnhanceOptions, Progress
    from demhx.pipeline import Enhancer



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


def run() -> NoReturn:
    """The console script (and ``python -m demhx``): :func:`main`, then exit with its status.

    The exit handlers run and the standard streams are flushed, then the process ends without
    the interpreter's teardown, which only frees memory: with numba's registries, ONNX
    Runtime and a map's arrays loaded, that teardown took 0.15 s, a tenth of a 256³ run.
    Every output is complete and closed before :func:`main` returns.
    """
    status = 1
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader of the help or version text stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = status or 1
    atexit._run_exitfuncs()  # logging.shutdown and the others, as a normal exit runs them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a hung-up terminal
            pass
    os._exit(status)


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
        sys.stderr.write(cli_terms(text))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _run(args: Arguments, written: list[str]) -> int:
    """Enhance IN into OUT, with progress and a summary on stderr unless quiet.

    ``written`` collects the files written so far (named if a signal stops the run).
    """
    if args.batch:
        return _run_many(args)
    from demhx._progress import ProgressBar
    from demhx.pipeline import Enhancer

    picture = _preview_path(args)  # checked before the run; None without --preview
    bar = ProgressBar(enabled=False if args.quiet else None)
    with _console(args.quiet, args.debug):
        try:
            enhancer = Enhancer(args.model, device=args.device, batch_size=args.batch_size,
                                threads=args.threads)
            summary = enhancer.process_file(
                args.input, str(args.output), _options(args, bar), half2=args.half2,
                voxel_size=args.voxel_size, mask=args.mask, confidence=args.confidence,
                overwrite=args.overwrite)
        finally:
            bar.close()
        written += [str(path) for path in (summary.confidence, summary.output) if path]
        logging.getLogger(PROGRAM).info(summary.line())
        if picture is not None:
            from demhx.preview import write_file_preview

            picture.parent.mkdir(parents=True, exist_ok=True)  # a --preview folder
            write_file_preview(args.input, str(args.output), picture, half2=args.half2,
                               voxel_size=args.voxel_size, overwrite=args.overwrite)
            logging.getLogger(PROGRAM).info(f"wrote preview {picture}")
    return 0


def _options(args: Arguments, progress: Progress) -> EnhanceOptions:
    """The run's options from the command line (checked as the API checks them)."""
    from demhx.options import EnhanceOptions

    return EnhanceOptions(noise_stats=args.noise_stats, tiling=args.tiling, tta=args.tta,
                          progress=progress)


def _preview_path(args: Arguments) -> Path | None:
    """The checked ``--preview`` file of the one-map form: not an input nor another output,
    nor in a folder named like one; a ``--preview`` folder that does not exist is created
    only when the picture is written."""
    if args.preview is None:
        return None
    from demhx import mrcio, preview

    _require_matplotlib()
    path = preview.preview_file_path(args.preview, str(args.output))
    inputs = [Path(name).expanduser() for name in (args.input, args.half2, args.mask)
              if name is not None]
    written = [("output", Path(str(args.output)).expanduser()), ("preview", path)]
    if args.confidence is not None:
        written.append(("confidence map", Path(args.confidence).expanduser()))
    mrcio.check_path_limits(path, "preview")
    mrcio.check_distinct_outputs(written, inputs)
    if Path(args.preview).suffix.lower() == ".png" or path.parent.is_dir():
        return preview.check_preview_path(path, args.overwrite)
    mrcio.check_folder_to_create(path.parent, "preview")
    return path


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
        _warmup.start()  # numba's set-up while the model loads (a single map starts it itself)
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
    from demhx import batch, mrcio

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
    outputs = [outputs[index] for index in share]
    # Every file written: within the system's limits, none an input or another's file.
    written = [("output", path) for path in outputs]
    written += [("preview", path) for path in previews or []]
    for kind, path in written:
        mrcio.check_path_limits(path, kind)
    mrcio.check_distinct_outputs(written, [*every, *([Path(args.mask)] if args.mask else [])])
    return sources, outputs, previews, len(every)


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
                enhancer, sources, outputs, _options(args, bar), previews=previews,
                voxel_size=args.voxel_size, mask=args.mask, overwrite=args.overwrite):
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
    handler.setFormatter(_Formatter(f"{PROGRAM}: %(message)s"))
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


class _Formatter(logging.Formatter):
    """Log lines with the library's option names shown as flags (:func:`cli_terms`)."""

    def format(self, record: logging.LogRecord) -> str:
        return cli_terms(super().format(record))


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


