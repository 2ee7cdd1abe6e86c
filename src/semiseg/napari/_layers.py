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
    """Store weak tags in ``labels_layer.metadata`` (a copy, int8).

    Assigned as a new dict so the layer emits ``events.metadata``: the suggestion list and
    the tag strip follow tags set by any widget (issue 20 item 5).
    """
    labels_layer.metadata = {**labels_layer.metadata, TAGS_KEY: np.asarray(tags, np.int8).copy()}


def current_slice(viewer, layer) -> int:
    """Index along the layer's first spatial axis (Z of ``(Z, Y, X)``) shown by the viewer."""
    ndim = min(layer.ndim, 3)
    coord = layer.world_to_data(viewer.dims.point)[-ndim]
    n = layer.data.shape[-ndim]
    return int(np.clip(np.round(coord), 0, n - 1))


def is_layer_type(layer, layer_type: str) -> bool:
    """Whether ``layer`` is a napari layer of kind ``layer_type`` (``"labels"``, ``"image"``...).

    By class, through napari's public ``napari.layers``: the private ``Layer._type_string``
    warns (FutureWarning) in napari >= 0.6 (issue 20 item 12).
    """
    import napari.layers

    cls = getattr(napari.layers, layer_type.capitalize(), None)
    return cls is not None and isinstance(layer, cls)


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
        if is_layer_type(layer, layer_type) and layer.ndim == data.ndim:
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


def painted_slices(labels, start: int, stop: int) -> list[int]:
    """Slices ``start..stop`` (inclusive, axis 0) of ``labels`` that hold any nonzero label."""
    return [i for i in range(start, stop + 1) if np.asarray(labels[i]).any()]


def copy_prediction_slices(labels_layer, prediction_layer, start: int, stop: int, *,
                           overwrite_painted: bool = False) -> tuple[int, list[int]]:
    """Copy slices ``start..stop`` (inclusive) of the prediction into the labels layer as one
    undoable edit (``Labels.data_setitem``; Ctrl+Z reverts it).

    Slices that already hold labels are the user's own work: they are skipped unless
    ``overwrite_painted``. Returns ``(pixels changed, skipped slices)``.
    """
    labels, pred = labels_layer, prediction_layer
    changed = 0
    skipped = [] if overwrite_painted else painted_slices(labels.data, start, stop)
    with labels.block_history():
        for i in range(start, stop + 1):
            if i in skipped:
                continue
            new = np.asarray(pred.data[i]).astype(labels.data.dtype)
            diff = np.nonzero(np.asarray(labels.data[i]) != new)
            if diff[0].size == 0:
                continue
            idx = (np.full(diff[0].size, i), *diff)
            labels.data_setitem(idx, new[diff])
            changed += diff[0].size
    return changed, skipped


def undo_edit(labels_layer, *, redo: bool = False) -> bool:
    """Undo (or redo) the last edit of ``labels_layer`` and say so with ``events.paint``.

    napari's ``Labels.undo`` writes the data without any event, so the widgets that follow
    the labels (tag strip, suggestion list, plane recorder, autosave) would show the state
    before the undo. The paint event carries ``(indices, None, values now there)`` atoms of
    the region the undo wrote, the form ``data_setitem`` edits have. Returns whether an edit
    was undone (redone).
    """
    layer = labels_layer
    # The history lists are napari's (no public accessor): the undone item moves from one to
    # the other, so its atoms name the region just written.
    target = layer._undo_history if redo else layer._redo_history
    n = len(target)
    (layer.redo if redo else layer.undo)()
    if len(target) == n:
        return False
    atoms = []
    for atom in target[-1]:
        if hasattr(atom, "slice_key"):  # a masked brush atom: its bounding box
            key = tuple(atom.slice_key)
            region = np.asarray(layer.data[key])
            grid = np.nonzero(np.ones(region.shape, bool) if atom.mask is None else np.asarray(atom.mask))
            idx = tuple(g + (k.start or 0) for g, k in zip(grid, key))
        else:
            idx = tuple(np.asarray(i) for i in atom[0])
        atoms.append((idx, None, np.asarray(layer.data[idx])))
    layer.events.paint(value=atoms)
    return True
