"""Data, training and packing in one command with a wall-clock budget (``demhx-export one-run``).

Made for a machine lent for a single run of a few minutes (a GPU machine that can be reached
only now and then): everything happens in one call that ends inside its budget, and only what
is worth bringing back is left in ``OUT``:

1. build the val and train datasets from the structures (every core; the train build stops
   starting maps when its share of the budget is spent);
2. train one network per ``--widths`` entry (several entries train side by side on the same
   data, sharing the cores for their data workers), each with the recipe's settings, a cosine
   schedule that decays over the time left (``decay_minutes``), and the divergence guard; the
   trainers' output goes to log files, never through a pipe (data workers would keep a pipe
   open and the run would hang at its end);
3. pack each run's ``best`` checkpoint, ``log.tsv``, ``guard.tsv``, ``train.log`` and
   ``loss.png`` into ``OUT/NAME.tar`` (split into ``OUT/NAME.tar.partNN`` when a file would be
   too large to bring back), plus ``OUT/one_run.log``. Optimiser states and ``latest``
   checkpoints stay behind.

Unpack with ``cat NAME.tar* | tar -x``; evaluate with ``bench/candidate.py``; fine-tune with
``demhx-export train ... --init NAME/best``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demhx_export.dataset import DEFAULT_STRUCTURES, build_command
from demhx_export.network import parse_widths

# Settings of each recipe (``demhx-export train`` options). v3: tight-fast 0.3's;
# v4: v3 plus negatives, an error head, warm-up, gradient clipping and the divergence guard;
# v5: v4 with whole-map negatives at the noise level (a phase-randomised cube at the
# molecule's level taught v4 to erase real 6-7 Å density) and maps down to 7.5 Å: the shipped
# tight-fast 0.4's.
RECIPES: dict[str, dict[str, Any]] = {
    "v3": {"target": "truth", "norm": "none", "schedule": "cosine", "lr": 1e-3,
           "warmup_steps": 0, "clip_norm": 0.0, "spike_factor": 0.0},
    "v4": {"target": "truth", "norm": "none", "schedule": "cosine", "lr": 1e-3,
           "negative_fraction": 0.25, "error_head": True, "error_weight": 0.25,
           "warmup_steps": 300, "clip_norm": 1.0, "spike_factor": 5.0},
    "v5": {"target": "truth", "norm": "none", "schedule": "cosine", "lr": 1e-3,
           "negative_fraction": 0.25, "negative_source": "map", "negative_scale": "0.7,1.5",
           "error_head": True, "error_weight": 0.25,
           "warmup_steps": 300, "clip_norm": 1.0, "spike_factor": 5.0},
}
# FSC-0.143 resolutions (Å) of the simulated maps, per recipe (default: DEFAULT_RESOLUTIONS)
RECIPE_RESOLUTIONS: dict[str, tuple[float, float]] = {"v5": (2.5, 7.5)}
DEFAULT_RESOLUTIONS = (2.5, 6.0)
PART_BYTES = 15 * 2**20  # largest file brought back (the machine returns files ≤ 16 MiB)
PACKED = ("best.safetensors", "best.json", "log.tsv", "guard.tsv", "train.log", "loss.png")
RESERVE_MINUTES = 0.5  # kept back at the end for the trainers' last save and the packing
STARTUP_MINUTES = 0.5  # a trainer's start before its clock runs (imports, device, loading maps)
SMALL_SHARE = 0.1  # of a short budget: the most either of the two above takes
VAL_SHARE = 0.15  # of the build budget, for the val split


@dataclass(frozen=True)
class Plan:
    """What one call does; minutes are wall-clock minutes from the call's start."""

    structures: Path
    work: Path
    out: Path
    minutes: float
    build_minutes: float
    widths: tuple[tuple[int, int, int], ...]
    recipe: str
    overrides: dict[str, Any]
    train_count: int | None
    val_count: int
    max_atoms: int
    workers: int
    device: str
    steps: int | None = None
    resolutions: tuple[float, float] = DEFAULT_RESOLUTIONS
    variants: tuple[dict[str, str], ...] = ()  # per widths entry: settings over the recipe's


