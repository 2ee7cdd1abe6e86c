"""The Train dock widget: pick data and method, train, watch, predict, correct, export.

No training logic lives here: the widget builds a :class:`~semiseg.napari._jobs.TrainJob`,
runs :func:`~semiseg.napari._jobs.iter_job_process` (default) or
:func:`~semiseg.napari._jobs.iter_job` inside napari's ``thread_worker`` and shows the
:class:`~semiseg.engine.Progress` records it yields. Training and prediction never write to
the labels layer; only **Accept** does, through ``Labels.data_setitem`` so Ctrl+Z / **Undo**
reverts it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import threading
import time
import weakref
from collections import deque
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

from ..data import InputError
from ..engine import TrainConfig, resolve_device
from ..methods import get_method, list_methods
from ..model import Model
from . import _jobs
from ._combo import narrow_combo
from ._layers import current_slice, get_tags, is_overlay, upsert
from ._lossplot import LossPlot
from ._params import ParamsForm

#: Default backend; ``SEMISEG_NAPARI_BACKEND=thread`` trains in a thread of the viewer process.
DEFAULT_BACKEND = os.environ.get("SEMISEG_NAPARI_BACKEND", "process")
#: Image volumes above this many bytes get lazy (zarr-backed) outputs instead of numpy ones.
LAZY_BYTES = 512 * 2**20
#: Pause between the GUI-thread steps that show a finished run (adding a layer costs napari
#: ~150 ms with software rendering; one per event-loop turn keeps each freeze short).
DISPLAY_STEP_MS = 10
#: Progress bar, status line and loss plot are refreshed together at most this often: with
#: software rendering every repaint of the window costs ~15-20 ms, whatever changed.
UI_REFRESH_MS = 500


@contextlib.contextmanager
def _gc_paused():
    """No automatic garbage collection inside the block.

    A full collection of a viewer process with napari and torch loaded takes ~200 ms here;
    if one starts inside a layer insertion (which allocates a lot) the two add up to a visible
    freeze. Pausing it for the ~100 ms of one display step lets it run in a later turn on its own.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _relay(gen):
    """Run ``gen`` to the end inside the worker; return ``("ok", result)`` or ``("error", exc)``.

    Errors are returned rather than raised so the widget reports them once, in its own words.
    """
    try:
        result = yield from gen
    except Exception as exc:
        return ("error", exc)
    return ("ok", result)


def _shutdown_ref(ref) -> None:
    widget = ref()
    if widget is not None:
        widget.shutdown()


