"""Semi-supervised segmentation with an image <-> mask CycleGAN (Mondal et al.)."""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from ..consistency import check_shares
from ..gan_losses import image_cycle_loss, lsgan_d_loss, lsgan_g_loss, mask_cycle_loss
from ..losses import dice_loss, one_hot
from ..nets.gan_blocks import PixelDiscriminator, ResnetGenerator
from ..nets.unet import UNet
from .base import Method, MethodParams, register_method, set_requires_grad

__all__ = ["CycleGAN", "CycleGANParams", "HistoryPool"]


@dataclasses.dataclass
class CycleGANParams(MethodParams):
    """Hyperparameters of :class:`CycleGAN`.

    Attributes
    ----------
    lr, beta1, beta2 : float
        Adam settings of generators and discriminators (2e-4, 0.5, 0.999 in the paper).
    features : tuple of int
        Image generator widths: stem, then after each stride-2 downsampling (paper: 64, 128,
        256, the ``paper`` preset; CPU default 8, 16, 32); also the segmenter's when
        ``segmenter`` is ``resnet``.
    segmenter : str
        Network of ``G_IS``: ``unet`` (CPU default: the project's U-Net, as ``supervised``, of
        widths ``seg_features``) or ``resnet`` (the paper: the same ResNet generator as
        ``G_SI``, ``paper`` preset). Mondal et al. (Sec. 5) chose one network for both "to
        achieve a better learning equilibrium" and suggest different ones could do better; at
        CPU budgets the ResNet segmenter learns too slowly (Dice 0.46 after 5 CPU-minutes on
        the phantom where ``supervised`` reaches 0.94; benchmarks.md, issue 19).
    seg_features : tuple of int
        U-Net widths of the ``unet`` segmenter (CPU default 8..64, half of ``supervised``'s:
        it segments three times the batch per step, annotated, unannotated and generated
        images).
    seg_lr, seg_beta1 : float
        Adam learning rate and beta1 of the segmenter (the paper: ``lr`` and ``beta1``; CPU
        default 1e-3 and 0.9, those of ``supervised``).
    warmup : float
        Share of the run (:attr:`~semiseg.methods.base.Method.progress`) in which only the
        supervised terms train (segmenter: CE + Dice; image generator: ``gen_l2``), so the
        cycle and adversarial terms refine a segmenter that already segments (0 in the paper).
    n_blocks : int
        Residual blocks of each generator (paper: 9; CPU default 3).
    disc_features : int
        Channels of the first discriminator block (paper: 64; CPU default 16).
    norm : str
        Generator normalisation (instance normalisation in the paper).
    lambda_gen_image : float
        lambda_1, weight of the L2 loss between ``G_SI(y)`` and its paired image.
    lambda_cycle_mask : float
        lambda_2, weight of the cross-entropy mask cycle ``H(y, G_IS(G_SI(y)))``.
    lambda_cycle_image : float
        lambda_3, weight of the L1 image cycle ``|G_SI(G_IS(x')) - x'|``.
    lambda_adv_mask, lambda_adv_image : float
        lambda_4, lambda_5, weights of the least-squares adversarial terms of the generators
        (1 and 1 in the paper, the ``paper`` preset). CPU default ``lambda_adv_mask`` 0.1:
        at CPU budgets the mask discriminator, which has seen only painted masks, drives the
        segmenter to draw tumour-like blobs on unannotated slices (Dice 0.63 / 0.78 against
        0.91 / 0.89 with 0.1, phantom seeds 0 / 1 at 5 CPU-minutes; benchmarks.md, issue 19).
    ce_weight : float
        Weight of the supervised cross-entropy (Eq. 1; 1 in the paper).
    dice_weight : float
        Weight of a soft Dice term on annotated pairs. Not in the paper (0 reproduces it); the
        default 1 matches the project's supervised baseline so comparisons isolate the
        unsupervised terms, and it copes with small foreground fractions.
    pool_size : int
        Generated masks and images remembered for the discriminators (CycleGAN's history
        pools, 50); 0 disables them.
    """

    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    features: tuple[int, ...] = (8, 16, 32)
    segmenter: str = "unet"
    seg_features: tuple[int, ...] = (8, 16, 32, 64)
    seg_lr: float = 1e-3
    seg_beta1: float = 0.9
    warmup: float = 0.3
    n_blocks: int = 3
    disc_features: int = 16
    norm: str = "instance"
    lambda_gen_image: float = 1.0
    lambda_cycle_mask: float = 0.05
    lambda_cycle_image: float = 1.0
    lambda_adv_mask: float = 0.1
    lambda_adv_image: float = 1.0
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    pool_size: int = 50


