"""The RELION external job: ``demhx-relion`` runs demhx the way RELION runs external programs.

RELION 4 and 5 start an External job's executable in the project folder as::

    demhx-relion --o External/job012/ --in_3dref MAP [--in_mask MASK]
                 [--LABEL VALUE ...] --j THREADS [additional arguments]

``--o`` is the job's folder; the input nodes follow (RELION offers external jobs movies,
micrographs, particles, coordinates, a 3D reference and a 3D mask, no half-maps); then one
``--LABEL VALUE`` for each filled row of the Params tab, ``--j`` from the Running tab and
the additional arguments, as typed. RELION adds ``--pipeline_control FOLDER`` when the
command's path contains ``relion_``; it is accepted and not needed. The CCP-EM pipeliner's
``relion.external`` job spells the reference ``--in_3Dref``, which is accepted too.

This runs ``demhx MAP <o>/enhanced.mrc [--mask MASK] [--threads THREADS] --overwrite`` with
every other word passed on to demhx as given: half-map 2 as the parameter ``half2`` (label
``half2``, value its path; demhx averages it with the map given as the reference), and any
demhx option the same way (``model``, ``device``, ``tiling``, ``tta``, ``noise-stats``).
The parameter ``confidence`` with an empty value also writes ``<o>/confidence.mrc``. Then it
writes what RELION watches for in ``--o``:

- ``RELION_OUTPUT_NODES.star``, the outputs as pipeline nodes with RELION 4/5 node type
  labels: ``DensityMap.mrc.demhx.enhanced`` (offered wherever RELION asks for a 3D map) and
  ``Image3D.mrc.demhx.confidence`` (a per-voxel spread, like a local-resolution map);
- ``RELION_JOB_EXIT_SUCCESS`` once every output is written; ``RELION_JOB_EXIT_FAILURE``
  when anything fails, with the reason as one line on stderr (RELION's ``run.err``);
  ``RELION_JOB_EXIT_ABORTED`` when RELION's Abort button leaves ``RELION_JOB_ABORT_NOW``
  (the run is stopped and the request removed).

demhx's progress lines (cubes done, seconds elapsed and left) and its summary (cubes,
device, seconds) go to stdout, RELION's ``run.out``; its warnings and errors to stderr. The
enhanced map keeps the input's header: grid, voxel size, origin, nstart and axis order.

Why not fire, the demhx command's parser: RELION's command line is not a call of one
function. The parameters are the user's, for demhx, and must reach it word for word and in
order; fire would bind them to this function's parameters, read values as Python literals
(``0,1`` becomes a tuple) and answer an unknown one with its own usage text, where RELION
needs a failure marker. So the options RELION itself passes are read here with the standard
library, each matched exactly (never by prefix) and given at most once, and all other words
are checked by the demhx command when it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn, cast

__all__ = ["ABORTED_FILE", "ABORT_REQUEST_FILE", "CONFIDENCE_LABEL", "CONFIDENCE_NAME",
           "ENHANCED_LABEL", "ENHANCED_NAME", "FAILURE_FILE", "NODES_FILE", "SUCCESS_FILE",
           "ExternalJob", "demhx_program", "main", "nodes_star", "parse_arguments", "run",
           "run_job"]

PROGRAM = "demhx-relion"
ENHANCED_NAME = "enhanced.mrc"
CONFIDENCE_NAME = "confidence.mrc"
ENHANCED_LABEL = "DensityMap.mrc.demhx.enhanced"
CONFIDENCE_LABEL = "Image3D.mrc.demhx.confidence"
NODES_FILE = "RELION_OUTPUT_NODES.star"
SUCCESS_FILE = "RELION_JOB_EXIT_SUCCESS"
FAILURE_FILE = "RELION_JOB_EXIT_FAILURE"
ABORTED_FILE = "RELION_JOB_EXIT_ABORTED"
ABORT_REQUEST_FILE = "RELION_JOB_ABORT_NOW"
ABORT_POLL_SECONDS = 0.5
"""How often, in seconds, the job's folder is checked for RELION's abort request."""
ABORT_GRACE_SECONDS = 30.0
"""How long, in seconds, demhx may take to stop when asked to, before it is killed."""

USAGE = (f"usage: {PROGRAM} --o FOLDER --in_3dref MAP [--in_mask MASK] [--j THREADS] "
         "[--confidence] [demhx options, e.g. --half2 H2 --model NAME --device DEV]\n"
         "RELION's External job runs this (External executable: demhx-relion); see "
         "README.md, 'From RELION and CCP-EM Doppio'.")

# RELION's options with a value, by the field of ExternalJob they fill.
_VALUE_OPTIONS = {"--o": "output_dir", "--in_3dref": "map", "--in_3Dref": "map",
                  "--in_mask": "mask", "--j": "threads", "--pipeline_control": "control",
                  "--pipeline-control": "control"}
_OTHER_INPUTS = ("--in_movies", "--in_mics", "--in_parts", "--in_coords")
# demhx options this job sets itself, with what to do instead.
_SET_BY_THE_JOB = {
    "--mask": "give the mask as RELION's Input 3D mask (--in_mask)",
    "--threads": "set the threads on RELION's Running tab (--j)",
    "--overwrite": "outputs in the job's folder are always replaced",
    "--out-dir": "the outputs go to the job's folder (--o)",
    "--suffix": "the outputs go to the job's folder (--o)",
}
_NOTICES = ("demhx: error:", "demhx: warning:", "demhx: interrupted", "demhx: stopped")
"""demhx's lines that belong in RELION's run.err: errors, warnings, the stop line."""
_MARKERS = (SUCCESS_FILE, FAILURE_FILE, ABORTED_FILE, ABORT_REQUEST_FILE, NODES_FILE)


@dataclass(frozen=True)
class ExternalJob:
    """One call from RELION.

    Attributes
    ----------
    output_dir : the job's folder as RELION names it (``External/job012/``), relative to
        the project folder, the working directory.
    map : the map to enhance (``--in_3dref``), or half-map 1 with ``--half2`` among
        ``demhx_arguments``.
    mask : the mask (``--in_mask``), or None.
    threads : CPU threads (``--j``), or None for demhx's default.
    confidence : also write the confidence map.
    demhx_arguments : every other word, for demhx, in the order given.
    """

    output_dir: str
    map: str
    mask: str | None = None
    threads: int | None = None
    confidence: bool = False
    demhx_arguments: tuple[str, ...] = ()

    @property
    def enhanced(self) -> str:
        """The enhanced map's path, as RELION names nodes."""
        return os.path.join(self.output_dir, ENHANCED_NAME)

    @property
    def confidence_map(self) -> str | None:
        """The confidence map's path, or None when not asked for."""
        return os.path.join(self.output_dir, CONFIDENCE_NAME) if self.confidence else None

    def outputs(self) -> list[tuple[str, str]]:
        """(path, RELION node type label) of each output."""
        nodes = [(self.enhanced, ENHANCED_LABEL)]
        if self.confidence_map is not None:
            nodes.append((self.confidence_map, CONFIDENCE_LABEL))
        return nodes

    def demhx_words(self) -> list[str]:
        """The demhx command's arguments: the map, the output, the options."""
        words = [self.map, self.enhanced]
        if self.mask is not None:
            words += ["--mask", self.mask]
        if self.threads is not None:
            words += ["--threads", str(self.threads)]
        if self.confidence_map is not None:
            words += ["--confidence", self.confidence_map]
        return [*words, "--overwrite", *self.demhx_arguments]


