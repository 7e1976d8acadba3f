"""The pipeline's stage times, logged at DEBUG level for ``--debug``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_mrc
from onnx_fixtures import identity_path

from demhx.pipeline import enhance_file

STAGES = ("read", "validate", "session", "normalise", "resample", "tiling", "network",
          "accumulate", "write")


def test_enhance_file_logs_every_stage_once(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 0.1, (30, 34, 38)).astype(np.float32)
    volume[10:20, 12:22, 14:24] += 2.0
    source = write_mrc(tmp_path / "in.mrc", volume)
    with caplog.at_level(logging.DEBUG, logger="demhx"):
        summary = enhance_file(source, tmp_path / "out.mrc", model=identity_path(tmp_path),
                               device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage times")]
    assert len(lines) == 1
    times = dict(re.findall(r"(\w+) (\d+\.\d+) s", lines[0]))
    assert tuple(times) == STAGES
    seconds = [float(value) for value in times.values()]
    assert all(value >= 0 for value in seconds)
    assert sum(seconds) <= summary.seconds + 0.05  # the stages add up to the run, no more


def test_no_stage_times_without_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    volume = np.random.default_rng(1).normal(0.0, 0.1, (20, 20, 20)).astype(np.float32)
    volume[5:15, 5:15, 5:15] += 2.0
    source = write_mrc(tmp_path / "in.mrc", volume)
    with caplog.at_level(logging.INFO, logger="demhx"):
        enhance_file(source, tmp_path / "out.mrc", model=identity_path(tmp_path), device="cpu")
    assert not any("stage times" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("flags, shown", [(["--debug"], True), ([], False)])
def test_cli_shows_stage_times_only_with_debug(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               flags: list[str], shown: bool) -> None:
    from demhx.cli import main

    volume = np.random.default_rng(2).normal(0.0, 0.1, (20, 20, 20)).astype(np.float32)
    volume[5:15, 5:15, 5:15] += 2.0
    source = write_mrc(tmp_path / "in.mrc", volume)
    status = main([str(source), str(tmp_path / "out.mrc"), "--model",
                   str(identity_path(tmp_path)), "--device", "cpu", *flags])
    assert status == 0
    assert ("stage times" in capsys.readouterr().err) is shown
