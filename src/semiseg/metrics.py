"""Segmentation metrics."""

from __future__ import annotations

import numpy as np

__all__ = ["dice_per_class", "slice_mask"]


def slice_mask(n: int, exclude=None) -> np.ndarray:
    """Boolean ``(n,)`` selecting slices not in ``exclude``."""
    keep = np.ones(n, bool)
    if exclude is not None:
        keep[np.asarray(exclude, int)] = False
    return keep


def dice_per_class(pred, truth, *, classes=None, exclude_slices=None) -> dict[int, float]:
    """Hard Dice of each foreground class over the whole volume.

    Parameters
    ----------
    pred, truth : (Z, Y, X) integer arrays
    classes : iterable of int, optional
        Classes to score; default: every nonzero class in either array.
    exclude_slices : array of int, optional
        Slices (along axis 0) left out, e.g. the annotated ones.

    Returns
    -------
    dict of int to float
        Dice per class; 1.0 when a class is absent from both.

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    keep = slice_mask(pred.shape[0], exclude_slices)
    pred, truth = pred[keep], truth[keep]
    if classes is None:
        classes = sorted((set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())) - {0})
    out = {}
    for c in classes:
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out[int(c)] = 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)
    return out
