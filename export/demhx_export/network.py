"""The paper's 3D U-net (DeepEMhancer, Sanchez-Garcia et al. 2021), with configurable widths.

Layout, for widths ``(w0, w1, w2)`` (the paper: ``(32, 64, 128)``) and a cube of edge ``n``
(divisible by 8); every "layer" below is ``Conv3d 3³ (padding 1) -> GroupNorm -> PReLU``
(one PReLU slope per channel), every "block" is three layers::

    input (1, n³)
    encoder 0   block 1 -> w0                       at n³       -> skip 0 (w0)
    down 0      Conv3d 3³ stride 2, w0 -> w0, GN, PReLU        -> (n/2)³
    encoder 1   block w0 -> w1                      at (n/2)³   -> skip 1 (w1)
    down 1      Conv3d 3³ stride 2, w1 -> w1, GN, PReLU        -> (n/4)³
    encoder 2   block w1 -> w2                      at (n/4)³   -> skip 2 (w2)
    down 2      Conv3d 3³ stride 2, w2 -> w2, GN, PReLU        -> (n/8)³
    up 2        ConvTranspose3d 2³ stride 2, w2 -> w2, GN, PReLU -> (n/4)³
    decoder 2   block concat(up, skip 2) 2·w2 -> w2 at (n/4)³
    up 1        ConvTranspose3d 2³ stride 2, w2 -> w1, GN, PReLU -> (n/2)³
    decoder 1   block concat(up, skip 1) 2·w1 -> w1 at (n/2)³
    up 0        ConvTranspose3d 2³ stride 2, w1 -> w0, GN, PReLU -> n³
    decoder 0   block concat(up, skip 0) 2·w0 -> w0 at n³
    head        Conv3d 1³, w0 -> 1 (linear output)
    error head  (optional) Conv3d 3³ w0 -> w0, PReLU, Conv3d 1³ w0 -> 1 (linear), on the
                same features: the expected |error| of the head's output (channel 1)

So there are three down-sampling blocks (encoder + strided convolution) and three
up-sampling blocks (transposed convolution + decoder), joined by skip connections, and no
extra bottleneck block at ``(n/8)³``. With the paper's widths this gives
:data:`PAPER_PARAMETERS` = 4,561,793 parameters and :data:`PAPER_GFLOP_PER_CUBE` ≈ 163.0
GFLOP per 64³ cube, the figures quoted for the original network.

FLOP convention (:func:`flops_per_cube`): 2 × the multiply-adds of the convolution and
transposed-convolution weights for one cube; biases, GroupNorm, PReLU and concatenation
are not counted (together well under 1 %).

GroupNorm uses the largest group count ≤ 8 that divides the width (8 for the paper's
widths; 5, 7 and 3 for widths 5, 7 and 9), so any positive width works.

``norm="none"`` leaves GroupNorm out (every layer is then convolution -> PReLU). GroupNorm
normalises each cube by its own statistics, so a voxel's prediction depends on what else
the cube holds (where the cube cuts the map); without it the network is a plain stack of
convolutions whose output at a voxel depends only on its receptive field, except within
the zero-padded border of the cube.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

PAPER_WIDTHS = (32, 64, 128)
PAPER_CUBE_SIZE = 64  # voxels
PAPER_PARAMETERS = 4_561_793  # exact count of UNet3D(PAPER_WIDTHS)
PAPER_GFLOP_PER_CUBE = 163.0  # 2 × multiply-adds per 64³ cube, rounded
MAX_GROUPS = 8
LAYERS_PER_BLOCK = 3
LEVELS = 3
KERNEL = 3  # edge of the block and down-sampling convolutions
UP_KERNEL = 2  # edge (and stride) of the transposed convolutions
CUBE_MULTIPLE = 2 ** LEVELS  # cube edges must be divisible by this
NORMS = ("group", "none")  # normalisation after each convolution
CHANNELS = ("map", "error")  # outputs of a network with an error head


def parse_widths(widths: object) -> tuple[int, int, int]:
    """Turn ``"32,64,128"``, ``(32, 64, 128)`` or ``[32, 64, 128]`` into three positive ints.

    Raises
    ------
    ValueError
        when there are not exactly three positive integer widths.
    """
    if isinstance(widths, str):
        parts: Iterable[object] = [w for w in widths.replace(" ", "").strip("()[]").split(",")
                                   if w]
    elif isinstance(widths, Iterable):
        parts = list(widths)
    else:
        parts = [widths]
    try:
        values = tuple(int(str(w)) for w in parts)
    except ValueError:
        raise ValueError(f"widths {widths!r}: not integers; pass three widths such as "
                         "32,64,128") from None
    if len(values) != LEVELS or min(values) < 1:
        raise ValueError(f"widths {widths!r}: need {LEVELS} positive integers such as "
                         "32,64,128")
    return values  # type: ignore[return-value]


def group_count(width: int) -> int:
    """GroupNorm groups for a width: the largest divisor of ``width`` that is ≤ 8."""
    return max(g for g in range(1, min(MAX_GROUPS, width) + 1) if width % g == 0)


def check_cube_size(cube_size: int) -> int:
    """Return ``cube_size`` if the network can run on it (positive, divisible by 8)."""
    if cube_size < CUBE_MULTIPLE or cube_size % CUBE_MULTIPLE:
        raise ValueError(f"cube size {cube_size}: must be a positive multiple of "
                         f"{CUBE_MULTIPLE} voxels (the network halves it {LEVELS} times)")
    return cube_size


class _Layer(nn.Sequential):
    """Convolution (3³ unless given) -> GroupNorm -> PReLU (one slope per channel)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 transposed: bool = False, norm: str = "group") -> None:
        if transposed:
            conv: nn.Module = nn.ConvTranspose3d(in_channels, out_channels, UP_KERNEL,
                                                 stride=UP_KERNEL)
        else:
            conv = nn.Conv3d(in_channels, out_channels, KERNEL, stride=stride,
                             padding=KERNEL // 2)
        normalisation: nn.Module = (nn.GroupNorm(group_count(out_channels), out_channels)
                                    if norm == "group" else nn.Identity())
        super().__init__(conv, normalisation, nn.PReLU(out_channels))


class _Block(nn.Sequential):
    """Three layers: ``in_channels -> width -> width -> width`` at one resolution."""

    def __init__(self, in_channels: int, width: int, norm: str = "group") -> None:
        super().__init__(*(_Layer(in_channels if i == 0 else width, width, norm=norm)
                           for i in range(LAYERS_PER_BLOCK)))


class UNet3D(nn.Module):
    """The paper's 3D U-net; input ``(batch, 1, n, n, n)`` float32, ``n % 8 == 0``.

    The output is ``(batch, 1, n, n, n)``, or with ``error_head`` ``(batch, 2, n, n, n)``:
    channel 0 the enhanced map, channel 1 the network's estimate of channel 0's absolute
    error at each voxel (same units; trained against the realised error, see
    :mod:`demhx_export.train`).

    Parameters
    ----------
    widths : channel widths of the three levels; ``(32, 64, 128)`` in the paper.
    norm : ``"group"`` (GroupNorm after each convolution, the paper's) or ``"none"``.
    error_head : add the error-estimate channel.
    """

    def __init__(self, widths: Sequence[int] | str = PAPER_WIDTHS, norm: str = "group",
                 error_head: bool = False) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r} is not one of {', '.join(NORMS)}")
        self.widths = parse_widths(widths)
        self.norm = norm
        self.error_head = bool(error_head)
        inputs = (1, *self.widths[:-1])
        self.encoders = nn.ModuleList(_Block(c, w, norm)
                                      for c, w in zip(inputs, self.widths, strict=True))
        self.downs = nn.ModuleList(_Layer(w, w, stride=2, norm=norm) for w in self.widths)
        ups_in = (*self.widths[1:], self.widths[-1])
        self.ups = nn.ModuleList(_Layer(c, w, transposed=True, norm=norm)
                                 for c, w in zip(ups_in, self.widths, strict=True))
        self.decoders = nn.ModuleList(_Block(2 * w, w, norm) for w in self.widths)
        self.head = nn.Conv3d(self.widths[0], 1, 1)
        self.error = (nn.Sequential(nn.Conv3d(self.widths[0], self.widths[0], KERNEL,
                                              padding=KERNEL // 2),
                                    nn.PReLU(self.widths[0]), nn.Conv3d(self.widths[0], 1, 1))
                      if self.error_head else None)
        if norm == "none":
            self._init_unnormalised()

    def _init_unnormalised(self) -> None:
        """He initialisation for PReLU (slope 0.25) so activations keep their scale without
        normalisation layers; zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=0.25, nonlinearity="leaky_relu",
                                        mode="fan_in" if isinstance(module, nn.Conv3d)
                                        else "fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def outputs(self) -> int:
        """Output channels: 1 (the map) or 2 (the map and its error estimate)."""
        return 2 if self.error_head else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, 1, n, n, n)`` to ``(batch, outputs, n, n, n)``."""
        x = self.features(x)
        if self.error is None:
            return self.head(x)
        return torch.cat((self.head(x), self.error(x)), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder's ``(batch, widths[0], n, n, n)`` features, before the heads."""
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        for level in reversed(range(LEVELS)):
            x = self.ups[level](x)
            x = self.decoders[level](torch.cat((x, skips[level]), dim=1))
        return x


class OneChannel(nn.Module):
    """One output of a :class:`UNet3D` as a network of its own, ``(batch, 1, n, n, n)``:
    ``"map"`` (the head) or ``"error"`` (the error head); only that head is computed."""

    def __init__(self, net: UNet3D, channel: str) -> None:
        super().__init__()
        if channel not in CHANNELS:
            raise ValueError(f"channel {channel!r} is not one of {', '.join(CHANNELS)}")
        if channel == "error" and net.error is None:
            raise ValueError("the network has no error head; export its map")
        self.net, self.channel = net, channel
        self.widths = net.widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net.features(x)
        head = self.net.head if self.channel == "map" else self.net.error
        assert head is not None  # checked in __init__
        return head(features)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters of a network (of a :class:`OneChannel`, those its
    output uses: the other head is left out, as in its exported graph)."""
    unused: set[int] = set()
    if isinstance(net, OneChannel):
        other = net.net.error if net.channel == "map" else net.net.head
        unused = {id(p) for p in other.parameters()} if other is not None else set()
    return sum(p.numel() for p in net.parameters() if p.requires_grad and id(p) not in unused)


def flops_per_cube(widths: Sequence[int] | str = PAPER_WIDTHS,
                   cube_size: int = PAPER_CUBE_SIZE) -> int:
    """FLOP (2 × multiply-adds of all convolution weights) for one cube, from layer shapes.

    Parameters
    ----------
    widths : the network's three widths.
    cube_size : cube edge in voxels (multiple of 8).
    """
    w = parse_widths(widths)
    check_cube_size(cube_size)
    taps, up_taps = KERNEL ** 3, UP_KERNEL ** 3
    voxels = [(cube_size >> level) ** 3 for level in range(LEVELS + 1)]
    macs = 0
    for level, (c_in, width) in enumerate(zip((1, *w[:-1]), w, strict=True)):
        block = taps * (c_in * width + (LAYERS_PER_BLOCK - 1) * width * width)
        decoder = taps * (2 * width * width + (LAYERS_PER_BLOCK - 1) * width * width)
        down = taps * width * width  # evaluated at the coarser grid
        up_in = w[level + 1] if level + 1 < LEVELS else width
        up = up_taps * up_in * width  # per coarse input voxel
        macs += (block + decoder) * voxels[level] + (down + up) * voxels[level + 1]
    macs += w[0] * voxels[0]  # 1×1×1 head
    return 2 * macs


def summary(widths: Sequence[int] | str = PAPER_WIDTHS, cube_size: int = PAPER_CUBE_SIZE
            ) -> dict[str, float]:
    """Parameters and GFLOP per cube of a configuration (no network weights are drawn)."""
    w = parse_widths(widths)
    with torch.device("meta"):
        net = UNet3D(w)
    return {"parameters": count_parameters(net),
            "gflop_per_cube": flops_per_cube(w, cube_size) / 1e9}


__all__ = ["CHANNELS", "PAPER_CUBE_SIZE", "PAPER_GFLOP_PER_CUBE", "PAPER_PARAMETERS",
           "PAPER_WIDTHS", "OneChannel", "UNet3D", "check_cube_size", "count_parameters",
           "flops_per_cube", "group_count", "parse_widths", "summary"]
