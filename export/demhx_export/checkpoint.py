"""Checkpoints of the U-net: weights in safetensors, everything else in a JSON file beside them.

Format (``format_version`` 1)
-----------------------------
A checkpoint called ``NAME`` is a pair of files in one folder:

``NAME.safetensors``
    the network's ``state_dict`` (float32 tensors; safetensors stores data only, so loading a
    checkpoint never executes code).
``NAME.json``
    a JSON object::

        {
          "format": "demhx-export checkpoint",
          "format_version": 1,
          "architecture": {"network": "UNet3D",
                           "widths": [32, 64, 128], "parameters": 4561793},
          "weights": {"file": "NAME.safetensors", "sha256": "<hex digest>"},
          "saved_at": "2026-01-01T12:00:00Z",
          ...  every key of the ``info`` mapping given to save_checkpoint, at top level
        }

The architecture is taken from the network itself; ``info`` is free-form JSON-serialisable
training information (numpy scalars, paths and tuples are converted; non-finite floats are
written as ``null`` so that the file stays strict JSON). The export
(:mod:`demhx_export.onnx_export`) reads these ``info`` keys when present (defaults in
brackets):

=================  =====================================================================
``cube_size``      training / inference cube edge in voxels (else ``train.cube_size``) [64]
``stride``         reference tiling stride in voxels [cube_size / 4, i.e. 16 for 64³]
``voxel_size``     Å per voxel of the training data [1.0]
``normalisation``  ``"noise"`` or ``"mask"`` [``"noise"``]
``noise_std``      std of the solvent noise after normalisation [0.1]
``background``     network output for pure solvent [0.0]
``step``           optimiser steps taken
``seed``           seed of the initialisation and sampling
``commit``         git commit of the training code
``data``           description of the training data (else ``train.train_dir``)
``name``           model name [the ONNX file's stem]
``version``        model version [``"0.1"``]
=================  =====================================================================

Optimiser, scheduler and random-generator state for resuming belong in a third file,
``NAME.opt.pt`` (see :func:`optimiser_state_path`); it is written and read by the training
code, never by the export.

Both files are written to temporary names and moved into place (weights first, JSON last),
so an interrupted save leaves the previous checkpoint readable; the JSON records the sha256
of its weights file and :func:`load_checkpoint` refuses a pair whose weights do not match.

API
---
``save_checkpoint(path, net, info=None, extra=None) -> Path``
    write ``path.safetensors`` and ``path.json``; returns the JSON path.
``load_checkpoint(path) -> (net, config)``
    rebuild the network (in eval mode, on the CPU) and return it with the JSON object.
``path`` may be ``NAME``, ``NAME.json`` or ``NAME.safetensors``; for loading it may also be
a folder, meaning its ``best`` checkpoint, else its ``latest``, else its only checkpoint.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from demhx.model import sha256_of
from safetensors.torch import load_file, save_file

from demhx_export.network import UNet3D, count_parameters

FORMAT = "demhx-export checkpoint"
FORMAT_VERSION = 1
RESERVED_KEYS = ("format", "format_version", "architecture", "weights", "saved_at")
SUFFIXES = (".safetensors", ".json", ".opt.pt")
PREFERRED_NAMES = ("best", "latest")  # tried in this order when a folder is given


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.json`` or ``NAME.safetensors``."""
    stem = Path(path)
    for suffix in SUFFIXES:
        if stem.name.endswith(suffix):
            stem = stem.with_name(stem.name[: -len(suffix)])
            break
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def optimiser_state_path(path: str | Path) -> Path:
    """``NAME.opt.pt``: where the training code keeps optimiser state for checkpoint ``NAME``."""
    weights, _ = checkpoint_paths(path)
    return weights.with_name(weights.name[: -len(".safetensors")] + ".opt.pt")


