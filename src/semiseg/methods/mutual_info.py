"""Mutual-information regularisation with transformation consistency (Peng et al.)."""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from ..consistency import (
    check_shares,
    mutual_information,
    pixel_kl,
    progress_weight,
    random_dihedral,
    unlabelled_count,
)
from .base import register_method
from .supervised import Supervised, SupervisedParams


@dataclasses.dataclass
class MutualInfoParams(SupervisedParams):
    """Hyperparameters of :class:`MutualInfo` (defaults of Peng et al.).

    Attributes
    ----------
    weight : float
        lambda of Eq. (9): weight of the unsupervised terms (0.1 in the paper).
    mi_weight, reg_weight : float
        Relative weights of the MI term (``-L_MI``) and the consistency term ``L_reg`` (both 1
        in the paper; set one to 0 for the paper's ablations).
    radius : int
        Neighbourhood half size of the MI term: 1 gives the paper's 3x3 displacements.
    consistency : str
        ``kl`` (Eq. (8)) or ``mse`` (the paper's MSE variant).
    warmup : float
        Share of the run (:attr:`~semiseg.methods.base.Method.progress`) trained on the
        supervised loss alone before the unsupervised terms start (0 in the paper).
    rampup : float
        Share of the run over which lambda ramps up (sigmoid) after the warm-up (0: the
        paper's constant weight).
    unlabelled_ratio : float
        Unannotated crops per step as a fraction of the batch size.
    """

    weight: float = 0.1
    mi_weight: float = 1.0
    reg_weight: float = 1.0
    radius: int = 1
    consistency: str = "kl"
    warmup: float = 0.5
    rampup: float = 0.0
    unlabelled_ratio: float = 0.5


@register_method
class MutualInfo(Supervised):
    """U-Net trained with Dice + cross-entropy on annotated crops, and on unannotated crops with
    the mutual information between each pixel's prediction and its neighbours' in the prediction
    of a randomly flipped / turned copy (mapped back), plus the pixel-wise KL divergence between
    the two predictions.

    References
    ----------
    .. [1] J. Peng, M. Pedersoli, C. Desrosiers, "Mutual information deep regularization for
       semi-supervised segmentation", MIDL 2020, Eqs. (5)-(9).
    """

    name = "mutual-info"
    summary = "neighbourhood mutual information + transform consistency on unannotated slices"
    reference = "Peng et al., MIDL 2020"
    Params = MutualInfoParams
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 2.1
    semi_supervised = True
    retired_params = {
        "warmup_steps": "use warmup, a share of the run (0.3: the first 30 %)",
        "rampup_steps": "use rampup, a share of the run",
    }

    def build(self) -> None:
        p = self.params
        if p.consistency not in ("kl", "mse"):
            raise ValueError(f"consistency must be 'kl' or 'mse', got {p.consistency!r}")
        if min(p.radius, p.weight) < 0:
            raise ValueError("radius and weight must be >= 0")
        check_shares(warmup=p.warmup, rampup=p.rampup)
        unlabelled_count(1, p.unlabelled_ratio)
        super().build()

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": unlabelled_count(batch_size, self.params.unlabelled_ratio)}

    def unsupervised_terms(self, p_u: torch.Tensor, p_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """MI and consistency of ``p_u = f(x)`` and ``p_t = T^-1 f(T x)``, both (N, C, H, W)."""
        mi = mutual_information(p_u, p_t, radius=self.params.radius)
        if self.params.consistency == "kl":
            reg = pixel_kl(p_u, p_t)
        else:
            reg = F.mse_loss(p_u, p_t)
        return {"mi": mi, "reg": reg}

    def training_step(self, batch):
        p = self.params
        lam = p.weight * progress_weight(self.progress, p.warmup, p.rampup)
        if lam <= 0:  # warm-up: supervised only
            return super().training_step(batch)
        self.train_mode()
        x_l, x_u = batch["labelled"], batch["unlabelled"]
        n_l, n_u = len(x_l), len(x_u)
        tf = random_dihedral(n_u, square=x_u.shape[-1] == x_u.shape[-2])
        with self.autocast():
            logits = self.nets["seg"](torch.cat([x_l, x_u, tf.apply(x_u)]))
        logits_l = logits[:n_l]
        probs = torch.softmax(logits[n_l:].float(), 1)
        p_u, p_t = probs[:n_u], tf.invert(probs[n_u:])
        terms = self.supervised_loss(logits_l, batch["mask"])
        terms.update(self.unsupervised_terms(p_u, p_t))
        unsup = -p.mi_weight * terms["mi"] + p.reg_weight * terms["reg"]
        loss = p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"] + lam * unsup
        self.optimise(loss, self.opts["seg"])
        return {k: v.item() for k, v in terms.items()}
