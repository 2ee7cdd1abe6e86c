"""The Train dock's form: its widgets, laid out, and read into plain settings.

:class:`TrainForm` builds every widget of the dock into a ``QVBoxLayout`` on the given
parent and connects nothing: the widget (:mod:`._train`) wires the buttons to the session.
:meth:`TrainForm.settings` reads the form into a :class:`~._settings.TrainSettings`;
:meth:`TrainForm.set_layers` and :meth:`TrainForm.set_buttons` apply the decisions of
:mod:`._settings`.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
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

from .. import TrainConfig, list_methods
from ..methods.base import PRESETS
from ._combo import narrow_combo
from ._lossplot import LossPlot
from ._params import ParamsForm
from ._settings import LayerChoices, TrainSettings, checked_images

__all__ = ["WIDGETS", "TrainForm"]

#: The form's widgets, by attribute name (the Train widget exposes each under the same name).
WIDGETS = (
    "image_list", "labels_combo", "method_combo", "method_summary", "params",
    "steps_spin", "minutes_spin", "batch_spin", "crop_spin", "context_spin", "seed_spin", "device_combo", "preset_combo",
    "device_label", "continue_check", "train_button", "predict_button", "stop_button",
    "progress", "status", "loss_plot", "accept_button", "undo_button", "range_from", "range_to",
    "accept_range_button", "samples_spin", "sample_button", "sample_row", "save_button",
    "load_button", "runs_combo", "rollback_button", "export_combo", "export_button", "suggestions",
)


def _spin(lo, hi, value=None, cls=QSpinBox, step=None):
    spin = cls()
    spin.setRange(lo, hi)
    if value is not None:
        spin.setValue(value)
    if step is not None:
        spin.setSingleStep(step)
    return spin


def _button(text, tooltip=None):
    button = QPushButton(text)
    if tooltip:
        button.setToolTip(tooltip)
    return button


def _row(*widgets, stretch=()):
    row = QHBoxLayout()
    for w in widgets:
        if isinstance(w, str):
            w = QLabel(w)
        row.addWidget(w, 1 if any(w is s for s in stretch) else 0)
    return row


def _group(title, layout_cls=QVBoxLayout):
    box = QGroupBox(title)
    return box, layout_cls(box)


class TrainForm:
    """The Train dock's widgets, laid out on ``parent``.

    Parameters
    ----------
    parent : QWidget
        Gets the form's ``QVBoxLayout``.
    suggestions : QWidget
        The suggestion list, placed in the last group.
    runs_tooltip : str
        Tooltip of the training runs list (where they are kept).
    """

    def __init__(self, parent: QWidget, suggestions: QWidget, runs_tooltip: str = ""):
        lay = QVBoxLayout(parent)

        box, form = _group("Data", QFormLayout)
        self.image_list = QListWidget()
        self.image_list.setMaximumHeight(80)
        self.image_list.setToolTip("Checked image layers become the channels of the input")
        form.addRow("Image(s)", self.image_list)
        self.labels_combo = narrow_combo()
        form.addRow("Labels", self.labels_combo)
        lay.addWidget(box)

        box, v = _group("Method")
        self.method_combo = QComboBox()
        self.method_combo.addItems(list_methods())
        v.addWidget(self.method_combo)
        self.method_summary = QLabel()
        self.method_summary.setWordWrap(True)
        v.addWidget(self.method_summary)
        self.params = ParamsForm()
        v.addWidget(self.params)
        lay.addWidget(box)

        box, form = _group("Budget and device", QFormLayout)
        self.steps_spin = _spin(1, 1_000_000, 300)
        form.addRow("Steps", self.steps_spin)
        self.minutes_spin = _spin(0, 10_000, cls=QDoubleSpinBox)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setSpecialValueText("no limit")
        form.addRow("Minutes", self.minutes_spin)
        self.batch_spin = _spin(1, 512, 8)
        form.addRow("Batch size", self.batch_spin)
        self.crop_spin = _spin(16, 1024, 96, step=16)
        form.addRow("Crop", self.crop_spin)
        self.context_spin = _spin(0, 8, TrainConfig.context)  # issue 16: 2.5D slice context
        self.context_spin.setToolTip("Neighbouring slices on each side the network sees with each slice "
                                     "(a continued model keeps its own)")
        form.addRow("Context", self.context_spin)
        self.seed_spin = _spin(0, 2**31 - 1)
        form.addRow("Seed", self.seed_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_label = QLabel()
        form.addRow("Device", _row(self.device_combo, self.device_label, stretch=(self.device_label,)))
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(["auto", *PRESETS])
        self.preset_combo.setToolTip("Model sizes of a new model: cpu (minutes on a laptop), paper "
                                     "(the paper's sizes, for a GPU); auto: paper on CUDA, else cpu. "
                                     "Parameters set below win.")
        form.addRow("Sizes", self.preset_combo)
        self.continue_check = QCheckBox("Continue from current model (unchecked: from scratch)")
        self.continue_check.setChecked(True)
        form.addRow(self.continue_check)
        lay.addWidget(box)

        self.train_button = _button("Train")
        self.predict_button = _button("Predict", "Predict the whole volume with the current model")
        self.stop_button = _button("Stop")
        self.stop_button.setEnabled(False)
        lay.addLayout(_row(self.train_button, self.predict_button, self.stop_button))
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        lay.addWidget(self.progress)
        self.status = QLabel("Idle")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.loss_plot = LossPlot(repaint_ms=None)  # repainted by the progress throttle
        lay.addWidget(self.loss_plot)

        box, v = _group("Correct")
        self.accept_button = _button("Accept slice", "Copy the prediction of the viewed slice into the labels")
        self.undo_button = _button("Undo", "Undo the last edit of the labels layer (also Ctrl+Z)")
        v.addLayout(_row(self.accept_button, self.undo_button))
        self.range_from, self.range_to = QSpinBox(), QSpinBox()
        self.accept_range_button = _button("Accept range")
        v.addLayout(_row("Slices", self.range_from, "to", self.range_to, self.accept_range_button))
        self.samples_spin = _spin(1, 64, 4)
        self.sample_button = _button("Sample tumours on this slice")
        self.sample_row = QWidget()
        self.sample_row.setLayout(_row("Samples", self.samples_spin, self.sample_button))
        v.addWidget(self.sample_row)
        lay.addWidget(box)

        box, v = _group("Model and export")
        self.save_button = _button("Save model...")
        self.load_button = _button("Load model...")
        v.addLayout(_row(self.save_button, self.load_button))
        # Every training run is kept (semiseg.runs); any can be loaded back.
        self.runs_combo = narrow_combo(tooltip=runs_tooltip)
        self.rollback_button = _button("Roll back", "load the chosen run's model (the runs themselves are kept)")
        v.addLayout(_row(self.runs_combo, self.rollback_button, stretch=(self.runs_combo,)))
        self.export_combo = narrow_combo()
        self.export_button = _button("Export mask...")
        v.addLayout(_row(self.export_combo, self.export_button, stretch=(self.export_combo,)))
        lay.addWidget(box)

        # The suggestion list, fed the model and its uncertainty pass after every run.
        box, v = _group("Slices to annotate next")
        self.suggestions = suggestions
        v.addWidget(suggestions)
        lay.addWidget(box)
        lay.addStretch(1)

    # ------------------------------------------------------------------ reading
    def image_names(self) -> list[str]:
        """Names of the checked image layers (the input channels, in list order)."""
        items = (self.image_list.item(i) for i in range(self.image_list.count()))
        return [item.text() for item in items if item.checkState() == Qt.CheckState.Checked]

    def settings(self) -> TrainSettings:
        """The form as plain values."""
        return TrainSettings(
            images=tuple(self.image_names()),
            labels=self.labels_combo.currentText() or None,
            method=self.method_combo.currentText(),
            params=self.params.values(),
            steps=self.steps_spin.value(),
            minutes=self.minutes_spin.value() or None,
            batch_size=self.batch_spin.value(),
            crop=self.crop_spin.value(),
            context=self.context_spin.value(),
            seed=self.seed_spin.value(),
            device=self.device_combo.currentText(),
            preset=self.preset_combo.currentText(),
            continue_model=self.continue_check.isChecked(),
            tta=self.suggestions.tta_check.isChecked(),
        )

    # ------------------------------------------------------------------ applying decisions
    def set_layers(self, choices: LayerChoices) -> None:
        """Offer ``choices``, keeping what was checked or chosen."""
        states = checked_images(choices.images, self.image_names())
        self.image_list.clear()
        for name, on in zip(choices.images, states):
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.image_list.addItem(item)
        for combo, names in ((self.labels_combo, choices.labels), (self.export_combo, choices.export)):
            current = combo.currentText()
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)

    def set_slice_count(self, n_slices: int) -> None:
        """Range of the Accept range spins: the slices of the first input."""
        for spin in (self.range_from, self.range_to):
            spin.setRange(0, max(0, n_slices - 1))

    def set_buttons(self, states: dict[str, bool]) -> None:
        """Apply :func:`~._settings.button_states`."""
        for name, on in states.items():
            if name == "sample_row":
                self.sample_row.setVisible(on)
            else:
                getattr(self, name).setEnabled(on)
