"""Which slice should I label next? Uncertainty maps and a diverse ranking of unannotated slices.

A trained model is run over the whole volume, one batch of slices at a time (lazy zarr/dask
volumes are never loaded whole). For every voxel it gives an *uncertainty*: the method's
:meth:`~semiseg.methods.base.Method.uncertainty` (predictive entropy by default; a method may
override it, e.g. teacher/student disagreement). Optional test-time augmentation (TTA) averages
the 8 flips/90-degree rotations of each slice, each mapped back by its exact inverse.

Each unannotated slice then gets a *benefit score*, its uncertainty mass where it matters::

    roi   = dilate(p_foreground >= threshold, disc of radius margin)
    score = sum_roi u + outside_weight * mean_(not roi) u

``p_foreground = 1 - p_background`` is the probability that a pixel belongs to any class, so the
region of interest (ROI) holds every pixel the model thinks *may* be foreground (doubtful
detections and the soft band along boundaries, where the errors of a segmentation are) plus a
margin of context around it. Uncertainty outside the ROI is background haze: tiny per pixel
but summed over a large empty slice it would outweigh a genuinely unsure lesion, and it would
grow with the slice size. It therefore enters only as its *mean*, worth ``outside_weight``
pixels (default 1, i.e. at most one fully unsure pixel): it orders slices where the model sees
nothing at all, but never outweighs a real candidate region, whatever the slice size. Inside
the ROI a *sum* (not a mean) is used, so that a slice with more uncertain structure is worth
more than a slice with a single unsure pixel.

Slices are then picked greedily: the best slice is taken, and the scores of the remaining ones
are multiplied by ``1 - exp(-d^2 / (2 spacing^2))`` for their distance ``d`` (in slices) to each
picked *or already annotated* slice, so suggestions spread through the volume instead of
piling up on neighbouring, nearly identical slices (the greedy diversity step of batch active
learning, as in core-set / BADGE style selection).

References
----------
.. [1] B. Settles, "Active learning literature survey", University of Wisconsin-Madison
   Computer Sciences Technical Report 1648, 2009 (uncertainty sampling, predictive entropy).
.. [2] G. Wang, W. Li, M. Aertsen, J. Deprest, S. Ourselin, T. Vercauteren, "Aleatoric
   uncertainty estimation with test-time augmentation for medical image segmentation with
   convolutional neural networks", Neurocomputing 338, 2019 (TTA uncertainty).
.. [3] L. Yang, Y. Zhang, J. Chen, S. Zhang, D. Z. Chen, "Suggestive annotation: a deep active
   learning framework for biomedical image segmentation", MICCAI 2017 (uncertainty plus
   representativeness when suggesting what to annotate).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage as ndi

from .data import HEALTHY, _check_tags, as_channels, check_context, stack_context, validate_labels
from .errors import InputError
from .inference import apply_in_windows, apply_to_slices, read_slices, volume_slab_plan
from .methods.base import Method, predictive_entropy
from .model import Model
from .progress import Progress, run

__all__ = [
    "TTA_TRANSFORMS",
    "Suggestion",
    "UncertaintyResult",
    "annotated_slices",
    "format_suggestions",
    "iter_uncertainty",
    "rank_slices",
    "slice_density",
    "slice_descriptors",
    "slice_scores",
    "suggest_slices",
    "tta_forward",
    "tta_inverse",
    "uncertainty_slices",
    "uncertainty_volume",
]

#: The 8 symmetries of the square as ``(quarter turns, mirror)``; the first is the identity.
TTA_TRANSFORMS: tuple[tuple[int, bool], ...] = tuple((k, f) for f in (False, True) for k in range(4))


class Suggestion(NamedTuple):
    """One suggested slice.

    Attributes
    ----------
    index : int
        Slice index along the model's slicing axis.
    score : float
        Benefit score after the diversity penalty, at the time it was picked (non-increasing
        down the list).
    mass : float
        Benefit score before the penalty (the slice's uncertainty mass where it matters).
    """

    index: int
    score: float
    mass: float


@dataclasses.dataclass
class UncertaintyResult:
    """Output of :func:`iter_uncertainty`.

    Attributes
    ----------
    uncertainty : (Z, Y, X) float32 array
        Per-voxel uncertainty (numpy, or the ``out`` array that was passed).
    mass : (n_slices,) float64 ndarray
        Benefit score of every slice along ``axis`` (see :func:`slice_scores`).
    axis : int
        The model's slicing axis.
    peak : float or None
        Largest uncertainty of the volume (to set a display range without reading a lazy
        ``uncertainty`` again).
    descriptors : (n_slices, D) float32 ndarray or None
        A small thumbnail of every normalised slice (:func:`slice_descriptors`), for the
        density weighting of :func:`rank_slices`.
    """

    uncertainty: object
    mass: np.ndarray
    axis: int
    peak: float | None = None
    descriptors: np.ndarray | None = None


# ----------------------------------------------------------------------------- TTA
def tta_forward(x: torch.Tensor, transform: tuple[int, bool]) -> torch.Tensor:
    """Apply ``(k, mirror)`` to the last two axes: ``k`` quarter turns, then a left-right flip."""
    k, mirror = transform
    y = torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
    return torch.flip(y, dims=(-1,)) if mirror else y


def tta_inverse(y: torch.Tensor, transform: tuple[int, bool]) -> torch.Tensor:
    """Exact inverse of :func:`tta_forward`: ``tta_inverse(tta_forward(x, t), t) == x``."""
    k, mirror = transform
    x = torch.flip(y, dims=(-1,)) if mirror else y
    return torch.rot90(x, -k, dims=(-2, -1)) if k % 4 else x


def _overrides_uncertainty(method: Method) -> bool:
    return type(method).uncertainty is not Method.uncertainty


def uncertainty_slices(
    method: Method,
    x: np.ndarray,
    *,
    tile_size: int | None,
    tta: bool = False,
    window: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Uncertainty and class probabilities of a stack of normalised slices.

    Parameters
    ----------
    method : Method
    x : (B, C, H, W) float32 ndarray
        Normalised slices of any size, predicted whole or in windows (see
        :func:`semiseg.inference.apply_to_slices`); for a 3D method one ``(1, C, D, H, W)``
        block, predicted in its 3D windows (the outputs then have that ``D`` axis too).
    tta : bool
        Average over the 8 flips/rotations (:data:`TTA_TRANSFORMS`), each mapped back by its
        inverse. With the default uncertainty this is the entropy of the averaged probabilities
        (it grows where the augmented predictions disagree); a method that overrides
        ``uncertainty`` gets its maps averaged.
    tile_size : int or None
        Window side (the model's :attr:`~semiseg.model.Model.tile_size`; None: whole slices).
    window : (D, H, W) sequence of int, optional
        3D methods: the model's :meth:`~semiseg.model.Model.volume_window` (None: whole
        blocks); ignored by 2D methods.

    Returns
    -------
    uncertainty : (B, H, W) float32 ndarray
    probabilities : (B, K, H, W) float32 ndarray
    """
    custom = _overrides_uncertainty(method)
    transforms = TTA_TRANSFORMS if tta else TTA_TRANSFORMS[:1]

    def maps(t: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = unc = None
        for tf in transforms:
            xt = tta_forward(t, tf)
            p = tta_inverse(method.predict(xt)["probabilities"].float(), tf)
            probs = p if probs is None else probs + p
            if custom:
                u = tta_inverse(method.uncertainty(xt).float(), tf)
                unc = u if unc is None else unc + u
        out = {"probabilities": probs / len(transforms)}
        if custom:
            out["uncertainty"] = (unc / len(transforms))[:, None]
        return out

    if getattr(method, "spatial_dims", 2) == 3:  # x is (1, C, D, H, W): one block of a volume
        res = apply_in_windows(method, x, maps, window)
    else:
        res = apply_to_slices(method, x, maps, tile_size=tile_size)
    probs = res["probabilities"]
    unc = res["uncertainty"][:, 0] if custom else predictive_entropy(probs)
    return unc.cpu().numpy().astype(np.float32), probs.cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------- scores
def _disc(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= r * r


def slice_scores(
    uncertainty: np.ndarray,
    probabilities: np.ndarray,
    *,
    threshold: float = 0.1,
    margin: int = 4,
    outside_weight: float = 1.0,
) -> np.ndarray:
    """Benefit score of each slice: its uncertainty mass where it matters.

    Parameters
    ----------
    uncertainty : (B, H, W) ndarray
    probabilities : (B, K, H, W) ndarray
        Class probabilities, class 0 the background.
    threshold : float
        Pixels with ``1 - p_background >= threshold`` may be foreground and seed the region of
        interest.
    margin : int
        Radius (pixels) of the disc the region of interest is dilated by.
    outside_weight : float
        Weight of the *mean* uncertainty outside the region of interest, in pixels (0 ignores
        the background).

    Returns
    -------
    (B,) float64 ndarray
        ``sum_roi(u) + outside_weight * mean_outside(u)``.

    Raises
    ------
    ValueError
        On out-of-range settings or mismatched shapes.
    """
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    if margin < 0:
        raise ValueError("margin must be >= 0")
    if not 0 <= outside_weight < np.inf:
        raise ValueError("outside_weight must be >= 0 and finite")
    u = np.asarray(uncertainty, np.float64)
    p = np.asarray(probabilities)
    if p.ndim != 4 or u.shape != (p.shape[0], *p.shape[2:]):
        raise ValueError(f"uncertainty {u.shape} and probabilities {p.shape} do not match")
    seed = (1.0 - p[:, 0]) >= threshold
    if margin and seed.any():
        roi = ndi.binary_dilation(seed, structure=_disc(margin)[None])
    else:
        roi = seed
    inside = np.where(roi, u, 0.0).reshape(len(u), -1).sum(1)
    outside = np.where(roi, 0.0, u).reshape(len(u), -1).sum(1)
    n_out = (~roi).reshape(len(u), -1).sum(1)
    return inside + outside_weight * outside / np.maximum(n_out, 1)


#: Side of the thumbnail that describes a slice for the density weighting.
DESCRIPTOR_SIDE = 16
#: At most this many slices serve as the reference set of :func:`slice_density`.
DENSITY_REFERENCES = 512


def slice_descriptors(x: np.ndarray, side: int = DESCRIPTOR_SIDE) -> np.ndarray:
    """Thumbnails of normalised slices: ``(B, C, H, W)`` -> ``(B, C * side * side)`` float32.

    Area averaging removes noise and texture, so two slices are close when their anatomy (what
    is where, how bright) is alike.
    """
    t = torch.as_tensor(np.asarray(x, np.float32))
    return torch.nn.functional.adaptive_avg_pool2d(t, side).flatten(1).numpy()


def slice_density(descriptors: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """How typical each slice is of the volume: mean similarity to the other slices, in (0, 1].

    Similarity is a Gaussian kernel on descriptor distances with the median squared distance
    as bandwidth; the result is scaled so the most typical slice has density 1. Large volumes
    are compared with a seeded sample of :data:`DENSITY_REFERENCES` slices.

    This is the *information density* of Settles & Craven (2008): multiplied into an
    uncertainty score it prefers uncertain slices that resemble many others over outliers
    (e.g. the nearly empty end slices of a scan), whose labels teach the model little about
    the rest of the volume.
    """
    d = np.asarray(descriptors, np.float64)
    n = len(d)
    if n < 2:
        return np.ones(n)
    ref = d
    if n > DENSITY_REFERENCES:
        ref = d[np.random.default_rng(seed).choice(n, DENSITY_REFERENCES, replace=False)]
    sq = (d**2).sum(1)[:, None] + (ref**2).sum(1)[None] - 2 * d @ ref.T
    sq = np.maximum(sq, 0.0)
    positive = sq[sq > 1e-12]
    if positive.size == 0:  # every slice alike
        return np.ones(n)
    dens = np.exp(-sq / (2 * np.median(positive))).mean(1)
    return dens / dens.max()


def annotated_slices(labels, tags=None, *, axis: int = 0) -> np.ndarray:
    """Boolean ``(n_slices,)``: slices holding a nonzero label or tagged healthy.

    Unlike :func:`semiseg.data.make_pools` this accepts volumes with no annotation at all.
    """
    labels = np.asarray(labels)
    n = labels.shape[axis]
    painted = np.moveaxis(labels, axis, 0).reshape(n, -1).any(axis=1)
    return painted | (_check_tags(tags, n) == HEALTHY)


def rank_slices(
    scores: np.ndarray,
    *,
    n: int = 3,
    exclude=None,
    spacing: float = 2.0,
) -> list[Suggestion]:
    """Greedy diverse selection of the best ``n`` slices.

    Parameters
    ----------
    scores : (n_slices,) array of float >= 0
        Benefit of labelling each slice.
    n : int
        Number of suggestions (fewer when fewer slices are left).
    exclude : (n_slices,) bool array or sequence of int, optional
        Already annotated slices: never suggested, and they repel suggestions like picked ones.
    spacing : float
        Length scale (slices) of the diversity penalty ``1 - exp(-d^2 / (2 spacing^2))``
        applied once per picked or annotated slice at distance ``d``; 0 turns it off.

    Returns
    -------
    list of Suggestion
        Best first. Ties go to the slice farthest from the picked and annotated ones, then to
        the lower index, so the result is deterministic (and evenly spread when every score
        is equal).

    Raises
    ------
    ValueError
        For ``n < 1``, negative spacing or non-finite scores.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError("scores must be one value per slice")
    if n < 1:
        raise ValueError("n must be at least 1")
    if spacing < 0:
        raise ValueError("spacing must be >= 0")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    size = len(scores)
    taken = np.zeros(size, bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            if ex.shape != (size,):
                raise ValueError(f"exclude must have one entry per slice ({size})")
            taken |= ex
        else:
            taken[ex.astype(int)] = True
    z = np.arange(size, dtype=np.float64)
    adjusted = scores.copy()

    def repel(i):
        if spacing > 0:
            adjusted[:] *= 1.0 - np.exp(-((z - i) ** 2) / (2.0 * spacing**2))

    for i in np.flatnonzero(taken):
        repel(i)
    out: list[Suggestion] = []
    while len(out) < n and not taken.all():
        cand = np.where(taken, -np.inf, adjusted)
        best = np.flatnonzero(cand >= cand.max() - 1e-12 * abs(cand.max()))
        if len(best) > 1 and taken.any():
            # Ties (e.g. a model that is certain everywhere): farthest from what is taken.
            far = np.abs(best[:, None] - np.flatnonzero(taken)[None]).min(1)
            best = best[far == far.max()]
        i = int(best[0])  # then the lowest index, so the result is deterministic
        out.append(Suggestion(i, float(adjusted[i]), float(scores[i])))
        taken[i] = True
        repel(i)
    return out


# ----------------------------------------------------------------------------- volumes
def iter_uncertainty(
    model: Model,
    image,
    *,
    tta: bool = False,
    batch_size: int = 8,
    out=None,
    threshold: float = 0.1,
    margin: int = 4,
    outside_weight: float = 1.0,
) -> Generator[Progress, None, UncertaintyResult]:
    """Uncertainty of every voxel and benefit score of every slice, batch by batch.

    Parameters
    ----------
    model : Model
    image : (Z, Y, X) or (C, Z, Y, X) array-like
        Raw image (numpy, dask, zarr); read ``batch_size`` slices at a time, never modified.
    tta : bool
        Test-time augmentation over the 8 flips/rotations (8 times slower).
    batch_size : int
        Slices per forward pass.
    out : (Z, Y, X) array, optional
        Preallocated float32 array (numpy or zarr) to write the uncertainty into.
    threshold, margin, outside_weight
        See :func:`slice_scores`.

    Yields
    ------
    Progress
        ``phase="uncertainty"``, ``step`` slices done of ``total``.

    Returns
    -------
    UncertaintyResult

    Raises
    ------
    InputError
        On a channel mismatch or a bad batch size.
    """
    image = as_channels(image)
    method = model.method
    if image.shape[0] != model.in_channels:
        raise InputError(f"model expects {model.in_channels} channel(s), the image has {image.shape[0]}")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    slice_scores(np.zeros((1, 1, 1)), np.ones((1, 2, 1, 1)), threshold=threshold, margin=margin,
                 outside_weight=outside_weight)  # validate settings before any work
    check_context(model.context, image.shape[model.axis + 1])
    axis = model.axis
    spatial = tuple(image.shape[1:])
    n = spatial[axis]
    if out is None:
        out = np.zeros(spatial, np.float32)
    elif tuple(out.shape) != spatial:
        raise InputError(f"out has shape {tuple(out.shape)}, expected {spatial}")
    mass = np.zeros(n, np.float64)
    descriptors = None
    peak = 0.0
    start = time.perf_counter()
    yield Progress(0, n, {}, 0.0, phase="uncertainty")
    volumetric = getattr(method, "spatial_dims", 2) == 3
    if volumetric:  # 3D methods: slabs with a halo of the window depth, as predict_volume
        plan = volume_slab_plan(model, spatial, batch_size)
    else:
        plan = [(s, min(n, s + batch_size), s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    for s, e, rs, re in plan:
        if volumetric:
            unc, probs, x = _uncertainty_3d(model, image, s, e, rs, re, tta=tta)
        else:
            raw, rows = read_slices(image, axis, s, e, model.context)
            x = model.normaliser(raw, channel_axis=1)  # (B, C, H, W), or with the context's neighbours
            if rows is not None:  # the network sees each slice with its context; descriptors do not
                unc, probs = uncertainty_slices(method, stack_context(x, rows), tta=tta, tile_size=model.tile_size)
                x = x[rows[:, model.context]]
            else:
                unc, probs = uncertainty_slices(method, x, tta=tta, tile_size=model.tile_size)
        mass[s:e] = slice_scores(unc, probs, threshold=threshold, margin=margin, outside_weight=outside_weight)
        desc = slice_descriptors(x)
        if descriptors is None:
            descriptors = np.zeros((n, desc.shape[1]), np.float32)
        descriptors[s:e] = desc
        put = [slice(None)] * 3
        put[axis] = slice(s, e)
        out[tuple(put)] = np.moveaxis(unc, 0, axis)
        peak = max(peak, float(unc.max(initial=0.0)))
        yield Progress(e, n, {}, time.perf_counter() - start, phase="uncertainty")
    return UncertaintyResult(out, mass, axis, peak, descriptors)


def _uncertainty_3d(model: Model, image, s: int, e: int, rs: int, re: int, *, tta: bool):
    """Uncertainty ``(B, H, W)``, probabilities ``(B, K, H, W)`` and normalised slices
    ``(B, C, H, W)`` of slab ``[s, e)`` of a 3D model, read with its halo ``[rs, re)`` and
    predicted in the model's 3D windows (:func:`semiseg.inference.volume_slab_plan`)."""
    axis = model.axis
    idx = [slice(None)] * 4
    idx[axis + 1] = slice(rs, re)
    raw = np.asarray(image[tuple(idx)], dtype=np.float32)
    block = model.normaliser(np.moveaxis(raw, axis + 1, 1), channel_axis=0)[None]  # (1, C, D, H, W)
    unc, probs = uncertainty_slices(model.method, block, tta=tta, tile_size=model.tile_size,
                                    window=model.volume_window())
    keep = slice(s - rs, e - rs)
    return unc[0, keep], np.moveaxis(probs[0][:, keep], 1, 0), np.moveaxis(block[0][:, keep], 1, 0)


def uncertainty_volume(model: Model, image, *, tta: bool = False, batch_size: int = 8) -> np.ndarray:
    """Per-voxel uncertainty ``(Z, Y, X)`` float32 of a whole volume.

    Parameters
    ----------
    model : Model
    image : (Z, Y, X) or (C, Z, Y, X) array-like
        Raw image, read one batch of slices at a time (works on lazy zarr/dask input).
    tta : bool
        Test-time augmentation over flips and 90-degree rotations.
    batch_size : int

    Returns
    -------
    (Z, Y, X) float32 ndarray
        ``model.method.uncertainty`` (predictive entropy by default, in nats).
    """
    return run(iter_uncertainty(model, image, tta=tta, batch_size=batch_size)).uncertainty


def suggest_slices(
    model: Model,
    image,
    labels,
    *,
    n: int = 3,
    tags=None,
    tta: bool = False,
    batch_size: int = 8,
    spacing: float = 2.0,
    threshold: float = 0.1,
    margin: int = 4,
    outside_weight: float = 1.0,
    density_weight: float = 0.0,
    result: UncertaintyResult | None = None,
) -> list[Suggestion]:
    """The unannotated slices most worth labelling next, best first.

    Parameters
    ----------
    model : Model
        Any registered method; only ``method.predict`` and ``method.uncertainty`` are used.
    image : (Z, Y, X) or (C, Z, Y, X) array-like
    labels : (Z, Y, X) integer array
        Current annotations; slices holding a nonzero label are never suggested.
    n : int
        Number of suggestions.
    tags : (n_slices,) array of {-1, 0, 1}, optional
        Weak tags; slices tagged healthy count as annotated.
    tta : bool
        Test-time augmentation (8x slower).
    batch_size : int
    spacing : float
        Diversity length scale in slices (see :func:`rank_slices`).
    threshold, margin, outside_weight
        Region-of-interest settings of :func:`slice_scores`.
    density_weight : float
        Exponent of the information density (:func:`slice_density`) the uncertainty mass is
        multiplied by; 0 (default) ranks by uncertainty mass alone. Off by default: in the
        active-learning benchmark (docs/benchmarks-active-learning.md) weight 1 did worse on the phantom, slightly better on digits.
    result : UncertaintyResult, optional
        A finished :func:`iter_uncertainty` pass to reuse (e.g. after the labels changed but
        not the model); ``image`` is then not read.

    Returns
    -------
    list of Suggestion
        ``(index, score, mass)`` tuples; empty when every slice is annotated.

    Raises
    ------
    InputError
        When labels do not match the image, or on bad tags or settings.
    """
    if n < 1:
        raise InputError("n must be at least 1")
    if not 0 <= density_weight < np.inf:
        raise InputError("density_weight must be >= 0 and finite")
    if result is None:
        spatial = tuple(as_channels(image).shape[1:])
    else:
        spatial = tuple(result.uncertainty.shape)
    labels = validate_labels(labels, spatial)
    done = annotated_slices(labels, tags, axis=model.axis)
    if result is None:
        result = run(
            iter_uncertainty(
                model, image, tta=tta, batch_size=batch_size, threshold=threshold,
                margin=margin, outside_weight=outside_weight,
            )
        )
    scores = np.asarray(result.mass, np.float64)
    if density_weight and result.descriptors is not None:
        scores = scores * slice_density(result.descriptors) ** density_weight
    try:
        return rank_slices(scores, n=n, exclude=done, spacing=spacing)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def format_suggestions(suggestions: Sequence[Suggestion]) -> str:
    """One line per suggestion, the slice index first: ``<i>  score <s>  mass <m>``."""
    return "\n".join(f"{s.index:d}  score {s.score:.4g}  mass {s.mass:.4g}" for s in suggestions)
