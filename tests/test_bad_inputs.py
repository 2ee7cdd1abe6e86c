"""Bad-input matrix across the CLI and the Python API.

Every bad input gives one clear line (exit 2 on the CLI, ``InputError`` in the API) and leaves
every input and earlier output byte-identical; the inputs that must work (all slices annotated,
tiny slices, one slice, a constant image) do.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import semiseg
from semiseg.cli import main
from semiseg.io import write_volume
from semiseg.synthetic import make_phantom

torch.set_num_threads(1)

FAST = ["--steps", "2", "--batch-size", "2", "--crop", "32", "--param", "features=8,16", "--device", "cpu"]
API_PARAMS = {"features": (8, 16)}
API_CONFIG = {"steps": 2, "batch_size": 2, "crop": 32}


def tree_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def screen_lines(err: str) -> list[str]:
    """Lines a terminal shows: progress bars (redrawn with carriage returns) are cleared."""
    return [ln.rsplit("\r", 1)[-1] for ln in err.split("\n") if ln.rsplit("\r", 1)[-1].strip()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Image, labels, a trained 2-class model and an earlier prediction, on disk."""
    d = tmp_path_factory.mktemp("bad")
    s = make_phantom(0, shape=(6, 32, 32), labelled=2)
    write_volume(d / "image.tif", s.image)
    write_volume(d / "labels.tif", s.labels)
    assert main(["train", str(d / "image.tif"), str(d / "labels.tif"), "-o", str(d / "model.pt"), "--no-runs", *FAST]) == 0
    assert main(["predict", str(d / "model.pt"), str(d / "image.tif"), "-o", str(d / "mask.tif")]) == 0
    return d, s


