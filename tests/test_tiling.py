"""Prediction in windows of the training crop (``Model.tile_size``)."""

import itertools
import json

import numpy as np
import pytest
import torch

import semiseg
from semiseg.inference import (
    apply_to_slices,
    gaussian_window,
    predict_normalised_slices,
    window_starts,
)
from semiseg.methods import get_method
from semiseg.suggest import uncertainty_slices

from ._util import TINY_PARAMS


def tiny_method():
    return get_method("supervised")(1, 2, params=TINY_PARAMS)


class PredictSpy:
    """Wraps ``method.predict`` and records the (H, W) of every input."""

    def __init__(self, method):
        self.sizes = []
        self._predict = method.predict
        method.predict = self

    def __call__(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self._predict(x)


@pytest.mark.parametrize(("size", "tile"), [(10, 32), (32, 32), (33, 32), (100, 32), (129, 96), (512, 96)])
def test_window_starts_cover_with_overlap(size, tile):
    starts = window_starts(size, tile, 0.25)
    covered = np.zeros(max(size, tile), bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered[:size].all()
    assert starts[0] == 0 and starts == sorted(set(starts))
    if size > tile:
        assert starts[-1] == size - tile
        assert all(b - a <= tile * 0.75 for a, b in itertools.pairwise(starts))
    else:
        assert starts == [0]


def test_gaussian_window_peaks_in_the_centre_and_stays_positive():
    w = gaussian_window(32, torch.device("cpu"))
    assert w.shape == (32, 32) and float(w.min()) > 0
    assert float(w[15, 15]) == pytest.approx(1.0, abs=1e-3)
    assert float(w[0, 0]) < float(w[8, 8]) < float(w[15, 15])


@pytest.mark.parametrize("shape", [(2, 1, 50, 77), (1, 1, 20, 100), (3, 2, 33, 33)])
def test_windows_blend_a_pixelwise_map_exactly(shape):
    # A per-pixel map must come out of the blending unchanged: weights are normalised and
    # every pixel is covered, also where one side is shorter than the window.
    method = tiny_method()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    seen = []

    def fn(t):
        seen.append(tuple(t.shape[-2:]))
        return {"double": 2 * t, "first": t[:, :1]}

    out = apply_to_slices(method, x, fn, tile_size=32)
    np.testing.assert_allclose(out["double"].numpy(), 2 * x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["first"].numpy(), x[:, :1], rtol=1e-5, atol=1e-5)
    assert set(seen) == {(32, 32)} and len(seen) > 1


def test_slices_larger_than_the_crop_are_predicted_in_windows():
    method = tiny_method()
    spy = PredictSpy(method)
    x = np.random.default_rng(1).standard_normal((2, 1, 70, 45)).astype(np.float32)
    res = predict_normalised_slices(method, x, tile_size=32)
    assert res["probabilities"].shape == (2, 2, 70, 45) and res["mask"].shape == (2, 70, 45)
    np.testing.assert_allclose(res["probabilities"].sum(1), 1, atol=1e-5)
    assert set(spy.sizes) == {(32, 32)} and len(spy.sizes) == 3 * 2


def test_slices_within_the_crop_or_without_tile_are_predicted_whole():
    x = np.random.default_rng(2).standard_normal((1, 1, 30, 20)).astype(np.float32)
    method = tiny_method()
    spy = PredictSpy(method)
    predict_normalised_slices(method, x, tile_size=32)
    m = method.size_multiple
    assert spy.sizes == [(-(-30 // m) * m, -(-20 // m) * m)]  # whole, padded to the size multiple
    big = np.random.default_rng(2).standard_normal((1, 1, 64, 64)).astype(np.float32)
    method = tiny_method()
    spy = PredictSpy(method)
    predict_normalised_slices(method, big, tile_size=None)
    assert spy.sizes == [(64, 64)]


def test_windowed_prediction_matches_the_crop_in_a_window_centre():
    # With instance normalisation a whole slice and a crop of it give different outputs; the
    # windowed prediction of the whole slice reproduces the crop's where one window dominates.
    method = tiny_method()
    x = np.random.default_rng(3).standard_normal((1, 1, 32 + 24, 32)).astype(np.float32)
    tiled = predict_normalised_slices(method, x, tile_size=32)["probabilities"]
    crop = predict_normalised_slices(method, x[..., :32, :], tile_size=32)["probabilities"]
    np.testing.assert_allclose(tiled[..., 8:12, 14:18], crop[..., 8:12, 14:18], atol=2e-3)
    whole = predict_normalised_slices(method, x, tile_size=None)["probabilities"]
    assert not np.allclose(whole[..., :32, :], crop, atol=1e-4)


def test_uncertainty_uses_the_same_windows():
    method = tiny_method()
    spy = PredictSpy(method)
    x = np.random.default_rng(4).standard_normal((2, 1, 60, 60)).astype(np.float32)
    unc, probs = uncertainty_slices(method, x, tta=True, tile_size=32)
    assert unc.shape == (2, 60, 60) and probs.shape == (2, 2, 60, 60)
    assert set(spy.sizes) == {(32, 32)} and len(spy.sizes) == 8 * len(window_starts(60, 32)) ** 2
    # Default uncertainty: entropy of the blended probabilities.
    p = np.clip(probs, 1e-8, 1)
    np.testing.assert_allclose(unc, -(p * np.log(p)).sum(1), atol=1e-4)


def test_training_sets_the_window_and_model_files_keep_it(tiny_phantom, tmp_path):
    s = tiny_phantom
    model = semiseg.train(
        s.image, s.labels, tags=s.tags, params=TINY_PARAMS,
        config=semiseg.TrainConfig(steps=1, batch_size=2, crop=24, seed=0), device="cpu",
    )
    assert model.tile_size == 24
    path = model.save(tmp_path / "m.semiseg")
    assert semiseg.load_model(path).tile_size == 24
    model.tile_size = None
    assert semiseg.load_model(model.save(tmp_path / "none.semiseg")).tile_size is None
    # Continuing with another crop predicts with the new one.
    model = semiseg.train(
        s.image, s.labels, tags=s.tags, model=model,
        config=semiseg.TrainConfig(steps=1, batch_size=2, crop=16, seed=0), device="cpu",
    )
    assert model.tile_size == 16


def test_model_files_from_before_the_window_use_their_training_crop(tiny_model, tmp_path):
    # Files written before tile_size was stored: the crop of the last training run.
    path = tiny_model.save(tmp_path / "old.semiseg")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    del cfg["tile_size"]
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    assert semiseg.load_model(path).tile_size == tiny_model.history[-1]["config"]["crop"] == 32
    cfg["history"] = []
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    assert semiseg.load_model(path).tile_size is None


@pytest.mark.parametrize("bad", [-5, 0, 3, "96", 12.5, True])
def test_model_files_with_a_bad_window_are_refused(tiny_model, tmp_path, bad):
    path = tiny_model.save(tmp_path / "bad.semiseg")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    cfg["tile_size"] = bad
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    with pytest.raises(semiseg.ModelFileError, match="damaged model configuration"):
        semiseg.load_model(path)


@pytest.mark.parametrize("overlap", [-0.5, 1.0, 2.0])
def test_bad_overlap_is_refused(overlap):
    # Overlap < 0 would leave gaps between windows (pixels with no prediction).
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 32, overlap)
    x = np.zeros((1, 1, 64, 64), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        apply_to_slices(tiny_method(), x, lambda t: {"a": t}, tile_size=32, overlap=overlap)


def test_the_window_is_the_models_setting_not_the_methods():
    method = tiny_method()
    with pytest.raises(AttributeError, match=r"Model\.tile_size"):
        method.tile_size = 32
    with pytest.raises(AttributeError, match=r"Model\.tile_size"):
        _ = method.tile_size


def test_model_predictions_use_the_models_window():
    model = semiseg.Model(tiny_method(), semiseg.Normaliser((-1.0,), (1.0,)), tile_size=32)
    spy = PredictSpy(model.method)
    image = np.random.default_rng(5).standard_normal((2, 70, 45)).astype(np.float32)
    model.predict(image, batch_size=2)
    assert set(spy.sizes) == {(32, 32)} and len(spy.sizes) == 3 * 2
    spy.sizes.clear()
    model.tile_size = None
    model.predict(image, batch_size=2)
    m = model.method.size_multiple
    assert spy.sizes == [(-(-70 // m) * m, -(-45 // m) * m)]


@pytest.mark.parametrize("key", ["normaliser", "axis"])
def test_model_files_without_a_prediction_setting_are_refused(tiny_model, tmp_path, key):
    path = tiny_model.save(tmp_path / "bad.semiseg")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    del cfg[key]
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    with pytest.raises(semiseg.ModelFileError, match="damaged model configuration"):
        semiseg.load_model(path)
