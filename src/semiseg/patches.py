"""3D patch sampling for volumetric networks trained from sparsely annotated planes.

A patch is a ``(D, H, W)`` box of the volume seen with the training axis first. Its voxel
weights are 1 on the voxels of annotated planes (:func:`semiseg.planes.annotated_voxel_mask`)
and 0 elsewhere, so a loss weighted by them learns from the annotated voxels only while the
network sees the unannotated neighbours as context (Çiçek et al. 2016).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data import InputError, Normaliser, SlicePools, SliceSampler, _pad_to
from .planes import annotated_voxel_mask

__all__ = ["PatchSampler"]


class PatchSampler:
    """Draw augmented 3D patches, each holding at least one annotated voxel.

    Parameters
    ----------
    image : (C, Z, Y, X) array-like
        Raw image; may be lazy (zarr, dask). Whole slices along ``axis`` are read on demand,
        normalised and kept in a bounded LRU cache.
    labels : (Z, Y, X) integer ndarray
    planes : sequence of (axis, index)
        Fully annotated planes (see :func:`semiseg.planes.annotated_voxel_mask`).
    normaliser : Normaliser
    axis : int
        Training axis of ``(Z, Y, X)``: it becomes the patch depth ``D``.
    patch : (D, H, W) tuple of int
        Patch size in the training orientation; planes smaller than ``(H, W)`` are padded by
        reflection (padding has weight 0). ``D`` must not exceed the volume along ``axis``.
    augment : bool
        Random in-plane flips and 90 degree rotations (``H == W``) and mild intensity jitter.
    cache_bytes : int
        Memory budget of the normalised-slice cache.
    foreground_fraction : float
        Share of patches centred (in-plane) near a labelled voxel of their annotated plane.

    Raises
    ------
    InputError
        When the patch is deeper than the volume along ``axis`` or no plane is given.
    """

    def __init__(
        self,
        image,
        labels: np.ndarray,
        planes: Sequence[tuple[int, int]],
        normaliser: Normaliser,
        *,
        axis: int = 0,
        patch: tuple[int, int, int] = (16, 64, 64),
        augment: bool = True,
        cache_bytes: int = 2**30,
        foreground_fraction: float = 0.33,
    ):
        self.planes = [(int(a), int(i)) for a, i in planes]
        if not self.planes:
            raise InputError("no annotated plane: paint labels on at least one slice or tag one healthy")
        self.axis = int(axis)
        self.patch = tuple(int(p) for p in patch)
        n = labels.shape[self.axis]
        if self.patch[0] > n:
            raise InputError(f"patch depth {self.patch[0]} exceeds the {n} slices of the volume along axis {self.axis}")
        self.augment = augment
        self.foreground_fraction = float(foreground_fraction)
        # Whole slices come through a SliceSampler's bounded cache (lazy images stay lazy).
        empty = np.zeros(0, np.int64)
        self._slices = SliceSampler(
            image, labels, SlicePools(empty, empty, empty, empty, empty, empty, 2), normaliser,
            axis=self.axis, crop=max(self.patch[1:]), augment=False, cache_bytes=cache_bytes,
        )
        # Labels and weights in the training orientation, padded in-plane like the slices.
        order = [self.axis] + [a for a in range(3) if a != self.axis]
        self._order = order
        size = self.patch[1:]
        lab = np.transpose(np.asarray(labels), order)
        self.labels = _pad_to(lab, size)  # a view unless padded
        weight = np.transpose(annotated_voxel_mask(labels.shape, self.planes), order)
        ph, pw = max(0, size[0] - weight.shape[1]), max(0, size[1] - weight.shape[2])
        self.weight = np.pad(weight, [(0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)])
        self._offset = (0, ph // 2, pw // 2)
        painted = [lab_any(labels, p) for p in self.planes]
        self._painted = [p for p, has in zip(self.planes, painted) if has]

    def slice_image(self, i: int) -> np.ndarray:
        """Normalised ``(C, H, W)`` float32 slice ``i`` along the training axis (unpadded)."""
        return self._slices.slice_image(i)

    def _box(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """Start ``(d, y, x)`` (padded training orientation) of a patch through an annotated plane."""
        # Healthy planes are free all-background annotations and can outnumber painted ones:
        # draw half of the patches through painted planes, as SliceSampler does.
        pool = self._painted if self._painted and rng.random() < 0.5 else self.planes
        axis, index = pool[int(rng.integers(len(pool)))]
        dim = self._order.index(axis)  # the plane's dimension in the patch
        shape = self.labels.shape
        centre: list[int | None] = [None, None, None]
        centre[dim] = index + self._offset[dim]
        if rng.random() < self.foreground_fraction:
            # Small targets are rare in random patches: centre some on a labelled voxel of the
            # plane (nnU-Net oversamples foreground the same way).
            plane = np.take(self.labels, centre[dim], axis=dim)
            fg = np.nonzero(plane)
            if len(fg[0]):
                j = int(rng.integers(len(fg[0])))
                others = [d for d in range(3) if d != dim]
                for d, coords in zip(others, fg):
                    size = self.patch[d]
                    centre[d] = int(coords[j]) + int(rng.integers(-(size // 4), size // 4 + 1))
        starts = []
        for d in range(3):
            size, n = self.patch[d], shape[d]
            if centre[d] is None:
                starts.append(int(rng.integers(0, n - size + 1)))
            elif d == dim:  # any window along the plane's axis that holds the plane
                c = centre[d]
                starts.append(int(rng.integers(max(0, c - size + 1), min(c, n - size) + 1)))
            else:
                starts.append(int(np.clip(centre[d] - size // 2, 0, n - size)))
        return tuple(starts)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One patch: image ``(C, D, H, W)`` float32, labels and weights ``(D, H, W)``."""
        d0, y0, x0 = self._box(rng)
        d, h, w = self.patch
        img = np.stack(
            [_pad_to(self.slice_image(i), (h, w))[:, y0 : y0 + h, x0 : x0 + w] for i in range(d0, d0 + d)],
            axis=1,
        )
        box = (slice(d0, d0 + d), slice(y0, y0 + h), slice(x0, x0 + w))
        lab, wt = self.labels[box], self.weight[box]
        if self.augment:
            k = int(rng.integers(4)) if h == w else 2 * int(rng.integers(2))
            flip = bool(rng.integers(2))
            img, lab, wt = (np.rot90(a, k, axes=(-2, -1)) for a in (img, lab, wt))
            if flip:
                img, lab, wt = img[..., ::-1], lab[..., ::-1], wt[..., ::-1]
            c = img.shape[0]
            gain = rng.uniform(0.9, 1.1, size=(c, 1, 1, 1)).astype(np.float32)
            shift = rng.uniform(-0.1, 0.1, size=(c, 1, 1, 1)).astype(np.float32)
            img = img * gain + shift
        return (
            np.ascontiguousarray(img, dtype=np.float32),
            np.ascontiguousarray(lab, dtype=np.int64),
            np.ascontiguousarray(wt, dtype=np.float32),
        )

    def sample(self, rng: np.random.Generator, needs: dict[str, int]) -> dict[str, np.ndarray]:
        """A batch for ``needs["labelled"]`` patches.

        Returns
        -------
        dict
            ``labelled`` (B, C, D, H, W) float32, ``mask`` (B, D, H, W) int64 and ``weight``
            (B, D, H, W) float32 (1 on annotated voxels, 0 elsewhere).
        """
        n = needs.get("labelled", 0)
        parts = [self.draw(rng) for _ in range(max(1, n))]
        return {
            "labelled": np.stack([p[0] for p in parts]),
            "mask": np.stack([p[1] for p in parts]),
            "weight": np.stack([p[2] for p in parts]),
        }


def lab_any(labels: np.ndarray, plane: tuple[int, int]) -> bool:
    """Whether a plane ``(axis, index)`` of ``labels`` holds any nonzero label."""
    return bool(np.take(labels, plane[1], axis=plane[0]).any())
