"""Whole-volume prediction, slice batch by slice batch.

A slice no larger than the model's training crop (``Method.tile_size``) is predicted whole,
padded by reflection to the network's size multiple and cropped back. A larger slice is
predicted in overlapping windows of the training crop, blended with a Gaussian weight that
favours window centres (as nnU-Net and MONAI's sliding-window inference do): the networks use
instance normalisation, whose statistics change with the extent of the input, and a whole slice
much larger than the crops the network learnt on is segmented far worse than its windows.
Inputs are read one batch of slices at a time, so lazy (zarr, dask) volumes are never loaded
whole, and outputs may be zarr arrays written batch by batch.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Generator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .data import InputError, as_channels
from .engine import PredictionError, Progress, first_line, is_out_of_memory, run
from .methods.base import Method
from .model import Model

__all__ = [
    "apply_in_windows",
    "apply_to_slices",
    "blend_windows",
    "iter_predict_volume",
    "predict_normalised_slices",
    "predict_normalised_volume",
    "predict_volume",
]

#: Share of a window that its neighbour overlaps (MONAI's default).
WINDOW_OVERLAP = 0.25


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


def window_starts(size: int, tile: int, overlap: float = WINDOW_OVERLAP) -> list[int]:
    """Starts of windows of side ``tile`` that cover ``[0, size)``, neighbours overlapping by at
    least ``overlap * tile``, spread evenly so the last one ends at ``size``."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = math.ceil((size - tile) / stride) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def gaussian_window(tile: int | Sequence[int], device: torch.device) -> torch.Tensor:
    """Blending weight of a window: ``(tile, tile)`` for an int, else of shape ``tile`` (any
    number of dimensions). A Gaussian of sigma ``side / 8`` along each side (nnU-Net's choice),
    floored so that every pixel of a window keeps a positive weight."""
    sizes = (tile, tile) if isinstance(tile, int) else tuple(int(t) for t in tile)
    w = None
    for d, n in enumerate(sizes):
        r = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        g = torch.exp(-(r**2) / (2 * (n / 8) ** 2))
        shape = [1] * len(sizes)
        shape[d] = n
        w = g.reshape(shape) if w is None else w * g.reshape(shape)
    return (w / w.max()).clamp_min(1e-3)


