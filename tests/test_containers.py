"""The container recipes (Dockerfile, .dockerignore, demhx.def) against the package they install.

Docker and Apptainer are not needed: the recipes are parsed and checked for what must hold
for the image to work. demhx's own install step (``pip install --no-deps`` of the copied tree)
is run here as a wheel build on a staged copy of what the Dockerfile copies; the whole install
and a run are ``bench/container_check.sh``'s.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEFINITION = ROOT / "demhx.def"
ORT_CPU, ORT_GPU = "onnxruntime", "onnxruntime-gpu"
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3-dev|\S+-dev)\b")


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each starting with its FROM."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, arguments))
    return stages


def _docker_args() -> dict[str, str]:
    """Default values of every ARG in the Dockerfile."""
    found = {}
    for keyword, arguments in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "ARG" and "=" in arguments:
            name, value = arguments.split("=", 1)
            found[name] = value
    return found


def _section(name: str) -> str:
    """One ``%name`` section of demhx.def (its lines, continuation lines joined)."""
    text = DEFINITION.read_text(encoding="utf-8")
    match = re.search(rf"^%{name}\b[^\n]*\n(.*?)(?=^%|\Z)", text, re.M | re.S)
    assert match is not None, f"demhx.def has no %{name} section"
    return re.sub(r"\\\n", " ", match.group(1))


def _header(name: str) -> str:
    match = re.search(rf"^{name}:\s*(\S+)", DEFINITION.read_text(encoding="utf-8"), re.M)
    assert match is not None, f"demhx.def has no {name}: header"
    return match.group(1)


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments after ``pip install`` of every pip install in shell commands."""
    installs = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            if "pip install" not in part:
                continue
            words = shlex.split(part)
            for index, word in enumerate(words[:-1]):
                if word.endswith("pip") and words[index + 1] == "install":
                    installs.append(words[index + 2:])
    return installs


def _docker_pip_installs() -> list[list[str]]:
    version = _docker_args()["ORT_GPU_VERSION"]
    runs = [arguments.replace("${ORT_GPU_VERSION}", version)
            for stage in _stages() for keyword, arguments in stage if keyword == "RUN"]
    return _pip_installs(runs)


def _def_pip_installs() -> list[list[str]]:
    return _pip_installs(_section("post").splitlines())


def _requirements(installs: list[list[str]]) -> dict[str, Requirement]:
    """Named requirements installed from the index (not local paths), by package name."""
    found = {}
    for words in installs:
        for word in words:
            if not word.startswith(("-", "/", ".")):
                requirement = Requirement(word)
                found[requirement.name.lower()] = requirement
    return found


def _source_installs(installs: list[list[str]]) -> list[list[str]]:
    """The pip installs of the local source tree (a path argument)."""
    return [words for words in installs if any(word.startswith(("/", ".")) for word in words)]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_docker_and_apptainer_install_the_same_packages() -> None:
    docker, apptainer = _requirements(_docker_pip_installs()), _requirements(_def_pip_installs())
    assert {name: str(r) for name, r in docker.items()} == \
        {name: str(r) for name, r in apptainer.items()}
    assert _docker_args()["CUDA_IMAGE"] == _header("From")
    assert _header("Bootstrap") == "docker"


def test_dependencies_are_pyprojects_with_the_gpu_runtime() -> None:
    declared = {Requirement(text).name.lower(): Requirement(text)
                for text in _pyproject()["project"]["dependencies"]}
    installed = _requirements(_docker_pip_installs())
    assert set(installed) == (set(declared) - {ORT_CPU}) | {ORT_GPU}
    for name in set(declared) - {ORT_CPU}:
        assert installed[name].specifier == declared[name].specifier, name
    pinned = [spec.version for spec in installed[ORT_GPU].specifier if spec.operator == "=="]
    assert len(pinned) == 1, "pin onnxruntime-gpu: its CUDA version must match the base image"
    assert declared[ORT_CPU].specifier.contains(Version(pinned[0]))


@pytest.mark.parametrize("installs", [_docker_pip_installs, _def_pip_installs],
                         ids=["Dockerfile", "demhx.def"])
