"""Shared fixtures: tiny networks and their checkpoints (widths 4,8,16, 16³ cubes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# the runtime (demhx) is normally installed; from a bare checkout use the repository root
if importlib.util.find_spec("demhx") is None:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from demhx_export.network import UNet3D  # noqa: E402

TINY_WIDTHS = (4, 8, 16)
TINY_CUBE = 16  # voxels


@pytest.fixture
def tiny_net() -> UNet3D:
    """A seeded, untrained network with widths 4,8,16 (72,161 parameters), in eval mode."""
    torch.manual_seed(0)
    return UNet3D(TINY_WIDTHS).eval()


@pytest.fixture
def tiny_config() -> dict[str, object]:
    """Checkpoint info as training writes it (cube size under ``train``)."""
    return {"train": {"train_dir": "data/train", "cube_size": TINY_CUBE, "seed": 3},
            "step": 120, "seed": 3, "commit": "abc1234"}
