"""The README's quick start and the CI entry point must agree."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_cpu_wheel_variant_is_the_quick_start_test_command_plus_the_index() -> None:
    """The command a normal Linux machine should run differs from the quick start's only by
    PyTorch's CPU wheel index, so the two cannot drift apart."""
    text = _normalised((ROOT / "README.md").read_text(encoding="utf-8"))
    variants = re.findall(r"`(python3 -m pip install --extra-index-url [^`]*)`", text)
    install = _quick_start()[1].split(" && ")[0]
    assert variants, "the README no longer gives the CPU-wheel variant of the test command"
    for variant in variants:
        assert variant.replace(" --extra-index-url https://download.pytorch.org/whl/cpu",
                               "") == install


def test_readme_names_the_fix_demhx_prints_for_two_onnxruntime_packages() -> None:
    from demhx import device

    text = _normalised((ROOT / "README.md").read_text(encoding="utf-8"))
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu"
    assert fix in device._ORT_FIX and fix in text
    cuda = 'pip install "onnxruntime-gpu[cuda,cudnn]"'
    assert cuda in device._ORT_FIX and cuda in text
