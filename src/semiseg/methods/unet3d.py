"""3D U-Net trained from sparsely annotated slices (Çiçek et al. 2016)."""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from ..data import InputError
from ..nets.unet3d import UNet3D, plan_pooling
from .base import Method, MethodParams, register_method

#: Patch depth when ``patch_depth`` is 0 (thinner stacks use all their slices).
DEFAULT_PATCH_DEPTH = 16


@dataclasses.dataclass
class UNet3DParams(MethodParams):
    """Hyperparameters of :class:`UNet3DSparse`.

    Attributes
    ----------
    features : tuple of int
        Channels per level of the 3D U-Net.
    patch_depth : int
        Slices per training patch and prediction window along the training axis; 0 picks
        ``min(16, slices)``.
    spacing : (z, y, x) tuple of float
        Voxel spacing of the volume; decides where the network pools in-plane only.
    pool_z : tuple of int
        Z pooling factor (1 or 2) per level; empty: planned from ``spacing`` and
        ``patch_depth`` (training fills it in, so model files keep the network).
    dice_weight, ce_weight : float
        Weights of the soft Dice and cross-entropy terms.
    norm : str
        Normalisation (``instance``, ``batch``, ``group``, ``none``).
    inplane_levels : int
        Levels (from the full-resolution one) that convolve in-plane only (1x3x3 kernels),
        at most all but the coarsest, which always convolves in 3D (a larger value means that);
        3 by default, so with the default four levels only the coarsest is 3D (measured in
        ``docs/benchmarks.md``, issue 19, on the phantom, head and nuclei); 0 is the paper's
        network.
    weight_decay : float
        AdamW weight decay.
    """

    features: tuple[int, ...] = (8, 16, 32, 64)
    patch_depth: int = 0
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    pool_z: tuple[int, ...] = ()
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    norm: str = "instance"
    inplane_levels: int = 3
    weight_decay: float = 1e-4


def weighted_dice_ce(
    logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, *, smooth: float = 1.0
) -> dict[str, torch.Tensor]:
    """Soft Dice and cross-entropy restricted to voxels of weight 1.

    Parameters
    ----------
    logits : (B, K, D, H, W) Tensor
    mask : (B, D, H, W) integer Tensor
        Labels; their values where ``weight`` is 0 never enter the result.
    weight : (B, D, H, W) Tensor
        1 on annotated voxels, 0 elsewhere.
    smooth : float
        Added to the Dice numerator and denominator.

    Returns
    -------
    dict
        ``dice_loss``: 1 - mean foreground soft Dice over the annotated voxels of the batch;
        ``ce``: mean cross-entropy over them (0 when the batch has none).
    """
    weight = weight.float()
    mask = torch.where(weight > 0, mask.long(), torch.zeros_like(mask, dtype=torch.long))
    logits = logits.float()
    ce = (F.cross_entropy(logits, mask, reduction="none") * weight).sum() / weight.sum().clamp_min(1.0)
    probs = torch.softmax(logits, dim=1)
    target = F.one_hot(mask, logits.shape[1]).movedim(-1, 1).float()
    w = weight[:, None]
    dims = (0, 2, 3, 4)
    inter = (probs * target * w).sum(dims)
    denom = (probs * w).sum(dims) + (target * w).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return {"dice_loss": 1.0 - dice[1:].mean(), "ce": ce}


