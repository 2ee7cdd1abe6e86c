"""Semi-supervised segmentation via presence/absence image-to-image translation."""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ..errors import InputError
from ..gan_losses import hinge_d_loss, hinge_g_loss
from ..losses import dice_loss
from ..nets.discriminators import MultiScaleDiscriminator
from ..nets.translation import TranslationNet
from .base import Method, MethodParams, register_method, set_requires_grad

WEIGHTS = ("w_adv", "w_rec", "w_lat", "w_cyc", "w_seg", "w_sparse")


@dataclasses.dataclass
class TranslationParams(MethodParams):
    """Hyperparameters of :class:`Translation` (paper values unless noted).

    Attributes
    ----------
    lr : float
        Learning rate of both optimisers (AMSGrad), 1e-4 in the paper (the ``paper`` preset);
        the CPU default 1e-3 (the supervised baseline's) for runs of minutes.
    beta1, beta2 : float
        AMSGrad betas, (0.5, 0.999).
    features : tuple of int
        Encoder/decoder channels per level (paper: 16..512 with a 512-channel latent, the
        ``paper`` preset; the CPU default 8..64). The last entry is the latent width.
    unique_channels : int
        Latent channels forming the unique code ``u`` (paper: 128 of 512; here a quarter).
    disc_features : tuple of int
        Channels of each patch discriminator (paper 64..512; CPU default 8..32).
    disc_scales : int
        Scales of the multi-scale discriminators (paper 3; CPU default 2).
    disc_norm : str
        Normalisation inside the discriminators: ``none`` (default), ``instance``, ``layer``.
    w_adv, w_rec, w_lat, w_cyc, w_seg : float
        Relative loss weights; they are normalised to sum to 1 as in the paper. The paper uses
        adv 3, rec 50, lat 1, cyc 50 and seg 0.01 with 1 % of slices annotated (10, 100, 1000
        with 10 %, 20 %, 100 %). The CPU default adv weight is 15 (the ``paper`` preset 3):
        with ``w_sparse`` and adv 3 the residual faded inside the tumours too by 5 CPU-minutes
        (phantom, K = 5: mean |residual| 3.9 inside, ratio 2.50 seed 0, 1.57 seed 1); adv 15,
        which pushes the tumour out of the healthy image, kept it (16.8 and 14.5; ratio 5.42
        and 2.30; Dice 0.927 vs 0.924, 0.940 vs 0.938; issue 19). The default seg weight of 100 (half of the total) keeps the
        segmentation of the warm start while the translation losses switch on: with 10 a
        one-CPU-minute run lost it entirely (Dice 0.0, docs/benchmarks.md, issue 19).
    residual_kernel : int
        Kernel side of the residual decoder (paper 5; the CPU default 3).
    spectral : bool
        Spectral normalisation on the generator's convolutions (paper: on, the ``paper``
        preset). Off by default: with it, the segmentation path learnt nothing in half a
        CPU-minute of supervised training (Dice 0.00 vs 0.83 without, docs/benchmarks.md,
        issue 19). The discriminators keep it.
    warmup : float
        Share of the run (:attr:`Method.progress`: of its steps or minutes, whichever binds)
        spent on the supervised objective alone, training the encoder and the segmentation
        path (not in the paper, which trains every objective from the first step; 0 does the
        same). The translation losses then start from an encoder that already separates the
        lesion, instead of a segmentation that is noise for most of a short run.
    ramp : float
        Share of the run after ``warmup`` over which the translation losses' weights rise
        linearly from 0 to their values (0: switched on at once).
    seg_ce : float
        Weight of a cross-entropy term beside the soft Dice of the supervised objective (the
        project's supervised baseline uses both; 0 is the paper's Dice alone).
    w_sparse : float
        Weight of a residual-locality term (a departure from the paper, issue 19; 0 is the
        paper, the ``paper`` preset): the L1 norm of the residual ``res_PA`` of each diseased
        crop outside its tumour, i.e. weighted by ``1 - tumour`` where ``tumour`` is the
        painted mask dilated by ``sparse_margin`` pixels on annotated crops, else the model's
        own detached tumour probability (max-pooled over the same margin). In the paper the
        residual must only reconstruct ``x_P`` from ``x_PA``; in runs of minutes the common
        decoder's image is blurred and shifted, so the residual carried that global change
        and showed the organ as much as the tumour. Normalised with the other weights. The
        default 50 (the weight of ``rec``, whose image it localises) came from pilots on the
        phantom, K = 5, seed 0 (issue 19, docs/methods.md): at 2 CPU-minutes the tumour /
        surrounding-organ ratio of mean |residual| rose from 1.27 (0) to 5.40 (50), 3.64
        (20) and 7.18 (100), all with ``sparse_healthy``; Dice 0.914, 0.915, 0.913, 0.915.
        Like the translation losses it waits for ``warmup`` and rises over ``ramp``.
    sparse_margin : int
        Pixels by which the tumour (mask or probability) is dilated before ``w_sparse``
        penalises the residual outside it, so the blurred tumour border is not penalised.
    sparse_healthy : bool
        With ``w_sparse``, also penalise the L1 norm of the residual decoded from each
        healthy crop's own codes ``g_res(c_A, u_A)`` (a healthy image needs no change; one
        more residual-decoder pass per step). On by default: at 2 CPU-minutes with
        ``w_sparse`` 50 it raised the ratio from 3.19 to 5.40 (Dice 0.911 -> 0.915).
    batch_split : bool
        A step sees ``batch_size / 2`` diseased and as many healthy crops, so it costs about
        what the other methods' ``batch_size`` crops cost (CPU default). False: ``batch_size``
        of each, the paper's batches.

    The supervised objective is computed on crops of the annotated slices (painted ones and,
    as background, healthy-tagged ones: the supervised baseline's crops), not only on the
    diseased crops that happen to carry a mask as in the paper.
    """

    lr: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    features: tuple[int, ...] = (8, 16, 32, 64)
    unique_channels: int = 16
    residual_kernel: int = 3
    spectral: bool = False
    disc_features: tuple[int, ...] = (8, 16, 32)
    disc_scales: int = 2
    disc_norm: str = "none"
    w_adv: float = 15.0
    w_rec: float = 50.0
    w_lat: float = 1.0
    w_cyc: float = 50.0
    w_seg: float = 100.0
    warmup: float = 0.4
    ramp: float = 0.2
    seg_ce: float = 1.0
    w_sparse: float = 50.0
    sparse_margin: int = 2
    sparse_healthy: bool = True
    batch_split: bool = True


