"""The CCP-EM pipeliner (Doppio) job ``demhx.postprocess.local_sharpening``.

The pipeliner finds it through the ``ccpem_pipeliner.jobs`` entry point of demhx's
distribution and lists it under Map Postprocessing, in Doppio too; ``pip install
"demhx[ccpem]"`` puts the pipeliner (``ccpem-pipeliner``) beside demhx. Only the pipeliner
imports this module, and this module is the only one that imports the pipeliner: ``import
demhx`` and the ``demhx`` command never load it.

Inputs: a map, or half-map 1 with half-map 2 (averaged, as the method recommends); an
optional mask marking the particle (the solvent noise is measured outside it); the model (a
shipped one, or an ONNX file) and the device. The job's command is the demhx command line,
run in the project folder::

    demhx MAP Demhx/jobNNN/enhanced.mrc [--half2 H2] [--mask MASK] --model MODEL
          --device DEVICE --threads N --tiling TILING
          [--confidence Demhx/jobNNN/confidence.mrc] --overwrite [additional arguments]

Outputs, as pipeline nodes: the enhanced map (``DensityMap``, keywords demhx and enhanced)
and, when asked for, the confidence map (``Image3D``, keywords demhx and confidence: a
per-voxel spread in the map's units, not a density; the pipeliner's local-resolution maps
are ``Image3D`` too). The enhanced map keeps the input's header (grid, voxel size, origin,
nstart, axis order); the job's metadata shows both headers' geometry and whether they agree,
beside the run's device and seconds. While it runs, demhx's progress lines (cubes done,
seconds elapsed and left) are in the job's ``run.err``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import mrcfile
from pipeliner.display_tools import make_maps_slice_montage_and_3d_display
from pipeliner.external_program_utils import ExternalProgram
from pipeliner.job_options import (
    BooleanJobOption,
    ExternalFileJobOption,
    FileDescription,
    InputNodeJobOption,
    JobOptionCondition,
    JobOptionValidationResult,
    MultipleChoiceJobOption,
    StringJobOption,
)
from pipeliner.nodes import NODE_DENSITYMAP, NODE_IMAGE3D, NODE_MASK3D
from pipeliner.pipeliner_job import PipelinerCommand, PipelinerJob, Ref

from demhx import model

__all__ = ["CONFIDENCE_KEYWORDS", "CONFIDENCE_NAME", "ENHANCED_KEYWORDS", "ENHANCED_NAME",
           "DemhxJob", "demhx_executable", "run_summary", "shipped_models"]

ENHANCED_NAME = "enhanced.mrc"
CONFIDENCE_NAME = "confidence.mrc"
ENHANCED_KEYWORDS = ["demhx", "enhanced"]
CONFIDENCE_KEYWORDS = ["demhx", "confidence"]
ONNX_FILE = "ONNX file"
"""The model choice that takes the model from ``model_file``."""
MAP_FILES = FileDescription("3D map", [".mrc", ".map", ".ccp4"])
DEVICE_PATTERN = r"^(auto|cpu|cuda(:(all|\d+(,\d+)*))?)$"
TILINGS = ["default", "fast", "reference"]
# demhx options the job sets from its own fields: not among the additional arguments.
_JOB_OPTIONS = ("--half2", "--mask", "--model", "--device", "--threads", "--tiling",
                "--confidence", "--overwrite", "--out-dir", "--suffix")
_SUMMARY = re.compile(r"demhx: wrote .*?, model (?P<model>.+?), (?P<cubes>\d+) cubes? run.*"
                      r", device (?P<device>\S+), (?P<seconds>[0-9.]+) s$", re.M)
_METHOD = Ref(
    authors=["Sanchez-Garcia R", "Gomez-Blanco J", "Cuervo A", "Carazo JM", "Sorzano COS",
             "Vargas J"],
    title="DeepEMhancer: a deep learning solution for cryo-EM volume post-processing",
    journal="Communications Biology", year="2021", volume="4", pages="874",
    doi="10.1038/s42003-021-02399-1")


def shipped_models() -> tuple[list[str], str]:
    """The shipped models' names and the default's, from demhx's model registry."""
    registry = model.load_registry()
    return sorted(registry["models"]), registry["default"]


def demhx_executable() -> str | None:
    """The ``demhx`` command installed with this job (beside the running Python), else the
    one on the PATH, else None."""
    beside = shutil.which("demhx", path=os.path.dirname(sys.executable))
    return beside or shutil.which("demhx")