def test_cpu_onnxruntime_is_never_installed(installs: Callable[[], list[list[str]]]) -> None:
    assert ORT_CPU not in _requirements(installs())
    sources = _source_installs(installs())
    assert sources, "demhx itself is not installed"
    for words in sources:
        # Without --no-deps pip would pull pyproject's CPU onnxruntime in beside the GPU one.
        assert "--no-deps" in words, words
        assert not any("[" in word for word in words), words


def test_both_recipes_check_the_result() -> None:
    checks = [arguments for keyword, arguments in _stages()[0] if keyword == "RUN"
              and "CUDAExecutionProvider" in arguments]
    post = _section("post")
    for text in [*checks, post]:
        assert "'onnxruntime' not in" in text and "registry.json" in text
    assert len(checks) == 1


def test_entrypoint_and_runscript_run_demhx() -> None:
    final = _stages()[-1]
    entrypoints = [arguments for keyword, arguments in final if keyword == "ENTRYPOINT"]
    assert [json.loads(text) for text in entrypoints] == [["demhx"]]
    assert [line.strip() for line in _section("runscript").splitlines() if line.strip()] == \
        ['exec demhx "$@"']
    assert "demhx --version" in _section("test")
    assert "apptainer run --nv" in _section("help")


def test_image_runs_as_a_user_in_data() -> None:
    final = _stages()[-1]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [arguments for keyword, arguments in final if keyword == "WORKDIR"][-1] == "/data"
    keywords = [keyword for keyword, _ in final]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_runtime_environment() -> None:
    """numba can cache without a writable home; ONNX Runtime's telemetry is off."""
    docker = {}
    for keyword, arguments in _stages()[-1]:
        if keyword == "ENV":
            docker.update(word.split("=", 1) for word in shlex.split(arguments))
    apptainer = dict(re.findall(r"^\s*export (\w+)=(\S+)", _section("environment"), re.M))
    for environment in (docker, apptainer):
        assert environment["ORT_DISABLE_TELEMETRY"] == "1"
        assert environment["NUMBA_CACHE_DIR"].strip('"').startswith("/tmp/")
        assert environment["PATH"].startswith("/opt/demhx/bin:")
        assert environment["NUMBA_CPU_NAME"] == "generic"
        assert environment["DEMHX_NUMBA_SEED"] == SEED
    assert "unset PYTHONPATH" in _section("environment")


SEED = "/opt/demhx/numba-seed"


def test_images_ship_numbas_kernels_compiled_for_any_cpu() -> None:
    """Both recipes compile the kernels at build time into the seed folder, for the generic
    CPU the runs ask for (the Docker ENV comes before the RUN that compiles), readable by
    every user."""
    final = _stages()[-1]
    keywords = [keyword for keyword, _ in final]
    compiles = [i for i, (keyword, arguments) in enumerate(final)
                if keyword == "RUN" and "-m demhx._precompile" in arguments]
    assert len(compiles) == 1
    command = final[compiles[0]][1]
    assert f"NUMBA_CACHE_DIR={SEED}" in command and f"chmod -R a+rX {SEED}" in command
    environment = max(i for i, keyword in enumerate(keywords) if keyword == "ENV")
    assert environment < compiles[0]
    post = " ".join(_section("post").replace("\\\n", " ").split())
    assert (f"NUMBA_CPU_NAME=generic NUMBA_CACHE_DIR={SEED} /opt/demhx/bin/python -m "
            "demhx._precompile") in post
    assert f"chmod -R a+rX {SEED}" in post


def test_image_is_small() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build in one stage and copy the environment to a clean one"
    final_runs = [arguments for keyword, arguments in stages[-1] if keyword == "RUN"]
    assert not _pip_installs(final_runs), "install in the build stage"
    assert any(keyword == "COPY" and arguments.startswith("--from=")
               for keyword, arguments in stages[-1])
    runs = [arguments for stage in stages for keyword, arguments in stage if keyword == "RUN"]
    post = _section("post")
    installs = [command for command in runs if "apt-get install" in command]
    installs += [line for line in post.splitlines() if "apt-get install" in line]
    assert len(installs) >= 2
    for command in installs:
        packages = command.split("apt-get install", 1)[1].split("&&")[0]
        assert "--no-install-recommends" in packages and not BUILD_TOOLS.search(packages)
    # The package lists go in the layer that downloaded them.
    assert all("rm -rf /var/lib/apt/lists/*" in command for command in installs[:-1])
    assert "rm -rf /var/lib/apt/lists/*" in post
    for words in _docker_pip_installs() + _def_pip_installs():
        assert "--no-cache-dir" in words, words


