"""Self-training across slices: confident pseudo-labels on unannotated slices, learnt from a
strongly perturbed view (FixMatch for segmentation)."""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from ..consistency import (
    check_shares,
    progress_weight,
    random_dihedral,
    random_intensity,
    unlabelled_count,
)
from .base import register_method
from .supervised import Supervised, SupervisedParams


@dataclasses.dataclass
class SelfTrainingParams(SupervisedParams):
    """Hyperparameters of :class:`SelfTraining`.

    Attributes
    ----------
    pseudo_weight : float
        Final weight of the pseudo-label cross-entropy (``lambda_u`` of FixMatch, 1 there).
    threshold : float
        A pixel of an unannotated crop becomes a pseudo-label when the network's probability
        of its most likely class, on the weak view, reaches this (``tau``, 0.95 as in
        FixMatch). At 0.9 its pseudo-labels kept false regions with evenly spread slices
        (phantom, K = 5, 1 CPU-minute, 3 seeds: 0.060 below ``supervised``; 0.95: 0.020
        below, and +0.023 with clustered slices instead of -0.006; docs/benchmarks.md).
    warmup : float
        Share of the run (:attr:`~semiseg.methods.base.Method.progress`) trained on the
        supervised loss alone first, so pseudo-labels come from a model that already segments.
    rampup : float
        Share of the run over which the pseudo-label weight ramps up (sigmoid) after the
        warm-up.
    unlabelled_ratio : float
        Unannotated crops per step as a fraction of the batch size.
    transforms : bool
        The strong view is also a random flip / quarter turn of the crop (undone on its
        prediction before it is compared).
    contrast, shift, noise_std : float
        Photometric perturbation of the strong view (:func:`semiseg.consistency.random_intensity`,
        normalised intensity units).
    class_balance : float
        Class-balanced self-training (CBST, Zou et al. 2018): besides the pixels above
        ``threshold``, the most confident ``class_balance`` share of the pixels predicted as
        each class become pseudo-labels, and the pseudo-label loss is averaged per class, so
        a rare class (a tumour) weighs as much as the background instead of being drowned by
        it. 0 is FixMatch's single threshold and pixel average.
    tag_weight : float
        Weight of a multiple-instance term on unannotated crops from slices *tagged diseased*
        (weak tags): such a crop holds a lesion somewhere, so the mean foreground probability
        of its ``tag_share`` most likely pixels should be high (``-log`` of it). It lets the
        network find lesions no annotated slice showed, which pseudo-labels, drawn from the
        network's own predictions, cannot. 0 switches it off.
    tag_share : float
        Share of a crop's pixels pooled by the multiple-instance term (top-k pooling).
    """

    pseudo_weight: float = 1.0
    threshold: float = 0.95
    warmup: float = 0.4
    rampup: float = 0.2
    unlabelled_ratio: float = 0.5
    transforms: bool = True
    contrast: float = 0.25
    shift: float = 0.25
    noise_std: float = 0.1
    class_balance: float = 0.0
    tag_weight: float = 0.0
    tag_share: float = 0.005


