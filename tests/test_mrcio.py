"""MRC I/O: axis order, header round trips on synthetic and real maps, and refused inputs."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import real_map, sha256, stored_from_canonical, write_mrc
from hypothesis import given, settings
from hypothesis import strategies as st

from demhx import mrcio

LABEL = "demhx 0.1.0 model tight 1.0"
# Fields write_map sets itself: stats, labels, and the MRC2014 format fields.
WRITER_FIELDS = ("dmin", "dmax", "dmean", "rms", "nlabl", "label", "mode", "machst",
                 "nversion", "exttyp")
GEOMETRY_FIELDS = ("nx", "ny", "nz", "nxstart", "nystart", "nzstart", "mx", "my", "mz",
                   "cella", "cellb", "mapc", "mapr", "maps", "origin")
PERMUTATIONS = list(itertools.permutations((1, 2, 3)))


def _canonical(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _headers(path: Path) -> tuple[np.recarray, np.ndarray, np.ndarray]:
    with mrcfile.open(path, permissive=False) as mrc:
        return mrc.header.copy(), np.array(mrc.extended_header), np.array(mrc.data)


def _validates(path: Path) -> tuple[bool, str]:
    """``mrcfile.validate`` of a file, with what it printed."""
    report = io.StringIO()
    return mrcfile.validate(str(path), print_file=report), report.getvalue()


def _assert_round_trip(source: Path, output: Path) -> None:
    """Every header field equal except stats, labels and format; stored data identical;
    the output a valid MRC2014 file."""
    valid, report = _validates(output)
    assert valid, report
    before, before_extended, before_data = _headers(source)
    after, after_extended, after_data = _headers(output)
    for name in before.dtype.names:
        if name not in WRITER_FIELDS:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert int(after.mode) == 2 and after_data.dtype == np.float32
    np.testing.assert_array_equal(after_data, before_data)
    assert after_extended.tobytes() == before_extended.tobytes()
    count = int(before.nlabl)
    labels = [bytes(label) for label in after.label]
    assert labels[:count] == [bytes(label) for label in before.label[:count]]
    assert labels[count].decode().strip() == LABEL and int(after.nlabl) == count + 1
    assert float(after.dmax) == pytest.approx(float(before_data.max()))
    assert float(after.dmean) == pytest.approx(float(before_data.mean(dtype=np.float64)),
                                               rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- axis order


@pytest.mark.parametrize("axis_order", PERMUTATIONS)
def test_axis_order_gives_the_canonical_array(tmp_path: Path, axis_order: tuple) -> None:
    canonical = np.zeros((5, 6, 7), np.float32)
    canonical[1, 2, 3] = 1.0  # one hot voxel at z=1, y=2, x=3
    canonical[4, 0, 6] = 2.0
    path = write_mrc(tmp_path / "map.mrc", canonical, axis_order=axis_order,
                     voxel_size=(1.5, 1.25, 0.75))
    result = mrcio.read_map(path)
    np.testing.assert_array_equal(result.data, canonical)
    assert result.voxel_size == pytest.approx((1.5, 1.25, 0.75))
    assert result.data.flags.c_contiguous and result.data.dtype == np.float32


def test_axis_order_312_by_hand(tmp_path: Path) -> None:
    """mapc, mapr, maps = 3, 1, 2: columns run along z, rows along x, sections along y."""
    canonical = _canonical((4, 5, 6))
    stored = canonical.transpose(1, 2, 0)  # stored[y, x, z] = canonical[z, y, x]
    np.testing.assert_array_equal(stored_from_canonical(canonical, (3, 1, 2)), stored)
    path = write_mrc(tmp_path / "map.mrc", canonical, axis_order=(3, 1, 2))
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, stored)
    np.testing.assert_array_equal(mrcio.read_map(path).data, canonical)


@settings(max_examples=30, deadline=None)
@given(axis_order=st.sampled_from(PERMUTATIONS),
       shape=st.tuples(*[st.integers(2, 6)] * 3),
       voxel_size=st.tuples(*[st.floats(0.3, 5.0)] * 3),
       nstart=st.tuples(*[st.integers(-300, 300)] * 3),
       origin=st.tuples(*[st.floats(-1e3, 1e3, width=32)] * 3),
       dtype=st.sampled_from(["<f4", ">f4", "<i2", "f2"]))
def test_header_round_trip_property(axis_order: tuple, shape: tuple, voxel_size: tuple,
                                    nstart: tuple, origin: tuple, dtype: str) -> None:
    canonical = np.round(_canonical(shape) * 100).astype(np.float32)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        source = write_mrc(folder / "in.mrc", canonical, axis_order=axis_order, dtype=dtype,
                           voxel_size=voxel_size, nstart=nstart, origin=origin)
        read = mrcio.read_map(source)
        np.testing.assert_array_equal(read.data, canonical.astype(dtype).astype(np.float32))
        assert read.voxel_size == pytest.approx(voxel_size, rel=1e-5)
        output = folder / "out.mrc"
        mrcio.write_map(output, read.data, read, LABEL)
        _assert_round_trip(source, output)
        np.testing.assert_array_equal(mrcio.read_map(output).data, read.data)


# --------------------------------------------------------------------------- real maps


REAL_MAPS = ["emd_21457_seg.mrc", "emd_21457_seg_nstart.mrc", "emd_21457_seg_orig0.mrc",
             "EMD-3001.map", "2566_3J6B_9.mrc", "emd_5168.map", "emd_5168_monomer.mrc",
             "6824.mrc"]


@pytest.mark.parametrize("name", REAL_MAPS)
@pytest.mark.parametrize("suffix", [".mrc", ".map.gz"])
def test_real_map_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    source = real_map(name)
    digest = sha256(source)
    read = mrcio.read_map(source)
    output = tmp_path / f"out{suffix}"
    mrcio.write_map(output, read.data, read, LABEL)
    _assert_round_trip(source, output)
    again = mrcio.read_map(output)
    np.testing.assert_array_equal(again.data, read.data)
    assert again.voxel_size == read.voxel_size
    assert sha256(source) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]


@pytest.mark.parametrize("name", REAL_MAPS)
def test_real_map_output_is_mrc2014_with_the_input_geometry(tmp_path: Path, name: str) -> None:
    """Whatever the input's age (most shared maps are pre-2014, nversion 0), the output
    validates as MRC2014 and every geometric field and label text is the input's."""
    source = real_map(name)
    read = mrcio.read_map(source)
    output = tmp_path / "out.mrc"
    mrcio.write_map(output, read.data * np.float32(2), read, LABEL)
    valid, report = _validates(output)
    assert valid, report
    with mrcfile.open(source, permissive=True, header_only=True) as before, \
            mrcfile.open(output, header_only=True) as after:
        for field in GEOMETRY_FIELDS:
            np.testing.assert_array_equal(after.header[field], before.header[field], field)
        assert int(after.header.nversion) == mrcio.MRC2014_VERSION
        assert after.get_labels()[:-1] == before.get_labels()
        assert after.get_labels()[-1] == LABEL
    assert mrcio.read_map(output).voxel_size == read.voxel_size


