"""SIGTERM and SIGHUP as Ctrl-C, signals held back while outputs are moved into place, and
the command stopped by signals at any moment: one line, the signal's status, nothing left
behind, and the truth about what was written."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import pytest

from demhx import _signals, cli

ROOT = Path(__file__).resolve().parents[1]


def _to_this_thread(signum: int) -> None:
    """Send ``signum`` to this (the main) thread: a signal sent to the process may be taken
    by another thread (ONNX Runtime's or numba's, left by earlier tests), whose C handler
    can run only after the block under test has ended when the machine is busy."""
    signal.pthread_kill(threading.get_ident(), signum)


def _handlers() -> dict[int, object]:
    return {number: signal.getsignal(number) for number in _signals.SIGNALS}


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                                (signal.SIGINT, 130)])
def test_handled_signals_raise_interrupted(signum: int, status: int) -> None:
    before = _handlers()
    with pytest.raises(KeyboardInterrupt) as caught, _signals.handled():
        _to_this_thread(signum)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert isinstance(caught.value, _signals.Interrupted)
    assert _signals.exit_status(caught.value) == status
    assert _signals.signal_name(caught.value) == signal.Signals(signum).name
    assert _handlers() == before


def test_deferred_holds_a_signal_until_the_block_ends() -> None:
    steps = []
    with pytest.raises(_signals.Interrupted), _signals.handled():
        with _signals.deferred():
            _to_this_thread(signal.SIGTERM)
            for _ in range(1000):
                pass
            steps.append("finished")  # not cut short
        steps.append("after")  # the held signal is delivered at the end of the block
    assert steps == ["finished"]


def test_deferred_without_handlers_delivers_to_python_default() -> None:
    # Python's own handler, also when the suite runs as a background job (a shell starts
    # those with SIGINT ignored, and Python then leaves it ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _raises_keyboard_interrupt_after_the_block()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _raises_keyboard_interrupt_after_the_block() -> None:
    with pytest.raises(KeyboardInterrupt), _signals.deferred():
        _to_this_thread(signal.SIGINT)
        for _ in range(1000):
            pass


def test_plain_keyboard_interrupt_is_sigint() -> None:
    assert _signals.exit_status(KeyboardInterrupt()) == 130
    assert _signals.signal_name(KeyboardInterrupt()) == "SIGINT"


def test_signals_after_the_first_are_ignored_without_a_race_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different signals pending at once: the first handled raises, the other is
    ignored, and Python reports no signal 'ignored due to race condition'."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(_signals.Interrupted) as caught, _signals.handled():
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
        try:
            _to_this_thread(signal.SIGTERM)
            _to_this_thread(signal.SIGINT)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGINT])
        for _ in range(1000):
            pass
    assert caught.value.signum in (signal.SIGTERM, signal.SIGINT)
    assert unraisable == []


def test_no_signal_is_taken_once_the_outcome_is_final() -> None:
    with _signals.handled():
        _signals.close()
        _to_this_thread(signal.SIGTERM)
        for _ in range(1000):
            pass
        assert _signals.taken() is None


def test_a_signal_turned_into_another_error_is_still_the_signal() -> None:
    with pytest.raises(_signals.Interrupted) as caught, _signals.handled():
        try:
            _to_this_thread(signal.SIGHUP)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            pass  # code on the way that swallows it (or raises another error instead)
        _signals.raise_taken()
    assert caught.value.exit_status == 129


# The stop line and what it says was written.

def test_stop_line_says_what_was_written() -> None:
    assert cli.stop_line("SIGINT", None) == "demhx: interrupted before any work; nothing written"
    assert cli.stop_line("SIGTERM", []) == "demhx: stopped by SIGTERM; no output written"
    assert cli.stop_line("SIGHUP", ["o.mrc"]) == (
        "demhx: stopped by SIGHUP after writing o.mrc; it is complete, nothing else was written")
    assert cli.stop_line("SIGINT", ["c.mrc", "o.mrc"]) == (
        "demhx: interrupted after writing c.mrc and o.mrc; both are complete, nothing else "
        "was written")
    many = cli.stop_line("SIGTERM", [f"{index}.mrc" for index in range(40)])
    assert "40 files (0.mrc ... 39.mrc)" in many and len(many) < 120
    for written in (["o.mrc"], ["a", "b", "c"], ["x"] * 9):
        line = cli.stop_line("SIGTERM", written)
        assert "no output" not in line and "nothing written" not in line
        assert "\n" not in line and line.startswith("demhx: stopped by SIGTERM after writing ")


def test_output_watch_sees_files_moved_into_place(tmp_path: Path) -> None:
    new, old = tmp_path / "new.mrc", tmp_path / "old.mrc"
    old.write_bytes(b"old")
    watch = _signals.OutputWatch()
    assert watch.written() is None  # outputs not known yet: before any work
    watch.watch([new, None, old])
    assert watch.written() == []
    for path in (new, old):  # written whole beside, then moved into place
        temporary = tmp_path / f".{path.name}.tmp"
        temporary.write_bytes(b"new")
        os.replace(temporary, path)
    assert watch.written() == [str(new), str(old)]
    new.unlink()  # removed by the clean-up of an interrupted commit
    assert watch.written() == [str(old)] and not watch.changed(new)


def test_a_signal_after_out_was_moved_into_place_says_it_is_complete(
        source: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from demhx import mrcio

    write = mrcio.write_maps

    def write_then_signal(*args: object, **kwargs: object) -> None:
        write(*args, **kwargs)  # type: ignore[arg-type]
        _to_this_thread(signal.SIGTERM)  # as OUT appears: after the atomic rename
        for _ in range(1000):
            pass

    monkeypatch.setattr(mrcio, "write_maps", write_then_signal)
    output = tmp_path / "out" / "o.mrc"
    output.parent.mkdir()
    before = _handlers()
    assert cli.main([str(source), str(output), "--model", str(model), "-q"]) == 143
    assert capsys.readouterr().err == (f"demhx: stopped by SIGTERM after writing {output}; it "
                                       "is complete, nothing else was written\n")
    assert [path.name for path in output.parent.iterdir()] == ["o.mrc"]
    with mrcfile.open(output) as written, mrcfile.open(source) as read:
        assert written.data.shape == read.data.shape
    assert _handlers() == before


# The command in a process of its own: the signal's status, one line, no traceback, nothing
# left behind, whenever the signals come.

_PAUSED_RUN = """
import sys, time
import numpy as np
from demhx import cli, mrcio
from demhx._progress import ProgressBar