def save_checkpoint(path: str | Path, net: UNet3D, info: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint ``path`` (``.safetensors`` + ``.json``); return the JSON path.

    Parameters
    ----------
    path : ``NAME`` (suffix optional); its folder is created if needed.
    net : the network; its widths are recorded from ``net.widths``.
    info : training information (step, seed, commit, data, cube_size, ...), JSON-serialisable;
        stored at the top level of the JSON object.
    extra : more keys, merged over ``info``.
    """
    fields = {**(info or {}), **(extra or {})}
    clash = sorted(set(fields) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"checkpoint info keys {clash} are reserved by the checkpoint format; "
                         "rename them")
    weights, config_path = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    # weights first, under a temporary name
    state = {key: value.detach().to("cpu").contiguous() for key, value in net.state_dict().items()}
    tmp_weights = weights.with_name(weights.name + f".{os.getpid()}.tmp")
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"network": type(net).__name__, "widths": list(net.widths),
                         "norm": getattr(net, "norm", "group"),
                         "error_head": bool(getattr(net, "error_head", False)),
                         "parameters": count_parameters(net)},
        "weights": {"file": weights.name, "sha256": sha256_of(tmp_weights)},
        "saved_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **fields,
    }
    text = json.dumps(_finite(config), indent=2, default=_json_default, allow_nan=False)
    # then move both into place, JSON last
    tmp_config = config_path.with_name(config_path.name + f".{os.getpid()}.tmp")
    tmp_config.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp_weights, weights)
    os.replace(tmp_config, config_path)
    return config_path


def load_checkpoint(path: str | Path) -> tuple[UNet3D, dict[str, Any]]:
    """Rebuild the network of checkpoint ``path``; return ``(net in eval mode, JSON object)``.

    Raises
    ------
    FileNotFoundError
        when either file is missing.
    ValueError
        when the JSON is not a demhx-export checkpoint or the weights do not match it.
    """
    weights, config_path = checkpoint_paths(_resolve_folder(Path(path)))
    for needed in (config_path, weights):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: checkpoint file not found; a checkpoint is the "
                                    "pair NAME.safetensors + NAME.json written by "
                                    "save_checkpoint")
    config = _read_config(config_path)
    expected = config["weights"].get("sha256")
    if expected and sha256_of(weights) != expected:
        raise ValueError(f"{weights}: sha256 does not match {config_path.name} (the pair comes "
                         "from different saves or was modified); use a complete checkpoint")
    architecture = config["architecture"]
    net = UNet3D(architecture["widths"], norm=architecture.get("norm", "group"),
                 error_head=bool(architecture.get("error_head", False)))
    try:
        net.load_state_dict(load_file(str(weights), device="cpu"))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{weights}: weights do not fit the architecture in "
                         f"{config_path.name} ({first}); use a matching pair") from None
    return net.eval(), config


def git_commit(folder: str | Path | None = None) -> str:
    """Short git commit of ``folder`` (default: this package's checkout), ``+dirty`` if modified.

    Returns ``"unknown"`` outside a git checkout.
    """
    cwd = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=cwd, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = head.stdout.strip()
    if head.returncode or not commit:
        return "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def _resolve_folder(path: Path) -> Path:
    """A folder stands for its best, latest or only checkpoint."""
    if not path.is_dir():
        return path
    for name in PREFERRED_NAMES:
        if (path / f"{name}.json").is_file():
            return path / name
    candidates = sorted(p for p in path.glob("*.json")
                        if checkpoint_paths(p)[0].is_file())
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.stem for p in candidates) or "none"
    raise FileNotFoundError(f"{path}: folder holds no single checkpoint (found: {found}); "
                            "pass FOLDER/NAME")


def _read_config(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error}); use a checkpoint written "
                         "by save_checkpoint") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_path}: not a demhx-export checkpoint (no "
                         f"\"format\": \"{FORMAT}\"); use a checkpoint written by "
                         "save_checkpoint")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{config_path}: checkpoint format {config['format_version']} is newer "
                         f"than this demhx-export reads ({FORMAT_VERSION}); upgrade demhx-export")
    if "widths" not in config.get("architecture", {}) or "weights" not in config:
        raise ValueError(f"{config_path}: checkpoint lacks architecture.widths or weights; "
                         "use a checkpoint written by save_checkpoint")
    return config


def _finite(value: Any) -> Any:
    """Strict JSON has no inf/nan: non-finite floats become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars/arrays, tensors, paths and sets found in ``info``."""
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"checkpoint info value {value!r} ({type(value).__name__}) is not "
                    "JSON-serialisable; convert it to a number, string, list or dict")


__all__ = ["FORMAT", "FORMAT_VERSION", "checkpoint_paths", "git_commit", "load_checkpoint",
           "optimiser_state_path", "save_checkpoint"]
