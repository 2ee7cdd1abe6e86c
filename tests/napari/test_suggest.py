"""The SuggestionList widget: uncertainty layer, suggestions, navigation, live re-ranking."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.data import HEALTHY, UNKNOWN, Normaliser
from semiseg.model import Model

pytest.importorskip("napari")
from qtpy.QtCore import Qt
from tests._util import Pointwise

from semiseg.napari import TAGS_KEY
from semiseg.napari._suggest import SuggestionList


def volume():
    """Certain everywhere (+-1) except an unsure patch on slice 5 and a smaller one on 1."""
    rng = np.random.default_rng(0)
    image = np.where(rng.random((8, 16, 16)) < 0.5, -1.0, 1.0).astype(np.float32) * 3
    image[5, 4:12, 4:12] = 0.0
    image[1, 6:9, 6:9] = 0.0
    labels = np.zeros(image.shape, np.uint8)
    labels[2, 3:6, 3:6] = 1
    return image, labels


def model():
    return Model(Pointwise(1, 2), Normaliser((-1.0,), (1.0,)))


@pytest.fixture
def setup(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, labels = volume()
    img = viewer.add_image(image, name="img")
    lab = viewer.add_labels(labels, name="lab")
    widget = SuggestionList(viewer)
    qtbot.addWidget(widget)
    widget.show()
    return viewer, widget, img, lab


def start(widget, qtbot, img, lab, m=None):
    with qtbot.waitSignal(widget.updated, timeout=10000):
        widget.set_model(m or model(), img, lab)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10000)


def indices(widget):
    return [widget.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(widget.list.count())]


def test_set_model_shows_layer_and_list(setup, qtbot):
    viewer, widget, img, lab = setup
    start(widget, qtbot, img, lab)
    assert "img uncertainty" in viewer.layers
    layer = viewer.layers["img uncertainty"]
    assert layer.data.shape == img.data.shape
    assert layer.data[5, 8, 8] == pytest.approx(np.log(2), rel=1e-5)
    got = indices(widget)
    assert len(got) == 3 and got[0] == 5 and 2 not in got
    assert got == [s.index for s in widget.suggestions]
    for row, idx in enumerate(got):  # items name their slice
        assert widget.list.item(row).text().startswith(f"slice {idx} ")


def test_click_moves_viewer(setup, qtbot):
    viewer, widget, img, lab = setup
    start(widget, qtbot, img, lab)
    for row in (0, 1):
        item = widget.list.item(row)
        rect = widget.list.visualItemRect(item)
        qtbot.mouseClick(widget.list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
        assert viewer.dims.current_step[0] == indices(widget)[row]


def test_click_on_a_scaled_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, labels = volume()
    img = viewer.add_image(image, name="img", scale=(2.5, 1, 1), translate=(5, 0, 0))
    lab = viewer.add_labels(labels, name="lab", scale=(2.5, 1, 1), translate=(5, 0, 0))
    widget = SuggestionList(viewer)
    qtbot.addWidget(widget)
    start(widget, qtbot, img, lab)
    widget.go_to(5)
    assert img.world_to_data(viewer.dims.point)[0] == pytest.approx(5)


def test_layer_updated_in_place_and_rerank_on_paint(setup, qtbot):
    viewer, widget, img, lab = setup
    start(widget, qtbot, img, lab)
    layer = viewer.layers["img uncertainty"]
    n_layers = len(viewer.layers)
    # Paint on the top suggestion: the list re-ranks without recomputing.
    data = lab.data.copy()
    data[5, 0, 0] = 1
    with qtbot.waitSignal(widget.updated, timeout=5000):
        lab.data = data
    assert 5 not in indices(widget)
    assert indices(widget)[0] == 1
    # A new model run updates the same layer object.
    img.data = img.data * 0 + 3.0
    start(widget, qtbot, img, lab)
    assert viewer.layers["img uncertainty"] is layer
    assert len(viewer.layers) == n_layers
    assert float(layer.data.max()) < 1e-3


def test_healthy_tags_and_count(setup, qtbot):
    _, widget, img, lab = setup
    tags = np.full(8, UNKNOWN, np.int8)
    tags[5] = HEALTHY
    lab.metadata[TAGS_KEY] = tags
    start(widget, qtbot, img, lab)
    assert 5 not in indices(widget)
    with qtbot.waitSignal(widget.updated, timeout=5000):
        widget.n_spin.setValue(7)
    assert sorted(indices(widget)) == [0, 1, 3, 4, 6, 7]


def test_errors_are_reported(setup, qtbot):
    _, widget, img, lab = setup
    two_channels = Model(Pointwise(2, 2), Normaliser((-1.0, -1.0), (1.0, 1.0)))
    with qtbot.waitSignal(widget.failed, timeout=10000):
        widget.set_model(two_channels, img, lab)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10000)
    assert "channel" in widget.status.text()
