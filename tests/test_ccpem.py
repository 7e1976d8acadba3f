"""The CCP-EM pipeliner (Doppio) job: its entry point, command, nodes and runs in a project.

Tests that need the pipeliner are skipped without it (``pip install ".[ccpem]"``); the
checks that demhx itself never imports it run everywhere.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
from conftest import real_map

ROOT = Path(__file__).resolve().parents[1]
JOB_TYPE = "demhx.postprocess.local_sharpening"
needs_pipeliner = pytest.mark.skipif(
    importlib.util.find_spec("pipeliner") is None,
    reason="the CCP-EM pipeliner is not installed: pip install \".[ccpem]\"")


def test_only_the_job_module_imports_the_pipeliner() -> None:
    """No other module of demhx imports the pipeliner or the job module, so neither
    ``import demhx`` nor the demhx command can load it."""
    for path in sorted((ROOT / "demhx").glob("*.py")):
        if path.name == "ccpem.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {f"{node.module}.{alias.name}" if node.module else alias.name
                  for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  for alias in node.names}
        assert not {name for name in names
                    if name.split(".")[0] == "pipeliner" or "ccpem" in name}, path.name


def _imported(result: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules a ``python -X importtime`` run imported (from its stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_import_demhx_and_a_demhx_run_leave_the_pipeliner_unloaded(
        tmp_path: Path, source: Path, model: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    library = subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         "import demhx, demhx.relion; demhx.Enhancer, demhx.EnhanceOptions, demhx.enhance"],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=60)
    command = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "demhx", str(source),
         str(tmp_path / "out.mrc"), "--model", str(model), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=120)
    assert library.returncode == 0 and command.returncode == 0, command.stderr[-2000:]
    assert (tmp_path / "out.mrc").is_file() and "demhx.pipeline" in _imported(library)
    assert "onnxruntime" in _imported(command)  # the run's imports are all listed
    for result in (library, command):
        loaded = {name for name in _imported(result)
                  if name.split(".")[0] == "pipeliner" or name == "demhx.ccpem"}
        assert not loaded, loaded


def test_pyproject_registers_the_job_in_the_extra() -> None:
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as stream:
        project = tomllib.load(stream)["project"]
    assert project["entry-points"]["ccpem_pipeliner.jobs"] == {
        JOB_TYPE: "demhx.ccpem:DemhxJob"}
    assert any(requirement.startswith("ccpem-pipeliner")
               for requirement in project["optional-dependencies"]["ccpem"])
    assert not any("pipeliner" in requirement for requirement in project["dependencies"])


@needs_pipeliner
def test_pipeliner_finds_the_job_through_its_entry_point() -> None:
    from pipeliner.job_factory import get_job_types

    from demhx.ccpem import DemhxJob

    points = importlib.metadata.entry_points(group="ccpem_pipeliner.jobs", name=JOB_TYPE)
    assert [point.value for point in points] == ["demhx.ccpem:DemhxJob"], (
        "the installed demhx has no pipeliner entry point: reinstall it (pip install -e .)")
    assert next(iter(points)).load() is DemhxJob and DemhxJob.PROCESS_NAME == JOB_TYPE
    jobs = get_job_types("demhx")
    assert [type(job) for job in jobs] == [DemhxJob]
    assert jobs[0].jobinfo.is_available, jobs[0].jobinfo.unavailable_message
    assert jobs[0].jobinfo.programs[0].get_version() is not None


def _job(**options: Any) -> Any:
    from pipeliner.job_factory import job_from_dict

    job = job_from_dict({"_rlnJobTypeLabel": JOB_TYPE, **options})
    job.output_dir = "Demhx/job007/"
    return job


@needs_pipeliner
def test_command_is_the_demhx_cli_with_the_jobs_fields() -> None:
    job = _job(input_map="Refine3D/job005/run_half1_class001_unfil.mrc",
               half_map_2="Refine3D/job005/run_half2_class001_unfil.mrc",
               mask="MaskCreate/job006/mask.mrc", model="tight", device="cuda:0,1",
               nr_threads=4, tiling="fast", confidence=True, other_args="--tta 3")
    *version, run = job.get_commands()
    assert [command.cmd[1:] for command in version] == [["--version"]]
    assert Path(run.cmd[0]).name == "demhx"
    assert run.cmd[1:] == [
        "Refine3D/job005/run_half1_class001_unfil.mrc", "Demhx/job007/enhanced.mrc",
        "--half2", "Refine3D/job005/run_half2_class001_unfil.mrc",
        "--mask", "MaskCreate/job006/mask.mrc", "--model", "tight", "--device", "cuda:0,1",
        "--threads", "4", "--tiling", "fast", "--confidence", "Demhx/job007/confidence.mrc",
        "--overwrite", "--tta", "3"]
    job.create_output_nodes()
    assert [(node.name, node.type) for node in job.output_nodes] == [
        ("Demhx/job007/enhanced.mrc", "DensityMap.mrc.demhx.enhanced"),
        ("Demhx/job007/confidence.mrc", "Image3D.mrc.demhx.confidence")]
    job.create_input_nodes()
    assert [node.type for node in job.input_nodes] == [
        "DensityMap.mrc", "DensityMap.mrc.halfmap", "Mask3D.mrc"]


@needs_pipeliner
def test_model_file_replaces_the_shipped_choice() -> None:
    job = _job(input_map="map.mrc", model="ONNX file", model_file="my.onnx")
    run = job.get_commands()[-1].cmd
    assert run[run.index("--model") + 1] == "my.onnx" and "--confidence" not in run
    job.create_output_nodes()
    assert [node.name for node in job.output_nodes] == ["Demhx/job007/enhanced.mrc"]


@needs_pipeliner
@pytest.mark.parametrize(("options", "message"), [
    ({"device": "gpu"}, "cuda:all"),
    ({"half_map_2": "map.mrc"}, "same file"),
    ({"other_args": "--device cpu"}, "--device is set by the job"),
    ({"other_args": "--confidence=c.mrc"}, "set by the job"),
    ({"model": "ONNX file"}, ""),  # a model file is then required
])
def test_invalid_fields_are_refused_before_a_run(options: dict[str, str],
                                                 message: str) -> None:
    job = _job(input_map="map.mrc", **options)
    errors = [error for error in job.validate_joboptions() if error.type == "error"]
    assert errors and message in " ".join(error.message for error in errors)
    assert not [error for error in _job(input_map="map.mrc").validate_joboptions()
                if error.type == "error"]


@pytest.fixture
def pipeliner_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A new, empty pipeliner project in a temporary folder (the working directory); the
    demhx that jobs start is this checkout's."""
    from pipeliner.api.manage_project import PipelinerProject

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return PipelinerProject(make_new_project=True)