def parse_arguments(words: Sequence[str]) -> ExternalJob:
    """Read RELION's command line; raise ValueError naming the word and the fix."""
    values: dict[str, str] = {}
    confidence = False
    others: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word in _VALUE_OPTIONS:
            index += 1
            _take_value(values, _VALUE_OPTIONS[word], word, words[index:index + 1])
        elif word == "--confidence":
            if confidence:
                raise ValueError("--confidence is given twice; give it once")
            confidence = True
        elif word in _OTHER_INPUTS:
            raise ValueError(f"{word}: demhx enhances a map; give it as the 3D reference "
                             "(--in_3dref) and leave the other inputs empty")
        elif word in _SET_BY_THE_JOB:
            raise ValueError(f"{word} is set by this job: {_SET_BY_THE_JOB[word]}")
        else:
            others.append(word)
        index += 1
    return _job(values, confidence, tuple(others))


def _take_value(values: dict[str, str], field: str, option: str, value: Sequence[str]) -> None:
    """Store ``option``'s value (the next word) under ``field``, once."""
    if not value or value[0].startswith("--"):
        raise ValueError(f"{option} needs a value")
    if field in values:
        raise ValueError(f"{option} is given twice; give it once")
    values[field] = value[0]


def _job(values: dict[str, str], confidence: bool, others: tuple[str, ...]) -> ExternalJob:
    """The job from the options read, checked."""
    if "output_dir" not in values:
        raise ValueError("no output folder: RELION passes it as --o")
    if "map" not in values:
        raise ValueError("no input map: set the 3D reference (--in_3dref) on RELION's Input "
                         "tab, half-map 1 with the parameter half2 for half-map 2")
    threads = values.get("threads")
    if threads is not None and not (threads.isdigit() and int(threads) >= 1):
        raise ValueError(f"--j {threads!r}: give a whole number of threads, 1 or more")
    return ExternalJob(values["output_dir"], values["map"], values.get("mask"),
                       None if threads is None else int(threads), confidence, others)


