"""Data model: volumes, labels, weak slice tags, normalisation and slice sampling.

The image is ``(Z, Y, X)`` or ``(C, Z, Y, X)``; labels are ``(Z, Y, X)`` integers with 0 for
background and 1..K for classes. Training works on 2D slices taken along one spatial axis.

A slice is *annotated* when it holds any nonzero label or is tagged healthy (a healthy slice is
a free all-background annotation); when the annotated planes are recorded
(:mod:`semiseg.planes`), the slices listed along the slicing axis are the annotated ones instead. The remaining slices form the *unlabelled* pool. Weak tags
split slices into *healthy* (absence domain, A) and *diseased* (presence domain, P); a slice
with a nonzero label counts as diseased unless tagged otherwise.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import atomic_path

__all__ = [
    "DISEASED",
    "HEALTHY",
    "UNKNOWN",
    "Batch",
    "InputError",
    "Normaliser",
    "SlicePools",
    "SliceSampler",
    "as_channels",
    "check_context",
    "context_indices",
    "make_pools",
    "read_weak_csv",
    "stack_context",
    "suggest_tags",
    "validate_labels",
    "write_weak_csv",
]

#: Weak tag values, one per slice.
UNKNOWN, HEALTHY, DISEASED = -1, 0, 1


# ----------------------------------------------------------------------------- validation
def as_channels(image, *, channel_axis: int | None = None):
    """Return a view of ``image`` with a leading channel axis, ``(C, Z, Y, X)``.

    Parameters
    ----------
    image : (Z, Y, X) or (C, Z, Y, X) array-like
        Numpy, dask or zarr array. It is not copied or loaded.
    channel_axis : int, optional
        Axis holding channels when the image is 4D and channels are not first.

    Returns
    -------
    (C, Z, Y, X) array-like

    Raises
    ------
    InputError
        For 2D or 5D+ images, RGB(A) images, complex or boolean dtypes.
    """
    shape = tuple(image.shape)
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "uif":
        raise InputError(f"image dtype {dtype} is not numeric (expected integers or floats)")
    if len(shape) == 3 and shape[-1] in (3, 4) and shape[0] > 4 and channel_axis is None:
        raise InputError(
            f"image of shape {shape} looks like a 2D RGB picture; "
            "give a (Z, Y, X) volume or (C, Z, Y, X) channels"
        )
    if len(shape) == 3:
        if not isinstance(image, np.ndarray) and not hasattr(image, "dask"):
            # zarr and other lazy arrays lack newaxis indexing: view them through dask.
            import dask.array as da

            image = da.from_array(image, chunks=getattr(image, "chunks", "auto"))
        return image[None]
    if len(shape) == 4:
        if channel_axis is not None and channel_axis not in (0, -4):
            axes = list(range(4))
            axes.insert(0, axes.pop(channel_axis))
            image = image.transpose(axes)
        elif shape[0] > 16:
            raise InputError(
                f"4D image of shape {shape} has {shape[0]} channels in front; "
                "expected (C, Z, Y, X) with a few channels"
            )
        return image
    raise InputError(f"image must be 3D (Z, Y, X) or 4D (C, Z, Y, X), got shape {shape}")


#: Distinct nonzero label values beyond which a "labels" volume is taken for an image: a labels
#: layer holds a few classes (a whole-body CT atlas about 120), an image hundreds of intensities.
MAX_LABEL_VALUES = 255
#: Label values must fit the uint16 masks that predictions are written as.
MAX_CLASS_ID = 65535
_SWAP_HINT = ": did you swap IMAGE and LABELS?"


def _label_sample(arr: np.ndarray, n_slices: int = 8) -> np.ndarray:
    """Up to ``n_slices`` whole slices along axis 0, evenly spaced: enough to tell an image from
    labels in bounded time, with neighbouring voxels kept together."""
    idx = np.unique(np.linspace(0, arr.shape[0] - 1, min(n_slices, arr.shape[0])).round().astype(int))
    return np.asarray(arr[idx])


def looks_like_image(arr: np.ndarray) -> bool:
    """Whether a would-be labels volume is an intensity image (image and labels swapped).

    Labels are piecewise constant with a few values; an image has many values that change from
    one voxel to the next. On :func:`_label_sample`: more than :data:`MAX_LABEL_VALUES` distinct
    nonzero values, or more than 16 of them with most horizontally neighbouring nonzero voxels
    differing (labels differ only at boundaries, a few percent of them).

    Parameters
    ----------
    arr : (Z, Y, X) ndarray
        Any numeric dtype.
    """
    if arr.ndim != 3 or arr.size == 0:
        return False
    n, changing = _label_values(arr)
    return n > MAX_LABEL_VALUES or (n > 16 and changing > 0.5)


def _label_values(arr: np.ndarray) -> tuple[int, float]:
    """Distinct nonzero values on :func:`_label_sample` and the share of horizontally
    neighbouring nonzero voxel pairs that differ."""
    a = _label_sample(arr)
    n = int(np.unique(a[a != 0]).size)
    left, right = a[..., :-1], a[..., 1:]
    both = (left != 0) & (right != 0)
    pairs = int(both.sum())
    return n, (float((left[both] != right[both]).sum()) / pairs if pairs else 0.0)


def validate_labels(labels, spatial_shape: tuple[int, ...]) -> np.ndarray:
    """Check and return labels as an in-memory integer array of the image's spatial shape.

    Parameters
    ----------
    labels : (Z, Y, X) array-like of integers
    spatial_shape : tuple of int
        ``(Z, Y, X)`` of the image.

    Returns
    -------
    (Z, Y, X) ndarray
        The labels, never a modified copy of the caller's array (read-only view if possible).

    Raises
    ------
    InputError
        On a float or negative label array, values above :data:`MAX_CLASS_ID`, a shape that
        differs from the image, or labels that look like an image (:func:`looks_like_image`:
        "did you swap IMAGE and LABELS?").
    """
    arr = np.asarray(labels)
    if arr.dtype.kind == "b":
        arr = arr.view(np.uint8)
    if arr.dtype.kind not in "uif":
        raise InputError(f"labels must have an integer dtype, got {arr.dtype}")
    if arr.shape != tuple(spatial_shape):
        raise InputError(f"labels shape {arr.shape} does not match image shape {tuple(spatial_shape)}")
    swapped = looks_like_image(arr)
    hint = _SWAP_HINT if swapped else ""
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise InputError(f"labels must be integers; got float values that are not whole{hint}")
        raise InputError(f"labels must have an integer dtype, got {arr.dtype}{hint}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise InputError(f"labels must be >= 0 (0 = background, 1..K = classes){hint}")
    if swapped:
        n, _ = _label_values(arr)
        if n > MAX_LABEL_VALUES:
            raise InputError(
                f"labels hold at least {n} distinct values, far more than the classes of a labels volume "
                f"(at most {MAX_LABEL_VALUES}){_SWAP_HINT}"
            )
        raise InputError(f"labels hold {n} distinct values that change from voxel to voxel, like an image's{_SWAP_HINT}")
    if arr.size and int(arr.max()) > MAX_CLASS_ID:
        raise InputError(f"label values must be class ids 0..{MAX_CLASS_ID}, got {int(arr.max())}")
    return arr


# ----------------------------------------------------------------------------- 2.5D context
def check_context(context, n_slices: int | None = None) -> int:
    """Validate a context of ``context`` neighbours on each side; return it as an int.

    Parameters
    ----------
    context : int
        Neighbouring slices on each side of a slice that a network sees with it.
    n_slices : int, optional
        Slices along the slicing axis: reflection at the ends needs ``context <= n_slices - 1``.

    Raises
    ------
    InputError
        For a negative or non-integer context, or one the stack is too short for.
    """
    if isinstance(context, bool) or not isinstance(context, int | np.integer) or context < 0:
        raise InputError(f"context must be an integer >= 0, got {context!r}")
    context = int(context)
    if n_slices is not None and context > n_slices - 1:
        raise InputError(
            f"context {context} needs at least {context + 1} slices along the slicing axis, "
            f"the image has {n_slices}"
        )
    return context


def context_indices(index, n_slices: int, context: int) -> np.ndarray:
    """Slices a network sees for slice(s) ``index``: ``index - context .. index + context``,
    reflected at the ends like numpy's ``"reflect"`` padding (-1 -> 1, ``n`` -> ``n - 2``).

    Parameters
    ----------
    index : int or (B,) array of int
    n_slices : int
        Slices along the slicing axis (``context <= n_slices - 1``, see :func:`check_context`).
    context : int

    Returns
    -------
    (2 * context + 1,) or (B, 2 * context + 1) int64 ndarray
        Neighbours in order, the slice itself in the middle.
    """
    j = np.asarray(index, dtype=np.int64)[..., None] + np.arange(-context, context + 1)
    last = n_slices - 1
    j = np.abs(j)
    return np.where(j > last, 2 * last - j, j)


def stack_context(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Stack neighbouring slices as channels.

    Parameters
    ----------
    x : (S, C, H, W) ndarray
        Normalised slices.
    rows : (B, 2N + 1) int array
        For each output slice, the rows of ``x`` holding its neighbours (see
        :func:`context_indices`).

    Returns
    -------
    (B, (2N + 1) * C, H, W) ndarray
        Channels neighbour by neighbour: the C channels of slice ``i - N`` first, those of
        ``i + N`` last.
    """
    rows = np.asarray(rows)
    return x[rows].reshape(rows.shape[0], rows.shape[1] * x.shape[1], *x.shape[2:])


