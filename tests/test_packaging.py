"""The distribution: what the wheel carries (the shipped models, the licence), its metadata."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from demhx import model

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    with open(ROOT / "pyproject.toml", "rb") as stream:
        return tomllib.load(stream)


def test_every_registered_model_file_is_package_data() -> None:
    """Each file the registry names (float32 model and fp16 twin) and the registry itself
    match the package-data patterns of demhx.models, so the wheel carries them."""
    config = _pyproject()["tool"]["setuptools"]
    assert config["package-dir"]["demhx.models"] == "models"
    patterns = config["package-data"]["demhx.models"]
    registry = model.load_registry(ROOT / "models")
    files = [model.REGISTRY_FILE] + [entry[key] for entry in registry["models"].values()
                                     for key in ("file", "fp16") if entry.get(key)]
    assert registry["models"] and registry["default"] in registry["models"]
    for name in files:
        assert (ROOT / "models" / name).is_file(), name
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_licence_version_and_urls_are_declared() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert project["dynamic"] == ["version"]  # read from demhx/_version.py, one place
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "demhx._version.__version__"}
    assert project["urls"] and all(url.startswith("https://") for url in project["urls"].values())
    assert any(c.startswith("Development Status") for c in project["classifiers"])


def test_shipped_models_match_their_registry_entries_and_cards() -> None:
    """Each shipped file's sha256 is the registry's, and the model card quotes it; each
    model's metadata names the registered model."""
    import onnx

    registry = model.load_registry(ROOT / "models")
    card = (ROOT / "models" / "README.md").read_text(encoding="utf-8")
    for name, entry in registry["models"].items():
        for key, digest_key in (("file", "sha256"), ("fp16", "fp16_sha256")):
            if not entry.get(key):
                continue
            path = ROOT / "models" / entry[key]
            assert model.sha256_of(path) == entry[digest_key], path.name
            assert entry[digest_key] in card, f"models/README.md lacks {path.name}'s sha256"
        props = {p.key: p.value for p in onnx.load(ROOT / "models" / entry["file"],
                                                  load_external_data=False).metadata_props}
        assert props.get("demhx.name") == name
