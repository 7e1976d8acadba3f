"""The demhx command line: parsing with fire, help, version, messages and exit codes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import onnx_fixtures
import pytest
from conftest import write_mrc
from onnx_fixtures import identity_path

from demhx import _command, cli
from demhx.errors import describe_error

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "demhx", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: demhx IN OUT") and "--noise-stats" in out and err == ""
    assert cli.main(["in.mrc", "out.mrc", "-h"]) == 0
    capsys.readouterr()
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith("demhx 0.")


def test_help_lists_every_shipped_model_once_with_the_default(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The installed registry, read now: one line per model, the default marked."""
    from demhx import model

    registry = model.load_registry()
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.split("shipped models (--model NAME):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in lines] == list(registry["models"])
    marked = [line.split()[0] for line in lines if line.split()[1] == "(default)"]
    assert marked == [registry["default"]]
    assert all("Å/voxel" in line and len(line) <= 95 for line in lines)  # as the option lines


def test_help_reads_the_registry_at_run_time(tmp_path: Path) -> None:
    first = identity_path(tmp_path, version="7.3", widths="8,16", parameters=12345,
                          gflop_per_cube=2.5)
    second = onnx_fixtures.write_model(tmp_path, "second.onnx", onnx_fixtures.scale_model(2.0))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    onnx_fixtures.write_registry(tmp_path, {"small": first, "other": second, "broken": broken},
                   default="other")
    text = _command.help_text(tmp_path)
    lines = text.split("shipped models (--model NAME):\n", 1)[1].splitlines()[:3]
    assert lines[0].split() == ["small", "v7.3,", "0.01", "M", "weights,",
                                "2", "GFLOP", "per", "16³", "cube,", "1.0", "Å/voxel"]
    assert lines[1].startswith("  other (default)   v0.1, ")
    assert lines[2].startswith("  broken ") and "broken.onnx: cannot be read" in lines[2]
    # A description in the registry is used as it is; no models: say what to do.
    registry = json.loads((tmp_path / "registry.json").read_text())
    registry["models"]["small"]["description"] = "the small one"
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    assert "  small             the small one\n" in _command.help_text(tmp_path)
    assert "  none; pass --model PATH.onnx\n" in _command.help_text(tmp_path / "empty")


def test_python_m_demhx() -> None:
    result = _python("--version")
    assert result.returncode == 0 and result.stdout.startswith("demhx ")
    result = _python("--help")
    assert result.returncode == 0 and "usage: demhx IN OUT" in result.stdout


@pytest.mark.parametrize(("argv", "expected"), [
    (["a", "b"], {}),
    (["--overwrite", "a", "b", "-q"], {"overwrite": True, "quiet": True}),
    (["a", "b", "--noise-stats", "0", "0.1"], {"noise_stats": (0.0, 0.1)}),
    (["a", "b", "--noise-stats=-0.5,0.1"], {"noise_stats": (-0.5, 0.1)}),
    (["a", "b", "--noise-stats", "-0.5", "0.1"], {"noise_stats": (-0.5, 0.1)}),
    (["a", "b", "--voxel-size", "1.1,1.2,1.3"], {"voxel_size": (1.3, 1.2, 1.1)}),
    (["a", "b", "--voxel-size", "0.9"], {"voxel_size": (0.9, 0.9, 0.9)}),
    (["a", "b", "--batch_size", "4", "--threads=2"], {"batch_size": 4, "threads": 2}),
    (["a", "b", "--device", "cuda:1", "--tiling", "reference", "--half2", "1,2.mrc"],
     {"device": "cuda:1", "tiling": "reference", "half2": "1,2.mrc"}),
    (["0001", "b", "--model", "tight"], {"input": "0001", "model": "tight"}),
])
def test_parse_arguments(argv: list[str], expected: dict) -> None:
    values = {"input": "a", "output": "b", **expected}
    assert _command.parse_arguments(argv) == _command.Arguments(**values)


@pytest.mark.parametrize(("argv", "message"), [
    (["a"], "missing OUT"),
    ([], "missing IN"),
    (["a", "b", "c"], "unexpected extra argument 'c'"),
    (["a", "b", "--foo"], "unknown option --foo"),
    (["a", "b", "--batch-size", "0"], "--batch-size '0': must be a positive integer"),
    (["a", "b", "--batch-size", "two"], "--batch-size 'two'"),
    (["a", "b", "--threads", "-1"], "--threads '-1'"),
    (["a", "b", "--noise-stats", "1"], "--noise-stats '1': expected two values"),
    (["a", "b", "--voxel-size", "1,2"], "--voxel-size '1,2'"),
    (["a", "b", "--quiet=maybe"], "--quiet takes no value"),
    (["a", "b", "--model"], "--model needs a value"),
    (["a", "b", "--half2", "--quiet"], "--half2 needs a value"),
])
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("demhx: error: ") and message in err


def test_run_reports_device_and_summary(source: Path, model: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    output = source.with_name("out.mrc")
    before = source.read_bytes()
    assert cli.main([str(source), str(output), "--model", str(model), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert output.is_file() and source.read_bytes() == before
    assert "demhx: device cpu (CPUExecutionProvider" in err
    assert f"demhx: wrote {output}: 28×24×20 voxels" in err and "cubes run" in err
    assert "\r" not in err  # no progress bar when stderr is not a terminal


def test_quiet_prints_nothing(source: Path, model: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    output = source.with_name("out.mrc")
    assert cli.main([str(source), str(output), "--model", str(model), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_untrained_model_warning_is_one_line(source: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    untrained = identity_path(tmp_path / "untrained", trained="false")
    output = source.with_name("out.mrc")
    assert cli.main([str(source), str(output), "--model", str(untrained), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("demhx: warning: identity.onnx: model fixture 0.1 is marked untrained")


def test_overwrite(source: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = source.with_name("out.mrc")
    output.write_bytes(b"keep me")
    argv = [str(source), str(output), "--model", str(model), "-q"]
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and output.read_bytes() == b"keep me"
    assert cli.main(argv + ["--overwrite"]) == 0
    with mrcfile.open(output) as stream:
        assert stream.data.shape == (20, 24, 28)


def test_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    result = _python(str(tmp_path / "absent.mrc"), str(tmp_path / "out.mrc"))
    assert result.returncode == 2
    assert result.stderr.startswith("demhx: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
    debug = _python(str(tmp_path / "absent.mrc"), str(tmp_path / "out.mrc"), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("demhx: error: ")


def test_describe_error() -> None:
    error = PermissionError(13, "Permission denied", "/x/out.mrc")
    assert describe_error(error) == ("/x/out.mrc: permission denied; check the permissions "
                                         "or choose another path")
    assert describe_error(RuntimeError("a\nb")) == "a b"
    assert describe_error(KeyError("k")) == "KeyError: 'k'"
    assert describe_error(ValueError("x.mrc: bad; fix")) == "x.mrc: bad; fix"
    assert describe_error(MemoryError()).startswith("out of memory")


# Run in a fresh interpreter: torch modules loaded by its start-up (a site-packages .pth
# file, sitecustomize) are set aside, then every later import of torch is recorded with the
# files on its call stack and refused, before demhx is imported and a model is run.
_WATCH_TORCH = """
import importlib.abc, json, sys, traceback
before = sorted(name for name in sys.modules if name.split(".")[0] == "torch")
for name in before:
    del sys.modules[name]
attempts = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            attempts.append([name, [frame.filename for frame in traceback.extract_stack()]])
            raise ModuleNotFoundError(f"{name} is refused here", name=name)
        return None

sys.meta_path.insert(0, Watch())
device = None
try:
    import numpy as np
    import demhx, demhx.cli, demhx.pipeline, demhx.session
    demhx.session.import_onnxruntime()
    runtime = demhx.session.load_runtime(sys.argv[1])
    runtime.run(np.zeros((1, 1, 16, 16, 16), np.float32))
    device = runtime.device
finally:
    print(json.dumps({"at_start_up": before, "attempts": attempts, "device": device}))
"""


def test_demhx_never_imports_torch(model: Path) -> None:
    """Importing demhx, ONNX Runtime and running a model on the default device imports no
    torch: an import of torch with a demhx file on its call stack fails the test, even on a
    machine without torch (where the import itself would fail quietly inside a try)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    result = subprocess.run([sys.executable, "-c", _WATCH_TORCH, str(model)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    report = json.loads((result.stdout.strip().splitlines() or ["{}"])[-1])
    package = str(ROOT / "demhx")
    by_demhx = [(name, [file for file in stack if file.startswith(package)])
                for name, stack in report.get("attempts", [])
                if any(file.startswith(package) for file in stack)]
    assert not by_demhx, f"demhx imported torch (the files on the stack): {by_demhx}"
    assert result.returncode == 0 and report["device"], result.stderr


def test_parse_confidence_and_tta() -> None:
    args = _command.parse_arguments(["a", "b", "--confidence", "c.mrc", "--tta", "12"])
    assert (args.confidence, args.tta) == ("c.mrc", 12)
    assert _command.parse_arguments(["a", "b", "--tta=4"]) == _command.Arguments("a", "b", tta=4)
    assert _command.parse_arguments(["a", "b"]).confidence is None


@pytest.mark.parametrize(("argv", "message"), [
    (["a", "b", "--tta", "0"], "--tta '0': must be a positive integer"),
    (["a", "b", "--tta", "six"], "--tta 'six'"),
    (["a", "b", "--confidence"], "--confidence needs a value"),
    (["a", "--out-dir", "d", "--confidence", "c.mrc"], "--confidence works with the one-map"),
    (["a", "--suffix", "_x", "--tta", "4"], "--tta works with the one-map form"),
])
def test_confidence_usage_errors(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("demhx: error: ") and err.count("\n") == 1 and message in err


def test_run_writes_confidence_map_and_reports_rotations(
        source: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output, confidence = source.with_name("out.mrc"), source.with_name("spread.mrc")
    argv = [str(source), str(output), "--model", str(model), "--device", "cpu",
            "--confidence", str(confidence), "--tta", "4"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"demhx: wrote {output} and confidence {confidence}: 28×24×20 voxels" in err
    assert "cubes run × 4 rotations (TTA)" in err
    with mrcfile.open(output) as out, mrcfile.open(confidence) as spread:
        assert spread.data.shape == out.data.shape == (20, 24, 28)
        assert not spread.data.any()  # the identity model agrees with itself in every rotation
    assert "--confidence PATH" in _command.HELP and "--tta N" in _command.HELP


def test_unknown_tta_count_is_a_usage_error(source: Path, model: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    output = source.with_name("out.mrc")
    argv = [str(source), str(output), "--model", str(model), "--tta", "5", "--confidence",
            str(source.with_name("spread.mrc"))]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("demhx: error: --tta 5") and "3, 4, 6, 12, 24" in err
    assert sorted(p.name for p in source.parent.iterdir() if p.suffix == ".mrc") == ["in.mrc"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["-i", "a", "-o", "b"], {}),
    (["--inputMap", "a", "--outputMap", "b"], {}),
    (["a", "-o", "b"], {}),
    (["-o", "b", "-i", "a"], {}),
    (["a", "b", "-s", "1.742"], {"voxel_size": (1.742, 1.742, 1.742)}),
    (["a", "b", "--samplingRate", "0.9"], {"voxel_size": (0.9, 0.9, 0.9)}),
    (["a", "b", "-i2", "h2"], {"half2": "h2"}),
    (["a", "b", "--halfMap2", "h2"], {"half2": "h2"}),
    (["a", "b", "--noiseStats", "0.1", "0.02"], {"noise_stats": (0.1, 0.02)}),
    (["a", "b", "-m", "m.mrc"], {"mask": "m.mrc"}),
    (["a", "b", "--binaryMask", "m.mrc"], {"mask": "m.mrc"}),
    (["a", "b", "-b", "4"], {"batch_size": 4}),
    (["a", "b", "-g", "1"], {"device": "cuda:1"}),
    (["a", "b", "-g", "0,1"], {"device": "cuda:0,1"}),
    (["a", "b", "--gpuIds", "-1"], {"device": "cpu"}),
    (["a", "b", "-p", "tightTarget"], {"model": "tight-fast"}),
    (["a", "b", "--processingType", "tightTarget"], {"model": "tight-fast"}),
    (["a", "--", "-b.mrc"], {"output": "./-b.mrc"}),
])
def test_deepemhancer_flags(argv: list[str], expected: dict) -> None:
    values = {"input": "a", "output": "b", **expected}
    assert _command.parse_arguments(argv) == _command.Arguments(**values)


@pytest.mark.parametrize(("argv", "message"), [
    (["a", "b", "-s", "1.742"], None),  # fire would take -s for --suffix
    (["a", "b", "--s", "1.742"], "unknown option --s"),
    (["a", "b", "--suffix"], "--suffix needs a value"),
    (["a", "b", "--over"], "unknown option --over"),
    (["a", "b", "--overwrit"], "did you mean --overwrite?"),
    (["a", "b", "--out", "d"], "unknown option --out"),
    (["a", "b", "--pre", "x.png"], "unknown option --pre"),
    (["a", "b", "--noise", "0,1"], "unknown option --noise"),
    (["a", "b", "-model", "x"], "unknown option -model"),
    (["a", "b", "--Model", "x"], "unknown option --Model"),
    (["a", "b", "--quiet", "--quiet"], "--quiet is given twice"),
    (["a", "b", "-q", "--quiet"], "--quiet is given twice (also as -q)"),
    (["a", "b", "-g", "0", "--device", "cpu"], "both choose the device"),
    (["a", "b", "--device", "cpu", "-g", "0"], "-g and --device both choose the device"),
    (["a", "b", "-i2", "h", "--half2", "h"], "--half2 is given twice (also as -i2)"),
    (["a", "b", "-p", "tightTarget", "--model", "tight"], "both choose the model"),
    (["a", "b", "-p", "wideTarget"], "-p wideTarget: demhx ships no wideTarget model"),
    (["a", "b", "-p", "highRes"], "demhx-export from-keras"),
    (["a", "b", "-p", "tight"], "-p 'tight': not a DeepEMhancer processing type"),
    (["a", "b", "-g", "gpu0"], "expected GPU ids"),
    (["a", "--out-dir", "d", "-o", "x"], "-o names OUT of the one-map form"),
    (["-o", "b"], "IN is missing"),
    (["a", "b", "--deepLearningModelPath", "p"], "--deepLearningModelPath (DeepEMhancer) is "
                                                 "not supported"),
    (["a", "b", "--cleaningStrengh", "0.2"], "no small-component clean-up"),
    (["-", "b"], "standard input is not supported"),
    (["a", "b", "--version=1"], "--version takes no value"),
])
def test_options_are_matched_exactly(argv: list[str], message: str | None,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    if message is None:
        assert _command.parse_arguments(argv).suffix is None
        return
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("demhx: error: ")
    assert message in err


def test_no_option_is_taken_by_a_prefix_or_a_first_letter() -> None:
    """Every option is matched exactly: each shorter spelling of one (``--over``, ``--b``),
    and each single-letter form that DeepEMhancer does not define (``-d``, ``-t``), is an
    unknown option, not the option fire would make of it."""
    names = [field.name for field in dataclasses.fields(_command.Arguments)][3:]
    spellings = {f"--{name.replace('_', '-')}" for name in names} | {f"--{name}" for name in names}
    deepemhancer = {"-i", "-o", "-i2", "-s", "-m", "-b", "-g", "-p", "-q", "-h"}
    shorter = {spelling[:end] for spelling in spellings for end in range(3, len(spelling))}
    letters = {f"-{name[0]}" for name in names} - deepemhancer
    assert len(shorter) > 50 and {"-d", "-t", "-v", "-n", "-c"} <= letters
    for word in sorted((shorter - spellings) | letters):
        with pytest.raises(ValueError, match=f"^unknown option {word}[ ;]"):
            _command.parse_arguments(["a", "b", word, "1"])


def test_unknown_option_lists_the_valid_ones_in_cli_spelling(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["a", "b", "--bogus"]) == 2
    err = capsys.readouterr().err
    for option in ("--half2", "--batch-size", "--voxel-size", "--noise-stats", "--out-dir",
                   "--overwrite", "--confidence", "--tta", "-i", "-o", "-s", "--noiseStats"):
        assert option in err
    assert "batch_size" not in err and "noise_stats" not in err and len(err) < 500


def test_help_lists_the_deepemhancer_flags_and_exit_statuses() -> None:
    for text in ("-i, --inputMap", "-i2, --halfMap2", "-s, --samplingRate", "--noiseStats",
                 "-m, --binaryMask", "-b, --batch_size", "-g, --gpuIds", "tightTarget",
                 "143 SIGTERM", "129 SIGHUP", "130 Ctrl-C"):
        assert text in _command.HELP


def test_help_gives_each_option_one_line_and_fits_a_screen() -> None:
    """The option lines come from the fields of Arguments, the table the reader matches words
    against: each option once, with its value's name; the README's command-line section
    describes each of them."""
    lines = _command.HELP.splitlines()
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("## Command line", 1)[1]
    for field in dataclasses.fields(_command.Arguments)[3:]:
        flag = f"--{field.name.replace('_', '-')}"
        metavar = field.metadata["metavar"]
        spelt = [line.split() for line in lines if line.startswith(f"  {flag} ")]
        assert len(spelt) == 1 and (metavar is None or spelt[0][1] == metavar), flag
        assert f"`{flag}" in readme.split("\n## ", 1)[0], flag
    assert len(lines) <= 45 and max(map(len, lines)) <= 95


def test_sigterm_in_a_real_process(source: Path, model: Path, tmp_path: Path) -> None:
    """A separate process stopped by SIGTERM: exit 143, one line, nothing written."""
    script = (
        "import os, signal, sys\n"
        "from demhx import cli\n"
        "from demhx._progress import ProgressBar\n"
        "ProgressBar.__call__ = lambda self, done, total: (done and os.kill(os.getpid(), "
        "signal.SIGTERM))\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    output = tmp_path / "out" / "o.mrc"
    output.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script, str(source), str(output), "--model",
                             str(model), "--threads", "1", "--tiling", "reference", "-q"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 143, result.stderr
    assert result.stderr == "demhx: stopped by SIGTERM; no output written\n"
    assert list(output.parent.iterdir()) == []


def test_shard_runs_only_its_share_of_several_maps(tmp_path: Path, model: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--shard 2/2 over three maps runs the second (map 1 of 0, 1, 2) and writes nothing
    else; the option wins over a SLURM array's variables."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN", raising=False)
    volume = np.random.default_rng(1).standard_normal((16, 20, 24)).astype(np.float32) * 0.1
    volume[6:10, 8:12, 10:14] += 2.0
    maps = [write_mrc(tmp_path / f"{name}.mrc", volume) for name in ("first", "second", "third")]
    out = tmp_path / "out"
    argv = [*map(str, maps), "--out-dir", str(out), "--model", str(model), "--shard", "2/2"]
    assert cli.main(argv) == 0
    assert [path.name for path in out.iterdir()] == ["second.mrc"]
    err = capsys.readouterr().err
    assert "shard 2 of 2 (--shard): 1 of 3 maps" in err and "error" not in err
    with mrcfile.open(maps[1]) as source, mrcfile.open(out / "second.mrc") as output:
        assert output.data.shape == source.data.shape
