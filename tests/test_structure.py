"""The package's shape: one home per stage, short functions, and layers that only point down.

bench → export → demhx: the runtime imports neither the training package nor the benchmarks,
and the training package does not import the benchmarks. Inside demhx no module imports
another's private names (a name one module needs from another is part of that module's
interface, and public), and no two modules import each other, directly or through others,
at the top or inside a function. A function over :data:`MAX_FUNCTION_LINES` lines is a sign
that it does two things. A stage stays in one module however long (see the README's package
map).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "demhx"
EXPORT = ROOT / "export" / "demhx_export"
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


def _runtime_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every demhx module ``path`` imports from, anywhere in the file:
    ``name`` is the name taken from it (None for the module itself)."""
    modules = {item.stem for item in _modules(RUNTIME)}
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], None) for alias in node.names
                      if alias.name.startswith("demhx.")]
        elif isinstance(node, ast.ImportFrom) and node.module == "demhx":
            found += [(alias.name, None) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("demhx."):
            found += [(node.module.split(".")[1], alias.name)  # type: ignore[union-attr]
                      for alias in node.names]
    return found


def _private_uses(path: Path) -> list[str]:
    """Private names of other demhx modules that ``path`` imports or reads as attributes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {item.stem for item in _modules(RUNTIME)} - {path.stem}
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "demhx"
                for alias in node.names if alias.name in modules}
    uses = [f"{module}.{name}" for module, name in _runtime_imports(path)
            if name is not None and module != path.stem
            and name.startswith("_") and not name.startswith("__")]
    uses += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
             and node.value.id in imported and node.attr.startswith("_")
             and not node.attr.startswith("__")]
    return uses


@pytest.mark.parametrize("path", _modules(RUNTIME), ids=lambda path: path.name)
def test_no_module_takes_another_modules_private_names(path: Path) -> None:
    assert not _private_uses(path), f"{path.name} uses {sorted(set(_private_uses(path)))}"


def test_runtime_modules_import_without_circles() -> None:
    graph = {path.stem: {module for module, _ in _runtime_imports(path)} - {path.stem}
             for path in _modules(RUNTIME)}

    def reaches(start: str, goal: str) -> list[str] | None:
        seen, paths = {start}, [[start]]
        while paths:
            trail = paths.pop()
            for module in sorted(graph.get(trail[-1], ())):
                if module == goal:
                    return [*trail, module]
                if module not in seen:
                    seen.add(module)
                    paths.append([*trail, module])
        return None

    circles = [" → ".join(trail) for module in sorted(graph)
               if (trail := reaches(module, module)) is not None]
    assert not circles, f"import circles: {circles}"


def test_the_circle_and_private_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The two checks above find a private import, a private attribute and a lazy import."""
    sample = tmp_path / "sample.py"
    sample.write_text("from demhx import mrcio\nfrom demhx.validate import _hidden\n\n"
                      "def f():\n    from demhx import pipeline\n    return mrcio._secret\n",
                      encoding="utf-8")
    assert set(_private_uses(sample)) == {"validate._hidden", "mrcio._secret"}
    assert ("pipeline", None) in _runtime_imports(sample)


def _public_definitions(path: Path) -> set[str]:
    """Functions and classes a module defines without a leading underscore."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")}


@pytest.mark.parametrize("path", [path for path in _modules(RUNTIME)
                                  if not path.name.startswith("_")], ids=lambda path: path.name)
def test_public_modules_say_what_they_export(path: Path) -> None:
    """``__all__`` in every public module: it names what the module defines (each name
    exists) and every public function and class it defines."""
    import importlib

    try:
        module = importlib.import_module(f"demhx.{path.stem}")
    except ModuleNotFoundError as missing:  # a module of an optional extra (demhx.ccpem)
        if (missing.name or "demhx").startswith("demhx"):
            raise
        pytest.skip(f"demhx.{path.stem} needs {missing.name}, an optional extra")
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{path.name} has no __all__"
    assert all(hasattr(module, name) for name in exported)
    if path.stem != "__init__":
        assert _public_definitions(path) <= set(exported), (
            f"{path.name}: {sorted(_public_definitions(path) - set(exported))} not in __all__")


def _defined_names(path: Path) -> set[str]:
    """Every name a module binds at its top level: functions, classes and assignments."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) else [])
        names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


@pytest.mark.parametrize("path", [path for path in _modules(RUNTIME) if path.stem != "__init__"],
                         ids=lambda path: path.name)
def test_no_module_re_exports_another_s_names(path: Path) -> None:
    """A module's ``__all__`` lists only what it defines itself: a name lives in one module,
    and callers import it from there (the package's ``__init__`` is the one front)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    exported: list[str] = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and
                                                 target.id == "__all__"
                                                 for target in node.targets)):
            exported = list(ast.literal_eval(node.value))
    foreign = sorted(set(exported) - _defined_names(path))
    assert not foreign, f"{path.name} re-exports {foreign}; import them where they are defined"