def pad_spatial(a: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the last ``len(size)`` axes of ``a`` up to ``size``, centred, by reflection (edge
    replication when a side is too short to reflect), as the training crops were padded.

    Returns the padded array and the slices that crop it back to ``a``'s extent.
    """
    n = len(size)
    sides = a.shape[-n:]
    pads = [max(0, int(t) - s) for t, s in zip(size, sides)]
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, sides))
    if not any(pads):
        return a, crop
    mode = "reflect" if all(p < s for p, s in zip(pads, sides)) else "edge"
    width = [(0, 0)] * (a.ndim - n) + [(p // 2, p - p // 2) for p in pads]
    return np.pad(a, width, mode=mode), crop


def blend_windows(
    t: torch.Tensor,
    window: Sequence[int],
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    overlap: float = WINDOW_OVERLAP,
) -> dict[str, torch.Tensor]:
    """Apply ``fn`` to overlapping windows of ``t`` and blend them with Gaussian weights.

    Parameters
    ----------
    t : (B, C, *S) Tensor
        Input at least as large as ``window`` along each of its ``len(window)`` last axes.
    window : sequence of int
        Window size along the last axes (2 for slices, 3 for volumes).
    fn : callable
        Maps a ``(B, C, *window)`` tensor to a dict of ``(B, c, *window)`` tensors.
    overlap : float
        Share of a window overlapped by its neighbours.

    Returns
    -------
    dict of (B, c, *S) float32 tensors
        The weighted average of every window covering each voxel (weights
        :func:`gaussian_window`).
    """
    window = tuple(int(w) for w in window)
    spatial = tuple(t.shape[-len(window) :])
    weight = gaussian_window(window, t.device)
    total = torch.zeros(spatial, dtype=torch.float32, device=t.device)
    acc: dict[str, torch.Tensor] = {}
    starts = [window_starts(n, w, overlap) for n, w in zip(spatial, window)]
    for corner in itertools.product(*starts):
        win = (Ellipsis, *(slice(c, c + w) for c, w in zip(corner, window)))
        for key, value in fn(t[win]).items():
            if key not in acc:
                acc[key] = torch.zeros((*value.shape[:2], *spatial), dtype=torch.float32, device=t.device)
            acc[key][win] += value.float() * weight
        total[win] += weight
    return {k: v / total for k, v in acc.items()}


def _window_size(method: Method, h: int, w: int) -> int | None:
    """Window side for ``(h, w)`` slices (a multiple of the network's size multiple), or
    ``None`` when they are predicted whole."""
    tile = method.tile_size
    if not tile or (h <= tile and w <= tile):
        return None
    m = method.size_multiple
    return int(math.ceil(tile / m) * m)


def apply_to_slices(
    method: Method,
    x: np.ndarray,
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    *,
    overlap: float = WINDOW_OVERLAP,
) -> dict[str, torch.Tensor]:
    """Apply a per-pixel map ``fn`` to normalised slices, whole or window by window.

    Parameters
    ----------
    method : Method
        Gives the device, the size multiple and :attr:`~semiseg.methods.base.Method.tile_size`.
    x : (B, C, H, W) float32 ndarray
        Normalised slices of any size.
    fn : callable
        Maps a ``(B, C, h, w)`` tensor (``h``, ``w`` multiples of ``method.size_multiple``) to a
        dict of ``(B, c, h, w)`` tensors, e.g. class probabilities.
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
    h, w = x.shape[-2:]
    tile = _window_size(method, h, w)
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
    :func:`predict_normalised_volume` (3D).

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
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    spatial = x.shape[2:]
    with torch.no_grad():
        if window is None or all(s <= w for s, w in zip(spatial, window)):
            if len(spatial) == 2:
                t, (rows, cols) = pad_to_multiple(method, x)
                return {k: v[..., rows, cols].float() for k, v in fn(t).items()}
            t = method.to_tensor(np.ascontiguousarray(x, dtype=np.float32))
            return {k: v.float() for k, v in fn(t).items()}
        padded, crop = pad_spatial(x, window)
        t = method.to_tensor(np.ascontiguousarray(padded, dtype=np.float32))
        return {k: v[(Ellipsis, *crop)] for k, v in blend_windows(t, window, fn, overlap).items()}


def predict_normalised_slices(
    method: Method, x: np.ndarray, outputs: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Predict a stack of normalised slices.

    Parameters
    ----------
    method : Method
    x : (B, C, H, W) float32 ndarray
        Normalised slices of any size; slices larger than ``method.tile_size`` are predicted in
        overlapping windows (see :func:`apply_to_slices`).
    outputs : sequence of str
        Extra method outputs to return (e.g. ``"residual"``), in normalised units.

    Returns
    -------
    dict
        ``mask`` (B, H, W) int64, ``probabilities`` (B, K, H, W) float32, and each requested
        output as (B, C, H, W) float32.
    """

    def predict(t: torch.Tensor) -> dict[str, torch.Tensor]:
        res = method.predict(t)
        return {name: res[name] for name in ("probabilities", *outputs)}

    res = apply_to_slices(method, x, predict)
    probs = res.pop("probabilities")
    out = {"probabilities": probs.cpu().numpy(), "mask": _argmax_classes(probs).cpu().numpy()}
    for name in outputs:
        out[name] = res[name].cpu().numpy()
    return out


def predict_normalised_volume(method: Method, x: np.ndarray) -> dict[str, np.ndarray]:
    """Predict normalised 3D blocks with a 3D method, in blended windows of its training patch.

    Parameters
    ----------
    method : Method
        A method with ``spatial_dims == 3``; ``method.window()`` gives the ``(D, H, W)`` window
        (``None``: each block whole).
    x : (B, C, D, H, W) float32 ndarray
        Normalised blocks of any size (sides shorter than the window are padded).

    Returns
    -------
    dict
        ``mask`` (B, D, H, W) int64 and ``probabilities`` (B, K, D, H, W) float32.
    """
    res = apply_in_windows(method, x, lambda t: {"probabilities": method.predict(t)["probabilities"]}, method.window())
    probs = res["probabilities"]
    return {"probabilities": probs.cpu().numpy(), "mask": _argmax_classes(probs).cpu().numpy()}


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


def predict_block_3d(model: Model, raw: np.ndarray, keep: tuple[int, int]) -> dict[str, np.ndarray]:
    """Predict a raw block ``(C, ...)`` read along ``model.axis`` and keep slices ``keep``.

    Returns ``mask`` (spatial, the block's axis order) int64 and ``probabilities`` (K, ...)
    float32, cropped to ``[keep[0], keep[1])`` along the model's axis.
    """
    axis = model.axis
    x = np.moveaxis(np.asarray(raw, dtype=np.float32), axis + 1, 1)  # (C, D, H, W)
    pred = predict_normalised_volume(model.method, model.normaliser(x, channel_axis=0)[None])
    a, b = keep
    mask = np.moveaxis(pred["mask"][0, a:b], 0, axis)
    probs = np.moveaxis(pred["probabilities"][0][:, a:b], 1, axis + 1)
    return {"mask": mask, "probabilities": probs}


def _iter_predict_volume_3d(model, image, res, probabilities, batch_size, mask_dtype):
    """The body of :func:`iter_predict_volume` for 3D methods: slab by slab (:func:`slab_plan`)."""
    method, axis = model.method, model.axis
    n = image.shape[axis + 1]
    window = method.window()
    depth = window[0] if window else method.patch_depth
    start = time.perf_counter()
    yield Progress(0, n, {}, 0.0, phase="predict")
    for s, e, rs, re in slab_plan(n, depth, batch_size):
        idx = [slice(None)] * 4
        idx[axis + 1] = slice(rs, re)
        try:
            raw = np.asarray(image[tuple(idx)], dtype=np.float32)
        except MemoryError:
            raise PredictionError(f"not enough memory to read slices {rs}..{re - 1}") from None
        except Exception as exc:  # corrupt chunks of lazy (zarr) images
            raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None
        try:
            pred = predict_block_3d(model, raw, (s - rs, e - rs))
        except InputError:
            raise
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise PredictionError(
                    f"prediction failed at slices {s}..{e - 1}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
            raise PredictionError(
                f"out of memory predicting 3D windows {window} on {method.device.type}; "
                "use a smaller --crop, smaller features or a device with more memory"
            ) from None
        if not np.isfinite(pred["probabilities"]).all():
            raise PredictionError(f"the model produced non-finite values on slices {s}..{e - 1}")
        _put(res["mask"], axis, s, e, np.moveaxis(pred["mask"].astype(mask_dtype), axis, 0))
        if probabilities:
            _put(res["probabilities"], axis + 1, s, e, np.moveaxis(pred["probabilities"], axis + 1, 0))
        yield Progress(e, n, {}, time.perf_counter() - start, phase="predict")
    return res


def _argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(1)`` (first maximum wins) without torch's slow strided CPU reduction
    over the class axis (about 10x faster on CPU for (B, K, H, W) inputs)."""
    best = probs[:, 0]
    idx = torch.zeros(best.shape, dtype=torch.int64, device=probs.device)
    for k in range(1, probs.shape[1]):
        better = probs[:, k] > best
        idx[better] = k
        best = torch.maximum(best, probs[:, k])
    return idx


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
    return image, squeeze


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
        Slices per forward pass.
    outputs : sequence of str
        Extra method outputs (see ``model.method.outputs``), returned in image intensity units
        with the image's shape.
    probabilities : bool
        Also return class probabilities ``(K, Z, Y, X)``.
    out : dict, optional
        Preallocated arrays (numpy or zarr) to write into, keyed like the result (``mask``,
        ``probabilities``, output names). Missing ones are allocated in memory.

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
    mask_dtype = np.uint8 if k <= 256 else np.uint16
    res = dict(out or {})
    res.setdefault("mask", np.zeros(spatial, mask_dtype))
    if probabilities:
        res.setdefault("probabilities", np.zeros((k, *spatial), np.float32))
    for name in outputs:
        res.setdefault(name, np.zeros(image.shape, np.float32))
    if getattr(method, "spatial_dims", 2) == 3:
        return (yield from _iter_predict_volume_3d(model, image, res, probabilities, batch_size, mask_dtype))
    lo = np.asarray(model.normaliser.low, np.float32)[None, :, None, None]
    hi = np.asarray(model.normaliser.high, np.float32)[None, :, None, None]
    start = time.perf_counter()
    yield Progress(0, n, {}, 0.0, phase="predict")
    s = 0
    while s < n:
        e = min(n, s + batch_size)
        idx = [slice(None)] * 4
        idx[axis + 1] = slice(s, e)
        try:
            raw = np.asarray(image[tuple(idx)], dtype=np.float32)
        except MemoryError:
            raise PredictionError(f"not enough memory to read slices {s}..{e - 1}") from None
        except Exception as exc:  # corrupt chunks of lazy (zarr) images
            raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None
        x = np.moveaxis(raw, axis + 1, 0)  # (B, C, H, W)
        try:
            pred = predict_normalised_slices(method, model.normaliser(x, channel_axis=1), outputs)
        except InputError:
            raise
        except Exception as exc:
            del x, raw
            if not is_out_of_memory(exc):
                raise PredictionError(
                    f"prediction failed at slices {s}..{e - 1}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
            if method.device.type == "cuda":
                torch.cuda.empty_cache()
            if batch_size > 1:  # retry the same slices in smaller batches
                batch_size = max(1, batch_size // 2)
                continue
            h, w = (d for i, d in enumerate(spatial) if i != axis)
            raise PredictionError(
                f"out of memory predicting one {h} x {w} slice on {method.device.type}; "
                "use a model with smaller features, a device with more memory, or crop the image"
            ) from None
        if not np.isfinite(pred["probabilities"]).all():
            raise PredictionError(f"the model produced non-finite values on slices {s}..{e - 1}")
        _put(res["mask"], axis, s, e, pred["mask"].astype(mask_dtype))
        if probabilities:
            _put(res["probabilities"], axis + 1, s, e, pred["probabilities"])
        for name in outputs:
            y = pred[name]
            if method.outputs[name] == "difference":
                y = y * (hi - lo) / 2
            else:
                y = (y + 1) * (hi - lo) / 2 + lo
            _put(res[name], axis + 1, s, e, y)
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
    t, (rows, cols) = pad_to_multiple(method, x)
    with torch.no_grad():
        samples = method.sample_tumours(t, n, seed)[:, 0, :, rows, cols].float().cpu().numpy()
    lo = np.asarray(model.normaliser.low, np.float32)[None, :, None, None]
    hi = np.asarray(model.normaliser.high, np.float32)[None, :, None, None]
    samples = (samples + 1) * (hi - lo) / 2 + lo
    return samples[:, 0] if squeeze else samples
