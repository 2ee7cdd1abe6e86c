import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import semiseg
from semiseg.cli import main
from semiseg.io import read_volume, write_volume

from ._util import file_hash

TINY = ["--param", "features=8,16", "--steps", "2", "--batch-size", "2", "--crop", "32"]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    # A tiny volume in the CLI's formats, made through the API to keep it fast.
    import semiseg
    from semiseg.data import write_weak_csv

    s = semiseg.make_phantom(1, shape=(8, 32, 36), labelled=2, n_tumours=2)
    write_volume(d / "image.tif", s.image)
    write_volume(d / "labels.tif", s.labels)
    write_volume(d / "truth.tif", s.truth)
    write_weak_csv(d / "weak.csv", s.tags)
    return d


@pytest.fixture(scope="module")
def model_path(sample_dir):
    out = sample_dir / "model.pt"
    assert main(["train", str(sample_dir / "image.tif"), str(sample_dir / "labels.tif"), "-o", str(out), *TINY]) == 0
    return out


@pytest.mark.parametrize("kind", ["phantom", "nuclei", "digits"])
def test_sample(tmp_path, kind, capsys):
    assert main(["sample", str(tmp_path / "s"), "--kind", kind, "--labelled", "2", "--seed", "3"]) == 0
    files = sorted(os.listdir(tmp_path / "s"))
    assert files == ["image.tif", "labels.tif", "truth.tif", "weak.csv"]
    labels = read_volume(tmp_path / "s" / "labels.tif")
    assert (labels.reshape(len(labels), -1).any(1)).sum() == 2
    assert "2 annotated" in capsys.readouterr().out


def test_train_with_planes_records_them_and_runs_lists_them(sample_dir, tmp_path, capsys):
    from semiseg.model import Model
    from semiseg.planes import planes_from_labels, write_planes_csv

    labels = read_volume(sample_dir / "labels.tif")
    truth = read_volume(sample_dir / "truth.tif")
    x = int(np.argmax((truth > 0).any(axis=1).sum(axis=0)))
    painted = labels.copy()
    painted[:, :, x] = truth[:, :, x]  # one sagittal slice painted in full
    write_volume(tmp_path / "labels.tif", painted)
    planes = (*planes_from_labels(labels, 0), (2, x))
    write_planes_csv(tmp_path / "planes.csv", planes)
    out = tmp_path / "m.pt"
    argv = ["train", str(sample_dir / "image.tif"), str(tmp_path / "labels.tif"), "-o", str(out),
            "--planes", str(tmp_path / "planes.csv"), *TINY]
    assert main(argv) == 0
    h = Model.load(out).history[-1]
    assert h["planes"] == [list(p) for p in sorted(planes)]
    axial = [i for a, i in sorted(planes) if a == 0]
    assert h["annotated_slices"] == axial  # not every slice the sagittal one crosses
    assert h["inputs"]["planes"] == str((tmp_path / "planes.csv").resolve())
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"{len(axial)} painted slices" in line
    assert f"planes: axial {', '.join(map(str, axial))}; sagittal {x}" in line


def test_train_predict_evaluate(sample_dir, model_path, tmp_path, capsys):
    assert model_path.is_file()
    mask = tmp_path / "mask.zarr"
    prob = tmp_path / "prob.tif"
    assert main(["predict", str(model_path), str(sample_dir / "image.tif"), "-o", str(mask), "--prob", str(prob)]) == 0
    m = read_volume(mask)
    assert m.shape == (8, 32, 36) and m.dtype == np.uint8
    assert read_volume(prob).shape == (2, 8, 32, 36)
    capsys.readouterr()
    assert main(["evaluate", str(mask), str(sample_dir / "truth.tif"), "--ignore-slices-of", str(sample_dir / "labels.tif")]) == 0
    out = capsys.readouterr().out
    assert "class 1: dice" in out and "mean dice" in out


