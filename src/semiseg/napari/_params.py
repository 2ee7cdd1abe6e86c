"""A form built from a method's ``Params`` dataclass (one field per hyperparameter)."""

from __future__ import annotations

import dataclasses

from qtpy.QtWidgets import QCheckBox, QFormLayout, QLineEdit, QWidget


class ParamsForm(QWidget):
    """Editable fields for ``method_cls.Params``; :meth:`values` returns strings/bools.

    Values are coerced by the method itself (:meth:`semiseg.methods.Method.parse_params`), so
    a bad entry surfaces as a clear error when training starts.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self._layout = QFormLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self.fields: dict[str, QWidget] = {}
        self.defaults: dict[str, object] = {}

    def set_method(self, method_cls) -> None:
        while self._layout.rowCount():
            self._layout.removeRow(0)
        self.fields.clear()
        self.defaults.clear()
        for f in dataclasses.fields(method_cls.Params):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            self.defaults[f.name] = default
            if isinstance(default, bool):
                w = QCheckBox()
                w.setChecked(default)
            else:
                text = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
                w = QLineEdit(text)
            w.setObjectName(f"param_{f.name}")
            self.fields[f.name] = w
            self._layout.addRow(f.name, w)

    def set_value(self, name: str, value) -> None:
        w = self.fields[name]
        if isinstance(w, QCheckBox):
            w.setChecked(bool(value))
        else:
            w.setText(",".join(map(str, value)) if isinstance(value, tuple | list) else str(value))

    def values(self, *, changed_only: bool = True) -> dict:
        """Field values (bools or strings); by default only those differing from the defaults."""
        out = {}
        for name, w in self.fields.items():
            default = self.defaults[name]
            if isinstance(w, QCheckBox):
                v = w.isChecked()
                if not changed_only or v != default:
                    out[name] = v
            else:
                text = w.text().strip()
                dtext = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
                if not changed_only or text != dtext:
                    out[name] = text
        return out
