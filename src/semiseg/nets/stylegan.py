"""A compact StyleGAN2-style image + label generator, its discriminators and a W+ encoder.

The networks of SemanticGAN [1]_, scaled down so they train on a CPU: the generator is
StyleGAN2's [2]_ skip design (mapping network, modulated convolutions with weight demodulation,
noise inputs, per-resolution ``toRGB`` outputs summed over resolutions) with a second ``toSeg``
output at every resolution, so image and label share every style layer.

Simplifications against StyleGAN2: bilinear up/down-sampling instead of FIR blur filters, no
style mixing, no path-length regulariser and no fused CUDA ops.

References
----------
.. [1] D. Li, J. Yang, K. Kreis, A. Torralba, S. Fidler, "Semantic segmentation with generative
   models: semi-supervised learning and strong out-of-domain generalization", CVPR 2021.
.. [2] T. Karras et al., "Analyzing and improving the image quality of StyleGAN", CVPR 2020.
.. [3] T.-C. Wang et al., "High-resolution image synthesis and semantic manipulation with
   conditional GANs" (pix2pixHD multi-scale patch discriminator), CVPR 2018.
.. [4] E. Richardson et al., "Encoding in style: a StyleGAN encoder for image-to-image
   translation" (pSp feature-pyramid encoder), CVPR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

__all__ = [
    "EqualLinear",
    "ImageDiscriminator",
    "ModulatedConv2d",
    "MultiScalePatchDiscriminator",
    "SemanticStyleGenerator",
    "WPlusEncoder",
    "channels_for",
    "num_style_vectors",
]

_SQRT2 = math.sqrt(2.0)


def _check_size(size: int) -> int:
    size = int(size)
    if size < 8 or size & (size - 1):
        raise ValueError(f"size must be a power of two >= 8, got {size}")
    return size


def num_style_vectors(size: int) -> int:
    """Number of W+ vectors of a generator of side ``size`` (``2 log2(size) - 2``)."""
    return 2 * int(math.log2(_check_size(size))) - 2


def channels_for(features: Sequence[int], size: int) -> dict[int, int]:
    """Channels per resolution: ``features[0]`` at ``size``, ``features[i]`` at ``size / 2**i``.

    Resolutions below the last level keep the last width.

    Examples
    --------
    >>> channels_for((8, 16), 32)
    {4: 16, 8: 16, 16: 16, 32: 8}
    """
    if not features:
        raise ValueError("features needs at least one level")
    size = _check_size(size)
    out = {}
    res = 4
    while res <= size:
        i = int(math.log2(size // res))
        out[res] = int(features[min(i, len(features) - 1)])
        res *= 2
    return out


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (weights scaled at run time).

    Parameters
    ----------
    in_features, out_features : int
    bias_init : float
    lr_mul : float
        Learning-rate multiplier (0.01 in the mapping network).
    activation : bool
        Leaky ReLU (slope 0.2) scaled by sqrt(2).
    """

    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * _SQRT2 if self.activation else out


