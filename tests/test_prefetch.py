"""Batches run through the extract → network → accumulate threads (demhx._prefetch)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from demhx import _kernels, _prefetch

CUBE = 8


def _cubes(count: int) -> tuple[np.ndarray, np.ndarray]:
    """A random padded volume and ``count`` cube corners in it, each cube different."""
    rng = np.random.default_rng(2)
    padded = rng.standard_normal((24, 24, 24)).astype(np.float32)
    corners = rng.integers(0, 24 - CUBE + 1, (count, 3)).astype(np.int64)
    return padded, corners


def _expected(padded: np.ndarray, corners: np.ndarray) -> np.ndarray:
    cubes = np.empty((len(corners), 1, CUBE, CUBE, CUBE), np.float32)
    _kernels.extract_cubes_reference(padded, corners, 0, len(corners), cubes)
    return cubes * np.float32(2.0)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_a_network_returning_its_buffer_is_summed_before_the_buffer_is_reused(
        batch_size: int) -> None:
    """The network doubles the batch in place and returns it (or a view of it); the sums are
    slow, so a buffer handed back to the extraction before its sums were made would be
    overwritten with the next cubes first."""
    padded, corners = _cubes(5 * _prefetch._BUFFERS * batch_size)
    seen = np.full((len(corners), 1, CUBE, CUBE, CUBE), np.nan, np.float32)

    def in_place(batch: np.ndarray) -> np.ndarray:
        batch *= np.float32(2.0)
        return batch[:, :1]

    def slow_add(predictions: np.ndarray, corners: np.ndarray, first: int, count: int) -> None:
        time.sleep(0.005)
        seen[first:first + count] = predictions

    _prefetch.run_batches(padded, corners, CUBE, in_place, batch_size, slow_add, None)
    np.testing.assert_array_equal(seen, _expected(padded, corners))


def test_an_error_in_the_sums_stops_the_run() -> None:
    padded, corners = _cubes(12)

    def broken(predictions: np.ndarray, corners: np.ndarray, first: int, count: int) -> None:
        if first >= 4:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _prefetch.run_batches(padded, corners, CUBE, lambda b: b.copy(), 2, broken, None)
