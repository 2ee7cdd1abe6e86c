"""Recording the plane of painted slices (semiseg.napari._planes) and training with them."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.napari._planes import PLANES_KEY, get_planes, planes_for_training, track_planes
from semiseg.planes import read_planes_csv, write_planes_csv


@pytest.fixture
def painted_viewer(sample_viewer):
    """The phantom viewer with the plane recorder attached to its labels layer."""
    labels = sample_viewer.layers["phantom labels"]
    labels.selected_label = 1
    labels.brush_size = 5
    track_planes(sample_viewer, labels)
    return sample_viewer, labels


def _axial(labels):
    return [[0, int(z)] for z in np.flatnonzero(labels.data.reshape(labels.data.shape[0], -1).any(1))]


def _view(viewer, axis, index):
    """Show slice ``index`` along ``axis`` in 2D (axis 2: sagittal, 1: coronal, 0: axial)."""
    viewer.dims.ndisplay = 2
    viewer.dims.order = (axis, *[d for d in range(3) if d != axis])
    viewer.dims.set_point(axis, index)
    assert viewer.dims.not_displayed == (axis,)


def test_recorder_starts_from_the_painted_axial_slices(painted_viewer):
    _viewer, labels = painted_viewer
    assert get_planes(labels) == _axial(labels) and len(_axial(labels)) == 2
    assert planes_for_training(labels) is None  # nothing off the training axis: as before


@pytest.mark.parametrize("axis", [2, 1], ids=["sagittal", "coronal"])
def test_painting_another_plane_records_it_and_no_axial_slice(painted_viewer, axis):
    viewer, labels = painted_viewer
    before = _axial(labels)
    _view(viewer, axis, 30)
    coord = [4, 24, 24]
    coord[axis] = 30
    # A stroke of several dabs (napari writes them, then emits one paint event) ...
    with labels.block_history():
        for z in (2, 4, 6):
            c = list(coord)
            c[0] = z
            labels.paint(c, 1, refresh=False)
    assert [axis, 30] in get_planes(labels)
    # ... crossed axial slices 2..6, which are not recorded as annotated.
    assert [p for p in get_planes(labels) if p[0] == 0] == before
    assert get_planes(labels) == sorted([*before, [axis, 30]])
    # A single dab (napari emits the event before writing it) on another slice of that plane.
    viewer.dims.set_point(axis, 10)
    coord[axis] = 10
    labels.paint(coord, 1)
    assert [axis, 10] in get_planes(labels)
    # The widget hands these planes to training; the crossed axial slices hold labels but
    # do not count as annotated.
    assert planes_for_training(labels) == tuple(sorted({*map(tuple, before), (axis, 10), (axis, 30)}))
    # Painting the same slice again adds nothing (de-duplicated).
    labels.paint(coord, 1)
    assert get_planes(labels).count([axis, 10]) == 1


def test_erasing_a_whole_slice_removes_it_and_3d_view_records_nothing(painted_viewer):
    viewer, labels = painted_viewer
    before = get_planes(labels)
    _view(viewer, 2, 30)
    labels.paint((4, 24, 30), 1)
    assert [2, 30] in get_planes(labels)
    labels.paint((4, 24, 30), 0)  # erase the dab: the slice holds no label any more
    assert get_planes(labels) == before
    viewer.dims.ndisplay = 3
    labels.paint((4, 24, 30), 1)
    assert get_planes(labels) == before
    # Undo emits no paint event: the slice it empties stays listed, and training leaves it out.
    labels.undo()
    viewer.dims.ndisplay = 2
    labels.paint((4, 24, 30), 1)
    assert planes_for_training(labels) is not None
    labels.undo()
    assert [2, 30] in get_planes(labels) and planes_for_training(labels) is None


def test_accepting_a_whole_axial_slice_records_it_from_any_view(painted_viewer):
    viewer, labels = painted_viewer
    _view(viewer, 2, 30)
    z = next(i for i in range(8) if [0, i] not in get_planes(labels))
    yy, xx = np.nonzero(np.ones((10, 10), bool))
    labels.data_setitem((np.full(yy.size, z), yy + 5, xx + 5), 1)  # what Accept does
    assert [0, z] in get_planes(labels)


def test_planes_survive_as_metadata_and_csv(painted_viewer, tmp_path):
    viewer, labels = painted_viewer
    _view(viewer, 2, 30)
    labels.paint((4, 24, 30), 1)
    planes = get_planes(labels)
    assert labels.metadata[PLANES_KEY] == planes  # plain lists: safe to copy and save
    data, meta, _ = labels.as_layer_data_tuple()
    copy = viewer.add_labels(data.copy(), **{k: v for k, v in meta.items() if k != "name"}, name="copy")
    assert get_planes(copy) == planes
    write_planes_csv(tmp_path / "planes.csv", planes)
    assert [list(p) for p in read_planes_csv(tmp_path / "planes.csv")] == planes
    # Replacing the layer's data starts the record anew from the new labels.
    labels.data = np.zeros_like(labels.data)
    assert get_planes(labels) == []


def test_train_widget_passes_painted_planes_to_training(qtbot, make_train_widget, run_and_wait, sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    w = make_train_widget(viewer, steps=2)  # attaches the recorder to the labels layer
    axial = _axial(labels)
    _view(viewer, 2, 30)
    labels.selected_label = 1
    labels.brush_size = 1  # a sagittal disc spreads along Z: keep it on its slice
    from semiseg.napari._layers import get_tags

    crossed = [z for z in range(8) if get_tags(labels)[z] != 0]  # healthy slices hold no tumour
    assert len(crossed) > len(axial)
    with labels.block_history():
        for z in crossed:
            labels.paint((z, 24, 30), 1, refresh=False)
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    h = w.model.history[-1]
    assert h["planes"] == sorted([*axial, [2, 30]])
    healthy = np.flatnonzero(get_tags(labels) == 0).tolist()
    # Not every slice the stroke crossed: the painted axial ones and the healthy-tagged ones.
    assert h["annotated_slices"] == sorted({z for _, z in axial} | set(healthy))
    only_sagittal = set(crossed) - {z for _, z in axial}
    assert only_sagittal and not only_sagittal & set(h["annotated_slices"])
    assert get_planes(labels) == h["planes"]  # training left the record alone
