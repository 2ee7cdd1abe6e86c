"""Seeded synthetic samples: a scan-like tumour phantom, a fluorescence nuclei stack, an MRI-like
head (brain extraction) and the cluttered-digits task.

All return a :class:`Sample` with the image, the full ground truth, sparse labels (K annotated
slices, as a user would paint them) and weak per-slice tags. Nothing is downloaded: the digits
come from scikit-learn's bundled 8x8 digits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi

from .data import DISEASED, HEALTHY

__all__ = [
    "PLACEMENTS", "SAMPLE_KINDS", "Sample", "make_digits", "make_head", "make_nuclei", "make_phantom", "make_sample",
    "sparse_labels",
]


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
    spacing : tuple of float
        Voxel spacing ``(Z, Y, X)`` relative to the in-plane pixel; ``(3, 1, 1)`` means slices
        three pixels apart.
    """

    image: np.ndarray
    truth: np.ndarray
    labels: np.ndarray
    tags: np.ndarray
    name: str
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def annotated(self) -> np.ndarray:
        return np.flatnonzero(self.labels.reshape(len(self.labels), -1).any(1))


#: The sample kinds :func:`make_sample` knows (CLI and benchmark choices).
SAMPLE_KINDS = ("phantom", "nuclei", "head", "digits")

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


