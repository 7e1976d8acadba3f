"""The package's shape: small modules, short functions, and layers that only point down.

bench → export → demhx: the runtime imports neither the training package nor the benchmarks,
and the training package does not import the benchmarks. A module over
:data:`MAX_MODULE_LINES` lines or a function over :data:`MAX_FUNCTION_LINES` is a sign that a
stage is doing two things; split it where the seam is (see the README's package map).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "demhx"
EXPORT = ROOT / "export" / "demhx_export"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.py"))


def _imported(path: Path) -> set[str]:
    """Top-level package names ``path`` imports (anywhere in the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", _modules(RUNTIME), ids=lambda path: path.name)
def test_runtime_modules_are_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines; split it along a seam"


@pytest.mark.parametrize("path", _modules(RUNTIME) + _modules(EXPORT),
                         ids=lambda path: f"{path.parent.name}/{path.name}")
def test_functions_are_short(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # type: ignore[operator]
    assert not long, f"{path.name}: {', '.join(long)}"


@pytest.mark.parametrize("path", _modules(RUNTIME), ids=lambda path: path.name)
def test_runtime_imports_neither_export_nor_bench(path: Path) -> None:
    assert not _imported(path) & {"demhx_export", "bench", "torch"}


@pytest.mark.parametrize("path", _modules(EXPORT), ids=lambda path: path.name)
def test_export_does_not_import_bench(path: Path) -> None:
    assert "bench" not in _imported(path)


def test_every_runtime_module_says_what_it_owns() -> None:
    missing = [path.name for path in _modules(RUNTIME)
               if path.name != "__main__.py"
               and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert not missing, f"modules without a docstring: {missing}"
