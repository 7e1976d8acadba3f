"""The model contract: what an ONNX file must declare to run in demhx, and the model registry.

A demhx model is a single ONNX file with one float32 input of shape ``(batch, 1, D, H, W)``
and one output of the same shape. Everything model-specific is read from the file's
``metadata_props`` (string key/value pairs), never hard-coded in the runtime:

==========================  ========================================================  ==========
key                         meaning                                                   example
==========================  ========================================================  ==========
``demhx.format``            contract version (integer)                                ``1``
``demhx.name``              model name                                                ``tight``
``demhx.version``           model version                                             ``1.0``
``demhx.cube_size``         edge of the cubes the network runs on, voxels             ``64``
``demhx.stride``            stride of the reference (paper) tiling, voxels            ``16``
``demhx.voxel_size``        voxel size the network works at, Å                        ``1.0``
``demhx.normalisation``     input convention: ``noise`` (solvent noise -> mean 0,    ``noise``
                            std ``demhx.noise_std``) or ``mask`` (median / 10-95 %
                            inter-quantile range inside a user mask, input masked)
``demhx.noise_std``         target std of the solvent noise after normalisation       ``0.1``
``demhx.background``        network output for solvent (used for skipped cubes)       ``0.0``
``demhx.trained``           ``true`` or ``false`` (random-init models)                ``true``
``demhx.provenance``        free text: data, steps, seed, commit                      ``...``
==========================  ========================================================  ==========

Only ``demhx.trained``, ``demhx.background``, ``demhx.format`` and ``demhx.provenance`` are
optional (defaults: ``true``, ``0.0``, ``1``, empty). Extra keys (``demhx.widths``,
``demhx.parameters``, ``demhx.gflop_per_cube`` ...) are kept in :attr:`ModelSpec.extra`.

The registry (``models/registry.json``, installed as the package ``demhx.models``) maps
model names to files and their sha256; a registered model is refused when its bytes do
not match. Model files are data: nothing stored in them is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["describe", "FORMAT_VERSION", "fp16_twin", "load_registry", "load_spec", "metadata_of",
           "METADATA_PREFIX", "models_dir", "ModelSpec", "NORMALISATIONS",
           "open_session", "read_metadata", "registered_fp16_sha256", "REGISTRY_FILE",
           "REQUIRED_KEYS", "resolve_model", "sha256_of", "spec_from_metadata",
           "verify_sha256"]

FORMAT_VERSION = 1
METADATA_PREFIX = "demhx."
NORMALISATIONS = ("noise", "mask")
REQUIRED_KEYS = ("name", "version", "cube_size", "stride", "voxel_size", "normalisation",
                 "noise_std")
REGISTRY_FILE = "registry.json"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the runtime needs to know about a model, read from its ONNX metadata.

    Attributes
    ----------
    path : Path of the ONNX file.
    name, version : model identity.
    cube_size : edge of the network's input cubes, voxels.
    stride : stride of the paper's reference tiling, voxels.
    voxel_size : voxel size the network works at, Å.
    normalisation : ``"noise"`` or ``"mask"``.
    noise_std : std of the solvent noise after normalisation (0.1 in the paper).
    background : network output for pure solvent.
    trained : False for random-init models (the runtime warns).
    provenance : free text describing data, steps, seed and commit.
    fp16_path : the ``.fp16.onnx`` twin next to the file, if present.
    extra : any other ``demhx.*`` metadata.
    """

    path: Path
    name: str
    version: str
    cube_size: int
    stride: int
    voxel_size: float
    normalisation: str
    noise_std: float
    background: float = 0.0
    trained: bool = True
    provenance: str = ""
    fp16_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short identity for MRC labels and messages, e.g. ``tight 1.0``."""
        return f"{self.name} {self.version}"


def sha256_of(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def spec_from_metadata(path: Path, metadata: dict[str, str]) -> ModelSpec:
    """Build a :class:`ModelSpec` from ONNX ``metadata_props``; ValueError names what is wrong."""
    values = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items()
              if k.startswith(METADATA_PREFIX)}
    missing = [key for key in REQUIRED_KEYS if key not in values]
    if missing:
        keys = ", ".join(METADATA_PREFIX + key for key in missing)
        raise ValueError(f"{path}: not a demhx model, metadata lacks {keys}; "
                         "export it with demhx-export or pass a model made for demhx")
    fmt = _parse(path, values, "format", int, str(FORMAT_VERSION))
    if fmt > FORMAT_VERSION:
        raise ValueError(f"{path}: model format {fmt} is newer than this demhx understands "
                         f"({FORMAT_VERSION}); upgrade demhx")
    spec = ModelSpec(
        path=path,
        name=values["name"],
        version=values["version"],
        cube_size=_parse(path, values, "cube_size", int),
        stride=_parse(path, values, "stride", int),
        voxel_size=_parse(path, values, "voxel_size", float),
        normalisation=values["normalisation"],
        noise_std=_parse(path, values, "noise_std", float),
        background=_parse(path, values, "background", float, "0.0"),
        trained=values.get("trained", "true").strip().lower() != "false",
        provenance=values.get("provenance", ""),
        fp16_path=fp16_twin(path),
        extra={k: v for k, v in values.items() if k not in _KNOWN},
    )
    _check_spec(spec)
    return spec


_KNOWN = set(REQUIRED_KEYS) | {"format", "background", "trained", "provenance"}


def _parse(path: Path, values: dict[str, str], key: str, kind: type, default: str | None = None
           ) -> Any:
    text = values.get(key, default)
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: metadata {METADATA_PREFIX}{key}={text!r} is not a valid "
                         f"{kind.__name__}; re-export the model") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{path}: metadata {METADATA_PREFIX}{key}={text!r} is not finite; "
                         "re-export the model")
    return value


def _check_spec(spec: ModelSpec) -> None:
    problems = []
    if spec.cube_size < 8:
        problems.append(f"cube_size {spec.cube_size} < 8")
    if not 1 <= spec.stride <= spec.cube_size:
        problems.append(f"stride {spec.stride} outside 1..cube_size")
    if spec.voxel_size <= 0:
        problems.append(f"voxel_size {spec.voxel_size} Å is not positive")
    if spec.normalisation not in NORMALISATIONS:
        problems.append(f"normalisation {spec.normalisation!r} not one of {NORMALISATIONS}")
    if spec.noise_std <= 0:
        problems.append(f"noise_std {spec.noise_std} is not positive")
    if problems:
        raise ValueError(f"{spec.path}: invalid demhx metadata ({'; '.join(problems)}); "
                         "re-export the model")


def fp16_twin(path: Path) -> Path | None:
    """The ``NAME.fp16.onnx`` file next to ``NAME.onnx``, if it exists."""
    if path.name.endswith(".fp16.onnx"):
        return None
    twin = path.with_name(path.name[: -len(".onnx")] + ".fp16.onnx") \
        if path.name.endswith(".onnx") else None
    return twin if twin is not None and twin.is_file() else None


def open_session(path: Path, options: Any = None, providers: list[Any] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path``; ValueError names the file if it fails.

    ``options`` defaults to quiet session options (warnings silenced), ``providers`` to CPU.
    ONNX Runtime is imported behind its install check (:func:`demhx.device.import_onnxruntime`).
    """
    from demhx.device import import_onnxruntime

    ort = import_onnxruntime()

    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a loadable ONNX model ({first[:200]}); "
                         "check the file or re-export it") from None


