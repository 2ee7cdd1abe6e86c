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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from .data import _pad_to, as_channels
from .errors import InputError, PredictionError, first_line, is_out_of_memory
from .methods.base import Method
from .progress import Progress, run
from .windows import WINDOW_OVERLAP, blend_windows, check_overlap, gaussian_window, window_starts

if TYPE_CHECKING:  # a Model predicts through this module (Model.predict)
    from .model import Model

__all__ = [
    "WINDOW_OVERLAP",
    "apply_to_slices",
    "gaussian_window",
    "iter_predict_volume",
    "predict_normalised_slices",
    "predict_volume",
    "window_starts",
]


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
    check_overlap(overlap)
    h, w = x.shape[-2:]
    tile = _window_size(method, tile_size, h, w)
    with torch.no_grad():
        if tile is None:
            t, (rows, cols) = pad_to_multiple(method, x)
            return {k: v[..., rows, cols].float() for k, v in fn(t).items()}
        # A side shorter than the window is padded like the training crops were.
        ph, pw = max(0, tile - h), max(0, tile - w)
        t = method.to_tensor(np.ascontiguousarray(_pad_to(x, (tile, tile)), dtype=np.float32))
        rows, cols = slice(ph // 2, ph // 2 + h), slice(pw // 2, pw // 2 + w)
        return {k: v[..., rows, cols] for k, v in blend_windows(t, fn, tile, overlap).items()}


def predict_normalised_slices(
    method: Method, x: np.ndarray, outputs: Sequence[str] = (), *, tile_size: int | None
) -> dict[str, np.ndarray]:
    """Predict a stack of normalised slices.

    Parameters
    ----------
    method : Method
    x : (B, C, H, W) float32 ndarray
        Normalised slices of any size; slices larger than ``tile_size`` are predicted in
        overlapping windows (see :func:`apply_to_slices`).
    outputs : sequence of str
        Extra method outputs to return (e.g. ``"residual"``), in normalised units.
    tile_size : int or None
        Window side (the model's :attr:`~semiseg.model.Model.tile_size`; None: whole slices).

    Returns
    -------
    dict
        ``mask`` (B, H, W) int64, ``probabilities`` (B, K, H, W) float32, and each requested
        output as (B, C, H, W) float32.
    """

    def predict(t: torch.Tensor) -> dict[str, torch.Tensor]:
        res = method.predict(t)
        return {name: res[name] for name in ("probabilities", *outputs)}

    res = apply_to_slices(method, x, predict, tile_size=tile_size)
    probs = res.pop("probabilities")
    out = {"probabilities": probs.cpu().numpy(), "mask": _argmax_classes(probs).cpu().numpy()}
    for name in outputs:
        out[name] = res[name].cpu().numpy()
    return out


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
            pred = predict_normalised_slices(
                method, model.normaliser(x, channel_axis=1), outputs, tile_size=model.tile_size
            )
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
            y = model.normaliser.inverse(
                pred[name], channel_axis=1, difference=method.outputs[name] == "difference"
            )
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
    samples = model.normaliser.inverse(samples, channel_axis=1)
    return samples[:, 0] if squeeze else samples
