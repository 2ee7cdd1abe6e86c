"""2.5D slice context (TrainConfig.context): neighbours as channels, reflected at the ends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import semiseg
from semiseg.data import (
    InputError,
    Normaliser,
    SliceSampler,
    _pad_to,
    as_channels,
    check_context,
    context_indices,
    make_pools,
    stack_context,
)
from semiseg.inference import predict_normalised_slices, predict_volume
from semiseg.lazy import lazy_predict, predict_to_zarr
from semiseg.methods import get_method
from semiseg.model import Model
from semiseg.suggest import suggest_slices, uncertainty_volume

from ._util import TINY_PARAMS


def _volume(c=1, z=7, y=20, x=24, seed=0):
    rng = np.random.default_rng(seed)
    shape = (z, y, x) if c == 1 else (c, z, y, x)
    return rng.integers(0, 400, size=shape).astype(np.uint16)


def _untrained(context, c=1, axis=0, seed=0):
    torch.manual_seed(seed)
    net = get_method("supervised")(c * (2 * context + 1), 2, params=TINY_PARAMS, device="cpu")
    return Model(net, Normaliser((10.0,) * c, (390.0,) * c), axis, context=context)


def _by_hand(model, image):
    """(Z', B, H, W) prediction slice by slice from hand-built neighbour stacks."""
    img = np.moveaxis(as_channels(image), model.axis + 1, 1)  # (C, n, H, W)
    n, last = img.shape[1], img.shape[1] - 1
    probs = []
    for i in range(n):
        parts = []
        for d in range(-model.context, model.context + 1):
            j = i + d
            j = -j if j < 0 else (2 * last - j if j > last else j)
            parts.append(model.normaliser(img[:, j]))
        x = np.concatenate(parts)[None]
        probs.append(predict_normalised_slices(model.method, x, tile_size=model.tile_size)["probabilities"][0])
    return np.moveaxis(np.stack(probs, 1), 1, model.axis + 1)  # (K, Z, Y, X)


# ----------------------------------------------------------------------------- indices
@pytest.mark.parametrize(
    ("index", "n", "context", "expected"),
    [
        (0, 5, 2, [2, 1, 0, 1, 2]),
        (1, 5, 2, [1, 0, 1, 2, 3]),
        (4, 5, 2, [2, 3, 4, 3, 2]),
        (3, 5, 2, [1, 2, 3, 4, 3]),
        (2, 5, 2, [0, 1, 2, 3, 4]),
        (0, 2, 1, [1, 0, 1]),
        (1, 2, 1, [0, 1, 0]),
        (3, 4, 3, [0, 1, 2, 3, 2, 1, 0]),
        (0, 1, 0, [0]),
    ],
)
def test_context_indices_reflect_like_numpy(index, n, context, expected):
    assert context_indices(index, n, context).tolist() == expected
    padded = np.pad(np.arange(n), context, mode="reflect")
    assert padded[index : index + 2 * context + 1].tolist() == expected


@pytest.mark.parametrize(("context", "n"), [(-1, 5), (5, 5), (2, 2), (1.5, 5), (True, 5)])
def test_bad_context_is_refused(context, n):
    with pytest.raises(InputError, match="context"):
        check_context(context, n)


def test_stack_context_orders_neighbour_by_neighbour():
    x = np.arange(4 * 2).reshape(4, 2, 1, 1).astype(np.float32)  # slice s, channel c = 2s + c
    out = stack_context(x, np.array([[1, 0, 1], [2, 3, 2]]))
    assert out.shape == (2, 6, 1, 1)
    assert out[:, :, 0, 0].tolist() == [[2, 3, 0, 1, 2, 3], [4, 5, 6, 7, 4, 5]]


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("axis", [0, 2])
def test_sampler_stacks_reflected_neighbours(axis):
    image = as_channels(_volume(c=2, z=6, y=16, x=6))
    n = image.shape[axis + 1]
    labels = np.zeros(image.shape[1:], np.uint8)
    sel = [slice(None)] * 3
    sel[axis] = 0
    labels[tuple(sel)] = 1
    norm = Normaliser((10.0, 20.0), (390.0, 300.0))
    sampler = SliceSampler(image, labels, make_pools(labels, axis=axis), norm, axis=axis, crop=16,
                           augment=False, context=2)

    def single(j):
        idx = [slice(None)] * 4
        idx[axis + 1] = j
        return norm(image[tuple(idx)])

    first = np.concatenate([single(j) for j in (2, 1, 0, 1, 2)])
    last = np.concatenate([single(j) for j in (n - 3, n - 2, n - 1, n - 2, n - 3)])
    np.testing.assert_array_equal(sampler.slice_image(0), first)
    np.testing.assert_array_equal(sampler.slice_image(n - 1), last)
    # Crops: 2 channels x 5 neighbours, in that order (no augmentation, crop = the slice).
    picks, crops, masks = sampler.draw(np.random.default_rng(0), np.array([0]), 2, True)
    assert picks.tolist() == [0, 0] and crops.shape == (2, 10, 16, 16)
    np.testing.assert_array_equal(crops[0], _pad_to(first, (16, 16)))
    np.testing.assert_array_equal(masks[0], _pad_to(sampler.slice_labels(0)[None], (16, 16))[0])
    empty = sampler.draw(np.random.default_rng(0), np.array([0]), 0, False)[1]
    assert empty.shape == (0, 10, 16, 16)


def test_sampler_cache_holds_single_slices():
    image = as_channels(_volume(z=5))
    labels = np.zeros(image.shape[1:], np.uint8)
    labels[2, 3, 3] = 1
    sampler = SliceSampler(image, labels, make_pools(labels), Normaliser((0.0,), (400.0,)), context=1)
    assert sampler.slice_image(2).shape == (3, 20, 24)
    assert sorted(sampler._cache) == [1, 2, 3]
    assert all(v.shape == (1, 20, 24) for v in sampler._cache.values())


# ----------------------------------------------------------------------------- prediction
@pytest.mark.parametrize(("context", "axis", "batch_size", "c"), [(1, 0, 3, 1), (2, 0, 2, 2), (1, 1, 4, 1)])
def test_volume_prediction_matches_hand_built_stacks(context, axis, batch_size, c):
    model = _untrained(context, c=c, axis=axis)
    image = _volume(c=c)
    res = predict_volume(model, image, batch_size=batch_size)
    np.testing.assert_allclose(res["probabilities"], _by_hand(model, image), atol=1e-5)
    # Batches are read with their neighbours: every batch size gives the same result.
    whole = predict_volume(model, image, batch_size=64)
    np.testing.assert_allclose(res["probabilities"], whole["probabilities"], atol=1e-5)


def test_context_changes_the_prediction():
    """The neighbours really reach the network: changing slice 3 changes slices 2 and 4 only."""
    model = _untrained(1)
    image = _volume()
    ref = predict_volume(model, image)["probabilities"]
    other = image.copy()
    other[3] = other[3][::-1]
    got = predict_volume(model, other)["probabilities"]
    changed = [int(i) for i in np.flatnonzero(np.abs(got - ref).max(axis=(0, 2, 3)) > 1e-6)]
    assert changed == [2, 3, 4]


@pytest.mark.parametrize(("axis", "batch_size", "probabilities"), [(0, 3, True), (0, 1, False), (2, 5, True)])
def test_lazy_prediction_matches_in_memory(tmp_path, axis, batch_size, probabilities):
    import zarr

    from semiseg.io import open_zarr_array

    model = _untrained(2, axis=axis)
    image = _volume(z=7, y=12, x=9)
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, chunks=(2, 5, 9), dtype=image.dtype)
    z[...] = image
    lazy = open_zarr_array(tmp_path / "in.zarr")
    ref = predict_volume(model, image, batch_size=batch_size, probabilities=probabilities)
    paths = {"mask": tmp_path / "mask.zarr"}
    if probabilities:
        paths["probabilities"] = tmp_path / "prob.zarr"
    done = []
    predict_to_zarr(model, lazy, paths, batch_size=batch_size, progress=lambda d, t: done.append((d, t)))
    np.testing.assert_array_equal(open_zarr_array(paths["mask"])[...], ref["mask"])
    if probabilities:
        np.testing.assert_array_equal(open_zarr_array(paths["probabilities"])[...], ref["probabilities"])
    n_slabs = -(-image.shape[axis] // batch_size)
    assert done[-1] == (n_slabs, n_slabs)
    arrays = lazy_predict(model, lazy, batch_size=batch_size)
    np.testing.assert_array_equal(arrays["mask"].compute(scheduler="synchronous"), ref["mask"])


def test_lazy_prediction_with_the_largest_context(tmp_path):
    import dask.array as da

    model = _untrained(3)
    image = _volume(z=4, y=8, x=8)
    ref = predict_volume(model, image, batch_size=3)
    got = lazy_predict(model, da.from_array(image, chunks=(1, 8, 8)), batch_size=3, probabilities=True)
    np.testing.assert_array_equal(got["probabilities"].compute(scheduler="synchronous"), ref["probabilities"])


def test_prediction_refuses_a_stack_too_short_for_the_context():
    model = _untrained(2)
    with pytest.raises(InputError, match="context 2 needs at least 3 slices"):
        predict_volume(model, _volume(z=2))
    with pytest.raises(InputError, match="context 2 needs at least 3 slices"):
        lazy_predict(model, _volume(z=2))


# ----------------------------------------------------------------------------- suggestions
def test_suggestions_with_a_context_model():
    model = _untrained(1)
    image = _volume(z=8)
    unc = uncertainty_volume(model, image, batch_size=3)
    probs = _by_hand(model, image)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(0)
    np.testing.assert_allclose(unc, entropy, atol=1e-4)
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 2, 2] = 1
    got = suggest_slices(model, image, labels, n=2, tta=True, batch_size=3)
    assert len(got) == 2 and all(s.index != 0 for s in got)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def context_model(tiny_phantom):
    s = tiny_phantom
    return semiseg.train(
        s.image, s.labels, params=TINY_PARAMS, device="cpu",
        config=semiseg.TrainConfig(steps=2, batch_size=2, crop=32, seed=0, context=1),
    )


