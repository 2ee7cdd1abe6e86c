"""Entropy minimisation on unannotated slices."""

from __future__ import annotations

import dataclasses

import torch

from ..consistency import pixel_entropy, unlabelled_count, unsupervised_weight
from .base import register_method
from .supervised import Supervised, SupervisedParams


@dataclasses.dataclass
class EntropyMinParams(SupervisedParams):
    """Hyperparameters of :class:`EntropyMin`.

    Attributes
    ----------
    entropy_weight : float
        Weight of the mean pixel-wise entropy (normalised by ``log K``) on unannotated crops.
    warmup_steps : int
        Supervised-only steps before the entropy term starts, so the network first learns from
        the annotations before it is pushed to be confident elsewhere.
    rampup_steps : int
        Sigmoid ramp-up of the entropy weight after the warm-up (0: constant).
    unlabelled_ratio : float
        Unannotated crops per step as a fraction of the batch size.
    """

    entropy_weight: float = 0.1
    warmup_steps: int = 150
    rampup_steps: int = 100
    unlabelled_ratio: float = 0.5


@register_method
class EntropyMin(Supervised):
    """U-Net trained with Dice + cross-entropy on annotated crops and the pixel-wise entropy of
    its predictions on unannotated crops (a soft pseudo-labelling).

    References
    ----------
    .. [1] T.-H. Vu et al., "ADVENT: adversarial entropy minimization for domain adaptation in
       semantic segmentation", CVPR 2019.
    .. [2] J. Peng, M. Pedersoli, C. Desrosiers, "Mutual information deep regularization for
       semi-supervised segmentation", MIDL 2020 (baseline).
    """

    name = "entropy-min"
    summary = "U-Net made confident on unannotated slices (entropy minimisation)"
    reference = "Vu et al., CVPR 2019 (baseline in Peng et al., MIDL 2020)"
    Params = EntropyMinParams

    def build(self) -> None:
        p = self.params
        if min(p.entropy_weight, p.warmup_steps, p.rampup_steps) < 0:
            raise ValueError("entropy_weight, warmup_steps and rampup_steps must be >= 0")
        unlabelled_count(1, p.unlabelled_ratio)
        super().build()

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": unlabelled_count(batch_size, self.params.unlabelled_ratio)}

    def training_step(self, batch):
        p = self.params
        self.train_mode()
        w = p.entropy_weight * unsupervised_weight(self.step, p.warmup_steps, p.rampup_steps)
        if w <= 0:  # warm-up: supervised only
            return super().training_step(batch)
        x_l, x_u = batch["labelled"], batch["unlabelled"]
        with self.autocast():
            logits = self.nets["seg"](torch.cat([x_l, x_u]))
        logits_l, logits_u = logits[: len(x_l)], logits[len(x_l) :]
        terms = self.supervised_loss(logits_l, batch["mask"])
        terms["entropy"] = pixel_entropy(torch.softmax(logits_u.float(), 1), normalise=True)
        loss = p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"] + w * terms["entropy"]
        self.optimise(loss, self.opts["seg"])
        return {k: v.item() for k, v in terms.items()}
