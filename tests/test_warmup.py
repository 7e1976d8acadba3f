"""Numba's start-up on a background thread (demhx._warmup) and the command's exit (cli.run)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from demhx import _warmup

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    options = {"capture_output": True, **kwargs}
    return subprocess.run([sys.executable, "-c", code], text=True, env=env, cwd=ROOT,
                          timeout=120, **options)  # type: ignore[call-overload]


def test_start_up_loads_numbas_registries_on_one_thread() -> None:
    """In a fresh process, start() twice makes one thread; once it ends, numba's
    implementation registry (imported only when its compiler is set up) is loaded."""
    code = ("import sys, threading; from demhx import _warmup; "
            "print('numba.np.arraymath' in sys.modules); _warmup.start(); _warmup.start(); "
            "names = [t.name for t in threading.enumerate()]; "
            "print(names.count('demhx-numba-start-up') <= 1, _warmup.wait(100), "
            "'numba.np.arraymath' in sys.modules)")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "True"]


def test_wait_without_start_and_a_failing_start_up(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_warmup, "_thread", None)
    assert _warmup.wait(0) is False
    import numba

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(numba, "njit", broken)
    with caplog.at_level(logging.DEBUG, logger="demhx"):
        _warmup._set_up()  # no exception: the main thread meets the problem itself
    assert "numba start-up on the side failed: no compiler" in caplog.text


def test_the_note_on_compiling_in_memory_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from demhx import _jit

    monkeypatch.setattr(_jit, "CACHE", False)
    note = _warmup.compile_note()
    assert note is not None and "in memory, as on every run here" in note
    assert "set NUMBA_CACHE_DIR to a writable folder" in note


def test_the_note_on_compiling_when_the_cache_is_empty(tmp_path: Path) -> None:
    """A fresh cache folder: the set-up says the kernels will be compiled, and where."""
    env = {key: value for key, value in os.environ.items() if key != "DEMHX_NUMBA_SEED"}
    result = subprocess.run(
        [sys.executable, "-c", "from demhx import _warmup; print(_warmup.compile_note())"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**env, "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"compiling demhx's numba kernels into {tmp_path}/cache/")
    assert result.stdout.rstrip().endswith("once, about 10 s on 2 cores; later runs load them")


def test_run_runs_the_exit_handlers_and_exits_with_mains_status(tmp_path: Path) -> None:
    """cli.run skips the interpreter's teardown, not what a normal exit does first: exit
    handlers run, buffered output arrives, and the status is main's."""
    prelude = ("import atexit, sys; atexit.register(lambda: print('handler ran')); "
               "from demhx.cli import run; ")
    version = _python(prelude + "sys.argv = ['demhx', '--version']; run()")
    assert version.returncode == 0 and version.stdout == "demhx 0.1.0\nhandler ran\n"
    absent = str(tmp_path / "absent.mrc")
    failed = _python(prelude + f"sys.argv = ['demhx', {absent!r}, 'out.mrc']; run()")
    assert failed.returncode == 2 and failed.stdout == "handler ran\n"
    assert failed.stderr.startswith("demhx: error: ") and "Traceback" not in failed.stderr


def test_a_closed_output_pipe_ends_quietly() -> None:
    """``demhx --help | true``: the reader is gone before the help is written; status 1
    and no traceback (Python's advice for BrokenPipeError)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = _python("import sys; sys.argv = ['demhx', '--help']; "
                         "from demhx.cli import run; run()", stdout=write_end,
                         stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write_end)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr


def test_an_api_run_that_fails_early_waits_for_the_set_up_at_exit(tmp_path: Path) -> None:
    """enhance_file starts the set-up before reading; when the read fails and the script
    ends, the exit waits for the thread (a handler registered before it runs after it)."""
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not a map")
    code = ("import atexit; from demhx import _warmup; "
            "atexit.register(lambda: print('alive at exit:', _warmup._thread.is_alive())); "
            "import demhx\n"
            "try:\n"
            f"    demhx.enhance_file({str(bad)!r}, {str(tmp_path / 'out.mrc')!r})\n"
            "except ValueError as error:\n"
            "    print('refused:', 'bad.mrc' in str(error))\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused: True", "alive at exit: False"]
