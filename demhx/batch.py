"""Many maps with one loaded model: output names, and a loop that goes on past a bad map.

:func:`output_paths` names the outputs (in an output folder, with a suffix, or both) and
refuses a plan in which two maps would write one file or an output would replace one of the
inputs; :func:`check_inputs` checks that every input can be read before any map runs.
:func:`plan_maps` checks a run of several maps before any work, and :func:`enhance_many`
runs an :class:`~demhx.pipeline.Enhancer` over its maps: one :class:`MapResult` per map, in
order; a map that fails (unreadable file, refused input, existing output, ...) is reported in
its result and the next map runs; a Ctrl-C (or SIGTERM, SIGHUP) still gives one result per
map, as :class:`BatchInterrupted`.
:func:`summary_table` formats the results as a plain-text table.

Under a cluster job array each job runs its share of the maps: :func:`choose_shard` reads
``--shard K/N`` (else SLURM's ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``) and
:func:`shard_indices` picks the maps of shard K: map i (from 0) belongs to shard i % N + 1.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from demhx import _signals, mrcio
from demhx import preview as preview_module
from demhx.mrcio import OUTPUT_SUFFIXES
from demhx.options import EnhanceOptions, EnhanceSummary, VoxelSize
from demhx.pipeline import Enhancer

__all__ = ["BatchInterrupted", "check_inputs", "choose_shard", "create_folders",
           "enhance_many", "MapPlan", "MapResult", "plan_maps",
           "output_path", "output_paths", "parse_shard", "preview_paths", "Shard",
           "shard_from_environment", "shard_indices", "shard_line", "summary_table"]

LOG = logging.getLogger("demhx")
OK, FAILED, NOT_RUN = "ok", "failed", "not run"
_GZIP = ".gz"
_BZIP2 = ".bz2"  # readable, but outputs are written uncompressed
TASK_ID, TASK_COUNT, TASK_MIN = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                 "SLURM_ARRAY_TASK_MIN")
"""SLURM's job-array variables: this task's id, the array's task count, its smallest id."""
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_SHARD_FIX = "give shard=K/N with 1 <= K <= N (e.g. shard=1/4)"


@dataclass(frozen=True)
class MapResult:
    """What happened to one map of a batch.

    Attributes
    ----------
    source, output : the input map and its output path.
    status : ``"ok"`` (output written), ``"failed"`` or ``"not run"`` (stopped before it).
    error : the exception that stopped the map (None unless failed).
    summary : the run's summary (None unless the map was enhanced).
    preview : the PNG written for the map, if any.
    seconds : wall time spent on the map.
    """

    source: Path
    output: Path
    status: str
    error: BaseException | None = None
    summary: EnhanceSummary | None = None
    preview: Path | None = None
    seconds: float = 0.0

    @property
    def cubes(self) -> int | None:
        """Cubes run through the network (None when the map was not enhanced)."""
        return None if self.summary is None else self.summary.info.cubes.run


@dataclass(frozen=True)
class Shard:
    """One job's share of a several-maps run: shard ``index`` (1-based) of ``count``.

    ``origin`` says where it came from (``shard=`` or the SLURM variables), for messages.
    """

    index: int
    count: int
    origin: str = "shard="


def parse_shard(text: str, origin: str = "shard=") -> Shard:
    """``K/N`` as a :class:`Shard`; ValueError naming ``--shard`` and the fix if malformed,
    N < 1 or K outside 1..N."""
    found = _SHARD.match(text)
    if found is None:
        raise ValueError(f"shard={text!r}: expected K/N, this job's share K of N jobs; "
                         f"{_SHARD_FIX}")
    index, count = int(found.group(1)), int(found.group(2))
    if count < 1:
        raise ValueError(f"shard={text}: N must be at least 1; {_SHARD_FIX}")
    if not 1 <= index <= count:
        raise ValueError(f"shard={text}: K must be between 1 and N = {count}; {_SHARD_FIX}")
    return Shard(index, count, origin)


def shard_from_environment(environ: Mapping[str, str]) -> Shard | None:
    """The shard of a SLURM array task: ``SLURM_ARRAY_TASK_ID`` − ``SLURM_ARRAY_TASK_MIN`` + 1
    (the id itself without MIN) of ``SLURM_ARRAY_TASK_COUNT``; None unless ID and COUNT are
    both set. ValueError naming the variables, ``--shard`` and the fix for bad values.
    """
    if TASK_ID not in environ or TASK_COUNT not in environ:
        return None
    names = [name for name in (TASK_ID, TASK_COUNT, TASK_MIN) if name in environ]
    given = ", ".join(f"{name}={environ[name]}" for name in names)
    fix = "submit a contiguous array (#SBATCH --array=1-N) or pass shard=K/N"
    try:
        task, count = int(environ[TASK_ID]), int(environ[TASK_COUNT])
        first = int(environ[TASK_MIN]) if TASK_MIN in environ else 1
    except ValueError:
        raise ValueError(f"{given}: not whole numbers, so no default for shard=; "
                         f"{fix}") from None
    index = task - first + 1
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"{given}: gives shard={index}/{count}, outside 1..N; {fix}")
    return Shard(index, count, f"{TASK_ID}={environ[TASK_ID]}")


