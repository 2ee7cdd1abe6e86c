"""Whole-volume prediction, slice batch by slice batch.

A slice no larger than the model's window (:attr:`semiseg.model.Model.tile_size`, the training
crop) is predicted whole, padded by reflection to the network's size multiple and cropped back.
A larger slice is predicted in overlapping windows, blended with a Gaussian weight that favours
window centres (:mod:`semiseg.windows`, as nnU-Net and MONAI's sliding-window inference do): a
method may ask for other windows (:meth:`~semiseg.methods.base.Method.prediction_window`). The
networks use
instance normalisation, whose statistics change with the extent of the input, and a whole slice
much larger than the crops the network learnt on is segmented far worse than its windows.
Inputs are read one batch of slices at a time, so lazy (zarr, dask) volumes are never loaded
whole, and outputs may be zarr arrays written batch by batch.

Memory is bounded by the batch, never by the volume: a batch (a *slab* of slices) holds at most
:data:`SLAB_MEMORY` bytes of inputs and outputs (:func:`slab_slices` takes fewer slices than
``batch_size`` when slices are large), it is normalised and checked one slice at a time, and its
results go to the output arrays before the next batch is read.

A slice or window whose input is constant (every pixel of every channel equal: an all-zero or
padded slice above or below the anatomy) carries no information; it is background with
certainty (probability 1 for class 0), whatever the network would make of it. Instance
normalisation turns such an input into zeros, and the convolutions' zero padding then draws a
frame along its border.

3D methods (``spatial_dims == 3``, e.g. ``unet3d``) predict ``(D, H, W)`` blocks: a volume goes
in slabs along the model's axis (:func:`slab_plan`), each read with a halo of one window depth
on both sides so that its windows see the context they saw in training, predicted in blended 3D
windows (:meth:`~semiseg.model.Model.volume_window`, the same :mod:`semiseg.windows` scheme),
with the same blank rule on every window and one slab in memory at a time
(:func:`predict_slab_3d`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from .data import as_channels, check_context, context_indices, stack_context
from .errors import InputError, PredictionError, first_line, is_out_of_memory
from .methods.base import Method
from .progress import Progress, run
from .windows import (
    WINDOW_OVERLAP,
    blend_windows,
    check_overlap,
    gaussian_window,
    pad_spatial,
    window_starts,
)

if TYPE_CHECKING:  # a Model predicts through this module (Model.predict)
    from .model import Model


__all__ = [
    "WINDOW_OVERLAP",
    "apply_in_windows",
    "apply_to_slices",
    "gaussian_window",
    "iter_predict_volume",
    "predict_normalised_slices",
    "predict_normalised_volume",
    "predict_slab",
    "predict_slab_3d",
    "predict_volume",
    "read_slices",
    "slab_plan",
    "slab_slices",
    "window_starts",
]

#: Bytes of inputs and outputs one slab (batch of slices) may hold during prediction; with
#: 2048 x 2048 slices, one channel and two classes a slab holds 3 slices.
SLAB_MEMORY = 256 * 2**20


def _pad_amounts(size: int, multiple: int) -> tuple[int, int]:
    total = (-size) % multiple
    return total // 2, total - total // 2


def pad_to_multiple(method: Method, x: np.ndarray) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Put ``(B, C, H, W)`` slices on the method's device, padded to its size multiple.

    Returns the tensor and the ``(rows, cols)`` slices that crop a prediction back to
    ``(H, W)``. Padding reflects the image; tiny slices (pad >= side) replicate the edge.
    """
    h, w = x.shape[-2:]
    m = method.size_multiple
    (pt, pb), (pl, pr) = _pad_amounts(h, m), _pad_amounts(w, m)
    t = method.to_tensor(np.ascontiguousarray(x, dtype=np.float32))
    if pt or pb or pl or pr:
        mode = "reflect" if max(pt, pb) < h and max(pl, pr) < w else "replicate"
        t = F.pad(t, (pl, pr, pt, pb), mode=mode)
    return t, (slice(pt, pt + h), slice(pl, pl + w))