def nodes_star(outputs: Sequence[tuple[str, str]]) -> str:
    """RELION_OUTPUT_NODES.star's text for (path, node type label) pairs (RELION 4 and 5
    read the ``output_nodes`` table's ``_rlnPipeLineNodeName`` and
    ``_rlnPipeLineNodeTypeLabel``)."""
    rows = []
    for path, label in outputs:
        if not path or any(character.isspace() for character in path):
            raise ValueError(f"{path!r}: RELION cannot read a node name with spaces; "
                             "run the job in a folder whose path has none")
        rows.append(f"{path} {label}\n")
    return ("\n# version 30001\n\ndata_output_nodes\n\nloop_\n"
            "_rlnPipeLineNodeName #1\n_rlnPipeLineNodeTypeLabel #2\n" + "".join(rows) + "\n")


def demhx_program() -> list[str]:
    """The demhx command of this Python environment (whatever the PATH holds)."""
    return [sys.executable, "-m", "demhx"]


def run_job(job: ExternalJob, program: Sequence[str] | None = None) -> int:
    """Run demhx for ``job`` and leave RELION's marker (and, on success, the nodes file) in
    its folder; returns the exit status. ``program``: the demhx command (its default,
    :func:`demhx_program`, is what tests replace)."""
    folder = Path(job.output_dir)
    command = [*(program or demhx_program()), *job.demhx_words()]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace",
                               bufsize=1)
    relay = threading.Thread(target=_relay, args=(cast(IO[str], process.stderr),),
                             daemon=True)
    relay.start()
    with _forwarded_signals(process) as received:
        aborted = _wait(process, folder)
    relay.join()
    status = process.returncode
    if aborted:
        return _aborted(folder, _exit_status(status))
    if status == 0:
        return _succeeded(job, folder)
    if status < 0 and not received:  # killed (out of memory?) before it could say a word
        return _failed(folder, f"demhx was killed by {_signal_name(-status)}",
                       _exit_status(status))
    _touch(folder / FAILURE_FILE)  # demhx has said why, or that a signal stopped it
    return 128 + received[0] if received else _exit_status(status)


