"""The ``demhx`` command's work (see :mod:`demhx.cli`): read the words, run one map or
several, and report on stderr.

:mod:`demhx.cli` starts the process with the signal handlers in place and imports this module
afterwards, so that nothing here (fire, logging, the pipeline) delays them. A run notes its
output files in an :class:`~demhx.cli.OutputWatch` before any work, so that a stop line can
say which of them were written.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demhx import _argv, _signals, _warmup
from demhx._arguments import PROGRAM, Arguments, parse_arguments
from demhx._help import help_text
from demhx.errors import _USAGE_ERRORS, cli_terms, describe_error

if TYPE_CHECKING:
    from demhx.batch import MapResult
    from demhx.cli import OutputWatch
    from demhx.options import EnhanceOptions, Progress
    from demhx.pipeline import Enhancer


def main(args: list[str], watch: OutputWatch) -> int:
    """Run the command line ``args``; returns the exit status.

    Errors become one line and a status; a signal's :class:`~demhx._signals.Interrupted`
    propagates (also where code on its way turned it into another error), for the caller
    to report.
    """
    if any(arg in _argv.HELP_OPTIONS for arg in args):
        sys.stdout.write(help_text())
        return 0
    if "--version" in args:
        from demhx import __version__

        sys.stdout.write(f"{PROGRAM} {__version__}\n")
        return 0
    debug = "--debug" in args
    try:
        return _run(parse_arguments(args), watch)
    except Exception as error:  # every failure becomes one line and an exit status
        _signals.raise_taken()  # a signal's exception, turned into this error on its way
        return _report(error, debug)


def _run(args: Arguments, watch: OutputWatch) -> int:
    """Enhance IN into OUT, with progress and a summary on stderr unless quiet.

    ``watch`` notes OUT (and the confidence map and preview) before any work.
    """
    if args.batch:
        return _run_many(args, watch)
    from demhx._progress import ProgressBar
    from demhx.pipeline import Enhancer

    picture = _preview_path(args)  # checked before the run; None without --preview
    watch.watch([args.confidence, args.output, picture])
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
        logging.getLogger(PROGRAM).info(summary.line())
        if picture is not None:
            from demhx.preview import write_file_preview

            picture.parent.mkdir(parents=True, exist_ok=True)  # a --preview folder
            write_file_preview(args.input, str(args.output), picture, half2=args.half2,
                               voxel_size=args.voxel_size, overwrite=args.overwrite)
            logging.getLogger(PROGRAM).info(f"wrote preview {picture}")
    _signals.raise_taken()  # a signal whose exception was swallowed on its way
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
        raise _argv.UsageError(str(error)) from None


def _run_many(args: Arguments, watch: OutputWatch) -> int:
    """Enhance several maps with one model load; a table on stderr; 1 if any map failed."""
    from demhx import batch
    from demhx.pipeline import Enhancer

    planned = _plan_many(args)
    if planned is None:  # this job's shard has no maps
        return 0
    sources, outputs, previews, total = planned
    watch.watch([*outputs, *(previews or [])])
    enhancer = Enhancer(args.model, device=args.device, batch_size=args.batch_size,
                        threads=args.threads)
    with _console(args.quiet, args.debug):
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
                  outputs: list[Path], previews: list[Path] | None, watch: OutputWatch
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


def _say(text: str) -> None:
    """Write to stderr; a terminal that hung up (SIGHUP) cannot stop the clean-up."""
    try:
        sys.stderr.write(cli_terms(text))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _report(error: BaseException, debug: bool) -> int:
    """Print an error as one line (with the traceback first when debugging); its exit status.

    The outcome is final from here: a signal now is ignored rather than cutting the line.
    """
    _signals.close()
    usage = isinstance(error, _USAGE_ERRORS)
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    message = describe_error(error)
    if not usage and not debug:
        message += " (run with --debug for the traceback)"
    sys.stderr.write(f"{PROGRAM}: error: {message}\n")
    return 2 if usage else 1