def test_train_with_weak_tags_and_continue(sample_dir, model_path, tmp_path, capsys):
    out = tmp_path / "m2.pt"
    args = ["train", str(sample_dir / "image.tif"), str(sample_dir / "labels.tif"), "-o", str(out),
            "--weak", str(sample_dir / "weak.csv"), "--continue-from", str(model_path), *TINY]
    assert main(args) == 0
    import semiseg

    assert len(semiseg.load_model(out).history) == 2


def test_context_option_and_continuing(sample_dir, tmp_path, capsys):
    import semiseg

    image, labels = str(sample_dir / "image.tif"), str(sample_dir / "labels.tif")
    first = tmp_path / "ctx.pt"
    assert main(["train", image, labels, "-o", str(first), "--context", "1", *TINY]) == 0
    assert semiseg.load_model(first).context == 1
    # Continuing without --context keeps the model's; another context is refused in one line.
    again = tmp_path / "again.pt"
    assert main(["train", image, labels, "-o", str(again), "--continue-from", str(first), *TINY]) == 0
    assert semiseg.load_model(again).context == 1
    capsys.readouterr()
    code = main(["train", image, labels, "-o", str(tmp_path / "no.pt"), "--continue-from", str(first),
                 "--context", "2", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "trained with context 1, not 2" in err
    assert not (tmp_path / "no.pt").exists()
    mask = tmp_path / "mask.tif"
    assert main(["predict", str(first), image, "-o", str(mask)]) == 0
    assert read_volume(mask).shape == (8, 32, 36)


def test_train_anneal_option_reaches_the_config(sample_dir, tmp_path):
    import semiseg
    from semiseg.engine import TrainConfig

    out = tmp_path / "m3.pt"
    base = ["train", str(sample_dir / "image.tif"), str(sample_dir / "labels.tif"), "-o", str(out), *TINY]
    assert main([*base, "--anneal", "0.25"]) == 0
    assert semiseg.load_model(out).history[-1]["config"]["anneal"] == 0.25
    assert main(base) == 0
    assert semiseg.load_model(out).history[-1]["config"]["anneal"] == TrainConfig.anneal
    assert main([*base, "--anneal", "2"]) != 0


def test_methods_lists_every_method(capsys):
    import semiseg

    assert main(["methods", "--params"]) == 0
    out = capsys.readouterr().out
    for name in semiseg.list_methods():
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert "    lr = " in out


def test_demo(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "d"), "--kind", "digits", "--labelled", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "dice on unannotated slices:" in out
    assert (tmp_path / "d" / "mask.tif").is_file() and (tmp_path / "d" / "model.pt").is_file()
    assert "cap" not in out  # 2 of 2 steps: the time cap did not end training


def test_demo_without_a_folder_writes_demo_output_and_every_printed_path_exists(tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--kind", "digits", "--labelled", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo-output" / "mask.tif").is_file()
    printed = re.findall(r"\S+\.(?:tif|pt)\b", out)
    assert printed and all((tmp_path / p).is_file() for p in printed), out


def test_demo_says_when_its_time_cap_ended_training(tmp_path, capsys):
    # A cap of 6 ms: the first step already takes longer, so training ends after 1 of 50 steps.
    argv = ["demo", str(tmp_path / "d"), "--kind", "digits", "--labelled", "2", *TINY,
            "--steps", "50", "--minutes", "0.0001"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "the 0.0001-minute cap (--minutes 0.0001) ended training after 1 of 50 steps" in out
    assert "README.md gives the expected figures" in out


def test_train_says_when_minutes_ended_training(sample_dir, tmp_path, capsys):
    argv = ["train", str(sample_dir / "image.tif"), str(sample_dir / "labels.tif"), "-o",
            str(tmp_path / "m.pt"), "--no-runs", *TINY, "--steps", "50", "--minutes", "0.0001"]
    assert main(argv) == 0
    assert "cap (--minutes 0.0001) ended training after 1 of 50 steps" in capsys.readouterr().out


def _help(verb: str) -> str:
    from semiseg.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices[verb].format_help()


def _entries(help_text: str) -> dict[str, str]:
    """Argument -> its help entry (wrapped lines joined), from argparse's rendered help."""
    entries, key = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-{0,2}[\w-]+)(.*)$", line)
        if m:
            key = m.group(1)
            entries[key] = m.group(2)
        elif key and line.startswith("      "):
            entries[key] += " " + line.strip()
        else:
            key = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_train_help_describes_the_verb_its_arguments_and_every_default():
    from semiseg.cli import build_parser

    text = _help("train")
    assert "Train a model on an image and sparse labels." in " ".join(text.split())  # description
    entries = _entries(text)
    assert entries["image"].startswith("image volume (Z, Y, X)")
    assert entries["labels"].startswith("labels of the image's (Z, Y, X) shape")
    assert "model file to write" in entries["-o"]
    assert entries["--crop"].endswith("(default: the continued model's, else the slice's smaller side up to 160, "
                                      "on the CPU less for methods with costlier steps, 96 for 3D methods)")
    for option, default in (("--batch-size", "8"), ("--steps", "300"),
                            ("--anneal", "0.0"), ("--seed", "0"), ("--device", "auto")):
        assert entries[option].endswith(f"(default: {default})"), entries[option]
    # Every argument has a help text, and every option with a default shows it.
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        assert action.help, action.dest
        if action.default is None or action.default is False or action.default == []:
            continue
        if action.default != argparse.SUPPRESS:
            assert entries[action.option_strings[0]].endswith(f"(default: {action.default})"), action.dest


def test_demo_help_shows_its_own_defaults():
    entries = _entries(_help("demo"))
    assert entries["out_dir"].endswith("(default: demo-output)")
    assert entries["--steps"].endswith("(default: 400)") and entries["--minutes"].endswith("(default: 4.0)")


def _bad(tmp_path, name, data):
    p = tmp_path / name
    write_volume(p, data)
    return p


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("dims", "3D"),
        ("mismatch", "does not match"),
        ("empty", "no annotated slice"),
        ("float", "integer"),
        ("nan", "NaN"),
        ("method", "unknown method"),
        ("param", "unknown parameter"),
        ("patch_depth", "patch_depth 9 exceeds the 8 slices"),
        ("context", "context 8 needs at least 9 slices"),
        ("negative-context", "context must be an integer >= 0"),
    ],
)
def test_train_bad_input(tmp_path, sample_dir, case, message, capsys):
    image, labels = str(sample_dir / "image.tif"), str(sample_dir / "labels.tif")
    extra = []
    if case == "missing":
        image = str(tmp_path / "none.tif")
    elif case == "dims":
        image = str(_bad(tmp_path, "img2d.npy", np.zeros((32, 36), np.float32)))
    elif case == "mismatch":
        labels = str(_bad(tmp_path, "lab.npy", np.ones((8, 32, 35), np.uint8)))
    elif case == "empty":
        labels = str(_bad(tmp_path, "lab.npy", np.zeros((8, 32, 36), np.uint8)))
    elif case == "float":
        labels = str(_bad(tmp_path, "lab.npy", np.ones((8, 32, 36), np.float32)))
    elif case == "nan":
        img = read_volume(sample_dir / "image.tif").astype(np.float32)
        img[2, 3, 4] = np.nan
        image = str(_bad(tmp_path, "img.npy", img))
    elif case == "method":
        extra = ["--method", "nope"]
    elif case == "param":
        extra = ["--param", "bogus=1"]
    elif case == "patch_depth":  # a 3D patch deeper than the thin stack
        extra = ["--method", "unet3d", "--param", "patch_depth=9"]
    elif case == "context":  # 8 slices: at most 7 neighbours to reflect
        extra = ["--context", "8"]
    elif case == "negative-context":
        extra = ["--context", "-1"]
    before = {p: file_hash(p) for p in (image, labels) if os.path.exists(p)}
    out = tmp_path / "model.pt"
    code = main(["train", image, labels, "-o", str(out), *TINY, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()
    assert {p: file_hash(p) for p in before} == before


def test_train_predict_unet3d(sample_dir, tmp_path, capsys):
    model = tmp_path / "m3d.pt"
    args = ["train", str(sample_dir / "image.tif"), str(sample_dir / "labels.tif"), "-o", str(model)]
    assert main([*args, "--method", "unet3d", *TINY]) == 0
    assert semiseg.load_model(model).window_size == (8, 32, 32)
    mask = tmp_path / "mask.tif"
    assert main(["predict", str(model), str(sample_dir / "image.tif"), "-o", str(mask)]) == 0
    assert read_volume(mask).shape == (8, 32, 36)
    capsys.readouterr()
    assert main(["methods", "--params"]) == 0
    out = capsys.readouterr().out
    assert "unet3d" in out and "patch_depth" in out and "spacing" in out


def test_predict_unreadable_model(tmp_path, sample_dir, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage")
    code = main(["predict", str(bad), str(sample_dir / "image.tif"), "-o", str(tmp_path / "m.tif")])
    assert code == 2
    assert "not a napari-semiseg model" in capsys.readouterr().err
    assert not (tmp_path / "m.tif").exists()


def test_python_dash_m_and_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "semiseg", "train", str(tmp_path / "x.tif"), str(tmp_path / "y.tif"), "-o", str(tmp_path / "m.pt")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr


def test_continue_with_another_method_is_refused_and_names_init_from(sample_dir, model_path, tmp_path, capsys):
    image, labels = str(sample_dir / "image.tif"), str(sample_dir / "labels.tif")
    out = tmp_path / "mt.pt"
    capsys.readouterr()
    code = main(["train", image, labels, "-o", str(out), "--continue-from", str(model_path),
                 "--method", "mean-teacher", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'supervised'" in err and f"--init-from {model_path}" in err
    assert not out.exists()
    # the model's own method, named or not, continues it
    assert main(["train", image, labels, "-o", str(out), "--continue-from", str(model_path),
                 "--method", "supervised", *TINY]) == 0
    code = main(["train", image, labels, "-o", str(out), "--continue-from", str(model_path),
                 "--init-from", str(model_path), *TINY])
    assert code == 2 and "not both" in capsys.readouterr().err


def test_init_from_starts_a_new_method_from_the_models_weights(sample_dir, model_path, tmp_path):
    import semiseg

    image, labels = str(sample_dir / "image.tif"), str(sample_dir / "labels.tif")
    out = tmp_path / "st.pt"
    args = ["train", image, labels, "-o", str(out), "--init-from", str(model_path), "--method", "self-training",
            "--steps", "2", "--batch-size", "2", "--crop", "32", "--no-runs"]
    assert main(args) == 0  # features come from the model: no --param needed
    model = semiseg.load_model(out)
    assert model.method.name == "self-training" and model.method.params.features == (8, 16)
    assert [h["method"] for h in model.history] == ["supervised", "self-training"]


def test_suggest_prints_a_header_over_its_columns(sample_dir, model_path, capsys):
    capsys.readouterr()
    argv = ["suggest", str(model_path), str(sample_dir / "image.tif"), str(sample_dir / "labels.tif"), "-n", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["slice", "relative", "score", "mass"]
    assert "axis 0, best first" in lines[0]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 2 and all(r[0].isdigit() and len(r) == 4 for r in rows)
    assert float(rows[0][1]) == 1.0 and float(rows[1][1]) <= 1.0


def test_runs_counts_painted_and_healthy_tagged_slices_apart(sample_dir, tmp_path, capsys):
    from semiseg.data import HEALTHY, UNKNOWN, write_weak_csv

    labels = read_volume(sample_dir / "labels.tif")
    painted = np.flatnonzero(labels.reshape(len(labels), -1).any(1))
    empty = np.setdiff1d(np.arange(len(labels)), painted)[:3]
    tags = np.full(len(labels), UNKNOWN, np.int8)
    tags[empty] = HEALTHY
    write_weak_csv(tmp_path / "weak.csv", tags)
    out = tmp_path / "m.pt"
    assert main(["train", str(sample_dir / "image.tif"), str(sample_dir / "labels.tif"), "-o", str(out),
                 "--weak", str(tmp_path / "weak.csv"), *TINY]) == 0
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"  {len(painted)} painted slices, 3 healthy-tagged  " in line, line
