"""Fixtures for the napari plugin tests: tiny seeded samples and a fast Train widget."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg import make_phantom
from semiseg.napari import TAGS_KEY

PLUGIN = "napari-semiseg"


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """The Train widget keeps every run; keep them out of the user's home in tests."""
    monkeypatch.setenv("SEMISEG_RUNS_DIR", str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def phantom():
    return make_phantom(0, shape=(8, 48, 48), labelled=2)


@pytest.fixture
def sample_viewer(make_napari_viewer, phantom):
    """A viewer holding the tiny phantom as ``phantom`` + ``phantom labels`` (with tags)."""
    viewer = make_napari_viewer()
    viewer.add_image(phantom.image, name="phantom")
    viewer.add_labels(phantom.labels.copy(), name="phantom labels", metadata={TAGS_KEY: phantom.tags.copy()})
    return viewer


def _make_train_widget(viewer, *, backend="thread", steps=3, method="supervised", params=None):
    """A Train widget set up for seconds-long runs (features 8,16, crop 32, batch 2)."""
    from semiseg.napari._train import TrainWidget

    w = TrainWidget(viewer, backend=backend, prewarm=False)
    w.method_combo.setCurrentText(method)
    w.steps_spin.setValue(steps)
    w.batch_spin.setValue(2)
    w.crop_spin.setValue(32)
    w.preview_every = 0.0
    w.params.set_value("features", (8, 16))
    for k, v in (params or {}).items():
        w.params.set_value(k, v)
    viewer.window.add_dock_widget(w)
    return w


def _run_and_wait(qtbot, widget, action=None, timeout=120_000):
    """Press Train (or call ``action``) and wait until the run has finished and is shown
    (layers are added one event-loop turn at a time, then the suggestion list is fed)."""
    (action or widget.train_button.click)()
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def _labels_hash(layer) -> int:
    return hash(np.asarray(layer.data).tobytes())


@pytest.fixture
def make_train_widget():
    return _make_train_widget


@pytest.fixture
def run_and_wait():
    return _run_and_wait


@pytest.fixture
def labels_hash():
    return _labels_hash
