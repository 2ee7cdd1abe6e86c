"""The Autosave dock widget: saves on paint, status line, Restore, never overwrites."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from semiseg.autosave import find_autosave, restore
from semiseg.napari import TAGS_KEY
from semiseg.napari._autosave import AutosaveWidget, changed_slices


def _viewer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).integers(0, 1000, (4, 24, 24)).astype(np.uint16)
    viewer.add_image(image, name="scan")
    labels = viewer.add_labels(np.zeros(image.shape, np.uint8), name="scan labels",
                               metadata={TAGS_KEY: np.full(4, -1, np.int8)})
    return viewer, labels


def _widget(viewer, tmp_path):
    w = AutosaveWidget(viewer, debounce=0.05, interval=1.0, poll_ms=100)
    w.folder.setText(str(tmp_path))
    w.attach()
    viewer.window.add_dock_widget(w)
    return w


def test_paint_is_autosaved_and_status_shows_time(make_napari_viewer, qtbot, tmp_path):
    viewer, labels = _viewer(make_napari_viewer, tmp_path)
    w = _widget(viewer, tmp_path)
    assert w.saver is not None and w.saver.store.parent == tmp_path
    labels.paint((2, 5, 5), 3, refresh=True)  # emits the paint event
    # The widget may have saved the empty layer on attach: wait for the painted state itself.
    qtbot.waitUntil(
        lambda: w.saver.store.exists() and np.array_equal(restore(w.saver.store)[0], labels.data),
        timeout=10_000,
    )
    qtbot.waitUntil(lambda: w.status.text().startswith("saved "), timeout=10_000)
    got = restore(w.saver.store)[0]
    np.testing.assert_array_equal(got, labels.data)
    assert got[2].any() and not got[0].any()


def test_undo_and_tags_are_caught_by_polling(make_napari_viewer, qtbot, tmp_path):
    viewer, labels = _viewer(make_napari_viewer, tmp_path)
    w = _widget(viewer, tmp_path)
    labels.paint((1, 5, 5), 2, refresh=True)
    qtbot.waitUntil(lambda: w.saver.saves >= 1, timeout=10_000)
    labels.undo()  # no paint event
    tags = np.array([0, 1, -1, -1], np.int8)
    labels.metadata[TAGS_KEY] = tags
    qtbot.waitUntil(lambda: w.saver.saves >= 2 and not w.saver.pending, timeout=10_000)
    qtbot.waitUntil(lambda: restore(w.saver.store)[1] is not None and restore(w.saver.store)[1].tolist() == tags.tolist(), timeout=10_000)
    assert not restore(w.saver.store)[0].any()


def test_restore_into_empty_layer_and_new_layer(make_napari_viewer, qtbot, tmp_path):
    viewer, labels = _viewer(make_napari_viewer, tmp_path)
    w = _widget(viewer, tmp_path)
    labels.paint((3, 4, 4), 5, refresh=True)
    labels.metadata[TAGS_KEY] = np.array([1, -1, -1, 0], np.int8)
    assert w.save_now()
    saved = np.asarray(labels.data).copy()
    w.close_saver()
    # A new session: empty labels, the widget offers the autosave and Restore brings it back.
    labels.data = np.zeros_like(saved)
    w.attach()
    assert "found" in w.status.text()
    target = w.restore()
    assert target is labels
    np.testing.assert_array_equal(labels.data, saved)
    assert labels.metadata[TAGS_KEY].tolist() == [1, -1, -1, 0]
    # With labels on screen, Restore adds a layer instead of overwriting them.
    labels.paint((0, 1, 1), 7, refresh=True)
    n = len(viewer.layers)
    target = w.restore()
    assert len(viewer.layers) == n + 1 and target is not labels
    w.close_saver()


def test_earlier_session_never_overwritten(make_napari_viewer, qtbot, tmp_path):
    viewer, labels = _viewer(make_napari_viewer, tmp_path)
    w = _widget(viewer, tmp_path)
    labels.paint((1, 1, 1), 9, refresh=True)
    assert w.save_now()
    first = np.asarray(labels.data).copy()
    w.close_saver()
    labels.data = np.zeros_like(first)
    w.attach()
    labels.paint((2, 2, 2), 1, refresh=True)  # start painting without restoring
    assert w.save_now()
    kept = [p for p in tmp_path.iterdir() if ".kept-" in p.name]
    assert len(kept) == 1
    np.testing.assert_array_equal(restore(kept[0])[0], first)
    assert find_autosave(w.identity, tmp_path).path == w.saver.store


def test_changed_slices_parses_history_atoms():
    idx = (np.array([1, 1, 3]), np.array([0, 1, 2]), np.array([0, 0, 0]))
    assert changed_slices([(idx, np.zeros(3), 1)]) == [1, 3]

    class Masked:
        slice_key = (slice(2, 4), slice(0, 5), slice(0, 5))

    assert changed_slices([Masked()]) == [2, 3]
    assert changed_slices([object()]) is None


def test_widget_is_in_the_manifest():
    from pathlib import Path

    import yaml

    import semiseg.napari

    manifest = yaml.safe_load((Path(semiseg.napari.__file__).parent / "napari.yaml").read_text())
    cmds = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    assert cmds.get("napari-semiseg.autosave_widget") == "semiseg.napari._autosave:AutosaveWidget"
    assert any(w["command"] == "napari-semiseg.autosave_widget" for w in manifest["contributions"]["widgets"])