def choose_shard(text: str | None, environ: Mapping[str, str]) -> Shard | None:
    """``--shard`` when given (``text``), else the SLURM array task's shard, else None."""
    if text is not None:
        return parse_shard(text)
    return shard_from_environment(environ)


def shard_indices(total: int, shard: Shard | None) -> list[int]:
    """The indices (from 0, in order) of the maps of ``shard`` among ``total`` maps: map i
    belongs to shard i % N + 1; all of them without a shard."""
    if shard is None:
        return list(range(total))
    return list(range(shard.index - 1, total, shard.count))


def shard_line(shard: Shard, taken: int, total: int) -> str:
    """One line saying which shard runs and how many of the maps it took."""
    where = f"shard {shard.index} of {shard.count} ({shard.origin})"
    if taken == 0:
        return f"{where}: none of the {total} maps falls to it; nothing to do"
    return f"{where}: {taken} of {total} maps"


def output_path(source: str | Path, out_dir: str | Path | None = None,
                suffix: str | None = None) -> Path:
    """One map's output: in ``out_dir`` (else beside the input), ``suffix`` before the extension.

    The MRC extension (``.mrc``, ``.map``, ``.ccp4``) and a ``.gz`` compression are kept;
    ``.bz2`` is dropped (written uncompressed); another extension becomes ``.mrc``:
    ``a.map.gz`` with suffix ``_demhx`` gives ``a_demhx.map.gz``.
    """
    source = Path(source)
    name, compression = source.name, ""
    if name.lower().endswith(_GZIP):
        name, compression = name[:-len(_GZIP)], name[-len(_GZIP):]
    elif name.lower().endswith(_BZIP2):
        name = name[:-len(_BZIP2)]
    extension = Path(name).suffix
    if extension.lower() not in OUTPUT_SUFFIXES:
        extension = ".mrc"
    stem = Path(name).stem
    folder = source.parent if out_dir is None else Path(out_dir).expanduser()
    return folder / f"{stem}{suffix or ''}{extension}{compression}"


def output_paths(sources: Sequence[str | Path], out_dir: str | Path | None = None,
                 suffix: str | None = None) -> list[Path]:
    """The outputs of several maps (see :func:`output_path`), checked before any work.

    Raises
    ------
    ValueError
        No output folder or suffix, an empty suffix, two maps with one output, or an output
        that is one of the inputs (inputs are never overwritten).
    NotADirectoryError
        ``out_dir`` exists and is not a folder.
    """
    if out_dir is None and suffix is None:
        raise ValueError("several maps need out_dir=DIR or suffix=SUF to name the outputs")
    if suffix is not None and not suffix.strip():
        raise ValueError("suffix= is empty; give text to add to the names, e.g. _demhx")
    if suffix is not None and _leaves_folder(suffix):
        raise ValueError(f"suffix={suffix}: holds a path separator or '..', which would write "
                         "outside the input's folder; give plain text to add to the names, "
                         "e.g. _demhx, and out_dir=DIR to write elsewhere")
    if out_dir is not None and Path(out_dir).expanduser().exists() and not Path(
            out_dir).expanduser().is_dir():
        raise NotADirectoryError(f"{out_dir}: out_dir= is a file, not a folder; choose a "
                                 "folder")
    paths = [Path(source) for source in sources]
    outputs = [output_path(path, out_dir, suffix) for path in paths]
    _check_distinct(paths, outputs, "output")
    inputs = {_key(path): path for path in paths}
    for source, output in zip(paths, outputs, strict=True):
        if _key(output) in inputs:
            raise ValueError(f"{output}: output of {source} is the input "
                             f"{inputs[_key(output)]}; inputs are never overwritten, "
                             "choose another out_dir= or suffix=")
    return outputs