def pause():
    # Work in C (sorting, tens of ms a call) until the signals stop it: both arrive while
    # Python cannot run a handler, as in ONNX Runtime or an import.
    numbers, deadline = np.random.default_rng(0).random(1_000_000), time.monotonic() + 60
    print("paused", flush=True)
    while time.monotonic() < deadline:
        np.sort(numbers)

where = sys.argv.pop(1)
if where == "inference":
    ProgressBar.__call__ = lambda self, done, total: done and pause()
elif where == "writing":  # the temporary file is complete, not yet moved into place
    write = mrcio._write_mrc
    mrcio._write_mrc = lambda *args: (write(*args), pause())
else:  # OUT was moved into place (the signal arrives as it appears)
    import os, signal
    write_maps = mrcio.write_maps
    mrcio.write_maps = lambda *args, **kw: (write_maps(*args, **kw),
                                           os.kill(os.getpid(), signal.SIGTERM))
cli.run()
"""
_PROCESS_TIMEOUT_S = 120  # a loaded 2-core machine; these runs take about a second


def _ignore(signum: int, frame: object) -> None:
    pass


@contextlib.contextmanager
def _children_take_signals() -> Iterator[None]:
    """A process started now handles SIGINT, SIGTERM and SIGHUP by default, also where this
    one ignores them (a background job's SIGINT, nohup's SIGHUP, inherited by children):
    a handler here, even one that does nothing, is reset to the default in a child."""
    ignored = [number for number in _signals.SIGNALS
               if signal.getsignal(number) == signal.SIG_IGN]
    for number in ignored:
        signal.signal(number, _ignore)
    try:
        yield
    finally:
        for number in ignored:
            signal.signal(number, signal.SIG_IGN)


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with _children_take_signals():
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (Python has none by default)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _assert_one_stop_line(err: str, status: int, allowed: dict[int, tuple[str, ...]]) -> None:
    assert "Traceback" not in err and "race condition" not in err, err
    assert status in allowed, (status, err)
    assert err.count("\n") == 1 and err.rstrip("\n") in allowed[status], err


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_sigint_as_the_command_starts(source: Path, model: Path, tmp_path: Path) -> None:
    """SIGINT as soon as the command has its handlers, before the imports of the run: one
    line, 130, no traceback, nothing written."""
    output = tmp_path / "out" / "o.mrc"
    output.parent.mkdir()
    process = _start(["-m", "demhx", str(source), str(output), "--model", str(model), "-q"])
    deadline = time.monotonic() + _PROCESS_TIMEOUT_S
    while not _catches_sigterm(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=_PROCESS_TIMEOUT_S)
    _assert_one_stop_line(err, process.returncode, {130: (
        "demhx: interrupted before any work; nothing written",
        "demhx: interrupted; no output written")})
    assert out == "" and list(output.parent.iterdir()) == []


@pytest.mark.parametrize(("where", "first", "second"), [
    ("inference", signal.SIGTERM, signal.SIGINT),
    ("writing", signal.SIGTERM, signal.SIGINT),
    ("writing", signal.SIGINT, signal.SIGINT),
])
def test_two_signals_5_ms_apart(source: Path, model: Path, tmp_path: Path, where: str,
                                first: int, second: int) -> None:
    """A second signal while the first one's clean-up runs changes nothing: one line, the
    status of the signal taken (either, as both may be pending together), no temporary
    file left."""
    output = tmp_path / "out" / "o.mrc"
    output.parent.mkdir()
    process = _start(["-c", _PAUSED_RUN, where, str(source), str(output), "--model",
                      str(model), "-q", "--threads", "1"])
    assert process.stdout is not None
    assert process.stdout.readline() == "paused\n", process.communicate()
    process.send_signal(first)
    time.sleep(0.005)
    process.send_signal(second)
    _, err = process.communicate(timeout=_PROCESS_TIMEOUT_S)
    lines = {signal.SIGINT: "demhx: interrupted; no output written",
             signal.SIGTERM: "demhx: stopped by SIGTERM; no output written"}
    _assert_one_stop_line(err, process.returncode,
                          {128 + number: (lines[number],) for number in (first, second)})
    assert list(output.parent.iterdir()) == []


def test_a_signal_as_out_appears_says_out_is_complete(source: Path, model: Path,
                                                     tmp_path: Path) -> None:
    output = tmp_path / "out" / "o.mrc"
    output.parent.mkdir()
    process = _start(["-c", _PAUSED_RUN, "written", str(source), str(output), "--model",
                      str(model), "-q", "--threads", "1"])
    _, err = process.communicate(timeout=_PROCESS_TIMEOUT_S)
    _assert_one_stop_line(err, process.returncode, {143: (
        f"demhx: stopped by SIGTERM after writing {output}; it is complete, nothing else "
        "was written",)})
    assert [path.name for path in output.parent.iterdir()] == ["o.mrc"]
    with mrcfile.open(output) as written, mrcfile.open(source) as read:
        assert written.data.shape == read.data.shape


def test_signals_after_the_outcome_change_nothing() -> None:
    """Signals while the command exits (its exit handlers) are ignored: main's status and
    output, no traceback."""
    script = ("import atexit, os, signal, sys, time\n"
              "def late():\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.05)\n"
              "atexit.register(late)\n"
              "sys.argv[1:] = ['--version']\n"
              "from demhx.cli import run\n"
              "run()\n")
    process = _start(["-c", script])
    out, err = process.communicate(timeout=_PROCESS_TIMEOUT_S)
    assert (process.returncode, out.split()[0], err) == (0, "demhx", "")


def test_signals_the_command_was_started_ignoring_stay_ignored() -> None:
    """``nohup demhx ...`` goes on when the terminal closes (SIGHUP stays ignored)."""
    script = ("import signal\n"
              "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
              "from demhx import _signals\n"
              "_signals.catch()\n"
              "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,\n"
              "      signal.getsignal(signal.SIGTERM) is _signals._take)\n")
    process = _start(["-c", script])
    out, err = process.communicate(timeout=_PROCESS_TIMEOUT_S)
    assert (process.returncode, out, err) == (0, "True True\n", "")


def test_the_entry_imports_only_the_standard_library() -> None:
    """``demhx.cli`` (the console script's module) imports nothing outside the standard
    library but the signal handling, so that the handlers are in place a few milliseconds
    after the process starts; fire, the reading of the words and the run come after."""
    script = ("import sys\n"
              "before = set(sys.modules)\n"
              "import demhx.cli\n"
              "print(' '.join(sorted(name for name in set(sys.modules) - before\n"
              "                      if name.split('.')[0] not in sys.stdlib_module_names)))\n")
    process = _start(["-c", script])
    out, err = process.communicate(timeout=_PROCESS_TIMEOUT_S)
    assert process.returncode == 0, err
    assert set(out.split()) <= {"demhx", "demhx._version", "demhx._signals", "demhx.cli"}, out
    assert "demhx.cli" in out.split()
