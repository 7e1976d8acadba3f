"""Progress reports: the redrawn bar on a terminal, plain lines in logs, silence when quiet."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_mrc
from onnx_fixtures import identity_path

from demhx import _progress, cli
from demhx._progress import ProgressBar

LINE = re.compile(r"^demhx: (\d+)/(\d+) cubes \((\d+)%\), (\d+) s elapsed(, ~(\d+) s left)?$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(monkeypatch: pytest.MonkeyPatch, bar: ProgressBar, total: int, seconds_per_cube: float
         ) -> list[tuple[float, int]]:
    """Report ``total`` cubes, one every ``seconds_per_cube``; (time, done) of every line."""
    clock = _Clock()
    monkeypatch.setattr(_progress.time, "perf_counter", clock)
    reported: list[tuple[float, int]] = []
    written = 0
    for done in range(total + 1):
        bar(done, total)
        text = bar.stream.getvalue()  # type: ignore[attr-defined]
        reported += [(clock.now, done)] * (text.count("\n") - written)
        written = text.count("\n")
        clock.now += seconds_per_cube
    return reported


def test_log_lines_every_tenth_when_cubes_are_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    bar = ProgressBar(io.StringIO())
    assert bar.lines and bar.enabled  # a StringIO is not a terminal
    reported = _run(monkeypatch, bar, 343, 0.01)
    lines = bar.stream.getvalue().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 10 and "\r" not in bar.stream.getvalue()  # type: ignore[attr-defined]
    for (_, done), line in zip(reported, lines, strict=True):
        match = LINE.match(line)
        assert match, line
        assert int(match[1]) == done and int(match[2]) == 343
    assert [done * 10 // 343 for _, done in reported] == list(range(1, 11))
    assert lines[-1].startswith("demhx: 343/343 cubes (100%)") and "left" not in lines[-1]


def test_log_lines_at_least_every_30_s_when_cubes_are_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bar = ProgressBar(io.StringIO())
    reported = _run(monkeypatch, bar, 200, 4.0)  # 800 s in all, 80 s a tenth
    times = [0.0] + [when for when, _ in reported]
    assert max(np.diff(times)) <= _progress.LINE_SECONDS + 4.0
    assert len(reported) >= 800 / 30 and reported[-1][1] == 200
    # The estimate of the time left is the elapsed time scaled by the cubes left.
    line = bar.stream.getvalue().splitlines()[0]  # type: ignore[attr-defined]
    match = LINE.match(line)
    assert match and match[6] is not None
    done, elapsed = int(match[1]), int(match[4])
    assert int(match[6]) == pytest.approx(elapsed * (200 - done) / done, abs=1)


def test_a_terminal_gets_the_redrawn_bar_and_disabled_reports_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bar = ProgressBar(_Terminal())
    assert not bar.lines
    _run(monkeypatch, bar, 50, 0.5)
    bar.close()
    text = bar.stream.getvalue()  # type: ignore[attr-defined]
    assert text.count("\r") > 1 and text.endswith("\n") and text.count("\n") == 1
    assert "50/50 cubes 100%" in text
    quiet = ProgressBar(io.StringIO(), enabled=False)
    _run(monkeypatch, quiet, 50, 100.0)
    assert quiet.stream.getvalue() == ""  # type: ignore[attr-defined]


def test_a_second_run_restarts_the_clock_and_the_tenths(monkeypatch: pytest.MonkeyPatch) -> None:
    bar = ProgressBar(io.StringIO())
    _run(monkeypatch, bar, 20, 1.0)
    first = bar.stream.getvalue().count("\n")  # type: ignore[attr-defined]
    _run(monkeypatch, bar, 20, 1.0)
    lines = bar.stream.getvalue().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 2 * first
    assert lines[first].startswith("demhx: 2/20 cubes (10%), 2 s elapsed")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).standard_normal((40, 36, 44)).astype(np.float32) * 0.1
    data[8:30, 10:26, 12:32] += 2.0
    return write_mrc(tmp_path / "in.mrc", data)


def test_command_line_writes_progress_lines_to_a_log_unless_quiet(
        source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = identity_path(tmp_path / "models")
    output = tmp_path / "out.mrc"
    argv = [str(source), str(output), "--model", str(model), "--device", "cpu",
            "--threads", "1", "--tiling", "reference"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if LINE.match(line)]
    assert len(lines) >= 3 and "\r" not in err
    assert re.match(r"demhx: (\d+)/\1 cubes \(100%\)", lines[-1])
    assert cli.main([*argv, "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
