"""Segmentation U-Net with an autoencoding decoder on the shared encoder (Vorontsov et al.'s
AE baseline)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..consistency import check_shares, unlabelled_count
from ..nets.unet import ConvBlock, UNet
from .base import register_method
from .supervised import Supervised, SupervisedParams


class ReconstructionDecoder(nn.Module):
    """Upsampling decoder from the bottleneck alone: no long skip connections.

    Mirrors :class:`~semiseg.nets.unet.UNet`'s decoder (transposed convolution, then a
    :class:`ConvBlock` per level) but never concatenates encoder features, so the input must
    pass through the bottleneck and autoencoding is not trivial.

    Parameters
    ----------
    out_channels : int
        Reconstructed image channels.
    features : sequence of int
        The encoder's channels per level, finest first.
    norm : str
        Normalisation layer.
    """

    def __init__(self, out_channels: int, *, features: Sequence[int], norm: str = "instance"):
        super().__init__()
        features = tuple(int(f) for f in features)
        c = features[-1]
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for f in reversed(features[:-1]):
            self.upconv.append(nn.ConvTranspose2d(c, f, 2, stride=2))
            self.up.append(ConvBlock(f, f, norm=norm))
            c = f
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Map the ``(B, features[-1], h, w)`` bottleneck to a ``(B, out_channels, H, W)`` image."""
        x = bottleneck
        for upconv, block in zip(self.upconv, self.up):
            x = block(upconv(x))
        return self.head(x)


@dataclasses.dataclass
class AutoencoderParams(SupervisedParams):
    """Hyperparameters of :class:`Autoencoder`.

    Attributes
    ----------
    rec_weight : float
        Weight of the L1 reconstruction loss (lambda_rec = lambda_seg = 1 in Vorontsov et al.).
    reconstruct_labelled : bool
        Also reconstruct the annotated crops (the paper reconstructs every slice).
    warmup : float
        Share of the run (:attr:`~semiseg.methods.base.Method.progress`) trained on the
        segmentation loss alone (no reconstruction, no unannotated crops) first (0 in the
        paper).
    unlabelled_ratio : float
        Unannotated crops per step as a fraction of the batch size.
    """

    rec_weight: float = 1.0
    warmup: float = 0.0
    reconstruct_labelled: bool = True
    unlabelled_ratio: float = 0.5


@register_method
class Autoencoder(Supervised):
    """U-Net segmentation plus a second decoder that reconstructs the input from the shared
    encoder's bottleneck, trained on annotated and unannotated slices (healthy and diseased).

    References
    ----------
    .. [1] E. Vorontsov, P. Molchanov, W. Byeon, S. De Mello, V. Jampani, M.-Y. Liu, S. Kadoury,
       J. Kautz, "Towards annotation-efficient segmentation via image-to-image translation",
       IEEE TMI 2022, section IV-A ("AE baseline").
    .. [2] A. Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization",
       BrainLes 2018.
    """

    name = "autoencoder"
    summary = "U-Net + reconstruction decoder (no skips) on every slice; the AE baseline"
    reference = "Vorontsov et al., IEEE TMI 2022 (AE baseline)"
    Params = AutoencoderParams
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 1.8
    outputs = {"reconstruction": "image"}
    semi_supervised = True

    def build(self) -> None:
        p = self.params
        if p.rec_weight < 0:
            raise ValueError("rec_weight must be >= 0")
        check_shares(warmup=p.warmup)
        unlabelled_count(1, p.unlabelled_ratio)
        self.nets["seg"] = UNet(self.in_channels, self.num_classes, features=p.features, norm=p.norm)
        self.nets["rec"] = ReconstructionDecoder(self.in_channels, features=p.features, norm=p.norm)

    def make_optimizers(self) -> None:
        params = [q for net in self.nets.values() for q in net.parameters()]
        self.opts["main"] = torch.optim.AdamW(params, lr=self.params.lr, weight_decay=self.params.weight_decay)

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": unlabelled_count(batch_size, self.params.unlabelled_ratio)}

    def training_step(self, batch):
        p = self.params
        self.train_mode()
        if self.warming_up(p.warmup):  # segmentation alone; the decoder waits
            with self.autocast():
                logits = self.nets["seg"](batch["labelled"])
            terms = self.supervised_loss(logits, batch["mask"])
            self.optimise(p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"], self.opts["main"])
            return {k: v.item() for k, v in terms.items()}
        x_l, x_u = batch["labelled"], batch["unlabelled"]
        n_l = len(x_l)
        x = torch.cat([x_l, x_u])
        with self.autocast():
            feats = self.nets["seg"].encode(x)
            logits = self.nets["seg"].decode([f[:n_l] for f in feats])
            bottleneck = feats[-1] if p.reconstruct_labelled else feats[-1][n_l:]
            rec = self.nets["rec"](bottleneck)
        target = x if p.reconstruct_labelled else x_u
        terms = self.supervised_loss(logits, batch["mask"])
        terms["rec"] = F.l1_loss(rec.float(), target.float())
        loss = p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"] + p.rec_weight * terms["rec"]
        self.optimise(loss, self.opts["main"])
        return {k: v.item() for k, v in terms.items()}

    def predict(self, x):
        with self.eval_mode(), self.autocast():
            feats = self.nets["seg"].encode(x)
            logits = self.nets["seg"].decode(feats)
            rec = self.nets["rec"](feats[-1])
        return {"probabilities": torch.softmax(logits.float(), dim=1), "reconstruction": rec.float()}
