"""The README's quick start and the CI entry point must agree."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands() -> None:
    assert len(_quick_start()) == 2


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = _quick_start()[1]
    assert test_command in ci


def test_quick_start_example_map_is_bundled() -> None:
    first = _quick_start()[0]
    example = first.split("demhx ", 1)[1].split()[0]
    assert (ROOT / example).is_file()


def _normalised(text: str) -> str:
    return " ".join(text.split())


def test_the_readme_test_command_installs_no_torch() -> None:
    """The runtime's tests run on any machine without PyTorch (export/ has its own)."""
    test_command = _quick_start()[1]
    assert "torch" not in test_command and "export" not in test_command
    assert test_command.endswith(" tests")


def test_cpu_wheel_variant_is_the_ci_export_install_plus_the_index() -> None:
    """The README's install of export/ for a normal Linux machine differs from CI's only by
    PyTorch's CPU wheel index, so the two cannot drift apart."""
    text = _normalised((ROOT / "README.md").read_text(encoding="utf-8"))
    ci = _normalised((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    variants = re.findall(r"`(python3 -m pip install --extra-index-url [^`]*)`", text)
    assert variants, "the README no longer gives the CPU-wheel install of export/"
    for variant in variants:
        plain = variant.replace(" --extra-index-url https://download.pytorch.org/whl/cpu", "")
        assert plain in ci, f"{plain!r} is not what .ci/run installs"


def test_ci_runs_lint_types_and_export_as_their_own_steps() -> None:
    ci = _normalised((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    for command in ("python3 -m ruff check demhx export tests bench", "python3 -m mypy demhx",
                    "python3 -m mypy export/demhx_export",
                    "python3 -m pytest -q -p no:cacheprovider export/tests"):
        assert command in ci, command


def test_readme_names_the_fix_demhx_prints_for_two_onnxruntime_packages() -> None:
    from demhx import device

    text = _normalised((ROOT / "README.md").read_text(encoding="utf-8"))
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu"
    assert fix in device._ORT_FIX and fix in text
    cuda = 'pip install "onnxruntime-gpu[cuda,cudnn]"'
    assert cuda in device._ORT_FIX and cuda in text


@pytest.mark.slow
def test_the_api_example_runs_as_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, run from a folder laid out like the repository's root, with
    a small fixture network as the default model so that it takes seconds, not minutes."""
    from onnx_fixtures import identity_path, write_registry

    import demhx.model

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S)
    assert block is not None
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "emd_5168.map", tmp_path / "examples")
    models = tmp_path / "models"
    write_registry(models, {"fixture": identity_path(models)}, default="fixture")
    monkeypatch.setattr(demhx.model, "models_dir", lambda: models)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture model is untrained: it says so
        exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102
    for name in ("emd_5168_demhx.mrc", "emd_5168_tta.mrc", "emd_5168_spread.mrc"):
        assert (tmp_path / name).is_file()
    assert repr(namespace["result"]).startswith("Enhanced(map=100×100×100 float32")
