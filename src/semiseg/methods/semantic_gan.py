"""SemanticGAN: a generative model of image-label pairs, segmenting by GAN inversion.

A StyleGAN2-style generator renders an image and a label map from the same style layers; an
image discriminator ``D_r`` (all slices) and an image-label discriminator ``D_m`` (annotated
slices) train it. An encoder maps images to W+; prediction encodes a slice, optionally refines
the code by test-time optimisation (Eq. 7 of [1]_) and reads the label branch.

Deviations from [1]_ (see ``docs/methods.md``): one joint training loop (generator,
discriminators and encoder are all updated in every step, the encoder against the current
generator) instead of two stages; SSIM + L2 instead of LPIPS (no pretrained VGG weights here);
a compact generator without style mixing, path-length regulariser or EMA copy; ``D_m`` sees the
label branch as ``2 softmax - 1`` (real masks as ``2 one_hot - 1``) rather than raw logits;
on the CPU the encoder also predicts the generator's 16 x 16 activations (``spatial_res``, a
spatial code beside W+ as in the Feature-Style Encoder of Yao et al., ECCV 2022).

References
----------
.. [1] D. Li, J. Yang, K. Kreis, A. Torralba, S. Fidler, "Semantic segmentation with generative
   models: semi-supervised learning and strong out-of-domain generalization", CVPR 2021.
.. [2] T. Karras et al., "Analyzing and improving the image quality of StyleGAN", CVPR 2020.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import autograd
from torch.nn import functional as F

from ..gan_losses import hinge_d_loss, hinge_g_loss
from ..losses import dice_loss, one_hot
from ..nets.stylegan import (
    ImageDiscriminator,
    MultiScalePatchDiscriminator,
    SemanticStyleGenerator,
    WPlusEncoder,
)
from ..windows import blend_windows
from .base import Method, MethodParams, register_method, set_requires_grad

__all__ = [
    "SemanticGAN",
    "SemanticGANParams",
    "d_hinge_loss",
    "d_logistic_loss",
    "g_hinge_loss",
    "g_nonsaturating_loss",
    "r1_penalty",
    "ssim",
]


# ----------------------------------------------------------------------------- loss terms
def d_logistic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic discriminator loss, ``softplus(-D(x)) + softplus(D(G(z)))``.

    The ``-log sigmoid`` form of Eq. (1) of [1]_ (``D_r``), averaged over the batch.
    """
    return F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()