def _window_size(method: Method, tile_size: int | None, h: int, w: int) -> int | None:
    """Window side for ``(h, w)`` slices (a multiple of the network's size multiple), or
    ``None`` when they are predicted whole."""
    tile = method.prediction_window(tile_size)
    if not tile or (h <= tile and w <= tile):
        return None
    m = method.size_multiple
    return int(math.ceil(tile / m) * m)


def apply_to_slices(
    method: Method,
    x: np.ndarray,
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    *,
    tile_size: int | None,
    overlap: float = WINDOW_OVERLAP,
) -> dict[str, torch.Tensor]:
    """Apply a per-pixel map ``fn`` to normalised slices, whole or window by window.

    Parameters
    ----------
    method : Method
        Gives the device, the size multiple and the window
        (:meth:`~semiseg.methods.base.Method.prediction_window` of ``tile_size``).
    x : (B, C, H, W) float32 ndarray
        Normalised slices of any size.
    fn : callable
        Maps a ``(B, C, h, w)`` tensor (``h``, ``w`` multiples of ``method.size_multiple``) to a
        dict of ``(B, c, h, w)`` tensors, e.g. class probabilities.
    tile_size : int or None
        Window side (the model's :attr:`~semiseg.model.Model.tile_size`); slices no larger are
        predicted whole, and ``None`` predicts every slice whole unless the method asks for
        windows. Required: a bare method does not know its model's window.
    overlap : float
        Share of a window overlapped by its neighbours when slices are larger than the window.

    Returns
    -------
    dict of (B, c, H, W) float32 tensors
        On the method's device, cropped back to ``(H, W)``; window outputs are averaged with
        :func:`gaussian_window` weights.
    """
    if getattr(method, "spatial_dims", 2) == 3:
        raise InputError(f"method {method.name!r} predicts 3D blocks, not single slices")
    check_overlap(overlap)
    h, w = x.shape[-2:]
    tile = _window_size(method, tile_size, h, w)
    return apply_in_windows(method, x, fn, None if tile is None else (tile, tile), overlap=overlap)


def apply_in_windows(
    method: Method,
    x: np.ndarray,
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    window: Sequence[int] | None,
    *,
    overlap: float = WINDOW_OVERLAP,
) -> dict[str, torch.Tensor]:
    """Apply a voxel-wise map ``fn`` to normalised 2D slices or 3D blocks, whole or in windows.

    The one window implementation behind :func:`apply_to_slices` (2D) and
    :func:`predict_normalised_volume` (3D), blending with :func:`semiseg.windows.blend_windows`.

    Parameters
    ----------
    method : Method
        Gives the device (and, for whole 2D slices, the size multiple).
    x : (B, C, *S) float32 ndarray
        ``S`` is ``(H, W)`` or ``(D, H, W)``.
    fn : callable
        Maps a ``(B, C, *s)`` tensor to a dict of ``(B, c, *s)`` tensors.
    window : sequence of int or None
        Window size over ``S``; ``None`` (or an input no larger than it along every axis)
        applies ``fn`` to the whole input (2D slices padded to ``method.size_multiple``).
    overlap : float
        Share of a window overlapped by its neighbours.

    Returns
    -------
    dict of (B, c, *S) float32 tensors
        On the method's device; windows are blended with :func:`gaussian_window` weights and
        sides shorter than the window are padded like training crops, then cropped back.
    """
    check_overlap(overlap)
    spatial = x.shape[2:]
    with torch.no_grad():
        if window is None or all(s <= w for s, w in zip(spatial, window)):
            if len(spatial) == 2:
                t, (rows, cols) = pad_to_multiple(method, x)
                return {k: v[..., rows, cols].float() for k, v in fn(t).items()}
            t = method.to_tensor(np.ascontiguousarray(x, dtype=np.float32))
            return {k: v.float() for k, v in fn(t).items()}
        # A side shorter than the window is padded like the training crops were.
        padded, crop = pad_spatial(x, window)
        t = method.to_tensor(np.ascontiguousarray(padded, dtype=np.float32))
        del padded
        return {k: v[(Ellipsis, *crop)] for k, v in blend_windows(t, fn, tuple(window), overlap).items()}


