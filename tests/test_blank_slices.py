"""Constant (blank) slices and windows are background with certainty (issue #16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semiseg.data import Normaliser
from semiseg.inference import constant_inputs, predict_normalised_slices, predict_volume
from semiseg.methods import get_method
from semiseg.model import Model

from ._util import TINY_PARAMS


def _eager_method(seed=0):
    """An untrained U-Net whose head favours the foreground: without the blank rule it draws
    foreground on every input, blank slices included."""
    torch.manual_seed(seed)
    method = get_method("supervised")(1, 2, params=TINY_PARAMS, device="cpu")
    with torch.no_grad():
        method.nets["seg"].head.bias.copy_(torch.tensor([0.0, 6.0]))
    for net in method.nets.values():
        net.eval()
    return method


def _raw_mask(method, x):
    """The network's own answer on whole slices, no blank rule (the fixture's premise)."""
    with torch.no_grad():
        return method.predict(torch.from_numpy(x))["probabilities"].argmax(1).numpy()


@pytest.mark.parametrize("tile", [None, 32])
@pytest.mark.parametrize("fill", [0.0, -1.0, 0.37])
def test_blank_slice_is_empty_with_certain_background(tile, fill):
    method = _eager_method()
    x = np.full((2, 1, 48, 64), fill, np.float32)
    assert _raw_mask(method, x).any()  # the network alone would draw foreground
    res = predict_normalised_slices(method, x, tile_size=tile)
    assert not res["mask"].any()
    np.testing.assert_array_equal(res["probabilities"][:, 0], 1.0)
    np.testing.assert_array_equal(res["probabilities"][:, 1], 0.0)


@pytest.mark.parametrize("tile", [None, 32])
def test_content_slices_are_untouched(tile):
    method = _eager_method()
    x = np.random.default_rng(0).standard_normal((2, 1, 48, 64)).astype(np.float32)
    x[1, :, :, :8] = 0  # partly blank: still content
    res = predict_normalised_slices(method, x, tile_size=tile)
    if tile is None:
        np.testing.assert_array_equal(res["mask"], _raw_mask(method, x))
    assert res["mask"].mean() > 0.5


def test_partly_blank_slice_is_predicted_where_it_has_content():
    # Windows of 32 across 96 columns start at 0, 21, 43 and 64: content in columns < 48
    # reaches the first three; the last window (64..95) is blank.
    method = _eager_method()
    x = np.zeros((1, 1, 32, 96), np.float32)
    x[..., :48] = np.random.default_rng(1).standard_normal((32, 48))
    res = predict_normalised_slices(method, x, tile_size=32)
    assert res["mask"][0, :, :48].all()  # content keeps the network's (foreground) answer
    assert not res["mask"][0, :, 76:].any()  # only the blank window covers these columns
    np.testing.assert_array_equal(res["probabilities"][0, 0, :, 76:], 1.0)


def test_blank_slices_above_and_below_the_anatomy_are_empty(tmp_path):
    model = Model(_eager_method(), Normaliser((0.0,), (100.0,)), 0, tile_size=32)
    content = np.random.default_rng(2).uniform(0, 100, (3, 40, 50)).astype(np.float32)
    vol = np.concatenate([np.zeros((2, 40, 50), np.float32), content, np.full((2, 40, 50), 55.0, np.float32)])
    res = predict_volume(model, vol, batch_size=4, probabilities=True)
    alone = predict_volume(model, content, batch_size=4)
    assert not res["mask"][:2].any() and not res["mask"][5:].any()
    np.testing.assert_array_equal(res["probabilities"][0, :2], 1.0)
    np.testing.assert_array_equal(res["probabilities"][0, 5:], 1.0)
    np.testing.assert_array_equal(res["mask"][2:5], alone["mask"])  # no over-reach

    from semiseg.io import open_zarr_array
    from semiseg.lazy import predict_to_zarr

    predict_to_zarr(model, vol, {"mask": tmp_path / "m.zarr"}, batch_size=4)
    np.testing.assert_array_equal(open_zarr_array(tmp_path / "m.zarr")[...], res["mask"])


def test_constant_inputs_need_every_channel_constant():
    t = torch.zeros(3, 2, 8, 8)
    t[1, 1, 0, 0] = 1.0  # one channel has content
    t[2] += 0.5
    assert constant_inputs(t).tolist() == [True, False, True]


def test_a_broken_network_is_still_reported_on_blank_slices():
    import semiseg

    method = _eager_method()
    method.predict = lambda x: {"probabilities": torch.full((x.shape[0], 2, *x.shape[2:]), float("nan"))}
    model = Model(method, Normaliser((0.0,), (1.0,)), 0)
    with pytest.raises(semiseg.PredictionError, match="non-finite"):
        predict_volume(model, np.zeros((2, 16, 16), np.float32))