def test_header_comments_name_the_pinned_versions() -> None:
    """The versions stated in the comments are the ones the recipes use."""
    docker = DOCKERFILE.read_text(encoding="utf-8")
    version = _docker_args()["ORT_GPU_VERSION"]
    cuda = re.match(r"nvidia/cuda:(\d+\.\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+$",
                    _docker_args()["CUDA_IMAGE"])
    assert cuda is not None, "use an official nvidia/cuda *-cudnn-runtime-ubuntu* image"
    for text in (docker, DEFINITION.read_text(encoding="utf-8")):
        comments = " ".join(line.lstrip("# ") for line in text.splitlines()
                            if line.startswith("#"))
        assert f"onnxruntime-gpu {version}" in comments
        assert f"CUDA {cuda.group(1)}" in comments


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (the last match wins)."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        # A pattern matching a folder keeps everything under it out too.
        if any(re.fullmatch(regex, "/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_matcher() -> None:
    patterns = ["**/__pycache__", ".venv*", "a/b", "*.sif", "!keep.sif"]
    assert _dockerignored("x/y/__pycache__/m.pyc", patterns)
    assert _dockerignored(".venv-ci/bin/python", patterns)
    assert _dockerignored("a/b/c", patterns) and not _dockerignored("a/bc", patterns)
    assert _dockerignored("demhx.sif", patterns) and not _dockerignored("keep.sif", patterns)
    assert not _dockerignored("x/.venv", patterns)


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", ".venv-ci/bin/python", "export/runs/tight-v1/best.pt",
    "tests/test_cli.py", "export/tests/test_train.py", "demhx/__pycache__/cli.cpython-311.pyc",
    ".pytest_cache/README.md", ".ruff_cache/x", "demhx.egg-info/PKG-INFO"])
def test_dockerignore_keeps_out(path: str) -> None:
    assert _dockerignored(path, _dockerignore())