def preview_paths(preview: str | Path, sources: Sequence[Path], outputs: Sequence[Path]
                  ) -> list[Path]:
    """Where ``--preview PATH`` writes each map's picture (see
    :func:`demhx.preview.preview_file_path`); a ``.png`` PATH is for one map only.
    """
    if len(outputs) > 1 and Path(preview).suffix.lower() == ".png":
        raise ValueError(f"preview={preview}: with several maps give a folder, in which "
                         "<output stem>.png is written for each map")
    previews = [preview_module.preview_file_path(preview, output) for output in outputs]
    _check_distinct(list(sources), previews, "preview")
    return previews


def create_folders(paths: Sequence[Path]) -> None:
    """Create the folders that will hold ``paths`` (output and preview folders).

    Raises
    ------
    PermissionError
        A folder cannot be created or written (read-only file system, permissions): a usage
        error, as for the output folder of one map.
    NotADirectoryError
        A path on the way is a file.
    """
    for folder in sorted({path.parent for path in paths}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"{folder}: is a file (or lies under one), not a folder; "
                                     "choose another out_dir=") from None
        except OSError as error:
            raise PermissionError(f"{folder}: output folder cannot be created "
                                  f"({(error.strerror or str(error)).lower()}); choose another "
                                  "out_dir= or check its permissions") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder}: output folder is not writable; check its "
                                  "permissions or choose another out_dir=")


def check_inputs(sources: Sequence[str | Path]) -> None:
    """Check every input map can be read (see :func:`demhx.mrcio.check_map_file`) before
    any of them runs.

    Raises
    ------
    FileNotFoundError, PermissionError, IsADirectoryError, ValueError
        One input cannot be read: its own error. Several: a ValueError naming each of them.
    """
    problems: list[Exception] = []
    for source in sources:
        try:
            mrcio.check_map_file(source)
        except (OSError, ValueError) as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        reasons = "; ".join(_reason(error) for error in problems)
        raise ValueError(f"{len(problems)} of {len(sources)} input maps cannot be read, so "
                         f"none was run: {reasons}")


def _reason(error: Exception) -> str:
    """An input's error as ``file: reason`` (operating-system errors carry the file apart)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.filename}: {error.strerror.lower()}"
    return str(error)


@dataclass(frozen=True)
class MapPlan:
    """This job's share of several maps: inputs, outputs and previews (None without)."""

    sources: list[Path]
    outputs: list[Path]
    previews: list[Path] | None


def plan_maps(sources: Sequence[Path], out_dir: str | Path | None, suffix: str | None,
              shard: Shard | None = None, *, preview: str | Path | None = None,
              mask: str | Path | None = None) -> MapPlan:
    """This job's share of ``sources`` (:func:`shard_indices`), checked before any work.

    Every map's output (and preview) is named from all the sources, so that names clash or
    not whatever the shard; this job's inputs are checked (:func:`check_inputs`), and every
    file it writes is within the system's limits and is none of the inputs (nor ``mask``)
    nor another's file; with ``preview``, matplotlib must be installed.
    """
    if preview is not None:
        preview_module.require_matplotlib()
    share = shard_indices(len(sources), shard)
    check_inputs([sources[index] for index in share])
    outputs = output_paths(sources, out_dir, suffix)
    previews = (None if preview is None else
                [preview_paths(preview, list(sources), outputs)[index] for index in share])
    outputs = [outputs[index] for index in share]
    written = [("output", path) for path in outputs]
    written += [("preview", path) for path in previews or []]
    for kind, path in written:
        mrcio.check_path_limits(path, kind)
    mrcio.check_distinct_outputs(written, [*sources, *([Path(mask)] if mask else [])])
    return MapPlan([sources[index] for index in share], outputs, previews)


class BatchInterrupted(KeyboardInterrupt):
    """A run of :func:`enhance_many` stopped by Ctrl-C (or SIGTERM, SIGHUP).

    ``results`` has one :class:`MapResult` per map of the plan: those finished, then the map
    under way (``"ok"`` if its output was already in place) and the maps not reached, marked
    ``"not run"``. ``interrupt`` is the interruption itself (for its signal).
    """

    def __init__(self, results: list[MapResult], interrupt: KeyboardInterrupt) -> None:
        super().__init__(*interrupt.args)
        self.results = results
        self.interrupt = interrupt


