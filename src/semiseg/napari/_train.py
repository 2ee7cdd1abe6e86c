"""The Train dock widget: wiring between its form, a session and the display.

Pick data and method, train, watch, predict, correct, export. The widgets are built by
:class:`~._train_form.TrainForm` and read into plain settings; what the form means (settings
-> job, which layers are offered, button states, status lines) is :mod:`._settings`; the
dock's state lives in :class:`~semiseg.napari._session.Session` (no Qt: current model,
running job, output folders, run store, stop/cancel); every job runs as a generator of
:mod:`._jobs`, here through napari's ``thread_worker`` (:func:`napari_runner`). What a job
reports is shown by :mod:`._display` (staged layer display, throttled progress). Training and prediction never
write to the labels layer; only **Accept** does, through ``Labels.data_setitem`` so Ctrl+Z /
**Undo** reverts it.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from pathlib import Path

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

from .. import InputError, Model, get_method
from ..engine import resolve_device
from . import _jobs
from ._display import (
    DISPLAY_STEP_MS,
    UI_REFRESH_MS,
    ProgressThrottle,
    StagedDisplay,
    freeze_startup_objects,
    gc_paused,
    output_steps,
    show_idle,
    show_preview,
    show_progress,
    show_samples,
)
from ._layers import (
    copy_prediction_slices,
    current_slice,
    get_tags,
    is_overlay,
    stack_channels,
    undo_edit,
)
from ._planes import planes_for_training, track_planes
from ._session import LAZY_BYTES, Done, Running, Session
from ._settings import (
    EXPORT_FILTERS,
    button_states,
    check_job,
    continue_offer,
    error_text,
    export_format,
    export_name,
    export_path,
    layer_choices,
    make_job,
    method_summary,
    run_label,
    slice_count,
    slice_span,
    start_mode,
    start_text,
    suggestion_feed,
)
from ._train_form import WIDGETS, TrainForm

__all__ = ["DISPLAY_STEP_MS", "LAZY_BYTES", "UI_REFRESH_MS", "TrainWidget", "napari_runner"]

#: Default backend; ``SEMISEG_NAPARI_BACKEND=thread`` trains in a thread of the viewer process.
DEFAULT_BACKEND = os.environ.get("SEMISEG_NAPARI_BACKEND", "process")


def _drive(gen):
    return (yield from gen)


def napari_runner(gen, yielded, returned, finished):
    """Session runner: ``gen`` in napari's ``thread_worker``; callbacks arrive on the GUI thread."""
    from napari.qt.threading import create_worker

    worker = create_worker(_drive, gen, _start_thread=False)
    worker.yielded.connect(yielded)
    worker.returned.connect(returned)
    worker.finished.connect(finished)
    worker.start()
    return worker


def _shutdown_ref(ref) -> None:
    widget = ref()
    if widget is not None:
        widget.shutdown()


def _from_session(name: str, doc: str | None = None, *, running: bool = False) -> property:
    """A read-only attribute that is the session's ``name`` (``running``: of its running job,
    None when idle)."""
    if running:
        return property(lambda self: getattr(self.session.running, name, None), doc=doc)
    return property(lambda self: getattr(self.session, name), doc=doc)