class HistoryPool:
    """Buffer of past generated samples shown to a discriminator (Shrivastava et al., CycleGAN).

    Each queried sample is stored while the pool fills up; once full, each is swapped with a
    random stored one with probability 1/2 (the stored one is returned instead). Randomness
    comes from torch's global generator, which the engine seeds.

    The pool is a training buffer, deliberately left out of model files: a resumed run refills
    it within ``size`` samples.
    """

    def __init__(self, size: int):
        if size < 0:
            raise ValueError("pool size must be >= 0")
        self.size = int(size)
        self.items: torch.Tensor | None = None
        self.count = 0

    def query(self, samples: torch.Tensor) -> torch.Tensor:
        """Return a batch like ``samples`` (detached), mixing in remembered samples."""
        samples = samples.detach()
        if self.size == 0:
            return samples
        if self.items is None or self.items.shape[1:] != samples.shape[1:] or self.items.dtype != samples.dtype:
            self.items = samples.new_empty((self.size, *samples.shape[1:]))
            self.count = 0
        out = []
        for s in samples:
            if self.count < self.size:
                self.items[self.count] = s
                self.count += 1
                out.append(s)
            elif torch.rand(()) < 0.5:
                j = int(torch.randint(self.size, ()))
                out.append(self.items[j].clone())
                self.items[j] = s
            else:
                out.append(s)
        return torch.stack(out)


