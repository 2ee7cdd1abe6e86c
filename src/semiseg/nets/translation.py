"""Networks of the presence/absence translation model of Vorontsov et al.

One encoder ``f`` maps an image to a latent code split into a *common* code ``c`` and a
*unique* code ``u``. The *common* decoder ``g_com(c)`` draws the healthy (absence-domain)
image; the *residual* decoder ``g_res(c, u)`` draws the additive change that turns it into the
input. The residual decoder doubles as the segmentation decoder: all its layers but the last,
with a separate set of normalisation parameters, followed by a 1x1 classification layer.

Every decoder receives *compressed long skip connections* from the encoder: each skipped
feature stack is instance-normalised and compressed by a 1x1 convolution to a single map,
then concatenated to the decoder's features. Every convolution is spectrally normalised.

References
----------
.. [1] E. Vorontsov, P. Molchanov, C. Beckham, J. Kautz, S. Kadoury, "Towards
   annotation-efficient segmentation via image-to-image translation", IEEE TMI 2022
   (arXiv:1904.01636), Section III, Table I.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .discriminators import apply_spectral_norm

__all__ = [
    "CommonDecoder",
    "Conv",
    "ResidualDecoder",
    "SkipCompressor",
    "TaskLayerNorm",
    "TranslationEncoder",
    "TranslationNet",
]

TASKS = ("translation", "segmentation")


class Conv(nn.Module):
    """Convolution with reflection padding (replicate where the map is too small to reflect)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1, bias: bool = True):
        super().__init__()
        self.pad = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        if p:
            mode = "reflect" if p < min(x.shape[-2:]) else "replicate"
            x = F.pad(x, (p, p, p, p), mode=mode)
        return self.conv(x)


