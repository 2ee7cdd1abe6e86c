"""Issue 20 items 2-12: what a new user trips on in the viewer (each drives the real widget)."""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest

from semiseg.data import HEALTHY, UNKNOWN
from semiseg.napari import TAGS_KEY
from semiseg.napari._layers import get_tags


# ----------------------------------------------------------------------------- item 2
def test_dock_fits_a_900_px_screen(qtbot, make_train_widget, run_and_wait, sample_viewer):
    w = make_train_widget(sample_viewer, steps=2)
    for method in ("supervised", "translation"):  # translation has the most parameters
        w.method_combo.setCurrentText(method)
        # The dock scrolls and its content, before there is a model, fits beside napari's
        # title bar and layer controls on a 900 px-high screen.
        assert w.sizeHint().height() <= 900, method
        assert w.form.body.sizeHint().height() <= 800, (method, w.form.body.sizeHint().height())
    assert not w.form.params_box.isExpanded() and not w.form.model_box.isExpanded()
    # Nothing to correct or rank before there is a model.
    assert w.form.correct_box.isHidden() and w.form.suggestions_box.isHidden()
    w.method_combo.setCurrentText("supervised")
    run_and_wait(qtbot, w)
    assert not w.form.correct_box.isHidden() and not w.form.suggestions_box.isHidden()
    w.form.params_box.expand(animate=False)
    assert w.sizeHint().height() <= 900


def test_the_tag_dock_leaves_the_height_to_the_train_dock(qtbot, make_napari_viewer, make_train_widget, phantom):
    from semiseg.napari._tags import TagWidget

    viewer = make_napari_viewer(show=True)
    viewer.add_image(phantom.image, name="phantom")
    viewer.add_labels(phantom.labels.copy(), name="phantom labels")
    tags = TagWidget(viewer)
    viewer.window.add_dock_widget(tags, name="Weak tags", area="right")
    w = make_train_widget(viewer, steps=2)  # docked on the right, below the tags
    viewer.window._qt_window.resize(1280, 900)
    qtbot.wait(300)
    # stacked in one column, the tag dock takes what its content needs and Train the rest
    assert tags.height() <= tags.sizeHint().height() + 40
    assert w.height() > 2 * tags.height()


# ----------------------------------------------------------------------------- items 3, 9
def test_after_a_run_the_prediction_shows_cleanly(qtbot, make_train_widget, run_and_wait, sample_viewer, monkeypatch):
    viewer = sample_viewer
    w = make_train_widget(viewer, steps=2)
    run_and_wait(qtbot, w)
    run_and_wait(qtbot, w)  # the second run's preview is a layer of its own
    assert w.last_error is None, w.last_error
    unc = viewer.layers["phantom uncertainty"]
    assert not unc.visible and unc.blending != "additive"  # it washed out the prediction
    assert viewer.layers["phantom prediction"].visible
    assert "phantom preview" not in viewer.layers
    offered = [w.export_combo.itemText(i) for i in range(w.export_combo.count())]
    assert not any(name.endswith(" preview") for name in offered)
    assert w.export_combo.currentText() == "phantom prediction"  # export defaults to it
    assert w.progress.format() == "done"

    from semiseg.methods.supervised import Supervised

    monkeypatch.setattr(Supervised, "training_step", lambda self, batch: {"dice_loss": float("nan")})
    run_and_wait(qtbot, w)
    assert w.last_error is not None
    assert w.progress.format() == "failed" and "training" not in w.progress.text()


# ----------------------------------------------------------------------------- item 5
def test_undo_refreshes_the_tag_strip_and_tagging_the_suggestions(qtbot, make_train_widget, run_and_wait, sample_viewer):
    from semiseg.napari._tags import TagWidget

    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    tags_w = TagWidget(viewer)
    viewer.window.add_dock_widget(tags_w)
    tags_w.labels_combo.setCurrentText("phantom labels")
    w = make_train_widget(viewer, steps=2)
    run_and_wait(qtbot, w)
    free = 6  # not painted, not tagged healthy in the phantom
    assert not labels.data[free].any()
    viewer.layers["phantom prediction"].data[free, 5:15, 5:15] = 1
    viewer.dims.set_point(0, free)
    assert w.accept_slices() > 0
    qtbot.waitUntil(lambda: bool(tags_w.strip.annotated[free]), timeout=3_000)
    assert "6" in tags_w.summary.text().splitlines()[0]
    w.undo_button.click()
    assert not labels.data[free].any()
    qtbot.waitUntil(lambda: not tags_w.strip.annotated[free], timeout=3_000)
    assert f"annotated {int(labels.data.reshape(8, -1).any(1).sum())} " in tags_w.summary.text()

    # Tagging the best suggestion healthy drops it from the list (it counts as annotated).
    qtbot.waitUntil(lambda: w.suggestions.list.count() > 0, timeout=10_000)
    best = w.suggestions.suggestions[0].index
    viewer.dims.set_point(0, best)
    tags_w.tag_current(HEALTHY)
    qtbot.waitUntil(lambda: best not in [s.index for s in w.suggestions.suggestions], timeout=3_000)