def predict_normalised_slices(
    method: Method, x: np.ndarray, outputs: Sequence[str] = (), *, tile_size: int | None
) -> dict[str, np.ndarray]:
    """Predict a stack of normalised slices.

    Parameters
    ----------
    method : Method
    x : (B, C, H, W) float32 ndarray
        Normalised slices of any size; slices larger than ``tile_size`` are predicted in
        overlapping windows (see :func:`apply_to_slices`). A slice or window that is constant
        is background with certainty (see :func:`no_information`).
    outputs : sequence of str
        Extra method outputs to return (e.g. ``"residual"``), in normalised units.
    tile_size : int or None
        Window side (the model's :attr:`~semiseg.model.Model.tile_size`; None: whole slices).

    Returns
    -------
    dict
        ``mask`` (B, H, W) uint8 (int32 beyond 256 classes), ``probabilities`` (B, K, H, W)
        float32, and each requested output as (B, C, H, W) float32.
    """
    kinds = {name: method.outputs.get(name) for name in outputs}

    def predict(t: torch.Tensor) -> dict[str, torch.Tensor]:
        res = method.predict(t)
        return no_information(t, {name: res[name] for name in ("probabilities", *outputs)}, kinds)

    res = apply_to_slices(method, x, predict, tile_size=tile_size)
    probs = res.pop("probabilities")
    out = {"probabilities": probs.cpu().numpy(), "mask": _argmax_classes(probs).cpu().numpy()}
    for name in outputs:
        out[name] = res[name].cpu().numpy()
    return out


