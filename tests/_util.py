"""Small test helpers shared by the test modules."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import torch

from semiseg.methods.base import Method

TINY_PARAMS = {"features": (8, 16)}

#: Top-level packages the headless library and the Qt-free shell modules must never load.
GUI_PACKAGES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def gui_modules_loaded_by(imports: str, *, check: str = "True") -> subprocess.CompletedProcess:
    """Run ``imports`` (Python statements) in a fresh interpreter and report every module of
    :data:`GUI_PACKAGES` they loaded; exits 1 when any was loaded or ``check`` is false."""
    code = (
        f"import sys\n{imports}\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_PACKAGES!r})\n"
        f"print(heavy)\nsys.exit(1 if heavy or not ({check}) else 0)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def array_hash(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return hashlib.sha256(a.tobytes() + str(a.shape).encode() + a.dtype.str.encode()).hexdigest()


def file_hash(path) -> str:
    from pathlib import Path

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class Pointwise(Method):
    """Analytic stand-in: p(foreground) = sigmoid(gain * x), pixel by pixel (not registered):
    unsure exactly where the image is 0."""

    name = "pointwise-test"
    summary = "test double"

    def __init__(self, *args, gain: float = 4.0, **kwargs):
        self.gain = gain
        super().__init__(*args, **kwargs)

    def build(self):
        self.nets["seg"] = torch.nn.Identity()

    def make_optimizers(self):
        pass

    def training_step(self, batch):
        return {}

    def predict(self, x):
        p1 = torch.sigmoid(self.gain * x[:, :1])
        return {"probabilities": torch.cat([1 - p1, p1], 1)}


def random_batch(b: int = 2, side: int = 32, k: int = 3, seed: int = 0) -> dict:
    """A seeded batch of random labelled (with ``k``-class masks) and unlabelled crops."""
    g = torch.Generator().manual_seed(seed)
    return {
        "labelled": torch.randn(b, 1, side, side, generator=g),
        "mask": torch.randint(0, k, (b, side, side), generator=g),
        "unlabelled": torch.randn(b, 1, side, side, generator=g),
    }
