"""Autosave core: background, debounced, atomic; find and restore; faults."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from semiseg.autosave import Autosaver, default_store_path, find_autosave, image_identity, restore
from semiseg.data import InputError


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 1000, (5, 24, 24)).astype(np.uint16)


def _saver(image, tmp_path, **kw):
    kw.setdefault("debounce", 0.05)
    return Autosaver.for_image(image, image_path=tmp_path / "scan.tif", **kw)


def test_round_trip_and_sidecar_location(image, tmp_path):
    labels = np.zeros(image.shape, np.uint8)
    labels[2, 3:9, 3:9] = 1
    tags = np.array([-1, 0, 1, -1, 0], np.int8)
    saver = _saver(image, tmp_path)
    saver.submit(labels, tags)
    assert saver.close()
    found = find_autosave(tmp_path / "scan.tif")
    assert found.path == tmp_path / "scan.tif.semiseg-autosave.zarr"
    got, got_tags, meta = restore(found.path)
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_array_equal(got_tags, tags)
    assert meta["identity"]["shape"] == [5, 24, 24] and meta["identity"]["hash"]


def test_submit_copies_and_never_blocks(image, tmp_path, monkeypatch):
    saver = _saver(image, tmp_path)
    gate = threading.Event()
    real = Autosaver._write

    def slow(self, *a):
        gate.wait(5)
        return real(self, *a)

    monkeypatch.setattr(Autosaver, "_write", slow)
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 0, 0] = 1
    t = time.perf_counter()
    saver.submit(labels)
    time.sleep(0.2)  # the writer is now stuck in the "disk"
    labels[1, 1, 1] = 2
    saver.submit(labels, changed=[1])
    elapsed = time.perf_counter() - t - 0.2
    labels[4] = 9  # edits after submit are not in what was queued
    assert elapsed < 0.1
    gate.set()
    assert saver.close()
    got = restore(saver.store)[0]
    assert got[0, 0, 0] == 1 and got[1, 1, 1] == 2 and not got[4].any()


def test_only_changed_slices_are_copied_for_large_labels(image, tmp_path, monkeypatch):
    saver = _saver(image, tmp_path, small_bytes=0)
    labels = np.zeros(image.shape, np.uint8)
    saver.submit(labels)  # the first submit is always whole
    assert saver.flush()
    copies = []
    real_array = np.array

    def spy(obj, *a, **k):
        if k.get("copy") and isinstance(obj, np.ndarray):
            copies.append(obj.shape)
        return real_array(obj, *a, **k)

    monkeypatch.setattr(np, "array", spy)
    labels[3, 5, 5] = 4
    saver.submit(labels, changed=[3])
    monkeypatch.setattr(np, "array", real_array)
    assert copies == [(24, 24)]
    assert saver.close()
    assert restore(saver.store)[0][3, 5, 5] == 4


def test_debounce_and_interval(image, tmp_path):
    saver = _saver(image, tmp_path, debounce=10.0, interval=0.3)
    labels = np.zeros(image.shape, np.uint8)
    t0 = time.monotonic()
    while saver.saves == 0 and time.monotonic() - t0 < 5:  # changes keep coming
        labels[0, 0, 0] += 1
        saver.submit(labels)
        time.sleep(0.05)
    assert saver.saves >= 1 and time.monotonic() - t0 < 2  # saved by the interval, not debounce
    saver.close()


def test_nothing_written_without_changes(image, tmp_path):
    saver = _saver(image, tmp_path)
    time.sleep(0.2)
    assert saver.close() and not saver.store.exists()


def test_disk_full_keeps_previous_autosave_and_retries(image, tmp_path, monkeypatch):
    errors = []
    saver = _saver(image, tmp_path, on_error=errors.append, retry_delay=0.2)
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 0, 0] = 1
    saver.submit(labels, np.zeros(5, np.int8))
    assert saver.flush()
    real = os.replace

    def full(src, dst, *a, **k):  # our temporaries (.tmp) and zarr's chunk temporaries (.partial)
        if ".tmp" in str(src) or str(src).endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    labels[2, 2, 2] = 3
    saver.submit(labels, np.ones(5, np.int8), changed=[2])
    assert not saver.flush(timeout=5)
    assert errors and "No space left" in saver.last_error
    got, tags, _ = restore(saver.store)  # the previous autosave is intact
    assert got[2, 2, 2] == 0 and got[0, 0, 0] == 1 and tags.tolist() == [0] * 5
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    assert leftovers == []
    monkeypatch.setattr(os, "replace", real)
    assert saver.flush(timeout=15)  # the queued change is retried and written
    got, tags, _ = restore(saver.store)
    assert got[2, 2, 2] == 3 and tags.tolist() == [1] * 5
    saver.close()


def test_earlier_session_is_kept_not_overwritten(image, tmp_path):
    old = np.zeros(image.shape, np.uint8)
    old[1] = 1
    s1 = _saver(image, tmp_path)
    s1.submit(old)
    assert s1.close()
    time.sleep(1.1)  # a later second in saved_at
    s2 = _saver(image, tmp_path)
    s2.submit(np.zeros(image.shape, np.uint8))  # a fresh, empty labels layer
    assert s2.close()
    stores = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".semiseg-autosave.zarr"))
    assert len(stores) == 2 and any(".kept-" in n for n in stores)
    kept = next(tmp_path.glob("*.kept-*"))
    np.testing.assert_array_equal(restore(kept)[0], old)
    assert find_autosave(tmp_path / "scan.tif").path == s2.store  # newest first


def test_find_in_user_folder_by_identity(image, tmp_path):
    folder = tmp_path / "autosaves"
    folder.mkdir()
    ident = image_identity(image)  # an image without a file
    with pytest.raises(InputError, match="choose an autosave folder"):
        default_store_path(ident)
    saver = Autosaver(default_store_path(ident, folder), ident, debounce=0.01)
    saver.submit(np.ones(image.shape, np.uint8))
    assert saver.close()
    found = find_autosave(image_identity(image), folder)
    assert found is not None and found.exact
    other = image.copy()
    other[:, ::8, ::8] += 1  # a different image of the same shape
    assert find_autosave(image_identity(other), folder) is None
    assert find_autosave(image_identity(image[:2]), folder) is None  # other shape


def test_restore_refuses_damaged_store(image, tmp_path):
    saver = _saver(image, tmp_path)
    saver.submit(np.ones(image.shape, np.uint8))
    assert saver.close()
    with pytest.raises(InputError, match="not a napari-semiseg autosave"):
        restore(tmp_path)
    for p in (saver.store / "labels").rglob("*"):
        if p.is_file() and p.name != "zarr.json":
            p.write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read"):
        restore(saver.store)


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from semiseg.autosave import Autosaver
    img = np.zeros((8, 64, 64), np.uint16)
    saver = Autosaver.for_image(img, image_path=sys.argv[1], debounce=0.0, interval=0.0, small_bytes=0)
    labels = np.zeros(img.shape, np.uint8)
    saver.submit(labels)
    saver.flush()
    k = 0
    while True:
        k += 1
        i = k % 8
        labels[i] = k % 250
        saver.submit(labels, changed=[i])
        saver.flush()
        print("SAVED", k, flush=True)
    """
)


