"""The Train dock widget: layout and wiring.

Pick data and method, train, watch, predict, correct, export. Everything the dock decides
lives in :class:`~semiseg.napari._session.Session` (no Qt: current model, running job, output
folders, run store, stop/cancel); every job runs as a generator of :mod:`._jobs`, here through
napari's ``thread_worker`` (:func:`napari_runner`). What a job reports is shown by
:mod:`._display` (staged layer display, throttled progress). Training and prediction never
write to the labels layer; only **Accept** does, through ``Labels.data_setitem`` so Ctrl+Z /
**Undo** reverts it.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .. import InputError, Model, TrainConfig, get_method, list_methods
from ..engine import resolve_device
from . import _jobs
from ._combo import narrow_combo
from ._display import (
    DISPLAY_STEP_MS,
    UI_REFRESH_MS,
    ProgressThrottle,
    StagedDisplay,
    gc_paused,
    output_steps,
    show_preview,
    show_progress,
    show_samples,
)
from ._layers import copy_prediction_slices, current_slice, get_tags, is_overlay, stack_channels
from ._lossplot import LossPlot
from ._params import ParamsForm
from ._session import LAZY_BYTES, Done, Running, Session, error_title

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
        self._slice = 0
        self._plot_offset = 0
        self.display = StagedDisplay(self, on_error=self._report_error)
        self.throttle = ProgressThrottle(self, self._show_progress, running=lambda: self.session.busy)
        self._build_ui()
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
        self._sync_layers()
        self._on_method(self.method_combo.currentText())
        self._on_device(self.device_combo.currentText())
        if self.pool is not None and prewarm:
            self.pool.prestart()
        atexit.register(_shutdown_ref, weakref.ref(self))

    # ------------------------------------------------------------------ the session's state
    @property
    def model(self) -> Model | None:
        return self.session.model

    @property
    def model_image(self) -> str | None:
        return self.session.model_image

    @property
    def last_result(self) -> _jobs.JobResult | None:
        return self.session.last_result

    @property
    def phase(self) -> str:
        return self.session.phase

    @property
    def worker(self):
        """napari's worker of the running job, or None."""
        return self.session.running.worker if self.session.running is not None else None

    @property
    def control(self) -> _jobs.JobControl | None:
        return self.session.running.control if self.session.running is not None else None

    @property
    def pool(self) -> _jobs.ProcessPool | None:
        return self.session.pool

    @property
    def runs_dir(self) -> Path:
        """Folder of kept training runs (:func:`semiseg.runs.plugin_runs_dir`)."""
        return self.session.runs_dir

    @property
    def _lazy_dirs(self) -> list[str]:
        return self.session.lazy_dirs

    @property
    def busy(self) -> bool:
        """True while a job runs, a finished run is still being shown or suggestions compute."""
        return self.session.busy or self.display.pending or self.suggestions.busy

    def _queue_display(self, *steps) -> None:
        """Run ``steps`` on the GUI thread one per event-loop turn, in order."""
        self.display.queue(*steps)

    # ================================================================== UI
    def _build_ui(self) -> None:
        lay = QVBoxLayout(self)

        box = QGroupBox("Data")
        form = QFormLayout(box)
        self.image_list = QListWidget()
        self.image_list.setMaximumHeight(80)
        self.image_list.setToolTip("Checked image layers become the channels of the input")
        form.addRow("Image(s)", self.image_list)
        self.labels_combo = narrow_combo()
        form.addRow("Labels", self.labels_combo)
        lay.addWidget(box)

        box = QGroupBox("Method")
        v = QVBoxLayout(box)
        self.method_combo = QComboBox()
        self.method_combo.addItems(list_methods())
        self.method_combo.currentTextChanged.connect(self._on_method)
        v.addWidget(self.method_combo)
        self.method_summary = QLabel()
        self.method_summary.setWordWrap(True)
        v.addWidget(self.method_summary)
        self.params = ParamsForm()
        v.addWidget(self.params)
        lay.addWidget(box)

        box = QGroupBox("Budget and device")
        form = QFormLayout(box)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1_000_000)
        self.steps_spin.setValue(300)
        form.addRow("Steps", self.steps_spin)
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0, 10_000)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setSpecialValueText("no limit")
        form.addRow("Minutes", self.minutes_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(8)
        form.addRow("Batch size", self.batch_spin)
        self.crop_spin = QSpinBox()
        self.crop_spin.setRange(16, 1024)
        self.crop_spin.setSingleStep(16)
        self.crop_spin.setValue(96)
        form.addRow("Crop", self.crop_spin)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        form.addRow("Seed", self.seed_spin)
        row = QHBoxLayout()
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_combo.currentTextChanged.connect(self._on_device)
        row.addWidget(self.device_combo)
        self.device_label = QLabel()
        row.addWidget(self.device_label, 1)
        form.addRow("Device", row)
        self.continue_check = QCheckBox("Continue from current model (unchecked: from scratch)")
        self.continue_check.setChecked(True)
        form.addRow(self.continue_check)
        lay.addWidget(box)

        row = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.start_training)
        row.addWidget(self.train_button)
        self.predict_button = QPushButton("Predict")
        self.predict_button.setToolTip("Predict the whole volume with the current model")
        self.predict_button.clicked.connect(self.start_prediction)
        row.addWidget(self.predict_button)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        row.addWidget(self.stop_button)
        lay.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        lay.addWidget(self.progress)
        self.status = QLabel("Idle")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.loss_plot = LossPlot(repaint_ms=None)  # repainted by _flush_progress
        lay.addWidget(self.loss_plot)

        box = QGroupBox("Correct")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.accept_button = QPushButton("Accept slice")
        self.accept_button.setToolTip("Copy the prediction of the viewed slice into the labels")
        self.accept_button.clicked.connect(lambda: self.accept_slices())
        row.addWidget(self.accept_button)
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Undo the last edit of the labels layer (also Ctrl+Z)")
        self.undo_button.clicked.connect(self.undo)
        row.addWidget(self.undo_button)
        v.addLayout(row)
        row = QHBoxLayout()
        self.range_from = QSpinBox()
        self.range_to = QSpinBox()
        row.addWidget(QLabel("Slices"))
        row.addWidget(self.range_from)
        row.addWidget(QLabel("to"))
        row.addWidget(self.range_to)
        self.accept_range_button = QPushButton("Accept range")
        self.accept_range_button.clicked.connect(
            lambda: self.accept_slices(self.range_from.value(), self.range_to.value())
        )
        row.addWidget(self.accept_range_button)
        v.addLayout(row)
        row = QHBoxLayout()
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 64)
        self.samples_spin.setValue(4)
        row.addWidget(QLabel("Samples"))
        row.addWidget(self.samples_spin)
        self.sample_button = QPushButton("Sample tumours on this slice")
        self.sample_button.clicked.connect(self.sample_tumours)
        row.addWidget(self.sample_button)
        self.sample_row = QWidget()
        self.sample_row.setLayout(row)
        v.addWidget(self.sample_row)
        lay.addWidget(box)

        box = QGroupBox("Model and export")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.save_button = QPushButton("Save model...")
        self.save_button.clicked.connect(self._save_dialog)
        row.addWidget(self.save_button)
        self.load_button = QPushButton("Load model...")
        self.load_button.clicked.connect(self._load_dialog)
        row.addWidget(self.load_button)
        v.addLayout(row)
        # Every training run is kept (semiseg.runs); any can be loaded back.
        row = QHBoxLayout()
        self.runs_combo = narrow_combo(tooltip=f"training runs kept in {self.runs_dir}")
        row.addWidget(self.runs_combo, 1)
        self.rollback_button = QPushButton("Roll back")
        self.rollback_button.setToolTip("load the chosen run's model (the runs themselves are kept)")
        self.rollback_button.clicked.connect(lambda *_: self._guard(self.rollback, self.runs_combo.currentData()))
        row.addWidget(self.rollback_button)
        v.addLayout(row)
        row = QHBoxLayout()
        self.export_combo = narrow_combo()
        row.addWidget(self.export_combo, 1)
        self.export_button = QPushButton("Export mask...")
        self.export_button.clicked.connect(self._export_dialog)
        row.addWidget(self.export_button)
        v.addLayout(row)
        lay.addWidget(box)

        # The suggestion list, fed the model and its uncertainty pass after every run.
        from ._suggest import SuggestionList

        box = QGroupBox("Slices to annotate next")
        v = QVBoxLayout(box)
        self.suggestions = SuggestionList(self.viewer)
        v.addWidget(self.suggestions)
        lay.addWidget(box)
        lay.addStretch(1)
        try:
            self.refresh_runs()
        except (InputError, OSError) as exc:
            self.status.setText(f"cannot list training runs: {exc}")
        self._update_buttons()
    # ================================================================== layer choices
    def _image_layers(self):
        from napari.layers import Image

        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and not is_overlay(ly)]

    def _labels_layers(self, *, overlays: bool = False):
        from napari.layers import Labels

        return [ly for ly in self.viewer.layers if isinstance(ly, Labels) and (overlays or not is_overlay(ly))]

    def _sync_layers(self, event=None) -> None:
        checked = set(self.image_names())
        names = [ly.name for ly in self._image_layers()]
        self.image_list.clear()
        for name in names:
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            on = name in checked or (not checked and name == names[0])
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.image_list.addItem(item)
        for combo, layers in (
            (self.labels_combo, self._labels_layers()),
            (self.export_combo, self._labels_layers(overlays=True)),
        ):
            current = combo.currentText()
            combo.clear()
            combo.addItems([ly.name for ly in layers])
            if current in [ly.name for ly in layers]:
                combo.setCurrentText(current)
        if names and self.image_names():
            first = self.viewer.layers[self.image_names()[0]]
            n = first.data.shape[-3] if first.ndim >= 3 else 1
            for spin in (self.range_from, self.range_to):
                spin.setRange(0, max(0, n - 1))
        self._on_step()

    def image_names(self) -> list[str]:
        """Names of the checked image layers (the input channels, in list order)."""
        out = []
        for i in range(self.image_list.count()):
            item = self.image_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.text())
        return out

    @property
    def labels_layer(self):
        name = self.labels_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _on_step(self, event=None) -> None:
        names = self.image_names()
        if names and names[0] in self.viewer.layers:
            self._slice = current_slice(self.viewer, self.viewer.layers[names[0]])

    def _on_method(self, name: str) -> None:
        if not name:
            return
        cls = get_method(name)
        extra = []
        if cls.uses_tags:
            extra.append("uses weak tags")
        if cls.outputs:
            extra.append("outputs: " + ", ".join(cls.outputs))
        if cls.can_sample:
            extra.append("can sample tumours")
        self.method_summary.setText(cls.summary + (f" ({'; '.join(extra)})" if extra else ""))
        self.params.set_method(cls)

    def _on_device(self, name: str) -> None:
        try:
            dev = resolve_device(name)
            self.device_label.setText(f"in use: {dev}")
        except InputError as exc:
            self.device_label.setText(f"unavailable ({exc})")

    def _update_buttons(self) -> None:
        busy = self.session.busy
        has_model = self.model is not None
        self.train_button.setEnabled(not busy)
        self.predict_button.setEnabled(not busy and has_model)
        self.stop_button.setEnabled(busy)
        self.sample_button.setEnabled(not busy and has_model and self.model.method.can_sample)
        self.sample_row.setVisible(not has_model or self.model.method.can_sample)
        self.save_button.setEnabled(has_model)
        self.load_button.setEnabled(not busy)
        self.rollback_button.setEnabled(not busy and self.runs_combo.count() > 0)
        self.continue_check.setEnabled(has_model)

    # ================================================================== inputs
    def _input_image(self):
        """The checked image layers as one ``(C, Z, Y, X)`` array (lazy stays lazy)."""
        return stack_channels([self.viewer.layers[name] for name in self.image_names()])

    def _make_job(self, *, train: bool) -> _jobs.TrainJob:
        """The job the form describes (the session adds its folders)."""
        image = self._input_image()
        labels_layer = self.labels_layer
        if train and labels_layer is None:
            raise InputError("choose a labels layer with a few annotated slices")
        if labels_layer is not None:
            labels = np.array(labels_layer.data, copy=True)  # snapshot: the layer is never handed over
            tags = get_tags(labels_layer)
        else:
            labels = np.zeros(image.shape[1:], np.uint8)
            tags = None
        config = TrainConfig(
            steps=self.steps_spin.value(),
            minutes=self.minutes_spin.value() or None,
            batch_size=self.batch_spin.value(),
            crop=self.crop_spin.value(),
            seed=self.seed_spin.value(),
            preview_every=self.preview_every,
        )
        return _jobs.TrainJob(
            image=image,
            labels=labels,
            tags=tags,
            method=self.method_combo.currentText(),
            params=self.params.values(),
            config=config,
            device=self.device_combo.currentText(),
            train=train,
            # The suggestion list's pass runs in the worker too, not in the viewer's process.
            uncertainty=labels_layer is not None,
            tta=self.suggestions.tta_check.isChecked(),
        )

    # ================================================================== running
    def start_training(self) -> None:
        """Train (continuing the current model when asked), then predict the volume."""
        self._start(train=True)

    def start_prediction(self) -> None:
        """Predict the whole volume with the current model."""
        self._start(train=False)

    def _start(self, *, train: bool) -> None:
        if self.session.busy:
            return
        self.train_pressed_at = time.perf_counter()
        self.first_preview_after = None
        try:
            job = self._make_job(train=train)
        except (InputError, ValueError, KeyError) as exc:
            self._report_error(exc)
            return
        kw = {"lazy_bytes": LAZY_BYTES, "preview_index": lambda: self._slice}
        if train:
            self.session.train(job, self.image_names()[0], continue_model=self.continue_check.isChecked(), **kw)
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
        if running.kind == "sample":
            self.status.setText(f"Sampling {running.job.n} tumours on slice {running.sample_index}...")
            self._update_buttons()
            return
        train = running.kind == "train"
        if train and not running.continued:
            self.loss_plot.clear()
        self._plot_offset = max((s[-1][0] for s in self.loss_plot.series.values() if s), default=0)
        self.progress.setRange(0, running.job.config.steps if train else 1)
        self.progress.setValue(0)
        self.progress.setFormat("training %v/%m" if train else "predicting")
        self.status.setText(
            ("Starting training" if train else "Starting prediction")
            + (" (worker process)" if self.backend == "process" else " (worker thread)")
        )
        self._update_buttons()

    def _on_progress(self, p) -> None:
        """Store a Progress record; widgets are refreshed by the throttle."""
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
        self.status.setText(done.message)
        self.continue_check.setChecked(True)
        if result.run is not None:
            self._queue_display(lambda: self._list_new_run(result.run))
        if self.labels_layer is not None:
            self._queue_display(lambda: self._feed_suggestions(result, done.message))

    def _list_new_run(self, info) -> None:
        """Put a run the job kept at the top of the runs list (no re-listing of the store)."""
        self.runs_combo.insertItem(0, info.describe(), str(info.path))
        self.runs_combo.setCurrentIndex(0)
        self._update_buttons()

    def _feed_suggestions(self, result: _jobs.JobResult, msg: str) -> None:
        if self.model is not result.model or self.model_image not in self.viewer.layers:
            return  # a newer run or a removed layer: nothing to show
        image = self.viewer.layers[self.model_image]
        try:
            if result.uncertainty is not None:
                self.suggestions.set_result(self.model, image, self.labels_layer, result.uncertainty)
            else:
                self.suggestions.set_model(self.model, image, self.labels_layer)
        except Exception as exc:
            self.status.setText(f"{msg}; suggestion list failed: {exc}")

    def _on_finished(self, running: Running) -> None:
        if running is not None and running.kind != "sample":
            self.throttle.stop()
        self._update_buttons()
        if self.pool is not None:
            # Warm the next worker a little later, not while the results are being drawn.
            QTimer.singleShot(1000, self.session.prestart)

    def _report_error(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        self.last_error = exc
        text = f"{error_title(exc)}: {exc}"
        if self.model is not None:
            text += " (the previous model is kept)"
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
        if start is None:
            start = stop = current_slice(self.viewer, labels)
        start, stop = sorted((int(start), int(start if stop is None else stop)))
        changed = copy_prediction_slices(labels, pred, start, stop)
        self.status.setText(f"Accepted slices {start}..{stop}: {changed} pixels changed (Undo reverts)")
        return changed

    def undo(self) -> None:
        labels = self.labels_layer
        if labels is not None:
            labels.undo()

    # ================================================================== models, runs, files
    def refresh_runs(self) -> None:
        self.runs_combo.clear()
        for info in self.session.list_runs():
            self.runs_combo.addItem(info.describe(), str(info.path))

    def _input_or_none(self):
        try:
            return self._input_image()
        except InputError:
            return None

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
        return (names[0] if names else None), self._input_or_none()

    def _model_loaded(self, model: Model) -> None:
        self.method_combo.setCurrentText(model.method.name)
        self.continue_check.setChecked(True)
        self._update_buttons()

    def export_mask(self, path, layer_name: str | None = None) -> list[str]:
        """Write a labels layer (default: the one chosen for export) to zarr or TIFF."""
        from ._writer import write_labels_tiff, write_labels_zarr

        name = layer_name or self.export_combo.currentText()
        if name not in self.viewer.layers:
            raise InputError("choose a labels layer to export")
        data = self.viewer.layers[name].data
        suffix = Path(path).suffix.lower()
        if suffix == ".zarr":
            written = write_labels_zarr(str(path), data, {})
        elif suffix in (".tif", ".tiff"):
            written = write_labels_tiff(str(path), data, {})
        else:
            raise InputError("export to a .zarr or .tif/.tiff path")
        self.status.setText(f"Exported {name} to {written[0]}")
        return written

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (InputError, OSError, ValueError) as exc:
            self._report_error(exc)
            return None

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save model", "model.pt", "Model (*.pt)")
        if path:
            self._guard(self.save_model, path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load model", "", "Model (*.pt);;All files (*)")
        if path:
            self._guard(self.load_model, path)

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export mask", f"{self.export_combo.currentText()}.zarr", "zarr (*.zarr);;TIFF (*.tif *.tiff)"
        )
        if path:
            self._guard(self.export_mask, path)

    # ================================================================== teardown
    def shutdown(self) -> None:
        """Stop a running job, the spare worker process and remove temporary outputs."""
        self.session.shutdown()