def test_emd_3001_symmetry_records_are_typed_ccp4(tmp_path: Path) -> None:
    """EMD-3001 carries two symmetry operators in an untyped (pre-2014) extended header."""
    read = mrcio.read_map(real_map("EMD-3001.map"))
    mrcio.write_map(tmp_path / "out.mrc", read.data, read, LABEL)
    with mrcfile.open(tmp_path / "out.mrc", header_only=True) as mrc:
        assert bytes(mrc.header.exttyp) == b"CCP4" and int(mrc.header.nsymbt) == 160
        assert mrc.extended_header.tobytes() == read.extended_header.tobytes()
        assert mrc.extended_header.tobytes().startswith(b"X,  Y,  Z")


def _old_format(path: Path, extended: bytes, exttyp: bytes = b"") -> Path:
    """A pre-2014 style file: nversion 0, the given extended header and exttyp, nlabl
    disagreeing with the labels and a blank label between two text-filled ones."""
    write_mrc(path, _canonical((4, 5, 6)), extended_header=extended, nstart=(-2, 3, 1),
              origin=(1.5, -2.0, 7.25), axis_order=(2, 3, 1))
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        mrc.header.nversion = 0
        mrc.header.exttyp = exttyp
        mrc.header.label[0] = b"first"
        mrc.header.label[2] = b"third"
        mrc.header.nlabl = 1
    assert not _validates(path)[0]
    return path