@register_method
class SelfTraining(Supervised):
    """U-Net trained with Dice + cross-entropy on annotated crops and, on unannotated crops,
    cross-entropy against its own confident predictions.

    Every step the network predicts the weak view of each unannotated crop (the crop itself,
    without gradient); pixels whose top probability reaches ``threshold`` become
    pseudo-labels, re-estimated at every step as the network improves. The network then
    learns them from a strong view of the same crop (a random flip / quarter turn and a
    contrast, brightness and noise perturbation), mapped back pixel for pixel. The loss is
    averaged over every unannotated pixel, so its weight grows with the confident share, and
    it starts after a supervised warm-up and ramps up with the run's progress. With slice
    context (``TrainConfig.context``) the network sees each slice's neighbours, where
    pseudo-labels are most reliable. Pseudo-labels live in the step only: the user's labels
    are never written.

    References
    ----------
    .. [1] K. Sohn et al., "FixMatch: simplifying semi-supervised learning with consistency and
       confidence", NeurIPS 2020.
    .. [2] D.-H. Lee, "Pseudo-label: the simple and efficient semi-supervised learning method
       for deep neural networks", ICML workshops 2013.
    .. [3] Y. Ouali, C. Hudelot, M. Tami, "Semi-supervised semantic segmentation with
       cross-consistency training", CVPR 2020 (perturbed views for segmentation).
    .. [4] Y. Zou, Z. Yu, B. V. K. Vijaya Kumar, J. Wang, "Unsupervised domain adaptation for
       semantic segmentation via class-balanced self-training", ECCV 2018 (``class_balance``).
    """

    name = "self-training"
    summary = "U-Net learning its own confident predictions on unannotated slices (FixMatch-style)"
    reference = "Sohn et al., NeurIPS 2020 (FixMatch); Lee 2013 (pseudo-labels)"
    Params = SelfTrainingParams
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 1.7
    semi_supervised = True

    def build(self) -> None:
        p = self.params
        if p.pseudo_weight < 0 or min(p.contrast, p.shift, p.noise_std) < 0:
            raise ValueError("pseudo_weight, contrast, shift and noise_std must be >= 0")
        if not 0 < p.threshold <= 1:
            raise ValueError("threshold must lie in (0, 1]")
        if p.tag_weight < 0 or not 0 < p.tag_share <= 1:
            raise ValueError("tag_weight must be >= 0 and tag_share must lie in (0, 1]")
        if not 0 <= p.class_balance <= 1:
            raise ValueError("class_balance is a share of each class's pixels: it must lie in [0, 1]")
        check_shares(warmup=p.warmup, rampup=p.rampup)
        unlabelled_count(1, p.unlabelled_ratio)
        super().build()
        #: Share of unannotated pixels that were pseudo-labels in the last step.
        self.confident_share = 0.0

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": unlabelled_count(batch_size, self.params.unlabelled_ratio)}

    def pseudo_labels(self, x_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-labels of the weak view ``x_u`` (N, C, H, W): the most likely class
        ``(N, H, W)`` int64 and whether it is confident ``(N, H, W)`` bool. No graph is built."""
        with torch.no_grad(), self.autocast():
            probs = torch.softmax(self.nets["seg"](x_u).float(), 1)
        conf, labels = probs.max(1)
        return labels, self.confident(conf, labels)

    def confident(self, conf: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Which pixels become pseudo-labels, from the top probability ``conf`` and the
        predicted class ``labels`` (both ``(N, H, W)``): those at ``threshold`` and, with
        ``class_balance``, the most confident share of each predicted class."""
        p = self.params
        chosen = conf >= p.threshold
        if p.class_balance > 0:
            for c in torch.unique(labels).tolist():
                of_c = conf[labels == c]
                k = max(1, round(p.class_balance * of_c.numel()))
                tau_c = torch.topk(of_c, k, sorted=False).values.min()
                chosen |= (labels == c) & (conf >= tau_c)
        return chosen

    def pseudo_loss(self, ce: torch.Tensor, target: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
        """The pseudo-label term from the per-pixel cross-entropy ``ce`` ``(N, H, W)``: averaged
        over every unannotated pixel (FixMatch), or, with ``class_balance``, over the pixels
        predicted as each class, then over the classes (CBST)."""
        if self.params.class_balance <= 0:
            return (ce * confident).mean()
        per_class = [(ce * confident)[target == c].mean() for c in torch.unique(target).tolist()]
        return torch.stack(per_class).mean()

    def tag_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Multiple-instance loss of crops known to hold a lesion (``logits`` ``(N, K, H, W)``):
        ``-log`` of the mean foreground probability (any class but 0) of each crop's
        ``tag_share`` most likely pixels, averaged over the crops."""
        fg = 1.0 - torch.softmax(logits.float(), 1)[:, 0].flatten(1)
        k = max(1, round(self.params.tag_share * fg.shape[1]))
        top = torch.topk(fg, k, dim=1).values.mean(1)
        return -torch.log(top.clamp_min(1e-6)).mean()

    def strong_view(self, x_u: torch.Tensor):
        """The strong view of ``x_u`` and the spatial transform to undo on its prediction
        (``None`` without ``transforms``)."""
        p = self.params
        x = random_intensity(x_u, contrast=p.contrast, shift=p.shift, noise_std=p.noise_std)
        tf = None
        if p.transforms:
            tf = random_dihedral(x.shape[0], square=x.shape[-1] == x.shape[-2])
            x = tf.apply(x)
        return x, tf

    def training_step(self, batch):
        p = self.params
        ramp = progress_weight(self.progress, p.warmup, p.rampup)
        if ramp <= 0 or p.pseudo_weight <= 0:  # warm-up: supervised only, no unannotated pass
            return super().training_step(batch)
        self.train_mode()
        x_l, x_u = batch["labelled"], batch["unlabelled"]
        target, confident = self.pseudo_labels(x_u)
        x_s, tf = self.strong_view(x_u)
        with self.autocast():
            if x_s.shape[-2:] == x_l.shape[-2:]:
                logits = self.nets["seg"](torch.cat([x_l, x_s]))
                logits_l, logits_s = logits[: len(x_l)], logits[len(x_l) :]
            else:
                logits_l, logits_s = self.nets["seg"](x_l), self.nets["seg"](x_s)
        if tf is not None:
            logits_s = tf.invert(logits_s)
        terms = self.supervised_loss(logits_l, batch["mask"])
        ce = F.cross_entropy(logits_s.float(), target, reduction="none")
        # FixMatch's normalisation: over every unannotated pixel, confident or not (per class
        # with class_balance).
        terms["pseudo"] = self.pseudo_loss(ce, target, confident)
        loss = p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"] + ramp * p.pseudo_weight * terms["pseudo"]
        diseased = batch.get("unlabelled_diseased")
        if p.tag_weight > 0 and diseased is not None and bool(diseased.any()):
            terms["tag"] = self.tag_loss(logits_s[diseased.bool()])
            loss = loss + ramp * p.tag_weight * terms["tag"]
        self.optimise(loss, self.opts["seg"])
        self.confident_share = float(confident.float().mean())
        return {k: v.item() for k, v in terms.items()}
