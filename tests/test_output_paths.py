"""Every path demhx writes is checked before any work: never an input, never another output,
within the file system's limits; nothing is created before the checks pass, and every output
validates."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import sha256, write_mrc

from demhx import cli
from demhx.mrcio import TEMPORARY_PATTERN, new_temporary

NAME_MAX = 255  # bytes in a file name on the test's file system (ext4, tmpfs, xfs)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Run the command line, expect a usage error (2) on one line holding ``words``."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("demhx: error: "), err
    for word in words:
        assert word in err, err
    return err


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def test_preview_that_is_the_input_is_refused(tmp_path: Path, model: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A valid MRC named .png passed as --preview (with --overwrite) is never replaced."""
    pytest.importorskip("matplotlib")
    data = np.random.default_rng(1).standard_normal((20, 24, 28)).astype(np.float32)
    source = write_mrc(tmp_path / "in.png", data)
    before, files = sha256(source), _files(tmp_path)
    _refused([str(source), str(tmp_path / "o.mrc"), "--preview", str(source), "--overwrite",
              "--model", str(model)], capsys, "preview is the input")
    assert sha256(source) == before and _files(tmp_path) == files


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_preview_linked_to_the_input_is_refused(tmp_path: Path, source: Path, model: Path,
                                                link: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "picture.png"
    (os.symlink if link == "symlink" else os.link)(source, picture)
    before = sha256(source)
    _refused([str(source), str(tmp_path / "o.mrc"), "--preview", str(picture), "--overwrite",
              "--model", str(model)], capsys, "is the input")
    assert sha256(source) == before and not (tmp_path / "o.mrc").exists()


def test_preview_named_like_the_output_creates_nothing(
        tmp_path: Path, source: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--preview OUT`` (a folder named like the output) is refused before a folder exists,
    and the output can then be written."""
    pytest.importorskip("matplotlib")
    output, files = tmp_path / "o.mrc", _files(tmp_path)
    _refused([str(source), str(output), "--preview", str(output), "--model", str(model)],
             capsys, "preview", "o.mrc")
    assert _files(tmp_path) == files
    assert cli.main([str(source), str(output), "--model", str(model), "--quiet"]) == 0
    assert output.is_file()


def test_preview_that_is_the_confidence_map_is_refused(
        tmp_path: Path, source: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    files = _files(tmp_path)
    _refused([str(source), str(tmp_path / "o.mrc"), "--confidence", str(tmp_path / "c.mrc"),
              "--preview", str(tmp_path / "c.mrc"), "--model", str(model)], capsys, "c.mrc")
    assert _files(tmp_path) == files


def test_batch_preview_hard_linked_to_an_input_is_refused(
        tmp_path: Path, source: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "pictures").mkdir()
    os.link(source, tmp_path / "pictures" / "in_x.png")
    before, files = sha256(source), _files(tmp_path)
    _refused([str(source), "--suffix", "_x", "--preview", str(tmp_path / "pictures"),
              "--overwrite", "--model", str(model)], capsys, "is the input")
    assert sha256(source) == before and _files(tmp_path) == files


def test_output_name_near_the_limit_is_written(tmp_path: Path, source: Path,
                                               model: Path) -> None:
    """A legal name the temporary name would push past the limit is still written."""
    output = tmp_path / ("o" * (NAME_MAX - len(".mrc")) + ".mrc")
    assert cli.main([str(source), str(output), "--model", str(model), "--quiet"]) == 0
    assert mrcfile.validate(str(output))
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == sorted(
        ["in.mrc", output.name])


def test_temporary_name_fits_the_name_limit(tmp_path: Path) -> None:
    temporary = new_temporary(tmp_path / ("é" * 125 + ".mrc"))
    assert temporary.exists() and len(os.fsencode(temporary.name)) <= NAME_MAX
    assert TEMPORARY_PATTERN.match(temporary.name)


@pytest.mark.parametrize("where", ["OUT", "--confidence", "--preview"])
def test_name_over_the_limit_is_refused_before_any_work(
        tmp_path: Path, source: Path, model: Path, where: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    if where == "--preview":
        pytest.importorskip("matplotlib")
    extension = ".png" if where == "--preview" else ".mrc"
    long = str(tmp_path / ("o" * (NAME_MAX + 1 - len(extension)) + extension))
    argv = [str(source), long if where == "OUT" else str(tmp_path / "o.mrc"),
            "--model", str(model)]
    if where != "OUT":
        argv += [where, long]
    files = _files(tmp_path)
    _refused(argv, capsys, "256 bytes", "limit of 255", "shorter")
    assert _files(tmp_path) == files


def test_path_over_path_max_is_refused(tmp_path: Path, source: Path, model: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path.joinpath(*["d" * 200] * 21) / "o.mrc"
    _refused([str(source), str(deep), "--model", str(model)], capsys, "PATH_MAX", "shorter")


def test_symlink_loop_is_refused(tmp_path: Path, source: Path, model: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    loop = tmp_path / "loop.mrc"
    os.symlink(loop.name, loop)
    _refused([str(source), str(loop), "--model", str(model)], capsys, "loop.mrc",
             "loop of symbolic links", "fix or remove the link")
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    _refused([str(source), str(tmp_path / "a" / "o.mrc"), "--model", str(model)], capsys,
             "loop of symbolic links")


def test_negative_space_group_is_written_valid(tmp_path: Path, model: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = np.random.default_rng(2).standard_normal((20, 24, 28)).astype(np.float32) * 0.1
    data[8:12, 10:14, 12:16] += 2.0
    source = write_mrc(tmp_path / "in.mrc", data, ispg=-1)
    with mrcfile.open(source, permissive=True) as mrc:
        assert int(mrc.header.ispg) == -1
    output = tmp_path / "o.mrc"
    assert cli.main([str(source), str(output), "--model", str(model)]) == 0
    assert "space group (ispg) is -1" in capsys.readouterr().err
    assert mrcfile.validate(str(output))
    with mrcfile.open(output) as mrc:
        assert int(mrc.header.ispg) == 1


@pytest.mark.parametrize("suffix", ["/../elsewhere/x", "_a/b", "..x"])
def test_suffix_with_a_path_is_refused(tmp_path: Path, model: Path, suffix: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    data = np.random.default_rng(3).standard_normal((20, 24, 28)).astype(np.float32)
    source = write_mrc(folder / "in.mrc", data)
    files = _files(tmp_path)
    _refused([str(source), "--suffix", suffix, "--model", str(model)], capsys, "--suffix",
             "--out-dir")
    assert _files(tmp_path) == files
