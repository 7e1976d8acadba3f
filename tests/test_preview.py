"""The before/after picture: central slices, the per-map contrast rule, the PNG and --preview."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import write_mrc
from onnx_fixtures import identity_path

from demhx import batch, cli, preview
from demhx.errors import USAGE_ERRORS, MissingExtra

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def volume() -> np.ndarray:
    """A (z, y, x) = (10, 14, 18) map: noise plus a bright off-centre block."""
    data = np.random.default_rng(3).standard_normal((10, 14, 18)).astype(np.float32)
    data[3:8, 2:7, 11:16] += 8.0
    return data


@pytest.fixture
def source(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).standard_normal((20, 24, 28)).astype(np.float32) * 0.1
    data[8:12, 10:14, 12:16] += 3.0
    return write_mrc(tmp_path / "in.mrc", data)


def test_central_slices_orientation() -> None:
    nz, ny, nx = 5, 6, 7
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    code = (100 * z + 10 * y + x).astype(np.float32)
    xy, xz, yz = preview.central_slices(code)
    assert xy.shape == (ny, nx) and xz.shape == (nz, nx) and yz.shape == (nz, ny)
    # Every panel is at the centre of the third axis, its vertical axis pointing up.
    assert xy[0, 0] == 100 * (nz // 2) + 10 * (ny - 1) and xy[-1, -1] == 100 * (nz // 2) + nx - 1
    assert xz[0, 0] == 100 * (nz - 1) + 10 * (ny // 2) and xz[-1, 3] == 10 * (ny // 2) + 3
    assert yz[0, 0] == 100 * (nz - 1) + nx // 2 and yz[-1, 4] == 40 + nx // 2


def test_image_shape_range_and_layout(volume: np.ndarray) -> None:
    nz, ny, nx = volume.shape
    image = preview.preview_image(volume, volume * 2, gap=3)
    assert image.shape == (2 * max(ny, nz) + 3, 2 * nx + ny + 2 * 3)
    assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
    # The gaps are background; the xy panel of the top row is the grey input slice.
    assert np.all(image[:, nx:nx + 3] == preview.BACKGROUND)
    assert np.all(image[max(ny, nz):max(ny, nz) + 3] == preview.BACKGROUND)
    row = preview.preview_row(volume)
    assert np.array_equal(image[:ny, :nx], row.panels[0])


def test_same_contrast_rule_for_both_rows(volume: np.ndarray) -> None:
    # A positive affine change of the values (what the rule ignores) gives identical rows.
    top, bottom = preview.preview_panels(volume, 3.5 * volume - 2.0)
    for first, second in zip(top.panels, bottom.panels, strict=True):
        np.testing.assert_allclose(first, second, atol=1e-5)
    np.testing.assert_allclose(bottom.limits, [3.5 * v - 2.0 for v in top.limits], rtol=1e-5)
    height = 2 * max(volume.shape[:2]) + preview.GAP
    image = preview.preview_image(volume, 10 * volume + 1)
    half = (height - preview.GAP) // 2
    np.testing.assert_allclose(image[:half], image[half + preview.GAP:], atol=1e-5)


def test_limits_are_the_percentiles_of_each_maps_slices(volume: np.ndarray) -> None:
    output = np.where(volume > 4, volume, 0).astype(np.float32)  # a masked output
    rows = preview.preview_panels(volume, output)
    for data, row in zip((volume, output), rows, strict=True):
        values = np.concatenate([s.ravel() for s in preview.central_slices(data)])
        np.testing.assert_allclose(row.limits, np.percentile(values, preview.PERCENTILES))
        low, high = row.limits
        pixels = np.concatenate([p.ravel() for p in row.panels])
        np.testing.assert_allclose(pixels, np.clip((values - low) / (high - low), 0, 1),
                                   atol=1e-6)
        assert np.mean(values > high) <= 0.005 + 1 / values.size


def test_constant_map_is_black() -> None:
    row = preview.preview_row(np.full((4, 5, 6), 2.5, np.float32))
    assert row.limits == (2.5, 3.5) and all(np.all(p == 0) for p in row.panels)


def test_refuses_mismatched_or_flat_input(volume: np.ndarray) -> None:
    with pytest.raises(ValueError, match="differs from the input"):
        preview.preview_image(volume, volume[:, :, :-1])
    with pytest.raises(ValueError, match="not a 3-D"):
        preview.central_slices(volume[0])


def test_preview_file_path(tmp_path: Path) -> None:
    assert preview.preview_file_path(tmp_path / "p.PNG", "o.mrc") == tmp_path / "p.PNG"
    assert preview.preview_file_path(tmp_path / "pics", "x/out.map.gz") == tmp_path / "pics/out.png"


def test_check_preview_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.png"):
        preview.check_preview_path(tmp_path / "p.jpg")
    with pytest.raises(FileNotFoundError, match="preview folder does not exist"):
        preview.check_preview_path(tmp_path / "absent" / "p.png")
    existing = tmp_path / "p.png"
    existing.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="preview exists; pass overwrite= to replace it"):
        preview.check_preview_path(existing)
    assert preview.check_preview_path(existing, overwrite=True) == existing


def test_write_preview_is_a_valid_png(volume: np.ndarray, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = preview.write_preview(volume, volume * 0.5, tmp_path / "p.png", names=("a", "b"))
    width, height = _png_size(path)
    assert width == 900 and 300 < height < 2000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    reference = tmp_path / "reference"
    reference.touch()  # the permissions of any new file (the umask's)
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05


def test_row_titles_name_the_role_once(volume: np.ndarray) -> None:
    rows = preview.preview_panels(volume, volume * 2)
    plain = preview.row_titles(rows, None)
    named = preview.row_titles(rows, ("in.mrc", "out.mrc"))
    assert [title.split("   ")[0] for title in plain] == ["input", "output"]
    assert [title.split("   ")[0] for title in named] == ["input: in.mrc", "output: out.mrc"]
    assert all(title.count("input") + title.count("output") == 1 for title in plain + named)
    # The grey scale of each row is its own: the output row's limits are twice the input's.
    assert plain[0].split("   ")[1] != plain[1].split("   ")[1]


def test_missing_matplotlib_names_the_fix(monkeypatch: pytest.MonkeyPatch,
                                          volume: np.ndarray, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(ImportError, match=r'pip install "demhx\[preview\]"'):
        preview.write_preview(volume, volume, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_preview_checks_before_any_work_need_matplotlib(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """The API's checks of a run's preview refuse a missing matplotlib as a usage error (exit
    status 2 on the command line), before any map is read."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r'pip install "demhx\[preview\]"'):
        preview.checked_preview_path(tmp_path / "p.png", tmp_path / "out.mrc", [])
    with pytest.raises(MissingExtra, match="needs matplotlib"):
        batch.plan_maps([tmp_path / "a.mrc"], tmp_path / "out", None, preview=tmp_path)
    assert MissingExtra in USAGE_ERRORS and issubclass(MissingExtra, ImportError)
    assert list(tmp_path.iterdir()) == []


def test_cli_preview(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    model = identity_path(tmp_path / "models")
    # A --preview folder (created) holds <output stem>.png.
    output, picture = tmp_path / "out.mrc", tmp_path / "pics" / "out.png"
    argv = [str(source), str(output), "--model", str(model), "--preview", str(picture.parent)]
    assert cli.main(argv) == 0
    assert f"demhx: wrote preview {picture}" in capsys.readouterr().err
    assert _png_size(picture)[0] == 900
    # An existing preview is refused before the run, like an existing output.
    output.unlink()
    assert cli.main(argv) == 2
    assert "preview exists; pass --overwrite" in capsys.readouterr().err
    assert not output.exists()
    assert cli.main(argv + ["--overwrite"]) == 0
    with mrcfile.open(output) as stream:
        assert stream.data.shape == (20, 24, 28)


def test_cli_missing_matplotlib_stops_before_the_run(
        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    output = tmp_path / "out.mrc"
    argv = [str(source), str(output), "--model", "no-such-model", "--preview", "p.png"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == ('demhx: error: --preview needs matplotlib, which is not installed; '
                   'pip install "demhx[preview]"\n')
    assert not output.exists()
