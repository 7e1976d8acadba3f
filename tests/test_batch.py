"""Several maps per call: output names, one model load, going on past a bad map, the table."""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import synthetic_map, write_mrc
from onnx_fixtures import identity_path

from demhx import _command, batch, cli, multi_device, pipeline
from demhx.errors import describe_error


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return identity_path(tmp_path / "models")


@pytest.fixture
def maps(tmp_path: Path) -> list[Path]:
    """Three small maps: two in ``tmp_path/in``, one gzip-compressed in ``tmp_path/more``."""
    (tmp_path / "in").mkdir()
    (tmp_path / "more").mkdir()
    paths = [tmp_path / "in" / "a.mrc", tmp_path / "in" / "b.map",
             tmp_path / "more" / "c.mrc.gz"]
    for seed, path in enumerate(paths):
        volume = synthetic_map("non-cubic", noise_std=0.1, seed=seed)[:24, :28, :32]
        write_mrc(path, volume, voxel_size=(1.1, 1.1, 1.1))
    return paths


def _bytes(paths: list[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def _table_rows(err: str) -> dict[str, list[str]]:
    """The summary table's rows by input path (columns split on runs of spaces)."""
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("input "))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("demhx:"):
            break
        cells = line.split(None, 5)
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize(("name", "out_dir", "suffix", "expected"), [
    ("x/a.mrc", "out", None, "out/a.mrc"),
    ("x/a.mrc", None, "_demhx", "x/a_demhx.mrc"),
    ("x/a.map.gz", None, "_demhx", "x/a_demhx.map.gz"),
    ("x/a.MRC", "out", "-s", "out/a-s.MRC"),
    ("x/a.ccp4.bz2", "out", None, "out/a.ccp4"),
    ("x/a.b.map", None, ".e", "x/a.b.e.map"),
    ("x/emd_1.dat", "out", None, "out/emd_1.mrc"),
])
def test_output_path(name: str, out_dir: str | None, suffix: str | None, expected: str) -> None:
    assert batch.output_path(Path(name), out_dir, suffix) == Path(expected)


def test_output_paths_refuse_clashes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.mrc", tmp_path / "sub" / "a.mrc"
    with pytest.raises(ValueError, match="would both write this output"):
        batch.output_paths([a, b], tmp_path / "out")
    with pytest.raises(ValueError, match="would both write this output"):
        batch.output_paths([a, a], suffix="_d")
    with pytest.raises(ValueError, match="inputs are never overwritten"):
        batch.output_paths([a, tmp_path / "a_d.mrc"], suffix="_d")
    with pytest.raises(ValueError, match="inputs are never overwritten"):
        batch.output_paths([a], tmp_path)
    with pytest.raises(ValueError, match="suffix= is empty"):
        batch.output_paths([a], suffix=" ")
    with pytest.raises(ValueError, match="out_dir=DIR or suffix=SUF"):
        batch.output_paths([a])
    a.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        batch.output_paths([b], a)


def test_output_paths_with_dir_and_suffix(tmp_path: Path) -> None:
    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    assert batch.output_paths([a, b], tmp_path / "out", "_d") == [
        tmp_path / "out" / "a_d.mrc", tmp_path / "out" / "b_d.mrc"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["a", "b", "c", "--out-dir", "o"],
     {"input": "a", "output": None, "more_inputs": ("b", "c"), "out_dir": "o"}),
    (["a", "--suffix", "_d"], {"input": "a", "output": None, "suffix": "_d"}),
    (["--suffix=-x", "a", "0002", "-q"],
     {"input": "a", "output": None, "more_inputs": ("0002",), "suffix": "-x", "quiet": True}),
    (["a", "b", "--preview", "p.png"], {"input": "a", "output": "b", "preview": "p.png"}),
    (["a", "--out-dir", "o", "--noise-stats", "0,1"],
     {"input": "a", "output": None, "out_dir": "o", "noise_stats": (0.0, 1.0)}),
])
def test_parse_several_maps(argv: list[str], expected: dict) -> None:
    args = _command.parse_arguments(argv)
    assert args == _command.Arguments(**expected)
    assert args.batch == ("out_dir" in expected or "suffix" in expected)


