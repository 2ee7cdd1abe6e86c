"""Sliding windows: where they start, how they are weighted, and how their outputs blend.

The one windowing scheme of the package, for 2D slices and 3D blocks alike: overlapping windows
spread evenly along every axis, their outputs averaged with a Gaussian weight that favours
window centres (as nnU-Net and MONAI's sliding-window inference do).
:func:`semiseg.inference.apply_in_windows` predicts every slice (2D methods) or slab (3D
methods) larger than the model's window this way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["WINDOW_OVERLAP", "blend_windows", "gaussian_window", "pad_spatial", "window_starts"]

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


def _sizes(tile: int | Sequence[int]) -> tuple[int, ...]:
    """Window size per axis: an int is a square ``(tile, tile)`` window."""
    return (int(tile), int(tile)) if isinstance(tile, int | np.integer) else tuple(int(t) for t in tile)


def gaussian_window(tile: int | Sequence[int], device: torch.device) -> torch.Tensor:
    """Blending weight of a window: ``(tile, tile)`` for an int, else of shape ``tile`` (any
    number of axes). A Gaussian of sigma ``side / 8`` along each side (nnU-Net's choice),
    floored so that every pixel of a window keeps a positive weight."""
    sizes = _sizes(tile)
    w = None
    for d, n in enumerate(sizes):
        r = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        g = torch.exp(-(r**2) / (2 * (n / 8) ** 2))
        shape = [1] * len(sizes)
        shape[d] = n
        w = g.reshape(shape) if w is None else w * g.reshape(shape)
    return (w / w.max()).clamp_min(1e-3)


def pad_spatial(a: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the last ``len(size)`` axes of ``a`` up to ``size``, centred, by reflection (edge
    replication when a side is too short to reflect), as the training crops were padded.

    Returns the padded array and the slices that crop it back to ``a``'s extent.
    """
    n = len(size)
    sides = a.shape[-n:]
    pads = [max(0, int(t) - s) for t, s in zip(size, sides)]
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, sides))
    if not any(pads):
        return a, crop
    mode = "reflect" if all(p < s for p, s in zip(pads, sides)) else "edge"
    width = [(0, 0)] * (a.ndim - n) + [(p // 2, p - p // 2) for p in pads]
    return np.pad(a, width, mode=mode), crop


def blend_windows(
    t: torch.Tensor,
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    tile: int | Sequence[int],
    overlap: float = WINDOW_OVERLAP,
) -> dict[str, torch.Tensor]:
    """Apply ``fn`` window by window and blend its outputs with :func:`gaussian_window`.

    Parameters
    ----------
    t : (B, C, *S) Tensor
        Slices ``S = (H, W)`` or blocks ``S = (D, H, W)``, at least as large as the window
        along each of its axes.
    fn : callable
        Maps a ``(B, C, *window)`` window to a dict of ``(B, c, *window)`` tensors.
    tile : int or sequence of int
        Window side (square 2D windows) or size along the last ``len(tile)`` axes.
    overlap : float
        Share of a window overlapped by its neighbours.

    Returns
    -------
    dict of (B, c, *S) float32 tensors
    """
    window = _sizes(tile)
    spatial = tuple(t.shape[-len(window) :])
    if any(s < w for s, w in zip(spatial, window)):
        raise ValueError(f"inputs of {' x '.join(map(str, spatial))} are smaller than the {window} window")
    weight = gaussian_window(window, t.device)
    total = torch.zeros(spatial, dtype=torch.float32, device=t.device)
    acc: dict[str, torch.Tensor] = {}
    starts = [window_starts(n, w, overlap) for n, w in zip(spatial, window)]
    for corner in itertools.product(*starts):
        win = (Ellipsis, *(slice(c, c + w) for c, w in zip(corner, window)))
        for key, value in fn(t[win]).items():
            if key not in acc:
                acc[key] = torch.zeros((*value.shape[:2], *spatial), dtype=torch.float32, device=t.device)
            acc[key][win] += value.float() * weight
        total[win] += weight
    for v in acc.values():
        v /= total  # in place: no second (B, c, *S) buffer
    return acc
