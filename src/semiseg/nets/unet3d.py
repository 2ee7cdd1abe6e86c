"""A compact 3D U-Net with a pooling kernel per level (anisotropy-aware, after nnU-Net)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ConvBlock3d", "UNet3D", "make_norm3d", "plan_pooling"]


def make_norm3d(kind: str, channels: int) -> nn.Module:
    """Return a 3D normalisation layer by name: ``instance``, ``batch``, ``group``, ``none``."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def plan_pooling(
    depth: int, spacing: Sequence[float] = (1.0, 1.0, 1.0), levels: int = 4
) -> list[tuple[int, int, int]]:
    """Pooling kernels between the levels of a 3D U-Net, nnU-Net's anisotropy rule.

    Every level halves the plane; it also halves the depth unless the patch is too thin to
    halve (fewer than 4 slices left) or the voxels are coarse along Z (z spacing at least twice
    the in-plane spacing after the poolings so far), where it pools ``(1, 2, 2)`` in-plane only
    until the spacing is roughly isotropic.

    Parameters
    ----------
    depth : int
        Patch depth (slices).
    spacing : (z, y, x) sequence of float
        Voxel spacing in the patch's axis order.
    levels : int
        Levels of the network (``levels - 1`` poolings).

    Returns
    -------
    list of (kz, ky, kx)
        ``levels - 1`` kernels, each ``(2, 2, 2)`` or ``(1, 2, 2)``.

    Raises
    ------
    ValueError
        For a depth below 1, a spacing that is not 3 positive numbers or fewer than 2 levels.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    sz, sy, sx = (float(s) for s in spacing)
    if min(sz, sy, sx) <= 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    if levels < 2:
        raise ValueError("a U-Net needs at least two levels")
    pools = []
    d = int(depth)
    for _ in range(levels - 1):
        thin = d < 4
        coarse = sz >= 2 * min(sy, sx)
        kz = 1 if thin or coarse else 2
        pools.append((kz, 2, 2))
        sz, sy, sx, d = sz * kz, sy * 2, sx * 2, math.ceil(d / kz)
    return pools


class ConvBlock3d(nn.Sequential):
    """Two convolutions (3x3x3, or 1x3x3 in-plane), each followed by normalisation and LeakyReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, *, norm: str = "instance", kernel: Sequence[int] = (3, 3, 3)
    ):
        kernel = tuple(int(k) for k in kernel)
        padding = tuple(k // 2 for k in kernel)
        layers: list[nn.Module] = []
        for i in range(2):
            layers += [
                nn.Conv3d(
                    in_channels if i == 0 else out_channels, out_channels, kernel, padding=padding,
                    bias=norm == "none",
                ),
                make_norm3d(norm, out_channels),
                nn.LeakyReLU(0.1, inplace=True),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D U-Net returning class logits, with its own pooling kernel at each level.

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels (classes, background included).
    features : sequence of int
        Channels per level.
    pools : sequence of (kz, ky, kx), optional
        ``len(features) - 1`` pooling kernels (see :func:`plan_pooling`); default ``(2, 2, 2)``
        everywhere.
    norm : str
        Normalisation layer, see :func:`make_norm3d`.
    inplane_levels : int
        The first ``inplane_levels`` levels (and their decoder blocks) convolve with 1x3x3
        in-plane kernels, as nnU-Net does at the full-resolution levels of anisotropic data:
        the costliest level gets 3x cheaper and the depth context comes from the coarser levels.
    channels_last : bool
        Keep weights and activations in ``torch.channels_last_3d`` layout: on the CPU (oneDNN)
        a training step of the default network on two ``16 x 96 x 96`` patches takes about 0.7 s
        instead of 1.0 s (one thread, ``docs/benchmarks.md``); the numbers are the same.

    Notes
    -----
    Inputs of any size are accepted: they are padded (edge replication) to a multiple of
    :attr:`size_multiples` and the logits cropped back.

    Examples
    --------
    >>> net = UNet3D(1, 2, features=(4, 8, 16), pools=[(1, 2, 2), (2, 2, 2)])
    >>> net(torch.zeros(1, 1, 5, 30, 31)).shape
    torch.Size([1, 2, 5, 30, 31])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        features: Sequence[int] = (8, 16, 32, 64),
        pools: Sequence[Sequence[int]] | None = None,
        norm: str = "instance",
        inplane_levels: int = 0,
        channels_last: bool = True,
    ):
        super().__init__()
        if len(features) < 2:
            raise ValueError("features needs at least two levels")
        self.features = tuple(int(f) for f in features)
        pools = [(2, 2, 2)] * (len(features) - 1) if pools is None else [tuple(int(k) for k in p) for p in pools]
        if len(pools) != len(features) - 1 or any(len(p) != 3 or min(p) < 1 for p in pools):
            raise ValueError(f"pools needs {len(features) - 1} kernels (kz, ky, kx) >= 1, got {pools}")
        self.pools = pools
        if not 0 <= int(inplane_levels) <= len(features):
            raise ValueError(f"inplane_levels must be in 0..{len(features)}, got {inplane_levels}")
        self.inplane_levels = int(inplane_levels)
        kernels = [(1, 3, 3) if i < self.inplane_levels else (3, 3, 3) for i in range(len(features))]
        self.size_multiples = tuple(math.prod(p[d] for p in pools) for d in range(3))
        self.down = nn.ModuleList()
        c = in_channels
        for f, kernel in zip(self.features, kernels):
            self.down.append(ConvBlock3d(c, f, norm=norm, kernel=kernel))
            c = f
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for f_skip, pool, kernel in zip(reversed(self.features[:-1]), reversed(pools), reversed(kernels[:-1])):
            self.upconv.append(nn.ConvTranspose3d(c, f_skip, pool, stride=pool))
            self.up.append(ConvBlock3d(2 * f_skip, f_skip, norm=norm, kernel=kernel))
            c = f_skip
        self.head = nn.Conv3d(c, out_channels, 1)
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, D, H, W)`` images to ``(B, out_channels, D, H, W)`` logits."""
        size = x.shape[-3:]
        pad = [(-s) % m for s, m in zip(size, self.size_multiples)]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        x = x.contiguous(memory_format=self.memory_format)
        feats = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool3d(x, self.pools[i - 1])
            x = block(x)
            feats.append(x)
        x = feats[-1]
        for upconv, block, skip in zip(self.upconv, self.up, reversed(feats[:-1])):
            x = block(torch.cat([upconv(x), skip], dim=1))
        logits = self.head(x)
        return logits[..., : size[0], : size[1], : size[2]].contiguous()
