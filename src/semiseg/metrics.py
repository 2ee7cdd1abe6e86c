"""Segmentation metrics."""

from __future__ import annotations

import numpy as np

__all__ = ["convergence_warning", "dice_per_class", "slice_mask"]


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


def convergence_warning(mask, labels, annotated, *, axis: int = 0, factor: float = 3.0) -> str | None:
    """A one-line warning when a prediction is clearly not converged, else None.

    Compares each foreground class's share of the predicted volume with the largest share it
    covers in any annotated slice: a class predicted over more than ``factor`` times that
    (and over 5 % of the volume), e.g. a mask that is 99.85 % foreground after a short run,
    or predicted nowhere although it is annotated, is flagged. It looks at nothing but the
    prediction and the user's own labels, so it cannot say a plausible prediction is right,
    only that an implausible one is noise.

    Parameters
    ----------
    mask : (Z, Y, X) integer array-like
        The predicted classes.
    labels : (Z, Y, X) integer array-like
        The user's labels (0: background / unannotated).
    annotated : sequence of int
        Slices along ``axis`` whose labels are complete (painted or tagged healthy).
    """
    annotated = [int(i) for i in annotated]
    if not annotated:
        return None
    lab = np.take(np.asarray(labels), annotated, axis=axis)
    pred = np.asarray(mask)
    per_slice = np.moveaxis(lab, axis, 0).reshape(len(annotated), -1)
    problems = []
    for k in np.unique(per_slice[per_slice > 0]):
        ref = float((per_slice == k).mean(axis=1).max())
        got = float((pred == k).mean())
        if got == 0:
            problems.append(f"class {k} is predicted nowhere although it is annotated")
        elif got > max(factor * ref, 0.05):
            problems.append(f"class {k} covers {got:.0%} of the volume, at most {ref:.0%} of an annotated slice")
    if not problems:
        return None
    return "not converged: " + "; ".join(problems) + " (train longer, or check the labels)"