def one_run_command(structures: str, work: str, out: str, minutes: float = 9.0,
                    build_minutes: float = 2.5, widths: str = "16,32,64",
                    recipe: str = "v5", train_count: int | None = None, val_count: int = 16,
                    max_atoms: int = 12_000, workers: int | None = None, device: str = "auto",
                    cube_size: int = 64, batch_size: int = 8, lr: float | None = None,
                    negative_fraction: float | None = None, val_every: int = 500,
                    val_batches: int = 16, masked: float = 0.3, zoned: float = 0.1,
                    steps: int | None = None, resolution_range: object = None,
                    variants: str | None = None) -> None:
    """Build data, train and pack the best weights within MINUTES (one machine, one call).

    Parameters
    ----------
    structures : folder with manifest.tsv and the atomic models (train and val splits).
    work : scratch folder (datasets, runs); may be deleted afterwards.
    out : folder that receives only what is brought back (tars, one_run.log).
    minutes : wall-clock budget of the whole call.
    build_minutes : share of the budget for building the datasets.
    widths : network widths; several separated by "/" train side by side on the same data
        (e.g. 16,32,64/32,64,128).
    recipe : "v5" (v4 with whole-map negatives at the noise level, maps down to 7.5 Å), "v4"
        (negatives, error head, warm-up, clipping, guard) or "v3".
    train_count, val_count : maps to build (train: as many as the budget allows).
    max_atoms : skip larger structures.
    workers : processes for the build (default: every core); the trainers share the cores.
    device : training device ("auto": cuda when present).
    cube_size, batch_size, lr, negative_fraction, val_every, val_batches : training settings
        (lr and negative_fraction default to the recipe's).
    masked, zoned : fractions of deposited-style masked and zoned inputs in the datasets.
    steps : also stop (and end the cosine decay) at this step count (default: the time
        budget alone decides).
    resolution_range : LOW,HIGH FSC-0.143 resolution of the simulated maps, Å (default: the
        recipe's).
    variants : one entry per ``widths`` entry, separated by "/": ``train`` settings over the
        recipe's for that run, ``KEY=VALUE`` pairs separated by ";" (e.g.
        ``negative_fraction=0.2/negative_fraction=0.35;negative_scale=0.7,2``); the runs are
        named after their widths and their place (``w16-32-64-v1``).
    """
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe}: not one of {', '.join(RECIPES)}")
    overrides: dict[str, Any] = {"cube_size": int(cube_size), "batch_size": int(batch_size),
                                 "val_every": int(val_every),
                                 "val_batches": int(val_batches)}
    overrides.update({k: v for k, v in (("lr", lr), ("negative_fraction", negative_fraction))
                      if v is not None})
    all_widths = tuple(parse_widths(w) for w in str(widths).split("/"))
    plan = Plan(structures=Path(structures), work=Path(work), out=Path(out),
                minutes=float(minutes), build_minutes=float(build_minutes),
                widths=all_widths, recipe=recipe,
                overrides=overrides, train_count=None if train_count is None else int(train_count),
                val_count=int(val_count), max_atoms=int(max_atoms),
                workers=int(workers) if workers else os.cpu_count() or 1, device=str(device),
                steps=None if steps is None else int(steps),
                resolutions=_resolutions(resolution_range, recipe),
                variants=_variants(variants, len(all_widths)))
    run_plan(plan, masked=float(masked), zoned=float(zoned))


