"""``import semiseg`` (the headless library) never imports napari or a Qt binding."""

from __future__ import annotations

import subprocess
import sys


def test_import_semiseg_does_not_import_napari_or_qt():
    code = (
        "import sys, semiseg, semiseg.napari, semiseg.napari._jobs; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'superqt', 'vispy')); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
