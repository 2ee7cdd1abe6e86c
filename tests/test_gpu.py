"""The GPU path: out-of-memory handling, torch.compile, memory release, AMP / channels_last.

Tests marked ``gpu`` need CUDA and skip themselves without it; the others run on the CPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import semiseg
from semiseg.data import InputError, Normaliser, as_channels
from semiseg.engine import TrainingError
from semiseg.methods.supervised import Supervised
from semiseg.model import Model

from ._util import TINY_PARAMS


def _weights(model):
    return {n: t.detach().cpu().clone() for n, t in model.method.nets["seg"].state_dict().items()}


# ----------------------------------------------------------------------------- out of memory
def test_oom_halves_the_batch_and_restores_weights(tiny_phantom, monkeypatch):
    s = tiny_phantom
    sizes, restored = [], []
    real = Supervised.training_step
    init = {}

    def step(self, batch):
        n = batch["labelled"].shape[0]
        sizes.append(n)
        if not init:
            init.update({k: v.clone() for k, v in self.nets["seg"].state_dict().items()})
        if n > 1:
            with torch.no_grad():  # a half-done step corrupts the weights, then memory runs out
                for p in self.nets["seg"].parameters():
                    p.add_(1.0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(sizes) == 3:  # the first step that fits sees the weights from before the fault
            restored.append(all(torch.equal(v, init[k]) for k, v in self.nets["seg"].state_dict().items()))
        return real(self, batch)

    monkeypatch.setattr(Supervised, "training_step", step)
    config = semiseg.TrainConfig(steps=3, batch_size=4, crop=32, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=config, device="cpu")
    assert sizes == [4, 2, 1, 1, 1]  # halved twice, then every step at the size that fits
    assert restored == [True]
    assert [str(w.message) for w in caught if "out of memory" in str(w.message)] == [
        "out of memory: batch halved to {'labelled': 2}",
        "out of memory: batch halved to {'labelled': 1}",
    ]
    assert model.history[-1]["steps"] == 3


def test_oom_at_batch_one_is_a_training_error(tiny_phantom, monkeypatch):
    s = tiny_phantom
    torch.manual_seed(0)
    model = Model(Supervised(1, 2, params=TINY_PARAMS), Normaliser.fit(as_channels(s.image)), 0)
    before = _weights(model)

    def step(self, batch):
        with torch.no_grad():
            for p in self.nets["seg"].parameters():
                p.add_(1.0)
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(Supervised, "training_step", step)
    config = semiseg.TrainConfig(steps=2, batch_size=1, crop=32, seed=0)
    with pytest.raises(TrainingError, match="out of memory"):
        semiseg.train(s.image, s.labels, model=model, config=config, device="cpu")
    after = _weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the last good weights


# ----------------------------------------------------------------------------- torch.compile
def test_compile_flag_is_off_by_default_and_validated():
    assert semiseg.TrainConfig().compile is False
    with pytest.raises(InputError, match="cache_mb"):
        semiseg.TrainConfig(cache_mb=-1)


def test_compiled_training_matches_eager(tiny_phantom):
    """``compile="eager"`` runs the networks through TorchDynamo (fast to compile on a CPU);
    the results must equal plain eager training."""
    pytest.importorskip("torch._dynamo")
    s = tiny_phantom
    kw = {"params": TINY_PARAMS, "device": "cpu"}
    base = semiseg.TrainConfig(steps=2, batch_size=2, crop=32, seed=0)
    ref = semiseg.train(s.image, s.labels, config=base, **kw)
    import dataclasses

    torch._dynamo.reset()
    got = semiseg.train(s.image, s.labels, config=dataclasses.replace(base, compile="eager"), **kw)
    assert got.method.nets["seg"]._compiled_call_impl is not None
    assert set(_weights(got)) == set(_weights(ref))  # state-dict keys unchanged by compiling
    for k, v in _weights(ref).items():
        torch.testing.assert_close(_weights(got)[k], v, rtol=1e-5, atol=1e-6)
    assert got.history[-1]["config"]["compile"] == "eager"


# ----------------------------------------------------------------------------- release
def test_release_drops_optimiser_state(tiny_phantom):
    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, device="cpu",
                          config=semiseg.TrainConfig(steps=1, batch_size=2, crop=32))
    assert any(o.state for o in model.method.opts.values())  # kept for continued training
    model.method.release()
    assert not any(o.state for o in model.method.opts.values())


# ----------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_dtype_and_channels_last():
    m = Supervised(1, 2, params=TINY_PARAMS, device="cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert m.amp and m.amp_dtype == expected
    assert m._scaler.is_enabled() == (expected == torch.float16)
    w = next(p for p in m.nets["seg"].parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert w.is_contiguous(memory_format=torch.channels_last)
    t = m.to_tensor(np.zeros((2, 1, 32, 32), np.float32))
    assert t.device.type == "cuda" and t.is_contiguous(memory_format=torch.channels_last)
    with m.autocast():
        y = m.nets["seg"](t)
    assert y.dtype == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unet3d_trains_on_cuda(tiny_phantom):
    # 5-D weights cannot take the 2D networks' channels_last (placing them raised before).
    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, method="unet3d", params={"features": (4, 8)}, device="cuda",
                          config=semiseg.TrainConfig(steps=2, batch_size=8, crop=16))
    assert model.method.step == 2
    w = model.method.nets["seg"].down[0][0].weight
    assert w.device.type == "cuda" and w.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_frees_cached_memory(tiny_phantom):
    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, device="cuda",
                          config=semiseg.TrainConfig(steps=3, batch_size=4, crop=32))
    assert all(np.isfinite(v) for v in model.history[-1]["losses"].values())
    torch.cuda.synchronize()
    # What stays reserved is what is still allocated (weights, optimiser state), not the cache.
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 32 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_chunked_prediction_matches_in_memory(tmp_path, tiny_phantom):
    import zarr

    from semiseg.io import open_zarr_array
    from semiseg.lazy import predict_to_zarr

    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, device="cuda",
                          config=semiseg.TrainConfig(steps=2, batch_size=2, crop=32))
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=s.image.shape, chunks=(1, *s.image.shape[1:]),
                          dtype=s.image.dtype)
    z[...] = s.image
    ref = semiseg.predict_volume(model, s.image, batch_size=4, probabilities=True)
    predict_to_zarr(model, open_zarr_array(tmp_path / "in.zarr"),
                    {"mask": tmp_path / "m.zarr", "probabilities": tmp_path / "p.zarr"}, batch_size=4)
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "m.zarr")[...], ref["mask"])
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "p.zarr")[...], ref["probabilities"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compile_inductor_trains(tiny_phantom):
    s = tiny_phantom
    torch._dynamo.reset()
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, device="cuda",
                          config=semiseg.TrainConfig(steps=2, batch_size=2, crop=32, compile=True))
    assert model.method.nets["seg"]._compiled_call_impl is not None
    assert all(np.isfinite(v) for v in model.history[-1]["losses"].values())
