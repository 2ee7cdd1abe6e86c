"""Mean teacher: consistency between a student and its weight-averaged teacher."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.nn import functional as F

from ..consistency import (
    check_shares,
    clamped_noise,
    ema_decay_for_run,
    ema_update,
    progress_weight,
    random_dihedral,
    unlabelled_count,
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
    ema_horizon : float
        The teacher averages over at most about this share of the run (its decay is capped at
        ``1 - 1 / (ema_horizon * N)`` for a run of ``N`` steps, :func:`ema_decay_for_run`), so
        under a short budget it does not lag the student; 0 keeps the fixed ``ema_decay``.
    consistency_weight : float
        Final weight of the MSE between student and teacher probabilities.
    warmup : float
        Share of the run (:attr:`~semiseg.methods.base.Method.progress`) trained on the
        supervised loss alone before the consistency term starts (the teacher is still
        averaged during it).
    rampup : float
        Share of the run over which the consistency weight ramps up (sigmoid) after the
        warm-up (0: constant).
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

    Vorontsov et al.'s variant: ``ema_decay=0.99 ema_warmup=false ema_horizon=0
    consistency_weight=0.01 warmup=0 rampup=0``; Peng et al.'s: ``ema_decay=0.999``.
    """

    ema_decay: float = 0.99
    ema_warmup: bool = True
    ema_horizon: float = 0.1
    consistency_weight: float = 1.0
    warmup: float = 0.5
    rampup: float = 0.2
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
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 1.9
    semi_supervised = True
    retired_params = {
        "warmup_steps": "use warmup, a share of the run (0.3: the first 30 %)",
        "rampup_steps": "use rampup, a share of the run",
    }

    def build(self) -> None:
        p = self.params
        if not 0 <= p.ema_decay <= 1:
            raise ValueError("ema_decay must be in [0, 1]")
        if min(p.consistency_weight, p.noise_std) < 0:
            raise ValueError("consistency_weight and noise_std must be >= 0")
        check_shares(warmup=p.warmup, rampup=p.rampup, ema_horizon=p.ema_horizon)
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
        """Ramped consistency weight at the run's current :attr:`progress`."""
        p = self.params
        return p.consistency_weight * progress_weight(self.progress, p.warmup, p.rampup)

    def teacher_decay(self) -> float:
        """EMA decay of the teacher update after this step (:func:`ema_decay_for_run`)."""
        p = self.params
        return ema_decay_for_run(self.step + 1, self.progress, p.ema_decay, warmup=p.ema_warmup,
                                 horizon=p.ema_horizon)

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
        ema_update(self.nets["teacher"], self.nets["seg"], self.teacher_decay())
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
            with torch.no_grad():  # the target: no graph is kept for it
                logits_t = self.nets["teacher"](clamped_noise(x_u, p.noise_std, p.noise_clamp))
        terms = self.supervised_loss(logits_l, mask)
        p_s = torch.softmax(logits_s.float(), 1)
        if tf is not None:
            p_s = tf.invert(p_s)
        p_t = torch.softmax(logits_t.float(), 1)
        terms["consistency"] = F.mse_loss(p_s, p_t)
        return terms

    def start_from(self, seg_state):
        """Student and teacher both start from the given segmentation weights."""
        super().start_from(seg_state)
        self.nets["teacher"].load_state_dict(seg_state)

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
