"""The ``demhx --help`` text, with the shipped models listed from the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from demhx.errors import describe_error

USAGE = ("usage: demhx IN OUT [--half2 H2] [--model NAME|PATH]\n"
         "             [--device auto|cpu|cuda|cuda:N|cuda:N,M,...|cuda:all]\n"
         "             [--batch-size N] [--threads N] [--tiling default|fast|reference]\n"
         "             [--voxel-size A | --voxel-size X,Y,Z] [--noise-stats MEAN,STD]\n"
         "             [--mask PATH] [--preview PNG|DIR] [--confidence PATH] [--tta N]\n"
         "             [--overwrite] [--quiet] [--debug] [--version]\n"
         "       demhx IN [IN ...] (--out-dir DIR | --suffix SUF | both) [--shard K/N]\n"
         "             [options]")
HELP = USAGE + """

Locally sharpen and mask a cryo-EM map (DeepEMhancer method) on ONNX Runtime.

positional arguments:
  IN                    input map (.mrc, .map, .map.gz), or the first half-map
  OUT                   output map (float32 MRC, input header kept); must not exist
                        unless --overwrite
  IN [IN ...]           with --out-dir or --suffix: any number of maps, enhanced one after
                        the other with one model load; a map that fails is reported and
                        the others run; a table ends the run, exit status 1 if any failed

options:
  --half2 H2            second half-map; averaged with IN in float32 (recommended)
  --model NAME|PATH     a shipped model's name (listed below) or an ONNX file (default: the
                        shipped model marked "default")
  --device DEV          auto (CUDA when usable, else CPU), cpu, cuda or cuda:N; several
                        GPUs: cuda:N,M,... or cuda:all (each batch split across them;
                        --batch-size is per GPU)
  --batch-size N        cubes per inference call (default: 1 on CPU, from GPU memory on CUDA)
  --threads N           CPU threads for inference (default: all physical cores)
  --tiling SCHEME       default: the reference's cubes thinned to gaps <= 3/4 cube, solvent
                        cubes skipped, more of them added while overlapping cubes disagree
                        (predicted CC to the reference below 0.993);
                        fast: the default's first cubes only (no cubes added);
                        reference: the paper's stride 16 with plain averaging (slow)
  --voxel-size A        voxel size in Å, one value or X,Y,Z; overrides the header
  --noise-stats M,S     solvent noise mean and standard deviation of IN (skips estimation)
  --mask PATH           a mask on IN's grid that marks the particle (1 on it, 0 in the
                        solvent, soft edges allowed): the solvent noise is measured outside
                        it (models with normalisation "mask" take their statistics inside
                        it); the output is not masked by it (a masked IN comes out exactly
                        0 outside its own mask, with or without --mask)
  --out-dir DIR         several maps: write DIR/<input name> (DIR is created if missing)
  --suffix SUF          several maps: add SUF to each name before the extension, beside
                        the input or in --out-dir (a.map -> a_demhx.map for _demhx)
  --shard K/N           several maps: run only job K's share of N (map i, from 0, is in
                        share i % N + 1); default under a SLURM job array: from
                        SLURM_ARRAY_TASK_ID (- SLURM_ARRAY_TASK_MIN + 1) and
                        SLURM_ARRAY_TASK_COUNT. A share without maps exits 0
  --preview PNG|DIR     also draw the central xy, xz and yz slices of the input (top row)
                        and the output (bottom row) into a PNG file; a PATH not ending .png
                        is a folder (created if missing) holding <output stem>.png for each
                        map. Grey scale per map: its slices' 1st-99.5th percentiles. Needs
                        matplotlib: pip install "demhx[preview]"
  --confidence PATH     also write a confidence map to PATH (MRC, OUT's header and grid):
                        each cube is run in --tta rotations (default 6), OUT is their mean
                        and PATH the spread, the per-voxel standard deviation over the
                        rotations in OUT's units (0 in skipped solvent): where the turned
                        predictions disagree. Costs N times the network time
  --tta N               rotations per cube: 3, 4, 6, 12 or 24 (groups of the cube's proper
                        rotations; 24 is all, see README); without --confidence OUT is
                        their mean alone
  --overwrite           replace OUT (and the preview) if it exists
  --quiet               no progress bar, device line or summary (warnings still print);
                        with several maps the table prints only if a map failed
  --debug               show the traceback of errors
  --version             print the version and exit
  -h, --help            show this help and exit

Options are matched exactly (no abbreviations); --batch_size style spellings work too.

DeepEMhancer's options, with the same meaning:
  -i, --inputMap IN     IN               -o, --outputMap OUT   OUT
  -i2, --halfMap2 H2    --half2 H2       -s, --samplingRate A  --voxel-size A
  --noiseStats M S      --noise-stats M,S
  -m, --binaryMask PATH --mask PATH      -b, --batch_size N    --batch-size N
  -g, --gpuIds IDS      --device cuda:IDS (-g 0,1: --device cuda:0,1; -1: --device cpu)
  -p, --processingType tightTarget       the default model (tight target; no wideTarget or
                        highRes model is shipped: convert DeepEMhancer's file with
                        demhx-export from-keras)
  --deepLearningModelPath and --cleaningStrengh are refused with what to use instead.

Exit status: 0 done, 2 usage or input error, 1 failure while running (or any of several
maps failed), 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (nothing half-written is left behind).
"""
_HELP_MODELS_AFTER = "  -h, --help            show this help and exit\n"
"""The help lists the shipped models after this line."""
_NAME_WIDTH = 18  # columns of the model-name column in the help's model list

def help_text(folder: Path | None = None) -> str:
    """:data:`HELP` with the shipped models, read now from the registry in ``folder`` (default:
    the installed models), one line each and the default marked."""
    from demhx import model

    folder = folder or model.models_dir()
    registry = model.load_registry(folder)
    lines = ["", "shipped models (--model NAME):"]
    titles = {name: f"{name} (default)" if name == registry["default"] else name
              for name in registry["models"]}
    width = max([_NAME_WIDTH, *(len(title) + 2 for title in titles.values())])
    for name, entry in registry["models"].items():
        lines.append(f"  {titles[name]:<{width}}{_describe_model(folder, entry)}")
    if not registry["models"]:
        lines.append("  none; pass --model PATH.onnx")
    return HELP.replace(_HELP_MODELS_AFTER, _HELP_MODELS_AFTER + "\n".join(lines) + "\n", 1)


def _describe_model(folder: Path, entry: dict[str, Any]) -> str:
    """One line about a registered model: its registry description, else its metadata."""
    from demhx import model

    if entry.get("description"):
        return " ".join(str(entry["description"]).split())
    path = folder / str(entry.get("file", ""))
    try:
        metadata = model.read_metadata(path)
    except Exception as error:  # the help still prints when a model cannot be read
        return f"{path.name}: cannot be read ({describe_error(error)[:80]}); reinstall demhx"
    values = {key.removeprefix(model.METADATA_PREFIX): value for key, value in metadata.items()}
    parts = [f"v{values.get('version', '?')}"]
    if "widths" in values:
        parts.append(f"widths {values['widths']}")
    if "parameters" in values:
        parts.append(f"{int(values['parameters']) / 1e6:.2f} M weights")
    cube = values.get("cube_size", "?")
    if "gflop_per_cube" in values:
        parts.append(f"{float(values['gflop_per_cube']):.0f} GFLOP per {cube}³ cube")
    parts.append(f"{values.get('voxel_size', '?')} Å/voxel")
    return ", ".join(parts)