@register_method
class Translation(Method):
    """Segmentation through presence <-> absence translation with a shared residual decoder.

    An encoder splits each slice's latent code into a *common* code ``c`` and a *unique* code
    ``u``; the common decoder draws the healthy image from ``c``, the residual decoder the
    additive change (the tumour) from ``(c, u)``, and the residual decoder, with its own
    normalisation parameters and a 1x1 classifier, also segments. Trained on diseased slices
    (some with masks) and healthy slices from the weak tags, with soft Dice, L1 image and
    latent reconstruction, APA cycle consistency and hinge adversarial losses (multi-scale
    patch discriminators, spectral norm everywhere).

    Each batch holds ``N`` diseased and ``N`` healthy crops. A step is one generator forward,
    a discriminator step on the detached translations, then the generator step.

    Raises
    ------
    InputError
        At the first training step when no slice is tagged healthy (the absence domain is
        required) or none is diseased.

    References
    ----------
    .. [1] E. Vorontsov, P. Molchanov, C. Beckham, J. Kautz, S. Kadoury, "Towards
       annotation-efficient segmentation via image-to-image translation", IEEE Transactions on
       Medical Imaging 41(12), 2022 (arXiv:1904.01636).
    """

    name = "translation"
    summary = "presence<->absence translation with a residual decoder shared by segmentation (needs healthy tags)"
    reference = "Vorontsov et al., IEEE TMI 2022"
    Params = TranslationParams
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 2.2
    outputs = {"healthy": "image", "residual": "difference"}
    can_sample = True
    uses_tags = True
    needs_healthy = True
    presets = {
        "cpu": {},
        # Table I of the paper: 16..512 channels (5 halvings), 128 unique channels, 5x5 residual
        # kernels, 64..512-channel discriminators at 3 scales, AMSGrad at 1e-4, N + N batches.
        "paper": {
            "features": (16, 32, 64, 128, 256, 512), "unique_channels": 128, "residual_kernel": 5,
            "disc_features": (64, 128, 256, 512), "disc_scales": 3, "lr": 1e-4, "batch_split": False,
            "w_seg": 10.0, "spectral": True, "w_adv": 3.0, "w_sparse": 0.0, "sparse_healthy": False,
        },
    }

    def build(self) -> None:
        p = self.params
        if not (0 <= p.warmup <= 1 and 0 <= p.ramp <= 1):
            raise ValueError("warmup and ramp are shares of the run: they must lie in [0, 1]")
        for w in WEIGHTS:
            if getattr(p, w) < 0:
                raise ValueError(f"{w} must be >= 0")
        if sum(getattr(p, w) for w in WEIGHTS) <= 0:
            raise ValueError("at least one loss weight must be positive")
        if p.sparse_margin < 0:
            raise ValueError("sparse_margin must be >= 0")
        self.nets["gen"] = TranslationNet(
            self.in_channels, self.num_classes, features=p.features, unique_channels=p.unique_channels,
            spectral=p.spectral, residual_kernel=p.residual_kernel,
        )
        for d in ("disc_a", "disc_p"):
            self.nets[d] = MultiScaleDiscriminator(
                self.in_channels, features=p.disc_features, scales=p.disc_scales, norm=p.disc_norm
            )

    def make_optimizers(self) -> None:
        p = self.params
        kw = {"lr": p.lr, "betas": (p.beta1, p.beta2), "amsgrad": True}
        self.opts["gen"] = torch.optim.Adam(self.nets["gen"].parameters(), **kw)
        disc = [q for d in ("disc_a", "disc_p") for q in self.nets[d].parameters()]
        self.opts["disc"] = torch.optim.Adam(disc, **kw)

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        n = max(1, batch_size // 2) if self.params.batch_split else batch_size
        return {"labelled": batch_size, "diseased": n, "healthy": n}

    # ------------------------------------------------------------------ training
    def translation_share(self, progress: float | None = None) -> float:
        """Factor in [0, 1] on the translation losses' weights at ``progress`` (default: now):
        0 during the supervised warm-up, then rising linearly over ``ramp``."""
        p = self.params
        t = self.progress if progress is None else progress
        if t < p.warmup:
            return 0.0
        return 1.0 if p.ramp <= 0 else min(1.0, (t - p.warmup) / p.ramp)

    def _weights(self, share: float = 1.0) -> dict[str, float]:
        """Loss weights normalised to sum to 1 (the paper's relative weights) at full
        translation ``share``; a smaller share scales the translation terms down."""
        p = self.params
        w = {"adv": p.w_adv, "rec": p.w_rec, "lat": p.w_lat, "cyc": p.w_cyc, "seg": p.w_seg, "sparse": p.w_sparse}
        total = sum(w.values())
        return {k: v / total * (1.0 if k == "seg" else share) for k, v in w.items()}

    def forward_all(
        self, x_a: torch.Tensor, x_p: torch.Tensor, has_mask: torch.Tensor | None = None, *,
        tumour_prob: bool = False, healthy_residual: bool = False,
    ):
        """Every image and code of one training step (Eqs. 1-5 and 9 of the paper).

        Returns a dict of tensors: images ``x_AA, x_PA, res_PA, x_PP, x_AP, x_APA``, codes
        ``c_A, u_A, c_P, u_P, u`` (prior sample), ``c_AP, u_AP, c_PA, c_AA, c_PP, u_PP`` and
        ``logits`` (segmentation of the diseased crops flagged in ``has_mask``, or None).
        With ``tumour_prob``, ``p_P``: the detached ``(B, H, W)`` probability that a pixel of
        ``x_P`` is not background; with ``healthy_residual``, ``res_AA = g_res(c_A, u_A)``
        (both for the ``w_sparse`` term, otherwise None).
        """
        g = self.nets["gen"]
        c_a, u_a, sk_a = g.encode(x_a)
        c_p, u_p, sk_p = g.encode(x_p)
        x_aa = g.decode_common(c_a, sk_a)
        x_pa = g.decode_common(c_p, sk_p)
        res_pa = g.decode_residual(c_p, u_p, sk_p)
        x_pp = x_pa + res_pa
        u = g.sample_unique(u_a)
        x_ap = x_aa + g.decode_residual(c_a, u, sk_a)
        c_ap, u_ap, sk_ap = g.encode(x_ap)
        x_apa = g.decode_common(c_ap, sk_ap)
        c_pa, _, _ = g.encode(x_pa)
        c_aa, _, _ = g.encode(x_aa)
        c_pp, u_pp, _ = g.encode(x_pp)
        p_p = res_aa = None
        if tumour_prob:
            with torch.no_grad():
                seg = g.segment_codes(c_p, u_p, sk_p)
                p_p = 1.0 - torch.softmax(seg.float(), dim=1)[:, 0]
        if healthy_residual:
            res_aa = g.decode_residual(c_a, u_a, sk_a)
        logits = None
        if has_mask is not None and bool(has_mask.any()):
            idx = torch.nonzero(has_mask, as_tuple=True)[0]
            logits = g.segment_codes(c_p[idx], u_p[idx], [s[idx] for s in sk_p])
        return {
            "x_AA": x_aa, "x_PA": x_pa, "res_PA": res_pa, "x_PP": x_pp, "x_AP": x_ap,
            "x_APA": x_apa, "c_A": c_a, "u_A": u_a, "c_P": c_p, "u_P": u_p, "u": u,
            "c_AP": c_ap, "u_AP": u_ap, "c_PA": c_pa, "c_AA": c_aa, "c_PP": c_pp, "u_PP": u_pp,
            "logits": logits, "p_P": p_p, "res_AA": res_aa,
        }

    def sparsity_loss(self, residual: torch.Tensor, tumour: torch.Tensor) -> torch.Tensor:
        """Mean ``|residual|`` outside ``tumour`` (the ``w_sparse`` term, not in the paper).

        Parameters
        ----------
        residual : (B, C, H, W) Tensor
            Residual images ``res_PA``.
        tumour : (B, H, W) Tensor
            Tumour mask or probability in [0, 1]; dilated by ``sparse_margin`` pixels (a max
            filter), then each pixel's ``|residual|`` is weighted by ``1 - tumour``.
        """
        m = int(self.params.sparse_margin)
        t = tumour.float()[:, None]
        if m > 0:
            t = F.max_pool2d(t, 2 * m + 1, stride=1, padding=m)
        return (residual.float().abs() * (1.0 - t.clamp(0.0, 1.0))).mean()

    def _tumour_map(self, batch, p_p: torch.Tensor) -> torch.Tensor:
        """Painted masks of the annotated diseased crops, the model's probability elsewhere."""
        has = batch.get("diseased_has_mask")
        if has is None or batch.get("diseased_mask") is None or not bool(has.any()):
            return p_p
        painted = (batch["diseased_mask"] > 0).to(p_p.dtype)
        return torch.where(has.bool()[:, None, None], painted, p_p)

    def supervised_loss(self, x: torch.Tensor, mask: torch.Tensor, logits=None) -> torch.Tensor:
        """Soft Dice (+ ``seg_ce`` cross-entropy) of the segmentation path on ``x``."""
        if logits is None:
            with self.autocast(), parametrize.cached():
                logits = self.nets["gen"](x)
        loss = dice_loss(logits, mask)
        if self.params.seg_ce:
            loss = loss + self.params.seg_ce * F.cross_entropy(logits.float(), mask.long())
        return loss

    def _seg_batch(self, batch):
        """Annotated crops and their masks: the ``labelled`` pool (painted and healthy-tagged
        slices), else the diseased crops that carry a mask; None when there are none."""
        if batch.get("labelled") is not None:
            return batch["labelled"], batch["mask"]
        has_mask = batch.get("diseased_has_mask")
        if has_mask is None or not bool(has_mask.any()):
            return None
        keep = has_mask.bool()
        return batch["diseased"][keep], batch["diseased_mask"][keep]

    def training_step(self, batch):
        # Checked at the first step, warm-up or not: a missing domain must not surface only
        # when the translation losses switch on, a share of the run later.
        if batch.get("healthy") is None:
            raise InputError(
                "the translation method needs slices tagged healthy (absence domain): tag some "
                "tumour-free slices as healthy (weak tags), or choose another method"
            )
        if batch.get("diseased") is None:
            raise InputError("the translation method needs diseased slices: paint or tag some")
        seg_batch = self._seg_batch(batch)
        share = self.translation_share()
        self.train_mode()
        if self.warming_up(self.params.warmup):  # encoder and segmentation path only
            if seg_batch is None:
                raise InputError("the translation method's warm-up needs annotated slices: paint some")
            seg = self.supervised_loss(*seg_batch)
            self.optimise(seg, self.opts["gen"])
            return {"seg": seg.item()}
        x_a, x_p = batch["healthy"], batch["diseased"]
        w = self._weights(share)
        d_a, d_p = self.nets["disc_a"], self.nets["disc_p"]

        # cached(): each spectrally normalised weight is computed (one power iteration) once
        # per pass instead of at every call; the encoder alone runs six times per step.
        with self.autocast(), parametrize.cached():
            sparse = self.params.w_sparse > 0
            o = self.forward_all(
                x_a, x_p, tumour_prob=sparse, healthy_residual=sparse and self.params.sparse_healthy
            )

        # Discriminator step on detached translations: A: real x_A vs x_PA, P: real x_P vs x_AP.
        set_requires_grad((d_a, d_p), True)
        with self.autocast(), parametrize.cached():
            loss_d = hinge_d_loss(d_a(x_a), d_a(o["x_PA"].detach())) + hinge_d_loss(
                d_p(x_p), d_p(o["x_AP"].detach())
            )
        self.optimise(loss_d, self.opts["disc"])

        # Generator step.
        set_requires_grad((d_a, d_p), False)
        with self.autocast(), parametrize.cached():
            adv = hinge_g_loss(d_a(o["x_PA"])) + hinge_g_loss(d_p(o["x_AP"]))
        l1 = F.l1_loss
        f = {k: v.float() for k, v in o.items() if v is not None}
        rec = l1(f["x_PP"], x_p) + l1(f["x_AA"], x_a)
        lat = (
            l1(f["c_AP"], f["c_A"]) + l1(f["c_PA"], f["c_P"]) + l1(f["c_AA"], f["c_A"])
            + l1(f["c_PP"], f["c_P"]) + l1(f["u_PP"], f["u_P"]) + l1(f["u_AP"], f["u"])
        )
        cyc = l1(f["x_APA"], x_a)
        if seg_batch is not None:
            with parametrize.cached():
                seg = self.supervised_loss(*seg_batch)
        else:
            seg = torch.zeros((), device=x_p.device)
        loss_g = w["adv"] * adv + w["rec"] * rec + w["lat"] * lat + w["cyc"] * cyc + w["seg"] * seg
        logs = {}
        if sparse:
            sp = self.sparsity_loss(f["res_PA"], self._tumour_map(batch, o["p_P"]))
            if o["res_AA"] is not None:
                sp = sp + f["res_AA"].abs().mean()
            loss_g = loss_g + w["sparse"] * sp
            logs["sparse"] = sp.item()
        self.optimise(loss_g, self.opts["gen"])
        set_requires_grad((d_a, d_p), True)
        return {
            "seg": seg.item(), "rec": rec.item(), "lat": lat.item(), "cyc": cyc.item(),
            "adv_g": adv.item(), "adv_d": loss_d.item(), **logs,
        }

    # ------------------------------------------------------------------ inference
    def predict(self, x):
        with self.eval_mode(), self.autocast():
            out = self.nets["gen"].translate(x)
        return {
            "probabilities": out["probabilities"].float(),
            "healthy": out["healthy"].float(),
            "residual": out["residual"].float(),
        }

    def sample_tumours(self, x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, B, C, H, W)`` absence->presence translations of ``x`` with ``u ~ N(0, I)``.

        The same ``seed`` gives the same samples; each of the ``n`` samples uses its own ``u``.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        g = self.nets["gen"]
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        out = []
        with self.eval_mode(), self.autocast(), parametrize.cached():
            c, u_enc, skips = g.encode(x)
            healthy = g.decode_common(c, skips)
            for _ in range(n):
                u = g.sample_unique(u_enc, gen)
                out.append((healthy + g.decode_residual(c, u, skips)).float())
        return torch.stack(out)
