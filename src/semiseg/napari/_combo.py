"""A combo box whose width does not follow its longest entry."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox

#: Characters a narrow combo box asks room for; longer entries are cut in the box (the popup
#: and the tooltip show them whole).
MIN_CHARS = 12


def narrow_combo(tooltip: str | None = None) -> QComboBox:
    """A ``QComboBox`` for entries of any length (layer names, run descriptions).

    By default a combo box is as wide as its longest entry, and a dock widget as wide as its
    widest child: one long run description made the Train dock over 1,100 pixels wide and
    squeezed the canvas. This one asks for :data:`MIN_CHARS` characters and takes what the
    layout gives it.

    Parameters
    ----------
    tooltip : str, optional
        A fixed tooltip; by default the tooltip is the current entry, whole.
    """
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(MIN_CHARS)
    if tooltip is None:
        combo.currentTextChanged.connect(combo.setToolTip)
    else:
        combo.setToolTip(tooltip)
    return combo