def run_plan(plan: Plan, masked: float, zoned: float) -> list[Path]:
    """Steps 1-3 of the module's docstring; return the files written to ``plan.out``."""
    started = time.monotonic()
    plan.out.mkdir(parents=True, exist_ok=True)
    log = _Log(plan.out / "one_run.log")
    log(f"plan: {json.dumps(_plan_text(plan))}")
    # 1. datasets
    train_dir, val_dir = _build(plan, masked, zoned, started, log)
    # 2. training, side by side, until the budget (less the reserve) is spent
    left = plan.minutes - (time.monotonic() - started) / 60 - _share(RESERVE_MINUTES, plan)
    if left <= 2 * _share(STARTUP_MINUTES, plan):
        raise RuntimeError(f"the dataset build left {left:.2f} min of the {plan.minutes} min "
                           "budget for training; lower --build-minutes or raise --minutes")
    runs = _train_all(plan, train_dir, val_dir, left, log)
    # 3. what comes back
    written = [p for run in runs for p in _pack(run, plan.out)]
    log(f"done in {(time.monotonic() - started) / 60:.2f} min: "
        + ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in written))
    return [*written, plan.out / "one_run.log"]


def _build(plan: Plan, masked: float, zoned: float, started: float, log: _Log
           ) -> tuple[Path, Path]:
    """Val then train datasets under ``work/ds``; the train build stops at the budget."""
    common: dict[str, Any] = dict(workers=plan.workers, max_atoms=plan.max_atoms,
                                  structures_dir=str(plan.structures), masked=masked,
                                  zoned=zoned, resolution_range=plan.resolutions)
    val_dir, train_dir = plan.work / "ds" / "val", plan.work / "ds" / "train"
    build_command("val", str(val_dir), count=plan.val_count, seed=1,
                  max_minutes=VAL_SHARE * plan.build_minutes, **common)
    spent = (time.monotonic() - started) / 60
    build_command("train", str(train_dir), count=plan.train_count, seed=0,
                  max_minutes=max(0.05, plan.build_minutes - spent), **common)
    counts = [len(json.loads((d / "index.json").read_text())) for d in (train_dir, val_dir)]
    log(f"datasets: {counts[0]} train and {counts[1]} val maps in "
        f"{(time.monotonic() - started) / 60:.2f} min")
    if not all(counts):
        raise RuntimeError(f"the build made {counts[0]} train and {counts[1]} val maps; "
                           "raise --build-minutes or check the structures folder")
    return train_dir, val_dir


