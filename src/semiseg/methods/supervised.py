"""Supervised 2D U-Net baseline: Dice + cross-entropy on annotated slices only."""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from ..losses import dice_loss
from ..nets.unet import UNet
from .base import Method, MethodParams, register_method


@dataclasses.dataclass
class SupervisedParams(MethodParams):
    """Hyperparameters of :class:`Supervised`.

    Attributes
    ----------
    dice_weight, ce_weight : float
        Weights of the soft Dice and cross-entropy terms.
    norm : str
        U-Net normalisation (``instance``, ``batch``, ``group``).
    """

    dice_weight: float = 1.0
    ce_weight: float = 1.0
    norm: str = "instance"
    weight_decay: float = 1e-4


@register_method
class Supervised(Method):
    """U-Net trained on annotated slices with soft Dice + cross-entropy.

    The segmentation-only baseline of every paper this project implements; it ignores
    unannotated slices and weak tags.

    References
    ----------
    .. [1] O. Ronneberger, P. Fischer, T. Brox, "U-Net: convolutional networks for biomedical
       image segmentation", MICCAI 2015.
    """

    name = "supervised"
    summary = "U-Net on annotated slices only (Dice + cross-entropy); the baseline"
    reference = "Ronneberger et al., MICCAI 2015"
    Params = SupervisedParams

    def build(self) -> None:
        p = self.params
        self.nets["seg"] = UNet(self.in_channels, self.num_classes, features=p.features, norm=p.norm)

    def make_optimizers(self) -> None:
        self.opts["seg"] = torch.optim.AdamW(
            self.nets["seg"].parameters(), lr=self.params.lr, weight_decay=self.params.weight_decay
        )

    def supervised_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dice and cross-entropy terms of ``logits`` against ``mask``."""
        return {
            "dice_loss": dice_loss(logits, mask),
            "ce": F.cross_entropy(logits.float(), mask),
        }

    def training_step(self, batch):
        self.train_mode()
        with self.autocast():
            logits = self.nets["seg"](batch["labelled"])
        terms = self.supervised_loss(logits, batch["mask"])
        loss = self.params.dice_weight * terms["dice_loss"] + self.params.ce_weight * terms["ce"]
        self.optimise(loss, self.opts["seg"])
        return {k: v.item() for k, v in terms.items()}

    def predict(self, x):
        with self.eval_mode(), self.autocast():
            logits = self.nets["seg"](x)
        return {"probabilities": torch.softmax(logits.float(), dim=1)}
