"""A light live plot of named losses drawn with QPainter (no matplotlib redraw cost)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


class LossPlot(QWidget):
    """Curves of each named loss against the step, on a log scale.

    ``add(step, losses)`` only stores points (cheap); :meth:`flush` repaints when something
    changed, every ``repaint_ms`` on its own timer or when the owner calls it.
    At most ``max_points`` points per curve are kept (older ones are thinned by 2).
    """

    def __init__(self, parent=None, *, max_points: int = 2000, repaint_ms: int | None = 200):
        super().__init__(parent)
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.max_points = max_points
        self.series: dict[str, list[tuple[int, float]]] = {}
        self._dirty = False
        if repaint_ms:  # otherwise the owner calls flush() (to repaint with its other widgets)
            self._timer = QTimer(self)
            self._timer.setInterval(repaint_ms)
            self._timer.timeout.connect(self.flush)
            self._timer.start()

    def clear(self) -> None:
        self.series.clear()
        self._dirty = True

    def add(self, step: int, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            if not math.isfinite(value):
                continue
            pts = self.series.setdefault(name, [])
            if pts and step <= pts[-1][0]:
                step = pts[-1][0] + 1  # continued runs keep counting
            pts.append((step, value))
            if len(pts) > self.max_points:
                del pts[1::2]
        self._dirty = True

    def flush(self) -> None:
        """Schedule a repaint if points were added since the last one."""
        if self._dirty and self.isVisible():
            self._dirty = False
            self.update()

    def paintEvent(self, event):
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor("#262930"))
        pts = [pt for s in self.series.values() for pt in s]
        if not pts:
            p.setPen(QColor("#aaaaaa"))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "losses appear here while training")
            p.end()
            return
        left, right, top, bottom = 6, 6, 6, 18 + 14 * ((len(self.series) + 3) // 4)
        x0, x1 = min(s for s, _ in pts), max(s for s, _ in pts)
        logs = [math.log10(max(v, 1e-6)) for _, v in pts]
        y0, y1 = min(logs), max(logs)
        if y1 - y0 < 1e-6:
            y0, y1 = y0 - 0.5, y1 + 0.5
        if x1 == x0:
            x1 = x0 + 1
        pw, ph = max(1, w - left - right), max(1, h - top - bottom)
        for i, (name, series) in enumerate(self.series.items()):
            colour = QColor(COLOURS[i % len(COLOURS)])
            p.setPen(QPen(colour, 1.5))
            poly = QPolygonF(
                [
                    QPointF(
                        left + (s - x0) / (x1 - x0) * pw,
                        top + (y1 - math.log10(max(v, 1e-6))) / (y1 - y0) * ph,
                    )
                    for s, v in series
                ]
            )
            p.drawPolyline(poly)
            row, col = divmod(i, 4)
            p.drawText(left + col * (w // 4), h - bottom + 14 + 14 * row, f"{name} {series[-1][1]:.3g}")
        p.setPen(QColor("#aaaaaa"))
        p.drawText(left, h - 2, f"step {x0}..{x1}   log scale {10**y0:.2g}..{10**y1:.2g}")
        p.end()