def _exit_status(returncode: int) -> int:
    """A child's return code as a shell's exit status (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _relay(stream: IO[str]) -> None:
    """Pass demhx's lines on as they come: notices to stderr, the rest to stdout."""
    for line in stream:
        target = sys.stderr if line.startswith(_NOTICES) else sys.stdout
        target.write(line)
        target.flush()


def _wait(process: subprocess.Popen[str], folder: Path) -> bool:
    """Wait for demhx, stopping it if RELION asks to abort; returns whether it did."""
    abort_time: float | None = None
    while True:
        try:
            process.wait(ABORT_POLL_SECONDS)
            return abort_time is not None
        except subprocess.TimeoutExpired:
            if abort_time is None and (folder / ABORT_REQUEST_FILE).exists():
                process.terminate()  # demhx stops cleanly, writing nothing half-done
                abort_time = time.monotonic()
            elif abort_time is not None and time.monotonic() - abort_time > ABORT_GRACE_SECONDS:
                process.kill()


@contextmanager
def _forwarded_signals(process: subprocess.Popen[str]) -> Iterator[list[int]]:
    """While demhx runs, a SIGTERM, SIGINT or SIGHUP to this process stops demhx (which
    removes its temporary files) instead of orphaning it; yields the signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def forward(number: int, frame: object) -> None:
        received.append(number)
        if process.poll() is None:
            process.terminate()

    names = [name for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)]
    previous = {name: signal.signal(getattr(signal, name), forward) for name in names}
    try:
        yield received
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _succeeded(job: ExternalJob, folder: Path) -> int:
    """Check the outputs, write the nodes file, then the success marker."""
    missing = [path for path, _ in job.outputs() if not Path(path).is_file()]
    if missing:
        return _failed(folder, f"demhx wrote no {missing[0]} (was --help or --version among "
                               "the parameters?)", 1)
    try:
        _write_atomically(folder / NODES_FILE, nodes_star(job.outputs()))
    except (OSError, ValueError) as error:
        return _failed(folder, str(error), 1)
    _touch(folder / SUCCESS_FILE)
    return 0


def _aborted(folder: Path, status: int) -> int:
    """Acknowledge RELION's abort request: remove it, leave the aborted marker."""
    (folder / ABORT_REQUEST_FILE).unlink(missing_ok=True)
    _touch(folder / ABORTED_FILE)
    print(f"{PROGRAM}: aborted at RELION's request", flush=True)
    return status or 1  # 0 only when demhx had just finished: the job is still aborted


def _failed(folder: Path | None, message: str, status: int) -> int:
    """One line on stderr and, where there is a folder, the failure marker."""
    print(f"{PROGRAM}: error: {message}", file=sys.stderr, flush=True)
    if folder is not None:
        _touch(folder / FAILURE_FILE)
    return status


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError as error:  # nowhere to leave a marker: say so, RELION cannot know
        print(f"{PROGRAM}: error: cannot write {path}: {error.strerror}", file=sys.stderr,
              flush=True)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _output_folder(words: Sequence[str]) -> str | None:
    """The value of the first ``--o``, for the failure marker, before anything is checked."""
    for word, value in zip(words, words[1:], strict=False):
        if word == "--o" and not value.startswith("--"):
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Read RELION's command line, run demhx, leave the markers; returns the exit status
    (2 for an unusable call, demhx's status when it fails)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words in (["--help"], ["-h"]):
        print(USAGE)
        return 0
    output_dir = _output_folder(words)
    if output_dir is None:
        return _failed(None, "no output folder: RELION passes it as --o FOLDER", 2)
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in _MARKERS:  # left by an earlier run of this job
            (folder / name).unlink(missing_ok=True)
    except OSError as error:
        return _failed(None, f"{output_dir}: {error.strerror}; check --o", 2)
    try:
        job = parse_arguments(words)
    except ValueError as error:
        return _failed(folder, str(error), 2)
    return run_job(job)


def run() -> NoReturn:
    """The ``demhx-relion`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