@register_method
class UNet3DSparse(Method):
    """3D U-Net on ``(D, H, W)`` patches, its loss computed on annotated slices only.

    Every voxel of the patch is context for the network, but the soft Dice and cross-entropy
    are weighted 1 on the voxels of annotated slices (painted, or tagged healthy as free
    background) and 0 elsewhere, so the network learns from the whole volume's context and
    predicts every slice. Pooling follows nnU-Net's anisotropy rule (:func:`plan_pooling`).

    References
    ----------
    .. [1] Ö. Çiçek, A. Abdulkadir, S. S. Lienkamp, T. Brox, O. Ronneberger, "3D U-Net:
       learning dense volumetric segmentation from sparse annotation", MICCAI 2016.
    .. [2] F. Isensee et al., "nnU-Net: a self-configuring method for deep learning-based
       biomedical image segmentation", Nature Methods 2021.
    """

    name = "unet3d"
    summary = "3D U-Net from sparse slices (loss on annotated voxels only)"
    reference = "Çiçek et al., MICCAI 2016"
    Params = UNet3DParams
    spatial_dims = 3
    #: Model files written before ``inplane_levels`` existed hold the all-3x3x3 network.
    legacy_params = {"inplane_levels": 0}
    #: The paper's network convolves 3x3x3 at every level; the CPU default is in-plane at
    #: the two full-resolution levels (half the step, better Dice at 5 CPU-minutes).
    presets = {"cpu": {}, "paper": {"inplane_levels": 0}}

    @classmethod
    def resolve_params(cls, params, spatial_shape, axis: int) -> dict:
        """Fill in ``patch_depth`` and ``pool_z`` for a volume before the network is built.

        Parameters
        ----------
        params : dict or UNet3DParams or None
        spatial_shape : (Z, Y, X) tuple of int
        axis : int
            Training axis (the patch depth runs along it).

        Raises
        ------
        InputError
            When an explicit ``patch_depth`` exceeds the slices along ``axis``, or the spacing
            is not three positive numbers.
        """
        p = cls.parse_params(params)
        n = int(spatial_shape[axis])
        if p.patch_depth < 0:
            raise InputError(f"patch_depth must be >= 0 (0 = automatic), got {p.patch_depth}")
        if p.patch_depth > n:
            raise InputError(
                f"patch_depth {p.patch_depth} exceeds the {n} slices of the volume along axis {axis}"
            )
        if len(p.spacing) != 3 or min(p.spacing) <= 0:
            raise InputError(f"spacing must be three positive numbers (z, y, x), got {p.spacing}")
        depth = p.patch_depth or min(DEFAULT_PATCH_DEPTH, n)
        if not p.pool_z:
            s = list(p.spacing)
            spacing = [s[axis]] + [s[a] for a in range(3) if a != axis]
            pool_z = tuple(k[0] for k in plan_pooling(depth, spacing, len(p.features)))
        else:
            pool_z = tuple(p.pool_z)
        return {**dataclasses.asdict(p), "patch_depth": depth, "pool_z": pool_z}

    @property
    def patch_depth(self) -> int:
        """Slices per training patch (and default prediction window depth, see
        :meth:`semiseg.model.Model.volume_window`)."""
        return self.params.patch_depth or DEFAULT_PATCH_DEPTH

    def pooling(self) -> list[tuple[int, int, int]]:
        """Pooling kernel of each level (from ``pool_z``, else planned for axis 0)."""
        p = self.params
        if p.pool_z:
            if len(p.pool_z) != len(p.features) - 1 or any(k not in (1, 2) for k in p.pool_z):
                raise ValueError(f"pool_z needs {len(p.features) - 1} factors of 1 or 2, got {p.pool_z}")
            return [(int(k), 2, 2) for k in p.pool_z]
        return plan_pooling(self.patch_depth, p.spacing, len(p.features))

    def build(self) -> None:
        p = self.params
        self.nets["seg"] = UNet3D(
            self.in_channels, self.num_classes, features=p.features, pools=self.pooling(), norm=p.norm,
            inplane_levels=min(p.inplane_levels, len(p.features) - 1),
        )

    def make_optimizers(self) -> None:
        self.opts["seg"] = torch.optim.AdamW(
            self.nets["seg"].parameters(), lr=self.params.lr, weight_decay=self.params.weight_decay
        )

    @property
    def size_multiple(self) -> int:
        return self.nets["seg"].size_multiples[-1]

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        """Patches per step: ``4 * batch_size`` slices in all (2 patches of 16 at batch 8), so a
        step costs about the same whatever ``patch_depth``, and thinner patches give more
        annotated planes per step."""
        return {"labelled": max(1, round(4 * batch_size / self.patch_depth))}

    def training_step(self, batch):
        self.train_mode()
        with self.autocast():
            logits = self.nets["seg"](batch["labelled"])
        terms = weighted_dice_ce(logits, batch["mask"], batch["weight"])
        loss = self.params.dice_weight * terms["dice_loss"] + self.params.ce_weight * terms["ce"]
        self.optimise(loss, self.opts["seg"])
        return {k: v.item() for k, v in terms.items()}

    def predict(self, x):
        """Class probabilities of normalised ``(B, C, D, H, W)`` patches, ``(B, K, D, H, W)``."""
        with self.eval_mode(), self.autocast():
            logits = self.nets["seg"](x)
        return {"probabilities": torch.softmax(logits.float(), dim=1)}
