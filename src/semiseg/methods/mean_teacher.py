"""Mean teacher: consistency between a student and its weight-averaged teacher."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.nn import functional as F

from ..consistency import (
    clamped_noise,
    ema_decay,
    ema_update,
    random_dihedral,
    unlabelled_count,
    unsupervised_weight,
)
from ..nets.unet import UNet
from .base import register_method, set_requires_grad
from .supervised import Supervised, SupervisedParams


@dataclasses.dataclass
class MeanTeacherParams(SupervisedParams):
    """Hyperparameters of :class:`MeanTeacher`.

    Attributes
    ----------
    ema_decay : float
        Teacher weight-average decay alpha (0.99 as in Vorontsov et al.; Peng et al. use 0.999,
        which suits long trainings: the teacher averages over about ``1 / (1 - alpha)`` steps).
    ema_warmup : bool
        Use ``min(1 - 1/(t + 1), alpha)`` (Tarvainen & Valpola) instead of the constant alpha.
    consistency_weight : float
        Final weight of the MSE between student and teacher probabilities.
    warmup_steps : int
        Supervised-only steps before the consistency term starts (the teacher is still
        averaged during them).
    rampup_steps : int
        Length of the sigmoid ramp-up of the consistency weight after the warm-up (0: constant).
    unlabelled_ratio : float
        Unannotated crops per step as a fraction of the batch size.
    noise_std, noise_clamp : float
        Gaussian noise added to the teacher's input, each value clipped to +-``noise_clamp``
        (normalised intensity units; 0 disables).
    transforms : bool
        Show the student a random flip / quarter turn of the unlabelled crop and undo it on
        its prediction before comparing (Perone & Cohen-Adad).
    dropout : float
        Dropout in the decoder blocks of student and teacher.

    Vorontsov et al.'s variant: ``ema_decay=0.99 ema_warmup=false consistency_weight=0.01
    warmup_steps=0 rampup_steps=0``; Peng et al.'s: ``ema_decay=0.999``.
    """

    ema_decay: float = 0.99
    ema_warmup: bool = True
    consistency_weight: float = 1.0
    warmup_steps: int = 150
    rampup_steps: int = 200
    unlabelled_ratio: float = 0.5
    noise_std: float = 0.1
    noise_clamp: float = 0.2
    transforms: bool = True
    dropout: float = 0.0


@register_method
class MeanTeacher(Supervised):
    """Student U-Net trained with Dice + cross-entropy on annotated crops and an MSE consistency
    with an exponential-moving-average teacher on unannotated crops; the teacher predicts.

    References
    ----------
    .. [1] A. Tarvainen, H. Valpola, "Mean teachers are better role models", NeurIPS 2017.
    .. [2] C. S. Perone, J. Cohen-Adad, "Deep semi-supervised segmentation with weight-averaged
       consistency targets", DLMIA 2018.
    .. [3] E. Vorontsov et al., "Towards annotation-efficient segmentation via image-to-image
       translation", IEEE TMI 2022, section IV-A (baseline).
    .. [4] J. Peng, M. Pedersoli, C. Desrosiers, "Mutual information deep regularization for
       semi-supervised segmentation", MIDL 2020 (baseline, EMA 0.999).
    """

    name = "mean-teacher"
    summary = "student + weight-averaged teacher, consistent on unannotated slices (MSE)"
    reference = "Tarvainen & Valpola 2017; Perone & Cohen-Adad 2018 (baseline in Vorontsov et al.; Peng et al.)"
    Params = MeanTeacherParams

    def build(self) -> None:
        p = self.params
        if not 0 <= p.ema_decay <= 1:
            raise ValueError("ema_decay must be in [0, 1]")
        if min(p.consistency_weight, p.warmup_steps, p.rampup_steps, p.noise_std) < 0:
            raise ValueError("consistency_weight, warmup_steps, rampup_steps and noise_std must be >= 0")
        unlabelled_count(1, p.unlabelled_ratio)
        student = self._unet(p)
        self.nets["seg"] = student
        teacher = copy.deepcopy(student)
        set_requires_grad(teacher, False)
        self.nets["teacher"] = teacher

    def _unet(self, p):
        return UNet(self.in_channels, self.num_classes, features=p.features, norm=p.norm, dropout=p.dropout)

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": unlabelled_count(batch_size, self.params.unlabelled_ratio)}

    def consistency_weight(self) -> float:
        """Ramped consistency weight at the current step."""
        p = self.params
        return p.consistency_weight * unsupervised_weight(self.step, p.warmup_steps, p.rampup_steps)

    def training_step(self, batch):
        p = self.params
        self.train_mode()
        x_l = batch["labelled"]
        w = self.consistency_weight()
        if w > 0:
            terms = self._consistency_step(x_l, batch["mask"], batch["unlabelled"])
            loss = p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"] + w * terms["consistency"]
        else:  # warm-up: supervised only
            with self.autocast():
                logits = self.nets["seg"](x_l)
            terms = self.supervised_loss(logits, batch["mask"])
            loss = p.dice_weight * terms["dice_loss"] + p.ce_weight * terms["ce"]
        self.optimise(loss, self.opts["seg"])
        decay = ema_decay(self.step + 1, p.ema_decay, warmup=p.ema_warmup)
        ema_update(self.nets["teacher"], self.nets["seg"], decay)
        return {k: v.item() for k, v in terms.items()}

    def _consistency_step(self, x_l, mask, x_u):
        p = self.params
        n_l = x_l.shape[0]
        tf = None
        x_s = x_u
        if p.transforms:
            tf = random_dihedral(x_u.shape[0], square=x_u.shape[-1] == x_u.shape[-2])
            x_s = tf.apply(x_u)
        with self.autocast():
            if x_s.shape[-2:] == x_l.shape[-2:]:
                logits = self.nets["seg"](torch.cat([x_l, x_s]))
                logits_l, logits_s = logits[:n_l], logits[n_l:]
            else:
                logits_l, logits_s = self.nets["seg"](x_l), self.nets["seg"](x_s)
            with torch.no_grad():
                logits_t = self.nets["teacher"](clamped_noise(x_u, p.noise_std, p.noise_clamp))
        terms = self.supervised_loss(logits_l, mask)
        p_s = torch.softmax(logits_s.float(), 1)
        if tf is not None:
            p_s = tf.invert(p_s)
        p_t = torch.softmax(logits_t.float(), 1)
        terms["consistency"] = F.mse_loss(p_s, p_t)
        return terms

    def predict(self, x):
        with self.eval_mode(), self.autocast():
            logits = self.nets["teacher"](x)
        return {"probabilities": torch.softmax(logits.float(), dim=1)}

    def uncertainty(self, x):
        """Teacher/student disagreement: total-variation distance of their probabilities,
        ``0.5 * sum_c |p_teacher - p_student|`` in [0, 1], shape (B, H, W)."""
        with self.eval_mode(), self.autocast():
            p_t = torch.softmax(self.nets["teacher"](x).float(), 1)
            p_s = torch.softmax(self.nets["seg"](x).float(), 1)
        return 0.5 * (p_t - p_s).abs().sum(1)
