"""Layer helpers shared by the widgets: weak tags, the viewed slice, overlay layers.

Weak tags live in the labels layer's ``metadata[TAGS_KEY]`` as a ``(n_slices,)`` int8 array
(-1 unknown, 0 healthy, 1 diseased) along axis 0 of the labels. Overlays are named after the
image (``"<image> prediction"``, ``"<image> probability"``, ...) and are updated in place: a
second run replaces ``layer.data`` of the same layer object.
"""

from __future__ import annotations

import numpy as np

from ..data import UNKNOWN
from . import TAGS_KEY

#: Suffixes of the layers the Train widget creates (never offered as inputs).
OVERLAY_SUFFIXES = (
    " prediction",
    " probability",
    " residual",
    " healthy",
    " sampled tumours",
    " preview",
)


def is_overlay(layer) -> bool:
    return bool(layer.metadata.get("semiseg_overlay")) or layer.name.endswith(OVERLAY_SUFFIXES)


def get_tags(labels_layer) -> np.ndarray:
    """Weak tags of ``labels_layer`` (all unknown when it has none or they do not fit)."""
    n = labels_layer.data.shape[0]
    tags = labels_layer.metadata.get(TAGS_KEY)
    if tags is None or np.shape(tags) != (n,):
        return np.full(n, UNKNOWN, np.int8)
    return np.asarray(tags, np.int8)


def set_tags(labels_layer, tags) -> None:
    """Store weak tags in ``labels_layer.metadata`` (a copy, int8)."""
    labels_layer.metadata[TAGS_KEY] = np.asarray(tags, np.int8).copy()


def current_slice(viewer, layer) -> int:
    """Index along the layer's first spatial axis (Z of ``(Z, Y, X)``) shown by the viewer."""
    ndim = min(layer.ndim, 3)
    coord = layer.world_to_data(viewer.dims.point)[-ndim]
    n = layer.data.shape[-ndim]
    return int(np.clip(np.round(coord), 0, n - 1))


def upsert(viewer, name: str, data, layer_type: str, *, like=None, **kwargs):
    """Replace the data of layer ``name`` in place, or add it when missing.

    ``like`` (a layer) supplies scale and translate for the last three axes.
    """
    if like is not None:
        nd = np.ndim(data) if not hasattr(data, "ndim") else data.ndim
        extra = nd - min(like.ndim, 3)
        scale = [1.0] * extra + list(like.scale[-3:])
        translate = [0.0] * extra + list(like.translate[-3:])
        kwargs.setdefault("scale", scale)
        extra_translate = kwargs.pop("translate_offset", None)
        if extra_translate is not None:
            translate = [t + o * s for t, o, s in zip(translate, extra_translate, scale)]
        kwargs.setdefault("translate", translate)
    if name in viewer.layers:
        layer = viewer.layers[name]
        if layer._type_string == layer_type and layer.ndim == data.ndim:
            layer.data = data
            for key in ("scale", "translate"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            return layer
        viewer.layers.remove(layer)
    meta = dict(kwargs.pop("metadata", {}))
    meta["semiseg_overlay"] = True
    add = getattr(viewer, f"add_{layer_type}")
    return add(data, name=name, metadata=meta, **kwargs)


def stack_channels(layers):
    """Image layers as the channels of one ``(C, Z, Y, X)`` input (lazy data stays lazy).

    Raises
    ------
    InputError
        Without layers, for RGB layers and for channels that differ in shape.
    """
    from ..data import InputError

    if not layers:
        raise InputError("choose at least one image layer")
    datas = []
    for layer in layers:
        data = layer.data[0] if layer.multiscale else layer.data
        if getattr(layer, "rgb", False):
            raise InputError(f"{layer.name} is an RGB image; split it into channels first")
        datas.append(data)
    shapes = {tuple(d.shape) for d in datas}
    if len(shapes) > 1:
        raise InputError(f"channel layers differ in shape: {sorted(shapes)}")
    if all(isinstance(d, np.ndarray) for d in datas):
        return datas[0][None] if len(datas) == 1 else np.stack(datas)
    import dask.array as da

    return da.stack([d if hasattr(d, "dask") else da.from_array(d, chunks=(1, *d.shape[-2:])) for d in datas])


def copy_prediction_slices(labels_layer, prediction_layer, start: int, stop: int) -> int:
    """Copy slices ``start..stop`` (inclusive) of the prediction into the labels layer as one
    undoable edit (``Labels.data_setitem``; Ctrl+Z reverts it). Returns the pixels changed."""
    labels, pred = labels_layer, prediction_layer
    changed = 0
    with labels.block_history():
        for i in range(start, stop + 1):
            new = np.asarray(pred.data[i]).astype(labels.data.dtype)
            diff = np.nonzero(np.asarray(labels.data[i]) != new)
            if diff[0].size == 0:
                continue
            idx = (np.full(diff[0].size, i), *diff)
            labels.data_setitem(idx, new[diff])
            changed += diff[0].size
    return changed