def _train_all(plan: Plan, train_dir: Path, val_dir: Path, minutes: float, log: _Log
               ) -> list[Path]:
    """Start one trainer per widths entry, wait for all (killing them at the deadline)."""
    cores = plan.workers
    per_run = max(0, (cores - 2 * len(plan.widths)) // len(plan.widths))
    workers = per_run if cores > 4 else 0
    deadline = time.monotonic() + 60 * (minutes + 0.6 * _share(RESERVE_MINUTES, plan))
    minutes -= _share(STARTUP_MINUTES, plan)
    children = []
    for place, widths in enumerate(plan.widths):
        name = "w" + "-".join(map(str, widths)) + (f"-v{place + 1}" if plan.variants else "")
        run = plan.work / "runs" / name
        run.mkdir(parents=True, exist_ok=True)
        variant = plan.variants[place] if plan.variants else {}
        command = _train_argv(plan, train_dir, val_dir, run, widths, minutes, workers, variant)
        log(f"training {run.name}: {' '.join(command[3:])}")
        with open(run / "train.log", "w", encoding="utf-8") as stream:
            child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        children.append((run, child))
    for run, child in children:
        status = _wait(child, deadline)
        tail = (run / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
        log(f"{run.name}: exit {status}; " + " | ".join(tail))
    return [run for run, _ in children]


def _train_argv(plan: Plan, train_dir: Path, val_dir: Path, run: Path,
                widths: tuple[int, int, int], minutes: float, workers: int,
                variant: dict[str, str] | None = None) -> list[str]:
    """The ``demhx-export train`` command line of one run."""
    settings = {**RECIPES[plan.recipe], **plan.overrides, **(variant or {}),
                "widths": ",".join(map(str, widths)),
                "device": plan.device, "workers": workers, "max_minutes": round(minutes, 3),
                # without a step count the schedule follows the time budget alone
                "steps": plan.steps or 10_000_000, "decay_minutes": round(0.95 * minutes, 3)}
    argv = [sys.executable, "-m", "demhx_export.cli", "train", str(train_dir), str(val_dir),
            str(run)]
    for key, value in settings.items():
        option = "--" + key.replace("_", "-")
        argv += [option] if value is True else [f"--no-{key.replace('_', '-')}"] \
            if value is False else [option, str(value)]
    return argv


def _wait(child: subprocess.Popen, deadline: float) -> int:
    """The child's exit status; past the deadline it is interrupted, then killed."""
    try:
        return child.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGINT)
    try:
        return child.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        return child.wait()


def _pack(run: Path, out: Path) -> list[Path]:
    """``OUT/NAME.tar`` of the run's files worth keeping, split when too large."""
    members = [run / name for name in PACKED if (run / name).is_file()]
    tar_path = out / f"{run.name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for path in members:
            tar.add(path, arcname=f"{run.name}/{path.name}")
    if tar_path.stat().st_size <= PART_BYTES:
        return [tar_path]
    parts: list[Path] = []
    with open(tar_path, "rb") as whole:
        while chunk := whole.read(PART_BYTES):
            part = out / f"{tar_path.name}.part{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    tar_path.unlink()
    return parts


def _resolutions(value: object, recipe: str) -> tuple[float, float]:
    """The build's resolution range: ``value`` (``"LOW,HIGH"`` or two numbers) or the
    recipe's."""
    if value is None:
        return RECIPE_RESOLUTIONS.get(recipe, DEFAULT_RESOLUTIONS)
    parts = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    if len(parts) != 2 or not 2.0 < float(parts[0]) <= float(parts[1]):
        raise ValueError(f"--resolution-range {value!r}: pass LOW,HIGH in Å with "
                         "2 < LOW <= HIGH")
    return float(parts[0]), float(parts[1])


def _variants(value: str | None, runs: int) -> tuple[dict[str, str], ...]:
    """``--variants`` as one settings dict per run (ValueError naming a bad entry)."""
    if value is None:
        return ()
    entries = str(value).split("/")
    if len(entries) != runs:
        raise ValueError(f"--variants {value!r}: {len(entries)} entries for {runs} --widths "
                         "entries; give one per run, separated by /")
    variants = []
    for entry in entries:
        pairs = [p for p in entry.split(";") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ValueError(f"--variants entry {entry!r}: pass KEY=VALUE pairs separated by ;")
        variants.append({k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)})
    return tuple(variants)


def _share(minutes: float, plan: Plan) -> float:
    """``minutes``, or less for a short budget."""
    return min(minutes, SMALL_SHARE * plan.minutes)


def _plan_text(plan: Plan) -> dict[str, Any]:
    return {"minutes": plan.minutes, "build_minutes": plan.build_minutes,
            "widths": [list(w) for w in plan.widths], "recipe": plan.recipe,
            "resolutions": list(plan.resolutions), "variants": list(plan.variants),
            "settings": {**RECIPES[plan.recipe], **plan.overrides}, "workers": plan.workers,
            "device": plan.device, "max_atoms": plan.max_atoms}


class _Log:
    """Lines to stdout and to a file, with the minutes since the start."""

    def __init__(self, path: Path) -> None:
        self.path, self.started = path, time.monotonic()

    def __call__(self, line: str) -> None:
        text = f"[{(time.monotonic() - self.started) / 60:5.2f} min] {line}"
        print(text, flush=True)
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(text + "\n")


__all__ = ["DEFAULT_STRUCTURES", "RECIPES", "one_run_command", "run_plan"]
