"""Building blocks of the GAN methods: ResNet generator, pixel-wise and patch discriminators,
and the SinGAN-style residual generator of a pyramid scale.

References
----------
.. [1] J. Johnson, A. Alahi, L. Fei-Fei, "Perceptual losses for real-time style transfer and
   super-resolution", ECCV 2016 (the ResNet generator CycleGAN adopts).
.. [2] W.-C. Hung et al., "Adversarial learning for semi-supervised semantic segmentation",
   BMVC 2018 (pixel-wise discriminator).
.. [3] A. K. Mondal, J. Dolz, C. Desrosiers, "Revisiting CycleGAN for semi-supervised
   segmentation", arXiv:1908.11569, 2019.
.. [4] P. Isola et al., "Image-to-image translation with conditional adversarial networks",
   CVPR 2017 (PatchGAN); T.-C. Wang et al., pix2pixHD, CVPR 2018 (multi-scale discriminator).
.. [5] T. R. Shaham, T. Dekel, T. Michaeli, "SinGAN: learning a generative model from a single
   natural image", ICCV 2019.
.. [6] W. Li et al., "High resolution histopathology image generation and segmentation through
   adversarial training", Medical Image Analysis 2022.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .unet import make_norm

__all__ = [
    "MultiViewPatchDiscriminator",
    "PatchGANDiscriminator",
    "PixelDiscriminator",
    "ResidualBlock",
    "ResnetGenerator",
    "SinGANGenerator",
]


class ResidualBlock(nn.Module):
    """``x + conv-norm-ReLU-conv-norm(x)`` with reflection padding (Johnson et al. [1]_)."""

    def __init__(self, channels: int, *, norm: str = "instance"):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=norm == "none"),
            make_norm(norm, channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=norm == "none"),
            make_norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator: 7x7 stem, stride-2 downsamplings, residual blocks,
    transposed-convolution upsamplings and a 7x7 head.

    With ``features=(64, 128, 256)`` and ``n_blocks=9`` it is the generator of Johnson et al. [1]_
    used by CycleGAN and by Mondal et al. [3]_; smaller values scale it down.

    Parameters
    ----------
    in_channels, out_channels : int
    features : sequence of int
        Channels of the stem followed by those after each stride-2 downsampling; inputs must be
        multiples of ``2 ** (len(features) - 1)``.
    n_blocks : int
        Residual blocks at the lowest resolution.
    norm : str
        Normalisation (instance normalisation in the paper), see :func:`make_norm`.
    out_activation : {None, "tanh", "softmax"}
        Applied to the output; None returns raw values (logits).

    Examples
    --------
    >>> g = ResnetGenerator(1, 3, features=(8, 16), n_blocks=2)
    >>> g(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        features: Sequence[int] = (64, 128, 256),
        n_blocks: int = 9,
        norm: str = "instance",
        out_activation: str | None = None,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        if not features or min(features) < 1:
            raise ValueError("features must be a nonempty sequence of positive ints")
        if n_blocks < 0:
            raise ValueError("n_blocks must be >= 0")
        if out_activation not in (None, "tanh", "softmax"):
            raise ValueError(f"unknown out_activation {out_activation!r}")
        self.features = features
        self.size_multiple = 2 ** (len(features) - 1)
        self.out_activation = out_activation
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, features[0], 7, bias=bias),
            make_norm(norm, features[0]),
            nn.ReLU(inplace=True),
        ]
        for a, b in itertools.pairwise(features):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1, bias=bias), make_norm(norm, b), nn.ReLU(inplace=True)]
        layers += [ResidualBlock(features[-1], norm=norm) for _ in range(n_blocks)]
        for a, b in zip(features[:0:-1], features[-2::-1]):
            layers += [
                nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1, bias=bias),
                make_norm(norm, b),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(features[0], out_channels, 7)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``."""
        y = self.model(x)
        if self.out_activation == "tanh":
            return torch.tanh(y)
        if self.out_activation == "softmax":
            return torch.softmax(y, dim=1)
        return y