class TaskLayerNorm(nn.Module):
    """Layer normalisation with one set of affine parameters per task.

    Statistics are taken over ``(C, H, W)`` of each sample; the per-channel scale and shift
    are chosen by ``task``, so one decoder can serve several outputs with shared convolution
    weights but separate normalisation parameters (Section IV-B of [1]).
    """

    def __init__(self, channels: int, tasks: Sequence[str] = ("translation",), eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.ParameterDict({t: nn.Parameter(torch.ones(channels)) for t in tasks})
        self.bias = nn.ParameterDict({t: nn.Parameter(torch.zeros(channels)) for t in tasks})

    def forward(self, x: torch.Tensor, task: str = "translation") -> torch.Tensor:
        x = F.group_norm(x, 1, eps=self.eps)
        return x * self.weight[task][:, None, None] + self.bias[task][:, None, None]


class SkipCompressor(nn.Module):
    """Compressed long skip: instance normalisation then a 1x1 convolution to one map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class TranslationEncoder(nn.Module):
    """Encoder ``f``: ``C f0 3x3 -> [N R C f 3x3/2]* per level -> N``.

    The blocks have short (residual) skips, as in Table I of [1]. The last layer is an
    instance normalisation *without* ReLU, so the unique code can match its N(0, I) prior.

    Parameters
    ----------
    in_channels : int
    features : sequence of int
        Channels per level, finest first; the last is the latent code's channel count.

    Returns (forward)
    -----------------
    code : (B, features[-1], H / 2**(L-1), W / 2**(L-1)) Tensor
    skips : list of Tensor
        Feature maps of levels ``1 .. L-2`` (not the first layer nor the bottleneck).
    """

    def __init__(self, in_channels: int, features: Sequence[int]):
        super().__init__()
        f = [int(c) for c in features]
        self.conv_in = Conv(in_channels, f[0], 3)
        self.blocks = nn.ModuleList()
        self.shortcuts = nn.ModuleList()
        self.norms = nn.ModuleList()
        for c_in, c_out in itertools.pairwise(f):
            self.norms.append(nn.InstanceNorm2d(c_in, affine=True))
            self.blocks.append(Conv(c_in, c_out, 3, stride=2))
            self.shortcuts.append(nn.Conv2d(c_in, c_out, 1, stride=2))
        self.norm_out = nn.InstanceNorm2d(f[-1], affine=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.conv_in(x)
        feats = []
        for norm, block, short in zip(self.norms, self.blocks, self.shortcuts):
            x = block(F.relu(norm(x))) + short(x)
            feats.append(x)
        return self.norm_out(x), feats[:-1]


class _Decoder(nn.Module):
    """Shared machinery: ``C -> [N R up C]* (+skip maps) -> N R C``."""

    def __init__(
        self,
        code_channels: int,
        out_channels: int,
        features: Sequence[int],
        *,
        kernel_size: int,
        short_skips: bool,
        tasks: Sequence[str],
    ):
        super().__init__()
        f = [int(c) for c in features]
        self.levels = len(f)
        self.short_skips = short_skips
        k = kernel_size
        self.conv_in = Conv(code_channels, f[-1], k)
        # Skip maps arrive at levels 1 .. L-2 (the encoder's first layer and bottleneck are not skipped).
        self.skip_levels = list(range(self.levels - 2, 0, -1))
        self.compress = nn.ModuleDict({str(i): SkipCompressor(f[i]) for i in self.skip_levels})
        self.norms = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.shortcuts = nn.ModuleList()
        for i in range(self.levels - 2, -1, -1):
            c_in = f[i + 1]
            extra = 1 if i in self.skip_levels else 0
            self.norms.append(TaskLayerNorm(c_in, tasks))
            self.blocks.append(Conv(c_in + extra, f[i], k))
            if short_skips:
                self.shortcuts.append(nn.Conv2d(c_in, f[i], 1))
        self.norm_out = TaskLayerNorm(f[0], tasks)
        self.conv_out = Conv(f[0], out_channels, k)

    def body(self, x: torch.Tensor, skips: Sequence[torch.Tensor], task: str) -> torch.Tensor:
        """All layers but the last: features ``(B, features[0], H, W)``."""
        x = self.conv_in(x)
        for j, i in enumerate(range(self.levels - 2, -1, -1)):
            up = F.interpolate(x, scale_factor=2, mode="nearest")
            h = F.interpolate(F.relu(self.norms[j](x, task)), scale_factor=2, mode="nearest")
            if i in self.skip_levels:
                h = torch.cat([h, self.compress[str(i)](skips[i - 1])], dim=1)
            h = self.blocks[j](h)
            x = h + self.shortcuts[j](up) if self.short_skips else h
        return x

    def last(self, x: torch.Tensor, task: str = "translation") -> torch.Tensor:
        return self.conv_out(F.relu(self.norm_out(x, task)))


class CommonDecoder(_Decoder):
    """Common decoder ``g_com(c)``: 3x3 kernels, short skips, layer norm; never sees ``u``."""

    def __init__(self, common_channels: int, out_channels: int, features: Sequence[int]):
        super().__init__(
            common_channels, out_channels, features, kernel_size=3, short_skips=True, tasks=("translation",)
        )

    def forward(self, c: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.last(self.body(c, skips, "translation"))


class ResidualDecoder(_Decoder):
    """Residual decoder ``g_res(c, u)`` and segmentation decoder ``g_seg`` in one.

    5x5 kernels (``kernel_size``), no short skips, layer normalisation with separate parameters for the
    ``translation`` and ``segmentation`` tasks. Segmentation runs all layers but the last
    with the segmentation norm parameters, then a 1x1 classification layer.
    """

    def __init__(
        self, code_channels: int, out_channels: int, num_classes: int, features: Sequence[int], *, kernel_size: int = 5
    ):
        super().__init__(code_channels, out_channels, features, kernel_size=kernel_size, short_skips=False, tasks=TASKS)
        self.classifier = nn.Conv2d(int(features[0]), num_classes, 1)

    def forward(self, code: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Residual image ``(B, out_channels, H, W)``."""
        return self.last(self.body(code, skips, "translation"), "translation")

    def segment(self, code: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Class logits ``(B, num_classes, H, W)``."""
        h = self.body(code, skips, "segmentation")
        return self.classifier(F.relu(self.norm_out(h, "segmentation")))


class TranslationNet(nn.Module):
    """Encoder, common decoder and residual/segmentation decoder, spectrally normalised.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Segmentation classes, background included.
    features : sequence of int
        Channels per level, finest first; ``len(features) - 1`` halvings, so inputs must be
        multiples of ``2 ** (len(features) - 1)``. The last entry is the latent width.
    unique_channels : int
        Channels of the latent given to the unique code ``u`` (the rest form ``c``).
    spectral : bool
        Spectral normalisation on every convolution (the paper's setting).
    residual_kernel : int
        Kernel side of the residual decoder's convolutions (the paper's 5; 3 costs 2.8x less).

    Examples
    --------
    >>> net = TranslationNet(1, 2, features=(8, 16, 32), unique_channels=8)
    >>> out = net.translate(torch.zeros(2, 1, 16, 20))
    >>> out["healthy"].shape, out["probabilities"].shape
    (torch.Size([2, 1, 16, 20]), torch.Size([2, 2, 16, 20]))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        features: Sequence[int] = (16, 32, 64, 128),
        unique_channels: int = 32,
        spectral: bool = True,
        residual_kernel: int = 5,
    ):
        super().__init__()
        features = tuple(int(c) for c in features)
        if len(features) < 2:
            raise ValueError("features needs at least two levels")
        if not 0 < unique_channels < features[-1]:
            raise ValueError(f"unique_channels must be between 1 and {features[-1] - 1}")
        self.features = features
        self.unique_channels = int(unique_channels)
        self.common_channels = features[-1] - self.unique_channels
        self.size_multiple = 2 ** (len(features) - 1)
        self.encoder = TranslationEncoder(in_channels, features)
        self.common = CommonDecoder(self.common_channels, in_channels, features)
        if residual_kernel < 1 or residual_kernel % 2 == 0:
            raise ValueError(f"residual_kernel must be odd and positive, got {residual_kernel}")
        self.residual = ResidualDecoder(features[-1], in_channels, num_classes, features, kernel_size=residual_kernel)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if spectral:
            apply_spectral_norm(self)

    # -------------------------------------------------------------- pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``x -> (c, u, skips)``."""
        code, skips = self.encoder(x)
        return code[:, : self.common_channels], code[:, self.common_channels :], skips

    def decode_common(self, c: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Healthy image ``g_com(c)``."""
        return self.common(c, skips)

    def decode_residual(self, c: torch.Tensor, u: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Additive change ``g_res(c, u)``."""
        return self.residual(torch.cat([c, u], dim=1), skips)

    def segment_codes(self, c: torch.Tensor, u: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Segmentation logits ``g_seg(c, u)``."""
        return self.residual.segment(torch.cat([c, u], dim=1), skips)

    def sample_unique(self, u_like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A unique code drawn from the N(0, I) prior with the shape of ``u_like``."""
        return torch.randn(u_like.shape, generator=generator, device=u_like.device, dtype=u_like.dtype)

    # -------------------------------------------------------------- whole passes
    def translate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Presence -> absence translation and segmentation of ``x`` ``(B, C, H, W)``.

        Returns
        -------
        dict
            ``healthy`` (x_PA), ``residual`` (Delta_PA), ``reconstruction``
            (x_PP = x_PA + Delta_PA), ``logits`` and ``probabilities`` (B, K, H, W).
        """
        c, u, skips = self.encode(x)
        healthy = self.decode_common(c, skips)
        residual = self.decode_residual(c, u, skips)
        logits = self.segment_codes(c, u, skips)
        return {
            "healthy": healthy,
            "residual": residual,
            "reconstruction": healthy + residual,
            "logits": logits,
            "probabilities": torch.softmax(logits.float(), dim=1),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits of ``x``."""
        c, u, skips = self.encode(x)
        return self.segment_codes(c, u, skips)
