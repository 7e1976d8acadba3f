"""demhx-relion, the RELION external job: its command line, nodes file, markers and runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import real_map

from demhx import relion

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "External/job012/"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A RELION project folder as the working directory (RELION runs jobs from there); the
    demhx that jobs start is this checkout's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return tmp_path


def _header(path: Path) -> tuple:
    with mrcfile.open(path, header_only=True) as mrc:
        header = mrc.header
        return (tuple(mrc.voxel_size.item()), tuple(header.origin.item()),
                (int(header.nxstart), int(header.nystart), int(header.nzstart)),
                (int(header.nx), int(header.ny), int(header.nz)),
                (int(header.mapc), int(header.mapr), int(header.maps)))


def _markers(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("RELION_JOB_*")}


def _nodes(folder: Path) -> list[tuple[str, str]]:
    """The (name, type label) rows of RELION_OUTPUT_NODES.star's output_nodes loop."""
    lines = (folder / relion.NODES_FILE).read_text(encoding="utf-8").splitlines()
    start = lines.index("data_output_nodes")
    labels = [line.split()[0] for line in lines[start:] if line.startswith("_rln")]
    assert labels == ["_rlnPipeLineNodeName", "_rlnPipeLineNodeTypeLabel"]
    rows = [line.split() for line in lines[start:]
            if line.strip() and not line.startswith(("_", "loop_", "data_", "#"))]
    return [(row[0], row[1]) for row in rows]


def test_relion_command_line_is_read_exactly() -> None:
    """RELION's words (options in its order, a Params row, --j, additional arguments) give
    the map, mask, threads and confidence; every other word goes to demhx in order."""
    job = relion.parse_arguments([
        "--o", FOLDER, "--in_3dref", "Refine3D/job010/run_half1_class001_unfil.mrc",
        "--in_mask", "MaskCreate/job011/mask.mrc", "--half2",
        "Refine3D/job010/run_half2_class001_unfil.mrc", "--confidence", "--j", "4",
        "--device", "cuda:0,1", "--tta", "3", "--pipeline_control", FOLDER])
    assert (job.output_dir, job.map, job.mask, job.threads, job.confidence) == (
        FOLDER, "Refine3D/job010/run_half1_class001_unfil.mrc", "MaskCreate/job011/mask.mrc",
        4, True)
    assert job.demhx_arguments == ("--half2", "Refine3D/job010/run_half2_class001_unfil.mrc",
                                   "--device", "cuda:0,1", "--tta", "3")
    assert job.demhx_words() == [
        job.map, FOLDER + "enhanced.mrc", "--mask", job.mask, "--threads", "4",
        "--confidence", FOLDER + "confidence.mrc", "--overwrite", *job.demhx_arguments]
    assert job.outputs() == [(FOLDER + "enhanced.mrc", "DensityMap.mrc.demhx.enhanced"),
                             (FOLDER + "confidence.mrc", "Image3D.mrc.demhx.confidence")]
    # The CCP-EM pipeliner's relion.external job spells the reference --in_3Dref.
    assert relion.parse_arguments(["--o", FOLDER, "--in_3Dref", "a.mrc"]).map == "a.mrc"