# ----------------------------------------------------------------------------- weak tags
#: What a weak-tag file holds, for error messages.
WEAK_CSV_FORMAT = (
    "a CSV with the header 'slice,diseased' and one row 'slice,diseased' per tagged slice "
    "(diseased 1, healthy 0)"
)


def read_weak_csv(path: str | Path, n_slices: int) -> np.ndarray:
    """Read per-slice weak tags from a CSV with columns ``slice,diseased`` (0/1).

    Slices missing from the file are ``UNKNOWN`` (-1).

    Returns
    -------
    (n_slices,) int8 ndarray
        -1 unknown, 0 healthy, 1 diseased.

    Raises
    ------
    InputError
        When the file cannot be read, is not such a CSV (a binary file, another table), holds
        values other than 0/1 or slice indices out of range: one line naming the file and, where
        the format is wrong, the expected one.
    """
    tags = np.full(n_slices, UNKNOWN, dtype=np.int8)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            if not {"slice", "diseased"} <= set(fields):
                raise InputError(f"{path}: not a weak-tag file: expected {WEAK_CSV_FORMAT}")
            reader.fieldnames = fields
            for row in reader:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # blank line
                try:
                    idx, val = int(row["slice"]), int(row["diseased"])
                except (TypeError, ValueError):
                    raise InputError(
                        f"{path}: line {reader.line_num}: bad row {row['slice']},{row['diseased']}; "
                        f"expected {WEAK_CSV_FORMAT}"
                    ) from None
                if not 0 <= idx < n_slices:
                    raise InputError(f"{path}: slice {idx} out of range 0..{n_slices - 1}")
                if val not in (0, 1):
                    raise InputError(f"{path}: 'diseased' must be 0 or 1, got {val}")
                tags[idx] = val
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file; expected {WEAK_CSV_FORMAT}") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a weak-tag file ({exc}); expected {WEAK_CSV_FORMAT}") from None
    except OSError as exc:
        raise InputError(f"cannot read weak tags {path}: {exc.strerror or exc}") from None
    return tags