def run_summary(log: str) -> dict[str, Any]:
    """Model, cubes, device and seconds from demhx's summary line in ``log`` (empty when the
    log has none)."""
    matches = list(_SUMMARY.finditer(log))
    if not matches:
        return {}
    found = matches[-1]
    return {"Model": found["model"], "CubesRun": int(found["cubes"]),
            "Device": found["device"], "Seconds": float(found["seconds"])}


class DemhxJob(PipelinerJob):
    """demhx: DeepEMhancer-style local sharpening and masking on ONNX Runtime."""

    PROCESS_NAME = "demhx.postprocess.local_sharpening"
    OUT_DIR = "Demhx"
    CATEGORY_LABEL = "Map Postprocessing"

    def __init__(self) -> None:
        super().__init__()
        self._describe()
        self._add_inputs()
        self._add_model_and_device()
        self.get_runtab_options(threads=True, addtl_args=True)

    def _describe(self) -> None:
        info = self.jobinfo
        info.display_name = "demhx (DeepEMhancer method)"
        info.short_desc = "Deep-learning local sharpening and masking of 3D maps"
        info.long_desc = (
            "demhx post-processes a cryo-EM map as DeepEMhancer does (local sharpening and"
            " masking in one step with a 3D U-net), on ONNX Runtime, CPU or GPU. Give the"
            " unsharpened, unmasked half-maps (recommended) or one map. The output keeps the"
            " input's grid and header (origin, nstart, voxel size). Progress, with the time"
            " left, is in run.err; the metadata records the run's device and seconds.")
        info.version = "1.0"
        info.job_author = "the demhx project"
        info.documentation = "https://doi.org/10.1038/s42003-021-02399-1"
        info.references = [_METHOD]
        program = ExternalProgram("demhx")
        program.exe_path = demhx_executable()
        program.vers_com = [program.exe_path or "demhx", "--version"]
        info.programs = [program]

    def _add_inputs(self) -> None:
        self.joboptions["input_map"] = InputNodeJobOption(
            label="Input map (or half-map 1)", node_type=NODE_DENSITYMAP, pattern=MAP_FILES,
            is_required=True,
            help_text="The map to enhance; with half-map 2, the first half-map.")
        self.joboptions["half_map_2"] = InputNodeJobOption(
            label="Half-map 2 (optional)", node_type=NODE_DENSITYMAP, pattern=MAP_FILES,
            node_kwds=["halfmap"],
            help_text="The second half-map, averaged with the first in float32 (recommended:"
                      " the network was designed for unsharpened, unmasked half-map averages).")
        self.joboptions["mask"] = InputNodeJobOption(
            label="Mask (optional)", node_type=NODE_MASK3D, pattern=MAP_FILES,
            help_text="A mask on the map's grid marking the particle: the solvent noise is"
                      " measured outside it. The output is not masked by it.")

    def _add_model_and_device(self) -> None:
        names, default = shipped_models()
        self.joboptions["model"] = MultipleChoiceJobOption(
            label="Model", choices=[*names, ONNX_FILE], default_value=default,
            help_text=f"A shipped model ({default} is the default), or '{ONNX_FILE}' for a"
                      " model file with demhx metadata.")
        self.joboptions["model_file"] = ExternalFileJobOption(
            label="Model file", pattern=FileDescription("ONNX model", [".onnx"]),
            required_if=JobOptionCondition([("model", "=", ONNX_FILE)]),
            deactivate_if=JobOptionCondition([("model", "!=", ONNX_FILE)]),
            help_text="An ONNX model with demhx metadata (see demhx's models/README.md).")
        self.joboptions["device"] = StringJobOption(
            label="Device", default_value="auto", validation_regex=DEVICE_PATTERN,
            regex_error_message="give auto, cpu, cuda, cuda:N, cuda:N,M,... or cuda:all",
            help_text="auto: CUDA when usable, else the CPU; cpu; cuda or cuda:N; several"
                      " GPUs: cuda:N,M,... or cuda:all.")
        self.joboptions["tiling"] = MultipleChoiceJobOption(
            label="Tiling", choices=TILINGS, default_value="default",
            jobop_group="Advanced options",
            help_text="default: cubes thinned, solvent skipped, more added where they"
                      " disagree; fast: the first cubes only; reference: the paper's"
                      " stride 16 (slow).")
        self.joboptions["confidence"] = BooleanJobOption(
            label="Write a confidence map?", default_value=False,
            jobop_group="Advanced options",
            help_text="Also write the spread over rotations of each cube (the output is"
                      " then their mean); costs 6 times the network time (--tta N among the"
                      " additional arguments changes the count).")

    def additional_joboption_validation(self) -> list[JobOptionValidationResult]:
        """Half-map 2 differs from the map; no additional argument sets what a field sets."""
        errors = []
        first, second = self.joboptions["input_map"], self.joboptions["half_map_2"]
        if second.value and second.value == first.value:
            errors.append(JobOptionValidationResult(
                "error", [first, second], "half-map 2 is the same file as half-map 1"))
        other = self.joboptions["other_args"]
        try:
            words = shlex.split(other.value)
        except ValueError as error:
            return [*errors, JobOptionValidationResult("error", [other], str(error))]
        for word in words:
            if word.split("=", 1)[0] in _JOB_OPTIONS:
                errors.append(JobOptionValidationResult(
                    "error", [other], f"{word} is set by the job's own fields"))
        return errors

    def create_output_nodes(self) -> None:
        self.add_output_node(ENHANCED_NAME, NODE_DENSITYMAP, ENHANCED_KEYWORDS)
        if self.joboptions["confidence"].get_boolean():
            self.add_output_node(CONFIDENCE_NAME, NODE_IMAGE3D, CONFIDENCE_KEYWORDS)

    def get_commands(self) -> list[PipelinerCommand]:
        """``demhx --version`` (for the log), then the run, in the project folder."""
        program = self.jobinfo.programs[0]
        command = [program.exe_path or program.command,
                   self.joboptions["input_map"].get_string(),
                   os.path.join(self.output_dir, ENHANCED_NAME)]
        command += self._input_options() + self._run_options() + ["--overwrite"]
        command += self.parse_additional_args()
        return [*self.get_program_version_commands(), PipelinerCommand(command)]

    def _input_options(self) -> list[str]:
        options = []
        for name, flag in (("half_map_2", "--half2"), ("mask", "--mask")):
            value = self.joboptions[name].get_string()
            if value:
                options += [flag, value]
        return options

    def _run_options(self) -> list[str]:
        chosen = self.joboptions["model"].get_string()
        if chosen == ONNX_FILE:
            chosen = self.joboptions["model_file"].get_string()
        options = ["--model", chosen, "--device", self.joboptions["device"].get_string(),
                   "--threads", str(self.get_nr_threads()),
                   "--tiling", self.joboptions["tiling"].get_string()]
        if self.joboptions["confidence"].get_boolean():
            options += ["--confidence", os.path.join(self.output_dir, CONFIDENCE_NAME)]
        return options

    def gather_metadata(self) -> dict[str, Any]:
        """The run (model, cubes, device, seconds) and both maps' geometry."""
        log = Path(self.output_dir, "run.err")
        metadata = run_summary(log.read_text(errors="replace")) if log.is_file() else {}
        source = _geometry(self.joboptions["input_map"].get_string())
        output = _geometry(os.path.join(self.output_dir, ENHANCED_NAME))
        metadata.update(InputGeometry=source, OutputGeometry=output,
                        HeaderKept=source == output)
        return metadata

    def create_results_display(self) -> list[Any]:
        """Central slices and 3D views of the input and the enhanced map."""
        maps = {self.joboptions["input_map"].get_string(): "input map",
                os.path.join(self.output_dir, ENHANCED_NAME): "demhx enhanced map"}
        return list(make_maps_slice_montage_and_3d_display(maps, self.output_dir))


def _geometry(path: str) -> dict[str, Any]:
    """Box, voxel size (Å), origin (Å), nstart, axis order and cell (Å) of an MRC file, each
    along (x, y, z)."""
    with mrcfile.open(path, header_only=True, permissive=True) as mrc:
        header = mrc.header
        return {
            "Box": [int(header.nx), int(header.ny), int(header.nz)],
            "VoxelSize": _xyz(mrc.voxel_size),
            "Origin": _xyz(header.origin),
            "Nstart": [int(header.nxstart), int(header.nystart), int(header.nzstart)],
            "AxisOrder": [int(header.mapc), int(header.mapr), int(header.maps)],
            "Cell": _xyz(header.cella),
        }


def _xyz(record: Any) -> list[float]:
    """An mrcfile (x, y, z) record as a list of floats."""
    return [float(record[axis]) for axis in "xyz"]
