"""Entropy minimisation on unannotated slices."""

from __future__ import annotations

import dataclasses

import torch

from ..consistency import check_shares, pixel_entropy, progress_weight, unlabelled_count
from .base import register_method
from .supervised import Supervised, SupervisedParams


@dataclasses.dataclass
class EntropyMinParams(SupervisedParams):
    """Hyperparameters of :class:`EntropyMin`.

    Attributes
    ----------
    entropy_weight : float
        Weight of the mean pixel-wise entropy (normalised by ``log K``) on unannotated crops.
    prior_weight : float
        Weight of the class-prior bound: the share of unannotated pixels predicted as each
        foreground class may not exceed that class's share in the annotated crops; the
        excess is penalised (0: off). Entropy alone rewards any confident answer, and growing
        the foreground into confident false positives is one (the collapse measured in #18).
    warmup : float
        Share of the run (:attr:`~semiseg.methods.base.Method.progress`) trained on the
        supervised loss alone before the entropy term starts, so the network first learns
        from the annotations before it is pushed to be confident elsewhere.
    rampup : float
        Share of the run over which the entropy weight ramps up (sigmoid) after the warm-up.
    unlabelled_ratio : float
        Unannotated crops per step as a fraction of the batch size.
    """

    entropy_weight: float = 0.1
    prior_weight: float = 1.0
    warmup: float = 0.5
    rampup: float = 0.2
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
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 1.6
    semi_supervised = True
    retired_params = {
        "warmup_steps": "use warmup, a share of the run (0.3: the first 30 %)",
        "rampup_steps": "use rampup, a share of the run",
    }

    def build(self) -> None:
        p = self.params
        if min(p.entropy_weight, p.prior_weight) < 0:
            raise ValueError("entropy_weight and prior_weight must be >= 0")
        check_shares(warmup=p.warmup, rampup=p.rampup)
        unlabelled_count(1, p.unlabelled_ratio)
        super().build()
        # Pixels per class in the annotated crops seen so far (the prior of the bound).
        self._class_counts = torch.zeros(self.num_classes, dtype=torch.float64)

    def class_prior(self, mask: torch.Tensor) -> torch.Tensor:
        """Share of each class among the annotated pixels seen so far, ``mask`` included
        (``(K,)``, float32 on the method's device)."""
        counts = torch.bincount(mask.reshape(-1).cpu(), minlength=self.num_classes)[: self.num_classes]
        self._class_counts += counts.double()
        return (self._class_counts / self._class_counts.sum().clamp_min(1)).float().to(self.device)

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": unlabelled_count(batch_size, self.params.unlabelled_ratio)}

    def training_step(self, batch):
        p = self.params
        self.train_mode()
        ramp = progress_weight(self.progress, p.warmup, p.rampup)
        if ramp <= 0:  # warm-up: supervised only
            self.class_prior(batch["mask"])
            return super().training_step(batch)
        w = p.entropy_weight * ramp
        x_l, x_u = batch["labelled"], batch["unlabelled"]
        with self.autocast():
            logits = self.nets["seg"](torch.cat([x_l, x_u]))
        logits_l, logits_u = logits[: len(x_l)], logits[len(x_l) :]
        terms = self.supervised_loss(logits_l, batch["mask"])
        probs_u = torch.softmax(logits_u.float(), 1)
        terms["entropy"] = pixel_entropy(probs_u, normalise=True)
        loss = p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"] + w * terms["entropy"]
        if p.prior_weight > 0:
            share = probs_u.mean((0, 2, 3))  # predicted share of each class
            terms["prior"] = (share - self.class_prior(batch["mask"]))[1:].clamp_min(0).sum()
            loss = loss + ramp * p.prior_weight * terms["prior"]
        self.optimise(loss, self.opts["seg"])
        return {k: v.item() for k, v in terms.items()}