def test_sigkill_during_autosave_leaves_a_valid_store(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "scan.tif")], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("SAVED") and int(line.split()[1]) >= 20:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    found = find_autosave(tmp_path / "scan.tif")
    labels, _, _ = restore(found.path)
    assert labels.shape == (8, 64, 64)
    for z in labels:  # every slice is one whole save, never torn
        assert len(np.unique(z)) == 1
    assert json.loads((found.path / "semiseg-autosave.json").read_text())["labels_shape"] == [8, 64, 64]


def test_between_writes_waits_for_a_write_in_progress_and_starts_none(image, tmp_path, monkeypatch):
    saver = _saver(image, tmp_path, debounce=0.01)
    moved, release = threading.Event(), threading.Event()
    real_write = Autosaver._write

    def slow_write(self, *args):
        moved.set()  # the writer is mid-swap from here until release
        assert release.wait(5)
        return real_write(self, *args)

    monkeypatch.setattr(Autosaver, "_write", slow_write)
    saver.submit(np.ones(image.shape, np.uint8))
    assert moved.wait(5)
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    with saver.between_writes():
        waited = time.monotonic() - t0
        assert saver.saves == 1 and waited >= 0.25  # the write in progress finished first
        info = find_autosave(tmp_path / "scan.tif")
        assert info is not None and restore(info.path)[0].all()
        # A change submitted inside the block waits for it to end.
        saver.submit(np.zeros(image.shape, np.uint8))
        time.sleep(0.2)
        assert saver.saves == 1
    assert saver.close() and saver.saves == 2
    assert not restore(find_autosave(tmp_path / "scan.tif").path)[0].any()
