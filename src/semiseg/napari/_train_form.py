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
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

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
    "device_label", "continue_check", "model_label", "refine_check", "train_button", "predict_button", "stop_button",
    "progress", "status", "loss_plot", "accept_button", "undo_button", "range_from", "range_to",
    "accept_range_button", "overwrite_check", "samples_spin", "sample_button", "sample_row", "save_button",
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


def _section(title, layout_cls=QVBoxLayout, *, expanded=True):
    """A collapsible section (superqt's ``QCollapsible``) and the layout of its content."""
    box = QCollapsible(title)
    box.setDuration(0)  # no animation: software rendering repaints every frame of it
    content = QWidget()
    layout = layout_cls(content)
    layout.setContentsMargins(4, 0, 0, 0)
    box.addWidget(content)
    if expanded:
        box.expand(animate=False)
    else:
        box.collapse(animate=False)
    return box, layout


#: Sections of the dock shown only once there is a model (nothing to correct or rank before).
MODEL_SECTIONS = ("correct_box", "suggestions_box")


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
        # The form scrolls inside the dock and its sections collapse, so that it fits a
        # 900 px-high screen (issue 20 item 2): the parameters and the model/export section
        # start collapsed, Correct and the suggestions appear once there is a model.
        outer = QVBoxLayout(parent)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.body = QWidget()
        self.scroll.setWidget(self.body)
        outer.addWidget(self.scroll)
        lay = QVBoxLayout(self.body)

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
        self.params_box, pv = _section("Parameters", expanded=False)
        pv.addWidget(self.params)
        v.addWidget(self.params_box)
        lay.addWidget(box)

        box, form = _section("Budget and device", QFormLayout)
        self.budget_box = box
        self.steps_spin = _spin(1, 1_000_000, 300)
        form.addRow("Steps", self.steps_spin)
        self.minutes_spin = _spin(0, 10_000, cls=QDoubleSpinBox)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setSpecialValueText("no limit")
        form.addRow("Minutes", self.minutes_spin)
        self.batch_spin = _spin(1, 512, 8)
        form.addRow("Batch size", self.batch_spin)
        self.crop_spin = _spin(0, 1024, 0, step=16)
        self.crop_spin.setSpecialValueText("auto")  # 0: chosen from the volume (engine.auto_crop)
        self.crop_spin.setToolTip("Side of the training crops and prediction windows; auto: the slice's "
                                  "smaller side up to 160 on a GPU; on the CPU 96-160, less for costlier methods "
                                  "(a continued model keeps its own)")
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
        self.continue_check = QCheckBox("Continue from current model")
        self.continue_check.setToolTip("Train the current model on (its own method only); unchecked: from scratch")
        self.continue_check.setChecked(True)
        # What "current model" is, beside the checkbox (issue 20 item 1).
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        form.addRow(_row(self.continue_check, self.model_label, stretch=(self.model_label,)))
        # Shown when a semi-supervised method is chosen after a run of another method.
        self.refine_check = QCheckBox()
        self.refine_check.setToolTip("Start the chosen method from the current model's segmentation weights")
        self.refine_check.setVisible(False)
        form.addRow(self.refine_check)
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
        self.correct_box = box
        self.accept_button = _button("Accept slice", "Copy the prediction of the viewed slice into the labels")
        self.undo_button = _button("Undo", "Undo the last edit of the labels layer (also Ctrl+Z)")
        v.addLayout(_row(self.accept_button, self.undo_button))
        self.range_from, self.range_to = QSpinBox(), QSpinBox()
        self.accept_range_button = _button("Accept range")
        v.addLayout(_row("Slices", self.range_from, "to", self.range_to, self.accept_range_button))
        # Accept never replaces what the user painted unless this is ticked (issue 20 item 6).
        self.overwrite_check = QCheckBox("Overwrite painted slices")
        self.overwrite_check.setToolTip("Unticked, Accept skips slices that already hold labels")
        v.addWidget(self.overwrite_check)
        self.samples_spin = _spin(1, 64, 4)
        self.sample_button = _button("Sample tumours on this slice")
        self.sample_row = QWidget()
        self.sample_row.setLayout(_row("Samples", self.samples_spin, self.sample_button))
        v.addWidget(self.sample_row)
        lay.addWidget(box)

        box, v = _section("Model and export", expanded=False)
        self.model_box = box
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
        self.suggestions_box = box
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
            crop=self.crop_spin.value() or None,
            context=self.context_spin.value(),
            seed=self.seed_spin.value(),
            device=self.device_combo.currentText(),
            preset=self.preset_combo.currentText(),
            continue_model=self.continue_check.isChecked() and self.continue_check.isEnabled(),
            refine=self.refine_check.isChecked() and not self.refine_check.isHidden(),
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

    def set_offer(self, offer) -> None:
        """Apply :func:`~._settings.continue_offer`: the current model's line, Continue only
        for its own method (unticked otherwise, re-ticked when it is chosen again), and the
        explicit refine offer."""
        self.model_label.setText(offer.model_text)
        if not offer.can_continue and self.continue_check.isChecked():
            self.continue_check.setChecked(False)
            self._continue_was_on = True
        elif offer.can_continue and getattr(self, "_continue_was_on", False):
            self.continue_check.setChecked(True)
            self._continue_was_on = False
        if offer.refine is None:
            self.refine_check.setChecked(False)
        else:
            self.refine_check.setText(offer.refine)
        self.refine_check.setVisible(offer.refine is not None)

    def set_buttons(self, states: dict[str, bool]) -> None:
        """Apply :func:`~._settings.button_states`."""
        for name, on in states.items():
            if name == "sample_row" or name in MODEL_SECTIONS:
                getattr(self, name).setVisible(on)
            else:
                getattr(self, name).setEnabled(on)