def test_old_format_header_is_written_as_mrc2014(tmp_path: Path) -> None:
    records = b"X,Y,Z".ljust(80) + b"-X,Y+1/2,-Z".ljust(80)
    source = _old_format(tmp_path / "old.mrc", records)
    read = mrcio.read_map(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mrcio.write_map(tmp_path / "out.mrc", read.data, read, LABEL)
    valid, report = _validates(tmp_path / "out.mrc")
    assert valid, report
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        assert bytes(mrc.header.exttyp) == b"CCP4" and mrc.extended_header.tobytes() == records
        assert mrc.get_labels() == ["first", "third", LABEL] and int(mrc.header.nlabl) == 3
        for field in GEOMETRY_FIELDS:
            np.testing.assert_array_equal(mrc.header[field], read.header[field], field)
        np.testing.assert_array_equal(mrc.data, stored_from_canonical(read.data, (2, 3, 1)))


@pytest.mark.parametrize("exttyp", [b"", b"ABCD"])
def test_untyped_binary_extended_header_is_left_out_with_a_warning(
        tmp_path: Path, exttyp: bytes) -> None:
    source = _old_format(tmp_path / "old.mrc", bytes(range(256)), exttyp)
    read = mrcio.read_map(source)
    with pytest.warns(UserWarning, match=r"old\.mrc: its 256-byte extended header has no "
                                         r"MRC2014 type.*leaves it out"):
        mrcio.write_map(tmp_path / "out.mrc", read.data, read, LABEL)
    valid, report = _validates(tmp_path / "out.mrc")
    assert valid, report
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        assert int(mrc.header.nsymbt) == 0 and not bytes(mrc.header.exttyp).strip(b"\x00")
        np.testing.assert_array_equal(mrcio.read_map(tmp_path / "out.mrc").data, read.data)


def test_emd_3001_axis_order_and_anisotropic_voxels() -> None:
    source = real_map("EMD-3001.map")
    read = mrcio.read_map(source)
    with mrcfile.open(source) as mrc:
        assert (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps)) == (3, 1, 2)
        stored = np.array(mrc.data)
    # Stored (sections=y, rows=x, columns=z): canonical z is the column axis.
    np.testing.assert_array_equal(read.data, stored.transpose(2, 0, 1))
    assert read.data.shape == (73, 25, 43)
    assert read.voxel_size == pytest.approx((0.45875, 0.3925, 0.44825), rel=1e-5)


def test_emd_21457_conventions_share_one_grid(tmp_path: Path) -> None:
    names = ["emd_21457_seg.mrc", "emd_21457_seg_nstart.mrc", "emd_21457_seg_orig0.mrc"]
    maps = [mrcio.read_map(real_map(name)) for name in names]
    for other in maps[1:]:
        np.testing.assert_array_equal(other.data, maps[0].data)
    for read, name in zip(maps, names, strict=True):
        output = mrcio.check_output_path(tmp_path / name, [read.path], False)
        mrcio.write_map(output, read.data * 2, read, LABEL)
        with mrcfile.open(output) as after:
            np.testing.assert_array_equal(after.header.origin, read.header.origin)
            assert after.nstart.item() == (int(read.header.nxstart), int(read.header.nystart),
                                           int(read.header.nzstart))
    assert mrcio.read_map(tmp_path / names[1]).header.nxstart == 155


