"""Kernels compiled ahead of time for container images: demhx._precompile and the seed of
numba's cache (demhx._jit.seed_cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import pytest
from conftest import real_map
from onnx_fixtures import identity_like

from demhx import _jit, _precompile, model

ROOT = Path(__file__).resolve().parents[1]


def test_seed_cache_copies_what_is_missing_and_keeps_the_rest(tmp_path: Path) -> None:
    seed, cache = tmp_path / "seed", tmp_path / "cache"
    (seed / "a" / "b").mkdir(parents=True)
    (seed / "top.nbi").write_bytes(b"index")
    (seed / "a" / "b" / "k.nbc").write_bytes(b"code")
    (cache / "a").mkdir(parents=True)
    (cache / "top.nbi").write_bytes(b"updated since")
    assert _jit.seed_cache(seed, cache) == 1
    assert (cache / "a" / "b" / "k.nbc").read_bytes() == b"code"
    assert (cache / "top.nbi").read_bytes() == b"updated since"
    assert not [p for p in cache.rglob("*") if p.name.endswith(".partial")]
    assert _jit.seed_cache(seed, cache) == 0


def test_seeding_from_the_environment_never_fails(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No seed folder, or a cache path that cannot be a folder: nothing copied, no error
    (numba then compiles, as without a seed)."""
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "k.nbi").write_bytes(b"index")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    for seed_path, cache in ((tmp_path / "absent", tmp_path / "c1"), (seed, blocked / "c")):
        monkeypatch.setenv(_jit.SEED_VARIABLE, str(seed_path))
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(cache))
        _jit._seed_from_environment()
    assert not (tmp_path / "c1").exists()
    monkeypatch.setenv(_jit.SEED_VARIABLE, str(seed))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "c2"))
    _jit._seed_from_environment()
    assert (tmp_path / "c2" / "k.nbi").read_bytes() == b"index"


def _environment(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")}
    return {**env, "PYTHONPATH": str(ROOT), "NUMBA_CPU_NAME": "generic", **variables}


@pytest.mark.slow
def test_a_seeded_cache_serves_every_real_run_without_compiling(tmp_path: Path) -> None:
    """What the images do: precompile into a seed (generic CPU), then runs on the real maps
    (and a larger synthetic one) through the command, with a fresh cache seeded from it,
    load every kernel and compile none (numba's cache log shows loads and no saves)."""
    maps = {name: real_map(name) for name in ("emd_5168.map", "6824.mrc", "EMD-3001.map",
                                              "emd_21457_seg.mrc", "emd_5168_monomer.mrc")}
    maps["96.mrc"] = tmp_path / "96.mrc"
    with mrcfile.new(maps["96.mrc"]) as stream:  # a box the small ones do not cover
        stream.set_data(_precompile._density(1.0, 5, (96, 96, 96)))
        stream.voxel_size = 1.0
    seed = tmp_path / "seed"
    made = subprocess.run([sys.executable, "-m", "demhx._precompile"], capture_output=True,
                          text=True, env=_environment(NUMBA_CACHE_DIR=str(seed)), cwd=tmp_path,
                          timeout=600)
    assert made.returncode == 0, made.stderr
    assert "numba kernels compiled for" in made.stdout
    note = subprocess.run([sys.executable, "-c", "from demhx import _warmup; "
                           "print(_warmup.compile_note())"], capture_output=True, text=True,
                          env=_environment(NUMBA_CACHE_DIR=str(tmp_path / "fresh"),
                                           **{_jit.SEED_VARIABLE: str(seed)}), cwd=tmp_path)
    assert note.stdout.strip() == "None", note.stderr  # seeded: nothing to compile, no note
    network = identity_like(tmp_path, model.resolve_model(None)[0])
    env = _environment(NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_DEBUG_CACHE="1",
                       **{_jit.SEED_VARIABLE: str(seed)})
    runs = [["emd_5168.map"], ["6824.mrc", "--tiling", "reference"], ["emd_21457_seg.mrc"],
            ["EMD-3001.map", "--tta", "3", "--confidence", str(tmp_path / "spread.mrc")],
            ["emd_5168_monomer.mrc"], ["96.mrc"]]
    for name, *options in runs:
        done = subprocess.run([sys.executable, "-m", "demhx", str(maps[name]),
                               str(tmp_path / "out.mrc"), "--model", str(network), "--device",
                               "cpu", "--overwrite", "-q", *options], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "data loaded" in done.stdout and "data saved" not in done.stdout, (
            name, [line for line in done.stdout.splitlines() if "saved" in line])
