"""The demhx-export command: subcommands, one-line errors, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from demhx.model import read_metadata, spec_from_metadata

from demhx_export import cli
from demhx_export.checkpoint import save_checkpoint
from demhx_export.network import UNet3D


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _spec(path: Path):  # noqa: ANN202 - ModelSpec
    return spec_from_metadata(path, read_metadata(path))


@pytest.mark.parametrize("widths", ["32,64,128", "(32, 64, 128)", "[32,64,128]"])
def test_summary_of_the_paper_network(capsys: pytest.CaptureFixture[str], widths: str) -> None:
    status, out, err = _run(capsys, "summary", "--widths", widths, "--cube", "64")
    assert status == 0 and not err
    assert "4,561,793 parameters" in out and "163.02 GFLOP" in out


def test_random_init_is_marked_untrained(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    out_path = tmp_path / "r.onnx"
    status, out, err = _run(capsys, "random-init", str(out_path), "--widths", "4,8,16",
                            "--seed", "7", "--cube", "16")
    assert status == 0, err
    assert "UNTRAINED" in out and "sha256" in out and '"fp16_sha256"' in out
    spec = _spec(out_path)
    assert not spec.trained and spec.name == "random-init" and spec.cube_size == 16
    assert "seed: 7" in spec.provenance and spec.extra["widths"] == "4,8,16"
    assert spec.fp16_path == tmp_path / "r.fp16.onnx"


def test_export_of_a_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                tiny_net: UNet3D, tiny_config: dict[str, object]) -> None:
    save_checkpoint(tmp_path / "run" / "best", tiny_net, tiny_config)
    out_path = tmp_path / "tight.onnx"
    status, out, err = _run(capsys, "export", str(tmp_path / "run"), str(out_path),
                            "--name", "tight", "--version", "1.10", "--no-fp16")
    assert status == 0, err
    assert "trained" in out and "UNTRAINED" not in out
    spec = _spec(out_path)
    assert (spec.name, spec.version, spec.cube_size) == ("tight", "1.10", 16)
    assert spec.trained and "steps: 120" in spec.provenance
    assert not (tmp_path / "tight.fp16.onnx").exists()


@pytest.mark.parametrize("args,status,fragment", [
    (["nope"], 2, "unknown command 'nope'"),
    (["summary", "--bogus", "3"], 2, "--bogus"),
    (["summary", "--widths", "32,64"], 1, "need 3 positive integers"),
    (["summary", "--cube", "12"], 1, "multiple of 8"),
    (["export", "missing/ckpt", "x.onnx"], 1, "missing/ckpt.json"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], status: int,
                             fragment: str) -> None:
    code, out, err = _run(capsys, *args)
    assert code == status
    assert not out  # nothing ran
    assert err.count("\n") == 1 and err.startswith("demhx-export: error:") and fragment in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys)
    assert status == 0 and "random-init" in out and "summary" in out
    status, out, _ = _run(capsys, "export", "--help")
    assert status == 0 and "CHECKPOINT" in out


def test_missing_optional_modules_are_tolerated(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    commands = {**cli.COMMANDS,
                "ghost": ("demhx_export.no_such_module", "ghost_command", "not installed")}
    monkeypatch.setattr(cli, "COMMANDS", commands)
    status, out, _ = _run(capsys, "--help")
    assert status == 0 and "ghost" not in out
    status, _, err = _run(capsys, "ghost")
    assert status == 1 and "ghost is unavailable" in err