# ----------------------------------------------------------------------------- item 6
def test_accept_keeps_painted_slices_unless_told(qtbot, make_train_widget, run_and_wait, sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    w = make_train_widget(viewer, steps=2)
    run_and_wait(qtbot, w)
    pred = viewer.layers["phantom prediction"]
    painted = 2
    assert labels.data[painted].any()
    pred.data[painted] = 0
    pred.data[painted, :10, :10] = 1
    original = labels.data.copy()
    viewer.dims.set_point(0, painted)
    assert w.accept_slices() == 0
    np.testing.assert_array_equal(labels.data, original)
    assert "kept your painted slice 2" in w.status.text()
    # A range accepts the unpainted slices only.
    pred.data[:] = 1
    w.accept_slices(1, 3)
    assert (labels.data[1] == 1).all() and (labels.data[3] == 1).all()
    np.testing.assert_array_equal(labels.data[2], original[2])
    w.undo()
    np.testing.assert_array_equal(labels.data, original)
    # With consent it overwrites, as one undoable edit.
    w.overwrite_check.setChecked(True)
    assert w.accept_slices() > 0
    assert (labels.data[painted] == 1).all()
    labels.undo()
    np.testing.assert_array_equal(labels.data, original)


# ----------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("case", ["empty", "shape", "healthy"])
def test_input_errors_are_caught_before_a_worker_starts(qtbot, make_train_widget, sample_viewer, phantom, case):
    from semiseg.napari._settings import error_text

    viewer = sample_viewer
    if case == "empty":
        viewer.add_labels(np.zeros_like(phantom.labels), name="empty labels")
        name, method, words = "empty labels", "supervised", "paint labels on at least one slice or tag one healthy"
    elif case == "shape":
        viewer.add_labels(np.zeros((8, 40, 40), np.uint8), name="small labels")
        name, method, words = "small labels", "supervised", "does not match image shape"
    else:  # translation learns from healthy slices: painted labels but no tags
        viewer.add_labels(phantom.labels.copy(), name="untagged labels")
        name, method, words = "untagged labels", "translation", "needs slices tagged healthy"
    w = make_train_widget(viewer, steps=2, method=method)
    w.labels_combo.setCurrentText(name)
    started = []
    w.session.events.started.connect(started.append)
    t0 = time.perf_counter()
    w.train_button.click()
    assert time.perf_counter() - t0 < 1.0
    assert started == [] and not w.busy  # no worker was started
    assert words in str(w.last_error)
    # The whole message is in the dock's status line, wrapped, not cut.
    assert w.status.text() == error_text(w.last_error, has_model=False)
    assert w.status.wordWrap()


# ----------------------------------------------------------------------------- item 8
def test_suggestions_are_worded_and_skip_nearly_empty_slices(qtbot, make_train_widget, run_and_wait, sample_viewer):
    import dataclasses

    from semiseg.napari._suggest import near_empty_slices, relative_words

    assert relative_words(5.94e3, 5.94e3) == "most uncertain"
    assert relative_words(2.97e3, 5.94e3) == "50% as uncertain"
    w = make_train_widget(sample_viewer, steps=2)
    run_and_wait(qtbot, w)
    sugg = w.suggestions
    texts = [sugg.list.item(i).text() for i in range(sugg.list.count())]
    assert texts and all(re.fullmatch(r"slice \d+ · (most uncertain|\d+% as uncertain)", t) for t in texts), texts
    # Slices 0 and 7 made (nearly) empty and the most uncertain: not suggested while others are.
    from semiseg.napari._layers import set_tags

    set_tags(sample_viewer.layers["phantom labels"], np.full(8, UNKNOWN, np.int8))  # 0, 7 were healthy
    res = sugg.result
    desc = np.asarray(res.descriptors, np.float32).copy()
    desc[[0, 7]] = desc.min()
    mass = np.asarray(res.mass, np.float64).copy()
    mass[[0, 7]] = mass.max() * 10
    empty = near_empty_slices(desc)
    assert empty[0] and empty[7] and not empty[1:7].any()
    sugg.result = dataclasses.replace(res, mass=mass, descriptors=desc)
    sugg.n_spin.setValue(2)
    sugg.rerank()
    assert {s.index for s in sugg.suggestions}.isdisjoint({0, 7})
    # ... unless nothing else is left to suggest.
    sugg.n_spin.setValue(8)
    sugg.rerank()
    assert {0, 7} <= {s.index for s in sugg.suggestions}
    assert any("(nearly empty)" in sugg.list.item(i).text() for i in range(sugg.list.count()))


# ----------------------------------------------------------------------------- item 9
def test_export_defaults_and_reopens_as_labels(qtbot, make_train_widget, run_and_wait, sample_viewer, tmp_path):
    from semiseg.napari._reader import read
    from semiseg.napari._settings import EXPORT_FILTERS, export_name, export_path

    assert export_name("phantom prediction") == "phantom-prediction-mask.zarr"
    assert export_name("my labels", "tiff") == "my-labels.tif"
    tif, zarr_ = EXPORT_FILTERS["tiff"], EXPORT_FILTERS["zarr"]
    assert export_path("/d/a-mask.zarr", tif) == "/d/a-mask.tif"
    assert export_path("/d/a-mask.tif", zarr_) == "/d/a-mask.zarr"
    assert export_path("/d/a-mask.tiff", tif) == "/d/a-mask.tiff"
    assert export_path("/d/a-mask", tif) == "/d/a-mask.tif"
    w = make_train_widget(sample_viewer, steps=2)
    run_and_wait(qtbot, w)
    pred = sample_viewer.layers["phantom prediction"]
    # A name without label/mask/seg: the zarr says it is labels, the reader reads that back.
    for path in (tmp_path / "result.zarr", tmp_path / export_name(w.export_combo.currentText(), "tiff")):
        w.export_mask(path)
        ((data, _meta, kind),) = read(str(path))
        assert kind == "labels", path
        np.testing.assert_array_equal(data, pred.data)


# ----------------------------------------------------------------------------- item 10
def test_runs_list_is_readable_and_the_store_is_capped(qtbot, make_train_widget, run_and_wait, sample_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_KEEP_RUNS", "2")
    w = make_train_widget(sample_viewer, steps=2)
    for _ in range(3):
        run_and_wait(qtbot, w)
    assert w.session.keep_runs == 2
    assert len(list(w.runs_dir.glob("*.pt"))) == 2
    assert w.runs_combo.count() == 2
    assert re.fullmatch(r"supervised · 2 steps · \d\d:\d\d", w.runs_combo.itemText(0)), w.runs_combo.itemText(0)
    assert "newest 2 training runs are kept in" in w.runs_combo.toolTip()
    assert str(w.runs_dir) in w.runs_combo.toolTip()
    w.refresh_runs()  # the list re-read from the store says the same
    assert w.runs_combo.count() == 2 and " · " in w.runs_combo.itemText(1)


# ----------------------------------------------------------------------------- item 12
@pytest.fixture
def private_type_string_warns(monkeypatch):
    """``Layer._type_string`` warning as napari's newer releases do; yields the warnings
    raised from semiseg's own code."""
    from napari.layers import Layer

    def warn(self):
        warnings.warn("Layer._type_string is private", FutureWarning, stacklevel=2)
        return type(self).__name__.lower()

    monkeypatch.setattr(Layer, "_type_string", property(warn))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        yield lambda: [w for w in caught if "semiseg" in w.filename and issubclass(w.category, FutureWarning)]


def test_overlay_updates_use_no_private_napari_api(make_napari_viewer, private_type_string_warns):
    from semiseg.napari._layers import is_layer_type, upsert

    viewer = make_napari_viewer()
    first = upsert(viewer, "x prediction", np.zeros((2, 8, 8), np.uint8), "labels")
    again = upsert(viewer, "x prediction", np.ones((2, 8, 8), np.uint8), "labels")
    assert again is first and again.data.max() == 1
    image = upsert(viewer, "x prediction", np.zeros((2, 8, 8), np.float32), "image")
    assert is_layer_type(image, "image") and not is_layer_type(image, "labels")
    assert private_type_string_warns() == []


def test_autosave_dock_uses_no_private_napari_api(sample_viewer, tmp_path, private_type_string_warns):
    from semiseg.napari._autosave import AutosaveWidget

    w = AutosaveWidget(sample_viewer, debounce=0.05, interval=1.0, poll_ms=100)
    w.folder.setText(str(tmp_path))
    w.attach()
    assert w.layer is sample_viewer.layers["phantom labels"]
    assert w.image_for(w.layer) is sample_viewer.layers["phantom"]
    w.close_saver()
    assert private_type_string_warns() == []


def test_tags_set_by_a_widget_emit_the_metadata_event(sample_viewer):
    from semiseg.napari._layers import set_tags

    labels = sample_viewer.layers["phantom labels"]
    seen = []
    labels.events.metadata.connect(lambda e: seen.append(e))
    tags = get_tags(labels)
    tags[0] = UNKNOWN
    set_tags(labels, tags)
    assert seen and labels.metadata[TAGS_KEY][0] == UNKNOWN


# ----------------------------------------------------------------------------- item 4
def test_train_is_usable_while_the_volume_is_predicted_after_stop(qtbot, make_train_widget, sample_viewer, monkeypatch):
    """After Stop the volume is predicted in the background; Train does not wait for it:
    pressing it cancels that prediction and trains on from the stopped model."""
    from semiseg.napari import _jobs

    slow = _jobs.iter_predict_volume  # made slow below: long enough to be interrupted
    w = make_train_widget(sample_viewer, steps=100_000)
    w.train_button.click()
    qtbot.waitUntil(lambda: len(w.loss_plot.series.get("dice_loss", [])) >= 2, timeout=60_000)
    assert not w.train_button.isEnabled()
    monkeypatch.setattr(_jobs, "iter_predict_volume", lambda *a, **kw: (yield from _slow(slow, a, kw)))
    t0 = time.perf_counter()
    w.stop_button.click()
    qtbot.waitUntil(lambda: w.train_button.isEnabled(), timeout=5_000)
    assert time.perf_counter() - t0 < 2.0 and w.session.busy and w.phase == "predict"
    w.steps_spin.setValue(2)
    w.train_button.click()  # cancels the prediction, then trains
    assert "training starts next" in w.status.text()
    qtbot.waitUntil(lambda: (w.session.running is not None and w.session.running.phase == "train")
                    or (not w.busy and w.model is not None and w.model.history[-1]["steps"] == 2), timeout=30_000)
    qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
    assert w.last_error is None, w.last_error
    stopped_steps = w.model.history[-2]["steps"]
    assert stopped_steps >= 1 and w.model.history[-1]["steps"] == 2  # continued the stopped model


def _slow(inner, a, kw):
    gen = inner(*a, **kw)
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        time.sleep(0.3)
        yield p


def test_adding_a_layer_re_reads_no_labels_in_the_docks(qtbot, make_train_widget, sample_viewer, monkeypatch):
    """Adding or removing an unrelated layer with the docks docked re-reads nothing: the tag
    strip keeps its annotated slices and the Train dock keeps its form (issue 20 item 4)."""
    from semiseg.napari import _tags
    from semiseg.napari._tags import TagWidget

    viewer = sample_viewer
    tags_w = TagWidget(viewer)
    viewer.window.add_dock_widget(tags_w)
    w = make_train_widget(viewer)
    qtbot.wait(300)  # the tag strip's first refresh
    scans, forms = [], []
    real = _tags.annotated_slices
    monkeypatch.setattr(_tags, "annotated_slices", lambda labels: scans.append(1) or real(labels))
    set_layers = w.form.set_layers
    monkeypatch.setattr(w.form, "set_layers", lambda choices: forms.append(choices) or set_layers(choices))
    for _ in range(3):
        layer = viewer.add_labels(np.zeros((8, 48, 48), np.uint8), name="x prediction", metadata={"semiseg_overlay": True})
        qtbot.wait(150)
        viewer.layers.remove(layer)
        qtbot.wait(150)
    assert scans == [], "the tag strip re-read the labels for an unrelated layer"
    # An exportable overlay changes the export list; the form is rebuilt for that only.
    assert len(forms) == 6
    viewer.add_points(name="pts")
    qtbot.wait(150)
    assert len(forms) == 6 and scans == []  # points change no choice: nothing rebuilt