class PixelDiscriminator(nn.Module):
    """Pixel-wise discriminator: a real/fake score for every input pixel.

    Three convolutional blocks with LeakyReLU(0.2), batch normalisation after the second (Mondal
    et al. [3]_, Sec. 3.3), a 1x1 classifier and bilinear upsampling back to the input size, as
    in Hung et al. [2]_. Blocks after the first use stride 2, which widens the receptive field;
    the score map is upsampled so its size equals the input's.

    Parameters
    ----------
    in_channels : int
        Image channels, or classes for a mask discriminator.
    features : int
        Channels of the first block (doubled at each next block).
    n_blocks : int
        Convolutional blocks (3 in the paper).
    norm : str
        Normalisation after the second block (``batch`` in the paper).

    Examples
    --------
    >>> d = PixelDiscriminator(3, features=8)
    >>> d(torch.zeros(2, 3, 30, 34)).shape
    torch.Size([2, 1, 30, 34])
    """

    def __init__(self, in_channels: int, *, features: int = 64, n_blocks: int = 3, norm: str = "batch"):
        super().__init__()
        if n_blocks < 1 or features < 1:
            raise ValueError("n_blocks and features must be >= 1")
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(n_blocks):
            out = features * 2**i
            layers.append(nn.Conv2d(c, out, 3, stride=1 if i == 0 else 2, padding=1))
            if i == 1:
                layers.append(make_norm(norm, out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c = out
        layers.append(nn.Conv2d(c, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, 1, H, W)`` raw scores (no sigmoid: least squares)."""
        y = self.model(x)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y


class PatchGANDiscriminator(nn.Module):
    """PatchGAN (Markovian) discriminator that also returns its intermediate features.

    ``n_layers`` stride-2 3x3 convolutions (the first without normalisation), one stride-1
    convolution and a 3x3 scoring convolution, LeakyReLU(0.2) throughout [4]_. 3x3 kernels with
    padding 1 keep any input size valid (a side of ``s`` gives ``ceil(s / 2 ** n_layers)``).

    Parameters
    ----------
    in_channels : int
    features : int
        Channels of the first layer (doubled per layer, capped at ``8 * features``).
    n_layers : int
        Stride-2 layers.
    norm : str
        Normalisation after all but the first layer (``group`` by default: it works for any batch
        size and for 1x1 maps, unlike instance and batch normalisation).
    """

    def __init__(self, in_channels: int, *, features: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if n_layers < 1 or features < 1:
            raise ValueError("n_layers and features must be >= 1")
        blocks: list[nn.Module] = []
        c = in_channels
        for i in range(n_layers + 1):
            out = features * 2 ** min(i, 3)
            layers: list[nn.Module] = [nn.Conv2d(c, out, 3, stride=2 if i < n_layers else 1, padding=1)]
            if i > 0:
                layers.append(make_norm(norm, out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            blocks.append(nn.Sequential(*layers))
            c = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(scores, features)``: the ``(B, 1, h, w)`` patch scores and the activations
        of every block (for feature matching)."""
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return self.head(x), feats


class MultiViewPatchDiscriminator(nn.Module):
    """PatchGAN discriminators on the input and on its 2x, 4x, ... average-pooled versions
    (pix2pixHD's multi-scale discriminator [4]_; Li et al.'s "multi-layer discriminator" [6]_).

    Views whose shorter side would fall below ``min_size`` are skipped (the first view is always
    used), so small coarse pyramid scales get fewer views.

    Parameters
    ----------
    in_channels : int
        Channels of the discriminated input (image channels + mask classes for pairs).
    num_views : int
        Number of resolutions (3 in the paper: factors 1, 2 and 4).
    features, n_layers, norm
        See :class:`PatchGANDiscriminator`.
    min_size : int
        Smallest side a view may have.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_views: int = 3,
        features: int = 64,
        n_layers: int = 3,
        norm: str = "group",
        min_size: int = 16,
    ):
        super().__init__()
        if num_views < 1:
            raise ValueError("num_views must be >= 1")
        self.min_size = int(min_size)
        self.views = nn.ModuleList(
            PatchGANDiscriminator(in_channels, features=features, n_layers=n_layers, norm=norm)
            for _ in range(num_views)
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Return ``(scores, features)``, one entry per view used, finest view first."""
        scores, feats = [], []
        for i, d in enumerate(self.views):
            if i:
                if min(x.shape[-2:]) // 2 < self.min_size:
                    break
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            s, f = d(x)
            scores.append(s)
            feats.append(f)
        return scores, feats


class SinGANGenerator(nn.Module):
    """Residual generator of one pyramid scale, SinGAN-style [5]_, conditioned on a mask [6]_.

    ``x_n = x_up + tanh(Phi(cat(mask, noise + x_up)))`` where ``Phi`` is ``n_blocks`` 3x3
    conv-BN-LeakyReLU(0.2) blocks followed by a 3x3 convolution (Li et al. Eq. 1). At the
    coarsest scale ``x_up`` is zero, so the generator maps (mask, noise) to an image.

    Parameters
    ----------
    image_channels : int
    mask_channels : int
        Classes of the (one-hot or soft) conditioning mask.
    features : int
        Channels of every block (32 in SinGAN).
    n_blocks : int
        Conv-BN-LReLU blocks (4 in SinGAN, plus the output convolution).
    norm : str
    """

    def __init__(
        self,
        image_channels: int,
        mask_channels: int,
        *,
        features: int = 32,
        n_blocks: int = 4,
        norm: str = "batch",
    ):
        super().__init__()
        if n_blocks < 1 or features < 1:
            raise ValueError("n_blocks and features must be >= 1")
        layers: list[nn.Module] = []
        c = image_channels + mask_channels
        for _ in range(n_blocks):
            layers += [
                nn.Conv2d(c, features, 3, padding=1, bias=norm == "none"),
                make_norm(norm, features),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c = features
        layers.append(nn.Conv2d(c, image_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, mask: torch.Tensor, noise: torch.Tensor, upsampled: torch.Tensor | None = None) -> torch.Tensor:
        """Generate ``(B, C, H, W)`` from a ``(B, K, H, W)`` mask, ``(B, C, H, W)`` noise and the
        upsampled coarser image (None at the coarsest scale)."""
        base = torch.zeros_like(noise) if upsampled is None else upsampled
        return base + torch.tanh(self.body(torch.cat([mask, noise + base], dim=1)))
