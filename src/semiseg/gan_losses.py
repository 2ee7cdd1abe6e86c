"""Adversarial (least-squares, hinge), cycle-consistency and feature-matching losses of the GAN
methods.

Every function returns a scalar tensor averaged over all elements, so loss weights do not depend
on the crop size or the batch size.

References
----------
.. [1] X. Mao et al., "Least squares generative adversarial networks", ICCV 2017.
.. [2] J.-Y. Zhu et al., "Unpaired image-to-image translation using cycle-consistent
   adversarial networks", ICCV 2017.
.. [3] A. K. Mondal, J. Dolz, C. Desrosiers, "Revisiting CycleGAN for semi-supervised
   segmentation", arXiv:1908.11569, 2019.
.. [4] T.-C. Wang et al., "High-resolution image synthesis and semantic manipulation with
   conditional GANs" (pix2pixHD), CVPR 2018.
.. [5] H. Zhang et al., "Self-attention generative adversarial networks", ICML 2019 (hinge
   loss); E. Vorontsov et al., IEEE TMI 2022, Eq. 11.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

__all__ = [
    "feature_matching_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "image_cycle_loss",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "mask_cycle_loss",
]


def _as_list(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def lsgan_d_loss(real_out, fake_out) -> torch.Tensor:
    """Least-squares discriminator loss ``E[(D(real) - 1)^2] + E[D(fake)^2]``.

    Mondal et al. [3]_ Eqs. (4) and (5), written as the quantity the discriminator minimises.

    Parameters
    ----------
    real_out, fake_out : Tensor or sequence of Tensor
        Discriminator outputs (any shape: pixel-wise maps, patch maps) on real and generated
        inputs. Sequences (one tensor per view of a multi-scale discriminator) are averaged.

    Returns
    -------
    Tensor
        Scalar.
    """
    real, fake = _as_list(real_out), _as_list(fake_out)
    if len(real) != len(fake) or not real:
        raise ValueError("real_out and fake_out must hold the same, nonzero number of outputs")
    terms = [((r.float() - 1) ** 2).mean() + (f.float() ** 2).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def lsgan_g_loss(fake_out) -> torch.Tensor:
    """Least-squares generator loss ``E[(D(fake) - 1)^2]`` (averaged over views).

    The generator's side of the least-squares game [1]_: it pulls the discriminator's output on
    generated inputs to the "real" label.
    """
    fake = _as_list(fake_out)
    if not fake:
        raise ValueError("fake_out is empty")
    return torch.stack([((f.float() - 1) ** 2).mean() for f in fake]).mean()


def hinge_d_loss(real_out, fake_out) -> torch.Tensor:
    """Discriminator hinge loss ``mean_s E[max(0, 1 - D_s(real))] + mean_s E[max(0, 1 + D_s(fake))]``.

    [5]_, written as the quantity the discriminator minimises (``-min(0, D - 1) = max(0, 1 - D)``).

    Parameters
    ----------
    real_out, fake_out : Tensor or sequence of Tensor
        Score maps on real and generated inputs, one tensor per discriminator scale; each side
        is averaged over its scales.

    Returns
    -------
    Tensor
        Scalar.
    """
    real, fake = _as_list(real_out), _as_list(fake_out)
    if not real or not fake:
        raise ValueError("real_out and fake_out must hold at least one output each")
    return (
        torch.stack([F.relu(1 - r.float()).mean() for r in real]).mean()
        + torch.stack([F.relu(1 + f.float()).mean() for f in fake]).mean()
    )


def hinge_g_loss(fake_out) -> torch.Tensor:
    """Generator hinge loss ``-mean_s E[D_s(fake)]`` (averaged over scales)."""
    fake = _as_list(fake_out)
    if not fake:
        raise ValueError("fake_out is empty")
    return -torch.stack([f.float().mean() for f in fake]).mean()


def image_cycle_loss(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """L1 image cycle loss ``mean |G_SI(G_IS(x)) - x|`` (Mondal et al. [3]_ Eq. 6, per pixel)."""
    if reconstruction.shape != image.shape:
        raise ValueError(f"shapes differ: {tuple(reconstruction.shape)} vs {tuple(image.shape)}")
    return (reconstruction.float() - image.float()).abs().mean()


def mask_cycle_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy mask cycle loss ``H(y, G_IS(G_SI(y)))`` (Mondal et al. [3]_ Eq. 7).

    Parameters
    ----------
    logits : (B, K, H, W) Tensor
        Segmenter logits on the image generated from ``mask``.
    mask : (B, H, W) integer Tensor or (B, K, H, W) class probabilities
    """
    return F.cross_entropy(logits.float(), mask if mask.dtype == torch.long else mask.float())


def feature_matching_loss(
    real_features: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
    fake_features: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """Discriminator feature matching ``mean_i mean |D^(i)(real) - D^(i)(fake)|`` [4]_.

    Real features are detached: the loss trains only the generator.

    Parameters
    ----------
    real_features, fake_features : list of Tensor, or list of lists (one per view)
        Intermediate discriminator activations on the real pair and on the generated pair,
        paired layer by layer.

    Returns
    -------
    Tensor
        Scalar: the L1 distance averaged within each layer, then over all layers (of all views).
    """
    real = _flatten(real_features)
    fake = _flatten(fake_features)
    if len(real) != len(fake) or not real:
        raise ValueError("real and fake feature lists must be nonempty and of equal length")
    terms = []
    for r, f in zip(real, fake):
        if r.shape != f.shape:
            raise ValueError(f"feature shapes differ: {tuple(r.shape)} vs {tuple(f.shape)}")
        terms.append((f.float() - r.detach().float()).abs().mean())
    return torch.stack(terms).mean()


def _flatten(feats) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for f in feats:
        if isinstance(f, torch.Tensor):
            out.append(f)
        else:
            out.extend(_flatten(f))
    return out
