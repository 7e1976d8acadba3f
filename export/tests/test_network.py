"""The U-net: shapes for odd widths and several cube sizes, parameter and FLOP counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from demhx_export.network import (
    PAPER_GFLOP_PER_CUBE,
    PAPER_PARAMETERS,
    PAPER_WIDTHS,
    UNet3D,
    check_cube_size,
    count_parameters,
    flops_per_cube,
    group_count,
    parse_widths,
    summary,
)

PAPER_QUOTED_PARAMETERS = 4.56e6  # the paper's figure, 3 significant digits
PAPER_QUOTED_GFLOP = 163.0


@pytest.mark.parametrize("cube_size", [8, 16, 24])
def test_odd_widths_keep_the_shape(cube_size: int) -> None:
    torch.manual_seed(0)
    net = UNet3D((5, 7, 9)).eval()
    x = torch.randn(2, 1, cube_size, cube_size, cube_size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_batched_equals_one_by_one(tiny_net: UNet3D) -> None:
    x = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        together = tiny_net(x)
        apart = torch.cat([tiny_net(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)


def test_paper_configuration_counts() -> None:
    figures = summary(PAPER_WIDTHS, 64)
    # exact values of this layout (documented in network.py), and the paper's rounded figures
    assert figures["parameters"] == PAPER_PARAMETERS == 4_561_793
    assert abs(figures["parameters"] - PAPER_QUOTED_PARAMETERS) < 0.001 * PAPER_QUOTED_PARAMETERS
    assert figures["gflop_per_cube"] == pytest.approx(163.024207872, abs=1e-9)
    assert abs(figures["gflop_per_cube"] - PAPER_QUOTED_GFLOP) < 0.001 * PAPER_QUOTED_GFLOP
    assert round(figures["gflop_per_cube"]) == PAPER_GFLOP_PER_CUBE


def test_parameter_count_matches_a_real_network() -> None:
    assert count_parameters(UNet3D((5, 7, 9))) == summary((5, 7, 9))["parameters"]


def _hook_flops(net: nn.Module, x: torch.Tensor) -> int:
    """2 × multiply-adds of every (transposed) convolution, counted from the tensors seen."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        taps = module.weight[0, 0].numel()
        if isinstance(module, nn.ConvTranspose3d):  # every input voxel scatters to all taps
            total += 2 * inputs[0][0].numel() * module.out_channels * taps
        else:  # every output voxel gathers all taps of all input channels
            total += 2 * output[0].numel() * module.in_channels * taps

    for module in net.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            module.register_forward_hook(count)
    with torch.no_grad():
        net(x)
    return total


@pytest.mark.parametrize("widths,cube_size", [((5, 7, 9), 16), ((4, 8, 16), 24)])
def test_flops_match_a_hook_count(widths: tuple[int, int, int], cube_size: int) -> None:
    net = UNet3D(widths)
    x = torch.zeros(1, 1, cube_size, cube_size, cube_size)
    assert flops_per_cube(widths, cube_size) == _hook_flops(net, x)


def test_paper_flops_match_a_hook_count_on_the_meta_device() -> None:
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        net = UNet3D(PAPER_WIDTHS)
        x = torch.empty(1, 1, 64, 64, 64)
    assert flops_per_cube(PAPER_WIDTHS, 64) == _hook_flops(net, x)


def test_group_count_divides_every_width() -> None:
    for width in range(1, 300):
        groups = group_count(width)
        assert 1 <= groups <= 8 and width % groups == 0
    assert [group_count(w) for w in (5, 7, 9, 32, 64, 128)] == [5, 7, 3, 8, 8, 8]


@pytest.mark.parametrize("text", ["32,64,128", (32, 64, 128), [32, 64, 128], "(32, 64, 128)"])
def test_parse_widths_accepts_cli_forms(text: object) -> None:
    assert parse_widths(text) == (32, 64, 128)


@pytest.mark.parametrize("bad", ["32,64", "32,64,x", (32, 0, 128), 32, "32,64,128,256"])
def test_parse_widths_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="widths"):
        parse_widths(bad)


@pytest.mark.parametrize("cube_size", [0, 4, 12, 60])
def test_cube_size_must_be_a_multiple_of_8(cube_size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        check_cube_size(cube_size)


def test_without_normalisation_a_voxel_does_not_depend_on_the_cube_cut() -> None:
    # no GroupNorm: shifting the cube by a multiple of 8 shifts the output wherever the
    # receptive field (about 55 voxels each way) stays inside both cubes
    torch.manual_seed(0)
    volume = torch.randn(1, 1, 144, 144, 144)
    centre = (slice(None), slice(None), slice(68, 76), slice(68, 76), slice(68, 76))
    shifted = (slice(None), slice(None), slice(60, 68), slice(60, 68), slice(60, 68))
    outputs = {}
    for norm in ("none", "group"):
        net = UNet3D((2, 2, 2), norm=norm).eval()
        with torch.no_grad():
            first = net(volume[..., :136, :136, :136])[centre]
            second = net(volume[..., 8:, 8:, 8:])[shifted]
        outputs[norm] = (first, second)
    torch.testing.assert_close(*outputs["none"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(*outputs["group"], rtol=1e-4, atol=1e-5)  # depends on the cut


def test_unknown_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="norm"):
        UNet3D((4, 8, 8), norm="batch")