def metadata_of(session: Any) -> dict[str, str]:
    """The ``metadata_props`` of an open ONNX Runtime session."""
    return dict(session.get_modelmeta().custom_metadata_map)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read with ONNX Runtime (no ``onnx`` needed).

    Opens a throw-away CPU session; the runtime (:mod:`demhx.session`) instead reads the
    metadata from the session it runs, so a model is loaded only once.
    """
    return metadata_of(open_session(path))


# --------------------------------------------------------------------------- registry


def models_dir() -> Path:
    """Folder of the shipped models: the installed ``demhx.models`` package or ``./models``."""
    try:
        folder = Path(str(resources.files("demhx.models")))
        if (folder / REGISTRY_FILE).is_file():
            return folder
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "models"


def load_registry(folder: Path | None = None) -> dict[str, Any]:
    """The registry: ``{"default": name, "models": {name: {"file", "sha256", ...}}}``."""
    folder = folder or models_dir()
    path = folder / REGISTRY_FILE
    if not path.is_file():
        return {"default": None, "models": {}}
    with open(path, encoding="utf-8") as stream:
        registry: dict[str, Any] = json.load(stream)
    registry.setdefault("models", {})
    registry.setdefault("default", None)
    return registry


def resolve_model(model: str | Path | None, folder: Path | None = None) -> tuple[Path, str | None]:
    """Turn ``--model`` (None, a registered name or a path) into (file, expected sha256).

    A path ending in ``.onnx`` (or an existing file) is taken as is, with no checksum; a name
    is looked up in the registry, and ``None`` means the registry's default.
    """
    folder = folder or models_dir()
    registry = load_registry(folder)
    if model is None:
        model = registry["default"]
        if model is None:
            raise FileNotFoundError("no default model is shipped with this demhx; "
                                    "pass model=PATH.onnx")
    text = str(model)
    if text.endswith(".onnx") or Path(text).is_file() or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found; check the path or pass a "
                                    f"registered name ({', '.join(registry['models']) or 'none'})")
        return path, None
    entry = registry["models"].get(text)
    if entry is None:
        names = ", ".join(sorted(registry["models"])) or "none"
        raise ValueError(f"{text}: unknown model name; registered models: {names}, "
                         "or pass model=PATH.onnx")
    return folder / entry["file"], entry.get("sha256")


def verify_sha256(path: Path, expected: str | None) -> None:
    """Refuse a registered model whose bytes differ from the registry's sha256."""
    if expected is None:
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: registered model file is missing; reinstall demhx")
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(f"{path}: sha256 {actual[:12]}… does not match the registry "
                         f"({expected[:12]}…); the file is corrupt or was modified, "
                         "reinstall demhx")


