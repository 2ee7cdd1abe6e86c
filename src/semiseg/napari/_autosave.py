"""Autosave dock widget: keeps a labels layer and its weak tags safe on disk while you paint.

Saving happens in a background thread (:class:`semiseg.autosave.Autosaver`): painting never
waits for the disk. The store goes beside the image file (``<image>.semiseg-autosave.zarr``) or
into the folder chosen here. A store left by an earlier session is never overwritten: it is
kept beside the new one (``.kept-<time>``) and offered by Restore.
"""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..autosave import Autosaver, default_store_path, find_autosave, image_identity, restore
from ..data import InputError
from ._combo import narrow_combo
from ._layers import get_tags, is_layer_type, is_overlay, set_tags


def changed_slices(atoms) -> list[int] | None:
    """Axis-0 slices touched by a labels layer's paint-event history atoms (None: unknown)."""
    out: set[int] = set()
    try:
        for atom in atoms:
            key = getattr(atom, "slice_key", None)
            if key is not None:
                first = key[0]
                if isinstance(first, slice):
                    if first.start is None or first.stop is None:
                        return None
                    out.update(range(first.start, first.stop))
                else:
                    out.add(int(first))
                continue
            indices = atom[0]
            out.update(int(i) for i in np.unique(np.asarray(indices[0])))
    except Exception:
        return None
    return sorted(out)


def image_path_of(layer) -> str | None:
    """The file a layer was opened from, when napari knows it."""
    src = getattr(layer, "source", None)
    path = getattr(src, "path", None)
    return str(path) if path else None


