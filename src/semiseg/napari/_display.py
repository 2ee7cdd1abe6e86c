"""Showing a job in the viewer: staged layer display, throttled progress, overlay layers.

Qt lives here and in the widgets only. Adding a layer costs napari ~150 ms with software
rendering, so a finished run is shown as a queue of small GUI steps, one per event-loop turn
(:class:`StagedDisplay`); progress records are shown at most every ``UI_REFRESH_MS``
(:class:`ProgressThrottle`). The layer functions add or update the overlays named after the
image (``"<image> prediction"``, ...) and never touch the user's labels.
"""

from __future__ import annotations

import contextlib
import gc
from collections import deque
from collections.abc import Callable

import numpy as np
from qtpy.QtCore import QTimer

from ._layers import upsert

#: Pause between the GUI-thread steps that show a finished run (adding a layer costs napari
#: ~150 ms with software rendering; one per event-loop turn keeps each freeze short).
DISPLAY_STEP_MS = 10
#: Progress bar, status line and loss plot are refreshed together at most this often: with
#: software rendering every repaint of the window costs ~15-20 ms, whatever changed.
UI_REFRESH_MS = 500


@contextlib.contextmanager
def gc_paused():
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


_frozen = False


def freeze_startup_objects() -> bool:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``).

    A viewer process holds millions of objects once napari, Qt bindings and torch are
    imported; each full collection traverses all of them (~200 ms here), and full collections
    recur as a long session allocates. Frozen, the objects of the start-up are no longer
    traversed, so the collections that recur are short. Done once per process (the first
    Train dock); returns whether it was done now.
    """
    global _frozen
    if _frozen:
        return False
    gc.collect()  # the start-up's garbage first: frozen objects are never freed
    gc.freeze()
    _frozen = True
    return True


class StagedDisplay:
    """Runs queued callables on the GUI thread, one per event-loop turn, in order.

    Parameters
    ----------
    parent : QObject
        Owner of the timer.
    on_error : callable
        Called with the exception of a step that failed; the later steps still run.
    step_ms : int
        Pause between two steps.
    """

    def __init__(self, parent, on_error: Callable[[Exception], None], step_ms: int = DISPLAY_STEP_MS):
        self._steps: deque = deque()
        self._on_error = on_error
        self._timer = QTimer(parent)
        self._timer.setSingleShot(True)
        self._timer.setInterval(step_ms)
        self._timer.timeout.connect(self._next)

    @property
    def pending(self) -> bool:
        return bool(self._steps)

    def queue(self, *steps: Callable[[], None]) -> None:
        self._steps.extend(steps)
        if not self._timer.isActive():
            self._timer.start()

    def _next(self) -> None:
        if not self._steps:
            return
        step = self._steps.popleft()
        try:
            with gc_paused():
                step()
        except Exception as exc:  # a layer that cannot be shown must not drop the others
            self._on_error(exc)
        if self._steps:
            self._timer.start()


class ProgressThrottle:
    """Keeps the newest record and shows it at most every ``interval_ms``.

    ``push(p)`` shows the first record at once, later ones when the timer fires; ``flush()``
    shows the newest pending record now. ``show(p)`` does the drawing; the timer stops once
    nothing is pending and ``running()`` is False.
    """

    def __init__(self, parent, show: Callable, running: Callable[[], bool], interval_ms: int = UI_REFRESH_MS):
        self._show = show
        self._running = running
        self._latest = None
        self._timer = QTimer(parent)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)

    def push(self, p, *, now: bool = False) -> None:
        self._latest = p
        if now:
            self.flush()
        elif not self._timer.isActive():
            self.flush()  # the first record at once, then at most every interval
            self._timer.start()

    def flush(self) -> None:
        p, self._latest = self._latest, None
        if p is not None:
            self._show(p)

    def _tick(self) -> None:
        if self._latest is None and not self._running():
            self._timer.stop()
            return
        self.flush()

    def stop(self) -> None:
        self.flush()
        self._timer.stop()


def show_progress(bar, status, loss_plot, p) -> None:
    """Show one Progress record: progress bar, status line (training), loss plot repaint."""
    # QProgressBar.setValue repaints synchronously; with updates disabled it only marks
    # itself dirty, so everything below is drawn in one paint event.
    bar.setUpdatesEnabled(False)
    try:
        if p.phase != "train":
            fmt = "uncertainty %v/%m slices" if p.phase == "uncertainty" else "predicting %v/%m slices"
            if bar.format() != fmt:
                bar.setFormat(fmt)
            bar.setRange(0, max(1, p.total or 1))
            bar.setValue(p.step)
            return
        if p.total:
            bar.setRange(0, p.total)
        bar.setValue(min(p.step, p.total or p.step))
    finally:
        bar.setUpdatesEnabled(True)
    if p.losses:
        text = ", ".join(f"{k} {v:.3f}" for k, v in p.losses.items())
        status.setText(f"step {p.step}/{p.total} · {p.elapsed:.0f} s · {text}")
    loss_plot.flush()


def show_idle(bar, text: str) -> None:
    """The progress bar once a job is over: full with ``text`` ("done"), or empty ("failed").

    Without this it kept the last record's format ("uncertainty 95/95 slices", or
    "training 0/20" after an error).
    """
    bar.setRange(0, 1)
    bar.setValue(1 if text == "done" else 0)
    bar.setFormat(text)


# ----------------------------------------------------------------------------- layers
def _like(viewer, name):
    return viewer.layers[name] if name in viewer.layers else None


def show_preview(viewer, image_name: str, preview: np.ndarray, index: int):
    """The preview of slice ``index`` as the one-slice labels layer ``"<image> preview"``."""
    layer = upsert(
        viewer,
        f"{image_name} preview",
        np.asarray(preview)[None],
        "labels",
        like=_like(viewer, image_name),
        translate_offset=(index, 0, 0),
        opacity=0.6,
    )
    layer.visible = True
    return layer


def show_samples(viewer, image_name: str, samples: np.ndarray, index: int):
    """``(n, [C,] Y, X)`` samples as ``"<image> sampled tumours"`` (slider: sample) at slice ``index``."""
    if samples.ndim == 4 and samples.shape[1] == 1:
        samples = samples[:, 0]
    data = samples[..., None, :, :]  # sample axis, then a one-slice Z axis at ``index``
    offset = (0,) * (data.ndim - 3) + (index, 0, 0)
    layer = upsert(viewer, f"{image_name} sampled tumours", data, "image", like=_like(viewer, image_name),
                   translate_offset=offset)
    # napari labels a new leading axis by its negative index ("-4"): say what its slider is.
    labels = list(viewer.dims.axis_labels)
    first = viewer.dims.ndim - data.ndim
    if labels and labels[first] in (str(first - viewer.dims.ndim), str(first)):
        labels[first] = "sample"
        viewer.dims.axis_labels = labels
    return layer


def difference_limits(data, *, percentile: float = 99.5, max_values: int = 2_000_000) -> tuple[float, float]:
    """Colour limits ``(-m, m)`` symmetric around zero for a difference image (a residual):
    ``m`` is the ``percentile`` of ``|data|``, so zero sits in the diverging colormap's neutral
    middle and one outlier pixel does not wash the rest out.

    ``data`` may be lazy (dask, zarr): at most ``max_values`` values are read, from evenly
    spaced slices along the first axis. An all-zero or non-finite image gives ``(-1, 1)``.
    """
    shape = tuple(int(s) for s in np.shape(data))
    if not shape or 0 in shape:
        return (-1.0, 1.0)
    per_slice = max(1, int(np.prod(shape[1:])))
    step = max(1, -(-shape[0] * per_slice // max_values))
    a = np.abs(np.asarray(data[::step], dtype=np.float32))
    a = a[np.isfinite(a)]
    m = float(np.percentile(a, percentile)) if a.size else 0.0
    if not m > 0:
        m = float(a.max()) if a.size and a.max() > 0 else 1.0
    return (-m, m)


def output_steps(viewer, name: str, outputs: dict, method_outputs: dict, labels_layer: Callable) -> list:
    """One callable per overlay layer of ``outputs`` (added or updated in place), then the
    tidying up (preview hidden, the user's labels, ``labels_layer()``, moved back on top)."""
    created = set()

    def put(suffix, data, kind, **kw):
        def step():
            like = _like(viewer, name)
            full = f"{name} {suffix}"
            preview = f"{name} preview"
            if full not in viewer.layers and kind == "labels" and preview in viewer.layers:
                # Adding a layer costs napari far more than renaming one: the preview
                # layer becomes the prediction layer (a new preview comes with the next run).
                layer = viewer.layers[preview]
                layer.name = full
                layer.visible = True
                layer.opacity = kw.get("opacity", layer.opacity)
                created.add(full)
                opts = {}
            elif full not in viewer.layers:
                created.add(full)
                opts = kw
            else:  # keep the user's display choices on an existing layer
                opts = {k: v for k, v in kw.items() if k not in ("visible", "colormap", "opacity", "blending")}
            upsert(viewer, full, data, kind, like=like, **opts)

        return step

    steps = [put("prediction", outputs["mask"], "labels", opacity=0.5)]
    probs = outputs["probabilities"]
    prob = probs[1] if probs.shape[0] == 2 else probs[1:]
    steps.append(put("probability", prob, "image", colormap="magma", blending="additive", visible=False,
                     contrast_limits=(0.0, 1.0)))
    for out_name, kind in method_outputs.items():
        data = outputs[out_name]
        if data.ndim == 4 and data.shape[0] == 1:
            data = data[0]
        if kind == "difference":  # zero in the colormap's middle: sign is the information
            steps.append(put(out_name, data, "image", colormap="PiYG", visible=False,
                             contrast_limits=difference_limits(data)))
        else:
            steps.append(put(out_name, data, "image", colormap="gray", visible=False))

    def tidy():
        preview = f"{name} preview"
        if preview in viewer.layers:
            # A one-slice layer left hidden would be offered for export and confuse; the next
            # run makes a new one (issue 20 item 3).
            viewer.layers.remove(preview)
        # Keep the user's labels on top of the overlays so painting stays visible.
        labels = labels_layer()
        if labels is not None and created:
            viewer.layers.move(viewer.layers.index(labels), len(viewer.layers))

    steps.append(tidy)
    return steps