@pytest.mark.parametrize(("argv", "message"), [
    (["--out-dir", "o"], "missing IN; usage: demhx IN [IN ...] --out-dir DIR"),
    (["a", "b", "--out-dir", "o", "--half2", "h"], "--half2 does not combine with several"),
    (["a", "--suffix", "_d", "--half2", "h"], "--half2 does not combine with several"),
    (["a", "b", "--suffix", "_d", "--noise-stats", "0,1"], "--noise-stats gives one map's"),
    (["a", "b", "c"], "for several maps demhx IN [IN ...] --out-dir DIR|--suffix SUF"),
    (["a", "--suffix"], "--suffix needs a value"),
])
def test_several_maps_usage_errors(argv: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_several_maps_one_model_load(maps: list[Path], model: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    loads = []
    real_load = multi_device.load_runtime
    monkeypatch.setattr(multi_device, "load_runtime",
                        lambda *a, **k: loads.append(1) or real_load(*a, **k))
    before = _bytes(maps)
    out = tmp_path / "enhanced"  # created
    argv = [*map(str, maps), "--out-dir", str(out), "--model", str(model), "--device", "cpu"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert len(loads) == 1 and _bytes(maps) == before
    outputs = [out / "a.mrc", out / "b.map", out / "c.mrc.gz"]
    for source, output in zip(maps, outputs, strict=True):
        with mrcfile.open(source) as first, mrcfile.open(output) as second:
            assert second.data.shape == first.data.shape
            assert second.voxel_size == first.voxel_size
        assert f"wrote {output}" in err
    rows = _table_rows(err)
    assert [rows[str(m)][1:3] for m in maps] == [[str(o), "ok"] for o in outputs]
    assert all(int(rows[str(m)][3]) > 0 for m in maps)
    assert "map 2 of 3" in err and "error" not in err


def test_bad_map_among_good_ones(maps: list[Path], model: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A map that passes the input check but fails while running (a constant map) is
    reported and the others run."""
    constant = write_mrc(tmp_path / "in" / "constant.mrc", np.ones((24, 28, 32), np.float32))
    argv = [str(maps[0]), str(constant), str(maps[1]), "--suffix", "_x",
            "--model", str(model), "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert (tmp_path / "in" / "a_x.mrc").is_file() and (tmp_path / "in" / "b_x.map").is_file()
    assert not (tmp_path / "in" / "constant_x.mrc").exists()
    rows = _table_rows(err)
    assert rows[str(maps[0])][2] == "ok" and rows[str(maps[1])][2] == "ok"
    assert rows[str(constant)][2:4] == ["failed", "-"]
    assert "constant" in rows[str(constant)][5]
    assert err.rstrip().splitlines()[-1] == "demhx: error: 1 of 3 maps failed; see the table above"


def test_unreadable_inputs_stop_the_run_before_the_first_map(
        maps: list[Path], model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every input is checked before the first map runs (and before the model loads): one
    line names each unreadable one, exit 2, nothing written."""
    loads = []
    monkeypatch.setattr(multi_device, "load_runtime", lambda *a, **k: loads.append(1))
    broken = tmp_path / "in" / "broken.mrc"
    broken.write_bytes(b"not a map" * 200)
    missing = tmp_path / "in" / "missing.mrc"
    out = tmp_path / "out"
    argv = [str(maps[0]), str(broken), str(maps[1]), str(missing), "--out-dir", str(out),
            "--model", str(model)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("demhx: error: 2 of 4 input maps cannot "
                                                    "be read, so none was run: ")
    assert f"{broken}: not an MRC/CCP4 map" in err and f"{missing}: no such file" in err
    assert not out.exists() and not loads
    # One unreadable input: its own error and exit status.
    assert cli.main([str(maps[0]), str(missing), "--out-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"demhx: error: {missing}: no such file; check the path\n"


def test_inputs_checked_without_reading_the_data(maps: list[Path], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.mrc"
    truncated.write_bytes(maps[0].read_bytes()[:-100])
    batch.check_inputs(maps)  # gzip included
    with pytest.raises(ValueError, match="truncated.mrc: header promises 32×28×24 voxels"):
        batch.check_inputs([maps[0], truncated])
    folder = tmp_path / "in"
    with pytest.raises(IsADirectoryError, match="is a folder"):
        batch.check_inputs([folder])


def test_device_line_printed_once(maps: list[Path], model: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*map(str, maps), "--out-dir", str(tmp_path / "out"), "--model", str(model),
            "--device", "cpu", "--threads", "1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    device = [index for index, line in enumerate(lines) if line.startswith("demhx: device cpu")]
    first_map = next(i for i, line in enumerate(lines) if line.startswith("demhx: map 1 of 3"))
    assert len(device) == 1 and device[0] < first_map, lines


def test_outputs_never_overwrite_inputs(maps: list[Path], model: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    clash = maps[0].with_name("a_d.mrc")
    clash.write_bytes(maps[1].read_bytes())
    inputs = [maps[0], clash]
    before = _bytes(inputs)
    for extra in (["--suffix", "_d"], ["--out-dir", str(maps[0].parent)]):
        assert cli.main([*map(str, inputs), *extra, "--model", str(model), "--overwrite"]) == 2
        assert "inputs are never overwritten" in capsys.readouterr().err
    assert _bytes(inputs) == before
    assert sorted(p.name for p in maps[0].parent.iterdir()) == ["a.mrc", "a_d.mrc", "b.map"]


def test_existing_output_needs_overwrite(maps: list[Path], model: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.map").write_bytes(b"keep me")
    argv = [str(maps[0]), str(maps[1]), "--out-dir", str(out), "--model", str(model), "-q"]
    assert cli.main(argv) == 1
    rows = _table_rows(capsys.readouterr().err)
    assert rows[str(maps[0])][2] == "ok" and rows[str(maps[1])][2] == "failed"
    assert "output exists; pass --overwrite" in rows[str(maps[1])][5]
    assert (out / "b.map").read_bytes() == b"keep me" and (out / "a.mrc").is_file()
    # With --overwrite both are (re)written; --quiet then prints nothing.
    assert cli.main(argv + ["--overwrite"]) == 0
    assert capsys.readouterr() == ("", "")
    with mrcfile.open(out / "b.map") as stream:
        assert stream.data.shape == (24, 28, 32)


def test_several_previews_in_a_folder(maps: list[Path], model: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out, pictures = tmp_path / "out", tmp_path / "pictures"
    argv = [*map(str, maps[:2]), "--out-dir", str(out), "--model", str(model), "-q"]
    assert cli.main(argv + ["--preview", str(tmp_path / "p.png")]) == 2
    assert "with several maps give a folder" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(argv + ["--preview", str(pictures)]) == 0
    assert sorted(p.name for p in pictures.iterdir()) == ["a.png", "b.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures.iterdir())


def test_missing_matplotlib_stops_before_any_map(maps: list[Path], model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out"
    argv = [*map(str, maps), "--out-dir", str(out), "--model", str(model), "--preview", "pics"]
    assert cli.main(argv) == 2
    assert 'pip install "demhx[preview]"' in capsys.readouterr().err and not out.exists()


def test_model_error_stops_before_any_map(maps: list[Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main([*map(str, maps), "--out-dir", str(out), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-model" in err and not out.exists()


def test_interrupt_keeps_finished_maps(maps: list[Path], model: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    real = pipeline.Enhancer.process_file

    def stop_at_second(self: pipeline.Enhancer, source: Path, *args: object, **kwargs: object):
        if Path(source) == maps[1]:
            raise KeyboardInterrupt
        return real(self, source, *args, **kwargs)

    monkeypatch.setattr(pipeline.Enhancer, "process_file", stop_at_second)
    out = tmp_path / "out"
    assert cli.main([*map(str, maps), "--out-dir", str(out), "--model", str(model), "-q"]) == 130
    err = capsys.readouterr().err
    rows = _table_rows(err)
    assert rows[str(maps[0])][2] == "ok"
    assert all(" ".join(rows[str(m)][2:4]) == "not run" for m in maps[1:])
    assert sorted(p.name for p in out.iterdir()) == ["a.mrc"]
    assert err.rstrip().endswith("interrupted; only the maps marked ok were written")


def test_enhance_many_runs_every_map_in_order(maps: list[Path], model: Path,
                                             tmp_path: Path) -> None:
    """The plan's folders are created, every map runs, and each result is passed on as its
    map finishes."""
    out = tmp_path / "out" / "deeper"
    plan = batch.plan_maps(maps, out, "_x")
    seen: list[batch.MapResult] = []
    results = batch.enhance_many(pipeline.Enhancer(str(model), device="cpu"), plan,
                                 on_result=seen.append)
    assert results == seen and [result.status for result in results] == ["ok"] * 3
    assert [result.output for result in results] == plan.outputs
    assert all(output.is_file() for output in plan.outputs)


@pytest.mark.parametrize("written", [False, True])
def test_enhance_many_interrupted_marks_the_maps_not_run(
        maps: list[Path], model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        written: bool) -> None:
    """Ctrl-C in the second map: a KeyboardInterrupt holding one result per map; the second
    counts as ok only when its output was already moved into place."""
    real = pipeline.Enhancer.process_file

    def stop_in_second(self: pipeline.Enhancer, source: Path, *args: object, **kwargs: object):
        if Path(source) != maps[1]:
            return real(self, source, *args, **kwargs)
        if written:
            real(self, source, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Enhancer, "process_file", stop_in_second)
    plan = batch.plan_maps(maps, tmp_path / "out", None)
    seen: list[batch.MapResult] = []
    with pytest.raises(KeyboardInterrupt) as stopped:
        batch.enhance_many(pipeline.Enhancer(str(model), device="cpu"), plan,
                           on_result=seen.append)
    assert isinstance(stopped.value, batch.BatchInterrupted)
    assert type(stopped.value.interrupt) is KeyboardInterrupt
    assert [result.status for result in seen] == ["ok"]
    assert [result.status for result in stopped.value.results] == [
        "ok", "ok" if written else "not run", "not run"]
    assert [result.source for result in stopped.value.results] == plan.sources
    assert plan.outputs[1].is_file() == written and not plan.outputs[2].exists()


def test_summary_table_aligns_columns() -> None:
    results = [batch.MapResult(Path("long/input.mrc"), Path("o.mrc"), batch.OK, seconds=12.25),
               batch.MapResult(Path("b.mrc"), Path("out/b.mrc"), batch.FAILED,
                               ValueError("b.mrc: bad\nmap"), seconds=0.04)]
    table = batch.summary_table(results, describe_error)
    lines = table.splitlines()
    assert lines[0].split() == ["input", "output", "status", "cubes", "seconds", "reason"]
    assert lines[1] == "long/input.mrc  o.mrc      ok          -     12.2"
    assert lines[2] == "b.mrc           out/b.mrc  failed      -      0.0  b.mrc: bad map"


@pytest.mark.parametrize("total", [0, 1, 2, 3, 7, 10])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 11])
def test_shards_partition_the_maps(total: int, count: int) -> None:
    """Every map is in exactly one shard of N, each shard keeps the given order, and map i
    is in shard i % N + 1."""
    shards = [batch.shard_indices(total, batch.Shard(index, count))
              for index in range(1, count + 1)]
    assert sorted(i for shard in shards for i in shard) == list(range(total))
    assert all(shard == sorted(shard) for shard in shards)
    assert all(i % count == index for index, shard in enumerate(shards) for i in shard)
    assert batch.shard_indices(total, None) == list(range(total))


@pytest.mark.parametrize(("text", "expected"), [
    ("1/1", (1, 1)), ("2/4", (2, 4)), ("4/4", (4, 4)), (" 3 / 10 ", (3, 10)),
])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    shard = batch.parse_shard(text)
    assert (shard.index, shard.count, shard.origin) == (*expected, "shard=")


@pytest.mark.parametrize(("text", "message"), [
    ("0/2", "shard=0/2: K must be between 1 and N = 2"),
    ("3/2", "shard=3/2: K must be between 1 and N = 2"),
    ("1/0", "shard=1/0: N must be at least 1"),
    ("0/0", "N must be at least 1"),
    ("-1/2", "shard='-1/2': expected K/N"),
    ("2", "shard='2': expected K/N"),
    ("a/b", "shard='a/b': expected K/N"),
    ("1/2/3", "expected K/N"),
    ("1.5/2", "expected K/N"),
])
def test_bad_shards_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="give shard=K/N with 1 <= K <= N") as error:
        batch.parse_shard(text)
    assert message in str(error.value)


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "2"}, None),  # COUNT missing: not an array's share
    ({"SLURM_ARRAY_TASK_COUNT": "4"}, None),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4",
      "SLURM_ARRAY_TASK_MIN": "1"}, (4, 4)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3",
      "SLURM_ARRAY_TASK_MIN": "0"}, (1, 3)),  # --array=0-2
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "3",
      "SLURM_ARRAY_TASK_MIN": "10"}, (3, 3)),  # --array=10-12
])
def test_shard_from_environment(environ: dict[str, str],
                                expected: tuple[int, int] | None) -> None:
    shard = batch.shard_from_environment(environ)
    assert (None if shard is None else (shard.index, shard.count)) == expected
    if shard is not None:
        assert shard.origin == f"SLURM_ARRAY_TASK_ID={environ['SLURM_ARRAY_TASK_ID']}"


@pytest.mark.parametrize("environ", [
    {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"},  # 0-based without MIN
    {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
    {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "0"},
    {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"},
    {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": ""},
])
def test_bad_slurm_variables_are_refused(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="shard=") as error:
        batch.shard_from_environment(environ)
    text = str(error.value)
    assert "SLURM_ARRAY_TASK_ID=" in text and "pass shard=K/N" in text
    assert "\n" not in text


def test_shard_option_overrides_the_environment() -> None:
    environ = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert batch.choose_shard("2/3", environ) == batch.Shard(2, 3, "shard=")
    assert batch.choose_shard(None, environ) == batch.Shard(1, 4, "SLURM_ARRAY_TASK_ID=1")
    assert batch.choose_shard(None, {}) is None


def test_shard_line() -> None:
    shard = batch.Shard(2, 4, "SLURM_ARRAY_TASK_ID=2")
    assert batch.shard_line(shard, 3, 10) == "shard 2 of 4 (SLURM_ARRAY_TASK_ID=2): 3 of 10 maps"
    assert "none of the 1 maps falls to it; nothing to do" in batch.shard_line(shard, 0, 1)


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    (["a", "b", "c", "--out-dir", "o", "--shard", "2/3"], {}, batch.Shard(2, 3)),
    (["a", "b", "--suffix", "_d", "--shard=1/1"], {}, batch.Shard(1, 1)),
    (["a", "b", "--out-dir", "o"], {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"},
     batch.Shard(3, 4, "SLURM_ARRAY_TASK_ID=3")),
    (["a", "b", "--out-dir", "o", "--shard", "1/2"],
     {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, batch.Shard(1, 2)),
    (["a", "b"], {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, None),  # IN OUT
    (["a", "b", "--out-dir", "o"], {}, None),
])
def test_parse_shard_option_and_environment(argv: list[str], environ: dict[str, str],
                                            expected: batch.Shard | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (batch.TASK_ID, batch.TASK_COUNT, batch.TASK_MIN):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert _command.parse_arguments(argv).shard == expected


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["a", "--out-dir", "o", "--shard", "3/2"], {}, "--shard 3/2: K must be between 1 and N"),
    (["a", "--out-dir", "o", "--shard", "1/0"], {}, "--shard 1/0: N must be at least 1"),
    (["a", "--out-dir", "o", "--shard", "half"], {}, "--shard 'half': expected K/N"),
    (["a", "--out-dir", "o", "--shard"], {}, "--shard needs a value"),
    (["a", "--out-dir", "o", "--shard", "1/2", "--shard", "2/2"], {}, "--shard is given twice"),
    (["a", "--out-dir", "o", "--shar", "1/2"], {}, "unknown option --shar (did you mean --shard"),
    (["a", "b", "--shard", "1/2"], {}, "--shard 1/2 shares several maps among jobs"),
    (["a", "--out-dir", "o"], {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"},
     "SLURM_ARRAY_TASK_ID=0, SLURM_ARRAY_TASK_COUNT=2: gives --shard 0/2, outside 1..N"),
])
def test_shard_usage_errors(argv: list[str], environ: dict[str, str], message: str,
                            monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    for name in (batch.TASK_ID, batch.TASK_COUNT, batch.TASK_MIN):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("demhx: error: ") and message in err


def test_shard_from_slurm_runs_its_maps_only(maps: list[Path], model: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Task 10 of --array=10-11 is shard 1 of 2: the first and third maps."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    out = tmp_path / "enhanced"
    assert cli.main([*map(str, maps), "--out-dir", str(out), "--model", str(model)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["a.mrc", "c.mrc.gz"]
    err = capsys.readouterr().err
    assert list(_table_rows(err)) == [str(maps[0]), str(maps[2])]
    assert "shard 1 of 2 (SLURM_ARRAY_TASK_ID=10): 2 of 3 maps" in err


def test_shard_without_maps_says_so_and_exits_0(maps: list[Path], model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "enhanced"
    argv = [*map(str, maps), "--out-dir", str(out), "--model", str(model), "--shard", "4/4"]
    assert cli.main(argv) == 0
    assert not out.exists()
    err = capsys.readouterr().err
    assert err == "demhx: shard 4 of 4 (--shard): none of the 3 maps falls to it; nothing to do\n"