class MappingNetwork(nn.Sequential):
    """``z -> w``: pixel norm then ``layers`` equalised fully-connected layers (lr x 0.01)."""

    def __init__(self, latent_dim: int, layers: int):
        super().__init__(*[EqualLinear(latent_dim, latent_dim, lr_mul=0.01, activation=True) for _ in range(layers)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
        return super().forward(z)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: per-sample weights scaled by a style, then demodulated.

    Parameters
    ----------
    in_channels, out_channels, kernel_size : int
    style_dim : int
    demodulate : bool
        Normalise each output filter to unit norm (off for the 1x1 output layers).
    upsample : bool
        Double the resolution (bilinear) before the convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int, *, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.affine = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        s = self.affine(w)  # (B, in)
        weight = self.scale * self.weight[None] * s[:, None, :, None, None]  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum((2, 3, 4), keepdim=True) + 1e-8)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, wd = x.shape[-2:]
        out = F.conv2d(
            x.reshape(1, b * c, h, wd),
            weight.reshape(-1, *weight.shape[2:]).to(x.dtype),
            padding=self.padding,
            groups=b,
        )
        return out.reshape(b, -1, *out.shape[-2:])


class StyledConv(nn.Module):
    """Modulated 3x3 convolution + scaled noise input + bias + leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, *, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, w)
        if noise is not None:
            out = out + self.noise_strength * noise
        return F.leaky_relu(out + self.bias, 0.2) * _SQRT2


class ToOutput(nn.Module):
    """1x1 modulated convolution (no demodulation) added to the upsampled previous output."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return out


class SemanticStyleGenerator(nn.Module):
    """StyleGAN2 skip generator with an image branch and a label branch at every style layer.

    Parameters
    ----------
    out_channels : int
        Image channels.
    num_classes : int
        Label channels (classes including background); the label branch returns logits.
    size : int
        Output side, a power of two >= 8.
    latent_dim : int
        Dimension of ``z`` and ``w``.
    features : sequence of int
        Channels from the output resolution downwards (see :func:`channels_for`).
    mapping_layers : int
        Fully-connected layers of the mapping network.

    Attributes
    ----------
    num_ws : int
        Style vectors in W+ (``2 log2(size) - 2``).
    img_branch, seg_branch : nn.ModuleList
        The ``toRGB``-style image outputs and the ``toSeg`` label outputs; everything else
        (``const``, ``convs``, ``mapping``) is shared.
    w_avg : (latent_dim,) buffer
        Running mean of mapped latents (the encoder's and the sampler's origin).

    Examples
    --------
    >>> g = SemanticStyleGenerator(1, 2, size=16, latent_dim=8, features=(4, 8))
    >>> img, seg = g(torch.randn(3, 8))
    >>> tuple(img.shape), tuple(seg.shape)
    ((3, 1, 16, 16), (3, 2, 16, 16))
    """

    def __init__(
        self,
        out_channels: int,
        num_classes: int,
        *,
        size: int = 64,
        latent_dim: int = 64,
        features: Sequence[int] = (16, 32, 64, 128),
        mapping_layers: int = 4,
    ):
        super().__init__()
        self.size = _check_size(size)
        self.latent_dim = int(latent_dim)
        self.num_ws = num_style_vectors(size)
        ch = channels_for(features, size)
        self.mapping = MappingNetwork(latent_dim, mapping_layers)
        self.const = nn.Parameter(torch.randn(1, ch[4], 4, 4))
        self.convs = nn.ModuleList([StyledConv(ch[4], ch[4], latent_dim)])
        self.img_branch = nn.ModuleList([ToOutput(ch[4], out_channels, latent_dim)])
        self.seg_branch = nn.ModuleList([ToOutput(ch[4], num_classes, latent_dim)])
        self.resolutions = [4]
        res, c = 8, ch[4]
        while res <= size:
            self.convs.append(StyledConv(c, ch[res], latent_dim, upsample=True))
            self.convs.append(StyledConv(ch[res], ch[res], latent_dim))
            self.img_branch.append(ToOutput(ch[res], out_channels, latent_dim))
            self.seg_branch.append(ToOutput(ch[res], num_classes, latent_dim))
            self.resolutions.append(res)
            c = ch[res]
            res *= 2
        self.register_buffer("w_avg", torch.zeros(latent_dim))

    def make_noise(self, batch: int, *, generator: torch.Generator | None = None, device=None) -> list[torch.Tensor]:
        """One ``(B, 1, r, r)`` standard-normal noise map per styled convolution."""
        device = device or self.const.device
        out = [torch.randn(batch, 1, 4, 4, generator=generator)]
        for r in self.resolutions[1:]:
            out += [torch.randn(batch, 1, r, r, generator=generator) for _ in range(2)]
        return [n.to(device) for n in out]

    def channels_at(self, res: int) -> int:
        """Channels of the activations at resolution ``res`` (one of :attr:`resolutions`)."""
        if res not in self.resolutions:
            raise ValueError(f"resolution {res} is not one of {self.resolutions}")
        return int(self.convs[2 * self.resolutions.index(res)].conv.weight.shape[0])

    def synthesis(
        self,
        ws: torch.Tensor,
        noise: str | list[torch.Tensor] = "random",
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Render from W+, optionally from given activations at one resolution.

        Parameters
        ----------
        ws : (B, num_ws, latent_dim) or (B, latent_dim) Tensor
            Style vectors (one ``w`` is broadcast to every layer).
        noise : ``"random"``, ``"zero"`` or list of Tensor
            Noise inputs: fresh draws, none, or given maps (see :meth:`make_noise`).
        features : (B, channels_at(r), r, r) Tensor, optional
            Activations that replace the generator's own at resolution ``r`` (after its two
            styled convolutions there), as an encoder's spatial code does (Feature-Style
            Encoder, Yao et al., ECCV 2022); the layers above ``r`` render from them.

        Returns
        -------
        image : (B, out_channels, size, size) Tensor
        seg_logits : (B, num_classes, size, size) Tensor
        """
        if ws.dim() == 2:
            ws = ws[:, None].expand(-1, self.num_ws, -1)
        if ws.shape[1] != self.num_ws:
            raise ValueError(f"expected {self.num_ws} style vectors, got {ws.shape[1]}")
        b = ws.shape[0]
        at = None
        if features is not None:
            at = int(features.shape[-1])
            if features.shape != (b, self.channels_at(at), at, at):
                raise ValueError(
                    f"features must be (B, {self.channels_at(at)}, {at}, {at}) at resolution {at}, "
                    f"got {tuple(features.shape)}"
                )
        if noise == "random":
            noise = self.make_noise(b, device=ws.device)
        elif noise == "zero":
            noise = [None] * len(self.convs)
        x = self.const.expand(b, -1, -1, -1)
        x = self.convs[0](x, ws[:, 0], noise[0])
        if at == 4:
            x = features.to(x.dtype)
        img = self.img_branch[0](x, ws[:, 1], None)
        seg = self.seg_branch[0](x, ws[:, 1], None)
        i = 1
        for k in range(1, len(self.resolutions)):
            x = self.convs[2 * k - 1](x, ws[:, i], noise[2 * k - 1])
            x = self.convs[2 * k](x, ws[:, i + 1], noise[2 * k])
            if at == self.resolutions[k]:
                x = features.to(x.dtype)
            img = self.img_branch[k](x, ws[:, i + 2], img)
            seg = self.seg_branch[k](x, ws[:, i + 2], seg)
            i += 2
        return img, seg

    def forward(self, z: torch.Tensor, noise: str | list[torch.Tensor] = "random"):
        """``z -> (image, seg_logits)`` through the mapping network (same ``w`` in every layer)."""
        return self.synthesis(self.mapping(z), noise)


def _minibatch_stddev(x: torch.Tensor) -> torch.Tensor:
    std = torch.sqrt(x.float().var(0, unbiased=False) + 1e-8).mean()
    return torch.cat([x, std.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])], 1)


class _ResBlockDown(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        y = F.leaky_relu(self.conv1(x), 0.2)
        y = F.avg_pool2d(F.leaky_relu(self.conv2(y), 0.2), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) / _SQRT2


class ImageDiscriminator(nn.Module):
    """StyleGAN2-style residual image discriminator ``D_r``: image -> one logit.

    Parameters
    ----------
    in_channels : int
    size : int
        Input side (power of two).
    features : sequence of int
        Channels per resolution, as for the generator.
    """

    def __init__(self, in_channels: int, *, size: int = 64, features: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.size = _check_size(size)
        ch = channels_for(features, size)
        self.from_img = nn.Conv2d(in_channels, ch[size], 1)
        blocks, res = [], size
        while res > 4:
            blocks.append(_ResBlockDown(ch[res], ch[res // 2]))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        self.final_conv = nn.Conv2d(ch[4] + 1, ch[4], 3, padding=1)
        self.fc = nn.Linear(ch[4] * 16, ch[4])
        self.out = nn.Linear(ch[4], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, size, size) -> (B, 1)`` logits."""
        x = self.blocks(F.leaky_relu(self.from_img(x), 0.2))
        x = F.leaky_relu(self.final_conv(_minibatch_stddev(x)), 0.2)
        return self.out(F.leaky_relu(self.fc(x.flatten(1)), 0.2))


