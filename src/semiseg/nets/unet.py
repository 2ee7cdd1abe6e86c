"""A compact 2D U-Net whose encoder and decoder can be used separately."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ConvBlock", "UNet", "make_norm"]


def make_norm(kind: str, channels: int) -> nn.Module:
    """Return a 2D normalisation layer by name: ``instance``, ``batch``, ``group``, ``layer``, ``none``."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by normalisation and LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str = "instance", dropout: float = 0.0):
        layers: list[nn.Module] = []
        for i in range(2):
            layers += [
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=norm == "none"),
                make_norm(norm, out_channels),
                nn.LeakyReLU(0.1, inplace=True),
            ]
            if dropout and i == 0:
                layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class UNet(nn.Module):
    """2D U-Net returning class logits.

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels (classes, background included).
    features : sequence of int
        Channels per level; ``len(features) - 1`` poolings, so inputs must be multiples of
        ``2 ** (len(features) - 1)`` (see :attr:`size_multiple`).
    norm : str
        Normalisation layer, see :func:`make_norm`.
    dropout : float
        Dropout after the first convolution of each decoder block.

    Examples
    --------
    >>> net = UNet(1, 2, features=(8, 16, 32))
    >>> net(torch.zeros(2, 1, 36, 40)).shape
    torch.Size([2, 2, 36, 40])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        features: Sequence[int] = (16, 32, 64, 128),
        norm: str = "instance",
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(features) < 2:
            raise ValueError("features needs at least two levels")
        self.features = tuple(int(f) for f in features)
        self.size_multiple = 2 ** (len(self.features) - 1)
        self.down = nn.ModuleList()
        c = in_channels
        for f in self.features:
            self.down.append(ConvBlock(c, f, norm=norm))
            c = f
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for f_skip in reversed(self.features[:-1]):
            self.upconv.append(nn.ConvTranspose2d(c, f_skip, 2, stride=2))
            self.up.append(ConvBlock(2 * f_skip, f_skip, norm=norm, dropout=dropout))
            c = f_skip
        self.head = nn.Conv2d(c, out_channels, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps of every level, finest first; the last is the bottleneck."""
        feats = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor], *, return_features: bool = False):
        """Decode encoder features to logits (and the last decoder features if asked)."""
        x = feats[-1]
        for upconv, block, skip in zip(self.upconv, self.up, reversed(feats[:-1])):
            x = block(torch.cat([upconv(x), skip], dim=1))
        logits = self.head(x)
        return (logits, x) if return_features else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` images to ``(B, out_channels, H, W)`` logits."""
        return self.decode(self.encode(x))
