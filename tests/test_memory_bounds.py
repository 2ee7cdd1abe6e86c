"""Streamed prediction: memory bounded by the slab, not the volume (issue #16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from semiseg import cli
from semiseg.data import Normaliser
from semiseg.inference import SLAB_MEMORY, iter_predict_volume, predict_volume, slab_slices
from semiseg.io import open_zarr_array, write_volume
from semiseg.methods import get_method
from semiseg.model import Model

from ._util import TINY_PARAMS

# Peak RSS of predict_to_zarr in a fresh process. The network is one 1x1 convolution so the test
# runs in seconds: what holds memory is the pipeline (reading, normalising, windows, class
# probabilities, argmax, writing), the network's activations are one window's.
_SCRIPT = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from semiseg.data import Normaliser
from semiseg.io import open_zarr_array
from semiseg.lazy import predict_to_zarr
from semiseg.methods import get_method
from semiseg.model import Model
torch.manual_seed(0)
method = get_method("supervised")(1, 2, params={"features": (4, 8)}, device="cpu")
method.nets["seg"] = torch.nn.Conv2d(1, 2, 1)
model = Model(method, Normaliser((100.0,), (1500.0,)), 0, tile_size=256)
predict_to_zarr(model, open_zarr_array(sys.argv[1]), {"mask": sys.argv[2]}, batch_size=8)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _stack(path: Path, n: int, side: int):
    arr = zarr.create_array(str(path), shape=(n, side, side), chunks=(1, side, side), dtype="uint16")
    base = (1000 + 500 * np.sin(np.arange(side) / 37.0))[None, :].astype(np.float32)
    for i in range(n):
        noise = np.random.default_rng(i).integers(0, 400, (side, side), dtype=np.uint16)
        arr[i] = (base + noise).astype(np.uint16)
    return path


def _peak_rss_mb(image: Path, out: Path) -> float:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(image), str(out)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


@pytest.mark.slow
def test_peak_rss_of_chunked_prediction_does_not_grow_with_the_slices(tmp_path):
    side = 2048
    rss = {n: _peak_rss_mb(_stack(tmp_path / f"v{n}.zarr", n, side), tmp_path / f"m{n}.zarr") for n in (8, 32)}
    assert open_zarr_array(tmp_path / "m32.zarr").shape == (32, side, side)
    # Before the fix: 1505 MB and 2487 MB (two slabs of 8 slices in flight once there are two).
    assert abs(rss[32] - rss[8]) <= 0.10 * rss[8], rss
    assert rss[32] < 2048, rss


def _model(k=2):
    import torch

    torch.manual_seed(0)
    method = get_method("supervised")(1, k, params=TINY_PARAMS, device="cpu")
    return Model(method, Normaliser((0.0,), (100.0,)), 0)


@pytest.mark.parametrize(("shape", "batch", "expected"), [
    ((64, 64), 8, 8),  # small slices: the batch size
    ((2048, 2048), 8, 3),  # 2048^2, one channel, two classes: 3 slices of 4 + 4 + 8 + 1 B/px
    ((2048, 2048), 2, 2),
    ((20000, 20000), 8, 1),  # never fewer than one slice
])
def test_slab_slices_keep_a_slab_within_the_budget(shape, batch, expected):
    n = slab_slices(_model(), shape, batch)
    assert n == expected
    assert n == 1 or n * (4 + 4 + 8 + 1) * shape[0] * shape[1] <= SLAB_MEMORY


def test_large_slices_go_in_smaller_batches_and_stream_into_zarr(tmp_path, monkeypatch):
    import semiseg.inference as inference

    monkeypatch.setattr(inference, "SLAB_MEMORY", 3 * 17 * 40 * 40)  # three 40 x 40 slices
    model = _model()
    image = np.random.default_rng(0).uniform(0, 100, (10, 40, 40)).astype(np.float32)
    out = {"mask": zarr.create_array(str(tmp_path / "m.zarr"), shape=image.shape, chunks=(1, 40, 40), dtype="uint8")}
    steps = [p.step for p in iter_predict_volume(model, image, batch_size=8, probabilities=False, out=out)]
    assert steps == [0, 3, 6, 9, 10]
    ref = predict_volume(_model(), image, batch_size=1)["mask"]
    np.testing.assert_array_equal(out["mask"][...], ref)


def test_cli_streams_zarr_outputs_of_an_in_memory_image(tmp_path, monkeypatch, capsys):
    import semiseg.lazy

    model = _model()
    model.save(tmp_path / "model.pt")
    image = np.random.default_rng(0).uniform(0, 100, (6, 40, 40)).astype(np.float32)
    write_volume(tmp_path / "in.tif", image)
    used = []
    real = semiseg.lazy.predict_to_zarr
    monkeypatch.setattr(semiseg.lazy, "predict_to_zarr", lambda *a, **k: used.append(1) or real(*a, **k))
    code = cli.main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "in.tif"), "-o", str(tmp_path / "m.zarr"),
                     "--prob", str(tmp_path / "p.zarr"), "--device", "cpu"])
    assert code == 0 and used == [1] and "slab by slab" in capsys.readouterr().out
    ref = predict_volume(model, image, probabilities=True)
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "m.zarr")[...], ref["mask"])
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "p.zarr")[...], ref["probabilities"])
