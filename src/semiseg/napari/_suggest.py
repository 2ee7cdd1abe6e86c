"""Suggestion list widget: which slice to label next, computed from a trained model.

:class:`SuggestionList` is embedded by the Train widget (or docked on its own): after training,
``set_model(model, image_layer, labels_layer)`` runs the uncertainty pass as a job of
:mod:`._jobs` (:class:`~._jobs.UncertaintyJob`, :func:`semiseg.suggest.iter_uncertainty`)
in a worker thread, shows ``"<image> uncertainty"`` as an Image layer (updated in place on the
next run) and lists the best unannotated slices; clicking one moves the viewer there. Painting
labels or tagging a slice healthy re-ranks at once without recomputing (the model did not
change); *Refresh* recomputes, e.g. with test-time augmentation switched on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
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

from ..suggest import Suggestion, UncertaintyResult, suggest_slices
from . import _jobs
from ._layers import get_tags, upsert

__all__ = ["SuggestionList"]


def _layer_data(layer):
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


#: A slice whose thumbnail has less than this share of cells above the volume's background
#: is "nearly empty" (the edge slices of a head MRI): suggested only when nothing else is.
EMPTY_SHARE = 0.05
#: Such slices keep this share of their score: ranked after every other slice, in order.
EMPTY_WEIGHT = 1e-6


def near_empty_slices(descriptors) -> np.ndarray | None:
    """``(n_slices,)`` bool: slices with almost no content, from the uncertainty pass's
    thumbnails (:attr:`semiseg.suggest.UncertaintyResult.descriptors`; no image read).

    Background is the volume's lowest thumbnail values: a cell counts as content when it is
    above ``lo + 0.15 (hi - lo)`` (1st and 99th percentiles of all cells). None without
    thumbnails.
    """
    if descriptors is None:
        return None
    d = np.asarray(descriptors, np.float64)
    if d.ndim != 2 or d.size == 0:
        return None
    lo, hi = np.percentile(d, [1, 99])
    if not hi > lo:
        return np.zeros(len(d), bool)
    content = (d > lo + 0.15 * (hi - lo)).mean(axis=1)
    return content < EMPTY_SHARE


def relative_words(score: float, top: float) -> str:
    """A suggestion's score in words, relative to the best one (raw scores mean nothing to
    a reader): ``"most uncertain"``, ``"80% as uncertain"``, ..."""
    if top <= 0 or score >= top:
        return "most uncertain"
    return f"{max(1, round(100 * score / top))}% as uncertain"


class SuggestionList(QWidget):
    """List of the unannotated slices most worth labelling next, best first.

    Parameters
    ----------
    viewer : napari.Viewer

    Attributes
    ----------
    suggestions : list of Suggestion
        The current list (empty before the first result).
    result : UncertaintyResult or None
        The last finished uncertainty pass.

    Signals
    -------
    updated
        Emitted whenever the list is refilled (after a computation or a re-ranking).
    failed(str)
        Emitted with the message when a computation fails.
    """

    updated = Signal()
    failed = Signal(str)

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.model = None
        self.image_layer = None
        self.labels_layer = None
        self.result: UncertaintyResult | None = None
        self.suggestions: list[Suggestion] = []
        self._worker = None
        self._generation = 0
        # Worker signals can arrive after Qt deleted this widget: a flag outside the widget
        # lets their callbacks check it without touching deleted Qt objects.
        self._alive = alive = [True]
        self.destroyed.connect(lambda *_: alive.__setitem__(0, False))

        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 50)
        self.n_spin.setValue(3)
        self.n_spin.setToolTip("Number of suggested slices")
        self.tta_check = QCheckBox("TTA")
        self.tta_check.setToolTip("Test-time augmentation: average 8 flips/rotations (8x slower)")
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Recompute the uncertainty with the current model")
        self.refresh_button.setEnabled(False)
        top = QHBoxLayout()
        top.addWidget(QLabel("Label next:"))
        top.addWidget(self.n_spin)
        top.addWidget(self.tta_check)
        top.addStretch(1)
        top.addWidget(self.refresh_button)

        self.list = QListWidget()
        self.list.setToolTip("Click a slice to go there")
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.status = QLabel("Train a model to get suggestions.")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.list)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

        self._rerank_timer = QTimer(self)
        self._rerank_timer.setSingleShot(True)
        self._rerank_timer.setInterval(200)
        self._rerank_timer.timeout.connect(self.rerank)
        self.n_spin.valueChanged.connect(lambda *_: self.rerank())
        self.tta_check.toggled.connect(lambda *_: self.refresh())
        self.refresh_button.clicked.connect(lambda *_: self.refresh())
        self.list.itemClicked.connect(self._on_item)
        self.list.itemActivated.connect(self._on_item)

    # ------------------------------------------------------------------ inputs
    def set_model(self, model, image_layer, labels_layer) -> None:
        """Use ``model`` on ``image_layer`` with the annotations of ``labels_layer``; starts
        the uncertainty computation."""
        self._watch(labels_layer)
        self.model = model
        self.image_layer = image_layer
        self.result = None
        self.refresh_button.setEnabled(model is not None)
        self.refresh()

    def set_result(self, model, image_layer, labels_layer, result: UncertaintyResult) -> None:
        """Like :meth:`set_model`, with an uncertainty pass already computed elsewhere (the
        Train widget's worker); nothing is recomputed here."""
        self._watch(labels_layer)
        self._stop_worker()
        self._generation += 1
        self.model = model
        self.image_layer = image_layer
        self.refresh_button.setEnabled(model is not None)
        self._on_result(result, self._generation)

    def _watch(self, labels_layer) -> None:
        if self.labels_layer is labels_layer:
            return
        if self.labels_layer is not None:
            ev_ = self.labels_layer.events
            for ev in (ev_.paint, ev_.data, ev_.metadata):
                try:
                    ev.disconnect(self._labels_changed)
                except (TypeError, ValueError, RuntimeError):
                    pass
        self.labels_layer = labels_layer
        if labels_layer is not None:
            # Painting, Undo (the Train dock's, through _layers.undo_edit) and tagging (tags
            # live in the metadata) re-rank the list.
            labels_layer.events.paint.connect(self._labels_changed)
            labels_layer.events.data.connect(self._labels_changed)
            labels_layer.events.metadata.connect(self._labels_changed)

    def _labels_changed(self, event=None) -> None:
        if self.result is not None:
            self._rerank_timer.start()

    # ------------------------------------------------------------------ computing
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def refresh(self) -> None:
        """(Re)compute the uncertainty in a worker thread; a running computation is dropped."""
        if self.model is None or self.image_layer is None:
            return
        self._stop_worker()
        self._generation += 1
        gen_id = self._generation
        job = _jobs.UncertaintyJob(_layer_data(self.image_layer), tta=self.tta_check.isChecked())
        worker = create_worker(
            _jobs.iter_job, job, _jobs.JobControl(), self.model,
            _start_thread=False, _ignore_errors=True,  # errors go to _on_error, not the console
        )
        alive = self._alive
        worker.yielded.connect(lambda p, g=gen_id: alive[0] and self._on_progress(p, g))
        worker.returned.connect(lambda r, g=gen_id: alive[0] and self._on_result(r, g))
        worker.errored.connect(lambda e, g=gen_id: alive[0] and self._on_error(e, g))
        worker.finished.connect(lambda g=gen_id: alive[0] and self._on_finished(g))
        self._worker = worker
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.status.setText("Computing uncertainty...")
        worker.start()

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._worker = None

    def _on_progress(self, p, gen_id) -> None:
        if gen_id == self._generation and p.total:
            self.progress.setMaximum(p.total)
            self.progress.setValue(p.step)

    def _on_finished(self, gen_id) -> None:
        if gen_id == self._generation:
            self._worker = None
            self.progress.setVisible(False)

    def _on_error(self, exc, gen_id) -> None:
        if gen_id != self._generation:
            return
        msg = f"Suggestions failed: {exc}"
        self.status.setText(msg)
        self.failed.emit(str(exc))

    def _on_result(self, result: UncertaintyResult, gen_id) -> None:
        if gen_id != self._generation or self.image_layer is None:
            return
        self.result = result
        u = result.uncertainty
        if result.peak is not None:
            top = result.peak
        else:  # computed here from numpy; a lazy map is never read whole just for its range
            u = np.asarray(u)
            top = float(u.max()) if u.size else 0.0
        # Hidden and translucent: shown on top (additive) it washed out the prediction the
        # user wants to see after a run (issue 20 item 3); the user shows it when needed.
        self.uncertainty_layer = upsert(
            self.viewer, f"{self.image_layer.name} uncertainty", u, "image", like=self.image_layer,
            colormap="magma", blending="translucent", opacity=0.5, visible=False,
            contrast_limits=(0.0, max(top, 1e-6)),
        )
        self.uncertainty_layer.contrast_limits = (0.0, max(top, 1e-6))
        self.rerank()

    # ------------------------------------------------------------------ ranking
    def rerank(self) -> None:
        """Refill the list from the last uncertainty pass and the current annotations."""
        if self.result is None or self.labels_layer is None:
            return
        labels = np.asarray(_layer_data(self.labels_layer))
        tags = get_tags(self.labels_layer) if self.result.axis == 0 else None
        result = self.result
        empty = near_empty_slices(result.descriptors)
        if empty is not None and empty.any() and not empty.all():
            # Nearly empty slices come last: suggested only when nothing else is left.
            mass = np.where(empty, np.asarray(result.mass, np.float64) * EMPTY_WEIGHT, result.mass)
            result = dataclasses.replace(result, mass=mass)
        try:
            found = suggest_slices(self.model, None, labels, n=self.n_spin.value(), tags=tags, result=result)
        except ValueError as exc:  # InputError included: labels no longer fit the image
            self.status.setText(f"Suggestions unavailable: {exc}")
            return
        self.suggestions = found
        self.list.clear()
        top = max((s.mass for s in found), default=0.0)
        for s in found:
            text = f"slice {s.index} · {relative_words(s.mass, top)}"
            if empty is not None and empty[s.index]:
                text += " (nearly empty)"
            item = QListWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, s.index)
            item.setToolTip(f"score {s.score:.4g}; uncertainty mass {s.mass:.4g} before the diversity penalty")
            self.list.addItem(item)
        if found:
            self.status.setText(f"Label these slices next (best first); {self._method_note()}.")
        else:
            self.status.setText("Every slice is annotated: nothing to suggest.")
        self.updated.emit()

    def _method_note(self) -> str:
        from ..methods.base import Method

        m = self.model.method
        kind = "predictive entropy" if type(m).uncertainty is Method.uncertainty else f"{m.name} uncertainty"
        return kind + (" with TTA" if self.tta_check.isChecked() else "")

    # ------------------------------------------------------------------ navigation
    def _on_item(self, item) -> None:
        self.go_to(int(item.data(Qt.ItemDataRole.UserRole)))

    def go_to(self, index: int) -> None:
        """Show slice ``index`` (along the model's slicing axis) of the image layer."""
        layer = self.image_layer
        if layer is None:
            return
        axis = self.result.axis if self.result is not None else self.model.axis
        spatial = min(layer.ndim, 3)
        data_axis = layer.ndim - spatial + axis
        viewer_axis = self.viewer.dims.ndim - layer.ndim + data_axis
        if np.allclose(layer.scale[data_axis], 1) and np.allclose(layer.translate[data_axis], 0):
            self.viewer.dims.set_current_step(viewer_axis, int(index))
        else:  # scaled or shifted layer: go through world coordinates
            point = np.zeros(layer.ndim)
            point[data_axis] = index
            world = layer.data_to_world(point)
            self.viewer.dims.set_point(viewer_axis, float(world[data_axis]))

    def closeEvent(self, event) -> None:
        self._generation += 1  # results of a dropped computation are ignored
        self._stop_worker()
        self._watch(None)
        super().closeEvent(event)
