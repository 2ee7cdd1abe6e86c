"""Lazy, chunked prediction (semiseg.lazy) and lazy training inputs."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import zarr

import semiseg
from semiseg import cli
from semiseg.data import InputError, Normaliser, SliceSampler, as_channels, make_pools
from semiseg.inference import predict_volume
from semiseg.io import open_zarr_array
from semiseg.lazy import is_lazy, lazy_predict, open_scheduler, predict_to_zarr
from semiseg.methods import get_method
from semiseg.model import Model

from ._util import TINY_PARAMS


def _to_zarr(path, a, chunks=None):
    z = zarr.create_array(
        str(path), shape=a.shape, chunks=chunks or (1, *a.shape[1:]), dtype=a.dtype, overwrite=True
    )
    z[...] = a
    return open_zarr_array(path)


def _untrained(method="supervised", axis=0, shape=(1, 4), seed=0):
    import torch

    torch.manual_seed(seed)
    params = dict(TINY_PARAMS)
    if method == "translation":
        params.update(disc_features=(8, 16), unique_channels=4)
    net = get_method(method)(shape[0], 2, params=params, device="cpu")
    return Model(net, Normaliser((float(shape[1]),), (200.0,)), axis)


@pytest.mark.parametrize(
    ("axis", "batch_size", "probabilities"),
    [(0, 4, True), (0, 1, False), (1, 3, True), (2, 8, False)],
)
def test_chunked_matches_in_memory(tmp_path, tiny_phantom, tiny_model, axis, batch_size, probabilities):
    model = dataclasses.replace(tiny_model, axis=axis)
    image = tiny_phantom.image
    lazy = _to_zarr(tmp_path / "in.zarr", image)
    ref = predict_volume(model, image, batch_size=batch_size, probabilities=probabilities)
    modes = {k: n.training for k, n in model.method.nets.items()}
    paths = {"mask": tmp_path / "mask.zarr"}
    if probabilities:
        paths["probabilities"] = tmp_path / "prob.zarr"
    predict_to_zarr(model, lazy, paths, batch_size=batch_size)
    mask = open_zarr_array(paths["mask"])
    assert mask.dtype == ref["mask"].dtype
    np.testing.assert_array_equal(mask[...], ref["mask"])
    chunks = [*image.shape]
    chunks[axis] = 1
    assert mask.chunks == tuple(chunks)  # one chunk per slice: slabs never share a chunk
    if probabilities:
        np.testing.assert_array_equal(open_zarr_array(paths["probabilities"])[...], ref["probabilities"])
    assert modes == {k: n.training for k, n in model.method.nets.items()}  # modes restored


def test_lazy_outputs_match_in_memory(tmp_path):
    model = _untrained("translation")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 400, size=(6, 16, 24)).astype(np.uint16)
    ref = predict_volume(model, image, batch_size=4, outputs=("residual", "healthy"))
    arrays = lazy_predict(model, _to_zarr(tmp_path / "in.zarr", image), batch_size=4,
                          outputs=("residual", "healthy"), probabilities=True)
    for key in ("mask", "probabilities", "residual", "healthy"):
        got = arrays[key].compute(scheduler="synchronous")
        np.testing.assert_array_equal(got, ref[key], err_msg=key)


def test_dask_input_and_progress_counts_slabs(tmp_path, tiny_phantom, tiny_model):
    import dask.array as da

    image = da.from_array(tiny_phantom.image, chunks=(2, 36, 40))
    calls = []
    predict_to_zarr(tiny_model, image, {"mask": tmp_path / "m.zarr"}, batch_size=3,
                    progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (4, 4) and len(calls) == 4  # ceil(10 / 3) slabs, one report each
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "m.zarr")[...],
                                  predict_volume(tiny_model, tiny_phantom.image, batch_size=3)["mask"])


def test_peak_memory_independent_of_volume(tmp_path):
    """Host allocations during chunked prediction stay a few slabs, whatever the volume size."""
    model = _untrained()

    def peak(n, chunked=True):
        image = np.random.default_rng(n).integers(0, 300, size=(n, 128, 128)).astype(np.uint16)
        lazy = _to_zarr(tmp_path / f"in{n}-{chunked}.zarr", image)
        paths = {"mask": tmp_path / "m.zarr", "probabilities": tmp_path / "p.zarr"}
        tracemalloc.start()
        try:
            if chunked:
                predict_to_zarr(model, lazy, paths, batch_size=4, scheduler="synchronous")
            else:
                predict_volume(model, lazy, batch_size=4, probabilities=True)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(4)  # warm-up: first-use imports allocate too
    small, big = peak(24), peak(96)
    probs = 2 * 128 * 128 * 4  # float32 probabilities of one slice
    assert peak(96, chunked=False) > 96 * probs  # the measure sees whole-volume allocations ...
    assert big < 96 * probs / 2  # ... the chunked path holds a few slabs (plus the task graph),
    assert big - small < 72 * probs / 4  # and 4x the slices adds only graph bookkeeping


def test_model_handle_pickles_as_model_file_bytes(tiny_phantom, tiny_model):
    import pickle

    from semiseg.lazy import ModelHandle

    handle = ModelHandle(tiny_model, "cpu")
    data = pickle.dumps(handle)
    assert b"napari-semiseg-model" in data  # the safe model file, not pickled torch objects
    copy = pickle.loads(data)
    model = copy.get()
    assert model is not tiny_model and model is copy.get()  # loaded once, then reused
    assert not any(n.training for n in model.method.nets.values())
    x = tiny_phantom.image[:4]
    np.testing.assert_array_equal(predict_volume(model, x)["probabilities"],
                                  predict_volume(tiny_model, x)["probabilities"])


def test_local_cluster_scheduler(tmp_path, tiny_phantom, tiny_model):
    distributed = pytest.importorskip("distributed")
    image = _to_zarr(tmp_path / "in.zarr", tiny_phantom.image)
    model_path = tiny_model.save(tmp_path / "model.pt")
    ref = predict_volume(tiny_model, tiny_phantom.image, batch_size=4, probabilities=True)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        code = cli.main([
            "predict", str(model_path), str(tmp_path / "in.zarr"), "-o", str(tmp_path / "m.zarr"),
            "--prob", str(tmp_path / "p.zarr"), "--batch-size", "4", "--device", "cpu",
            "--scheduler", cluster.scheduler_address,
        ])
    assert code == 0
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "m.zarr")[...], ref["mask"])
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "p.zarr")[...], ref["probabilities"])
    assert is_lazy(image)


def test_cli_zarr_to_zarr_is_chunked(tmp_path, tiny_phantom, tiny_model, monkeypatch, capsys):
    import semiseg.lazy

    _to_zarr(tmp_path / "in.zarr", tiny_phantom.image)
    tiny_model.save(tmp_path / "model.pt")
    used = []
    real = semiseg.lazy.predict_to_zarr
    monkeypatch.setattr(semiseg.lazy, "predict_to_zarr", lambda *a, **k: used.append(1) or real(*a, **k))
    code = cli.main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "in.zarr"),
                     "-o", str(tmp_path / "m.zarr"), "--device", "cpu"])
    assert code == 0 and used == [1]
    assert "slab by slab" in capsys.readouterr().out
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "m.zarr")[...],
                                  predict_volume(tiny_model, tiny_phantom.image)["mask"])


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["-o", "{tmp}/m.tif", "--scheduler", "synchronous"], "--scheduler writes zarr"),
        (["-o", "{tmp}/m.zarr", "--scheduler", "not an address"], "scheduler must be"),
    ],
)
def test_cli_scheduler_bad_input(tmp_path, tiny_phantom, tiny_model, capsys, argv_tail, message):
    _to_zarr(tmp_path / "in.zarr", tiny_phantom.image)
    tiny_model.save(tmp_path / "model.pt")
    argv = ["predict", str(tmp_path / "model.pt"), str(tmp_path / "in.zarr"), "--device", "cpu"]
    code = cli.main(argv + [a.format(tmp=tmp_path) for a in argv_tail])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "m.tif").exists()


def test_predict_to_zarr_bad_arguments(tmp_path, tiny_model):
    image = np.zeros((4, 16, 16), np.uint16)
    with pytest.raises(InputError, match=r"must end in \.zarr"):
        predict_to_zarr(tiny_model, image, {"mask": tmp_path / "m.tif"})
    with pytest.raises(InputError, match="needs a 'mask'"):
        predict_to_zarr(tiny_model, image, {"probabilities": tmp_path / "p.zarr"})
    with pytest.raises(InputError, match="channel"):
        lazy_predict(tiny_model, np.zeros((2, 4, 16, 16), np.uint16))
    with pytest.raises(InputError, match="batch_size"):
        lazy_predict(tiny_model, image, batch_size=0)
    with pytest.raises(InputError, match="scheduler must be"):
        with open_scheduler("bogus"):
            pass


# ----------------------------------------------------------------------------- lazy training
class CountingArray:
    """A chunked array that records how many voxels are read from it."""

    def __init__(self, a, chunks):
        self.a, self.chunks, self.read = a, chunks, 0
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim

    def __getitem__(self, idx):
        out = self.a[idx]
        self.read += np.asarray(out).size
        return out


def test_training_never_loads_the_whole_volume():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 500, size=(200, 32, 32)).astype(np.uint16)
    labels = np.zeros(image.shape, np.uint8)
    labels[[20, 150], 8:20, 8:20] = 1
    counting = CountingArray(image, (1, 32, 32))
    config = semiseg.TrainConfig(steps=2, batch_size=2, crop=32, seed=0)
    model = semiseg.train(counting, labels, params=TINY_PARAMS, config=config, device="cpu")
    assert 0 < counting.read < 0.5 * image.size  # 64 slices for percentiles + a few crops
    ref = semiseg.train(image, labels, params=TINY_PARAMS, config=config, device="cpu")
    assert model.normaliser == ref.normaliser
    w, w_ref = model.method.state_dict()["nets"], ref.method.state_dict()["nets"]
    for k in w["seg"]:
        np.testing.assert_array_equal(w["seg"][k].numpy(), w_ref["seg"][k].numpy())


def test_normaliser_fit_reads_only_sampled_slices():
    image = np.arange(300 * 8 * 8, dtype=np.float32).reshape(1, 300, 8, 8)
    counting = CountingArray(image, (1, 1, 8, 8))
    assert Normaliser.fit(counting, max_slices=10) == Normaliser.fit(image, max_slices=10)
    assert counting.read == 10 * 64


def test_slice_cache_is_lru_and_bounded():
    image = as_channels(np.random.default_rng(0).random((12, 16, 16)).astype(np.float32))
    counting = CountingArray(image, (1, 1, 16, 16))
    labels = np.zeros((12, 16, 16), np.uint8)
    labels[0, :4, :4] = 1
    slice_bytes = 16 * 16 * 4
    s = SliceSampler(counting, labels, make_pools(labels), Normaliser((0.0,), (1.0,)),
                     crop=16, cache_bytes=3 * slice_bytes)
    for i in range(6):
        s.slice_image(i)
    assert list(s._cache) == [3, 4, 5] and s._cached_bytes == 3 * slice_bytes
    before = counting.read
    s.slice_image(3)  # a hit: no read, and 3 becomes the most recent
    assert counting.read == before
    s.slice_image(0)  # a miss evicts the least recently used (4)
    assert list(s._cache) == [5, 3, 0] and counting.read == before + 256
    np.testing.assert_allclose(s.slice_image(0), 2 * image[:, 0] - 1, rtol=1e-6)