def _bad_files(d: Path, s) -> dict[str, Path]:
    """Write every bad input once (into ``d/bad``) and return name -> path."""
    b = d / "bad"
    if b.exists():
        return {p.name.split(".")[0]: p for p in b.iterdir()}
    b.mkdir()
    img, lab = s.image, s.labels
    nan = img.astype(np.float32)
    nan[1, 3, 3] = np.nan
    inf = img.astype(np.float32)
    inf[2, 5, 5] = np.inf
    many = lab.astype(np.uint8).copy()
    many[lab.reshape(6, -1).any(1).argmax(), 0, 0] = 3
    arrays = {
        "img2d": img[0],
        "rgb": np.zeros((40, 40, 3), np.uint8),
        "lab_small": lab[:, :16],
        "lab_float": lab.astype(np.float32) + 0.5,
        "lab_floatwhole": lab.astype(np.float32),
        "lab_neg": lab.astype(np.int16) - 1,
        "lab_empty": np.zeros_like(lab),
        "lab_3class": many,
        "img_nan": nan,
        "img_inf": inf,
        "img_2ch": np.stack([img, img]),
        # the image as a scanner stores it: 16-bit integers (passed as LABELS when swapped)
        "img_int16": ((img - img.min()) / (img.max() - img.min()) * 1148).astype(np.int16),
    }
    for k, a in arrays.items():
        np.save(b / f"{k}.npy", a)
    (b / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(200))
    (b / "notatiff.tif").write_bytes(b"hello, I am text")
    write_volume(b / "brokenmeta.zarr", img)
    (b / "brokenmeta.zarr" / "zarr.json").write_text("{ this is not json")
    write_volume(b / "brokenchunk.zarr", img)
    chunks = sorted(p for p in (b / "brokenchunk.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].write_bytes(b"\x00garbage")
    np.save(b / "lab_2class.npy", lab)
    # Planes CSVs (the volume is (6, 32, 32); slices along Z holding labels are annotated).
    z = int(np.flatnonzero(lab.reshape(6, -1).any(1))[0])
    for name, text in {
        "planes_outside": f"axis,index\n0,{z}\n1,40\n",
        "planes_axis": "axis,index\n3,0\n",
        "planes_text": "hello, I am text\n",
        "planes_badrow": "axis,index\n0,x\n",
        "planes_sagittal_only": "axis,index\n2,5\n",
    }.items():
        (b / f"{name}.csv").write_text(text)
    (b / "planes_binary.csv").write_bytes(b"\xff\xfe\x00\x89PNG" + os.urandom(64))
    (b / "weak_binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x80" + os.urandom(64))  # not text
    (b / "weak_text.csv").write_text("hello, I am text\n")
    m2 = semiseg.train(
        np.stack([img, img]), lab, params=API_PARAMS, config=semiseg.TrainConfig(**API_CONFIG), device="cpu"
    )
    m2.save(b / "model_2ch.pt")
    return {p.name.split(".")[0]: p for p in b.iterdir()}


# (case id, argv template, message fragment). {img} {lab} {model} {out} {d} are filled in;
# bad files are {name}.
CLI_CASES = [
    ("train-2d-image", "train {img2d} {lab} -o {out}.pt", "must be 3D"),
    ("predict-2d-image", "predict {model} {img2d} -o {out}.tif", "must be 3D"),
    ("train-rgb", "train {rgb} {lab} -o {out}.pt", "RGB"),
    ("predict-rgb", "predict {model} {rgb} -o {out}.tif", "RGB"),
    ("shape-mismatch", "train {img} {lab_small} -o {out}.pt", "does not match image shape"),
    ("float-labels", "train {img} {lab_float} -o {out}.pt", "must be integers"),
    ("float-whole-labels", "train {img} {lab_floatwhole} -o {out}.pt", "integer dtype"),
    ("negative-labels", "train {img} {lab_neg} -o {out}.pt", ">= 0"),
    ("empty-labels", "train {img} {lab_empty} -o {out}.pt", "no annotated slice"),
    ("more-classes-than-model", "train {img} {lab_3class} -o {out}.pt --continue-from {model}", "classes"),
    ("train-nan", "train {img_nan} {lab} -o {out}.pt", "NaN or Inf"),
    ("train-inf", "train {img_inf} {lab} -o {out}.pt", "NaN or Inf"),
    ("predict-nan", "predict {model} {img_nan} -o {out}.tif", "NaN or Inf"),
    ("unknown-method", "train {img} {lab} -o {out}.pt --method no-such-method", "unknown method"),
    ("bad-param", "train {img} {lab} -o {out}.pt --param nonsense=1", "unknown parameter"),
    ("corrupt-tiff", "train {corrupt} {lab} -o {out}.pt", "cannot read"),
    ("text-as-tiff", "predict {model} {notatiff} -o {out}.tif", "cannot read"),
    ("corrupt-zarr-meta", "predict {model} {brokenmeta} -o {out}.tif", "cannot read"),
    ("corrupt-zarr-chunk-train", "train {brokenchunk} {lab} -o {out}.pt", "cannot read"),
    ("corrupt-zarr-chunk-predict", "predict {model} {brokenchunk} -o {out}.tif", "cannot read"),
    ("predict-other-channels", "predict {model_2ch} {img} -o {out}.tif", "channel"),
    ("continue-other-channels", "train {img} {lab} -o {out}.pt --continue-from {model_2ch}", "channel"),
    ("model-is-not-a-model", "predict {img} {img} -o {out}.tif", "not a napari-semiseg model"),
    ("missing-model", "predict {d}/nope.pt {img} -o {out}.tif", "no such model file"),
    ("missing-image", "train {d}/nope.tif {lab} -o {out}.pt", "no such file"),
    ("missing-output-folder", "train {img} {lab} -o {d}/no/such/dir/m.pt", "does not exist"),
    ("bad-output-suffix", "predict {model} {img} -o {out}.png", "unsupported output type"),
    ("rollback-unknown-run", "rollback {model} 99999", "no runs stored"),
    ("planes-outside-volume", "train {img} {lab} -o {out}.pt --planes {planes_outside}",
     "plane axis,index 1,40 is outside the volume of shape (Z, Y, X) = (6, 32, 32)"),
    ("planes-bad-axis", "train {img} {lab} -o {out}.pt --planes {planes_axis}", "axis must be 0, 1 or 2"),
    ("planes-not-csv", "train {img} {lab} -o {out}.pt --planes {planes_text}", "not a planes file"),
    ("planes-binary", "train {img} {lab} -o {out}.pt --planes {planes_binary}", "not a text file"),
    ("planes-bad-row", "train {img} {lab} -o {out}.pt --planes {planes_badrow}", "bad row 0,x"),
    ("swapped-image-labels", "train {lab} {img_int16} -o {out}.pt", "did you swap IMAGE and LABELS?"),
    ("swapped-small-image", "train {lab} {img} -o {out}.pt", "did you swap IMAGE and LABELS?"),  # 38 values
    ("suggest-swapped", "suggest {model} {lab} {img_int16}", "did you swap IMAGE and LABELS?"),
    ("weak-binary", "train {img} {lab} -o {out}.pt --weak {weak_binary}",
     "weak_binary.csv: not a text file; expected a CSV with the header 'slice,diseased'"),
    ("weak-not-csv", "train {img} {lab} -o {out}.pt --weak {weak_text}",
     "weak_text.csv: not a weak-tag file: expected a CSV with the header 'slice,diseased'"),
    ("planes-missing", "train {img} {lab} -o {out}.pt --planes {d}/nope.csv", "cannot read planes"),
    ("planes-other-axis-only", "train {img} {lab} -o {out}.pt --planes {planes_sagittal_only}",
     "no annotated slice along the training axis 0"),
]


def _fill(template: str, base, files) -> list[str]:
    d, _ = base
    names = {k: str(v) for k, v in files.items()}
    names.update(img=str(d / "image.tif"), lab=str(d / "labels.tif"), model=str(d / "model.pt"),
                 out=str(d / "new-output"), d=str(d))
    return [a.format(**names) for a in template.split()]


def _run_bad(argv, d: Path, capsys, fragment: str):
    capsys.readouterr()
    before = tree_hashes(d)
    rc = main(argv)
    captured = capsys.readouterr()
    after = tree_hashes(d)
    lines = screen_lines(captured.err)
    assert rc == 2, captured.err
    assert len(lines) == 1, lines
    assert "error:" in lines[0] and fragment in lines[0], lines[0]
    assert after == before  # nothing written, nothing changed, no temp files


@pytest.mark.parametrize("case,template,fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, template, fragment, base, capsys):
    d, s = base
    files = _bad_files(d, s)
    argv = _fill(template, base, files)
    if argv[0] == "train":
        argv += FAST + ["--no-runs"] * ("--no-runs" not in argv)
    _run_bad(argv, d, capsys, fragment)


def test_cli_output_folder_not_writable(base, capsys, monkeypatch):
    d, _ = base
    ro = d / "readonly"
    ro.mkdir(exist_ok=True)
    os.chmod(ro, 0o555)
    real = os.access
    # root ignores permission bits: make the check see what a normal user would.
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == ro and m & os.W_OK else real(p, m, *a, **k))
    try:
        _run_bad(["predict", str(d / "model.pt"), str(d / "image.tif"), "-o", str(ro / "m.tif")], d, capsys, "not writable")
        _run_bad(["train", str(d / "image.tif"), str(d / "labels.tif"), "-o", str(ro / "m.pt"), *FAST], d, capsys, "not writable")
    finally:
        os.chmod(ro, 0o755)


@pytest.mark.parametrize("verb", ["predict", "train", "sample"])
def test_cli_disk_full(verb, base, capsys, monkeypatch):
    """A full disk: one clear line, exit 2, earlier outputs intact, no temp files left."""
    d, _ = base
    out = d / "full"
    out.mkdir(exist_ok=True)
    np.save(out / "old.npy", np.arange(5))
    (out / "old.pt").write_bytes(b"previous model bytes")
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if ".tmp" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    argv = {
        "predict": ["predict", str(d / "model.pt"), str(d / "image.tif"), "-o", str(out / "old.npy"), "--prob", str(out / "prob.npy")],
        "train": ["train", str(d / "image.tif"), str(d / "labels.tif"), "-o", str(out / "old.pt"), *FAST],
        "sample": ["sample", str(out), "--labelled", "1"],
    }[verb]
    _run_bad(argv, d, capsys, "No space left on device")


API_CASES = [
    ("2d-image", lambda s: (s.image[0], s.labels[0]), "must be 3D"),
    ("rgb", lambda s: (np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)), "RGB"),
    ("shape-mismatch", lambda s: (s.image, s.labels[:, :16]), "does not match"),
    ("float-labels", lambda s: (s.image, s.labels + 0.5), "must be integers"),
    ("negative-labels", lambda s: (s.image, s.labels.astype(np.int16) - 1), ">= 0"),
    ("empty-labels", lambda s: (s.image, np.zeros_like(s.labels)), "no annotated slice"),
    ("nan", lambda s: (np.where(np.arange(32) == 3, np.nan, s.image.astype(np.float32)), s.labels), "NaN or Inf"),
    ("complex", lambda s: (s.image.astype(np.complex64), s.labels), "not numeric"),
    ("swapped", lambda s: (s.labels, (s.image * 1000).astype(np.uint16)), "did you swap IMAGE and LABELS?"),
]


@pytest.mark.parametrize("case,make,fragment", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, make, fragment, base):
    _, s = base
    image, labels = make(s)
    image_before, labels_before = np.array(image, copy=True), np.array(labels, copy=True)
    with pytest.raises(semiseg.InputError, match=fragment.replace("(", r"\(")):
        semiseg.train(image, labels, params=API_PARAMS, config=semiseg.TrainConfig(**API_CONFIG), device="cpu")
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(labels, labels_before)


def test_api_unknown_method_and_model_channels(base):
    d, s = base
    with pytest.raises(KeyError, match="unknown method"):
        semiseg.train(s.image, s.labels, method="nope", config=semiseg.TrainConfig(**API_CONFIG))
    model = semiseg.load_model(d / "model.pt")
    with pytest.raises(semiseg.InputError, match="channel"):
        semiseg.predict_volume(model, np.stack([s.image, s.image]))
    many = s.labels.astype(np.uint8)
    many[s.labels.reshape(6, -1).any(1).argmax(), 0, 0] = 3
    with pytest.raises(semiseg.InputError, match="classes"):
        semiseg.train(s.image, many, model=model, config=semiseg.TrainConfig(**API_CONFIG))


# ----------------------------------------------------------------------------- must work
def _train_api(image, labels, **kw):
    kw.setdefault("params", API_PARAMS)
    return semiseg.train(image, labels, config=semiseg.TrainConfig(**API_CONFIG), device="cpu", **kw)


ALL_SLICES_METHODS = [
    ("supervised", {}),
    ("autoencoder", {}),
    ("mean-teacher", {}),
    ("entropy-min", {}),
    ("mutual-info", {}),
    ("translation", {"unique_channels": 4, "disc_features": (8, 16)}),
]


@pytest.mark.parametrize("method,extra", ALL_SLICES_METHODS, ids=[m for m, _ in ALL_SLICES_METHODS])
def test_all_slices_annotated_works(method, extra):
    """No unlabelled slice: the unlabelled pool falls back to all slices; nothing errors."""
    if method not in semiseg.list_methods():
        pytest.skip(f"{method} not registered")
    s = make_phantom(1, shape=(3, 32, 32), labelled=3)
    labels = s.truth.astype(np.uint8)
    labels[0] = 0  # slice 0: tagged healthy (a free all-background annotation)
    labels[1:, 0, 0] = 1  # slices 1, 2 painted
    tags = np.array([0, 1, 1], np.int8)
    model = _train_api(s.image, labels, method=method, params={**API_PARAMS, **extra}, tags=tags)
    assert len(semiseg.make_pools(labels, tags).unlabelled) == 0
    assert model.history[-1]["steps"] == 2
    out = semiseg.predict_volume(model, s.image)
    assert out["mask"].shape == s.image.shape


@pytest.mark.parametrize(
    "shape",
    [(1, 32, 32), (4, 5, 7), (3, 1, 9), (2, 33, 17)],
    ids=["one-slice", "tiny-5x7", "tiny-1x9", "odd-33x17"],
)
def test_small_and_odd_volumes_work(shape):
    """Slices smaller than the crop or not a multiple of the network's stride are padded."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, shape).astype(np.uint16)
    labels = np.zeros(shape, np.uint8)
    labels[0, : max(1, shape[1] // 2)] = 1
    model = _train_api(image, labels, params={"features": (8, 16, 32)})
    out = semiseg.predict_volume(model, image)
    assert out["mask"].shape == shape and np.isfinite(out["probabilities"]).all()


def test_constant_image_works():
    """A zero-variance image is legal (the normaliser falls back to a unit scale)."""
    image = np.full((3, 32, 32), 7, np.uint16)
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 4:10, 4:10] = 1
    model = _train_api(image, labels)
    out = semiseg.predict_volume(model, image)
    assert np.isfinite(out["probabilities"]).all()


def test_cli_tiny_and_one_slice_work(tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 100, (1, 6, 5)).astype(np.uint8)
    labels = np.zeros_like(image)
    labels[0, 1:3, 1:3] = 1
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "l.npy", labels)
    assert main(["train", str(tmp_path / "i.npy"), str(tmp_path / "l.npy"), "-o", str(tmp_path / "m.pt"), *FAST]) == 0
    assert main(["predict", str(tmp_path / "m.pt"), str(tmp_path / "i.npy"), "-o", str(tmp_path / "p.npy")]) == 0
    assert np.load(tmp_path / "p.npy").shape == image.shape


@pytest.mark.skipif(not os.environ.get("SEMISEG_SLOW"), reason="1 x 4096 x 4096: ~2 min on one CPU core; SEMISEG_SLOW=1")
def test_huge_slice_works():
    image = (np.random.default_rng(0).random((1, 4096, 4096)) * 1000).astype(np.uint16)
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 100:200, 100:200] = 1
    model = _train_api(image, labels)
    out = semiseg.predict_volume(model, image, probabilities=False)
    assert out["mask"].shape == image.shape


def test_huge_slice_out_of_memory_is_clear(base, monkeypatch, capsys):
    """Running out of memory predicting: batches are halved, then one clear line (exit 1)."""
    d, _ = base
    from semiseg.methods.supervised import Supervised

    sizes = []

    def oom(self, x):
        sizes.append(x.shape[0])
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Supervised, "predict", oom)
    before = tree_hashes(d)
    rc = main(["predict", str(d / "model.pt"), str(d / "image.tif"), "-o", str(d / "mask.tif"), "--batch-size", "4"])
    err = screen_lines(capsys.readouterr().err)
    assert rc == 1
    assert sizes == [4, 2, 1]
    assert "prediction failed: out of memory predicting one 32 x 32 slice" in err[-1]
    assert tree_hashes(d) == before