def registered_fp16_sha256(path: Path, folder: Path | None = None) -> str | None:
    """The registry's sha256 of the ``.fp16.onnx`` twin of a registered model file, if any."""
    folder = folder or models_dir()
    for entry in load_registry(folder)["models"].values():
        if folder / str(entry.get("file", "")) == path and entry.get("fp16_sha256"):
            return str(entry["fp16_sha256"])
    return None


def load_spec(model: str | Path | None = None) -> ModelSpec:
    """Resolve, checksum and read a model's contract (the runtime's single entry point)."""
    path, expected = resolve_model(model)
    verify_sha256(path, expected)
    return spec_from_metadata(path, read_metadata(path))


def describe(folder: Path, entry: dict[str, Any]) -> str:
    """One line about the registered model ``entry`` of the registry in ``folder``: its
    registry description, else what its metadata says (version, weights, cost, voxel size);
    a line saying it cannot be read when it cannot."""
    from demhx.errors import describe_error

    if entry.get("description"):
        return " ".join(str(entry["description"]).split())
    path = folder / str(entry.get("file", ""))
    try:
        metadata = read_metadata(path)
    except Exception as error:  # the help still prints when a model cannot be read
        return f"{path.name}: cannot be read ({describe_error(error)[:80]}); reinstall demhx"
    values = {key.removeprefix(METADATA_PREFIX): value for key, value in metadata.items()}
    parts = [f"v{values.get('version', '?')}"]
    if "parameters" in values:
        parts.append(f"{int(values['parameters']) / 1e6:.2f} M weights")
    if "gflop_per_cube" in values:
        gflop, cube = float(values["gflop_per_cube"]), values.get("cube_size", "?")
        parts.append(f"{gflop:.0f} GFLOP per {cube}³ cube")
    parts.append(f"{values.get('voxel_size', '?')} Å/voxel")
    return ", ".join(parts)
