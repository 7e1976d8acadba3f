"""Metrics: FSC, its resolution crossing, CC and model-simulated maps, on tiny volumes."""

from __future__ import annotations

import numpy as np
import pytest

from demhx_export.metrics import cc, fsc, fsc_resolution, model_map

STRUCTURES = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data"


def _volume(seed: int, shape: tuple[int, int, int] = (32, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_fsc_of_a_map_with_itself_is_one() -> None:
    a = _volume(0)
    frequencies, values = fsc(a, a, voxel_size=1.5)
    np.testing.assert_allclose(values, 1.0, atol=1e-5)
    assert frequencies[-1] == pytest.approx(0.5 / 1.5)


def test_fsc_of_independent_noise_is_near_zero_and_symmetric() -> None:
    a, b = _volume(1), _volume(2)
    _, ab = fsc(a, b)
    _, ba = fsc(b, a)
    np.testing.assert_allclose(ab, ba, atol=1e-6)
    assert np.abs(ab[4:]).max() < 0.2


def test_fsc_is_scale_invariant() -> None:
    a, b = _volume(3), _volume(4)
    mixed = a + 0.5 * b
    np.testing.assert_allclose(fsc(a, mixed)[1], fsc(3 * a, 0.2 * mixed)[1], atol=1e-5)


def test_fsc_resolution_interpolates_the_first_crossing() -> None:
    frequencies = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    values = np.array([1.0, 0.9, 0.5, 0.1, 0.3])
    # 0.143 is crossed between 0.2 (0.5) and 0.3 (0.1): 0.2 + 0.1 * 0.357 / 0.4
    assert fsc_resolution(frequencies, values, 0.143) == pytest.approx(1 / 0.289250, rel=1e-4)
    assert fsc_resolution(frequencies, np.ones(5), 0.143) == pytest.approx(2.5)


def test_cc_properties() -> None:
    a, b = _volume(5), _volume(6)
    assert cc(a, a) == pytest.approx(1.0)
    assert cc(a, b) == pytest.approx(cc(b, a))
    assert cc(a, 2 * a + 3) == pytest.approx(1.0)
    assert cc(a, -a) == pytest.approx(-1.0)
    mask = np.zeros(a.shape)
    mask[:16] = 1
    c = a.copy()
    c[16:] = b[16:]
    assert cc(a, c, mask) == pytest.approx(1.0)


def test_model_map_lands_on_the_map_grid() -> None:
    # one carbon atom at a known position, on a grid with non-zero origin and 2 Å voxels
    gemmi = pytest.importorskip("gemmi")
    st = gemmi.Structure()
    st.add_model(gemmi.Model("1"))
    chain = gemmi.Chain("A")
    residue = gemmi.Residue()
    residue.name = "GLY"
    residue.seqid = gemmi.SeqId(1, " ")
    atom = gemmi.Atom()
    atom.name, atom.element, atom.occ = "CA", gemmi.Element("C"), 1.0
    atom.pos = gemmi.Position(110.0, 206.0, 314.0)
    residue.add_atom(atom)
    chain.add_residue(residue)
    st[0].add_chain(chain)
    origin = (100.0, 200.0, 300.0)
    volume = model_map(st, (16, 12, 10), origin=origin, voxel_size=2.0, resolution=4.0)
    assert volume.shape == (16, 12, 10)
    # the peak is at (x, y, z) = ((110-100)/2, (206-200)/2, (314-300)/2) = (5, 3, 7)
    assert np.unravel_index(np.argmax(volume), volume.shape) == (7, 3, 5)


def test_guinier_b_recovers_an_applied_blur() -> None:
    # a map with a flat radial amplitude profile, blurred by B = 80 Å²
    from demhx_export.metrics import guinier_b, sharpen

    rng = np.random.default_rng(7)
    flat = rng.standard_normal((48, 48, 48)).astype(np.float32)
    blurred = sharpen(flat, 1.0, -80.0)
    assert guinier_b(blurred, 1.0, 3.0) == pytest.approx(80.0, rel=0.1)
    assert guinier_b(sharpen(blurred, 1.0, 80.0), 1.0, 3.0) == pytest.approx(0.0, abs=8.0)


def test_model_mask_is_soft_and_encloses_the_core() -> None:
    from demhx_export.metrics import model_mask

    volume = np.zeros((32, 32, 32), dtype=np.float32)
    volume[12:20, 12:20, 12:20] = 1.0
    mask = model_mask(volume, volume=512.0, dilation=2.0, soft_edge=3.0)
    assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
    assert (mask[13:19, 13:19, 13:19] == 1).all()
    assert mask[0, 0, 0] == 0
    assert 0 < mask[16, 16, 23] < 1  # in the soft edge