@register_method
class CycleGAN(Method):
    """Image <-> mask CycleGAN whose image->mask generator is the segmenter.

    Four networks train together: the segmenter ``G_IS`` (image -> softmax mask), the image
    generator ``G_SI`` (mask -> tanh image), a pixel-wise mask discriminator ``D_S`` and a
    pixel-wise image discriminator ``D_I``. Per step, with annotated pairs ``(x, y)`` (drawn
    with replacement, so they are oversampled to match the unannotated stream) and
    unannotated images ``x'``, the generators minimise

    ``CE(y, G_IS(x)) [+ Dice] + l1 |G_SI(y) - x|^2 + l2 CE(y, G_IS(G_SI(y)))
    + l3 |G_SI(G_IS(x')) - x'|_1 + l4 (D_S(G_IS(x')) - 1)^2 + l5 (D_I(G_SI(y)) - 1)^2``

    and the discriminators minimise the least-squares losses ``(D_S(y) - 1)^2 + D_S(G_IS(x'))^2``
    and ``(D_I(x') - 1)^2 + D_I(G_SI(y))^2`` on history-pooled generated samples.

    ``D_S`` sees the segmenter's softmax probabilities (and one-hot real masks), so its
    adversarial gradient reaches the segmenter; the authors' released code fed it an argmax,
    which has no gradient.

    References
    ----------
    .. [1] A. K. Mondal, J. Dolz, C. Desrosiers, "Revisiting CycleGAN for semi-supervised
       segmentation", arXiv:1908.11569, 2019.
    .. [2] J.-Y. Zhu et al., "Unpaired image-to-image translation using cycle-consistent
       adversarial networks", ICCV 2017.
    """

    name = "cyclegan"
    summary = "image<->mask CycleGAN: supervised, cycle and least-squares adversarial losses"
    reference = "Mondal et al., arXiv:1908.11569, 2019"
    Params = CycleGANParams
    #: Step CPU time / supervised's at the same crop (crop 96, one thread, idle VM, 2026-12-07;
    #: benchmarks.md, issue 19).
    step_cost = 3.0
    #: The paper's generators (Johnson et al.'s ResNet: 64-128-256, 9 blocks, also as the
    #: segmenter, trained with the generators' Adam from step 0) and 64-channel discriminators;
    #: the CPU defaults are an 8-16-32 image generator with 3 blocks (~18x fewer operations)
    #: and a U-Net segmenter warmed up on the supervised loss.
    presets = {
        "cpu": {},
        "paper": {
            "features": (64, 128, 256),
            "n_blocks": 9,
            "disc_features": 64,
            "segmenter": "resnet",
            "seg_lr": 2e-4,
            "seg_beta1": 0.5,
            "warmup": 0.0,
            "lambda_adv_mask": 1.0,
        },
    }
    #: What model files written before these parameters existed meant by their absence.
    legacy_params = {"segmenter": "resnet", "seg_lr": 2e-4, "seg_beta1": 0.5, "warmup": 0.0}

    def build(self) -> None:
        p = self.params
        if p.pool_size < 0:
            raise ValueError("pool_size must be >= 0")
        if p.segmenter not in ("unet", "resnet"):
            raise ValueError(f"segmenter must be 'unet' or 'resnet', got {p.segmenter!r}")
        if p.seg_lr <= 0 or not 0 <= p.seg_beta1 < 1:
            raise ValueError("seg_lr must be > 0 and seg_beta1 in [0, 1)")
        check_shares(warmup=p.warmup)
        c, k = self.in_channels, self.num_classes
        if p.segmenter == "unet":
            self.nets["seg"] = UNet(c, k, features=p.seg_features, norm=p.norm)
        else:
            self.nets["seg"] = ResnetGenerator(c, k, features=p.features, n_blocks=p.n_blocks, norm=p.norm)
        self.nets["gen"] = ResnetGenerator(
            k, c, features=p.features, n_blocks=p.n_blocks, norm=p.norm, out_activation="tanh"
        )
        self.nets["disc_mask"] = PixelDiscriminator(k, features=p.disc_features)
        self.nets["disc_image"] = PixelDiscriminator(c, features=p.disc_features)
        self.mask_pool = HistoryPool(p.pool_size)
        self.image_pool = HistoryPool(p.pool_size)

    def make_optimizers(self) -> None:
        p = self.params
        betas = (p.beta1, p.beta2)
        discs = [*self.nets["disc_mask"].parameters(), *self.nets["disc_image"].parameters()]
        # One Adam over both generators, with the segmenter's own group (rate and beta1 are
        # per group in torch), so the paper preset is exactly the paper's single optimiser.
        groups = [
            {"params": list(self.nets["seg"].parameters()), "lr": p.seg_lr, "betas": (p.seg_beta1, p.beta2)},
            {"params": list(self.nets["gen"].parameters())},
        ]
        self.opts["gen"] = torch.optim.Adam(groups, lr=p.lr, betas=betas)
        self.opts["disc"] = torch.optim.Adam(discs, lr=p.lr, betas=betas)

    @property
    def size_multiple(self) -> int:
        seg = self.params.seg_features if self.params.segmenter == "unet" else ()
        return 2 ** max(len(self.params.features) - 1, len(seg) - 1)

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": batch_size}

    # ------------------------------------------------------------------ losses
    def generator_terms(self, batch: dict[str, torch.Tensor]):
        """Generator loss terms of one batch and the generated samples for the discriminators.

        Returns
        -------
        terms : dict of str to Tensor
            ``ce``, ``dice_loss`` (Eq. 1), ``gen_l2`` (Eq. 3), ``cycle_mask`` (Eq. 7),
            ``cycle_image`` (Eq. 6), ``adv_mask`` and ``adv_image`` (generator side of Eqs. 4, 5).
        fakes : dict of str to Tensor
            ``mask`` (softmax of unannotated images), ``image`` (images generated from real
            masks), ``real_mask`` (one-hot annotated masks); all detached.
        """
        seg, gen = self.nets["seg"], self.nets["gen"]
        x_l, x_u = batch["labelled"], batch["unlabelled"]
        y = batch["mask"].long()
        n = x_l.shape[0]
        y1h = one_hot(y, self.num_classes).to(x_l.dtype)
        with self.autocast():
            # Instance normalisation works per sample, so batching the two streams is exact.
            logits = seg(torch.cat([x_l, x_u]))
            logits_l, logits_u = logits[:n], logits[n:]
            p_u = torch.softmax(logits_u.float(), dim=1)
            images = gen(torch.cat([y1h, p_u.to(y1h.dtype)]))
            x_fake, x_rec = images[:n], images[n:]
            logits_cyc = seg(x_fake)
            d_mask = self.nets["disc_mask"](p_u)
            d_image = self.nets["disc_image"](x_fake)
        terms = {
            "ce": F.cross_entropy(logits_l.float(), y),
            "dice_loss": dice_loss(logits_l, y),
            "gen_l2": F.mse_loss(x_fake.float(), x_l.float()),
            "cycle_mask": mask_cycle_loss(logits_cyc, y),
            "cycle_image": image_cycle_loss(x_rec, x_u),
            "adv_mask": lsgan_g_loss(d_mask),
            "adv_image": lsgan_g_loss(d_image),
        }
        fakes = {"mask": p_u.detach(), "image": x_fake.detach(), "real_mask": y1h}
        return terms, fakes

    def generator_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of :meth:`generator_terms` (Eq. 8, generators' side)."""
        p = self.params
        return (
            p.ce_weight * terms["ce"]
            + p.dice_weight * terms["dice_loss"]
            + p.lambda_gen_image * terms["gen_l2"]
            + p.lambda_cycle_mask * terms["cycle_mask"]
            + p.lambda_cycle_image * terms["cycle_image"]
            + p.lambda_adv_mask * terms["adv_mask"]
            + p.lambda_adv_image * terms["adv_image"]
        )

    def discriminator_terms(self, batch, fakes) -> dict[str, torch.Tensor]:
        """Least-squares losses of ``D_S`` (Eq. 4) and ``D_I`` (Eq. 5) on pooled fakes."""
        fake_mask = self.mask_pool.query(fakes["mask"])
        fake_image = self.image_pool.query(fakes["image"])
        ds, di = self.nets["disc_mask"], self.nets["disc_image"]
        with self.autocast():
            d_mask = lsgan_d_loss(ds(fakes["real_mask"]), ds(fake_mask.to(fakes["real_mask"].dtype)))
            d_image = lsgan_d_loss(di(batch["unlabelled"]), di(fake_image))
        return {"d_mask": d_mask, "d_image": d_image}

    # ------------------------------------------------------------------ interface
    def supervised_step(self, batch) -> dict[str, float]:
        """Warm-up step: the segmenter on CE + Dice and the image generator on ``gen_l2``
        (both of annotated pairs only); no cycles, no discriminators."""
        p = self.params
        y = batch["mask"].long()
        with self.autocast():
            logits = self.nets["seg"](batch["labelled"])
            x_fake = self.nets["gen"](one_hot(y, self.num_classes).to(batch["labelled"].dtype))
        terms = {
            "ce": F.cross_entropy(logits.float(), y),
            "dice_loss": dice_loss(logits, y),
            "gen_l2": F.mse_loss(x_fake.float(), batch["labelled"].float()),
        }
        loss = p.ce_weight * terms["ce"] + p.dice_weight * terms["dice_loss"] + p.lambda_gen_image * terms["gen_l2"]
        self.optimise(loss, self.opts["gen"])
        return {k: v.item() for k, v in terms.items()}

    def training_step(self, batch):
        self.train_mode()
        if self.warming_up(self.params.warmup):
            return self.supervised_step(batch)
        discs = [self.nets["disc_mask"], self.nets["disc_image"]]
        set_requires_grad(discs, False)
        try:
            terms, fakes = self.generator_terms(batch)
            self.optimise(self.generator_loss(terms), self.opts["gen"])
        finally:
            set_requires_grad(discs, True)
        d_terms = self.discriminator_terms(batch, fakes)
        self.optimise(d_terms["d_mask"] + d_terms["d_image"], self.opts["disc"])
        return {k: v.item() for k, v in {**terms, **d_terms}.items()}

    def predict(self, x):
        with self.eval_mode(), self.autocast():
            logits = self.nets["seg"](x)
        return {"probabilities": torch.softmax(logits.float(), dim=1)}

    def translate(self, mask: torch.Tensor) -> torch.Tensor:
        """Images ``G_SI(mask)``: ``(B, H, W)`` labels or ``(B, K, H, W)`` probabilities ->
        ``(B, C, H, W)`` normalised intensities in [-1, 1]."""
        if mask.dim() == 3:
            mask = one_hot(mask, self.num_classes)
        with self.eval_mode(), self.autocast():
            return self.nets["gen"](mask.to(self.device, torch.float32)).float()
