"""Train dock widget: training via the button, overlays, stop, accept/undo, model files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semiseg.napari._train import TrainWidget


def test_train_button_creates_overlays_and_keeps_labels(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    before = labels_hash(labels)
    w = make_train_widget(viewer)
    viewer.dims.set_point(0, 3)
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    assert w.model is not None and w.model.history[-1]["steps"] == 3
    assert w.status.text().startswith("Trained 3 steps on cpu")  # not "Predicted": it trained
    pred = viewer.layers["phantom prediction"]
    prob = viewer.layers["phantom probability"]
    assert pred.data.shape == labels.data.shape
    assert prob.data.shape == labels.data.shape
    assert float(np.max(prob.data)) <= 1.0
    # The preview of the viewed slice was shown during training; at the end that layer became
    # the prediction layer (cheaper than adding one), so no stale preview is left.
    assert w.first_preview_after is not None
    assert "phantom preview" not in viewer.layers
    # The user's labels stay on top of the overlays.
    assert viewer.layers.index(labels) > viewer.layers.index(pred)
    # Loss plot received the named losses.
    assert set(w.loss_plot.series) == {"dice_loss", "ce"}
    assert labels_hash(labels) == before  # training never writes to the labels
    # The suggestion list got the job's own uncertainty pass (computed in the worker, not
    # again in the viewer's process).
    assert w.last_result.uncertainty is not None
    assert w.suggestions.result is w.last_result.uncertainty
    assert "phantom uncertainty" in viewer.layers and w.suggestions.list.count() > 0

    # Retrain: same layer objects, data replaced in place, training continued.
    w.steps_spin.setValue(2)
    run_and_wait(qtbot, w)
    assert viewer.layers["phantom prediction"] is pred
    assert viewer.layers["phantom probability"] is prob
    assert [ly.name for ly in viewer.layers].count("phantom prediction") == 1
    assert "phantom preview" not in viewer.layers  # the retrain's preview, removed at the end
    assert w.model.method.step == 5
    assert labels_hash(labels) == before


def test_stop_ends_training_quickly(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer):
    w = make_train_widget(sample_viewer, steps=100_000)
    w.train_button.click()
    qtbot.waitUntil(lambda: len(w.loss_plot.series.get("dice_loss", [])) >= 2, timeout=60_000)
    w.stop_button.click()
    qtbot.waitUntil(lambda: w.phase != "train", timeout=5_000)  # Stop acts at the next step
    qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
    steps = w.model.history[-1]["steps"]
    assert 1 <= steps < 100_000
    assert w.last_result.stopped
    # After Stop the volume is still predicted.
    assert "phantom prediction" in sample_viewer.layers


def test_accept_slice_and_undo(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    w = make_train_widget(viewer, steps=2)
    run_and_wait(qtbot, w)
    pred = viewer.layers["phantom prediction"]
    # Make the prediction of slice 5 differ from the labels for sure.
    pred.data[5] = 0
    pred.data[5, 10:20, 10:20] = 1
    original = labels.data.copy()
    viewer.dims.set_point(0, 5)
    changed = w.accept_slices()
    assert changed > 0
    np.testing.assert_array_equal(labels.data[5], pred.data[5])
    np.testing.assert_array_equal(np.delete(labels.data, 5, 0), np.delete(original, 5, 0))
    w.undo_button.click()
    np.testing.assert_array_equal(labels.data, original)
    # A range is one undoable edit (painted slices 2 and 4 too, with consent).
    w.overwrite_check.setChecked(True)
    pred.data[2:5] = 1
    w.accept_slices(2, 4)
    assert (labels.data[2:5] == 1).all()
    labels.undo()
    np.testing.assert_array_equal(labels.data, original)


def test_save_load_model_and_predict(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer, tmp_path):
    viewer = sample_viewer
    w = make_train_widget(viewer, steps=2)
    run_and_wait(qtbot, w)
    path = w.save_model(tmp_path / "m.pt")
    assert path.is_file()
    w2 = TrainWidget(viewer, backend="thread", prewarm=False)
    model = w2.load_model(path)
    assert model.method.name == "supervised"
    assert w2.predict_button.isEnabled()
    for a, b in zip(model.method.nets["seg"].parameters(), w.model.method.nets["seg"].parameters()):
        assert np.allclose(a.detach().numpy(), b.detach().cpu().numpy())
    pred = viewer.layers["phantom prediction"]
    expected = np.array(pred.data)
    pred.data = np.zeros_like(expected)
    run_and_wait(qtbot, w2, w2.predict_button.click)
    assert viewer.layers["phantom prediction"] is pred
    np.testing.assert_array_equal(pred.data, expected)


def test_training_error_becomes_notification(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer):
    from napari.utils.notifications import notification_manager

    viewer = sample_viewer
    viewer.add_labels(np.zeros((8, 40, 40), np.uint8), name="wrong labels")
    w = make_train_widget(viewer, steps=2)
    w.labels_combo.setCurrentText("wrong labels")
    n = len(notification_manager.records)
    run_and_wait(qtbot, w)
    assert w.model is None
    assert "does not match" in str(w.last_error)
    assert any("Cannot train" in str(r.message) for r in notification_manager.records[n:])
    # The viewer lives on and a good run still works afterwards.
    w.labels_combo.setCurrentText("phantom labels")
    run_and_wait(qtbot, w)
    assert w.model is not None


def test_nan_loss_keeps_previous_model(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer, monkeypatch):
    from semiseg.engine import TrainingError
    from semiseg.methods.supervised import Supervised

    viewer = sample_viewer
    w = make_train_widget(viewer, steps=2)
    run_and_wait(qtbot, w)
    good = w.model
    monkeypatch.setattr(Supervised, "training_step", lambda self, batch: {"dice_loss": float("nan")})
    run_and_wait(qtbot, w)
    assert isinstance(w.last_error, TrainingError)
    assert w.model is good
    assert "previous model is kept" in w.status.text()


def test_process_backend_trains_and_stops(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer):
    viewer = sample_viewer
    labels = viewer.layers["phantom labels"]
    before = labels_hash(labels)
    w = make_train_widget(viewer, backend="process", steps=100_000)
    try:
        w.train_button.click()
        qtbot.waitUntil(lambda: len(w.loss_plot.series.get("dice_loss", [])) >= 2, timeout=90_000)
        w.stop_button.click()
        qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
        assert w.last_error is None, w.last_error
        assert w.last_result.stopped
        assert 1 <= w.model.history[-1]["steps"] < 100_000
        assert "phantom prediction" in viewer.layers
        assert labels_hash(labels) == before
    finally:
        w.shutdown()


@pytest.mark.parametrize("backend", ["thread"])
def test_translation_outputs_and_samples(qtbot, make_train_widget, run_and_wait, labels_hash, sample_viewer, backend):
    viewer = sample_viewer
    w = make_train_widget(
        viewer,
        backend=backend,
        steps=2,
        method="translation",
        params={"unique_channels": 4, "disc_features": (8, 16), "disc_scales": 1},
    )
    assert "residual" in w.method_summary.text()
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    for name in ("residual", "healthy"):
        layer = viewer.layers[f"phantom {name}"]
        assert layer.data.shape == viewer.layers["phantom"].data.shape
    assert w.sample_button.isEnabled()
    w.samples_spin.setValue(3)
    viewer.dims.set_point(0, 4)
    run_and_wait(qtbot, w, w.sample_button.click)
    samples = viewer.layers["phantom sampled tumours"]
    assert samples.data.shape == (3, 1, 48, 48)
    assert samples.translate[1] == 4
    assert viewer.dims.axis_labels[0] == "sample"  # its slider says what it is, not "-4"
    first = samples
    run_and_wait(qtbot, w, w.sample_button.click)
    assert viewer.layers["phantom sampled tumours"] is first


def test_lazy_zarr_image_trains_with_lazy_outputs(qtbot, make_napari_viewer, make_train_widget, run_and_wait, phantom, tmp_path, monkeypatch):
    from semiseg.io import write_volume
    from semiseg.napari import TAGS_KEY, _train

    monkeypatch.setattr(_train, "LAZY_BYTES", 0)  # treat the tiny volume as a big one
    path = write_volume(tmp_path / "scan.zarr", phantom.image)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(path), plugin="napari-semiseg")
    assert hasattr(image.data, "dask")
    viewer.add_labels(phantom.labels.copy(), name="scan labels", metadata={TAGS_KEY: phantom.tags.copy()})
    w = make_train_widget(viewer, steps=2)
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    pred = viewer.layers["scan prediction"]
    assert hasattr(pred.data, "dask") or not isinstance(pred.data, np.ndarray)  # shown lazily
    dirs = list(w._lazy_dirs)
    assert dirs and all(Path(d).exists() for d in dirs)
    w.shutdown()
    assert not any(Path(d).exists() for d in dirs)


def test_runs_are_kept_and_rollback_restores_an_earlier_model(qtbot, make_train_widget, run_and_wait, sample_viewer, tmp_path):
    w = make_train_widget(sample_viewer, steps=3)
    assert w.runs_dir == tmp_path / "runs" and w.runs_combo.count() == 0
    assert not w.rollback_button.isEnabled()
    from semiseg.data import InputError
    from semiseg.model import ModelFileError

    with pytest.raises(InputError, match="no training run"):
        w.rollback("")
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError):
        w.rollback(str(bad))
    assert w.model is None  # a failed rollback changes nothing
    run_and_wait(qtbot, w)
    w.steps_spin.setValue(2)
    run_and_wait(qtbot, w)
    assert w.model.method.step == 5
    assert w.runs_combo.count() == 2  # newest first
    assert "2 steps" in w.runs_combo.itemText(0) and "3 steps" in w.runs_combo.itemText(1)
    assert w.rollback_button.isEnabled()
    w.runs_combo.setCurrentIndex(1)
    w.rollback_button.click()
    assert w.last_error is None
    assert w.model.method.step == 3 and len(w.model.history) == 1
    assert w.runs_combo.count() == 2  # rolling back keeps every run
    # A prediction-only job is not a new run.
    w.predict_button.click()
    qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
    assert w.runs_combo.count() == 2


def test_run_is_shown_one_step_per_event_loop_turn(qtbot, make_train_widget, sample_viewer):
    """Finished runs are shown in small GUI steps; a failing step is reported, later ones run."""
    import time

    from semiseg.napari._train import DISPLAY_STEP_MS

    w = make_train_widget(sample_viewer)
    done = []

    def broken():
        raise ValueError("cannot show this layer")

    w._queue_display(lambda: done.append(time.perf_counter()), broken, lambda: done.append(time.perf_counter()))
    assert w.busy and done == []  # nothing runs inside the call that queued the steps
    qtbot.waitUntil(lambda: not w.busy, timeout=5_000)
    assert len(done) == 2
    # Three timer turns apart (first, broken, last): events are processed in between.
    assert done[1] - done[0] >= 2 * 0.5 * DISPLAY_STEP_MS / 1000
    assert isinstance(w.last_error, ValueError)


def test_run_store_that_cannot_be_written_does_not_fail_training(qtbot, make_train_widget, run_and_wait, sample_viewer, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs folder should be")
    monkeypatch.setenv("SEMISEG_RUNS_DIR", str(blocker / "runs"))
    w = make_train_widget(sample_viewer, steps=2)
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    assert w.model is not None and "phantom prediction" in sample_viewer.layers
    assert w.last_result.run is None and "runs folder" in w.last_result.run_error
    assert "run not kept" in w.status.text()
    assert w.runs_combo.count() == 0


def test_long_layer_names_and_run_descriptions_do_not_widen_the_docks(make_train_widget, sample_viewer, phantom):
    from semiseg.napari._tags import TagWidget

    long_name = "scan labels " + "very long name " * 20
    w = make_train_widget(sample_viewer)
    tags = TagWidget(sample_viewer)
    before = w.minimumSizeHint().width(), tags.minimumSizeHint().width()
    sample_viewer.add_labels(phantom.labels.copy(), name=long_name)
    w.runs_combo.addItem("20261201-063415.232-supervised  supervised  300 steps " * 5, "")
    assert w.labels_combo.findText(long_name) >= 0 and tags.labels_combo.findText(long_name) >= 0
    w.labels_combo.setCurrentText(long_name)
    after = w.minimumSizeHint().width(), tags.minimumSizeHint().width()
    assert after == before and max(after) < 600, (before, after)
    assert w.labels_combo.toolTip() == long_name  # the whole name, where the box cuts it
    assert "training runs are kept in" in w.runs_combo.toolTip()


def test_prediction_and_model_file_errors_show_their_own_titles(qtbot, make_train_widget, run_and_wait, sample_viewer, tmp_path, monkeypatch):
    """Errors are titled by class (isinstance), not by name: subclasses keep their own title."""
    from napari.utils.notifications import notification_manager

    from semiseg import ModelFileError, PredictionError
    from semiseg.napari import _jobs

    w = make_train_widget(sample_viewer, steps=2)
    n = len(notification_manager.records)
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a model")
    w.runs_combo.addItem("broken run", str(bad))
    w._update_buttons()
    w.rollback_button.click()
    assert isinstance(w.last_error, ModelFileError) and w.model is None
    assert w.status.text().startswith("Cannot load the model: ")

    def failing_prediction(*args, **kwargs):
        raise PredictionError("not enough memory to read slices 0..7")
        yield

    monkeypatch.setattr(_jobs, "iter_predict_volume", failing_prediction)
    run_and_wait(qtbot, w)
    assert isinstance(w.last_error, PredictionError)
    assert w.status.text().startswith("Prediction failed: not enough memory")
    shown = [str(r.message) for r in notification_manager.records[n:]]
    assert any(m.startswith("Cannot load the model: ") for m in shown)
    assert any(m.startswith("Prediction failed: ") for m in shown)


def test_form_reads_into_settings_and_layer_changes_keep_the_choice(make_napari_viewer, phantom):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    viewer.add_image(phantom.image, name="phantom")
    viewer.add_image(phantom.image * 2, name="t2")
    viewer.add_labels(phantom.labels.copy(), name="phantom labels")
    w = TrainWidget(viewer, backend="thread", prewarm=False)
    try:
        # The form's widgets are the dock's attributes (tests and scripts set them directly).
        assert w.steps_spin is w.form.steps_spin and w.suggestions is w.form.suggestions
        assert w.image_names() == ["phantom"]  # the first image is checked by default
        w.steps_spin.setValue(11)
        w.minutes_spin.setValue(1.5)
        w.device_combo.setCurrentText("cpu")
        assert w.preset_combo.currentText() == "auto"  # issue 19: paper on CUDA, else cpu
        w.preset_combo.setCurrentText("paper")
        w.continue_check.setChecked(False)
        w.image_list.item(1).setCheckState(Qt.CheckState.Checked)
        s = w.form.settings()
        assert (s.images, s.labels, s.steps, s.minutes, s.device) == (("phantom", "t2"), "phantom labels", 11, 1.5, "cpu")
        assert not s.continue_model and s.method == w.method_combo.currentText()
        assert s.preset == "paper"
        # Crop: "auto" by default (chosen from the volume by the engine), a number when set.
        assert w.crop_spin.text() == "auto" and s.crop is None and s.config().crop is None
        w.crop_spin.setValue(64)
        assert w.form.settings().crop == 64
        w.crop_spin.setValue(0)
        # A new layer (an overlay here) changes nothing checked and is never offered as input.
        viewer.add_image(np.zeros_like(phantom.image), name="phantom probability")
        viewer.add_labels(np.zeros_like(phantom.labels), name="phantom prediction")
        assert w.image_names() == ["phantom", "t2"] and w.image_list.count() == 2
        assert [w.labels_combo.itemText(i) for i in range(w.labels_combo.count())] == ["phantom labels"]
        assert w.export_combo.findText("phantom prediction") >= 0  # overlays can be exported
        assert w.range_to.maximum() == phantom.image.shape[0] - 1
        job = w._make_job(train=True)
        assert job.image.shape == (2, *phantom.image.shape) and job.config.steps == 11
        assert job.config.minutes == 1.5 and job.uncertainty
        assert job.labels is not viewer.layers["phantom labels"].data
    finally:
        w.shutdown()


def test_context_control_trains_a_context_model(qtbot, make_train_widget, run_and_wait, sample_viewer):
    w = make_train_widget(sample_viewer, steps=2)
    w.context_spin.setValue(1)
    w.continue_check.setChecked(False)
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    assert w.model.context == 1 and w.model.method.in_channels == 3
    assert sample_viewer.layers["phantom prediction"].data.shape == sample_viewer.layers["phantom labels"].data.shape
    # Continuing keeps the model's context whatever the control shows; from scratch uses it.
    w.context_spin.setValue(0)
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    assert w.model.context == 1 and w.model.method.step == 4
    w.continue_check.setChecked(False)
    run_and_wait(qtbot, w)
    assert w.model.context == 0


def test_another_method_never_continues_the_model_and_semi_supervised_ones_offer_to_refine(
        qtbot, make_train_widget, run_and_wait, sample_viewer):
    """Issue 20 item 1 and issue 18: the current model is named beside Continue; a model is only
    continued by its own method; a semi-supervised method offers, explicitly, to refine it."""
    w = make_train_widget(sample_viewer, steps=3)
    assert w.model_label.text().startswith("no model yet")
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    assert w.model_label.text() == "current model: supervised · 3 steps"
    assert w.continue_check.isEnabled() and w.continue_check.isChecked() and w.refine_check.isHidden()
    first = w.model

    w.method_combo.setCurrentText("translation")  # not semi-supervised: no refine offer
    assert not w.continue_check.isEnabled() and not w.continue_check.isChecked()
    assert w.refine_check.isHidden()

    w.method_combo.setCurrentText("mean-teacher")
    assert not w.continue_check.isEnabled() and not w.continue_check.isChecked()
    assert not w.refine_check.isHidden() and not w.refine_check.isChecked()
    assert w.refine_check.text() == "Refine the current model with mean-teacher"
    w.refine_check.setChecked(True)
    w.steps_spin.setValue(2)
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    assert w.model is not first and w.model.method.name == "mean-teacher"
    assert [h["method"] for h in w.model.history] == ["supervised", "mean-teacher"]
    assert first.method.step == 3  # the supervised model itself was not trained on
    assert w.model_label.text() == "current model: mean-teacher · 2 steps · refined from supervised"
    assert w.continue_check.isEnabled() and w.continue_check.isChecked() and w.refine_check.isHidden()

    # Back to supervised without taking any offer: a new model from scratch, never the
    # mean-teacher model trained on as something else.
    w.method_combo.setCurrentText("supervised")
    w.params.set_value("features", (8, 16))
    assert not w.continue_check.isChecked() and w.refine_check.isHidden()  # supervised refines nothing
    run_and_wait(qtbot, w)
    assert w.last_error is None, w.last_error
    assert [h["method"] for h in w.model.history] == ["supervised"]
    # and choosing the model's own method again re-ticks Continue
    w.method_combo.setCurrentText("mean-teacher")
    w.method_combo.setCurrentText("supervised")
    assert w.continue_check.isEnabled() and w.continue_check.isChecked()