def test_gzip_input(tmp_path: Path) -> None:
    source = real_map("emd_5168.map")
    packed = tmp_path / "emd_5168.map.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    read = mrcio.read_map(packed)
    np.testing.assert_array_equal(read.data, mrcio.read_map(source).data)
    assert (int(read.header.nxstart), int(read.header.nystart)) == (-50, -50)


# --------------------------------------------------------------------------- writing


def test_label_appended_and_tenth_replaced(tmp_path: Path) -> None:
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)))
    with mrcfile.open(source, mode="r+") as mrc:
        mrc.header.nlabl = 0
        for index in range(10):
            mrc.add_label(f"label {index}")
    read = mrcio.read_map(source)
    mrcio.write_map(tmp_path / "out.mrc", read.data, read, "é" + "x" * 100)
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        labels = mrc.get_labels()
    assert len(labels) == 10 and labels[:9] == [f"label {i}" for i in range(9)]
    assert labels[9] == "?" + "x" * 79


def test_extended_header_and_big_endian_kept(tmp_path: Path) -> None:
    extended = bytes(range(256)) * 2
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)), dtype=">f4",
                       axis_order=(2, 3, 1), extended_header=extended)
    read = mrcio.read_map(source)
    mrcio.write_map(tmp_path / "out.mrc", read.data, read, LABEL)
    _assert_round_trip(source, tmp_path / "out.mrc")
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        assert mrc.extended_header.tobytes() == extended and bytes(mrc.header.exttyp) == b"MRCO"


@pytest.mark.parametrize(("voxel_size", "message"), [
    ((0.0, 1.0, 2.0), r"header voxel size is 2/1/0 Å \(x/y/z; from cella"),
    ((1.0, 2.0, 30.0), r"header voxel size \(x/y/z\) 30/2/1 Å is outside the range")])
def test_voxel_size_messages_read_x_y_z(tmp_path: Path, voxel_size: tuple,
                                        message: str) -> None:
    """Per axis, in the order --voxel-size X,Y,Z takes (the arrays are (z, y, x))."""
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)), voxel_size=voxel_size)
    with pytest.raises(ValueError, match=message):
        mrcio.read_map(source)


def test_voxel_size_override_is_written(tmp_path: Path) -> None:
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)), voxel_size=(0, 0, 0))
    with pytest.raises(ValueError,
                       match=r"in\.mrc: header voxel size is 0/0/0 Å.*pass voxel_size=$"):
        mrcio.read_map(source)
    read = mrcio.read_map(source, voxel_size=(1.5, 2.0, 2.5))
    assert read.voxel_size == (1.5, 2.0, 2.5)
    mrcio.write_map(tmp_path / "out.mrc", read.data, read, LABEL)
    again = mrcio.read_map(tmp_path / "out.mrc")
    assert again.voxel_size == pytest.approx((1.5, 2.0, 2.5))
    assert (int(again.header.mx), int(again.header.mz)) == (6, 4)
    assert mrcio.read_map(source, voxel_size=1.1).voxel_size == (1.1, 1.1, 1.1)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), (1.0, 2.0), "abc"])
def test_bad_voxel_size_override(tmp_path: Path, value: object) -> None:
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)))
    with pytest.raises(ValueError,
                       match=r"in\.mrc: voxel size .* pass a positive voxel_size= in Å$"):
        mrcio.read_map(source, voxel_size=value)  # type: ignore[arg-type]


def test_write_is_atomic_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)))
    read = mrcio.read_map(source)
    real_write = mrcio._write_mrc

    def interrupted(temporary: Path, *args: object) -> None:
        real_write(temporary, *args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(mrcio, "_write_mrc", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mrcio.write_map(tmp_path / "out.mrc", read.data, read, LABEL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc"]


def test_write_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    read = mrcio.read_map(write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6))))
    output = tmp_path / "out.mrc"
    output.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"out\.mrc: .*pass overwrite= to replace it"):
        mrcio.write_map(output, read.data, read, LABEL)
    assert output.read_bytes() == b"old"
    mrcio.write_map(output, read.data, read, LABEL, overwrite=True)
    np.testing.assert_array_equal(mrcio.read_map(output).data, read.data)


