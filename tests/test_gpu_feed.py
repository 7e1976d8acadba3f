"""bench/gpu_feed.py: the stage line is read as the pipeline writes it, the GPU's busy samples
are averaged over a window, and the whole measure runs on the CPU with a fixture model."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from onnx_fixtures import identity_path, write_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_feed  # noqa: E402

import demhx.model  # noqa: E402


def test_stage_seconds_reads_the_pipelines_line() -> None:
    line = "stage times: read 0.010 s, network 1.250 s, accumulate 0.300 s"
    assert gpu_feed.stage_seconds(line, "network") == 1.25
    assert gpu_feed.stage_seconds(line, "accumulate") == 0.3
    assert gpu_feed.stage_seconds(line, "write") == 0.0


def test_utilisation_averages_the_samples_in_the_window(tmp_path: Path) -> None:
    start = dt.datetime(2026, 12, 4, 20, 0, 0)
    lines = [f"{(start + dt.timedelta(seconds=second)).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}"
             f", {busy} %, 100 MiB" for second, busy in ((0, 10), (1, 50), (2, 70), (3, 90))]
    util = tmp_path / "util.csv"
    util.write_text("\n".join([*lines, "garbage"]) + "\n", encoding="utf-8")
    begin = start.timestamp()
    assert gpu_feed.utilisation(util, begin + 0.5, begin + 2.5) == pytest.approx(60.0)
    assert gpu_feed.utilisation(util, begin + 10, begin + 20) is None


def test_the_measure_runs_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    write_registry(models, {"fixture": identity_path(models)}, default="fixture")
    monkeypatch.setattr(demhx.model, "models_dir", lambda: models)
    source = tmp_path / "map.mrc"
    volume = np.random.default_rng(0).normal(0, 0.1, (24, 24, 24)).astype(np.float32)
    volume[8:16, 8:16, 8:16] += 2.0
    with mrcfile.new(source) as stream:
        stream.set_data(volume)
        stream.voxel_size = 1.0
    level = logging.getLogger("demhx").level
    assert gpu_feed.main([str(source), "--device", "cpu", "--maps", "2", "--threads", "1",
                          "--tiling", "fast"]) == 0
    assert logging.getLogger("demhx").level == level  # the logger is left as it was
    out = capsys.readouterr().out
    assert "raw network:" in out and "fast tiling:" in out and "raw/stage" in out
    assert "several maps, map 2:" in out
