"""Multi-scale patch discriminators and a spectral-norm helper (their hinge losses live in
:mod:`semiseg.gan_losses`).

References
----------
.. [1] E. Vorontsov, P. Molchanov, C. Beckham, J. Kautz, S. Kadoury, "Towards
   annotation-efficient segmentation via image-to-image translation", IEEE TMI 2022
   (arXiv:1904.01636), Table I and Section IV-B.
.. [2] T.-C. Wang et al., "High-resolution image synthesis and semantic manipulation with
   conditional GANs", CVPR 2018 (multi-scale discriminators).
.. [3] T. Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
.. [4] H. Zhang et al., "Self-attention generative adversarial networks", ICML 2019 (hinge loss).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from ..gan_losses import hinge_d_loss, hinge_g_loss

__all__ = [
    "MultiScaleDiscriminator",
    "PatchDiscriminator",
    "apply_spectral_norm",
    "has_spectral_norm",
    "hinge_d_loss",
    "hinge_g_loss",
]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Parametrise the weight of every convolution and linear layer of ``module`` with
    spectral normalisation (in place) and return ``module``."""
    for m in module.modules():
        if isinstance(m, _WEIGHTED) and not parametrize.is_parametrized(m, "weight"):
            spectral_norm(m)
    return module


def has_spectral_norm(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` is spectrally normalised."""
    if not parametrize.is_parametrized(layer, "weight"):
        return False
    return any(type(p).__name__ == "_SpectralNorm" for p in layer.parametrizations["weight"])


def _kaiming(module: nn.Module, slope: float) -> None:
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            nn.init.kaiming_normal_(m.weight, a=slope, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """Fully convolutional discriminator returning a map of scores (Table I of [1]).

    ``C f0 4x4/1 -> [N LReLU(0.2) C f 4x4/2] for f in features[1:] -> LReLU C 1 1x1``.

    Parameters
    ----------
    in_channels : int
    features : sequence of int
        Channels of the first convolution and of each stride-2 block.
    norm : {"none", "instance", "layer"}
        Normalisation inside the blocks; "none" by default (spectral norm conditions every
        layer already).
    """

    def __init__(self, in_channels: int, *, features: Sequence[int] = (16, 32, 64, 128), norm: str = "none"):
        super().__init__()
        features = [int(f) for f in features]
        if not features:
            raise ValueError("features needs at least one entry")
        layers: list[nn.Module] = [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(in_channels, features[0], 4)]
        for c_in, c_out in itertools.pairwise(features):
            layers += [
                _norm(norm, c_in),
                nn.LeakyReLU(0.2),
                nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
            ]
        layers += [nn.LeakyReLU(0.2), nn.Conv2d(features[-1], 1, 1)]
        self.net = nn.Sequential(*layers)
        _kaiming(self, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 1, h, w)`` scores."""
        return self.net(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown discriminator norm {kind!r} (none, instance, layer)")


class MultiScaleDiscriminator(nn.Module):
    """One :class:`PatchDiscriminator` per scale, the input halved between scales [2].

    Spectral normalisation is applied to every layer.

    Parameters
    ----------
    in_channels : int
    features : sequence of int
    scales : int
        Number of scales (3 in [1]).
    norm : str
        See :class:`PatchDiscriminator`.
    """

    def __init__(self, in_channels: int, *, features: Sequence[int] = (16, 32, 64, 128), scales: int = 3, norm: str = "none"):
        super().__init__()
        if scales < 1:
            raise ValueError("scales must be at least 1")
        self.nets = nn.ModuleList(
            PatchDiscriminator(in_channels, features=features, norm=norm) for _ in range(scales)
        )
        apply_spectral_norm(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Score maps, one per scale, finest first."""
        out = []
        for i, net in enumerate(self.nets):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(net(x))
        return out