def test_write_checks_the_data(tmp_path: Path) -> None:
    read = mrcio.read_map(write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6))))
    with pytest.raises(ValueError, match=r"out\.mrc: data shape"):
        mrcio.write_map(tmp_path / "out.mrc", read.data[1:], read, LABEL)
    bad = read.data.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"out\.mrc: .*NaN"):
        mrcio.write_map(tmp_path / "out.mrc", bad, read, LABEL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc"]


# --------------------------------------------------------------------------- output paths


def test_output_path_checks(tmp_path: Path) -> None:
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)))
    (tmp_path / "sub").mkdir()
    assert mrcio.check_output_path(tmp_path / "out.mrc.gz", [source], False) == \
        tmp_path / "out.mrc.gz"
    cases = [
        (tmp_path / "no" / "out.mrc", FileNotFoundError, "no: output folder does not exist"),
        (tmp_path / "out.txt", ValueError, r"out\.txt: output name must end in \.mrc"),
        (source, ValueError, r"in\.mrc: output is the input"),
        (tmp_path / "sub" / ".." / "in.mrc", ValueError, r"in\.mrc: output is the input"),
    ]
    for path, kind, message in cases:
        with pytest.raises(kind, match=message):
            mrcio.check_output_path(path, [source], True)
    (tmp_path / "folder.mrc").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.mrc"):
        mrcio.check_output_path(tmp_path / "folder.mrc", [source], True)


def test_output_path_same_inode_and_existing(tmp_path: Path) -> None:
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)))
    os.link(source, tmp_path / "hard.mrc")
    (tmp_path / "soft.map").symlink_to(source)
    for alias in ("hard.mrc", "soft.map"):
        with pytest.raises(ValueError, match=f"{alias}: output is the input"):
            mrcio.check_output_path(tmp_path / alias, [source], True)
    shutil.copy(source, tmp_path / "copy.mrc")
    with pytest.raises(FileExistsError,
                       match=r"copy\.mrc: output exists; pass overwrite= to replace"):
        mrcio.check_output_path(tmp_path / "copy.mrc", [source], False)
    assert mrcio.check_output_path(tmp_path / "copy.mrc", [source], True).name == "copy.mrc"


def test_output_folder_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mrcio.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="output folder is not writable"):
        mrcio.check_output_path(tmp_path / "out.mrc", [], False)


# --------------------------------------------------------------------------- bad inputs


def _valid_bytes(tmp_path: Path, shape: tuple[int, int, int] = (4, 5, 6), **header: int
                 ) -> bytes:
    path = write_mrc(tmp_path / "valid.mrc", _canonical(shape))
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        for name, value in header.items():
            mrc.header[name] = value
    data = path.read_bytes()
    path.unlink()
    return data


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[bytes | None, type, str]]:
    valid = _valid_bytes(tmp_path)
    return {
        "empty.mrc": (b"", ValueError, "is empty"),
        "header.mrc": (valid[:1024], ValueError, "truncated"),
        "truncated.mrc": (valid[:-7], ValueError, "truncated"),
        "longer.mrc": (valid + b"\0" * 8, ValueError, "longer than its header"),
        "random.mrc": (np.random.default_rng(0).bytes(5000), ValueError, "not an MRC"),
        "text.map": (b"this is not a map\n" * 100, ValueError, "not an MRC"),
        "short.mrc": (b"MAP 12", ValueError, "shorter than an MRC header"),
        "image.mrc": (_valid_bytes(tmp_path, (1, 5, 6)), ValueError, "2-D image"),
        "stack.mrc": (_valid_bytes(tmp_path, ispg=0, mz=1), ValueError, "stack of 4 2-D"),
        "volumes.mrc": (_valid_bytes(tmp_path, ispg=401), ValueError, "stack of volumes"),
        "complex.mrc": (_valid_bytes(tmp_path, mode=4), ValueError, "complex"),
        "mode.mrc": (_valid_bytes(tmp_path, mode=101), ValueError, "mode 101 is not supported"),
        "axes.mrc": (_valid_bytes(tmp_path, mapc=1, mapr=1), ValueError, "axis order"),
        "huge.mrc": (_valid_bytes(tmp_path, nx=1 << 30, ny=1 << 30, nz=1 << 30), ValueError,
                     "truncated"),
        "negative.mrc": (_valid_bytes(tmp_path, nx=-4), ValueError, "not positive"),
        "zero-voxel.mrc": (_valid_bytes(tmp_path, cella=(0, 0, 0)), ValueError,
                           "header voxel size is 0/0/0 Å"),
        "negative-voxel.mrc": (_valid_bytes(tmp_path, mx=-6), ValueError, "voxel size"),
    }


