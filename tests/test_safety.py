"""Fault injection: kills mid-write, full disks, crashing training, hostile model files."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import semiseg
from semiseg.cli import main
from semiseg.io import atomic_path, read_volume, write_volume, write_volumes
from semiseg.synthetic import make_phantom

torch.set_num_threads(1)

FAST = ["--steps", "3", "--batch-size", "2", "--crop", "32", "--param", "features=8,16", "--device", "cpu"]


def digest(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode() + p.read_bytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    s = make_phantom(0, shape=(6, 32, 32), labelled=2)
    write_volume(d / "image.tif", s.image)
    write_volume(d / "labels.tif", s.labels)
    assert main(["train", str(d / "image.tif"), str(d / "labels.tif"), "-o", str(d / "model.pt"), *FAST]) == 0
    return d, s


# ----------------------------------------------------------------------------- kill mid-write
CHILD = textwrap.dedent(
    """
    import sys, time, numpy as np
    from semiseg.io import write_volume
    target, kind = sys.argv[1], sys.argv[2]
    if kind == "zarr":
        import dask.array as da
        def slow(block):
            print("WRITING", flush=True)
            time.sleep(0.05)
            return block + 1
        data = da.ones((200, 64, 64), dtype=np.uint16, chunks=(1, 64, 64)).map_blocks(slow)
    else:
        # A large TIFF written through a slow disk: the real bytes, 64 KiB at a time.
        import io, tifffile
        real = tifffile.imwrite
        def slow_imwrite(path, arr, **kw):
            buf = io.BytesIO()
            real(buf, arr, **kw)
            raw = buf.getvalue()
            with open(path, "wb") as fh:
                for i in range(0, len(raw), 1 << 16):
                    fh.write(raw[i:i + (1 << 16)])
                    fh.flush()
                    print("WRITING", flush=True)
                    time.sleep(0.02)
        tifffile.imwrite = slow_imwrite
        data = np.ones((64, 128, 128), np.uint16)
    write_volume(target, data)
    print("DONE", flush=True)
    """
)


@pytest.mark.parametrize("kind", ["tif", "zarr"])
def test_sigkill_mid_export_keeps_old_file(kind, tmp_path):
    target = tmp_path / f"export.{kind}"
    old = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    write_volume(target, old)
    before = digest(target)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target), kind], stdout=subprocess.PIPE, text=True
    )
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("WRITING")
        if seen >= 5:  # well into the write
            break
    assert any(".tmp-" in p.name for p in tmp_path.iterdir()), "the write went to a temporary"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert digest(target) == before
    np.testing.assert_array_equal(read_volume(target), old)
    # The next write of the same file cleans up the dead writer's temporary.
    write_volume(target, old + 1)
    np.testing.assert_array_equal(read_volume(target), old + 1)
    assert leftovers(tmp_path) == []


def test_killed_folder_swap_is_recovered(tmp_path):
    """A writer killed between the two renames of a zarr swap: the old store comes back."""
    target = tmp_path / "labels.zarr"
    write_volume(target, np.ones((2, 4, 4), np.uint8))
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    os.replace(target, tmp_path / f".labels.zarr.old-{dead_pid}")  # state after the first rename
    write_volume(tmp_path / "other.npy", np.zeros(1))  # unrelated writes leave it alone
    assert not target.exists()
    write_volume(target, np.full((2, 4, 4), 2, np.uint8))
    assert read_volume(target).max() == 2
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- disk full
def _disk_full(monkeypatch):
    real = os.replace

    def replace(src, dst, *a, **k):
        if ".tmp" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("suffix", [".tif", ".npy", ".zarr"])
def test_disk_full_write_volume(suffix, tmp_path, monkeypatch):
    target = tmp_path / f"v{suffix}"
    write_volume(target, np.zeros((2, 4, 4), np.uint8))
    before = digest(target)
    _disk_full(monkeypatch)
    with pytest.raises(semiseg.InputError, match="No space left on device"):
        write_volume(target, np.ones((2, 4, 4), np.uint8))
    assert digest(target) == before
    assert leftovers(tmp_path) == []


def test_disk_full_during_the_write_itself(tmp_path, monkeypatch):
    """ENOSPC raised by the writer (not the rename) also leaves the old file and no temp."""
    import tifffile

    target = tmp_path / "v.tif"
    write_volume(target, np.zeros((2, 4, 4), np.uint8))
    before = digest(target)

    def full(path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full)
    with pytest.raises(semiseg.InputError, match="No space left"):
        write_volume(target, np.ones((2, 4, 4), np.uint8))
    assert digest(target) == before and leftovers(tmp_path) == []


def test_write_volumes_all_or_nothing(tmp_path, monkeypatch):
    a, b = tmp_path / "a.npy", tmp_path / "b.tif"
    write_volumes([(a, np.zeros(3)), (b, np.zeros((2, 4, 4), np.uint8))])
    before = digest(a), digest(b)
    import tifffile

    monkeypatch.setattr(tifffile, "imwrite", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(semiseg.InputError):
        write_volumes([(a, np.ones(3)), (b, np.ones((2, 4, 4), np.uint8))])
    assert (digest(a), digest(b)) == before  # a.npy was written first but not committed
    assert leftovers(tmp_path) == []


def test_disk_full_model_save_and_weak_csv(trained, tmp_path, monkeypatch):
    d, _ = trained
    model = semiseg.load_model(d / "model.pt")
    target = tmp_path / "m.pt"
    model.save(target)
    from semiseg.data import write_weak_csv

    write_weak_csv(tmp_path / "weak.csv", np.array([0, 1, -1]))
    before = digest(target), digest(tmp_path / "weak.csv")
    _disk_full(monkeypatch)
    with pytest.raises(semiseg.InputError, match="No space left"):
        model.save(target)
    with pytest.raises(semiseg.InputError, match="No space left"):
        write_weak_csv(tmp_path / "weak.csv", np.array([1, 1, 1]))
    assert (digest(target), digest(tmp_path / "weak.csv")) == before
    assert leftovers(tmp_path) == []


def test_atomic_path_cleans_up_on_error(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new, half written")
        raise ZeroDivisionError
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- training faults
def _boom_after(n_ok: int, exc_factory):
    from semiseg.methods.supervised import Supervised

    real = Supervised.training_step
    calls = {"n": 0}

    def step(self, batch):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise exc_factory()
        return real(self, batch)

    return Supervised, step


@pytest.mark.parametrize(
    "fault,fragment",
    [
        (lambda: RuntimeError("CUDA error: an illegal memory access was encountered"), "illegal memory access"),
        (lambda: ValueError("a bug in a method"), "a bug in a method"),
        ("nan", "non-finite loss"),
        (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "out of memory even with batch size 1"),
    ],
    ids=["runtime-error", "bug", "nan-loss", "oom"],
)
def test_crash_mid_training_keeps_model_and_labels(fault, fragment, trained, capsys, monkeypatch):
    """A fault in step 2 of a continued run: exit 1, one line, model and labels untouched."""
    d, _ = trained
    if fault == "nan":
        from semiseg.methods.supervised import Supervised

        real = Supervised.training_step
        calls = {"n": 0}

        def step(self, batch):
            calls["n"] += 1
            out = real(self, batch)
            return {**out, "ce": float("nan")} if calls["n"] > 1 else out

        cls = Supervised
    else:
        cls, step = _boom_after(1, fault)
    monkeypatch.setattr(cls, "training_step", step)
    files = [d / "model.pt", d / "labels.tif", d / "image.tif"]
    before = {p: digest(p) for p in files}
    runs_before = sorted(os.listdir(d / "model.pt.runs"))
    capsys.readouterr()
    rc = main(["train", str(d / "image.tif"), str(d / "labels.tif"), "-o", str(d / "model.pt"),
               "--continue-from", str(d / "model.pt"), *FAST, "--batch-size", "1"])
    err = [ln.rsplit("\r", 1)[-1] for ln in capsys.readouterr().err.split("\n")]
    err = [ln for ln in err if ln.strip()]
    assert rc == 1
    assert len(err) == 1 and "training failed" in err[0] and fragment in err[0], err
    assert {p: digest(p) for p in files} == before
    assert sorted(os.listdir(d / "model.pt.runs")) == runs_before
    assert leftovers(d) == []


def test_api_training_error_restores_weights(trained, monkeypatch):
    d, s = trained
    model = semiseg.load_model(d / "model.pt")
    weights = {k: v.clone() for k, v in model.method.nets["seg"].state_dict().items()}
    labels = s.labels.copy()
    cls, step = _boom_after(1, lambda: RuntimeError("boom"))
    monkeypatch.setattr(cls, "training_step", step)
    with pytest.raises(semiseg.TrainingError, match="boom"):
        semiseg.train(s.image, labels, model=model, config=semiseg.TrainConfig(steps=3, batch_size=1, crop=32))
    for k, v in model.method.nets["seg"].state_dict().items():
        torch.testing.assert_close(v, weights[k])  # last good weights, not a half-updated step
    np.testing.assert_array_equal(labels, s.labels)
    assert model.history[-1]["steps"] == 1  # the run that failed is recorded as such


def test_prediction_fault_is_one_line_exit_1(trained, capsys, monkeypatch):
    d, _ = trained
    from semiseg.methods.supervised import Supervised

    monkeypatch.setattr(Supervised, "predict", lambda self, x: (_ for _ in ()).throw(RuntimeError("kernel died")))
    write_volume(d / "mask.tif", np.zeros((6, 32, 32), np.uint8))
    before = digest(d / "mask.tif")
    capsys.readouterr()
    rc = main(["predict", str(d / "model.pt"), str(d / "image.tif"), "-o", str(d / "mask.tif")])
    err = [ln.rsplit("\r", 1)[-1] for ln in capsys.readouterr().err.split("\n") if ln.rsplit("\r", 1)[-1].strip()]
    assert rc == 1 and len(err) == 1 and "prediction failed" in err[0] and "kernel died" in err[0]
    assert digest(d / "mask.tif") == before
    with pytest.raises(semiseg.PredictionError):
        semiseg.predict_volume(semiseg.load_model(d / "model.pt"), np.zeros((1, 8, 8)))


def test_non_finite_prediction_is_refused(trained, monkeypatch):
    d, _ = trained
    from semiseg.methods.supervised import Supervised

    monkeypatch.setattr(Supervised, "predict", lambda self, x: {"probabilities": torch.full((x.shape[0], 2, *x.shape[2:]), float("nan"))})
    with pytest.raises(semiseg.PredictionError, match="non-finite"):
        semiseg.predict_volume(semiseg.load_model(d / "model.pt"), np.ones((2, 8, 8)))


# ----------------------------------------------------------------------------- hostile model files
class _Payload:
    """Unpickling this would create a file: the classic pickle code-execution attack."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path, how: str) -> None:
    if how == "torch-zip":
        torch.save({"format": "napari-semiseg-model", "config": "{}", "state": _Payload(str(marker))}, path)
    elif how == "raw-pickle":
        with open(path, "wb") as fh:
            pickle.dump({"format": "napari-semiseg-model", "x": _Payload(str(marker))}, fh)
    elif how == "zip-with-pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(_Payload(str(marker))))
            z.writestr("archive/version", "3\n")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch-zip", "raw-pickle", "zip-with-pickle"])