@pytest.mark.parametrize(("words", "message"), [
    (["--in_3dref", "a.mrc"], "no output folder"),
    (["--o", FOLDER], "no input map"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--in_3Dref", "b.mrc"], "given twice"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--confidence", "--confidence"], "given twice"),
    (["--o", FOLDER, "--in_3dref"], "--in_3dref needs a value"),
    (["--o", FOLDER, "--in_3dref", "--j", "2"], "--in_3dref needs a value"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--j", "0"], "whole number of threads"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--j", "two"], "whole number of threads"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--in_parts", "p.star"], "--in_parts"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--mask", "m.mrc"], "--in_mask"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--threads", "2"], "Running tab"),
    (["--o", FOLDER, "--in_3dref", "a.mrc", "--overwrite"], "always replaced"),
    (["--o", FOLDER, "--in_3d", "a.mrc"], "no input map"),  # no prefix matching
])
def test_bad_relion_command_lines_are_refused(words: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        relion.parse_arguments(words)


def test_nodes_file_lists_outputs_with_relion_type_labels() -> None:
    text = relion.nodes_star([("External/job012/enhanced.mrc", relion.ENHANCED_LABEL)])
    assert "data_output_nodes\n\nloop_\n_rlnPipeLineNodeName #1\n_rlnPipeLineNodeTypeLabel #2\n"\
           "External/job012/enhanced.mrc DensityMap.mrc.demhx.enhanced\n" in text
    # RELION 4/5 file nodes by the label's first word: the map is offered as a 3D map.
    assert relion.ENHANCED_LABEL.split(".")[:2] == ["DensityMap", "mrc"]
    assert relion.CONFIDENCE_LABEL.split(".")[:2] == ["Image3D", "mrc"]
    with pytest.raises(ValueError, match="spaces"):
        relion.nodes_star([("My Project/enhanced.mrc", relion.ENHANCED_LABEL)])


def test_pyproject_declares_the_console_script() -> None:
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as stream:
        scripts = tomllib.load(stream)["project"]["scripts"]
    assert scripts["demhx-relion"] == "demhx.relion:run"


@pytest.mark.slow
def test_run_on_a_shared_map_writes_map_nodes_and_success(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As RELION runs it (relative paths, from the project folder), with a mask: the map
    keeps the input's header, the nodes file lists it, the success marker is last."""
    source = project / "Import" / "job001" / "map.mrc"
    source.parent.mkdir(parents=True)
    shutil.copy(real_map("emd_5168_monomer.mrc"), source)
    with mrcfile.open(source) as mrc:  # the particle: the map's own support
        mask = (np.abs(mrc.data) > 0).astype(np.float32)
        voxel_size, origin = mrc.voxel_size, mrc.header.origin
    with mrcfile.new(project / "mask.mrc") as out:
        out.set_data(mask)
        out.voxel_size, out.header.origin = voxel_size, origin
    folder = project / FOLDER
    folder.mkdir(parents=True)
    (folder / relion.FAILURE_FILE).touch()  # an earlier run's marker is cleared
    status = relion.main(["--o", FOLDER, "--in_3dref", "Import/job001/map.mrc", "--in_mask",
                          "mask.mrc", "--tiling", "fast", "--j", "2"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert _markers(folder) == {relion.SUCCESS_FILE}
    assert _nodes(folder) == [(FOLDER + "enhanced.mrc", "DensityMap.mrc.demhx.enhanced")]
    assert _header(folder / "enhanced.mrc") == _header(source)
    assert "demhx: wrote External/job012/enhanced.mrc" in out and "cubes" in out
    assert "demhx: error" not in err


def test_confidence_map_is_a_second_node(project: Path, source: Path, model: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    status = relion.main(["--o", FOLDER, "--in_3dref", str(source), "--model", str(model),
                          "--confidence", "--tta", "3", "--j", "1"])
    assert status == 0, capsys.readouterr().err
    folder = project / FOLDER
    assert _nodes(folder) == [(FOLDER + "enhanced.mrc", relion.ENHANCED_LABEL),
                              (FOLDER + "confidence.mrc", relion.CONFIDENCE_LABEL)]
    assert _header(folder / "confidence.mrc") == _header(source)
    assert _markers(folder) == {relion.SUCCESS_FILE}


def test_bad_input_leaves_the_failure_marker_and_one_line(project: Path) -> None:
    """The console entry (python -m demhx.relion) on a file that is not a map."""
    (project / "broken.mrc").write_bytes(b"not a map")
    result = subprocess.run([sys.executable, "-m", "demhx.relion", "--o", FOLDER,
                             "--in_3dref", "broken.mrc", "--j", "1"],
                            capture_output=True, text=True, timeout=120)
    folder = project / FOLDER
    assert result.returncode == 2
    assert _markers(folder) == {relion.FAILURE_FILE}
    assert not (folder / relion.NODES_FILE).exists() and not (folder / "enhanced.mrc").exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("demhx: error: broken.mrc"), result.stderr


def test_refused_call_leaves_the_failure_marker(project: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert relion.main(["--o", FOLDER, "--in_parts", "particles.star", "--j", "1"]) == 2
    assert _markers(project / FOLDER) == {relion.FAILURE_FILE}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("demhx-relion: error: --in_parts")
    assert relion.main(["--in_3dref", "a.mrc"]) == 2  # no folder: nowhere for a marker
    assert capsys.readouterr().err.startswith("demhx-relion: error: no output folder")


def test_demhx_that_writes_nothing_is_a_failure(project: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--version among the parameters: demhx exits 0 without a map; RELION must not be told
    the job succeeded."""
    assert relion.main(["--o", FOLDER, "--in_3dref", "a.mrc", "--version"]) == 1
    assert _markers(project / FOLDER) == {relion.FAILURE_FILE}
    assert "demhx wrote no External/job012/enhanced.mrc" in capsys.readouterr().err


def test_abort_request_stops_the_run(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RELION's Abort button: RELION_JOB_ABORT_NOW appears while demhx runs (here a stand-in
    that only waits); the run stops, the request is removed, the aborted marker left."""
    folder = project / FOLDER
    folder.mkdir(parents=True)
    job = relion.parse_arguments(["--o", FOLDER, "--in_3dref", "a.mrc"])
    waiting = [sys.executable, "-c", "import sys, time; print('demhx: 0/9 cubes', "
               "file=sys.stderr, flush=True); time.sleep(60)"]
    request = threading.Timer(0.3, (folder / relion.ABORT_REQUEST_FILE).touch)
    request.start()
    started = time.monotonic()
    status = relion.run_job(job, program=waiting)
    assert time.monotonic() - started < 20
    assert status == 128 + 15  # stopped by SIGTERM
    assert _markers(folder) == {relion.ABORTED_FILE}
    out = capsys.readouterr().out
    assert "demhx: 0/9 cubes" in out and "aborted at RELION's request" in out
