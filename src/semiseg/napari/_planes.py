"""Record the plane of every painted slice in a labels layer's metadata (no Qt).

A user may paint a few axial slices, then turn the view (napari's *Transpose* / *Roll dims*)
and paint a sagittal or coronal one. :func:`track_planes` connects to the layer's
``events.paint`` (emitted once per brush stroke, fill, polygon or ``data_setitem`` edit, its
``value`` the list of history atoms) and keeps ``layer.metadata[PLANES_KEY]`` as a sorted,
de-duplicated ``[[axis, index], ...]`` list of the fully annotated slices
(:mod:`semiseg.planes`), axes of the layer's ``(Z, Y, X)``:

- a 2D-view edit confined to the viewed slice records ``(not-displayed axis, index)``;
- an edit confined to one slice of another axis (``data_setitem`` of a whole slice, e.g. the
  Train widget's Accept) records that slice, in any view;
- an edit that spans several slices of every axis (a 3D brush), and any brush stroke in 3D
  view, records nothing new;
- an edit that leaves its slice without any label (erasing it whole) removes it.

Undo and redo emit no paint event: a slice emptied by Undo stays listed, and
:func:`planes_for_training` leaves such empty slices out.

When the layer has no recorded planes yet, they start as the slices along axis 0 holding
labels (what training assumed before planes were recorded); replacing ``layer.data`` starts
them anew the same way.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..planes import as_planes, planes_from_labels

#: Key of the annotated planes in a labels layer's ``metadata``: ``[[axis, index], ...]``.
PLANES_KEY = "semiseg_planes"

_RECORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_planes(layer) -> list[list[int]] | None:
    """The recorded ``[[axis, index], ...]`` of ``layer`` (None when it has none)."""
    planes = layer.metadata.get(PLANES_KEY)
    return None if planes is None else [list(p) for p in as_planes(planes)]


def set_planes(layer, planes) -> None:
    """Store planes in ``layer.metadata`` (sorted, de-duplicated lists of ints)."""
    layer.metadata[PLANES_KEY] = [list(p) for p in as_planes(planes)]


def planes_for_training(layer, axis: int = 0) -> tuple | None:
    """The planes to train on, or None to read the annotated slices off the labels.

    Recorded slices that hold no label any more (undone or erased) are left out. When every
    remaining plane lies along the training ``axis``, the planes tell training nothing the
    labels do not, so None is returned and training works as before planes were recorded
    (this also covers slices edited without a paint event, e.g. ``layer.data[...] = ...``).

    Parameters
    ----------
    layer : napari.layers.Labels
        ``(Z, Y, X)`` labels.
    axis : int
        Training axis of ``(Z, Y, X)``.
    """
    planes = get_planes(layer)
    if planes is None or np.ndim(layer.data) != 3:
        return None
    kept = tuple((a, i) for a, i in planes if i < layer.data.shape[a] and _holds_labels(layer.data, a, i))
    if all(a == axis for a, _ in kept):
        return None
    return kept


def _holds_labels(data, axis: int, index: int) -> bool:
    idx = [slice(None)] * 3
    idx[axis] = int(index)
    return bool(np.asarray(data[tuple(idx)]).any())


def _slice_after(data, axis: int, index: int, atoms) -> np.ndarray:
    """Slice ``index`` along ``axis`` of ``data`` once the edits ``atoms`` are applied.

    napari emits ``events.paint`` before it writes a single edit (``paint``, ``data_setitem``)
    and after it wrote a whole brush stroke; re-applying the atoms' new values to a copy of
    the slice gives the state after the edit either way.
    """
    idx = [slice(None)] * 3
    idx[axis] = int(index)
    out = np.array(data[tuple(idx)], copy=True)
    rest = [d for d in range(3) if d != axis]
    for atom in atoms:
        if hasattr(atom, "slice_key"):
            key = atom.slice_key[-3:]
            start, stop, _ = key[axis].indices(data.shape[axis])
            if not start <= index < stop:
                continue
            region = tuple(key[d] for d in rest)
            if atom.mask is None:
                out[region] = atom.new_value
            else:
                mask = np.take(np.asarray(atom.mask).reshape(atom.mask.shape[-3:]), index - start, axis=axis)
                view = out[region]
                view[mask] = atom.new_value
        else:
            indices, _, new = atom[0], atom[1], atom[2]
            if not isinstance(indices, tuple) or len(indices) < 3:
                continue
            ix = [np.asarray(i) for i in indices[-3:]]
            sel = ix[axis] == index
            if not sel.any():
                continue
            new = np.asarray(new)
            out[ix[rest[0]][sel], ix[rest[1]][sel]] = new[sel] if new.ndim else new
    return out


def viewed_axis(viewer, layer) -> int | None:
    """The layer axis the viewer slices along in 2D view (None in 3D view or for non-3D layers)."""
    if viewer.dims.ndisplay != 2 or layer.ndim != 3:
        return None
    offset = viewer.dims.ndim - layer.ndim
    hidden = [d - offset for d in viewer.dims.not_displayed if d - offset >= 0]
    return hidden[0] if len(hidden) == 1 else None


def _single_index_axes(atom, shape) -> dict[int, int]:
    """``{axis: index}`` of the axes along which a history atom changed one slice only."""
    out = {}
    if hasattr(atom, "slice_key"):  # napari's mask-based edit (brush, fill, polygon)
        for d, s in enumerate(atom.slice_key[-3:]):
            start, stop, _ = s.indices(shape[d])
            if stop - start == 1:
                out[d] = start
        return out
    indices = atom[0]  # data_setitem: (indices, old values, new values)
    if not isinstance(indices, tuple) or len(indices) < 3:
        return out
    for d, ix in enumerate(indices[-3:]):
        if isinstance(ix, slice):
            start, stop, _ = ix.indices(shape[d])
            if stop - start == 1:
                out[d] = start
            continue
        ix = np.asarray(ix)
        if ix.size and ix.min() == ix.max():
            out[d] = int(ix.flat[0])
    return out


def touched_planes(viewer, layer, atoms) -> set[tuple[int, int]]:
    """Planes ``(axis, index)`` the history atoms of one paint event annotated."""
    shape = tuple(layer.data.shape[-3:])
    axis = viewed_axis(viewer, layer)
    found = set()
    for atom in atoms:
        if axis is None and hasattr(atom, "slice_key"):
            continue  # a brush stroke in 3D view does not annotate a slice the user saw whole
        singles = _single_index_axes(atom, shape)
        if axis is not None and axis in singles:
            found.add((axis, singles[axis]))
        elif len(singles) == 1:
            found.update(singles.items())
    return found


class PlaneRecorder:
    """Keeps ``layer.metadata[PLANES_KEY]`` up to date as the user paints (see module doc)."""

    def __init__(self, viewer, layer):
        self._viewer = weakref.ref(viewer)
        self.layer = weakref.ref(layer)
        if get_planes(layer) is None:
            self.reset(layer)
        layer.events.paint.connect(self._on_paint)
        layer.events.data.connect(self._on_data)

    @staticmethod
    def reset(layer) -> None:
        set_planes(layer, planes_from_labels(layer.data, 0) if np.ndim(layer.data) == 3 else ())

    def _on_data(self, event=None) -> None:
        layer = self.layer()
        if layer is not None:  # a new array: the recorded planes described the old one
            self.reset(layer)

    def _on_paint(self, event) -> None:
        viewer, layer = self._viewer(), self.layer()
        if viewer is None or layer is None or layer.ndim != 3:
            return
        touched = touched_planes(viewer, layer, getattr(event, "value", None) or [])
        if not touched:
            return
        planes = {tuple(p) for p in get_planes(layer) or []}
        for a, i in touched:
            if _slice_after(layer.data, a, i, event.value).any():
                planes.add((a, i))
            else:
                planes.discard((a, i))
        set_planes(layer, planes)

    def disconnect(self) -> None:
        layer = self.layer()
        if layer is not None:
            layer.events.paint.disconnect(self._on_paint)
            layer.events.data.disconnect(self._on_data)


def track_planes(viewer, layer) -> PlaneRecorder | None:
    """Record the planes painted in ``layer`` from now on (idempotent: one recorder a layer).

    Returns None, recording nothing, for layers that are not single-scale ``(Z, Y, X)``.
    """
    if layer.ndim != 3 or getattr(layer, "multiscale", False):
        return None
    rec = _RECORDERS.get(layer)
    if rec is None:
        rec = _RECORDERS[layer] = PlaneRecorder(viewer, layer)
    return rec