def test_bad_inputs_are_refused_by_name(tmp_path: Path) -> None:
    for name, (content, kind, message) in _bad_inputs(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(content)  # type: ignore[arg-type]
        with pytest.raises(kind, match=message) as caught:
            mrcio.read_map(path)
        text = str(caught.value)
        assert text.startswith(f"{path}: ") and "\n" not in text, text
        assert "; " in text, text  # the problem, then the fix


def test_huge_dimensions_refused_when_compressed(tmp_path: Path) -> None:
    content = _valid_bytes(tmp_path, nx=1 << 30, ny=1 << 30, nz=1 << 30)
    path = tmp_path / "huge.mrc.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(ValueError, match=r"huge\.mrc\.gz: .*truncated"):
        mrcio.read_map(path)
    path.write_bytes(gzip.compress(content)[:-20])
    with pytest.raises(ValueError, match=r"huge\.mrc\.gz: "):
        mrcio.read_map(path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_voxels_refused(tmp_path: Path, value: float) -> None:
    canonical = _canonical((4, 5, 6))
    canonical[2, 3, 4] = value
    path = write_mrc(tmp_path / "bad.mrc", canonical)
    with pytest.raises(ValueError, match=r"bad\.mrc: contains 1 NaN or infinite voxels"):
        mrcio.read_map(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.mrc: no such file"):
        mrcio.read_map(tmp_path / "absent.mrc")
    with pytest.raises(IsADirectoryError, match=f"{tmp_path.name}: is a folder"):
        mrcio.read_map(tmp_path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_mrc(tmp_path / "locked.mrc", _canonical((4, 5, 6)))
    monkeypatch.setattr(mrcio.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=r"locked\.mrc: cannot be read"):
        mrcio.read_map(path)


@pytest.mark.parametrize("dtype", ["i1", "i2", "u2", "f2", ">f4"])
def test_integer_and_half_modes_read_as_float32(tmp_path: Path, dtype: str) -> None:
    canonical = np.round(_canonical((4, 5, 6)) * 20)
    path = write_mrc(tmp_path / "in.mrc", np.abs(canonical), dtype=dtype, axis_order=(3, 2, 1))
    read = mrcio.read_map(path)
    assert read.data.dtype == np.float32
    np.testing.assert_array_equal(read.data, np.abs(canonical).astype(dtype).astype(np.float32))


# --------------------------------------------------------------------------- plausibility


@pytest.mark.parametrize("voxel_size", [0.001, 0.19, 20.5, 1e6])
def test_implausible_voxel_sizes_refused(tmp_path: Path, voxel_size: float) -> None:
    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)), voxel_size=(voxel_size,) * 3)
    with pytest.raises(ValueError, match=r"in\.mrc: header voxel size .* outside the range "
                       r"demhx accepts .*with voxel_size=$"):
        mrcio.read_map(source)
    assert mrcio.read_map(source, voxel_size=1.0).voxel_size == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"ok\.mrc: voxel_size= .*\(1 nm = 10 Å\)"):
        mrcio.read_map(write_mrc(tmp_path / "ok.mrc", _canonical((4, 5, 6))),
                       voxel_size=voxel_size)


