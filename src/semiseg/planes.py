"""Annotated planes: which voxels of a volume a sparse annotation covers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["annotated_voxel_mask"]


def annotated_voxel_mask(shape: tuple[int, int, int], planes: Iterable[tuple[int, int]]) -> np.ndarray:
    """Voxels covered by fully annotated planes.

    Parameters
    ----------
    shape : (Z, Y, X) tuple of int
        Spatial shape of the volume.
    planes : sequence of (axis, index)
        Each pair means "slice ``index`` along spatial axis ``axis`` (0, 1 or 2 of ``(Z, Y, X)``)
        is fully annotated" (painted, or tagged healthy: all background).

    Returns
    -------
    (Z, Y, X) bool ndarray
        True on the voxels of every listed plane, False elsewhere.

    Raises
    ------
    ValueError
        For a shape that is not 3D, an axis outside 0..2 or an index outside the volume.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (Z, Y, X), got {shape}")
    mask = np.zeros(shape, bool)
    for axis, index in planes:
        axis, index = int(axis), int(index)
        if axis not in (0, 1, 2):
            raise ValueError(f"plane axis must be 0, 1 or 2, got {axis}")
        if not 0 <= index < shape[axis]:
            raise ValueError(f"plane {index} is outside 0..{shape[axis] - 1} along axis {axis}")
        idx = [slice(None)] * 3
        idx[axis] = index
        mask[tuple(idx)] = True
    return mask