def g_nonsaturating_loss(fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))`` (first term of Eq. (3))."""
    return F.softplus(-fake.float()).mean()


def d_hinge_loss(real, fake) -> torch.Tensor:
    """Hinge discriminator loss averaged over scales, halved as the authors train ``D_m``.

    ``0.5 * (mean_s mean relu(1 - D_s(real)) + mean_s mean relu(1 + D_s(fake)))``: half of
    :func:`semiseg.gan_losses.hinge_d_loss`.

    Parameters
    ----------
    real, fake : Tensor or list of Tensor
        Patch logits, one tensor per discriminator scale.
    """
    return 0.5 * hinge_d_loss(real, fake)


#: Hinge generator loss ``-mean_s mean D_s(fake)`` (:func:`semiseg.gan_losses.hinge_g_loss`).
g_hinge_loss = hinge_g_loss


def r1_penalty(score: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty ``E ||grad_x D(x)||^2`` on real inputs (Mescheder et al., 2018).

    Parameters
    ----------
    score : Tensor
        Discriminator output(s) on ``inputs``; summed before differentiation.
    inputs : (B, ...) Tensor
        Real inputs with ``requires_grad=True``.
    """
    (grad,) = autograd.grad(score.float().sum(), inputs, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of two image batches (Gaussian window, valid region).

    Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)`` per channel, averaged.

    Parameters
    ----------
    x, y : (B, C, H, W) Tensor
        H and W must exceed the window (11 pixels for ``sigma=1.5``).

    Returns
    -------
    (B,) Tensor
        SSIM of each image (mean over channels and pixels).
    """
    g = _gaussian_window(sigma).to(x.device)
    k = len(g)
    c = x.shape[1]
    x, y = x.float(), y.float()

    def blur(t):
        t = F.conv2d(t, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
        return F.conv2d(t, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


# ----------------------------------------------------------------------------- method
@dataclasses.dataclass
class SemanticGANParams(MethodParams):
    """Hyperparameters of :class:`SemanticGAN`.

    Attributes
    ----------
    lr : float
        Adam learning rate of generator and discriminators (betas 0, 0.99 as in StyleGAN2).
    encoder_lr : float
        Adam learning rate of the encoder.
    features : tuple of int
        Channels from the generator's output resolution downwards (also D_r and encoder);
        CPU default 8..64, the ``paper`` preset 16..128 (StyleGAN2's 512 scaled down).
    size : int
        Generator side (power of two). Training crops and predicted slices are resized so a
        training crop maps to ``size`` pixels; larger slices are predicted in overlapping tiles.
    latent_dim, mapping_layers : int
        Width of ``z``/``w`` and depth of the mapping network.
    scales : int
        Scales of the multi-scale patch discriminator ``D_m``.
    r1 : float
        R1 weight ``gamma`` (penalty ``gamma / 2 * ||grad||^2``) on both discriminators.
    r1_every : int
        Lazy regularisation: R1 every this many steps, scaled up accordingly (16, as
        StyleGAN2's ``d_reg_every``: R1's double backward was a tenth of the CPU step at 4).
    seg_adv_weight : float
        Weight of the ``D_m`` term in the generator loss (Eq. 3).
    ssim_weight, mse_weight : float
        Image reconstruction ``ssim_weight (1 - SSIM) + mse_weight ||x - x'||^2`` (LPIPS
        substitute, Eq. 6 and 8).
    ce_weight, dice_weight : float
        Supervised encoder terms (Eq. 5).
    encoder_start : int
        Steps of GAN-only training before the encoder is updated (the paper's two stages).
    tto_steps : int
        Test-time optimisation steps of W+ at prediction (0: encoder only, "Ours-NO").
    tto_lr : float
        Adam learning rate of the test-time optimisation (cosine ramp as the authors).
    tto_encoder_weight : float
        ``lambda_2`` of Eq. (7), the encoder-consistency regulariser.
    tto_batch : int
        Tiles inverted together.
    spatial_res : int
        Resolution (a power of two from 4 to ``size``; 0: none, the paper) at which the
        encoder also predicts the generator's activations (a spatial code beside W+, as the
        Feature-Style Encoder), so a label's position need not pass through the 1-D W+ code
        (CPU default 16; ``paper`` preset 0). Generated samples never use it.
    """

    lr: float = 2e-3
    encoder_lr: float = 1e-3
    features: tuple[int, ...] = (8, 16, 32, 64)
    size: int = 64
    latent_dim: int = 64
    mapping_layers: int = 4
    scales: int = 2
    r1: float = 1.0
    r1_every: int = 16
    seg_adv_weight: float = 1.0
    ssim_weight: float = 1.0
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    encoder_start: int = 0
    tto_steps: int = 0
    tto_lr: float = 0.1
    tto_encoder_weight: float = 1e-3
    tto_batch: int = 64
    spatial_res: int = 16


@register_method
class SemanticGAN(Method):
    """Joint image-label StyleGAN2 with an encoder; segmentation by GAN inversion.

    Networks: ``gen`` (mapping + synthesis with image and label branches), ``d_img`` (``D_r``,
    logistic loss + R1), ``d_seg`` (``D_m``, multi-scale patch, hinge loss + R1), ``enc``
    (image -> W+). The ``D_m`` generator term sees the generated image detached, so the
    image branch learns only from ``D_r`` while the label branch and the shared style layers learn
    from ``D_m`` (Sec. 3.4 of [1]_).

    Prediction resizes slices so a training crop maps to ``size`` pixels, cuts overlapping
    ``size x size`` tiles, encodes them (``w+ = w_avg + E(x)``, with ``spatial_res`` also the
    spatial code that replaces the generator's activations there), optionally runs ``tto_steps``
    of Adam on ``w+`` minimising ``recon(x, G_x(w+)) + lambda_2 ||w+ - E(G_x(w+))||^2`` and
    reads ``softmax(G_y(w+))``; tiles are blended back. Extra output ``reconstruction`` is
    ``G_x(w+)``. :meth:`sample_tumours` returns images of random latents (not conditioned on
    the input); :meth:`sample` also returns their labels.

    References
    ----------
    .. [1] D. Li, J. Yang, K. Kreis, A. Torralba, S. Fidler, "Semantic segmentation with
       generative models: semi-supervised learning and strong out-of-domain generalization",
       CVPR 2021.
    """

    name = "semantic-gan"
    summary = "SemanticGAN: StyleGAN2 of image-label pairs + encoder; segments by GAN inversion"
    reference = "Li et al., CVPR 2021"
    Params = SemanticGANParams
    outputs = {"reconstruction": "image"}
    can_sample = True
    #: The earlier defaults (StyleGAN2's widths scaled to 16..128); CPU default halves them.
    presets = {"cpu": {}, "paper": {"features": (16, 32, 64, 128), "spatial_res": 0}}
    #: Model files from before the spatial code encoded W+ alone.
    legacy_params = {"spatial_res": 0}

    def build(self) -> None:
        p = self.params
        if p.size < 8 or p.size & (p.size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {p.size}")
        if p.r1_every < 1 or p.tto_steps < 0 or p.tto_batch < 1:
            raise ValueError("r1_every and tto_batch must be >= 1, tto_steps >= 0")
        if p.spatial_res and (p.spatial_res < 4 or p.spatial_res > p.size or p.spatial_res & (p.spatial_res - 1)):
            raise ValueError(f"spatial_res must be 0 or a power of two from 4 to size ({p.size}), got {p.spatial_res}")
        c, k = self.in_channels, self.num_classes
        gen = self.nets["gen"] = SemanticStyleGenerator(
            c, k, size=p.size, latent_dim=p.latent_dim, features=p.features, mapping_layers=p.mapping_layers
        )
        self.nets["d_img"] = ImageDiscriminator(c, size=p.size, features=p.features)
        self.nets["d_seg"] = MultiScalePatchDiscriminator(c + k, features=p.features[0], scales=p.scales)
        self.nets["enc"] = WPlusEncoder(
            c, size=p.size, num_ws=gen.num_ws, latent_dim=p.latent_dim, features=p.features,
            spatial_res=p.spatial_res, spatial_channels=gen.channels_at(p.spatial_res) if p.spatial_res else 0,
        )
        #: Side of the training crops seen so far (sets the pixel scale at prediction).
        self.train_crop = p.size
        self._last_r1 = (0.0, 0.0)
        self.last_sample: dict[str, torch.Tensor] = {}

    def make_optimizers(self) -> None:
        p = self.params
        for key in ("gen", "d_img", "d_seg"):
            self.opts[key] = torch.optim.Adam(self.nets[key].parameters(), lr=p.lr, betas=(0.0, 0.99))
        self.opts["enc"] = torch.optim.Adam(self.nets["enc"].parameters(), lr=p.encoder_lr)

    @property
    def size_multiple(self) -> int:
        # Slices are resized and tiled internally: any size works.
        return 1

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        return {"labelled": batch_size, "unlabelled": batch_size}

    # ------------------------------------------------------------------ helpers
    def _resize(self, x: torch.Tensor, side: int) -> torch.Tensor:
        if x.shape[-1] == side and x.shape[-2] == side:
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=side < x.shape[-1])

    def _resize_mask(self, mask: torch.Tensor, side: int) -> torch.Tensor:
        if mask.shape[-1] == side and mask.shape[-2] == side:
            return mask
        return F.interpolate(mask[:, None].float(), size=(side, side), mode="nearest")[:, 0].long()

    def scaled_labels(self, mask: torch.Tensor) -> torch.Tensor:
        """Integer mask -> one-hot scaled to [-1, 1], as real labels enter ``D_m``."""
        return 2 * one_hot(mask, self.num_classes) - 1

    @staticmethod
    def scaled_logits(seg_logits: torch.Tensor) -> torch.Tensor:
        """Generated label logits -> ``2 softmax - 1``, the range of real one-hot labels."""
        return 2 * torch.softmax(seg_logits.float(), 1) - 1

    def _z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.params.latent_dim, generator=generator).to(self.device)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, C, size, size)`` -> W+ codes ``(B, num_ws, latent_dim)`` and the spatial code
        ``(B, channels, spatial_res, spatial_res)`` (``None`` without ``spatial_res``)."""
        offsets, features = self.nets["enc"].encode(x)
        return self.nets["gen"].w_avg + offsets, features

    def reconstruction_loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image ``ssim_weight (1 - SSIM) + mse_weight MSE`` (the LPIPS + L2 substitute), (B,)."""
        p = self.params
        mse = (x.float() - target.float()).pow(2).mean((1, 2, 3))
        if p.ssim_weight:
            return p.ssim_weight * (1 - ssim(x, target)) + p.mse_weight * mse
        return p.mse_weight * mse

    # ------------------------------------------------------------------ loss groups
    def discriminator_loss_terms(self, real_img, lab_img, lab_mask, *, r1: bool = False):
        """Losses of ``D_r`` (logistic) and ``D_m`` (hinge), plus R1 terms when ``r1``."""
        gen, d_img, d_seg = self.nets["gen"], self.nets["d_img"], self.nets["d_seg"]
        n = real_img.shape[0]
        with torch.no_grad(), self.autocast():
            fake_img, fake_seg = gen(self._z(n))
        with self.autocast():
            terms = {
                "d_img": d_logistic_loss(d_img(real_img), d_img(fake_img.detach())),
                "d_seg": d_hinge_loss(
                    d_seg(torch.cat([lab_img, self.scaled_labels(lab_mask)], 1)),
                    d_seg(torch.cat([fake_img.detach(), self.scaled_logits(fake_seg).to(fake_img.dtype)], 1)),
                ),
            }
        if r1:
            x = real_img.detach().float().requires_grad_(True)
            terms["r1_img"] = r1_penalty(d_img(x), x)
            pair = torch.cat([lab_img, self.scaled_labels(lab_mask)], 1).detach().float().requires_grad_(True)
            terms["r1_seg"] = r1_penalty(sum(s.float().mean() for s in d_seg(pair)), pair)
        return terms

    def generator_loss_terms(self, n: int, noise="random") -> dict[str, torch.Tensor]:
        """Generator losses: ``g_img`` from ``D_r`` and ``g_seg`` from ``D_m``.

        The image enters ``D_m`` detached (stop-gradient of Sec. 3.4): ``g_seg`` reaches the
        label branch and the shared style layers but never the image branch.
        """
        gen = self.nets["gen"]
        with self.autocast():
            w = gen.mapping(self._z(n))
            fake_img, fake_seg = gen.synthesis(w, noise)
            pair = torch.cat([fake_img.detach(), self.scaled_logits(fake_seg).to(fake_img.dtype)], 1)
            terms = {
                "g_img": g_nonsaturating_loss(self.nets["d_img"](fake_img)),
                "g_seg": g_hinge_loss(self.nets["d_seg"](pair)),
            }
        terms["_w"] = w.detach()
        return terms

    def encoder_loss_terms(self, images, lab_img, lab_mask) -> dict[str, torch.Tensor]:
        """Encoder losses (Eq. 4-6): reconstruction of all images, CE + Dice on labelled ones."""
        gen = self.nets["gen"]
        with self.autocast():
            x = torch.cat([images, lab_img]) if images is not None else lab_img
            ws, features = self.encode(x)
            rec, seg = gen.synthesis(ws, "zero", features)
        nl = lab_img.shape[0]
        logits = seg[-nl:].float()
        return {
            "recon": self.reconstruction_loss(rec, x).mean(),
            "ce": F.cross_entropy(logits, lab_mask),
            "dice_loss": dice_loss(logits, lab_mask),
        }

    # ------------------------------------------------------------------ training
    def training_step(self, batch):
        p = self.params
        self.train_mode()
        gen, d_img, d_seg = (self.nets[k] for k in ("gen", "d_img", "d_seg"))
        lab_img, lab_mask = batch["labelled"], batch["mask"]
        self.train_crop = int(lab_img.shape[-1])
        lab_img = self._resize(lab_img, p.size)
        lab_mask = self._resize_mask(lab_mask, p.size)
        unl = batch.get("unlabelled")
        unl = None if unl is None else self._resize(unl, p.size)
        real = lab_img if unl is None else torch.cat([unl, lab_img])
        out: dict[str, float] = {}

        # 1) discriminators (R1 lazily every r1_every steps, scaled by r1_every)
        set_requires_grad(gen, False)
        set_requires_grad(d_img, True)
        set_requires_grad(d_seg, True)
        do_r1 = p.r1 > 0 and self.step % p.r1_every == 0
        t = self.discriminator_loss_terms(real, lab_img, lab_mask, r1=do_r1)
        loss_img, loss_seg = t["d_img"], t["d_seg"]
        if do_r1:
            loss_img = loss_img + p.r1 / 2 * p.r1_every * t["r1_img"]
            loss_seg = loss_seg + p.r1 / 2 * p.r1_every * t["r1_seg"]
            self._last_r1 = (t["r1_img"].item(), t["r1_seg"].item())
        self.optimise(loss_img, self.opts["d_img"])
        self.optimise(loss_seg, self.opts["d_seg"])
        out["d_img"], out["d_seg"] = t["d_img"].item(), t["d_seg"].item()
        # Report the last R1 values every step so progress plots keep the same keys.
        out["r1_img"], out["r1_seg"] = self._last_r1

        # 2) generator (image branch from D_r only; label branch from D_m)
        set_requires_grad(gen, True)
        set_requires_grad(d_img, False)
        set_requires_grad(d_seg, False)
        t = self.generator_loss_terms(real.shape[0])
        self.optimise(t["g_img"] + p.seg_adv_weight * t["g_seg"], self.opts["gen"])
        with torch.no_grad():
            gen.w_avg.lerp_(t["_w"].float().mean(0), 0.005 if self.step else 1.0)
        out["g_img"], out["g_seg"] = t["g_img"].item(), t["g_seg"].item()

        # 3) encoder against the current (frozen) generator
        if self.step >= p.encoder_start:
            set_requires_grad(gen, False)
            t = self.encoder_loss_terms(unl, lab_img, lab_mask)
            loss = t["recon"] + p.ce_weight * t["ce"] + p.dice_weight * t["dice_loss"]
            self.optimise(loss, self.opts["enc"])
            out.update({f"e_{k}": v.item() for k, v in t.items()})
        for net in (gen, d_img, d_seg):
            set_requires_grad(net, True)
        return out

    # ------------------------------------------------------------------ inference
    def prediction_window(self, tile_size: int | None) -> int | None:
        """Always the training crop: the networks take one ``size x size`` window at the pixel
        scale of training (a crop of ``train_crop`` pixels resized to ``size``)."""
        return self.train_crop

    def invert(self, tiles: torch.Tensor, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GAN inversion of ``(N, C, size, size)`` normalised tiles.

        Encoder initialisation, then ``steps`` Adam steps on W+ minimising
        ``recon(x, G_x(w+)) + tto_encoder_weight * ||w+ - sg(E(G_x(w+)))||^2`` (Eq. 7 of [1]_,
        with the encoder output detached as in the authors' code) under the authors' cosine
        learning-rate ramp. With ``spatial_res`` the encoder's spatial code stays fixed: only
        W+ is optimised.

        Returns
        -------
        ws : (N, num_ws, latent_dim) Tensor
        image : (N, C, size, size) Tensor
            Reconstruction ``G_x(w+)``.
        seg_logits : (N, K, size, size) Tensor
        """
        p = self.params
        gen, enc = self.nets["gen"], self.nets["enc"]
        steps = p.tto_steps if steps is None else int(steps)
        with torch.no_grad(), self.autocast():
            ws, features = self.encode(tiles)
            ws = ws.float()
        if steps > 0:
            with torch.enable_grad():
                ws = ws.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([ws], lr=p.tto_lr)
                for i in range(steps):
                    t = i / steps
                    ramp = min(1.0, (1 - t) / 0.25)
                    ramp = (0.5 - 0.5 * math.cos(ramp * math.pi)) * min(1.0, t / 0.05)
                    opt.param_groups[0]["lr"] = p.tto_lr * ramp
                    with self.autocast():
                        img, _ = gen.synthesis(ws, "zero", features)
                        loss = self.reconstruction_loss(img, tiles).sum()
                        if p.tto_encoder_weight:
                            target = (gen.w_avg + enc(img)).detach().float()
                            loss = loss + p.tto_encoder_weight * (ws - target).pow(2).mean((1, 2)).sum()
                    (grad,) = autograd.grad(loss, [ws])
                    ws.grad = grad
                    opt.step()
            ws = ws.detach()
        with torch.no_grad(), self.autocast():
            img, seg = gen.synthesis(ws, "zero", features)
        return ws, img.float(), seg.float()

    def predict(self, x, *, tto_steps: int | None = None):
        """Predict by GAN inversion, one window of :meth:`prediction_window` at a time.

        Inference hands this method one window per call; larger inputs (direct calls) go
        through the same Gaussian-blended windows (:func:`semiseg.windows.blend_windows`).
        """
        tile = self.train_crop
        h, w = x.shape[-2:]
        if h <= tile and w <= tile:
            return self._predict_window(x, tto_steps)
        ph, pw = max(0, tile - h), max(0, tile - w)
        xs = F.pad(x.float(), (0, pw, 0, ph), mode="replicate") if ph or pw else x
        with self.eval_mode():
            res = blend_windows(xs, lambda t: self._predict_window(t, tto_steps), tile)
        return {k: v[..., :h, :w] for k, v in res.items()}

    def _predict_window(self, x, tto_steps: int | None = None):
        """Predict slices no larger than ``train_crop``: resized to the training scale, padded
        to ``size``, inverted ``tto_batch`` slices at a time, and mapped back."""
        p = self.params
        b, _, h, w = x.shape
        scale = p.size / max(1, self.train_crop)
        hs, ws_ = max(1, round(h * scale)), max(1, round(w * scale))
        with self.eval_mode():
            xs = x.float()
            if (hs, ws_) != (h, w):
                xs = F.interpolate(xs, size=(hs, ws_), mode="bilinear", align_corners=False, antialias=scale < 1)
            ph, pw = max(0, p.size - hs), max(0, p.size - ws_)
            if ph or pw:
                xs = F.pad(xs, (0, pw, 0, ph), mode="replicate")
            probs, recon = [], []
            for s in range(0, b, p.tto_batch):
                _, img, seg = self.invert(xs[s : s + p.tto_batch], tto_steps)
                probs.append(torch.softmax(seg, 1)[..., :hs, :ws_])
                recon.append(img[..., :hs, :ws_])
            probs, recon = torch.cat(probs), torch.cat(recon)
            if (hs, ws_) != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
                recon = F.interpolate(recon, size=(h, w), mode="bilinear", align_corners=False)
            probs = probs / probs.sum(1, keepdim=True)
        return {"probabilities": probs, "reconstruction": recon}

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Draw ``n`` image-label pairs from random latents (seeded).

        Returns
        -------
        dict
            ``image`` (n, C, size, size), ``probabilities`` (n, K, size, size) and ``labels``
            (n, size, size) int64, in normalised intensity units.
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        g = torch.Generator().manual_seed(int(seed))
        gen = self.nets["gen"]
        with self.eval_mode(), self.autocast():
            z = self._z(n, g)
            noise = gen.make_noise(n, generator=g, device=self.device)
            img, seg = gen(z, noise)
        probs = torch.softmax(seg.float(), 1)
        return {"image": img.float(), "probabilities": probs, "labels": probs.argmax(1)}

    def sample_tumours(self, x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, B, C, H, W)`` images generated from random latents, resized to ``x``'s slices.

        SemanticGAN models the joint distribution of images and labels; it has no
        absence->presence translation, so these samples are *not* conditioned on ``x``. Their
        labels are kept in :attr:`last_sample` (``labels``: (n, B, H, W)).
        """
        b, _, h, w = x.shape
        s = self.sample(n * b, seed)
        img = F.interpolate(s["image"], size=(h, w), mode="bilinear", align_corners=False)
        lab = F.interpolate(s["labels"][:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        self.last_sample = {"image": img.reshape(n, b, -1, h, w), "labels": lab.reshape(n, b, h, w)}
        return self.last_sample["image"]

    # ------------------------------------------------------------------ state
    def extra_state(self):
        return {"train_crop": int(self.train_crop)}

    def load_extra_state(self, state):
        self.train_crop = int(state.get("train_crop", self.params.size))
