"""Loss functions shared by the methods."""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["dice_loss", "one_hot", "soft_dice"]


def one_hot(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` integer mask -> ``(B, K, H, W)`` float one-hot."""
    return F.one_hot(mask.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


def soft_dice(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    include_background: bool = False,
) -> torch.Tensor:
    """Soft Dice per class, accumulated over the whole batch.

    Parameters
    ----------
    probs : (B, K, H, W) Tensor
        Class probabilities.
    target : (B, H, W) integer Tensor or (B, K, H, W) one-hot Tensor
    smooth : float
        Added to numerator and denominator (1 in Vorontsov et al.).
    include_background : bool
        Keep class 0 in the result.

    Returns
    -------
    (K,) or (K - 1,) Tensor
        Dice of each class.
    """
    if target.dim() == 3:
        target = one_hot(target, probs.shape[1])
    probs = probs.float()
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return dice if include_background else dice[1:]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """``1 - mean foreground soft Dice`` of softmax(logits) against an integer mask."""
    probs = torch.softmax(logits.float(), dim=1)
    return 1.0 - soft_dice(probs, target, smooth=smooth).mean()
