"""``import semiseg`` (the headless library) never imports napari or a Qt binding."""

from __future__ import annotations

from ._util import gui_modules_loaded_by


def test_import_semiseg_does_not_import_napari_or_qt():
    res = gui_modules_loaded_by("import semiseg, semiseg.napari, semiseg.napari._jobs")
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_library_module_imports_napari_or_qt():
    # Every module of the headless library, not only the package's face.
    res = gui_modules_loaded_by(
        "import pkgutil, importlib, semiseg\n"
        "mods = [m.name for m in pkgutil.walk_packages(semiseg.__path__, 'semiseg.') "
        "if not m.name.startswith('semiseg.napari') and m.name != 'semiseg.__main__']\n"
        "[importlib.import_module(m) for m in mods]\n"
        "print(len(mods))",
        check="len(mods) >= 20",
    )
    assert res.returncode == 0, res.stdout + res.stderr
