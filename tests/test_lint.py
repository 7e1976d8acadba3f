"""ruff and mypy over the code, as part of the test suite (so CI runs them with the tests).

Both are pinned in the ``test`` extra, so the same rules apply on every machine. mypy checks
the runtime (``demhx``) and the training package (``export/demhx_export``) with the settings
in ``pyproject.toml``; ruff checks everything, tests and benchmarks included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    pytest.importorskip("ruff", reason="install the test extra: pip install \".[test]\"")
    result = _run(sys.executable, "-m", "ruff", "check", "demhx", "export", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("package", ["demhx", "export/demhx_export"])
def test_mypy_is_clean(package: str, tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="install the test extra: pip install \".[test]\"")
    if package.startswith("export"):
        pytest.importorskip("torch", reason="export/ is checked where its dependencies are")
    result = _run(sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                  package)
    assert result.returncode == 0, result.stdout + result.stderr