@pytest.mark.parametrize(("shape", "words"), [((1, 1, 1), "a single voxel"),
                                              ((1, 1, 5), "a 1-D line of voxels"),
                                              ((1, 4, 5), "a 2-D image")])
def test_degenerate_shapes_named(tmp_path: Path, shape: tuple[int, int, int], words: str
                                 ) -> None:
    source = write_mrc(tmp_path / "in.mrc", np.ones(shape, np.float32))
    with pytest.raises(ValueError, match=f"in.mrc: is {words}"):
        mrcio.read_map(source)


def test_non_regular_files_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mrc"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"pipe\.mrc: is not a regular file"):
        mrcio.read_map(fifo)
    with pytest.raises(ValueError, match=r"pipe\.mrc: output exists and is not a regular file"):
        mrcio.check_output_path(fifo, [], overwrite=True)


def test_negative_extended_header_and_corrupt_gzip(tmp_path: Path) -> None:
    content = bytearray(_valid_bytes(tmp_path))
    content[92:96] = np.array([-8], dtype="<i4").tobytes()
    (tmp_path / "neg.mrc").write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"neg\.mrc: header extended-header size \(nsymbt\) is "
                       "negative"):
        mrcio.read_map(tmp_path / "neg.mrc")
    packed = bytearray(gzip.compress(_valid_bytes(tmp_path, (40, 40, 40))))
    packed[-8:-4] = bytes(b ^ 0xFF for b in packed[-8:-4])
    (tmp_path / "bad.mrc.gz").write_bytes(bytes(packed))  # its CRC no longer matches
    with pytest.raises(ValueError, match=r"bad\.mrc\.gz: compressed data are corrupt"):
        mrcio.read_map(tmp_path / "bad.mrc.gz")


# --------------------------------------------------------------------------- writing together


def test_write_maps_all_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read = mrcio.read_map(write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6))))
    real_write, calls = mrcio._write_mrc, []

    def second_fails(temporary: Path, *args: object) -> None:
        calls.append(temporary)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(temporary, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(mrcio, "_write_mrc", second_fails)
    items = [(tmp_path / "a.mrc", read.data, "a"), (tmp_path / "b.mrc", read.data * 2, "b")]
    with pytest.raises(OSError, match="no space left on the device") as caught:
        mrcio.write_maps(items, read)
    assert caught.value.filename == str(tmp_path / "b.mrc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc"]
    monkeypatch.setattr(mrcio, "_write_mrc", real_write)
    mrcio.write_maps(items, read)
    assert mrcio.read_map(tmp_path / "b.mrc").data == pytest.approx(read.data * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc", "b.mrc", "in.mrc"]


def test_a_failed_move_removes_the_maps_already_moved(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    read = mrcio.read_map(write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6))))
    real_replace, moves = os.replace, []

    def second_fails(source: Path, target: Path) -> None:
        moves.append(target)
        if len(moves) == 2:
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(mrcio.os, "replace", second_fails)
    items = [(tmp_path / "a.mrc", read.data, "a"), (tmp_path / "b.mrc", read.data, "b")]
    with pytest.raises(OSError):
        mrcio.write_maps(items, read)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc"]


# --------------------------------------------------------------------------- temporary files


def test_temporary_names_carry_machine_and_process(tmp_path: Path) -> None:
    temporary = mrcio.new_temporary(tmp_path / "out.mrc")
    found = mrcio.TEMPORARY_PATTERN.match(temporary.name)
    assert found is not None and found["name"] == "out.mrc"
    assert found["owner"] == mrcio._owner() and int(found["pid"]) == os.getpid()


