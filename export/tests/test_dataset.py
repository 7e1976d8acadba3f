"""Dataset builder: split hygiene, normalisation, index contents, resumable builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from demhx_export.dataset import (
    NOISE_STD,
    build_command,
    plan_samples,
    read_manifest,
    whole_map_negative,
)
from demhx_export.synth import TARGET_RECIPES

STRUCTURES = Path(__file__).resolve().parents[3] / "shared" / "data" / "structures"
pytestmark = pytest.mark.skipif(not (STRUCTURES / "manifest.tsv").is_file(),
                                reason="structure corpus not present")


def test_plans_use_only_their_split() -> None:
    split_of = {r["file"]: r["split"] for r in read_manifest(STRUCTURES)}
    for split in ("train", "val", "test"):
        plan = plan_samples(split, 40, 0, (2.5, 6.0), 25_000, STRUCTURES)
        assert {split_of[p["structure"]] for p in plan} == {split}
        assert all(2.5 <= p["resolution"] <= 6.0 for p in plan)
        assert len({p["id"] for p in plan}) == len(plan)


def test_plans_are_deterministic_and_skip_large_structures() -> None:
    a = plan_samples("train", 30, 7, (2.5, 6.0), 25_000, STRUCTURES)
    b = plan_samples("train", 30, 7, (2.5, 6.0), 25_000, STRUCTURES)
    assert a == b
    large = {r["file"] for r in read_manifest(STRUCTURES) if int(r["n_atoms"]) > 25_000}
    full = plan_samples("train", None, 0, (2.5, 6.0), 25_000, STRUCTURES)
    assert large and not large & {p["structure"] for p in full}


def test_build_writes_normalised_pairs_and_resumes(tmp_path: Path) -> None:
    # the two smallest test-split structures (< 900 atoms) keep this fast
    out = tmp_path / "ds"
    build_command("test", str(out), count=2, seed=0, max_atoms=900,
                  structures_dir=str(STRUCTURES))
    index = json.loads((out / "index.json").read_text())
    assert len(index) == 2
    for entry in index:
        with np.load(out / f"{entry['id']}.npz") as data:
            inputs, signal = data["input"], data["signal"]
            targets = {name: data[f"target_{name}"] for name in TARGET_RECIPES}
        target = targets["locscale"]
        assert inputs.dtype == target.dtype == np.float32 and signal.dtype == np.uint8
        assert inputs.shape == target.shape == signal.shape == tuple(entry["shape"])
        # every recipe: same grid, zero outside the molecule region, finite, not all zero
        for name, other in targets.items():
            assert other.shape == inputs.shape and np.isfinite(other).all(), name
            assert (other[signal == 0] == 0).all() and np.abs(other).max() > 0, name
        # solvent inside the box's inscribed sphere (a soft spherical mask may zero the corners)
        n = inputs.shape[0]
        radius = np.sqrt(((np.indices(inputs.shape) - (n - 1) / 2) ** 2).sum(axis=0))
        solvent = inputs[(signal == 0) & (radius < n / 2 - 12)]
        assert abs(solvent.mean()) < 0.02
        assert solvent.std() == pytest.approx(NOISE_STD, rel=0.15)
        assert (target[signal == 0] == 0).all()
        assert -1 <= entry["cc_input_target"] <= 1
        assert abs(entry["fsc_half_maps"] - entry["resolution"]) < 0.4
        # the whole-map negative, where the runtime normalises it as noise: noise-level
        with np.load(out / f"{entry['id']}.npz") as data:
            negative = data["negative"] if "negative" in data else None
        assert (negative is None) == (not entry["negative_normalisation"].startswith("runtime"))
        if negative is not None:
            assert negative.shape == inputs.shape and negative.dtype == np.float32
            assert 0.5 * NOISE_STD < negative.std() < 3 * NOISE_STD
            assert abs(np.corrcoef(negative.ravel(), inputs.ravel())[0, 1]) < 0.2
    # a second run finds everything done and rewrites nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    build_command("test", str(out), count=2, seed=0, max_atoms=900,
                  structures_dir=str(STRUCTURES))
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        plan_samples("training", 1, 0, (2.5, 6.0), 25_000, STRUCTURES)


def test_whole_map_negatives_are_noise_as_the_runtime_normalises_it() -> None:
    """A molecule-like blob in noise: randomised over the whole box, the power of the molecule
    spreads everywhere, and the runtime's normalisation brings it to the noise level (the
    molecule itself stands at many times that)."""
    rng = np.random.default_rng(0)
    grid = np.indices((64, 64, 64)) - 32
    blob = np.exp(-(grid ** 2).sum(axis=0) / (2 * 8.0 ** 2))
    raw = 5.0 + 3.0 * blob + rng.normal(0, 0.2, blob.shape)
    negative, method = whole_map_negative(raw, seed=4)
    assert method.startswith("runtime:") and negative is not None
    assert negative.std() < 3 * NOISE_STD and negative.max() < 1.0
    assert abs(np.corrcoef(negative.ravel(), blob.ravel())[0, 1]) < 0.1
    again, _ = whole_map_negative(raw, seed=4)
    np.testing.assert_array_equal(negative, again)  # deterministic per sample seed