def test_dockerignore_keeps_what_the_image_copies() -> None:
    sources = []
    for keyword, arguments in _stages()[0]:
        if keyword == "COPY" and not arguments.startswith("--from="):
            sources += arguments.split()[:-1]
    assert {"pyproject.toml", "README.md", "demhx", "models"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        files = [source] if (ROOT / source).is_file() else [
            str(path.relative_to(ROOT)) for path in (ROOT / source).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts]
        for path in files:
            assert not _dockerignored(path, _dockerignore()), path
    copied = [line.split()[0] for line in _section("files").splitlines() if line.strip()]
    assert sorted(copied) == sorted(sources)


def test_models_are_package_data() -> None:
    """An install of the copied sources carries every registered model file."""
    setuptools = _pyproject()["tool"]["setuptools"]
    assert "demhx.models" in setuptools["packages"]
    assert setuptools["package-dir"]["demhx.models"] == "models"
    globs = setuptools["package-data"]["demhx.models"]
    registry = json.loads((ROOT / "models" / "registry.json").read_text(encoding="utf-8"))
    names = ["registry.json", "__init__.py"]
    for entry in registry["models"].values():
        names += [entry["file"]] + ([entry["fp16"]] if entry.get("fp16") else [])
    for name in names:
        assert (ROOT / "models" / name).is_file(), name
        assert name.endswith(".py") or any(Path(name).match(glob) for glob in globs), name


def _docker_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context in the build stage."""
    copies = []
    for keyword, arguments in _stages()[0]:
        if keyword == "COPY" and not arguments.startswith("--from="):
            *sources, destination = arguments.split()
            copies.append((sources, destination))
    return copies


def _container_check_copies() -> list[str]:
    """What bench/container_check.sh copies into the tree it installs ("$work/src/")."""
    text = (ROOT / "bench" / "container_check.sh").read_text(encoding="utf-8")
    copied = []
    for line in text.splitlines():
        words = shlex.split(line) if line.startswith("cp ") else []
        if words and words[-1] == "$work/src/":
            copied += [word.removeprefix("$root/") for word in words[1:-1]
                       if word.startswith("$root/")]
    return copied


def _read_by_the_install() -> set[str]:
    """The repository's top-level paths that building demhx from a copied tree reads:
    pyproject.toml, the readme and licence files it names, the folders of its packages."""
    pyproject = _pyproject()
    project, setuptools = pyproject["project"], pyproject["tool"]["setuptools"]
    readme = project["readme"]
    needed = {"pyproject.toml", readme if isinstance(readme, str) else readme["file"]}
    for pattern in project.get("license-files", []):
        matches = [path.relative_to(ROOT).as_posix() for path in ROOT.glob(pattern)]
        assert matches, f"license-files names {pattern!r}, which is not in the repository"
        needed.update(matches)
    return needed | {folder.split("/")[0] for folder in setuptools["package-dir"].values()}


@pytest.mark.parametrize("recipe", ["Dockerfile", "demhx.def", "bench/container_check.sh"])
def test_recipes_copy_every_file_the_install_reads(recipe: str) -> None:
    """LICENSE among them: pyproject.toml names it in license-files, and a build without
    it warns (setuptools stops supporting such builds after 2027-02-18)."""
    copied = {
        "Dockerfile": lambda: [source for sources, _ in _docker_copies() for source in sources],
        "demhx.def": lambda: [line.split()[0] for line in _section("files").splitlines()
                              if line.strip()],
        "bench/container_check.sh": _container_check_copies,
    }[recipe]()
    assert "LICENSE" in _read_by_the_install()
    missing = _read_by_the_install() - set(copied)
    assert not missing, f"{recipe} does not copy {sorted(missing)}, which the install reads"


def _stage_docker_copies(tree: Path) -> None:
    """Lay out in ``tree`` exactly what the Dockerfile copies into the folder it installs
    (files that .dockerignore keeps out of the build context left out)."""
    installed = [word for words in _source_installs(_docker_pip_installs()) for word in words
                 if word.startswith("/")]
    assert len(installed) == 1, installed
    ignored = _dockerignore()
    for sources, destination in _docker_copies():
        target = tree / Path(destination).relative_to(installed[0])
        for source in sources:
            top = ROOT / source
            files = [top] if top.is_file() else sorted(top.rglob("*"))
            for path in files:
                relative = path.relative_to(ROOT).as_posix()
                if not path.is_file() or _dockerignored(relative, ignored):
                    continue
                if top.is_dir():  # COPY demhx /src/demhx: the folder's contents
                    copy = target / path.relative_to(top)
                else:  # COPY a b /src/ puts them in the folder; COPY a /src/b names it
                    copy = target / top.name if destination.endswith("/") else target
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_bytes(path.read_bytes())


def _backend_installed(tree: Path) -> bool:
    """Whether this environment has the build backend the tree's pyproject.toml requires
    (then a build without isolation uses the same backend versions pip would fetch)."""
    text = (tree / "pyproject.toml").read_text(encoding="utf-8")
    for requirement in map(Requirement, tomllib.loads(text)["build-system"]["requires"]):
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(Version(version), prereleases=True):
            return False
    return True


@pytest.mark.slow
def test_copied_tree_installs_with_its_licence_and_no_warning(tmp_path: Path) -> None:
    """The recipes' install step, ``pip install --no-deps <copied tree>``, on a copy of what
    the Dockerfile copies: pip builds a wheel (here without build isolation when the
    environment has the required setuptools, as fast; else with it, as the image does);
    setuptools says nothing about licence files and the wheel carries LICENSE."""
    tree = tmp_path / "src"
    _stage_docker_copies(tree)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v",
               "--wheel-dir", str(tmp_path / "wheel"), str(tree)]
    if _backend_installed(tree):
        command.insert(4, "--no-build-isolation")
    environment = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env=environment)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    warnings = [line for line in log.splitlines() if "Warning:" in line]
    assert "did not match any files" not in log, log[-4000:]
    assert not [line for line in warnings if re.search("licen[cs]e", line, re.I)], warnings
    (wheel,) = (tmp_path / "wheel").glob("demhx-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(name for name in names
                                     if name.endswith(".dist-info/METADATA"))).decode()
    assert "License-File: LICENSE" in metadata.splitlines()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "demhx/models/registry.json" in names
