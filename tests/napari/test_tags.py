"""Weak-tag widget: buttons, key bindings, listing and suggestions."""

from __future__ import annotations

import numpy as np

from semiseg.data import DISEASED, HEALTHY, UNKNOWN
from semiseg.napari import TAGS_KEY
from semiseg.napari._layers import get_tags
from semiseg.napari._tags import TagWidget


def test_tag_buttons_and_listing(sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    w = TagWidget(viewer)
    w.labels_combo.setCurrentText("phantom labels")
    labels.metadata.pop(TAGS_KEY)
    assert (get_tags(labels) == UNKNOWN).all()
    viewer.dims.set_point(0, 3)
    w.buttons[HEALTHY].click()
    assert get_tags(labels)[3] == HEALTHY
    viewer.dims.set_point(0, 5)
    w.buttons[DISEASED].click()
    w.refresh()
    assert "Slice 5: diseased" in w.status.text()
    assert "healthy 1 [3]" in w.summary.text()
    w.buttons[UNKNOWN].click()
    assert get_tags(labels)[5] == UNKNOWN
    annotated = np.flatnonzero(labels.data.reshape(8, -1).any(1))
    assert f"annotated {len(annotated)}" in w.summary.text()


def test_tag_key_binding(sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    w = TagWidget(viewer)
    w.labels_combo.setCurrentText("phantom labels")
    viewer.dims.set_point(0, 2)
    from napari.utils.key_bindings import coerce_keybinding

    viewer.keymap[coerce_keybinding("Shift-H")](viewer)
    assert get_tags(labels)[2] == HEALTHY
    viewer.keymap[coerce_keybinding("Shift-D")](viewer)
    assert get_tags(labels)[2] == DISEASED


def test_suggest_tags_from_labels(sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    labels.metadata[TAGS_KEY] = np.full(8, UNKNOWN, np.int8)
    labels.metadata[TAGS_KEY][0] = HEALTHY if not labels.data[0].any() else DISEASED
    w = TagWidget(viewer)
    w.labels_combo.setCurrentText("phantom labels")
    w.suggest_button.click()
    painted = labels.data.reshape(8, -1).any(1)
    tags = get_tags(labels)
    assert (tags[painted] == DISEASED).all()
    assert (tags[~painted][1:] == UNKNOWN).all() if not painted[0] else True


def test_summary_keeps_its_lines_in_a_narrow_dock(make_napari_viewer, qtbot):
    """Long listings must not push the summary under the strip or widen the dock."""
    viewer = make_napari_viewer()
    labels = viewer.add_labels(np.zeros((120, 16, 16), np.uint8), name="long scan labels")
    labels.metadata[TAGS_KEY] = np.where(np.arange(120) % 3 == 0, HEALTHY, DISEASED).astype(np.int8)
    w = TagWidget(viewer)
    w.labels_combo.setCurrentText("long scan labels")
    w.refresh()
    assert w.minimumSizeHint().width() < 450
    w.resize(280, w.minimumSizeHint().height())
    w.show()
    qtbot.waitExposed(w)
    lines = w.summary.fontMetrics().lineSpacing()
    assert w.summary.geometry().top() >= w.strip.geometry().bottom()
    # the text fits the height the layout gave it (a wrapped label needed more than it got)
    s = w.summary
    needed = s.heightForWidth(s.width()) if s.hasHeightForWidth() else s.sizeHint().height()
    assert s.height() >= max(needed, 3 * lines)
    assert w.suggest_button.geometry().top() >= w.summary.geometry().bottom()
    assert w.summary.toolTip() == w.summary.text() and "healthy 40 [0, 3, 6" in w.summary.text()