def test_training_with_context(tiny_phantom, context_model):
    assert context_model.context == 1
    assert context_model.in_channels == 1 and context_model.method.in_channels == 3
    assert context_model.history[-1]["config"]["context"] == 1
    # The preview predicts the viewed slice with its context.
    s = tiny_phantom
    gen = semiseg.iter_train(
        s.image, s.labels, model=context_model, device="cpu", preview_index=lambda: 0,
        config=semiseg.TrainConfig(steps=1, batch_size=2, crop=32, seed=0, context=1, preview_every=0),
    )
    previews = [p.preview for p in gen if p.preview is not None]
    assert previews and previews[0].shape == s.image.shape[1:]


def test_continuing_with_another_context_is_refused(tiny_phantom, context_model):
    s = tiny_phantom
    for other in (0, 2):
        with pytest.raises(InputError, match=f"trained with context 1, not {other}"):
            semiseg.train(s.image, s.labels, model=context_model, device="cpu",
                          config=semiseg.TrainConfig(steps=1, batch_size=2, crop=32, context=other))


@pytest.mark.parametrize(("context", "message"), [(-1, "context must be an integer"),
                                                   (10, "context 10 needs at least 11 slices")])
def test_training_refuses_bad_context(tiny_phantom, context, message):
    s = tiny_phantom
    with pytest.raises(InputError, match=message):
        semiseg.train(s.image, s.labels, params=TINY_PARAMS, device="cpu",
                      config=semiseg.TrainConfig(steps=1, batch_size=2, crop=32, context=context))


