"""Sliding windows: where they start, how they are weighted, and how their outputs blend.

The one windowing scheme of the package: overlapping square windows spread evenly over a slice,
their outputs averaged with a Gaussian weight that favours window centres (as nnU-Net and
MONAI's sliding-window inference do). :func:`semiseg.inference.apply_to_slices` predicts every
slice larger than the model's window this way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["WINDOW_OVERLAP", "blend_windows", "gaussian_window", "window_starts"]

#: Share of a window that its neighbour overlaps (MONAI's default).
WINDOW_OVERLAP = 0.25


def check_overlap(overlap: float) -> None:
    """Refuse overlaps outside ``[0, 1)`` (negative ones leave pixels without a window)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")


def window_starts(size: int, tile: int, overlap: float = WINDOW_OVERLAP) -> list[int]:
    """Starts of windows of side ``tile`` that cover ``[0, size)``, neighbours overlapping by at
    least ``overlap * tile``, spread evenly so the last one ends at ``size``."""
    check_overlap(overlap)
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = math.ceil((size - tile) / stride) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def gaussian_window(tile: int, device: torch.device) -> torch.Tensor:
    """``(tile, tile)`` blending weight: a Gaussian of sigma ``tile / 8`` (nnU-Net's choice),
    floored so that every pixel of a window keeps a positive weight."""
    r = torch.arange(tile, dtype=torch.float32, device=device) - (tile - 1) / 2
    g = torch.exp(-(r**2) / (2 * (tile / 8) ** 2))
    w = g[:, None] * g[None, :]
    return (w / w.max()).clamp_min(1e-3)


def blend_windows(
    t: torch.Tensor,
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    tile: int,
    overlap: float = WINDOW_OVERLAP,
) -> dict[str, torch.Tensor]:
    """Apply ``fn`` window by window and blend its outputs with :func:`gaussian_window`.

    Parameters
    ----------
    t : (B, C, H, W) Tensor
        Slices with ``H, W >= tile``.
    fn : callable
        Maps a ``(B, C, tile, tile)`` window to a dict of ``(B, c, tile, tile)`` tensors.
    tile : int
        Window side.
    overlap : float
        Share of a window overlapped by its neighbours.

    Returns
    -------
    dict of (B, c, H, W) float32 tensors
    """
    big_h, big_w = t.shape[-2:]
    if big_h < tile or big_w < tile:
        raise ValueError(f"slices of {big_h} x {big_w} are smaller than the {tile} window")
    weight = gaussian_window(tile, t.device)
    total = torch.zeros((big_h, big_w), dtype=torch.float32, device=t.device)
    acc: dict[str, torch.Tensor] = {}
    for y in window_starts(big_h, tile, overlap):
        for x0 in window_starts(big_w, tile, overlap):
            win = (Ellipsis, slice(y, y + tile), slice(x0, x0 + tile))
            for key, value in fn(t[win]).items():
                if key not in acc:
                    acc[key] = torch.zeros(
                        (value.shape[0], value.shape[1], big_h, big_w), dtype=torch.float32, device=t.device
                    )
                acc[key][win] += value.float() * weight
            total[win] += weight
    for v in acc.values():
        v /= total  # in place: no second (B, c, H, W) buffer
    return acc