class TrainWidget(QWidget):
    """Dock widget: train a method on image + labels layers and show its outputs as layers.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    backend : {"process", "thread"}, optional
        Where training runs; ``process`` (default) keeps the viewer fluid on few cores.
    prewarm : bool
        Start a spare worker process right away so Train does not wait for ``import torch``.
    """

    def __init__(self, napari_viewer, parent=None, *, backend: str | None = None, prewarm: bool = True):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = Session(backend=backend or DEFAULT_BACKEND, runner=napari_runner)
        self.backend = self.session.backend
        self.last_error: Exception | None = None
        self.train_pressed_at: float | None = None
        self.first_preview_after: float | None = None
        self.preview_every = 2.0
        self._job_failed = False
        self._train_next = False  # Train was pressed while a prediction ran
        self._choices = None  # the layer choices the form offers
        self._slice = 0
        self._plot_offset = 0
        self.display = StagedDisplay(self, on_error=self._report_error)
        self.throttle = ProgressThrottle(self, self._show_progress, running=lambda: self.session.busy)
        from ._suggest import SuggestionList

        self.form = TrainForm(self, SuggestionList(self.viewer),
                              f"the newest {self.session.keep_runs} training runs are kept in {self.runs_dir}")
        for name in WIDGETS:  # the form's widgets are the dock's attributes (tests, scripts)
            setattr(self, name, getattr(self.form, name))
        self._wire()
        try:
            self.refresh_runs()
        except (InputError, OSError) as exc:
            self.status.setText(f"cannot list training runs: {exc}")
        self._update_buttons()
        self._sync_layers()
        self._on_method(self.method_combo.currentText())
        self._on_device(self.device_combo.currentText())
        if self.pool is not None and prewarm:
            self.pool.prestart()
        QTimer.singleShot(0, freeze_startup_objects)  # once napari has built the dock (item 4)
        atexit.register(_shutdown_ref, weakref.ref(self))

    # ------------------------------------------------------------------ the session's state
    model = _from_session("model")
    model_image = _from_session("model_image")
    last_result = _from_session("last_result")
    phase = _from_session("phase")
    pool = _from_session("pool")
    runs_dir = _from_session("runs_dir", "Folder of kept training runs (:func:`semiseg.runs.plugin_runs_dir`).")
    _lazy_dirs = _from_session("lazy_dirs")
    worker = _from_session("worker", "napari's worker of the running job, or None.", running=True)
    control = _from_session("control", "The running job's JobControl, or None.", running=True)

    @property
    def busy(self) -> bool:
        """True while a job runs, a finished run is still being shown or suggestions compute."""
        return self.session.busy or self.display.pending or self.suggestions.busy

    def _queue_display(self, *steps) -> None:
        """Run ``steps`` on the GUI thread one per event-loop turn, in order."""
        self.display.queue(*steps)

    # ================================================================== wiring
    def _wire(self) -> None:
        f = self.form
        f.method_combo.currentTextChanged.connect(self._on_method)
        f.device_combo.currentTextChanged.connect(self._on_device)
        f.train_button.clicked.connect(self.start_training)
        f.predict_button.clicked.connect(self.start_prediction)
        f.stop_button.clicked.connect(self.stop)
        f.accept_button.clicked.connect(lambda: self.accept_slices())
        f.undo_button.clicked.connect(self.undo)
        f.accept_range_button.clicked.connect(lambda: self.accept_slices(f.range_from.value(), f.range_to.value()))
        f.sample_button.clicked.connect(self.sample_tumours)
        f.save_button.clicked.connect(self._save_dialog)
        f.load_button.clicked.connect(self._load_dialog)
        f.rollback_button.clicked.connect(lambda *_: self._guard(self.rollback, f.runs_combo.currentData()))
        f.export_button.clicked.connect(self._export_dialog)
        events = self.session.events
        events.started.connect(self._on_started)
        events.progress.connect(self._on_progress)
        events.done.connect(self._on_done)
        events.error.connect(self._report_error)
        events.finished.connect(self._on_finished)
        events.model_changed.connect(lambda model: self._update_buttons())
        self.viewer.layers.events.inserted.connect(self._sync_layers)
        self.viewer.layers.events.removed.connect(self._sync_layers)
        self.viewer.dims.events.current_step.connect(self._on_step)

    # ================================================================== layer choices
    def _sync_layers(self, event=None) -> None:
        from napari.layers import Image, Labels

        choices = layer_choices(self.viewer.layers, Image, Labels)
        if choices != self._choices:  # an overlay updated in place, a renamed preview: no change
            self._choices = choices
            self.form.set_layers(choices)
        inserted = getattr(event, "value", None) if event is not None and event.type == "inserted" else None
        for layer in [inserted] if inserted is not None else self.viewer.layers:
            if isinstance(layer, Labels) and not is_overlay(layer):
                track_planes(self.viewer, layer)  # record the plane of every painted slice
        names = self.image_names()
        if choices.images and names:
            self.form.set_slice_count(slice_count(self.viewer.layers[names[0]]))
        self._on_step()

    def image_names(self) -> list[str]:
        """Names of the checked image layers (the input channels, in list order)."""
        return self.form.image_names()

    @property
    def labels_layer(self):
        name = self.labels_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _on_step(self, event=None) -> None:
        names = self.image_names()
        if names and names[0] in self.viewer.layers:
            self._slice = current_slice(self.viewer, self.viewer.layers[names[0]])

    def _on_method(self, name: str) -> None:
        if name:
            cls = get_method(name)
            self.method_summary.setText(method_summary(cls))
            self.params.set_method(cls)
            self._update_buttons()

    def _on_device(self, name: str) -> None:
        try:
            self.device_label.setText(f"in use: {resolve_device(name)}")
        except InputError as exc:
            self.device_label.setText(f"unavailable ({exc})")

    def _update_buttons(self) -> None:
        method = self.method_combo.currentText() or None
        self.form.set_buttons(button_states(busy=self.session.busy, model=self.model, n_runs=self.runs_combo.count(),
                                            interruptible=self.session.interruptible, method=method))
        self.form.set_offer(continue_offer(method or "", self.model))

    # ================================================================== running
    def _input_image(self):
        """The checked image layers as one ``(C, Z, Y, X)`` array (lazy stays lazy)."""
        return stack_channels([self.viewer.layers[name] for name in self.image_names()])

    def _make_job(self, *, train: bool) -> _jobs.TrainJob:
        """The job the form describes (the session adds its folders)."""
        image = self._input_image()
        layer = self.labels_layer
        data, tags = (layer.data, get_tags(layer)) if layer is not None else (None, None)
        planes = planes_for_training(layer) if layer is not None else None
        return make_job(
            self.form.settings(), image, data, tags, planes=planes, train=train, preview_every=self.preview_every,
            model=self.model,
        )

    def start_training(self) -> None:
        """Train (continuing the current model when asked), then predict the volume."""
        self._start(train=True)

    def start_prediction(self) -> None:
        """Predict the whole volume with the current model."""
        self._start(train=False)

    def _start(self, *, train: bool) -> None:
        if self.session.busy:
            if train and self.session.interruptible:
                # Train during a prediction (e.g. the volume after Stop): cancel it, train
                # as soon as the job has ended (issue 20 item 4).
                self.session.cancel()
                self._train_next = True
                self.status.setText("Cancelling the prediction; training starts next...")
            return
        self.train_pressed_at = time.perf_counter()
        self.first_preview_after = None
        try:
            job = self._make_job(train=train)
            # The engine's first checks, here: a worker takes seconds to start (item 7).
            continued = self.model is not None and (self.continue_check.isChecked() or not train)
            check_job(job, get_method(job.method), axis=self.model.axis if continued else 0)
        except (InputError, ValueError, KeyError) as exc:
            self._report_error(exc)
            return
        kw = {"lazy_bytes": LAZY_BYTES, "preview_index": lambda: self._slice}
        if train:
            mode = start_mode(self.form.settings(), self.model)
            self.session.train(job, self.image_names()[0], continue_model=mode == "continue",
                               refine=mode == "refine", **kw)
        else:
            self.session.predict(job, self.image_names()[0], **kw)

    def sample_tumours(self) -> None:
        """Draw tumour samples on the viewed slice into ``<image> sampled tumours``."""
        self.session.sample(self._slice, self.samples_spin.value())

    def stop(self) -> None:
        """Stop training at the next step (the volume is then predicted); during prediction,
        cancel it."""
        text = self.session.stop()
        if text:
            self.status.setText(text)

    def _on_started(self, running: Running) -> None:
        self._job_failed = False
        self.status.setText(start_text(running, self.backend))
        if running.kind != "sample":
            train = running.kind == "train"
            if train and not running.continued:
                self.loss_plot.clear()
            self._plot_offset = max((s[-1][0] for s in self.loss_plot.series.values() if s), default=0)
            self.progress.setRange(0, running.job.config.steps if train else 1)
            self.progress.setValue(0)
            self.progress.setFormat("training %v/%m" if train else "predicting")
        self._update_buttons()

    def _on_progress(self, p) -> None:
        """Store a Progress record; widgets are refreshed by the throttle."""
        if p.phase != "train" and self.session.interruptible and not self.train_button.isEnabled():
            self._update_buttons()  # training is over: Train may interrupt the prediction
        if p.phase == "train" and p.losses:
            self.loss_plot.add(self._plot_offset + p.step, p.losses)
        running = self.session.running
        if p.phase == "train" and p.preview is not None and p.preview_index is not None and running is not None:
            with gc_paused():
                show_preview(self.viewer, running.image_name, p.preview, p.preview_index)
            if self.first_preview_after is None and self.train_pressed_at is not None:
                self.first_preview_after = time.perf_counter() - self.train_pressed_at
            self.throttle.push(p, now=True)  # one repaint for the preview and the widgets
        else:
            self.throttle.push(p)

    def _show_progress(self, p) -> None:
        show_progress(self.progress, self.status, self.loss_plot, p)

    def _on_done(self, done: Done) -> None:
        if done.kind == "sample":
            show_samples(self.viewer, done.image_name, done.result.samples, done.result.index)
            self.status.setText(done.message)
            return
        result: _jobs.JobResult = done.result
        self.throttle.flush()
        self.device_label.setText(f"in use: {result.device}")
        if done.outputs is not None:
            self._queue_display(*output_steps(self.viewer, done.image_name, done.outputs,
                                              result.model.method.outputs, lambda: self.labels_layer))
            # Export offers what the run made (issue 20 item 9).
            self._queue_display(lambda: self.export_combo.setCurrentText(f"{done.image_name} prediction"))
        self.status.setText(done.message)
        self.continue_check.setChecked(True)
        self._update_buttons()  # the current model's line and offers
        if result.run is not None:
            self._queue_display(lambda: self._list_new_run(result.run))
        if self.labels_layer is not None:
            self._queue_display(lambda: self._feed_suggestions(result, done.message))

    def _list_new_run(self, info) -> None:
        """Put a run the job kept at the top of the runs list (no re-listing of the store);
        the session pruned the store to its newest ``keep_runs``: so is the list."""
        self._add_run(info, 0)
        self.runs_combo.setCurrentIndex(0)
        while self.runs_combo.count() > self.session.keep_runs:
            self.runs_combo.removeItem(self.runs_combo.count() - 1)
        self._update_buttons()

    def _add_run(self, info, index: int | None = None) -> None:
        text, path = run_label(info), str(info.path)
        if index is None:
            self.runs_combo.addItem(text, path)
            index = self.runs_combo.count() - 1
        else:
            self.runs_combo.insertItem(index, text, path)
        self.runs_combo.setItemData(index, f"{info.describe()}\n{path}", Qt.ItemDataRole.ToolTipRole)

    def _feed_suggestions(self, result: _jobs.JobResult, msg: str) -> None:
        feed = suggestion_feed(result, self.model, self.model_image, self.viewer.layers)
        if feed is None:
            return  # a newer run or a removed layer: nothing to show
        image = self.viewer.layers[self.model_image]
        try:
            if feed == "result":
                self.suggestions.set_result(self.model, image, self.labels_layer, result.uncertainty)
            else:
                self.suggestions.set_model(self.model, image, self.labels_layer)
        except Exception as exc:
            self.status.setText(f"{msg}; suggestion list failed: {exc}")

    def _on_finished(self, running: Running) -> None:
        if running is not None and running.kind != "sample":
            self.throttle.stop()
            # Not "uncertainty 95/95 slices" or "training 0/20" once the job is over (item 3).
            show_idle(self.progress, "failed" if self._job_failed else "done")
        self._update_buttons()
        if self._train_next:
            self._train_next = False
            QTimer.singleShot(0, self.start_training)
        elif self.pool is not None:
            # Warm the next worker a little later, not while the results are being drawn.
            QTimer.singleShot(1000, self.session.prestart)

    def _report_error(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        self.last_error = exc
        self._job_failed = True
        text = error_text(exc, has_model=self.model is not None)
        self.status.setText(text)
        show_error(text)

    # ================================================================== correct
    def prediction_layer(self):
        name = f"{self.model_image} prediction"
        return self.viewer.layers[name] if self.model_image and name in self.viewer.layers else None

    def accept_slices(self, start: int | None = None, stop: int | None = None) -> int:
        """Copy the prediction of slices ``start..stop`` (inclusive; default the viewed slice)
        into the labels layer as one undoable edit. Returns the number of pixels changed."""
        labels = self.labels_layer
        pred = self.prediction_layer()
        if labels is None or pred is None:
            self._report_error(InputError("accepting needs a labels layer and a prediction"))
            return 0
        start, stop = slice_span(start, stop, current_slice(self.viewer, labels))
        changed, skipped = copy_prediction_slices(labels, pred, start, stop,
                                                  overwrite_painted=self.overwrite_check.isChecked())
        text = f"Accepted slices {start}..{stop}: {changed} pixels changed (Undo reverts)"
        if skipped:
            text += (f"; kept your painted slice{'s' if len(skipped) > 1 else ''} "
                     f"{', '.join(map(str, skipped))} (tick Overwrite painted slices to replace)")
        self.status.setText(text)
        return changed

    def undo(self) -> None:
        """Undo the last edit of the labels layer; the widgets that follow it are told."""
        labels = self.labels_layer
        if labels is not None:
            undo_edit(labels)

    # ================================================================== models, runs, files
    def refresh_runs(self) -> None:
        self.runs_combo.clear()
        for info in self.session.list_runs():
            self._add_run(info)

    def rollback(self, run_path) -> Model:
        """Load a kept run's model as the current model (continue training from it)."""
        model = self.session.rollback(run_path, *self._first_image())
        self._model_loaded(model)
        self.status.setText(f"Rolled back to run {Path(run_path).stem}")
        return model

    def save_model(self, path) -> Path:
        path = self.session.save_model(path)
        self.status.setText(f"Saved model to {path}")
        return path

    def load_model(self, path) -> Model:
        model = self.session.load_model(path, *self._first_image())
        self._model_loaded(model)
        self.status.setText(f"Loaded {model.method.name} model from {path}")
        return model

    def _first_image(self) -> tuple:
        """(name, input) the overlays of a loaded model are named after and computed from."""
        names = self.image_names()
        try:
            image = self._input_image()
        except InputError:
            image = None
        return (names[0] if names else None), image

    def _model_loaded(self, model: Model) -> None:
        self.method_combo.setCurrentText(model.method.name)
        self.continue_check.setChecked(True)
        self._update_buttons()

    def export_mask(self, path, layer_name: str | None = None) -> list[str]:
        """Write a labels layer (default: the one chosen for export, the prediction once there
        is one) to zarr or TIFF; it re-opens as a Labels layer (:mod:`._writer`)."""
        from ._writer import write_labels_tiff, write_labels_zarr

        name = layer_name or self.export_combo.currentText()
        if name not in self.viewer.layers:
            raise InputError("choose a labels layer to export")
        data = self.viewer.layers[name].data
        write = write_labels_zarr if export_format(path) == "zarr" else write_labels_tiff
        written = write(str(path), data, {})
        self.status.setText(f"Exported {name} to {written[0]}")
        return written

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (InputError, OSError, ValueError) as exc:
            self._report_error(exc)

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save model", "model.pt", "Model (*.pt)")
        if path:
            self._guard(self.save_model, path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load model", "", "Model (*.pt);;All files (*)")
        if path:
            self._guard(self.load_model, path)

    def _export_dialog(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(
            self, "Export mask", export_name(self.export_combo.currentText()), ";;".join(EXPORT_FILTERS.values())
        )
        if path:
            self._guard(self.export_mask, export_path(path, chosen))

    # ================================================================== teardown
    def shutdown(self) -> None:
        """Stop a running job, the spare worker process and remove temporary outputs."""
        self.session.shutdown()