def test_image_generating_methods_take_no_context(tiny_phantom):
    s = tiny_phantom
    with pytest.raises(InputError, match="takes no slice context"):
        semiseg.train(s.image, s.labels, method="translation", device="cpu",
                      config=semiseg.TrainConfig(steps=1, batch_size=2, crop=32, context=1))


# ----------------------------------------------------------------------------- model files
def test_model_file_keeps_context_and_predictions(tmp_path, tiny_phantom, context_model):
    path = context_model.save(tmp_path / "m.pt")
    loaded = semiseg.load_model(path)
    assert loaded.context == 1 and loaded.in_channels == 1
    ref = predict_volume(context_model, tiny_phantom.image)
    got = predict_volume(loaded, tiny_phantom.image)
    np.testing.assert_array_equal(got["probabilities"], ref["probabilities"])


def test_old_model_files_load_with_context_zero(tmp_path, tiny_phantom, tiny_model):
    path = tiny_model.save(tmp_path / "new.pt")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    assert cfg["context"] == 0
    del cfg["context"]  # as written before the key existed
    payload["config"] = json.dumps(cfg)
    torch.save(payload, tmp_path / "old.pt")
    old = semiseg.load_model(tmp_path / "old.pt")
    assert old.context == 0
    np.testing.assert_array_equal(
        predict_volume(old, tiny_phantom.image)["mask"], predict_volume(tiny_model, tiny_phantom.image)["mask"]
    )


@pytest.mark.parametrize("bad", [-1, "1", 2])
def test_damaged_context_key_is_refused(tmp_path, context_model, bad):
    from semiseg.model import ModelFileError

    path = context_model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    cfg["context"] = bad  # 2 does not fit the network's 3 input channels (1 x 5 would)
    payload["config"] = json.dumps(cfg)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="damaged model configuration"):
        semiseg.load_model(tmp_path / "bad.pt")