def test_stale_temporaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    monkeypatch.setattr(mrcio, "_reported", set())
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    owner = mrcio._owner()
    dead = tmp_path / f".a.mrc.demhx-{owner}-{finished.pid}-00000000.tmp"
    alive = tmp_path / f".a.mrc.demhx-{owner}-{os.getppid()}-00000000.tmp"
    mine = mrcio.new_temporary(tmp_path / "a.mrc")
    foreign = tmp_path / ".a.mrc.demhx-00000000-7-00000000.tmp"
    unrelated = tmp_path / ".a.mrc.12345678.tmp"
    for path in (dead, alive, foreign, unrelated):
        path.write_bytes(b"x")
    os.utime(foreign, (0.0, 0.0))
    with pytest.warns(UserWarning) as caught:
        assert mrcio.clean_stale_temporaries(tmp_path) == [dead]
    assert [str(w.message).split(":")[0] for w in caught] == [str(foreign), str(dead)]
    assert alive.exists() and mine.exists() and foreign.exists() and unrelated.exists()
    with warnings.catch_warnings(record=True) as again:  # each file is named once
        warnings.simplefilter("always")
        assert mrcio.clean_stale_temporaries(tmp_path) == []
    assert again == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_reused_pid_does_not_keep_a_stale_temporary(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose PID now belongs to a process started after the file was last written was
    left by an earlier process (the writer starts before it creates the file): removed."""
    import subprocess
    import sys
    import time

    monkeypatch.setattr(mrcio, "_reported", set())
    owner = mrcio._owner()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reused = tmp_path / f".a.mrc.demhx-{owner}-{sleeper.pid}-00000000.tmp"
        current = tmp_path / f".b.mrc.demhx-{owner}-{sleeper.pid}-00000000.tmp"
        reused.write_bytes(b"x")
        current.write_bytes(b"x")
        os.utime(reused, (time.time() - 120, time.time() - 120))  # written before it started
        with pytest.warns(UserWarning, match="left by an interrupted demhx run"):
            assert mrcio.clean_stale_temporaries(tmp_path) == [reused]
        assert current.exists()  # possibly the live process's own file: kept
    finally:
        sleeper.kill()
        sleeper.wait()


def test_messages_name_parameters_and_read_as_flags_on_the_command_line(tmp_path: Path) -> None:
    from demhx.errors import cli_terms

    def shown(error: pytest.ExceptionInfo[BaseException]) -> str:
        return " ".join(cli_terms(str(error.value)).split())  # as the command line shows it

    source = write_mrc(tmp_path / "in.mrc", _canonical((4, 5, 6)), voxel_size=(0, 0, 0))
    with pytest.raises(ValueError) as caught:
        mrcio.read_map(source)
    assert str(caught.value).endswith("not positive; pass voxel_size=")
    assert shown(caught).endswith("not positive; pass --voxel-size")
    with pytest.raises(ValueError) as caught:
        mrcio.read_map(source, voxel_size=-1.0)
    assert shown(caught).endswith("pass a positive --voxel-size in Å")
    with pytest.raises(ValueError) as caught:
        mrcio.read_map(source, voxel_size=0.01)
    assert str(caught.value).startswith(f"{source}: voxel_size= 0.01/0.01/0.01 Å is outside")
    assert shown(caught).startswith(f"{source}: --voxel-size 0.01/0.01/0.01 Å is outside")
    with pytest.raises(FileExistsError) as caught:
        mrcio.check_output_path(source.with_name("in.mrc"), [], False)
    assert shown(caught) == (f"{source}: output exists; pass --overwrite to replace it or "
                             "choose another output path")


@pytest.mark.parametrize("suffix", [".gz", ".bz2"])
def test_a_compressed_map_is_decompressed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               suffix: str) -> None:
    import bz2
    import gzip

    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    plain = write_mrc(tmp_path / "plain.mrc", volume)
    packed = tmp_path / f"map.mrc{suffix}"
    opener = gzip.open if suffix == ".gz" else bz2.open
    with opener(packed, "wb") as stream:
        stream.write(plain.read_bytes())
    opened: list[Path] = []
    original = mrcio._open_compressed

    def counting(path: Path, compression: str) -> object:
        opened.append(path)
        return original(path, compression)

    monkeypatch.setattr(mrcio, "_open_compressed", counting)
    np.testing.assert_array_equal(mrcio.read_map(packed).data, volume)
    assert opened == [packed]