class AutosaveWidget(QWidget):
    """Dock widget: labels layer, autosave folder, status line and Restore.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    debounce, interval : float
        See :class:`~semiseg.autosave.Autosaver`.
    poll_ms : int
        How often small labels and the weak tags are checked for edits that napari reports
        without a paint event (undo, redo, scripts, the tag widget).
    """

    _saved = Signal(str)
    _failed = Signal(str)

    def __init__(self, napari_viewer, *, debounce: float = 2.0, interval: float = 60.0, poll_ms: int = 3000):
        super().__init__()
        self.viewer = napari_viewer
        self.debounce, self.interval = debounce, interval
        self.saver: Autosaver | None = None
        self.layer = None
        self._crc = None
        self._tags = None
        self._found = None

        self.labels_box = narrow_combo()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("beside the image file")
        self.folder.setToolTip("Autosave folder; empty = beside the image file")
        browse = QPushButton("…")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._browse)
        self.status = QLabel("autosave: no labels layer")
        self.status.setWordWrap(True)
        self.restore_btn = QPushButton("Restore")
        self.restore_btn.setToolTip("Load the latest autosave of this image")
        self.restore_btn.clicked.connect(self.restore)
        save_btn = QPushButton("Save now")
        save_btn.clicked.connect(self.save_now)

        row = QHBoxLayout()
        row.addWidget(self.folder)
        row.addWidget(browse)
        buttons = QHBoxLayout()
        buttons.addWidget(save_btn)
        buttons.addWidget(self.restore_btn)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Labels layer"))
        lay.addWidget(self.labels_box)
        lay.addWidget(QLabel("Autosave folder"))
        lay.addLayout(row)
        lay.addWidget(self.status)
        lay.addLayout(buttons)
        lay.addStretch()

        self._saved.connect(self._on_saved)
        self._failed.connect(self._on_failed)
        self.labels_box.currentIndexChanged.connect(lambda *_: self.attach())
        self.folder.editingFinished.connect(self.attach)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._timer = QTimer(self)
        self._timer.setInterval(int(poll_ms))
        self._timer.timeout.connect(self.poll)
        self._timer.start()
        self.destroyed.connect(lambda *_: self.close_saver())
        self._refresh_layers()

    # ------------------------------------------------------------------ layers
    def _labels_layers(self):
        return [ly for ly in self.viewer.layers if is_layer_type(ly, "labels") and not is_overlay(ly)]

    def _refresh_layers(self, *_):
        names = [ly.name for ly in self._labels_layers()]
        current = self.labels_box.currentText()
        self.labels_box.blockSignals(True)
        self.labels_box.clear()
        self.labels_box.addItems(names)
        if current in names:
            self.labels_box.setCurrentText(current)
        self.labels_box.blockSignals(False)
        chosen = self.labels_box.currentText() or None
        if (self.layer is None and chosen) or (self.layer is not None and self.layer.name != chosen):
            self.attach()

    def image_for(self, labels_layer):
        """The image layer the labels belong to: same spatial shape, not an overlay."""
        shape = tuple(labels_layer.data.shape)
        for ly in self.viewer.layers:
            if is_layer_type(ly, "image") and not is_overlay(ly) and tuple(ly.data.shape[-len(shape):]) == shape:
                return ly
        return None

    def _folder(self):
        text = self.folder.text().strip()
        return Path(text).expanduser() if text else None

    def _browse(self):
        d = QFileDialog.getExistingDirectory(self, "Autosave folder", self.folder.text() or str(Path.home()))
        if d:
            self.folder.setText(d)
            self.attach()

    # ------------------------------------------------------------------ saving
    def close_saver(self) -> None:
        if self.layer is not None:
            for ev, cb in ((self.layer.events.paint, self._on_paint), (self.layer.events.data, self._on_data)):
                try:
                    ev.disconnect(cb)
                except Exception:
                    pass
        if self.saver is not None:
            self.saver.close(timeout=30)
        self.saver = None

    def attach(self, *_):
        """(Re)connect to the chosen labels layer and folder."""
        self.close_saver()
        name = self.labels_box.currentText()
        self.layer = self.viewer.layers[name] if name in self.viewer.layers else None
        self._found = None
        if self.layer is None:
            self.status.setText("autosave: no labels layer")
            return
        image = self.image_for(self.layer)
        src = image if image is not None else self.layer
        identity = image_identity(src.data, image_path_of(src))
        folder = self._folder()
        try:
            store = default_store_path(identity, folder)
        except InputError as exc:
            self.status.setText(f"autosave off: {exc}")
            return
        self.saver = Autosaver(
            store, identity, debounce=self.debounce, interval=self.interval,
            on_saved=self._saved.emit, on_error=self._failed.emit,
        )
        self.identity = identity
        self.layer.events.paint.connect(self._on_paint)
        self.layer.events.data.connect(self._on_data)
        self._crc = self._checksum()
        self._tags = get_tags(self.layer).copy()
        self._found = find_autosave(identity, folder)
        if self._found is not None:
            self.status.setText(f"autosave from {self._found.saved_at.replace('T', ' ')[:19]} found: Restore loads it")
        else:
            self.status.setText(f"autosave on: {store}")

    def _checksum(self):
        data = self.layer.data
        if not isinstance(data, np.ndarray) or data.nbytes > self.saver.small_bytes:
            return None
        return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).ravel())

    def _submit(self, changed=None):
        if self.saver is None or self.layer is None:
            return
        data = self.layer.data
        if not isinstance(data, np.ndarray):
            data = np.asarray(data)
        tags = get_tags(self.layer)
        self._tags = tags.copy()
        self.saver.submit(data, tags, changed=changed)
        self._crc = self._checksum()

    def _on_paint(self, event):
        self._submit(changed_slices(getattr(event, "value", None) or []))

    def _on_data(self, event=None):
        self._submit(None)

    def poll(self):
        """Catch edits without a paint event (undo, redo, tag changes)."""
        if self.saver is None or self.layer is None:
            return
        crc = self._checksum()
        if crc is not None and crc != self._crc:
            self._submit(None)
            return
        tags = get_tags(self.layer)
        if self._tags is None or not np.array_equal(tags, self._tags):
            self._tags = tags.copy()
            self.saver.submit_tags(tags)

    def save_now(self) -> bool:
        """Queue the current labels and wait for the write (True when written)."""
        if self.saver is None:
            return False
        self._submit(None)
        return self.saver.flush(timeout=30)

    def _on_saved(self, when: str):
        self.status.setText(f"saved {when.split('T')[-1][:8]}")

    def _on_failed(self, message: str):
        self.status.setText(f"autosave FAILED: {message}")

    # ------------------------------------------------------------------ restoring
    def restore(self):
        """Load the latest autosave of the image into the labels layer.

        When the layer already holds labels, the autosave goes into a new layer instead so
        nothing on screen is overwritten.
        """
        if self.layer is None:
            return None
        # Never search while the writer swaps stores (a save in progress).
        hold = self.saver.between_writes() if self.saver is not None else contextlib.nullcontext()
        with hold:
            found = find_autosave(self.identity, self._folder())
            if found is None:
                self.status.setText("no autosave found for this image")
                return None
            try:
                labels, tags, meta = restore(found.path)
            except InputError as exc:
                self.status.setText(f"cannot restore: {exc}")
                return None
        if labels.shape != tuple(self.layer.data.shape):
            self.status.setText(f"autosave has shape {labels.shape}, the labels layer {self.layer.data.shape}")
            return None
        when = meta.get("saved_at", "").replace("T", " ")[:19]
        if np.asarray(self.layer.data).any():
            target = self.viewer.add_labels(labels, name=f"{self.layer.name} (autosave {when})",
                                            scale=self.layer.scale, translate=self.layer.translate)
        else:
            target = self.layer
            target.data = labels
        if tags is not None and len(tags) == labels.shape[0]:
            set_tags(target, tags)
        self.status.setText(f"restored autosave from {when} into {target.name!r}")
        return target