def _is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


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
        self.backend = backend or DEFAULT_BACKEND
        if self.backend not in ("process", "thread"):
            raise ValueError("backend must be 'process' or 'thread'")
        self.model: Model | None = None
        self.model_image: str | None = None  # image name the overlays are named after
        self._model_input = None  # (C, Z, Y, X) array the model was trained/predicted on
        self.worker = None
        self.control: _jobs.JobControl | None = None
        self.phase = "idle"
        self.last_result: _jobs.JobResult | None = None
        self.last_error: Exception | None = None
        self.train_pressed_at: float | None = None
        self.first_preview_after: float | None = None
        self._slice = 0
        self._plot_offset = 0
        self._lazy_dirs: list[str] = []
        self._job_dir: str | None = None
        self._job_lazy = False
        self._job_image = None
        self._job_image_name: str | None = None
        self._job_trains = False
        self.preview_every = 2.0
        self._display: deque = deque()  # pending GUI steps that show a finished run
        self._display_timer = QTimer(self)
        self._display_timer.setSingleShot(True)
        self._display_timer.setInterval(DISPLAY_STEP_MS)
        self._display_timer.timeout.connect(self._display_next)
        self._latest = None  # newest Progress not yet shown
        self._ui_timer = QTimer(self)
        self._ui_timer.setInterval(UI_REFRESH_MS)
        self._ui_timer.timeout.connect(self._flush_progress)
        self.pool = _jobs.ProcessPool(threads=1) if self.backend == "process" else None
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._sync_layers)
        self.viewer.layers.events.removed.connect(self._sync_layers)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self._sync_layers()
        self._on_method(self.method_combo.currentText())
        self._on_device(self.device_combo.currentText())
        if self.pool is not None and prewarm:
            self.pool.prestart()
        atexit.register(_shutdown_ref, weakref.ref(self))

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
        self.context_spin = QSpinBox()  # issue 16: 2.5D slice context (TrainConfig.context)
        self.context_spin.setRange(0, 8)
        self.context_spin.setValue(TrainConfig.context)
        self.context_spin.setToolTip("Neighbouring slices on each side the network sees with each slice "
                                     "(a continued model keeps its own)")
        form.addRow("Context", self.context_spin)
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

    def set_images(self, names: list[str]) -> None:
        for i in range(self.image_list.count()):
            item = self.image_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

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
        busy = self.worker is not None
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
        names = self.image_names()
        if not names:
            raise InputError("choose at least one image layer")
        datas = []
        for name in names:
            layer = self.viewer.layers[name]
            data = layer.data[0] if layer.multiscale else layer.data
            if getattr(layer, "rgb", False):
                raise InputError(f"{name} is an RGB image; split it into channels first")
            datas.append(data)
        shapes = {tuple(d.shape) for d in datas}
        if len(shapes) > 1:
            raise InputError(f"channel layers differ in shape: {sorted(shapes)}")
        if all(_is_numpy(d) for d in datas):
            return datas[0][None] if len(datas) == 1 else np.stack(datas)
        import dask.array as da

        return da.stack([d if hasattr(d, "dask") else da.from_array(d, chunks=(1, *d.shape[-2:])) for d in datas])

    def _make_job(self, *, train: bool) -> _jobs.TrainJob:
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
        lazy = not _is_numpy(image) or image.nbytes > LAZY_BYTES
        minutes = self.minutes_spin.value() or None
        config = TrainConfig(
            steps=self.steps_spin.value(),
            minutes=minutes,
            batch_size=self.batch_spin.value(),
            crop=self.crop_spin.value(),
            context=self.model.context if self.model is not None and self.continue_check.isChecked()
            else self.context_spin.value(),
            seed=self.seed_spin.value(),
            preview_every=self.preview_every,
        )
        out_dir = _jobs.new_out_dir() if (self.backend == "process" or lazy) else None
        return _jobs.TrainJob(
            image=image,
            labels=labels,
            tags=tags,
            method=self.method_combo.currentText(),
            params=self.params.values(),
            config=config,
            device=self.device_combo.currentText(),
            train=train,
            out_dir=out_dir,
            runs_dir=str(self.runs_dir) if train else None,
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
        if self.worker is not None:
            return
        self.train_pressed_at = time.perf_counter()
        self.first_preview_after = None
        self._job_trains = train
        try:
            job = self._make_job(train=train)
        except (InputError, ValueError, KeyError) as exc:
            self._report_error(exc)
            return
        continuing = self.model is not None and (self.continue_check.isChecked() or not train)
        model = self.model if continuing else None
        if not continuing:
            self.loss_plot.clear()
        self._plot_offset = max((s[-1][0] for s in self.loss_plot.series.values() if s), default=0)
        self._job_image = job.image
        self._job_image_name = self.image_names()[0]
        self.control = _jobs.JobControl(preview_index=lambda: self._slice)
        lazy = not _is_numpy(job.image) or job.image.nbytes > LAZY_BYTES
        if self.backend == "process":
            gen = _jobs.iter_job_process(job, self.control, model, pool=self.pool, load_outputs=not lazy)
        else:
            gen = _jobs.iter_job(job, self.control, model)
        from napari.qt.threading import create_worker

        self.phase = "train" if train else "predict"
        self.worker = create_worker(_relay, gen, _start_thread=False)
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        self._job_dir = job.out_dir if self.backend == "process" else None
        self._job_lazy = lazy
        self.progress.setRange(0, job.config.steps if train else 1)
        self.progress.setValue(0)
        self.progress.setFormat("training %v/%m" if train else "predicting")
        self.status.setText(
            ("Starting training" if train else "Starting prediction")
            + (" (worker process)" if self.backend == "process" else " (worker thread)")
        )
        self._update_buttons()
        self.worker.start()

    def stop(self) -> None:
        """Stop training at the next step (the volume is then predicted); during prediction,
        cancel it."""
        if self.control is None or self.worker is None:
            return
        if self.phase == "predict":
            self.control.cancel.set()
            self.status.setText("Cancelling prediction...")
        else:
            self.control.stop_training.set()
            self.status.setText("Stopping training...")

    def _on_progress(self, p) -> None:
        """Store a Progress record; widgets are refreshed by :meth:`_flush_progress`."""
        if p.phase != "train":  # "predict", then "uncertainty" for the suggestion list
            self.phase = "predict"
        elif p.losses:
            self.loss_plot.add(self._plot_offset + p.step, p.losses)
        self._latest = p
        if p.phase == "train" and p.preview is not None and p.preview_index is not None:
            with _gc_paused():
                self._show_preview(p.preview, p.preview_index)
            self._flush_progress()  # one repaint for the preview and the widgets
        elif not self._ui_timer.isActive():
            self._flush_progress()  # the first record at once, then at most every UI_REFRESH_MS
            self._ui_timer.start()

    def _flush_progress(self) -> None:
        """Show the newest Progress record: progress bar, status line, loss plot."""
        p, self._latest = self._latest, None
        if p is None:
            if self.worker is None:
                self._ui_timer.stop()
            return
        # QProgressBar.setValue repaints synchronously; with updates disabled it only marks
        # itself dirty, so everything below is drawn in one paint event.
        self.progress.setUpdatesEnabled(False)
        try:
            if p.phase != "train":
                fmt = "uncertainty %v/%m slices" if p.phase == "uncertainty" else "predicting %v/%m slices"
                if self.progress.format() != fmt:
                    self.progress.setFormat(fmt)
                self.progress.setRange(0, max(1, p.total or 1))
                self.progress.setValue(p.step)
                return
            if p.total:
                self.progress.setRange(0, p.total)
            self.progress.setValue(min(p.step, p.total or p.step))
        finally:
            self.progress.setUpdatesEnabled(True)
        if p.losses:
            text = ", ".join(f"{k} {v:.3f}" for k, v in p.losses.items())
            self.status.setText(f"step {p.step}/{p.total} · {p.elapsed:.0f} s · {text}")
        self.loss_plot.flush()

    def _show_preview(self, preview: np.ndarray, index: int) -> None:
        like = self.viewer.layers[self._job_image_name] if self._job_image_name in self.viewer.layers else None
        name = f"{self._job_image_name} preview"
        layer = upsert(
            self.viewer,
            name,
            np.asarray(preview)[None],
            "labels",
            like=like,
            translate_offset=(index, 0, 0),
            opacity=0.6,
        )
        layer.visible = True
        if self.first_preview_after is None and self.train_pressed_at is not None:
            self.first_preview_after = time.perf_counter() - self.train_pressed_at

    def _on_returned(self, value) -> None:
        kind, payload = value
        if kind == "error":
            self._report_error(payload)
            return
        result: _jobs.JobResult = payload
        self._flush_progress()
        self.last_result = result
        self.model = result.model
        self.model_image = self._job_image_name
        self._model_input = self._job_image
        self.device_label.setText(f"in use: {result.device}")
        steps = result.model.history[-1]["steps"] if result.model.history else 0
        if result.outputs is not None:
            outputs = result.outputs
            if result.out_dir and not all(_is_numpy(v) or hasattr(v, "dask") for v in outputs.values()):
                outputs = _jobs.open_outputs(result.out_dir, load=False)  # zarr -> dask
            self._queue_display(*self._output_steps(outputs))
            # Older lazy outputs are no longer shown: drop their folders.
            for d in self._lazy_dirs:
                _jobs.remove_dir(d)
            self._lazy_dirs = [result.out_dir] if result.out_dir else []
        if self._job_trains or result.outputs is None:
            msg = f"Trained {steps} steps on {result.device}" + (" (stopped)" if result.stopped else "")
        else:
            msg = f"Predicted on {result.device}"
        if result.outputs is None:
            msg += "; prediction cancelled"
        self.status.setText(msg)
        self.continue_check.setChecked(True)
        if result.run is not None:
            self._queue_display(lambda: self._list_new_run(result.run))
        elif result.run_error:
            self.status.setText(f"{msg}; run not kept: {result.run_error}")
        if self.labels_layer is not None:
            self._queue_display(lambda: self._feed_suggestions(result, msg))

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

    # ------------------------------------------------------------------ staged display
    @property
    def busy(self) -> bool:
        """True while a job runs, a finished run is still being shown or suggestions compute."""
        sugg_busy = self.suggestions.busy
        return self.worker is not None or bool(self._display) or sugg_busy

    def _queue_display(self, *steps) -> None:
        """Run ``steps`` on the GUI thread one per event-loop turn, in order."""
        self._display.extend(steps)
        if not self._display_timer.isActive():
            self._display_timer.start()

    def _display_next(self) -> None:
        if not self._display:
            return
        step = self._display.popleft()
        try:
            with _gc_paused():
                step()
        except Exception as exc:  # a layer that cannot be shown must not drop the others
            self._report_error(exc)
        if self._display:
            self._display_timer.start()

    def _on_finished(self) -> None:
        self.worker = None
        self.phase = "idle"
        if self._job_dir and not self._job_lazy:
            # Outputs were loaded into memory; delete the job's files off the GUI thread.
            threading.Thread(target=_jobs.remove_dir, args=(self._job_dir,), daemon=True).start()
        self._job_dir = None
        self._flush_progress()
        self._ui_timer.stop()
        self._update_buttons()
        if self.pool is not None:
            # Warm the next worker a little later, not while the results are being drawn.
            QTimer.singleShot(1000, self._prestart)

    def _prestart(self) -> None:
        if self.pool is not None and self.worker is None:
            self.pool.prestart()

    def _report_error(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        self.last_error = exc
        kind = {"TrainingError": "Training failed", "InputError": "Cannot train"}.get(type(exc).__name__, "Error")
        text = f"{kind}: {exc}"
        if self.model is not None:
            text += " (the previous model is kept)"
        self.status.setText(text)
        show_error(text)

    # ================================================================== outputs
    def _output_steps(self, outputs: dict) -> list:
        """One callable per overlay layer (added or updated in place), then the tidying up."""
        name = self._job_image_name
        created = set()

        def put(suffix, data, kind, **kw):
            def step():
                like = self.viewer.layers[name] if name in self.viewer.layers else None
                full = f"{name} {suffix}"
                preview = f"{name} preview"
                if full not in self.viewer.layers and kind == "labels" and preview in self.viewer.layers:
                    # Adding a layer costs napari far more than renaming one: the preview
                    # layer becomes the prediction layer (a new preview comes with the next run).
                    layer = self.viewer.layers[preview]
                    layer.name = full
                    layer.visible = True
                    layer.opacity = kw.get("opacity", layer.opacity)
                    created.add(full)
                    opts = {}
                elif full not in self.viewer.layers:
                    created.add(full)
                    opts = kw
                else:  # keep the user's display choices on an existing layer
                    opts = {k: v for k, v in kw.items() if k not in ("visible", "colormap", "opacity", "blending")}
                upsert(self.viewer, full, data, kind, like=like, **opts)

            return step

        steps = [put("prediction", outputs["mask"], "labels", opacity=0.5)]
        probs = outputs["probabilities"]
        prob = probs[1] if probs.shape[0] == 2 else probs[1:]
        steps.append(put("probability", prob, "image", colormap="magma", blending="additive", visible=False,
                         contrast_limits=(0.0, 1.0)))
        for out_name, kind in self.model.method.outputs.items():
            data = outputs[out_name]
            if data.ndim == 4 and data.shape[0] == 1:
                data = data[0]
            cmap = "PiYG" if kind == "difference" else "gray"
            steps.append(put(out_name, data, "image", colormap=cmap, visible=False))

        def tidy():
            preview = f"{name} preview"
            if preview in self.viewer.layers:
                self.viewer.layers[preview].visible = False
            # Keep the user's labels on top of the overlays so painting stays visible.
            labels = self.labels_layer
            if labels is not None and created:
                self.viewer.layers.move(self.viewer.layers.index(labels), len(self.viewer.layers))

        steps.append(tidy)
        return steps

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
        stop = start if stop is None else stop
        start, stop = sorted((int(start), int(stop)))
        changed = 0
        with labels.block_history():
            for i in range(start, stop + 1):
                new = np.asarray(pred.data[i]).astype(labels.data.dtype)
                diff = np.nonzero(np.asarray(labels.data[i]) != new)
                if diff[0].size == 0:
                    continue
                idx = (np.full(diff[0].size, i), *diff)
                labels.data_setitem(idx, new[diff])
                changed += diff[0].size
        self.status.setText(f"Accepted slices {start}..{stop}: {changed} pixels changed (Undo reverts)")
        return changed

    def undo(self) -> None:
        labels = self.labels_layer
        if labels is not None:
            labels.undo()

    def sample_tumours(self) -> None:
        """Draw tumour samples on the viewed slice into ``<image> sampled tumours``."""
        if self.model is None or not self.model.method.can_sample or self.worker is not None:
            return
        from napari.qt.threading import create_worker

        from ..inference import sample_tumours

        index = self._slice
        n = self.samples_spin.value()
        model, image = self.model, self._model_input

        def job():
            try:
                yield from ()
                return ("ok", (index, sample_tumours(model, image, index, n)))
            except Exception as exc:
                return ("error", exc)

        self.worker = create_worker(job, _start_thread=False)
        self.worker.returned.connect(self._on_samples)
        self.worker.finished.connect(self._on_samples_finished)
        self.status.setText(f"Sampling {n} tumours on slice {index}...")
        self._update_buttons()
        self.worker.start()

    def _on_samples(self, value) -> None:
        kind, payload = value
        if kind == "error":
            self._report_error(payload)
            return
        index, samples = payload  # (n, C, Y, X)
        if samples.ndim == 4 and samples.shape[1] == 1:
            samples = samples[:, 0]
        data = samples[..., None, :, :]  # sample axis, then a one-slice Z axis at ``index``
        like = self.viewer.layers[self.model_image] if self.model_image in self.viewer.layers else None
        offset = (0,) * (data.ndim - 3) + (index, 0, 0)
        upsert(self.viewer, f"{self.model_image} sampled tumours", data, "image", like=like,
               translate_offset=offset)
        self.status.setText(f"{len(samples)} sampled tumours on slice {index} (slider: sample)")

    def _on_samples_finished(self) -> None:
        self.worker = None
        self._update_buttons()

    # ================================================================== runs
    @property
    def runs_dir(self) -> Path:
        """Folder of kept training runs: ``$SEMISEG_RUNS_DIR`` or ``~/.napari-semiseg/runs``."""
        import os

        return Path(os.environ.get("SEMISEG_RUNS_DIR") or Path.home() / ".napari-semiseg" / "runs")

    def refresh_runs(self) -> None:
        from ..runs import list_runs

        self.runs_combo.clear()
        if not self.runs_dir.is_dir():
            return
        for info in reversed(list_runs(self.runs_dir / "model.pt", self.runs_dir)):
            self.runs_combo.addItem(info.describe(), str(info.path))

    def rollback(self, run_path) -> Model:
        """Load a kept run's model as the current model (continue training from it)."""
        if not run_path:
            raise InputError("no training run to roll back to")
        model = self.load_model(run_path)
        self.status.setText(f"Rolled back to run {Path(run_path).stem}")
        return model

    # ================================================================== files
    def save_model(self, path) -> Path:
        if self.model is None:
            raise InputError("no model to save: train or load one first")
        path = self.model.save(path)
        self.status.setText(f"Saved model to {path}")
        return path

    def load_model(self, path) -> Model:
        model = Model.load(path, device="cpu")
        self.model = model
        self.model_image = self.image_names()[0] if self.image_names() else None
        try:
            self._model_input = self._input_image()
        except InputError:
            self._model_input = None
        self.method_combo.setCurrentText(model.method.name)
        self.continue_check.setChecked(True)
        self.status.setText(f"Loaded {model.method.name} model from {path}")
        self._update_buttons()
        return model

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
        if self.control is not None:
            self.control.cancel.set()
        if self.pool is not None:
            self.pool.shutdown()
        for d in self._lazy_dirs:
            _jobs.remove_dir(d)
        self._lazy_dirs.clear()