def _recorded(job_name: str) -> tuple[str, list[tuple[str, str]]]:
    """The job's status and output nodes (name, type) as the project's pipeline has them."""
    from pipeliner.project_graph import ProjectGraph

    with ProjectGraph(read_only=True) as pipeline:
        process = pipeline.find_process(job_name)
        return process.status, [(node.name, node.type) for node in process.output_nodes]


def _geometry(path: Path) -> tuple:
    with mrcfile.open(path, header_only=True) as mrc:
        header = mrc.header
        return (mrc.voxel_size.item(), header.origin.item(), header.cella.item(),
                (int(header.nxstart), int(header.nystart), int(header.nzstart)),
                (int(header.mapc), int(header.mapr), int(header.maps)))


@needs_pipeliner
@pytest.mark.slow
def test_job_runs_on_a_shared_map_and_records_the_enhanced_map(
        pipeliner_project: Any, tmp_path: Path) -> None:
    source = tmp_path / "Maps" / "emd_5168_monomer.mrc"
    source.parent.mkdir()
    shutil.copy(real_map("emd_5168_monomer.mrc"), source)
    job = pipeliner_project.run_job(
        {"_rlnJobTypeLabel": JOB_TYPE, "input_map": "Maps/emd_5168_monomer.mrc",
         "device": "cpu", "tiling": "fast", "nr_threads": 2}, run_in_foreground=True)
    folder = tmp_path / job.output_dir
    assert _recorded(job.output_dir) == (
        "Succeeded", [(job.output_dir + "enhanced.mrc", "DensityMap.mrc.demhx.enhanced")]), (
        (folder / "run.err").read_text())
    assert _geometry(folder / "enhanced.mrc") == _geometry(source)  # the origin is kept
    metadata = job.gather_metadata()
    assert metadata["HeaderKept"] and metadata["Device"] == "cpu"
    assert metadata["CubesRun"] > 0 and metadata["Seconds"] > 0
    assert metadata["OutputGeometry"]["Origin"] == pytest.approx([-33.098, -24.388, -90.584])
    assert "demhx 0." in (folder / "run.out").read_text()  # the version, for deposition


@needs_pipeliner
def test_half_maps_and_confidence_with_a_model_file(
        pipeliner_project: Any, tmp_path: Path, mrc_writer: Any, blob_volume: Any,
        model: Path) -> None:
    """Two half-maps (synthetic: the same blobs, different noise), an ONNX file as the
    model, and the confidence map as a second node."""
    noise = np.random.default_rng(3).normal(0.0, 0.05, blob_volume.shape)
    mrc_writer(tmp_path / "half1.mrc", blob_volume)
    mrc_writer(tmp_path / "half2.mrc", (blob_volume + noise).astype(np.float32))
    job = pipeliner_project.run_job(
        {"_rlnJobTypeLabel": JOB_TYPE, "input_map": "half1.mrc", "half_map_2": "half2.mrc",
         "model": "ONNX file", "model_file": os.fspath(model), "device": "cpu",
         "confidence": "Yes", "other_args": "--tta 3"}, run_in_foreground=True)
    status, nodes = _recorded(job.output_dir)
    assert status == "Succeeded", (tmp_path / job.output_dir / "run.err").read_text()
    assert nodes == [(job.output_dir + "enhanced.mrc", "DensityMap.mrc.demhx.enhanced"),
                     (job.output_dir + "confidence.mrc", "Image3D.mrc.demhx.confidence")]


@needs_pipeliner
def test_bad_input_fails_the_job_with_demhxs_line(pipeliner_project: Any,
                                                  tmp_path: Path) -> None:
    (tmp_path / "broken.mrc").write_bytes(b"not a map")
    job = pipeliner_project.run_job(
        {"_rlnJobTypeLabel": JOB_TYPE, "input_map": "broken.mrc", "device": "cpu"},
        run_in_foreground=True)
    assert _recorded(job.output_dir) == ("Failed", [])
    errors = (tmp_path / job.output_dir / "run.err").read_text().splitlines()
    assert errors[-1].startswith("demhx: error: broken.mrc")