def make_nuclei(
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (24, 160, 160),
    z_spacing: float = 3.0,
    n_clusters: int | None = None,
    labelled: int = 5,
    photons: float = 40.0,
    placement: str = "even",
) -> Sample:
    """A fluorescence-microscopy-like stack of clustered, touching nuclei with coarse Z steps.

    Nuclei are perturbed ellipsoids (radius 5-9 pixels in plane, about as deep in physical
    units) gathered in clusters where they touch, in a cell layer that leaves the top and bottom
    slices empty. Slices are ``z_spacing`` pixels apart, so a nucleus spans only a few slices.
    The image is formed like a widefield stack: textured (chromatin) brightness varying from
    nucleus to nucleus, an axially elongated point-spread function (three times wider in Z than
    in plane, physically), out-of-focus haze including that of nuclei just above and below the
    stack, intensity falling with depth, vignetting, Poisson photon noise and camera read noise,
    stored as uint16 with a camera offset.

    Parameters
    ----------
    seed : int
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    shape : tuple of int
        ``(Z, Y, X)``.
    z_spacing : float
        Slice spacing in in-plane pixels (the anisotropy).
    n_clusters : int, optional
        Default: 7 to 11 per 160 x 160 pixels at random.
    labelled : int
        Slices whose truth is copied into ``labels``.
    photons : float
        Expected photons at the brightest nucleus' centre near the top; lower is noisier.
    placement : {"even", "clustered", "random"}
        Where the ``labelled`` slices lie (see :func:`sparse_labels`).

    Returns
    -------
    Sample
        ``truth`` is the union of the nuclei (semantic, 0/1); slices without nuclei are tagged
        healthy; ``spacing`` is ``(z_spacing, 1, 1)``.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sz = float(z_spacing)
    depth = nz * sz
    area = ny * nx / 160**2
    scale = float(np.clip(min(ny, nx) / 160, 0.5, 1.0))
    n_cl = max(1, round(int(rng.integers(7, 12)) * area)) if n_clusters is None else int(n_clusters)
    # Nuclei centres (physical units: pixels) and radii; rejection keeps them touching, not merged.
    nuclei: list[tuple[np.ndarray, np.ndarray, float, float]] = []  # centre, radii, angle, brightness
    lo, hi = 0.22 * depth, 0.78 * depth  # the cell layer
    for _ in range(n_cl):
        cc = np.array([rng.uniform(lo, hi), rng.uniform(0.1, 0.9) * ny, rng.uniform(0.1, 0.9) * nx])
        for _ in range(int(rng.integers(4, 11))):
            for _try in range(30):
                r = rng.uniform(5, 9) * scale
                radii = np.array([r * rng.uniform(0.75, 1.0), r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15)])
                p = cc + rng.normal(scale=[1.0 * r, 1.8 * r, 1.8 * r])
                p[0] = np.clip(p[0], lo, hi)
                p[1:] = np.clip(p[1:], 0, [ny - 1, nx - 1])
                if all(np.linalg.norm((p - q) / [1, 1, 1]) > 0.85 * (radii.mean() + rq.mean()) for q, rq, _, _ in nuclei):
                    nuclei.append((p, radii, rng.uniform(0, np.pi), rng.uniform(0.45, 1.0)))
                    break
    # Nuclei just outside the stack: only their out-of-focus light reaches it.
    pad = 4  # slices rendered above and below, cropped after blurring
    outside = []
    for _ in range(max(1, round(int(rng.integers(3, 7)) * area))):
        r = rng.uniform(5, 9) * scale
        radii = np.array([0.9 * r, r, r])
        above = rng.random() < 0.5
        cz = -rng.uniform(1.3, 2.0) * radii[0] if above else depth - sz + rng.uniform(1.3, 2.0) * radii[0]
        outside.append((np.array([cz, rng.uniform(0, ny), rng.uniform(0, nx)]), radii, rng.uniform(0, np.pi), rng.uniform(0.45, 1.0)))
    full = (nz + 2 * pad, ny, nx)
    best = np.full(full, np.inf, np.float32)
    owner = np.full(full, -1, np.int32)
    zc = (np.arange(full[0], dtype=np.float32) - pad) * sz
    yc = np.arange(ny, dtype=np.float32)
    xc = np.arange(nx, dtype=np.float32)
    everything = nuclei + outside
    for i, (c, rad, ang, _) in enumerate(everything):
        ext = 1.4 * rad
        sl = []
        for coords, ci, e in zip((zc, yc, xc), c, ext):
            idx = np.flatnonzero(np.abs(coords - ci) <= e)
            sl.append(slice(idx[0], idx[-1] + 1) if len(idx) else slice(0, 0))
        if any(s.stop <= s.start for s in sl):
            continue
        z, y, x = np.meshgrid(zc[sl[0]] - c[0], yc[sl[1]] - c[1], xc[sl[2]] - c[2], indexing="ij")
        u = y * np.cos(ang) + x * np.sin(ang)
        v = -y * np.sin(ang) + x * np.cos(ang)
        d = np.sqrt((z / rad[0]) ** 2 + (u / rad[1]) ** 2 + (v / rad[2]) ** 2)
        box = tuple(sl)
        closer = d < best[box]
        best[box] = np.where(closer, d, best[box])
        owner[box] = np.where(closer, i, owner[box])
    # Irregular outlines: one smooth field perturbs every boundary (less along the coarse Z).
    best = best + _smooth_noise(rng, full, (0.7, 2.5, 2.5), scale=0.07)
    inside = best < 1
    bright = np.array([b for *_, b in everything] + [0.0], np.float32)[owner]
    chromatin = 1 + _smooth_noise(rng, full, (0.5, 1.2, 1.2), scale=0.12) + _smooth_noise(rng, full, (0.7, 3, 3), scale=0.08)
    signal = np.where(inside, bright * chromatin * (1.0 - 0.15 * np.clip(best, 0, 1) ** 4), 0).astype(np.float32)
    signal = np.maximum(signal, 0) + 0.04 * (1 + _smooth_noise(rng, full, (1, 8, 8), scale=0.5)).clip(0)  # autofluorescence
    # Widefield optics: a PSF three times longer in Z than in plane (physically) plus haze.
    psf = 1.0
    focused = ndi.gaussian_filter(signal, (3 * psf / sz, psf, psf))
    haze = ndi.gaussian_filter(signal, (8.0 / sz, 6.0, 6.0))
    img = (0.75 * focused + 0.35 * haze)[pad:pad + nz]
    zz = (np.arange(nz, dtype=np.float32) * sz)[:, None, None]
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny, dtype=np.float32), np.linspace(-1, 1, nx, dtype=np.float32), indexing="ij")
    img = img * np.exp(-zz / depth * np.log(2.5)) * (1 - 0.18 * (yy**2 + xx**2) / 2)
    counts = rng.poisson(photons * img + 2.0)
    adu = 100 + 4.0 * counts + rng.normal(scale=6.0, size=shape)
    image = np.clip(np.round(adu), 0, 65535).astype(np.uint16)
    truth = inside[pad:pad + nz].astype(np.uint8)
    has = truth.reshape(nz, -1).any(1)
    tags = np.where(has, DISEASED, HEALTHY).astype(np.int8)
    labels = sparse_labels(truth, labelled, placement=placement, seed=seed)
    return Sample(image, truth, labels, tags, "nuclei", (sz, 1.0, 1.0))


def make_head(
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (32, 224, 224),
    z_spacing: float = 4.0,
    labelled: int = 5,
    noise: float = 0.03,
    placement: str = "even",
) -> Sample:
    """A T1-weighted-MRI-like head with thick slices; the target is the brain (skull stripping).

    Unlike the phantom, each slice is much larger than a training crop and mostly air, and the
    target is one large structure whose edge is defined by anatomy rather than by contrast:
    bright scalp fat and grey muscle outside a dark skull, extra-axial CSF, a folded cortex of
    grey matter around white matter, dark CSF-filled sulci and ventricles inside the brain (part
    of the brain mask, as in brain-extraction masks). Partial-volume blur (wider across the thick
    slices), a smooth bias field and Rician noise (the magnitude of complex Gaussian noise) make
    the air textured, not constant. The stack runs from below the brain (neck and skull base
    only) to just above the head (air only), so its end slices are healthy.

    Parameters
    ----------
    seed : int
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    shape : tuple of int
        ``(Z, Y, X)``.
    z_spacing : float
        Slice spacing in in-plane pixels (the anisotropy; 4 is a clinical 4 mm axial series of
        1 mm pixels).
    labelled : int
        Slices whose truth is copied into ``labels``.
    noise : float
        Rician noise level relative to white matter's intensity (about 0.7).
    placement : {"even", "clustered", "random"}
        Where the ``labelled`` slices lie (see :func:`sparse_labels`).

    Returns
    -------
    Sample
        ``truth`` is the brain mask (0/1); slices without brain are tagged healthy; ``spacing``
        is ``(z_spacing, 1, 1)``.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sz = float(z_spacing)
    # Physical coordinates (pixels) around the head's centre, which sits low in the stack so the
    # first slices cut the skull base and the last ones pass above the vertex.
    half = 0.5 * min(ny, nx)
    ry, rx = half * rng.uniform(0.70, 0.78), half * rng.uniform(0.58, 0.64)
    rz = max(ry, 0.45 * nz * sz)
    zc = nz * sz * rng.uniform(0.36, 0.42)
    z = (np.arange(nz, dtype=np.float32) * sz - zc)[:, None, None]
    y = (np.arange(ny, dtype=np.float32) - ny / 2 + rng.uniform(-4, 4))[None, :, None]
    x = (np.arange(nx, dtype=np.float32) - nx / 2 + rng.uniform(-4, 4))[None, None, :]
    d = np.sqrt((z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2)  # 1 on the scalp's surface
    rough = lambda sigma, scale: _smooth_noise(rng, shape, (sigma / sz, sigma, sigma), scale=scale)  # noqa: E731
    d = d + rough(10, 0.02)
    brain_edge = 0.82 + rough(6, 0.012)
    # Below the brain (skull base, neck): no brain, only soft tissue inside the head's outline.
    d_base = np.sqrt(((z - 0.35 * rz) / (0.95 * rz)) ** 2 + (y / ry) ** 2 + (x / rx) ** 2)
    brain = (d < brain_edge) & (d_base < 1.0)  # rounded underside above the skull base
    # Cortex: a folded band of grey matter over white matter; sulci are thin CSF ridges of a
    # smooth noise field cutting into the band.
    fold = rough(3, 1.0)
    fold = fold / (fold.std() + 1e-6)
    wm_edge = brain_edge - 0.10 - 0.05 * np.tanh(fold)
    wm = brain & (d < wm_edge)
    sulci = brain & ~wm & (np.abs(fold) < 0.15) & (d > brain_edge - 0.09)
    # Ventricles: two ellipsoids beside the midline, above the centre.
    vent = np.zeros(shape, bool)
    for side in (-1, 1):
        cy, cx, cz = rng.uniform(-0.05, 0.1) * ry, side * rng.uniform(0.08, 0.13) * rx, rng.uniform(0.0, 0.15) * rz
        a = np.array([rng.uniform(0.25, 0.35) * ry, rng.uniform(0.05, 0.08) * rx, rng.uniform(0.12, 0.18) * rz])
        vent |= ((y - cy) / a[0]) ** 2 + ((x - cx) / a[1]) ** 2 + ((z - cz) / a[2]) ** 2 < 1
    vent &= wm
    head = d < 1.0
    img = np.zeros(shape, np.float32)
    img[head] = 0.85  # scalp fat
    img[head & (d < 0.965 - 0.03 * (np.abs(x) / rx) ** 4)] = 0.45  # muscle, thicker at the temples
    img[head & (d < 0.93)] = 0.12  # skull
    img[head & (d < 0.87)] = 0.16  # extra-axial CSF
    neck = head & (d_base >= 1.0) & (d < 0.87)
    img[neck] = 0.42 + 0.05 * np.tanh(fold[neck])  # soft tissue of the skull base
    img[brain] = 0.47  # grey matter
    img[wm] = 0.70
    img[sulci | vent] = 0.16
    img = img * (1 + rough(2, 0.03)) * np.where(head, 1.0, 0.0)
    img = ndi.gaussian_filter(img, (0.6, 0.7, 0.7))
    img = img * (1 + _smooth_noise(rng, shape, (40 / sz, 40, 40), scale=0.10))
    sigma = noise * 0.7
    img = np.sqrt((img + rng.normal(scale=sigma, size=shape)) ** 2 + rng.normal(scale=sigma, size=shape) ** 2)
    image = np.clip(np.round(img * 1000), 0, 65535).astype(np.uint16)
    truth = brain.astype(np.uint8)
    has = truth.reshape(nz, -1).any(1)
    tags = np.where(has, DISEASED, HEALTHY).astype(np.int8)
    labels = sparse_labels(truth, labelled, placement=placement, seed=seed)
    return Sample(image, truth, labels, tags, "head", (sz, 1.0, 1.0))


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
    """Make the named sample: ``phantom``, ``nuclei``, ``head`` or ``digits`` (see :data:`SAMPLE_KINDS`)."""
    if kind == "phantom":
        return make_phantom(seed, labelled=labelled, **kwargs)
    if kind == "nuclei":
        return make_nuclei(seed, labelled=labelled, **kwargs)
    if kind == "head":
        return make_head(seed, labelled=labelled, **kwargs)
    if kind == "digits":
        return make_digits(seed, labelled=labelled, **kwargs)
    raise ValueError(f"unknown sample kind {kind!r}; choose one of {', '.join(SAMPLE_KINDS)}")