def predict_normalised_volume(
    method: Method, x: np.ndarray, *, window: Sequence[int] | None
) -> dict[str, np.ndarray]:
    """Predict normalised 3D blocks with a 3D method, in blended windows of its training patch.

    Parameters
    ----------
    method : Method
        A method with ``spatial_dims == 3``.
    x : (B, C, D, H, W) float32 ndarray
        Normalised blocks of any size (sides shorter than the window are padded). A block or
        window that is constant is background with certainty (see :func:`no_information`).
    window : (D, H, W) sequence of int or None
        The model's :meth:`~semiseg.model.Model.volume_window`; ``None``: each block whole.

    Returns
    -------
    dict
        ``mask`` (B, D, H, W) uint8 (int32 beyond 256 classes) and ``probabilities``
        (B, K, D, H, W) float32.
    """

    def predict(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return no_information(t, {"probabilities": method.predict(t)["probabilities"]})

    probs = apply_in_windows(method, x, predict, window)["probabilities"]
    return {"probabilities": probs.cpu().numpy(), "mask": _argmax_classes(probs).cpu().numpy()}


def constant_inputs(t: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: which of the ``(B, C, *s)`` inputs (slices, windows or 3D blocks) are
    constant in every channel."""
    flat = t.flatten(2)
    return (flat.amax(2) == flat.amin(2)).all(1)


def no_information(
    t: torch.Tensor, res: dict[str, torch.Tensor], kinds: dict[str, str | None] | None = None
) -> dict[str, torch.Tensor]:
    """Make the predictions of constant inputs say "nothing here".

    A constant slice or window (all zeros, a constant fill, padding) holds no information; the
    network's answer on it is an artefact (instance normalisation maps it to zeros and the
    convolutions' zero padding draws a frame along its border). Its probabilities become
    certain background (1 for class 0), its ``difference`` outputs (residuals) 0 and its image
    outputs (healthy translations) the input itself. Non-finite answers are left as they are,
    so that a broken network is reported on blank inputs too.

    Parameters
    ----------
    t : (B, C, h, w) or (B, C, d, h, w) Tensor
        Normalised inputs, as given to ``method.predict``.
    res : dict of (B, c, h, w) or (B, c, d, h, w) Tensor
        ``probabilities`` and any extra outputs of ``method.predict(t)``.
    kinds : dict of str to str, optional
        ``method.outputs`` kinds of the extra outputs (``"difference"`` or an image kind).

    Returns
    -------
    dict
        ``res``, with the entries of constant inputs replaced (other entries untouched).
    """
    blank = constant_inputs(t)
    if not bool(blank.any()):
        return res
    if not all(bool(torch.isfinite(v[blank]).all()) for v in res.values()):
        return res  # a broken network (NaN, Inf) is still reported, blank inputs or not
    out = dict(res)
    for name, value in res.items():
        value = value.clone()
        if name == "probabilities":
            value[blank] = 0
            value[blank, 0] = 1
        elif (kinds or {}).get(name) == "difference":
            value[blank] = 0
        elif value.shape[1] == t.shape[1]:
            value[blank] = t[blank].to(value.dtype)
        out[name] = value
    return out


def _argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(1)`` (first maximum wins) as uint8 (int32 beyond 256 classes), without
    torch's slow strided CPU reduction over the class axis (about 10x faster on CPU for
    (B, K, H, W) inputs); temporaries are one slice at a time."""
    dtype = torch.uint8 if probs.shape[1] <= 256 else torch.int32
    idx = torch.zeros((probs.shape[0], *probs.shape[2:]), dtype=dtype, device=probs.device)
    for b in range(probs.shape[0]):
        best = probs[b, 0]
        for k in range(1, probs.shape[1]):
            better = probs[b, k] > best
            idx[b][better] = k
            best = torch.maximum(best, probs[b, k])
    return idx


def mask_dtype(num_classes: int) -> np.dtype:
    """Dtype of predicted masks: uint8, or uint16 beyond 256 classes."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def slab_slices(
    model: Model, slice_shape: Sequence[int], batch_size: int, *, outputs: int = 0,
    itemsize: int = 4, budget: int | None = None,
) -> int:
    """Slices per slab: ``batch_size``, or fewer so that a slab's working memory stays within
    ``budget`` bytes (default :data:`SLAB_MEMORY`), at least one.

    The working memory of a slab is per pixel: the raw slices (``itemsize`` bytes a channel),
    their normalised copy (4 bytes a channel), the class probabilities (4 bytes a class), the
    mask and each extra output (4 bytes a channel); with slice context, also the stacked
    neighbours (4 bytes a channel and neighbour; the halo's slices are not counted).
    """
    budget = SLAB_MEMORY if budget is None else budget
    c, k = model.in_channels, model.num_classes
    per_pixel = c * (itemsize + 4) + 4 * k + 4 * c * outputs + mask_dtype(k).itemsize
    if model.context:  # each slice's normalised neighbours, stacked as channels
        per_pixel += 4 * c * (2 * model.context + 1)
    per_slice = per_pixel * math.prod(int(d) for d in slice_shape)
    return int(max(1, min(batch_size, budget // max(1, per_slice))))


def normalise_slices(normaliser, raw) -> np.ndarray:
    """``(B, C, H, W)`` float32 normalised copy of raw slices, one slice at a time (so the
    temporaries of the arithmetic are one slice, not the batch)."""
    out = np.empty(raw.shape, np.float32)
    for i in range(raw.shape[0]):
        out[i] = normaliser(raw[i], channel_axis=0)
    return out


def _load_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


_MALLOC_TRIM = _load_trim()


def release_free_memory() -> None:
    """Hand the memory freed by the last slab back to the operating system (glibc).

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in its heaps,
    where slabs of different threads fragment them: a long threaded prediction then creeps up
    in resident memory with the number of slabs. ``malloc_trim`` after each slab keeps the peak
    at one slab's working set (measured: 2048 x 2048 slices, 8 or 32 of them).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def predict_slab(
    model: Model, raw, outputs: Sequence[str] = (), *, where: str = "", rows: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Predict a slab of raw slices: normalise, predict, check, bring outputs to image units.

    This is the one unit of work of streamed prediction (:func:`iter_predict_volume` and
    :mod:`semiseg.lazy`): its results are written to the output arrays before the next slab is
    read, so memory is bounded by the slab (see :func:`slab_slices`), not the volume.

    Parameters
    ----------
    model : Model
    raw : (B, C, H, W) array-like
        Raw slices in image units (any numeric dtype); with slice context, ``(S, C, H, W)``:
        the slices and their neighbours (:func:`read_slices`).
    outputs : sequence of str
        Extra method outputs.
    where : str
        Names the slices in error messages (e.g. ``"slices 8..15"``).
    rows : (B, 2 context + 1) int array, optional
        For a model with slice context (:attr:`Model.context`), the rows of ``raw`` each
        predicted slice sees, itself in the middle (:func:`read_slices`); the normalised rows
        are stacked as channels (:func:`semiseg.data.stack_context`). None: ``raw`` is the
        ``B`` slices themselves.

    Returns
    -------
    dict
        ``mask`` (B, H, W) :func:`mask_dtype`, ``probabilities`` (B, K, H, W) float32 and each
        output (B, C, H, W) float32 in image units.

    Raises
    ------
    InputError
        When the slices hold NaN or Inf.
    PredictionError
        When the model yields non-finite values.
    """
    method = model.method
    x = normalise_slices(model.normaliser, raw)
    if rows is not None:
        x = stack_context(x, rows)  # (B, C * (2 context + 1), H, W)
    pred = predict_normalised_slices(method, x, outputs, tile_size=model.tile_size)
    del x
    for b in range(len(pred["probabilities"])):  # one slice at a time: no (B, K, H, W) bools
        if not np.isfinite(pred["probabilities"][b]).all():
            on = f" on {where}" if where else ""
            raise PredictionError(f"the model produced non-finite values{on}")
    pred["mask"] = pred["mask"].astype(mask_dtype(model.num_classes), copy=False)
    for name in outputs:  # in place: one buffer per output
        model.normaliser.inverse(
            pred[name], channel_axis=1, difference=method.outputs[name] == "difference", in_place=True
        )
    return pred


def slab_plan(n: int, depth: int, batch_size: int = 8) -> list[tuple[int, int, int, int]]:
    """Slabs that a 3D method predicts a volume in, along the training axis.

    Each slab ``[s, e)`` holds ``max(batch_size, 2 * depth)`` slices and is read with a halo of
    ``depth`` slices on both sides (clipped to the volume), so its windows see the context
    they saw in training; only ``[s, e)`` of the result is kept.

    Returns
    -------
    list of (s, e, read_start, read_end)
    """
    size = max(int(batch_size), 2 * int(depth), 1)
    return [(s, min(n, s + size), max(0, s - depth), min(n, s + size + depth)) for s in range(0, n, size)]


def volume_slab_plan(model: Model, spatial: Sequence[int], batch_size: int, *, itemsize: int = 4):
    """:func:`slab_plan` of a 3D model for a volume of spatial shape ``(Z, Y, X)``: slabs of
    ``batch_size`` slices (fewer when slices are large, :func:`slab_slices`), at least twice
    the window depth, with a halo of one window depth. The one plan of
    :func:`iter_predict_volume`, :mod:`semiseg.lazy` and :mod:`semiseg.suggest`, so their
    results agree."""
    axis = model.axis
    plane = [d for i, d in enumerate(spatial) if i != axis]
    window = model.volume_window()
    depth = window[0] if window else model.method.patch_depth
    size = slab_slices(model, plane, batch_size, itemsize=itemsize)
    return slab_plan(int(spatial[axis]), depth, size)


def predict_slab_3d(model: Model, raw, keep: tuple[int, int], *, where: str = "") -> dict[str, np.ndarray]:
    """Predict a slab of raw slices (with its halo) with a 3D method and keep slices ``keep``.

    The 3D counterpart of :func:`predict_slab`: normalise (one slice at a time), predict in
    3D windows (:func:`predict_normalised_volume`, blank rule included), check, crop.

    Parameters
    ----------
    model : Model
    raw : (B, C, H, W) array-like
        Raw slices along the model's axis (slab and halo), in image units.
    keep : (int, int)
        The slab's own slices ``[keep[0], keep[1])`` of ``raw``.
    where : str
        Names the slices in error messages.

    Returns
    -------
    dict
        ``mask`` (b, H, W) :func:`mask_dtype` and ``probabilities`` (b, K, H, W) float32, slices
        first as :func:`predict_slab` returns them (``b = keep[1] - keep[0]``).

    Raises
    ------
    InputError
        When the slices hold NaN or Inf.
    PredictionError
        When the model yields non-finite values.
    """
    x = normalise_slices(model.normaliser, raw)  # (B, C, H, W)
    block = np.ascontiguousarray(np.moveaxis(x, 0, 1))[None]  # (1, C, B, H, W)
    del x
    pred = predict_normalised_volume(model.method, block, window=model.volume_window())
    del block
    a, b = keep
    probs = np.ascontiguousarray(np.moveaxis(pred.pop("probabilities")[0][:, a:b], 1, 0))
    if not np.isfinite(probs).all():
        on = f" on {where}" if where else ""
        raise PredictionError(f"the model produced non-finite values{on}")
    mask = pred.pop("mask")[0, a:b].astype(mask_dtype(model.num_classes), copy=False)
    return {"mask": mask, "probabilities": probs}


def _iter_predict_volume_3d(model: Model, image, res: dict, probabilities: bool, batch_size: int):
    """The body of :func:`iter_predict_volume` for 3D methods: slab by slab
    (:func:`volume_slab_plan`), each written out before the next is read."""
    method, axis = model.method, model.axis
    spatial = tuple(image.shape[1:])
    n = spatial[axis]
    itemsize = np.dtype(getattr(image, "dtype", np.float32)).itemsize
    start = time.perf_counter()
    yield Progress(0, n, {}, 0.0, phase="predict")
    for s, e, rs, re in volume_slab_plan(model, spatial, batch_size, itemsize=itemsize):
        idx = [slice(None)] * 4
        idx[axis + 1] = slice(rs, re)
        try:
            raw = np.asarray(image[tuple(idx)])
        except MemoryError:
            raise PredictionError(f"not enough memory to read slices {rs}..{re - 1}") from None
        except Exception as exc:  # corrupt chunks of lazy (zarr) images
            raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None
        x = np.moveaxis(raw, axis + 1, 0)  # (B, C, H, W)
        try:
            pred = predict_slab_3d(model, x, (s - rs, e - rs), where=f"slices {s}..{e - 1}")
        except (InputError, PredictionError):
            raise
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise PredictionError(
                    f"prediction failed at slices {s}..{e - 1}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
            raise PredictionError(
                f"out of memory predicting 3D windows {model.volume_window()} on {method.device.type}; "
                "use a smaller --crop, smaller features or a device with more memory"
            ) from None
        del x, raw
        _put(res["mask"], axis, s, e, pred.pop("mask"))
        if probabilities:
            _put(res["probabilities"], axis + 1, s, e, pred.pop("probabilities"))
        del pred
        release_free_memory()
        yield Progress(e, n, {}, time.perf_counter() - start, phase="predict")
    return res


def check_prediction_inputs(model: Model, image, outputs: Sequence[str], batch_size: int):
    """Validate prediction arguments; return ``(image as (C, Z, Y, X), was_3d)``.

    Raises
    ------
    InputError
        On a channel mismatch, an output the method does not offer or a bad batch size.
    """
    squeeze = len(image.shape) == 3
    image = as_channels(image)
    if image.shape[0] != model.in_channels:
        raise InputError(f"model expects {model.in_channels} channel(s), the image has {image.shape[0]}")
    offered = model.method.outputs
    unknown = [o for o in outputs if o not in offered]
    if unknown:
        raise InputError(f"method {model.method.name!r} has no output(s) {unknown}; it offers {list(offered)}")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    check_context(model.context, image.shape[model.axis + 1])
    return image, squeeze


def read_slices(image, axis: int, start: int, stop: int, context: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Read slices ``start..stop - 1`` and the neighbours their context needs.

    Parameters
    ----------
    image : (C, Z, Y, X) array-like
        Read once, as one contiguous range of slices along ``axis``.
    axis : int
        Spatial slicing axis.
    start, stop : int
    context : int
        Neighbours on each side (reflected at the ends, :func:`semiseg.data.context_indices`).

    Returns
    -------
    raw : (S, C, H, W) ndarray
        The slices read, in the image's dtype (``S = stop - start`` without context).
    rows : (stop - start, 2 context + 1) int ndarray or None
        Rows of ``raw`` to stack for each slice (:func:`semiseg.data.stack_context`), after
        normalisation; ``None`` without context.
    """
    rows, lo, hi = None, start, stop
    if context:
        rows = context_indices(np.arange(start, stop), image.shape[axis + 1], context)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        rows = rows - lo
    idx = [slice(None)] * 4
    idx[axis + 1] = slice(lo, hi)
    raw = np.asarray(image[tuple(idx)])
    return np.moveaxis(raw, axis + 1, 0), rows


def iter_predict_volume(
    model: Model,
    image,
    *,
    batch_size: int = 8,
    outputs: Sequence[str] = (),
    probabilities: bool = True,
    out: dict | None = None,
) -> Generator[Progress, None, dict]:
    """Predict every slice of a volume, yielding :class:`Progress` after each batch.

    Parameters
    ----------
    model : Model
    image : (Z, Y, X) or (C, Z, Y, X) array-like
        Raw image; read one batch of slices at a time and never modified.
    batch_size : int
        Slices per forward pass, at most: large slices go in fewer so that a batch holds at
        most :data:`SLAB_MEMORY` bytes (see :func:`slab_slices`).
    outputs : sequence of str
        Extra method outputs (see ``model.method.outputs``), returned in image intensity units
        with the image's shape.
    probabilities : bool
        Also return class probabilities ``(K, Z, Y, X)``.
    out : dict, optional
        Preallocated arrays (numpy or zarr) to write into, keyed like the result (``mask``,
        ``probabilities``, output names); each batch is written as soon as it is predicted.
        Missing ones are allocated in memory; with every result given as a zarr array, memory
        is bounded by one batch whatever the volume.

    Returns
    -------
    dict
        ``mask`` (Z, Y, X) uint8/uint16, optionally ``probabilities`` (K, Z, Y, X) float32, and
        each requested output.

    Raises
    ------
    InputError
        On a channel mismatch, an output the method does not offer or an unreadable image.
    PredictionError
        When the network fails, yields non-finite values or runs out of memory even one slice
        at a time (batches are halved on out-of-memory first).
    """
    image, squeeze = check_prediction_inputs(model, image, outputs, batch_size)
    method = model.method
    axis = model.axis
    spatial = tuple(image.shape[1:])
    n = spatial[axis]
    k = model.num_classes
    m_dtype = mask_dtype(k)
    plane = [d for i, d in enumerate(spatial) if i != axis]
    itemsize = np.dtype(getattr(image, "dtype", np.float32)).itemsize
    batch_size = slab_slices(model, plane, batch_size, outputs=len(outputs), itemsize=itemsize)
    res = dict(out or {})
    res.setdefault("mask", np.zeros(spatial, m_dtype))
    if probabilities:
        res.setdefault("probabilities", np.zeros((k, *spatial), np.float32))
    for name in outputs:
        res.setdefault(name, np.zeros(image.shape, np.float32))
    if getattr(method, "spatial_dims", 2) == 3:
        return (yield from _iter_predict_volume_3d(model, image, res, probabilities, batch_size))
    start = time.perf_counter()
    yield Progress(0, n, {}, 0.0, phase="predict")
    s = 0
    while s < n:
        e = min(n, s + batch_size)
        try:
            raw, rows = read_slices(image, axis, s, e, model.context)  # (B [+ halo], C, H, W)
        except MemoryError:
            raise PredictionError(f"not enough memory to read slices {s}..{e - 1}") from None
        except Exception as exc:  # corrupt chunks of lazy (zarr) images
            raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None
        try:
            pred = predict_slab(model, raw, outputs, where=f"slices {s}..{e - 1}", rows=rows)
        except (InputError, PredictionError):
            raise
        except Exception as exc:
            del raw
            if not is_out_of_memory(exc):
                raise PredictionError(
                    f"prediction failed at slices {s}..{e - 1}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
            if method.device.type == "cuda":
                torch.cuda.empty_cache()
            if batch_size > 1:  # retry the same slices in smaller batches
                batch_size = max(1, batch_size // 2)
                continue
            h, w = plane
            raise PredictionError(
                f"out of memory predicting one {h} x {w} slice on {method.device.type}; "
                "use a model with smaller features, a device with more memory, or crop the image"
            ) from None
        del raw
        _put(res["mask"], axis, s, e, pred.pop("mask"))
        if probabilities:
            _put(res["probabilities"], axis + 1, s, e, pred.pop("probabilities"))
        for name in outputs:
            _put(res[name], axis + 1, s, e, pred.pop(name))
        del pred
        release_free_memory()
        yield Progress(e, n, {}, time.perf_counter() - start, phase="predict")
        s = e
    if squeeze:
        for name in outputs:
            if isinstance(res[name], np.ndarray):
                res[name] = res[name][0]
    return res


def _put(target, axis: int, s: int, e: int, value: np.ndarray) -> None:
    """Write ``value`` (slices first) into ``target[..., s:e, ...]`` along ``axis``."""
    idx = [slice(None)] * target.ndim
    idx[axis] = slice(s, e)
    target[tuple(idx)] = np.moveaxis(value, 0, axis)


def predict_volume(model: Model, image, **kwargs) -> dict:
    """Predict a whole volume; same arguments as :func:`iter_predict_volume`."""
    return run(iter_predict_volume(model, image, **kwargs))


def sample_tumours(model: Model, image, index: int, n: int, *, seed: int = 0) -> np.ndarray:
    """``(n, [C,] Y, X)`` sampled absence->presence translations of slice ``index``.

    Raises
    ------
    InputError
        When the method cannot sample.
    """
    method = model.method
    if not method.can_sample:
        raise InputError(f"method {method.name!r} cannot sample tumours")
    squeeze = len(image.shape) == 3
    image = as_channels(image)
    idx = [slice(None)] * 4
    idx[model.axis + 1] = index
    x = model.normaliser(np.asarray(image[tuple(idx)], dtype=np.float32))[None]

    # In the windows prediction uses (the training crop): a slice much larger than the crops
    # the networks learnt on would be drawn with other normalisation statistics. Every window
    # of sample i draws the same unique code (same seed, same window size), and the windows
    # are blended like predictions.
    def draw(t: torch.Tensor) -> dict[str, torch.Tensor]:
        s = method.sample_tumours(t, n, seed)
        return {str(i): s[i] for i in range(n)}

    res = apply_to_slices(method, x, draw, tile_size=model.tile_size)
    samples = torch.stack([res[str(i)][0] for i in range(n)]).float().cpu().numpy()
    samples = model.normaliser.inverse(samples, channel_axis=1)
    return samples[:, 0] if squeeze else samples
