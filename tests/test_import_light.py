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


def test_no_library_module_imports_napari_or_qt():
    # Every module of the headless library, not only the package's face.
    code = (
        "import sys, pkgutil, importlib, semiseg; "
        "mods = [m.name for m in pkgutil.walk_packages(semiseg.__path__, 'semiseg.') "
        "if not m.name.startswith('semiseg.napari') and m.name != 'semiseg.__main__']; "
        "[importlib.import_module(m) for m in mods]; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'superqt', 'vispy')); "
        "print(len(mods), heavy); sys.exit(1 if heavy or len(mods) < 20 else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
