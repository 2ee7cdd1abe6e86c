"""Weak-tag widget: mark the viewed slice healthy / diseased / unknown.

Tags are stored in the chosen labels layer's ``metadata["semiseg_tags"]`` (see
:mod:`semiseg.napari._layers`). Key bindings on the viewer: Shift-H healthy, Shift-D diseased,
Shift-U unknown.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QSize, QTimer, Signal
from qtpy.QtGui import QColor, QPainter
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..data import DISEASED, HEALTHY, UNKNOWN, suggest_tags
from ._combo import narrow_combo
from ._layers import current_slice, get_tags, is_overlay, set_tags

TAG_NAMES = {HEALTHY: "healthy", DISEASED: "diseased", UNKNOWN: "unknown"}
TAG_COLOURS = {HEALTHY: "#2ca02c", DISEASED: "#d62728", UNKNOWN: "#55585f"}
KEYS = {"Shift-H": HEALTHY, "Shift-D": DISEASED, "Shift-U": UNKNOWN}


def annotated_slices(labels) -> np.ndarray:
    """``(Z,)`` bool: slices of a ``(Z, Y, X)`` labels array holding any nonzero label."""
    arr = np.asarray(labels)
    return arr.reshape(arr.shape[0], -1).any(axis=1)


class TagStrip(QWidget):
    """One cell per slice coloured by its tag; a white bar marks annotated slices."""

    clicked = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.tags = np.zeros(0, np.int8)
        self.annotated = np.zeros(0, bool)
        self.current = -1
        self.setMinimumHeight(22)
        self.setToolTip("Slices: green healthy, red diseased, grey unknown; white bar = annotated")

    def sizeHint(self):
        return QSize(200, 22)

    def set_state(self, tags, annotated, current) -> None:
        self.tags, self.annotated, self.current = tags, annotated, current
        self.update()

    def paintEvent(self, event):
        n = len(self.tags)
        p = QPainter(self)
        w, h = self.width(), self.height()
        if n == 0:
            p.end()
            return
        for i in range(n):
            x0, x1 = int(i * w / n), int((i + 1) * w / n)
            p.fillRect(x0, 4, max(1, x1 - x0), h - 4, QColor(TAG_COLOURS[int(self.tags[i])]))
            if self.annotated[i]:
                p.fillRect(x0, 0, max(1, x1 - x0), 4, QColor("white"))
        if 0 <= self.current < n:
            x0, x1 = int(self.current * w / n), int((self.current + 1) * w / n)
            p.setPen(QColor("#ffd700"))
            p.drawRect(x0, 0, max(1, x1 - x0 - 1), h - 1)
        p.end()

    def mousePressEvent(self, event):
        if len(self.tags):
            x = event.position().x() if hasattr(event, "position") else event.x()
            self.clicked.emit(int(np.clip(x * len(self.tags) / max(1, self.width()), 0, len(self.tags) - 1)))


class TagWidget(QWidget):
    """Tag the current slice healthy / diseased / unknown; suggest tags from labels."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        row.addWidget(QLabel("Labels"))
        self.labels_combo = narrow_combo()
        row.addWidget(self.labels_combo, 1)
        lay.addLayout(row)
        self.status = QLabel()
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        row = QHBoxLayout()
        self.buttons = {}
        for key, tag in KEYS.items():
            b = QPushButton(f"{TAG_NAMES[tag].capitalize()} ({key})")
            b.clicked.connect(lambda _=False, t=tag: self.tag_current(t))
            row.addWidget(b)
            self.buttons[tag] = b
        lay.addLayout(row)
        self.strip = TagStrip()
        self.strip.clicked.connect(self.go_to)
        lay.addWidget(self.strip)
        # One line per kind, cut at the dock's edge (counts first, the whole text in the
        # tooltip): a word-wrapped label grows taller than Qt gives it in a narrow dock and
        # its lines were drawn under the strip.
        self.summary = QLabel()
        self.summary.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        lay.addWidget(self.summary)
        self.suggest_button = QPushButton("Suggest tags from labels (painted slices -> diseased)")
        self.suggest_button.clicked.connect(self.suggest)
        lay.addWidget(self.suggest_button)
        # No taller than its content: stacked with the Train dock, an expanding tag dock took
        # the height and left Train one row (docs screenshots, 1000 px window).
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)

        self._annotated_cache: tuple[int, np.ndarray] | None = None
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(100)
        self._refresh_timer.timeout.connect(self.refresh)
        self._watched = None
        self.viewer.layers.events.inserted.connect(self._sync_layers)
        self.viewer.layers.events.removed.connect(self._sync_layers)
        self.viewer.dims.events.current_step.connect(self._schedule)
        self.labels_combo.currentTextChanged.connect(self._on_layer_changed)
        for key, tag in KEYS.items():
            try:
                self.viewer.bind_key(key, lambda v, t=tag: self.tag_current(t), overwrite=True)
            except (ValueError, TypeError):  # pragma: no cover - key taken
                pass
        self._sync_layers()

    # ------------------------------------------------------------------ layers
    def _labels_layers(self):
        from napari.layers import Labels

        return [ly for ly in self.viewer.layers if isinstance(ly, Labels) and not is_overlay(ly)]

    def _sync_layers(self, event=None):
        names = [ly.name for ly in self._labels_layers()]
        current = self.labels_combo.currentText()
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(names)
        if current in names:
            self.labels_combo.setCurrentText(current)
        self.labels_combo.blockSignals(False)
        self._on_layer_changed()

    def _on_layer_changed(self, *args):
        if self._watched is not None and self._watched is self.labels_layer:
            return  # another layer was added or removed: nothing to re-read (issue 20 item 4)
        if self._watched is not None:
            try:
                self._watched.events.paint.disconnect(self._labels_changed)
                self._watched.events.data.disconnect(self._labels_changed)
                self._watched.events.metadata.disconnect(self._schedule)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._watched = self.labels_layer
        if self._watched is not None:
            # paint also comes after the Train dock's Undo (_layers.undo_edit); metadata
            # when another widget sets the tags.
            self._watched.events.paint.connect(self._labels_changed)
            self._watched.events.data.connect(self._labels_changed)
            self._watched.events.metadata.connect(self._schedule)
        self._labels_changed()

    def _labels_changed(self, event=None):
        self._annotated_cache = None
        self._schedule()

    def _schedule(self, event=None):
        self._refresh_timer.start()

    @property
    def labels_layer(self):
        name = self.labels_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    # ------------------------------------------------------------------ actions
    def current_index(self) -> int | None:
        layer = self.labels_layer
        return None if layer is None else current_slice(self.viewer, layer)

    def tag_current(self, tag: int) -> None:
        """Tag the viewed slice of the chosen labels layer."""
        layer = self.labels_layer
        if layer is None:
            return
        tags = get_tags(layer)
        tags[self.current_index()] = tag
        set_tags(layer, tags)
        self.refresh()

    def suggest(self) -> None:
        """Painted slices become diseased; other tags are kept."""
        layer = self.labels_layer
        if layer is None:
            return
        set_tags(layer, suggest_tags(np.asarray(layer.data), get_tags(layer)))
        self.refresh()

    def go_to(self, index: int) -> None:
        layer = self.labels_layer
        if layer is None:
            return
        world = layer.data_to_world([index] + [0] * (layer.ndim - 1))
        axis = self.viewer.dims.ndim - layer.ndim
        self.viewer.dims.set_point(axis, world[0])

    def refresh(self) -> None:
        layer = self.labels_layer
        if layer is None:
            self.status.setText("Add or open a labels layer to tag its slices.")
            self.strip.set_state(np.zeros(0, np.int8), np.zeros(0, bool), -1)
            self.summary.setText("")
            return
        if self._annotated_cache is None:
            self._annotated_cache = annotated_slices(layer.data)
        annotated = self._annotated_cache
        tags = get_tags(layer)
        i = self.current_index()
        state = TAG_NAMES[int(tags[i])] + (", annotated" if annotated[i] else "")
        self.status.setText(f"Slice {i}: {state}")
        self.strip.set_state(tags, annotated, i)

        def listing(mask):
            idx = np.flatnonzero(mask)
            text = ", ".join(map(str, idx[:20])) + (" ..." if len(idx) > 20 else "")
            return f"{len(idx)} [{text}]"

        self.summary.setText(
            f"annotated {listing(annotated)}\nhealthy {listing(tags == HEALTHY)}\n"
            f"diseased {listing(tags == DISEASED)}"
        )
        self.summary.setToolTip(self.summary.text())