class PatchDiscriminator(nn.Sequential):
    """pix2pixHD ``NLayerDiscriminator``: strided 4x4 convolutions with spectral norm."""

    def __init__(self, in_channels: int, features: int, layers: int = 2):
        mods: list[nn.Module] = [nn.Conv2d(in_channels, features, 4, 2, 2), nn.LeakyReLU(0.2)]
        f = features
        for _ in range(1, layers):
            mods += [spectral_norm(nn.Conv2d(f, 2 * f, 4, 2, 2)), nn.LeakyReLU(0.2)]
            f *= 2
        mods += [spectral_norm(nn.Conv2d(f, 2 * f, 4, 1, 2)), nn.LeakyReLU(0.2), nn.Conv2d(2 * f, 1, 4, 1, 2)]
        super().__init__(*mods)


class MultiScalePatchDiscriminator(nn.Module):
    """Image-label discriminator ``D_m``: patch discriminators at ``scales`` resolutions.

    Parameters
    ----------
    in_channels : int
        Image channels + label channels (the pair is concatenated).
    features : int
        Width of the first layer.
    scales : int
        Number of discriminators; scale ``i`` sees the input average-pooled ``i`` times.
    layers : int
        Strided layers per discriminator.
    """

    def __init__(self, in_channels: int, *, features: int = 16, scales: int = 2, layers: int = 2):
        super().__init__()
        if scales < 1:
            raise ValueError("scales must be >= 1")
        self.discs = nn.ModuleList([PatchDiscriminator(in_channels, features, layers) for _ in range(scales)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return one ``(B, 1, h_i, w_i)`` patch-logit map per scale, finest first."""
        out = []
        for i, d in enumerate(self.discs):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out


class WPlusEncoder(nn.Module):
    """Feature-pyramid encoder ``E: image -> W+`` (a small pSp-style encoder).

    A strided convolution pyramid down to 4x4, a top-down feature pyramid over the three
    coarsest levels, and one head per level (strided convolutions to 4x4, then a linear map) that
    predicts its share of the style vectors: coarse layers from the 4x4 level, fine ones from the
    finest of the three. The output is an offset added to the generator's ``w_avg``.

    Parameters
    ----------
    in_channels : int
    size : int
        Input side (power of two).
    num_ws, latent_dim : int
        Shape of the W+ code.
    features : sequence of int
    spatial_res, spatial_channels : int
        With ``spatial_res`` (a power of two up to ``size``; 0: none), a second head reads a
        spatial code of ``spatial_channels`` channels from the feature pyramid at that level,
        extended top-down beyond 16 where it is finer (:meth:`encode`):
        the generator's activations at that resolution, as in the Feature-Style Encoder [5]_,
        so labels need not pass through the 1-D W+ code alone.

    References
    ----------
    .. [5] X. Yao, A. Newson, Y. Gousseau, P. Hellier, "A style-based GAN encoder for high
       fidelity reconstruction of images and videos" (Feature-Style Encoder), ECCV 2022.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        size: int,
        num_ws: int,
        latent_dim: int,
        features: Sequence[int] = (16, 32, 64, 128),
        spatial_res: int = 0,
        spatial_channels: int = 0,
    ):
        super().__init__()
        self.size = _check_size(size)
        self.num_ws, self.latent_dim = int(num_ws), int(latent_dim)
        ch = channels_for(features, size)
        self.stem = nn.Conv2d(in_channels, ch[size], 3, padding=1)
        self.down = nn.ModuleList()
        res = size
        while res > 4:
            self.down.append(nn.Conv2d(ch[res], ch[res // 2], 3, stride=2, padding=1))
            res //= 2
        self.levels = [r for r in (4, 8, 16) if r <= size]
        self.spatial_res = int(spatial_res)
        if self.spatial_res and (self.spatial_res not in ch or spatial_channels < 1):
            raise ValueError(
                f"spatial_res must be a power of two from 4 to size ({size}), 0: none, with "
                f"spatial_channels >= 1; got {spatial_res} and {spatial_channels}"
            )
        # The top-down pyramid runs over the W+ levels and on to a finer spatial code's level.
        self.pyramid_levels = self.levels + [r for r in sorted(ch) if 16 < r <= self.spatial_res]
        width = ch[4]
        self.lateral = nn.ModuleDict({str(r): nn.Conv2d(ch[r], width, 1) for r in self.pyramid_levels})
        groups = [list(g) for g in torch.arange(num_ws).tensor_split(len(self.levels))]
        self.groups = [len(g) for g in groups]
        self.heads = nn.ModuleList()
        for r, n in zip(self.levels, self.groups):
            mods: list[nn.Module] = []
            rr = r
            while rr > 4:
                mods += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
                rr //= 2
            mods += [nn.Flatten(), nn.Linear(width * 16, n * latent_dim)]
            self.heads.append(nn.Sequential(*mods))
        self.spatial = None
        if self.spatial_res:
            self.spatial = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(width, int(spatial_channels), 3, padding=1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, size, size) -> (B, num_ws, latent_dim)`` offsets from ``w_avg`` (no spatial
        code is computed: test-time optimisation calls this at every step)."""
        return self.encode(x, spatial=False)[0]

    def encode(self, x: torch.Tensor, *, spatial: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W+ offsets and, with ``spatial_res`` and ``spatial``, the spatial code.

        Returns
        -------
        codes : (B, num_ws, latent_dim) Tensor
            Offsets from the generator's ``w_avg``.
        features : (B, spatial_channels, spatial_res, spatial_res) Tensor or None
            Activations for the generator's resolution ``spatial_res``
            (:meth:`SemanticStyleGenerator.synthesis` ``features``), read from the feature
            pyramid at that level; ``None`` without ``spatial_res`` or with ``spatial=False``.
        """
        spatial = spatial and self.spatial is not None
        x = F.leaky_relu(self.stem(x), 0.2)
        feats = {x.shape[-1]: x}
        for conv in self.down:
            x = F.leaky_relu(conv(x), 0.2)
            feats[x.shape[-1]] = x
        p = None
        pyramid = {}
        for r in self.pyramid_levels if spatial else self.levels:  # coarse to fine
            lat = self.lateral[str(r)](feats[r])
            p = lat if p is None else lat + F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=False)
            pyramid[r] = p
        codes = [head(pyramid[r]).reshape(x.shape[0], n, self.latent_dim) for r, n, head in zip(self.levels, self.groups, self.heads)]
        features = self.spatial(pyramid[self.spatial_res]) if spatial else None
        return torch.cat(codes, 1), features
