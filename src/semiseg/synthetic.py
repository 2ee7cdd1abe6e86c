"""Seeded synthetic samples: a scan-like tumour phantom and the cluttered-digits task.

Both return a :class:`Sample` with the image, the full ground truth, sparse labels (K annotated
slices, as a user would paint them) and weak per-slice tags. Nothing is downloaded: the digits
come from scikit-learn's bundled 8x8 digits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi

from .data import DISEASED, HEALTHY

__all__ = ["PLACEMENTS", "Sample", "make_digits", "make_phantom", "make_sample", "sparse_labels"]


@dataclasses.dataclass
class Sample:
    """A synthetic volume with its truth.

    Attributes
    ----------
    image : (Z, Y, X) ndarray
    truth : (Z, Y, X) uint8 ndarray
        Full ground truth (0 background, 1 target).
    labels : (Z, Y, X) uint8 ndarray
        Truth copied into the annotated slices only.
    tags : (Z,) int8 ndarray
        Weak tags: 0 healthy, 1 diseased, -1 unknown.
    name : str
    """

    image: np.ndarray
    truth: np.ndarray
    labels: np.ndarray
    tags: np.ndarray
    name: str

    @property
    def annotated(self) -> np.ndarray:
        return np.flatnonzero(self.labels.reshape(len(self.labels), -1).any(1))


#: How annotated slices are placed among the candidates (see :func:`sparse_labels`).
PLACEMENTS = ("even", "clustered", "random")


def sparse_labels(
    truth: np.ndarray,
    k: int,
    *,
    candidates: np.ndarray | None = None,
    placement: str = "even",
    seed: int = 0,
) -> np.ndarray:
    """Copy the truth of ``k`` slices (among ``candidates``) into empty labels.

    Parameters
    ----------
    truth : (Z, Y, X) ndarray
    k : int
        Number of slices to annotate; 0 gives empty labels.
    candidates : ndarray of int, optional
        Slices to choose from; default: slices holding any foreground.
    placement : {"even", "clustered", "random"}
        ``even``: evenly spaced quantiles of the candidates, like a user spreading labels
        through a scan. ``clustered``: ``k`` consecutive candidates starting at a seeded
        position in the first half of the candidates, like a user painting the slices around
        where they first saw the lesion. ``random``: ``k`` candidates drawn without
        replacement.
    seed : int
        Seeds ``clustered`` and ``random`` placement (``even`` ignores it).

    Raises
    ------
    ValueError
        For an unknown placement.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    labels = np.zeros_like(truth)
    if k <= 0:
        return labels
    if candidates is None:
        candidates = np.flatnonzero(truth.reshape(len(truth), -1).any(1))
    candidates = np.sort(np.asarray(candidates))
    if len(candidates) == 0:
        return labels
    k = min(k, len(candidates))
    if placement == "even":
        pos = np.round((np.arange(k) + 0.5) * len(candidates) / k - 0.5).astype(int)
    else:
        rng = np.random.default_rng([seed, 7411])  # its own stream: the volume's is untouched
        if placement == "clustered":
            # Contiguous among the candidates; starting in the first half leaves the other
            # half of the structure-bearing range unseen.
            start = int(rng.integers(0, max(1, (len(candidates) - k) // 2 + 1)))
            pos = np.arange(start, start + k)
        else:
            pos = np.sort(rng.choice(len(candidates), size=k, replace=False))
    for i in candidates[pos]:
        labels[i] = truth[i]
    return labels


def _smooth_noise(rng, shape, sigma, *, scale=1.0):
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    n /= n.std() + 1e-8
    return n * scale


def make_phantom(
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (48, 128, 128),
    n_tumours: int | None = None,
    labelled: int = 5,
    noise: float = 0.04,
    placement: str = "even",
) -> Sample:
    """A CT/MRI-like phantom: textured organ, vessels, irregular tumours that push tissue aside.

    Tumours have random size, shape and contrast (darker or brighter than the organ) and occupy
    only part of the slices, so the rest are healthy. A smooth multiplicative bias field and
    Gaussian noise are added and the result is stored as uint16 like scanner output.

    Parameters
    ----------
    seed : int
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    shape : tuple of int
        ``(Z, Y, X)``.
    n_tumours : int, optional
        Default: 2 to 4 at random.
    labelled : int
        Slices whose truth is copied into ``labels``.
    noise : float
        Noise standard deviation relative to the organ intensity.
    placement : {"even", "clustered", "random"}
        Where the ``labelled`` slices lie (see :func:`sparse_labels`).

    Returns
    -------
    Sample
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    # Body and organ as perturbed ellipsoids; z is stretched so the organ spans most slices.
    body = (yy / 0.95) ** 2 + (xx / 0.95) ** 2 + _smooth_noise(rng, shape, 8, scale=0.05) < 1
    oc = rng.uniform(-0.1, 0.1, 3)
    orad = rng.uniform([1.1, 0.55, 0.55], [1.3, 0.7, 0.7])
    organ_d = sum(((c - o) / r) ** 2 for c, o, r in zip((zz, yy, xx), oc, orad))
    organ_field = organ_d + _smooth_noise(rng, shape, 6, scale=0.12)
    # Healthy anatomy intensities (before tumours): fat/muscle, textured parenchyma, vessels.
    tissue = np.where(body, 0.35 + _smooth_noise(rng, shape, 3, scale=0.03), 0.02)
    texture = _smooth_noise(rng, shape, 1.5, scale=0.035) + _smooth_noise(rng, shape, 4, scale=0.03)
    organ_val = 0.6 + texture
    vessels = np.zeros(shape, np.float32)
    for _ in range(rng.integers(3, 6)):
        p = oc + rng.uniform(-0.3, 0.3, 3) * orad
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        pts = []
        for _ in range(60):
            v = v + rng.normal(scale=0.25, size=3)
            v /= np.linalg.norm(v)
            p = p + 0.04 * v
            pts.append(p.copy())
        pts = np.asarray(pts)
        idx = np.round((pts + 1) / 2 * (np.array(shape) - 1)).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        vessels[tuple(idx[ok].T)] = 1
    vessels = ndi.gaussian_filter(ndi.binary_dilation(vessels > 0, iterations=2).astype(np.float32), 0.8)

    # Tumours: centres inside the organ, in a band of slices, so some slices stay healthy.
    n_t = int(rng.integers(2, 5)) if n_tumours is None else int(n_tumours)
    truth = np.zeros(shape, bool)
    dz = np.zeros(shape, np.float32)
    dy = np.zeros(shape, np.float32)
    dx = np.zeros(shape, np.float32)
    tumour_val = np.zeros(shape, np.float32)
    vox = 2.0 / (np.array(shape) - 1)
    for _ in range(n_t):
        for _try in range(50):
            c = oc + rng.uniform(-0.55, 0.55, 3) * orad * np.array([0.6, 1, 1])
            if sum(((ci - o) / r) ** 2 for ci, o, r in zip(c, oc, orad)) < 0.45:
                break
        r_px = rng.uniform(4, 13) * min(1.0, min(shape[1:]) / 96)
        r = r_px * vox[1:].mean()
        # Isotropic voxels, but a tumour spans at most a sixth of the slices so others stay healthy.
        rz = min(r_px * rng.uniform(0.8, 1.3), max(1.0, shape[0] / 6)) * vox[0]
        d = np.sqrt(((zz - c[0]) / rz) ** 2 + ((yy - c[1]) / r) ** 2 + ((xx - c[2]) / r) ** 2)
        blob = d + _smooth_noise(rng, shape, 3, scale=0.18) < 1
        blob = ndi.binary_opening(blob, iterations=1)
        # Mass effect: tissue is pushed radially away from the centre, fading with distance.
        push = 0.6 * r * np.exp(-((np.maximum(d - 0.6, 0)) ** 2) / 1.5)
        for arr, comp, sc in ((dz, zz - c[0], rz / r), (dy, yy - c[1], 1), (dx, xx - c[2], 1)):
            arr += push * comp / (d * r * sc + 1e-3) / sc
        contrast = rng.choice([-1, 1]) * rng.uniform(0.1, 0.3)
        tumour_val = np.where(blob, contrast * (0.8 + _smooth_noise(rng, shape, 2, scale=0.1)), tumour_val)
        truth |= blob
    # Warp the healthy anatomy by the displacement field (pull-back sampling).
    coords = np.stack([(zz - dz + 1) / vox[0], (yy - dy + 1) / vox[1], (xx - dx + 1) / vox[2]])
    organ_mask = ndi.map_coordinates((organ_field < 1).astype(np.float32), coords, order=1) > 0.5
    organ_val = ndi.map_coordinates(organ_val, coords, order=1, mode="nearest")
    vessels = ndi.map_coordinates(vessels, coords, order=1)
    organ_mask &= body
    truth &= organ_mask
    img = np.where(organ_mask, organ_val + 0.3 * vessels, tissue)
    soft = ndi.gaussian_filter(truth.astype(np.float32), 0.7)
    img = img + soft * np.where(truth, tumour_val, ndi.maximum_filter(tumour_val, 3) + ndi.minimum_filter(tumour_val, 3))
    bias = 1 + _smooth_noise(rng, shape, 30, scale=0.08)
    img = img * bias + rng.normal(scale=noise * 0.6, size=shape)
    image = np.clip(img * 1000 + 100, 0, 65535).astype(np.uint16)
    truth = truth.astype(np.uint8)
    has = truth.reshape(shape[0], -1).any(1)
    tags = np.where(has, DISEASED, HEALTHY).astype(np.int8)
    return Sample(image, truth, sparse_labels(truth, labelled, placement=placement, seed=seed), tags, "phantom")


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target


def make_digits(
    seed: int = 0,
    *,
    n_slices: int = 160,
    size: int = 48,
    scale: int = 3,
    clutter: int = 8,
    crop: int = 10,
    healthy_fraction: float = 0.5,
    labelled: int = 5,
    labelled_digit: int | None = None,
    split: str = "train",
    placement: str = "even",
) -> Sample:
    """The cluttered-digits task of Vorontsov et al. as a stack of 2D slices.

    Each *diseased* slice holds one digit at a random position on N(0, 0.01^2) background, with
    ``clutter`` crops of other digits pasted over it (maximum where they overlap); *healthy*
    slices are independent clutter-only canvases. The mask is ``digit > 0.5``.

    Parameters
    ----------
    seed : int
    n_slices : int
        Slices in the stack (diseased and healthy).
    size : int
        Canvas side (48 in the paper's simple/hard tasks).
    scale : int
        Upsampling of the 8x8 digits (3 gives 24x24 digits on 48x48).
    clutter : int
        Clutter pieces per canvas (8 simple, 24 hard).
    crop : int
        Side of clutter crops, taken from upsampled digits.
    healthy_fraction : float
        Share of healthy slices.
    labelled : int
        Diseased slices whose mask is copied into ``labels``.
    labelled_digit : int, optional
        Only annotate slices showing this digit (the paper annotates only 9s).
    split : {"train", "test"}
        Digits 0..1199 feed ``train``, the rest ``test``, clutter included.

    Returns
    -------
    Sample
    """
    rng = np.random.default_rng(seed)
    images, targets = _digits()
    cut = 1200
    sel = slice(0, cut) if split == "train" else slice(cut, None)
    images, targets = images[sel], targets[sel]
    big = np.kron(images, np.ones((scale, scale), np.float32))
    big = np.stack([ndi.gaussian_filter(b, 0.5 * (scale > 1)) for b in big])
    big /= big.max(axis=(1, 2), keepdims=True)
    dsz = big.shape[-1]
    if dsz >= size or crop > dsz:
        raise ValueError("digits and crops must be smaller than the canvas")
    n_healthy = round(n_slices * healthy_fraction)
    healthy = np.zeros(n_slices, bool)
    healthy[rng.choice(n_slices, n_healthy, replace=False)] = True
    image = np.zeros((n_slices, size, size), np.float32)
    truth = np.zeros((n_slices, size, size), np.uint8)
    which = np.full(n_slices, -1)
    for i in range(n_slices):
        canvas = rng.normal(0, 0.01, (size, size)).astype(np.float32)
        if not healthy[i]:
            j = int(rng.integers(len(big)))
            y, x = rng.integers(0, size - dsz + 1, 2)
            canvas[y : y + dsz, x : x + dsz] = np.maximum(canvas[y : y + dsz, x : x + dsz], big[j])
            truth[i, y : y + dsz, x : x + dsz] = big[j] > 0.5
            which[i] = targets[j]
        for _ in range(clutter):
            src = big[int(rng.integers(len(big)))]
            sy, sx = rng.integers(0, dsz - crop + 1, 2)
            y, x = rng.integers(0, size - crop + 1, 2)
            canvas[y : y + crop, x : x + crop] = np.maximum(
                canvas[y : y + crop, x : x + crop], src[sy : sy + crop, sx : sx + crop]
            )
        image[i] = canvas
    cand = np.flatnonzero(~healthy)
    if labelled_digit is not None:
        cand = cand[which[cand] == labelled_digit]
    labels = sparse_labels(truth, labelled, candidates=cand, placement=placement, seed=seed)
    tags = np.where(healthy, HEALTHY, DISEASED).astype(np.int8)
    return Sample(image, truth, labels, tags, "digits")


def make_sample(kind: str = "phantom", seed: int = 0, labelled: int = 5, **kwargs) -> Sample:
    """Make the named sample: ``phantom`` or ``digits``."""
    if kind == "phantom":
        return make_phantom(seed, labelled=labelled, **kwargs)
    if kind == "digits":
        return make_digits(seed, labelled=labelled, **kwargs)
    raise ValueError(f"unknown sample kind {kind!r}; choose phantom or digits")


