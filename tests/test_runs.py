"""Run store: every training run is kept; listing and atomic rollback (API and CLI)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import semiseg
from semiseg.cli import main
from semiseg.io import write_volume
from semiseg.model import ModelFileError
from semiseg.runs import current_run, find_run, list_runs, rollback, run_info, save_run
from semiseg.synthetic import make_phantom

torch.set_num_threads(1)
FAST = ["--steps", "2", "--batch-size", "2", "--crop", "32", "--param", "features=8,16", "--device", "cpu"]


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def data(tmp_path):
    s = make_phantom(0, shape=(6, 32, 32), labelled=2)
    write_volume(tmp_path / "image.tif", s.image)
    write_volume(tmp_path / "labels.tif", s.labels)
    return tmp_path


def _train(d, *extra):
    return main(["train", str(d / "image.tif"), str(d / "labels.tif"), "-o", str(d / "m.pt"), *FAST, *extra])


def test_train_keeps_a_run_per_training(data, capsys):
    assert _train(data) == 0
    assert _train(data, "--method", "mean-teacher") == 0
    runs = list_runs(data / "m.pt")
    assert [r.method for r in runs] == ["supervised", "mean-teacher"]
    assert runs[0].path.parent == data / "m.pt.runs"
    assert runs[0].steps == 2 and runs[0].annotated_slices == 2
    h = runs[1].history[-1]
    assert h["config"]["steps"] == 2 and h["inputs"]["labels"].endswith("labels.tif")
    assert current_run(data / "m.pt").run_id == runs[1].run_id
    capsys.readouterr()
    assert main(["runs", str(data / "m.pt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  ") and runs[0].run_id in out[0]
    assert out[1].startswith("* ") and runs[1].run_id in out[1]


def test_rollback_restores_bytes_and_keeps_current(data, capsys):
    assert _train(data) == 0
    first = list_runs(data / "m.pt")[0]
    assert _train(data, "--method", "entropy-min") == 0
    assert main(["rollback", str(data / "m.pt"), first.run_id[:12]]) in (0, 2)  # prefix may be ambiguous
    assert main(["rollback", str(data / "m.pt"), first.run_id]) == 0
    assert sha(data / "m.pt") == sha(first.path)
    assert semiseg.load_model(data / "m.pt").method.name == "supervised"
    # roll forward again: nothing was lost
    assert main(["rollback", str(data / "m.pt"), "latest"]) == 0
    assert semiseg.load_model(data / "m.pt").method.name == "entropy-min"
    assert len(list_runs(data / "m.pt")) == 2


def test_rollback_keeps_a_model_not_in_the_store(data):
    assert _train(data) == 0
    run = list_runs(data / "m.pt")[0]
    other = semiseg.load_model(data / "m.pt")
    other.history.append({"note": "edited"})
    other.save(data / "m.pt")  # written outside the store
    rollback(data / "m.pt", run.run_id)
    runs = list_runs(data / "m.pt")
    assert len(runs) == 2 and runs[-1].history[-1] == {"note": "edited"}


def test_user_runs_folder_and_no_runs(data):
    folder = data / "my runs"
    folder.mkdir()
    assert _train(data, "--runs-dir", str(folder)) == 0
    assert len(list_runs(data / "m.pt", folder)) == 1 and not (data / "m.pt.runs").exists()
    assert _train(data, "--no-runs") == 0
    assert not (data / "m.pt.runs").exists()


@pytest.mark.parametrize("rid,fragment", [("nope", "no run"), ("-9", "only"), ("2", "ambiguous")])
def test_find_run_errors(data, rid, fragment):
    model = semiseg.train(
        np.random.default_rng(0).random((2, 16, 16)), np.ones((2, 16, 16), np.uint8) * [[[0]], [[1]]],
        params={"features": (8, 16)}, config=semiseg.TrainConfig(steps=1, batch_size=1, crop=16),
    )
    save_run(model, data / "m.pt")
    time.sleep(0.002)
    save_run(model, data / "m.pt")
    with pytest.raises(semiseg.InputError, match=fragment):
        find_run(data / "m.pt", rid)


def test_rollback_refuses_damaged_run_and_changes_nothing(data, capsys):
    assert _train(data) == 0
    assert _train(data) == 0
    runs = list_runs(data / "m.pt")
    runs[0].path.write_bytes(runs[0].path.read_bytes()[:100])
    before = sha(data / "m.pt")
    capsys.readouterr()
    # a damaged run is not listed, so it cannot be named
    assert main(["rollback", str(data / "m.pt"), runs[0].run_id]) == 2
    assert sha(data / "m.pt") == before
    assert "error:" in capsys.readouterr().err


def test_run_info_describes_a_stored_run_and_refuses_other_files(data):
    assert _train(data) == 0
    stored = list_runs(data / "m.pt")[-1]
    info = run_info(stored.path)
    assert (info.run_id, info.method, info.steps) == (stored.run_id, "supervised", 2)
    bad = data / "not-a-model.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFileError):
        run_info(bad)
    with pytest.raises(ModelFileError):
        run_info(data / "missing.pt")


def test_plugin_store_is_a_folder_without_a_model_path(tmp_path, monkeypatch, tiny_model):
    from semiseg.runs import plugin_runs_dir

    monkeypatch.setenv("SEMISEG_RUNS_DIR", str(tmp_path / "store"))
    folder = plugin_runs_dir()
    assert folder == tmp_path / "store"
    monkeypatch.delenv("SEMISEG_RUNS_DIR")
    assert plugin_runs_dir() == Path.home() / ".napari-semiseg" / "runs"
    assert list_runs(None, folder) == []
    info = save_run(tiny_model, None, folder)
    assert info.path.parent == folder and not (folder / "model.pt").exists()
    assert [r.path for r in list_runs(None, folder)] == [info.path]
    with pytest.raises(ValueError, match="model path or a runs folder"):
        list_runs(None)