def enhance_many(enhancer: Enhancer, plan: MapPlan, options: EnhanceOptions | None = None, *,
                 voxel_size: VoxelSize | None = None, mask: str | Path | None = None,
                 overwrite: bool = False, on_result: Callable[[MapResult], object] | None = None
                 ) -> list[MapResult]:
    """Enhance every map of ``plan`` (:func:`plan_maps`) with one model, its output and preview
    folders created first; one :class:`MapResult` per map, in order.

    A map that raises an ``Exception`` is reported as failed and the next one runs.
    ``options`` apply to every map; ``voxel_size``, ``mask`` and ``overwrite`` as for
    :meth:`demhx.pipeline.Enhancer.process_file`; the plan's previews (one PNG per map) are
    written after each output (:func:`demhx.preview.write_file_preview`). ``on_result`` is
    called with each result as its map finishes. Raises :class:`BatchInterrupted`, holding
    every map's result, when the run is interrupted: also when a signal taken while a map ran
    was turned into that map's error on its way.
    """
    if len(plan.outputs) != len(plan.sources) or (
            plan.previews is not None and len(plan.previews) != len(plan.sources)):
        raise ValueError("enhance_many: give one output (and one preview) per source map")
    create_folders([*plan.outputs, *(plan.previews or [])])
    watch = _signals.OutputWatch()  # tells whether the map under way was written
    watch.watch(plan.outputs)
    # The device line once, before the first map; the pipeline's copy for each map is dropped.
    device_line = enhancer.runtime.description
    LOG.info(device_line)
    repeated = _DropMessage(device_line)
    LOG.addFilter(repeated)
    results: list[MapResult] = []
    try:
        for result in _enhance_each(enhancer, plan, options or EnhanceOptions(),
                                    voxel_size=voxel_size, mask=mask, overwrite=overwrite):
            if result.error is None or _signals.taken() is None:
                results.append(result)  # (a map whose error was a signal's is not counted)
            _signals.raise_taken()
            if on_result is not None:
                on_result(result)
    except KeyboardInterrupt as interrupt:
        results += [MapResult(source, output, OK if watch.changed(output) else NOT_RUN)
                    for source, output in list(zip(plan.sources, plan.outputs,
                                                   strict=True))[len(results):]]
        raise BatchInterrupted(results, interrupt) from interrupt
    finally:
        LOG.removeFilter(repeated)
    return results


class _DropMessage(logging.Filter):
    """Drops log records whose message is one given line."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def _enhance_each(enhancer: Enhancer, plan: MapPlan, options: EnhanceOptions, *,
                  voxel_size: VoxelSize | None, mask: str | Path | None, overwrite: bool
                  ) -> Iterator[MapResult]:
    """The loop of :func:`enhance_many`: one result per map as it finishes, failures
    included."""
    sources, outputs, previews = plan.sources, plan.outputs, plan.previews
    for index, (source, output) in enumerate(zip(sources, outputs, strict=True)):
        start = time.perf_counter()
        picture = None if previews is None else previews[index]
        summary = None
        LOG.info(f"map {index + 1} of {len(sources)}: {source} -> {output}")
        try:
            # Check the preview path first, then enhance and draw.
            if picture is not None:
                preview_module.check_preview_path(picture, overwrite)
            summary = enhancer.process_file(source, output, options, voxel_size=voxel_size,
                                            mask=mask, overwrite=overwrite)
            if picture is not None:
                preview_module.write_file_preview(source, output, picture,
                                                  voxel_size=voxel_size, overwrite=overwrite)
        except Exception as error:  # one bad map does not stop the others
            yield MapResult(Path(source), Path(output), FAILED, error, summary,
                            seconds=time.perf_counter() - start)
        else:
            yield MapResult(Path(source), Path(output), OK, None, summary, picture,
                            time.perf_counter() - start)


def summary_table(results: Sequence[MapResult],
                  describe: Callable[[BaseException], str] = str) -> str:
    """A plain-text table, one row per map: input, output, status, cubes, seconds, reason."""
    header = ("input", "output", "status", "cubes", "seconds", "reason")
    rows = [header] + [
        (str(r.source), str(r.output), r.status, "-" if r.cubes is None else str(r.cubes),
         f"{r.seconds:.1f}", "" if r.error is None else describe(r.error)) for r in results]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    numeric = {3, 4}
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if column in numeric else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def _leaves_folder(suffix: str) -> bool:
    """Whether ``suffix`` holds a path separator or ``..`` (it is added to a file name)."""
    separators = [separator for separator in ("/", os.sep, os.altsep) if separator]
    return ".." in suffix or any(separator in suffix for separator in separators)


def _key(path: Path) -> Path:
    """A path's identity for comparisons (absolute, symlinks resolved)."""
    return path.expanduser().resolve()


def _check_distinct(sources: Sequence[Path], paths: Sequence[Path], what: str) -> None:
    """ValueError when two maps would write one file (``what``: output or preview)."""
    seen: dict[Path, int] = {}
    for index, path in enumerate(paths):
        first = seen.setdefault(_key(path), index)
        if first != index:
            raise ValueError(f"{path}: {sources[first]} and {sources[index]} would both write "
                             f"this {what}; give each input once, rename one, or run them "
                             "separately")
