"""Annotated planes: which slices, in which of the three planes, a user annotated fully.

A *plane* is a pair ``(axis, index)``: slice ``index`` along spatial axis ``axis`` of a
``(Z, Y, X)`` volume (0 = Z, axial; 1 = Y, coronal; 2 = X, sagittal) was annotated in full, so
its voxels that hold 0 are background. Biomedisa, nnInteractive and MONAI Label let users paint
a few axial slices and then a sagittal or coronal one; recording the planes keeps a slice
painted in one plane from making every crossing slice of the other planes look annotated (with
its unpainted voxels wrongly taken for background).

When no planes are recorded, the slices along the training axis that hold a nonzero label are
the annotated ones (:func:`planes_from_labels`), as before planes existed.

An empty listed slice is allowed and means "all background", like a healthy tag.

On disk the planes are a CSV with the header ``axis,index`` and one row per plane::

    axis,index
    0,3
    0,12
    2,40

and a model's history keeps them as ``"planes": [[axis, index], ...]``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "AXIS_NAMES",
    "annotated_voxel_mask",
    "as_planes",
    "describe_planes",
    "indices_along",
    "planes_from_labels",
    "read_planes_csv",
    "validate_planes",
    "write_planes_csv",
]

#: Plane names of the spatial axes of ``(Z, Y, X)``.
AXIS_NAMES = ("axial", "coronal", "sagittal")

#: One-line description of the CSV format, for error messages.
CSV_FORMAT = "a CSV with the header 'axis,index' and one row 'axis,index' per annotated slice (axis 0, 1 or 2)"

Plane = tuple[int, int]


def as_planes(planes: Iterable) -> tuple[Plane, ...]:
    """Normalise planes to sorted, de-duplicated ``(axis, index)`` tuples of ints.

    Parameters
    ----------
    planes : iterable of (axis, index) pairs
        Lists, tuples or an ``(N, 2)`` integer array.

    Returns
    -------
    tuple of (int, int)

    Raises
    ------
    InputError
        For an entry that is not a pair of whole numbers, an axis other than 0, 1, 2 or a
        negative index.
    """
    out = set()
    for pair in planes:
        try:
            a, i = pair
            if float(a) != int(a) or float(i) != int(i):
                raise ValueError
            a, i = int(a), int(i)
        except (TypeError, ValueError):
            raise InputError(f"plane {pair!r} is not an (axis, index) pair of integers") from None
        if a not in (0, 1, 2):
            raise InputError(f"plane (axis {a}, index {i}): axis must be 0, 1 or 2 of (Z, Y, X)")
        if i < 0:
            raise InputError(f"plane (axis {a}, index {i}): index must be >= 0")
        out.add((a, i))
    return tuple(sorted(out))


def validate_planes(planes: Iterable, shape: tuple[int, ...], *, source: str | None = None) -> tuple[Plane, ...]:
    """Check that every plane lies inside a volume; return them normalised (:func:`as_planes`).

    Parameters
    ----------
    planes : iterable of (axis, index) pairs
    shape : (Z, Y, X) tuple of int
        Spatial shape of the volume.
    source : str, optional
        Where the planes came from (a file name), put in front of error messages.

    Returns
    -------
    tuple of (int, int)

    Raises
    ------
    InputError
        One line naming the bad pair and the volume's shape.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise InputError(f"planes need a (Z, Y, X) volume, got shape {shape}")
    prefix = f"{source}: " if source else ""
    try:
        norm = as_planes(planes)
    except InputError as exc:
        raise InputError(f"{prefix}{exc}") from None
    for a, i in norm:
        if i >= shape[a]:
            raise InputError(
                f"{prefix}plane axis,index {a},{i} is outside the volume of shape (Z, Y, X) = {shape}: "
                f"index along axis {a} must be 0..{shape[a] - 1}"
            )
    return norm


def indices_along(planes: Iterable, axis: int) -> np.ndarray:
    """Sorted slice indices of the planes along ``axis``, ``(n,)`` int64."""
    return np.asarray(sorted({int(i) for a, i in planes if int(a) == axis}), dtype=np.int64)


def annotated_voxel_mask(shape: tuple[int, int, int], planes) -> np.ndarray:
    """Voxels known to be annotated: the union of the listed slices of every plane.

    Parameters
    ----------
    shape : (Z, Y, X) tuple of int
    planes : iterable of (axis, index) pairs

    Returns
    -------
    (Z, Y, X) bool ndarray
        True on every voxel of a listed slice (its label, 0 included, is known).

    Raises
    ------
    InputError
        For a plane outside the volume.
    """
    planes = validate_planes(planes, shape)
    mask = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    for a, i in planes:
        idx = [slice(None)] * 3
        idx[a] = i
        mask[tuple(idx)] = True
    return mask


def planes_from_labels(labels, axis: int = 0) -> tuple[Plane, ...]:
    """The default planes: the slices along ``axis`` that hold a nonzero label.

    Parameters
    ----------
    labels : (Z, Y, X) integer array-like
    axis : int
        Spatial axis (0, 1 or 2).

    Returns
    -------
    tuple of (int, int)
        ``(axis, index)`` for each painted slice, in index order.
    """
    if axis not in (0, 1, 2):
        raise InputError("axis must be 0, 1 or 2")
    labels = np.asarray(labels)
    n = labels.shape[axis]
    painted = np.moveaxis(labels, axis, 0).reshape(n, -1).any(axis=1)
    return tuple((axis, int(i)) for i in np.flatnonzero(painted))


def read_planes_csv(path: str | Path) -> tuple[Plane, ...]:
    """Read planes from a CSV with the header ``axis,index``.

    Returns
    -------
    tuple of (int, int)
        Normalised (:func:`as_planes`); check them against the volume with
        :func:`validate_planes`.

    Raises
    ------
    InputError
        When the file cannot be read, is not such a CSV, or holds a malformed row: one line
        naming the file and the expected format.
    """
    planes = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            if not {"axis", "index"} <= set(fields):
                raise InputError(f"{path}: not a planes file: expected {CSV_FORMAT}")
            reader.fieldnames = fields
            for row in reader:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # blank line
                try:
                    a, i = int(row["axis"]), int(row["index"])
                except (TypeError, ValueError):
                    raise InputError(
                        f"{path}: line {reader.line_num}: bad row {row['axis']},{row['index']}; expected {CSV_FORMAT}"
                    ) from None
                planes.append((a, i))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file; expected {CSV_FORMAT}") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a planes file ({exc}); expected {CSV_FORMAT}") from None
    except OSError as exc:
        raise InputError(f"cannot read planes {path}: {exc.strerror or exc}") from None
    try:
        return as_planes(planes)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def write_planes_csv(path: str | Path, planes) -> Path:
    """Write planes as ``axis,index`` CSV (atomic: the file is replaced whole or not at all).

    Raises
    ------
    InputError
        When the file cannot be written, or for planes that are not ``(axis, index)`` pairs.
    """
    from .io import atomic_path

    planes = as_planes(planes)
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["axis", "index"])
            writer.writerows(planes)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def describe_planes(planes, *, limit: int = 8) -> str:
    """Short text of planes by axis, e.g. ``"axial 3, 12; sagittal 40"``."""
    planes = as_planes(planes)
    parts = []
    for a in range(3):
        idx = [i for b, i in planes if b == a]
        if idx:
            text = ", ".join(map(str, idx[:limit])) + (f", ... ({len(idx)})" if len(idx) > limit else "")
            parts.append(f"{AXIS_NAMES[a]} {text}")
    return "; ".join(parts) if parts else "none"