def write_weak_csv(path: str | Path, tags: np.ndarray) -> Path:
    """Write tagged slices (unknown ones are left out) as ``slice,diseased`` CSV."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["slice", "diseased"])
            for i, t in enumerate(np.asarray(tags)):
                if t != UNKNOWN:
                    writer.writerow([i, int(t)])
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _check_tags(tags, n_slices: int) -> np.ndarray:
    if tags is None:
        return np.full(n_slices, UNKNOWN, dtype=np.int8)
    tags = np.asarray(tags)
    if tags.shape != (n_slices,):
        raise InputError(f"weak tags must have one entry per slice ({n_slices}), got {tags.shape}")
    if not np.isin(tags, (UNKNOWN, HEALTHY, DISEASED)).all():
        raise InputError("weak tags must be -1 (unknown), 0 (healthy) or 1 (diseased)")
    return tags.astype(np.int8)


def suggest_tags(labels: np.ndarray, tags=None, *, axis: int = 0) -> np.ndarray:
    """Suggest weak tags from labels: a painted slice is diseased, others keep their tag."""
    labels = np.asarray(labels)
    painted = np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1).any(axis=1)
    out = _check_tags(tags, labels.shape[axis]).copy()
    out[painted] = DISEASED
    return out


# ----------------------------------------------------------------------------- pools
@dataclass(frozen=True)
class SlicePools:
    """Indices of slices (along the slicing axis) in each training pool."""

    annotated: np.ndarray
    painted: np.ndarray
    unlabelled: np.ndarray
    healthy: np.ndarray
    diseased: np.ndarray
    diseased_annotated: np.ndarray
    num_classes: int
    #: The annotated planes given to :func:`make_pools` (``(axis, index)`` pairs of every
    #: axis, see :mod:`semiseg.planes`), None when the annotated slices were read off the labels.
    planes: tuple | None = None

    def summary(self) -> str:
        return (
            f"{len(self.annotated)} annotated, {len(self.unlabelled)} unlabelled, "
            f"{len(self.healthy)} healthy, {len(self.diseased)} diseased slices"
        )


def make_pools(labels: np.ndarray, tags=None, *, axis: int = 0, planes=None) -> SlicePools:
    """Split slices into annotated / unlabelled / healthy / diseased pools.

    Parameters
    ----------
    labels : (Z, Y, X) integer ndarray
    tags : (n_slices,) array of {-1, 0, 1}, optional
        Weak tags along ``axis``: unknown, healthy, diseased.
    axis : int
        Slicing axis.
    planes : sequence of (axis, index) pairs, optional
        The fully annotated slices in any plane (:mod:`semiseg.planes`). Given, the annotated
        slices along ``axis`` are exactly those listed with that axis (an empty one is all
        background), plus the healthy-tagged ones; labels painted in other planes do not make
        the slices they cross annotated (those go to the unlabelled pool). None (default): a
        slice along ``axis`` is annotated when it holds any nonzero label.

    Returns
    -------
    SlicePools

    Raises
    ------
    InputError
        When no slice is annotated, a healthy-tagged slice holds labels, or a plane lies
        outside the volume.
    """
    labels = np.asarray(labels)
    n = labels.shape[axis]
    tags = _check_tags(tags, n)
    painted = np.moveaxis(labels, axis, 0).reshape(n, -1).any(axis=1)
    conflict = np.flatnonzero(painted & (tags == HEALTHY))
    if conflict.size:
        raise InputError(f"slices {conflict.tolist()} are tagged healthy but hold labels")
    if planes is None:
        listed = painted
    else:
        from .planes import indices_along, validate_planes

        planes = validate_planes(planes, labels.shape)
        listed = np.zeros(n, dtype=bool)
        listed[indices_along(planes, axis)] = True
    annotated = listed | (tags == HEALTHY)
    if not annotated.any():
        if planes:
            raise InputError(
                f"no annotated slice along the training axis {axis}: the planes list slices of other "
                f"axes only; list one along axis {axis} or tag one healthy"
            )
        raise InputError("no annotated slice: paint labels on at least one slice or tag one healthy")
    diseased = (tags == DISEASED) | (painted & (tags == UNKNOWN))
    with_mask = listed & painted
    return SlicePools(
        annotated=np.flatnonzero(annotated),
        painted=np.flatnonzero(with_mask),
        unlabelled=np.flatnonzero(~annotated),
        healthy=np.flatnonzero(tags == HEALTHY),
        diseased=np.flatnonzero(diseased),
        diseased_annotated=np.flatnonzero(diseased & with_mask),
        num_classes=int(labels.max()) + 1,
        planes=planes,
    )


# ----------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class Normaliser:
    """Robust per-channel intensity normalisation, stored with a model.

    Maps the ``low`` and ``high`` percentiles of each channel to -1 and 1 (no clipping, so bright
    structures above the percentile keep their contrast).
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    percentiles: tuple[float, float] = (1.0, 99.0)

    @classmethod
    def fit(cls, image, *, percentiles=(1.0, 99.0), max_slices: int = 64, axis: int = 1):
        """Estimate percentiles from at most ``max_slices`` evenly spaced slices.

        Parameters
        ----------
        image : (C, Z, Y, X) array-like
            May be lazy; only the chosen slices are read.

        Raises
        ------
        InputError
            When the image holds NaN or Inf.
        """
        n = image.shape[axis]
        idx = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
        if isinstance(image, np.ndarray) or hasattr(image, "dask"):
            sub = np.asarray(np.take(image, idx, axis=axis), dtype=np.float64)
        else:  # zarr & co: np.take would load the whole array; read the slices one by one
            pre = (slice(None),) * axis
            sub = np.stack([np.asarray(image[(*pre, int(i))], dtype=np.float64) for i in idx], axis=axis)
        if not np.all(np.isfinite(sub)):
            raise InputError("image contains NaN or Inf values")
        flat = sub.reshape(sub.shape[0], -1)
        lo = np.percentile(flat, percentiles[0], axis=1)
        hi = np.percentile(flat, percentiles[1], axis=1)
        # Zero-variance or near-binary channels: fall back to min/max, then to a unit scale.
        mn, mx = flat.min(axis=1), flat.max(axis=1)
        same = hi - lo <= 1e-8 * np.maximum(1.0, np.abs(hi))
        lo = np.where(same, mn, lo)
        hi = np.where(same, mx, hi)
        hi = np.where(hi - lo <= 1e-12, lo + 1.0, hi)
        return cls(tuple(map(float, lo)), tuple(map(float, hi)), tuple(map(float, percentiles)))

    def __call__(self, x: np.ndarray, *, channel_axis: int = 0) -> np.ndarray:
        """Return a normalised float32 copy of ``x`` (channels on ``channel_axis``)."""
        x = np.asarray(x, dtype=np.float32)
        shape = [1] * x.ndim
        shape[channel_axis] = len(self.low)
        lo = np.asarray(self.low, np.float32).reshape(shape)
        hi = np.asarray(self.high, np.float32).reshape(shape)
        out = (x - lo) * (2.0 / (hi - lo)) - 1.0
        if not np.all(np.isfinite(out)):
            raise InputError("image contains NaN or Inf values")
        return out

    def inverse(
        self, y: np.ndarray, *, channel_axis: int = 0, difference: bool = False, in_place: bool = False
    ) -> np.ndarray:
        """Map normalised values back to image intensities (the inverse of calling it).

        Parameters
        ----------
        y : ndarray
            Normalised values, channels on ``channel_axis``.
        difference : bool
            ``y`` is a difference of normalised values (e.g. a residual): scaled, not shifted.
        in_place : bool
            Overwrite ``y`` (a float32 ndarray) instead of allocating a result: streamed
            prediction keeps one buffer per output.

        Returns
        -------
        float32 ndarray
        """
        y = np.asarray(y, dtype=np.float32)
        shape = [1] * y.ndim
        shape[channel_axis] = len(self.low)
        lo = np.asarray(self.low, np.float32).reshape(shape)
        hi = np.asarray(self.high, np.float32).reshape(shape)
        if in_place:  # the same arithmetic, without temporaries
            if not difference:
                y += 1
            y *= hi - lo
            y /= 2
            if not difference:
                y += lo
            return y
        if difference:
            return y * (hi - lo) / 2
        return (y + 1) * (hi - lo) / 2 + lo

    def to_dict(self) -> dict:
        return {"low": list(self.low), "high": list(self.high), "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, d: dict) -> Normaliser:
        return cls(tuple(d["low"]), tuple(d["high"]), tuple(d["percentiles"]))


# ----------------------------------------------------------------------------- sampling
@dataclass
class Batch:
    """One training batch of 2D slices, as tensors on the method's device.

    Attributes
    ----------
    labelled : (B, C, H, W) Tensor or None
        Crops from annotated slices.
    mask : (B, H, W) int64 Tensor or None
        Their labels.
    unlabelled : (B, C, H, W) Tensor or None
        Crops from unannotated slices (all slices if none is unannotated).
    healthy : (B, C, H, W) Tensor or None
        Crops from healthy-tagged slices (domain A).
    diseased : (B, C, H, W) Tensor or None
        Crops from diseased slices (domain P), annotated or only tagged.
    diseased_mask : (B, H, W) int64 Tensor or None
        Labels of ``diseased`` (zeros where ``diseased_has_mask`` is False).
    diseased_has_mask : (B,) bool Tensor or None
    unlabelled_diseased : (B,) bool Tensor or None
        Which ``unlabelled`` crops come from slices tagged diseased.
    """

    labelled: object = None
    mask: object = None
    unlabelled: object = None
    healthy: object = None
    diseased: object = None
    diseased_mask: object = None
    diseased_has_mask: object = None
    unlabelled_diseased: object = None
    extra: dict = field(default_factory=dict)


def _pad_to(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pad the last two axes of ``a`` up to ``size`` by reflection (edge when too small)."""
    ph, pw = max(0, size[0] - a.shape[-2]), max(0, size[1] - a.shape[-1])
    if ph == 0 and pw == 0:
        return a
    pad = [(0, 0)] * (a.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
    mode = "reflect" if ph < a.shape[-2] and pw < a.shape[-1] else "edge"
    return np.pad(a, pad, mode=mode)


class SliceSampler:
    """Draw augmented 2D crops from a volume's slice pools.

    Parameters
    ----------
    image : (C, Z, Y, X) array-like
        Raw image; may be lazy (zarr, dask). Slices are read on demand and normalised.
    labels : (Z, Y, X) integer ndarray
    pools : SlicePools
    normaliser : Normaliser
    axis : int
        Spatial slicing axis (0, 1 or 2 of ``(Z, Y, X)``).
    crop : int
        Side of square crops; slices smaller than this are padded.
    augment : bool
        Random flips, 90 degree rotations and mild intensity jitter.
    cache : bool
        Keep normalised slices in memory after their first read, least recently used first
        out when the cache exceeds ``cache_bytes``.
    cache_bytes : int
        Memory budget of the slice cache (default 1 GiB), so volumes bigger than memory can be
        sampled lazily from zarr/dask.
    foreground_fraction : float
        Share of labelled crops centred near a labelled pixel.
    context : int
        Neighbouring slices on each side stacked as extra channels (2.5D input, reflected at
        the volume's ends, see :func:`context_indices`); crops then have ``C * (2 context + 1)``
        channels. The cache holds single slices, so neighbours are read once.
    """

    def __init__(
        self,
        image,
        labels: np.ndarray,
        pools: SlicePools,
        normaliser: Normaliser,
        *,
        axis: int = 0,
        crop: int = 96,
        augment: bool = True,
        cache: bool = True,
        cache_bytes: int = 2**30,
        foreground_fraction: float = 0.33,
        context: int = 0,
    ):
        self.image = image
        self.labels = labels
        self.pools = pools
        self.normaliser = normaliser
        self.axis = axis
        self.crop = int(crop)
        self.augment = augment
        self.foreground_fraction = float(foreground_fraction)
        self._cache: OrderedDict[int, np.ndarray] | None = OrderedDict() if cache else None
        self.cache_bytes = int(cache_bytes)
        self._cached_bytes = 0
        self.context = check_context(context, image.shape[axis + 1])

    def slice_image(self, i: int) -> np.ndarray:
        """Normalised ``(C * (2 context + 1), H, W)`` float32 slice ``i`` with its context
        (``(C, H, W)`` without)."""
        if not self.context:
            return self._single_slice(i)
        rows = context_indices(i, self.image.shape[self.axis + 1], self.context)
        return np.concatenate([self._single_slice(int(j)) for j in rows])

    def _single_slice(self, i: int) -> np.ndarray:
        """Normalised ``(C, H, W)`` float32 slice ``i``, through the cache."""
        if self._cache is not None and i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        idx = [slice(None)] * 4
        idx[self.axis + 1] = i
        out = self.normaliser(np.asarray(self.image[tuple(idx)]))
        if self._cache is not None and out.nbytes <= self.cache_bytes:
            self._cache[i] = out
            self._cached_bytes += out.nbytes
            while self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return out

    def slice_labels(self, i: int) -> np.ndarray:
        return np.asarray(np.take(self.labels, i, axis=self.axis), dtype=np.int64)

    def _crop(self, rng, img: np.ndarray, lab: np.ndarray | None):
        size = (self.crop, self.crop)
        img = _pad_to(img, size)
        if lab is not None:
            lab = _pad_to(lab[None], size)[0]
        h, w = img.shape[-2:]
        y = rng.integers(0, h - size[0] + 1)
        x = rng.integers(0, w - size[1] + 1)
        if lab is not None and rng.random() < self.foreground_fraction:
            # Small targets are rare in random crops: centre some crops on a labelled pixel
            # (nnU-Net oversamples foreground the same way).
            fy, fx = np.nonzero(lab)
            if len(fy):
                j = rng.integers(len(fy))
                y = int(np.clip(fy[j] - size[0] // 2 + rng.integers(-size[0] // 4, size[0] // 4 + 1), 0, h - size[0]))
                x = int(np.clip(fx[j] - size[1] // 2 + rng.integers(-size[1] // 4, size[1] // 4 + 1), 0, w - size[1]))
        img = img[:, y : y + size[0], x : x + size[1]]
        if lab is not None:
            lab = lab[y : y + size[0], x : x + size[1]]
        if self.augment:
            k = int(rng.integers(4))
            flip = bool(rng.integers(2))
            img = np.rot90(img, k, axes=(1, 2))
            if flip:
                img = img[:, :, ::-1]
            if lab is not None:
                lab = np.rot90(lab, k)
                if flip:
                    lab = lab[:, ::-1]
            gain = rng.uniform(0.9, 1.1, size=(img.shape[0], 1, 1)).astype(np.float32)
            shift = rng.uniform(-0.1, 0.1, size=(img.shape[0], 1, 1)).astype(np.float32)
            img = img * gain + shift
        img = np.ascontiguousarray(img, dtype=np.float32)
        lab = None if lab is None else np.ascontiguousarray(lab)
        return img, lab

    def draw(self, rng: np.random.Generator, pool: np.ndarray, n: int, with_labels: bool):
        """Draw ``n`` crops from ``pool`` (with replacement); returns arrays."""
        picks = rng.choice(pool, size=n, replace=True)
        c, size = self.image.shape[0] * (2 * self.context + 1), (self.crop, self.crop)
        if n == 0:
            return picks, np.zeros((0, c, *size), np.float32), np.zeros((0, *size), np.int64)
        imgs, labs = [], []
        for i in picks:
            lab = self.slice_labels(int(i)) if with_labels else None
            img, lab = self._crop(rng, self.slice_image(int(i)), lab)
            imgs.append(img)
            labs.append(lab)
        images = np.stack(imgs)
        labels = np.stack(labs) if with_labels else None
        return picks, images, labels

    def sample(self, rng: np.random.Generator, needs: dict[str, int]) -> dict[str, np.ndarray]:
        """Draw a batch as numpy arrays for the pools named in ``needs`` (pool -> batch size).

        Pools are ``labelled``, ``unlabelled``, ``healthy`` and ``diseased``. An empty pool falls
        back sensibly: unlabelled -> all slices; healthy/diseased -> omitted.
        """
        out: dict[str, np.ndarray] = {}
        p = self.pools
        if n := needs.get("labelled", 0):
            # Healthy-tagged slices are free background annotations and can outnumber painted
            # ones many times over: draw at least half of the crops from painted slices.
            n_painted = (n + 1) // 2 if len(p.painted) and len(p.annotated) > len(p.painted) else 0
            _, img_a, lab_a = self.draw(rng, p.painted, n_painted, True)
            _, img_b, lab_b = self.draw(rng, p.annotated, n - n_painted, True)
            out["labelled"] = np.concatenate([img_a, img_b])
            out["mask"] = np.concatenate([lab_a, lab_b])
        if n := needs.get("unlabelled", 0):
            pool = p.unlabelled if len(p.unlabelled) else np.arange(self.image.shape[self.axis + 1])
            picks, out["unlabelled"], _ = self.draw(rng, pool, n, False)
            # Weak tags of the unannotated crops' slices: a diseased one holds a lesion somewhere.
            out["unlabelled_diseased"] = np.isin(picks, p.diseased)
        if (n := needs.get("healthy", 0)) and len(p.healthy):
            _, out["healthy"], _ = self.draw(rng, p.healthy, n, False)
        if (n := needs.get("diseased", 0)) and len(p.diseased):
            picks, out["diseased"], out["diseased_mask"] = self.draw(rng, p.diseased, n, True)
            out["diseased_has_mask"] = np.isin(picks, p.diseased_annotated)
        return out
