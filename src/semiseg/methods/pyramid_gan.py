"""Pyramid of conditional generators, segmenters and discriminators (Li et al.)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch.nn import functional as F

from ..gan_losses import feature_matching_loss, lsgan_d_loss, lsgan_g_loss
from ..losses import dice_loss, one_hot
from ..nets.gan_blocks import MultiViewPatchDiscriminator, SinGANGenerator
from ..nets.unet import UNet
from .base import Method, MethodParams, register_method, set_requires_grad

__all__ = ["PyramidGAN", "PyramidGANParams"]


@dataclasses.dataclass
class PyramidGANParams(MethodParams):
    """Hyperparameters of :class:`PyramidGAN`.

    Attributes
    ----------
    lr : float
        Adam learning rate of the segmenters (5e-4 in the paper).
    lr_g, lr_d : float
        Learning rates of the generators (1e-4) and discriminators (5e-4).
    beta1, beta2 : float
        Adam betas (0.5, 0.999).
    features : tuple of int
        U-Net widths of each scale's segmenter (the paper uses a ~1M-parameter FC-DenseNet;
        the ``paper`` preset 16, 32, 64; CPU default 8, 16, 32: the finest segmenter runs on
        every crop, generated ones included, and cost most in the profile).
    num_scales : int
        Pyramid levels; each halves the side of the next finer one.
    phase_steps : int
        0 (default): the coarse-to-fine schedule follows the run's progress
        (:attr:`Method.progress`, its steps or minutes, whichever binds), so every run of any
        budget reaches the finest scale; a level once reached is kept when training continues.
        N > 0: the schedule spans N training steps (the finest scale keeps training after).
    phase_fractions : tuple of float
        Share of the schedule spent on each scale, coarsest first (one per scale;
        normalised to sum 1). A scale is frozen once its phase ends.
    synth_warmup : float
        Part of a scale's phase before synthetic pairs train its segmenter (the paper holds them
        back 100 of 300 epochs) and pseudo-labelled pairs become discriminator positives.
    gen_features, gen_blocks : int
        Width and conv-BN-LeakyReLU blocks of each generator (SinGAN: 32 and 4, the ``paper``
        preset; CPU default 16 and 3).
    disc_features, disc_layers, disc_views : int
        Width, stride-2 layers and resolutions (1, 1/2, 1/4, ...) of each discriminator
        (``paper`` preset 32, 3, 3; CPU default 16, 3, 2).
    noise_std : float
        Standard deviation of the noise injected at finer scales (1 at the coarsest).
    rec_weight, feat_weight, perc_weight : float
        alpha, beta, gamma of Eq. 8 (0.001, 10, 10): reconstruction, feature matching and
        "perceptual" terms. The perceptual term uses the discriminator's features, see
        :class:`PyramidGAN`.
    ce_weight : float
        alpha', cross-entropy weight on annotated pairs (1).
    dice_weight : float
        Soft Dice on annotated pairs; not in the paper (0 reproduces it), 1 matches the
        project's supervised baseline.
    seg_adv_weight : float
        Weight of the segmenter's adversarial term (1 in Eq. 8, the ``paper`` preset). CPU
        default 0.1: the discriminator has seen only annotated pairs (each with a tumour) as
        real, and at weight 1 it pulled a short run's segmenter towards tumour-like masks
        (issue 19: 0.796 against 0.868 on the phantom seed with the largest tumours).
    synth_ce_weight : float
        Cross-entropy weight of synthetic pairs after the warm-up (0.03).
    pseudo_positive_prob : float
        Chance that an unannotated image with its (argmax) pseudo-mask is shown to the
        discriminator as a positive pair after the warm-up (Algorithm 3).
    norm : str
        Segmenter normalisation.
    init_from_coarser : bool
        Start each level's networks from the weights of the level below when its phase begins
        (SinGAN's initialisation; the architectures are identical across levels).
    """

    lr: float = 5e-4
    lr_g: float = 1e-4
    lr_d: float = 5e-4
    beta1: float = 0.5
    beta2: float = 0.999
    features: tuple[int, ...] = (8, 16, 32)
    num_scales: int = 3
    phase_steps: int = 0
    phase_fractions: tuple[float, ...] = (0.25, 0.25, 0.5)
    synth_warmup: float = 1 / 3
    gen_features: int = 16
    gen_blocks: int = 3
    disc_features: int = 16
    disc_layers: int = 3
    disc_views: int = 2
    noise_std: float = 0.1
    rec_weight: float = 0.001
    feat_weight: float = 10.0
    perc_weight: float = 10.0
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    seg_adv_weight: float = 0.1
    synth_ce_weight: float = 0.03
    pseudo_positive_prob: float = 0.5
    norm: str = "instance"
    init_from_coarser: bool = True


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x if factor == 1 else F.avg_pool2d(x, factor)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against (B, K, H, W) class probabilities (soft masks of coarse scales)."""
    return F.cross_entropy(logits.float(), target.float())


@register_method
class PyramidGAN(Method):
    """Coarse-to-fine pyramid of (generator, segmenter, discriminator) triples.

    Level 0 is the coarsest (sides divided by ``2 ** (num_scales - 1)``), the last level works
    at full resolution. At each level:

    - the generator ``G`` maps (mask, noise + upsampled coarser image) to an image, adding a
      residual to the upsampled coarser image (Li et al. Eq. 1);
    - the segmenter ``S`` maps (image, upsampled coarser probabilities) to class logits (Eq. 5);
    - the discriminator ``D`` judges image-mask pairs at several resolutions (PatchGAN).

    Training follows Algorithm 3 inside the step-based engine: the method's step counter
    selects the level (phases are fractions of ``phase_steps``; the finest level continues
    after), coarser levels are frozen and only provide context. Per step ``D`` learns that
    annotated pairs (plus, after the warm-up, some unannotated images with their argmax
    pseudo-masks) are real and that generated pairs ``(G(y), y)`` and segmented pairs
    ``(x, S(x))`` of annotated and unannotated images are fake (least squares); ``G``
    minimises its adversarial loss plus reconstruction and feature-matching terms; ``S``
    minimises cross-entropy (+ Dice) on annotated pairs, its adversarial loss and, after the
    warm-up, a down-weighted cross-entropy on the synthetic pairs.

    The paper's perceptual loss uses an ImageNet VGG, whose weights cannot be downloaded
    here: the discriminator's features stand in, so the perceptual term equals the feature-
    matching term and the generator's feature loss carries the weight ``beta + gamma``.

    Sampling (:meth:`sample_tumours`) segments the given slices and generates ``n`` images
    from the predicted masks with seeded noise; :meth:`generate` does it for any mask.

    References
    ----------
    .. [1] W. Li, J. Li, J. Polson, Z. Wang, W. Speier, C. Arnold, "High resolution
       histopathology image generation and segmentation through adversarial training",
       Medical Image Analysis 75, 2022.
    .. [2] T. R. Shaham, T. Dekel, T. Michaeli, "SinGAN", ICCV 2019.
    .. [3] T.-C. Wang et al., "High-resolution image synthesis and semantic manipulation with
       conditional GANs", CVPR 2018.
    """

    name = "pyramid-gan"
    summary = "coarse-to-fine pyramid of generator/segmenter/discriminator; synthetic pairs"
    reference = "Li et al., Medical Image Analysis 2022"
    Params = PyramidGANParams
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 2.4
    can_sample = True
    #: SinGAN's 32-channel, 4-block generators and 3-view discriminators; the CPU defaults
    #: halve the widths, which cost most at the finest level (full-resolution convolutions).
    presets = {
        "cpu": {},
        "paper": {"features": (16, 32, 64), "gen_features": 32, "gen_blocks": 4, "disc_features": 32,
                  "disc_views": 3, "seg_adv_weight": 1.0},
    }

    # ------------------------------------------------------------------ construction
    def build(self) -> None:
        p = self.params
        if p.num_scales < 1:
            raise ValueError("num_scales must be >= 1")
        if len(p.phase_fractions) != p.num_scales or min(p.phase_fractions) <= 0:
            raise ValueError(
                f"phase_fractions needs {p.num_scales} positive values (one per scale, coarsest "
                f"first), got {p.phase_fractions}"
            )
        if p.phase_steps and p.phase_steps < p.num_scales:
            raise ValueError("phase_steps must be 0 (follow the run's progress) or at least num_scales")
        if not 0 <= p.synth_warmup <= 1 or not 0 <= p.pseudo_positive_prob <= 1:
            raise ValueError("synth_warmup and pseudo_positive_prob must lie in [0, 1]")
        if p.noise_std < 0:
            raise ValueError("noise_std must be >= 0")
        c, k = self.in_channels, self.num_classes
        for lv in range(p.num_scales):
            self.nets[f"gen{lv}"] = SinGANGenerator(c, k, features=p.gen_features, n_blocks=p.gen_blocks)
            self.nets[f"seg{lv}"] = UNet(c + k, k, features=p.features, norm=p.norm)
            self.nets[f"disc{lv}"] = MultiViewPatchDiscriminator(
                c + k, num_views=p.disc_views, features=p.disc_features, n_layers=p.disc_layers
            )
        total = sum(p.phase_fractions)
        #: Share of the run (progress) at which each level's phase ends, coarsest first.
        ends = list(itertools.accumulate(f / total for f in p.phase_fractions))
        self.phase_shares = (*ends[:-1], 1.0)
        #: Step at which each level's phase ends (a step schedule, ``phase_steps`` > 0), else None.
        self.phase_ends = None
        if p.phase_steps:
            self.phase_ends = tuple(
                [max(1, round(e * p.phase_steps)) for e in self.phase_shares[:-1]] + [p.phase_steps]
            )
        #: Finest level trained so far (progress schedule; saved, so a continued run keeps it).
        self.reached = 0

    def make_optimizers(self) -> None:
        p = self.params
        betas = (p.beta1, p.beta2)
        for lv in range(p.num_scales):
            self.opts[f"gen{lv}"] = torch.optim.Adam(self.nets[f"gen{lv}"].parameters(), lr=p.lr_g, betas=betas)
            self.opts[f"seg{lv}"] = torch.optim.Adam(self.nets[f"seg{lv}"].parameters(), lr=p.lr, betas=betas)
            self.opts[f"disc{lv}"] = torch.optim.Adam(self.nets[f"disc{lv}"].parameters(), lr=p.lr_d, betas=betas)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.params.num_scales - 1) * 2 ** (len(self.params.features) - 1)

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": batch_size}

    # ------------------------------------------------------------------ schedule
    def level_at(self, step: int) -> int:
        """Pyramid level of the step schedule at ``step`` (0 = coarsest); the finest after
        ``phase_steps``. Needs ``phase_steps`` > 0."""
        if self.phase_ends is None:
            raise ValueError("level_at needs a step schedule (phase_steps > 0); see level_for")
        for lv, end in enumerate(self.phase_ends):
            if step < end:
                return lv
        return self.params.num_scales - 1

    def level_for(self, progress: float) -> int:
        """Pyramid level of the progress schedule at ``progress`` in [0, 1]."""
        for lv, end in enumerate(self.phase_shares):
            if progress < end:
                return lv
        return self.params.num_scales - 1

    @property
    def level(self) -> int:
        """Level being trained now; prediction uses it (the finer ones are still untrained).
        Under the progress schedule it never goes back: a continued run (whose progress starts
        again at 0) keeps the finest level reached before."""
        if self.phase_ends is not None:
            return self.level_at(self.step)
        return max(self.reached, self.level_for(self.progress))

    def warmed_up(self, step: int | None = None) -> bool:
        """Whether synthetic and pseudo-labelled pairs are in use at ``step`` (step schedule)
        or now (progress schedule, ``step`` ignored): past the first ``synth_warmup`` of the
        level's phase, or in a level reached by an earlier run."""
        w = self.params.synth_warmup
        if self.phase_ends is None:
            lv, t = self.level, self.progress
            start = self.phase_shares[lv - 1] if lv else 0.0
            return t < start or t >= start + w * (self.phase_shares[lv] - start)
        step = self.step if step is None else step
        lv = self.level_at(step)
        start = self.phase_ends[lv - 1] if lv else 0
        length = self.phase_ends[lv] - start
        return step >= start + math.ceil(w * length)

    def extra_state(self):
        return {"reached": self.level}

    def load_extra_state(self, state):
        self.reached = int(state.get("reached", 0))

    def factor(self, level: int) -> int:
        """Downsampling factor of ``level`` relative to full resolution."""
        return 2 ** (self.params.num_scales - 1 - level)

    # ------------------------------------------------------------------ pyramid passes
    def _noise(self, level: int, shape, generator: torch.Generator | None) -> torch.Tensor:
        std = 1.0 if level == 0 else self.params.noise_std
        if generator is None:
            z = torch.randn(shape, device=self.device)
        else:
            z = torch.randn(shape, generator=generator).to(self.device)
        return z * std

    def segment(self, x: torch.Tensor, level: int, *, coarse_only: bool = False) -> torch.Tensor:
        """Run segmenters ``0..level`` on ``x`` given at ``level``'s resolution.

        Returns the logits of ``level`` (with autograd), or with ``coarse_only`` the upsampled
        probabilities of ``level - 1`` (zeros at level 0, no autograd) that condition it.
        """
        b, _, h, w = x.shape
        prev = x.new_zeros((b, self.num_classes, 1, 1))
        with torch.no_grad():
            for j in range(level):
                xj = _pool(x, 2 ** (level - j))
                logits = self.nets[f"seg{j}"](torch.cat([xj, _resize(prev, xj.shape[-2:]).to(xj.dtype)], 1))
                prev = torch.softmax(logits.float(), dim=1)
        ctx = _resize(prev, (h, w)).to(x.dtype)
        if coarse_only:
            return ctx
        return self.nets[f"seg{level}"](torch.cat([x, ctx], 1))

    def generate_at(self, mask: torch.Tensor, level: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images of ``level`` generated from ``(B, K, h, w)`` soft/one-hot masks at that
        resolution; generators below ``level`` run without autograd."""
        prev = None
        with torch.no_grad():
            for j in range(level):
                yj = _pool(mask, 2 ** (level - j))
                z = self._noise(j, (yj.shape[0], self.in_channels, *yj.shape[-2:]), generator).to(yj.dtype)
                up = None if prev is None else _resize(prev, yj.shape[-2:])
                prev = self.nets[f"gen{j}"](yj, z, up)
        up = None if prev is None else _resize(prev, mask.shape[-2:])
        z = self._noise(level, (mask.shape[0], self.in_channels, *mask.shape[-2:]), generator).to(mask.dtype)
        return self.nets[f"gen{level}"](mask, z, up)

    def _set_modes(self, level: int) -> None:
        for lv in range(self.params.num_scales):
            for kind in ("gen", "seg", "disc"):
                self.nets[f"{kind}{lv}"].train(lv == level)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """Crop the last two axes to multiples of :attr:`size_multiple`."""
        m = self.size_multiple
        h, w = x.shape[-2] - x.shape[-2] % m, x.shape[-1] - x.shape[-1] % m
        if h == 0 or w == 0:
            raise ValueError(
                f"training crops of {tuple(x.shape[-2:])} are smaller than the pyramid's size "
                f"multiple {m}; use larger crops or fewer scales/features"
            )
        return x[..., :h, :w]

    # ------------------------------------------------------------------ training
    def training_step(self, batch):
        p = self.params
        step = self.step
        lv = self.level
        warm = self.warmed_up(step)
        if self.phase_ends is not None:
            entering = range(lv, lv + 1) if lv and step == self.phase_ends[lv - 1] else range(0)
        else:  # every level passed over since the last step (a short run may skip one)
            entering = range(self.reached + 1, lv + 1)
        self.reached = max(self.reached, lv)
        for new in entering if p.init_from_coarser else ():
            for kind in ("gen", "seg", "disc"):
                self.nets[f"{kind}{new}"].load_state_dict(self.nets[f"{kind}{new - 1}"].state_dict())
        self._set_modes(lv)
        f = self.factor(lv)
        k = self.num_classes
        x_l = _pool(self._fit(batch["labelled"]), f)
        x_u = _pool(self._fit(batch["unlabelled"]), f)
        y_l = _pool(one_hot(self._fit(batch["mask"]), k).to(x_l.dtype), f)
        n = x_l.shape[0]
        disc = self.nets[f"disc{lv}"]

        with self.autocast():
            x_g = self.generate_at(y_l, lv)
            logits = self.segment(torch.cat([x_l, x_u]), lv)
        probs = torch.softmax(logits.float(), dim=1)
        p_u = probs[n:]

        # --- discriminator: annotated (+ pseudo-labelled) pairs real, G and S pairs fake
        real_x, real_y = [x_l], [y_l]
        if warm and p.pseudo_positive_prob > 0:
            pick = torch.rand(p_u.shape[0], device=self.device) < p.pseudo_positive_prob
            if pick.any():
                real_x.append(x_u[pick])
                real_y.append(one_hot(p_u[pick].argmax(1), k).to(x_l.dtype))
        real = torch.cat([torch.cat(real_x), torch.cat(real_y)], 1)
        fake = torch.cat(
            [
                torch.cat([x_g.detach().to(x_l.dtype), y_l], 1),
                torch.cat([torch.cat([x_l, x_u]), probs.detach().to(x_l.dtype)], 1),
            ]
        )
        with self.autocast():
            real_scores, _ = disc(real)
            fake_scores, _ = disc(fake)
        d_loss = lsgan_d_loss(real_scores, fake_scores)
        self.optimise(d_loss, self.opts[f"disc{lv}"])

        # --- generator and segmenter (disjoint parameters, one backward pass)
        set_requires_grad(disc, False)
        try:
            with self.autocast():
                g_scores, g_feats = disc(torch.cat([x_g, y_l.to(x_g.dtype)], 1))
                with torch.no_grad():
                    _, r_feats = disc(torch.cat([x_l, y_l], 1))
                s_scores, _ = disc(torch.cat([torch.cat([x_l, x_u]), probs.to(x_l.dtype)], 1))
            terms = {
                "d": d_loss,
                "g_adv": lsgan_g_loss(g_scores),
                "g_rec": F.mse_loss(x_g.float(), x_l.float()),
                "g_feat": feature_matching_loss(r_feats, g_feats),
                "s_ce": _soft_ce(logits[:n], y_l),
                "s_dice_loss": dice_loss(logits[:n], y_l),
                "s_adv": lsgan_g_loss(s_scores),
            }
            if warm and p.synth_ce_weight > 0:
                with self.autocast():
                    s_logits = self.segment(x_g.detach().to(x_l.dtype), lv)
                terms["s_synth"] = _soft_ce(s_logits, y_l)
            else:
                terms["s_synth"] = torch.zeros((), device=self.device)
            g_loss = (
                terms["g_adv"]
                + p.rec_weight * terms["g_rec"]
                + (p.feat_weight + p.perc_weight) * terms["g_feat"]
            )
            s_loss = (
                p.ce_weight * terms["s_ce"]
                + p.dice_weight * terms["s_dice_loss"]
                + p.seg_adv_weight * terms["s_adv"]
                + p.synth_ce_weight * terms["s_synth"]
            )
            opts = [self.opts[f"gen{lv}"], self.opts[f"seg{lv}"]]
            for o in opts:
                o.zero_grad(set_to_none=True)
            self._scaler.scale(g_loss + s_loss).backward()
            for o in opts:
                self._scaler.step(o)
            self._scaler.update()
        finally:
            set_requires_grad(disc, True)
        return {k_: v.item() for k_, v in terms.items()}

    # ------------------------------------------------------------------ inference
    def predict(self, x):
        lv = self.level
        f = self.factor(lv)
        with self.eval_mode(), self.autocast():
            logits = self.segment(_pool(x, f), lv)
        probs = torch.softmax(logits.float(), dim=1)
        return {"probabilities": _resize(probs, x.shape[-2:])}

    def generate(self, mask: torch.Tensor, n: int = 1, seed: int = 0) -> torch.Tensor:
        """Generate ``n`` images per mask with seeded noise.

        Parameters
        ----------
        mask : (B, H, W) integer Tensor or (B, K, H, W) class probabilities
            H and W multiples of ``2 ** (num_scales - 1)``.
        n : int
            Samples per mask (different noise).
        seed : int
            The same seed gives the same images.

        Returns
        -------
        (n, B, C, H, W) Tensor
            Normalised intensities, generated by the levels trained so far (upsampled to full
            size when the finest level has not been reached).
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        if mask.dim() == 3:
            mask = one_hot(mask.to(self.device), self.num_classes)
        mask = mask.to(self.device, torch.float32)
        lv = self.level
        gen = torch.Generator().manual_seed(int(seed))
        out = []
        with self.eval_mode(), self.autocast():
            y = _pool(mask, self.factor(lv))
            for _ in range(n):
                out.append(_resize(self.generate_at(y, lv, gen).float(), mask.shape[-2:]))
        return torch.stack(out)

    def sample_tumours(self, x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, B, C, H, W)`` images generated from the masks predicted for ``x``: the
        segmentation of each slice re-synthesised ``n`` times with seeded noise."""
        mask = self.predict(x)["probabilities"].argmax(1)
        return self.generate(mask, n, seed)