def test_crafted_pickle_is_refused_and_never_runs(how, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    _crafted(evil, marker, how)
    # Sanity: the payload is real (plain pickle.load would run it).
    if how == "raw-pickle":
        probe = tmp_path / "probe"
        pickle.loads(pickle.dumps(_Payload(str(probe))))
        assert probe.exists()
    with pytest.raises(semiseg.ModelFileError, match=r"not a (safe )?napari-semiseg model"):
        semiseg.load_model(evil)
    assert not marker.exists()
    image = tmp_path / "i.npy"
    np.save(image, np.zeros((2, 8, 8), np.float32))
    capsys.readouterr()
    assert main(["predict", str(evil), str(image), "-o", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "napari-semiseg model" in err[0]
    assert not marker.exists() and not (tmp_path / "o.npy").exists()


def test_truncated_model_file_is_refused(trained, tmp_path):
    d, _ = trained
    raw = (d / "model.pt").read_bytes()
    bad = tmp_path / "half.pt"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(semiseg.ModelFileError):
        semiseg.load_model(bad)


def test_interrupt_mid_training_leaves_no_output(trained, monkeypatch, capsys):
    d, _ = trained
    cls, step = _boom_after(1, KeyboardInterrupt)
    monkeypatch.setattr(cls, "training_step", step)
    out = d / "interrupted.pt"
    rc = main(["train", str(d / "image.tif"), str(d / "labels.tif"), "-o", str(out), *FAST])
    assert rc == 130 and not out.exists() and leftovers(d) == []


def test_model_save_is_loadable_after_repeated_overwrites(trained, tmp_path):
    d, _ = trained
    model = semiseg.load_model(d / "model.pt")
    for _ in range(3):
        model.save(tmp_path / "m.pt")
        time.sleep(0.01)
    assert semiseg.load_model(tmp_path / "m.pt").num_classes == model.num_classes
    assert leftovers(tmp_path) == []
