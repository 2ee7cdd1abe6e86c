import numpy as np
import pytest
import zarr

import semiseg
from semiseg.data import InputError
from semiseg.inference import predict_normalised_slices

from ._util import TINY_PARAMS, array_hash


@pytest.mark.parametrize("shape", [(3, 33, 37), (2, 16, 16), (1, 5, 70), (4, 3, 3)])
def test_predict_any_slice_size(tiny_model, shape):
    image = np.random.default_rng(0).integers(0, 1000, shape).astype(np.uint16)
    res = semiseg.predict_volume(tiny_model, image)
    assert res["mask"].shape == shape and res["mask"].dtype == np.uint8
    assert res["probabilities"].shape == (2, *shape)
    np.testing.assert_allclose(res["probabilities"].sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(res["mask"], res["probabilities"].argmax(0))


def test_batches_do_not_change_results(tiny_model, tiny_phantom):
    a = semiseg.predict_volume(tiny_model, tiny_phantom.image, batch_size=1)
    b = semiseg.predict_volume(tiny_model, tiny_phantom.image, batch_size=7)
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)


def test_predict_matches_slicewise_and_leaves_input(tiny_model, tiny_phantom):
    image = tiny_phantom.image.copy()
    h = array_hash(image)
    res = semiseg.predict_volume(tiny_model, image, probabilities=False)
    assert "probabilities" not in res
    assert array_hash(image) == h
    x = tiny_model.normaliser(image[4][None])[None]
    one = predict_normalised_slices(tiny_model.method, x, tile_size=tiny_model.tile_size)
    np.testing.assert_array_equal(one["mask"][0], res["mask"][4])


def test_predict_lazy_zarr_into_zarr(tiny_model, tiny_phantom, tmp_path):
    image = tiny_phantom.image
    src = zarr.create_array(tmp_path / "in.zarr", shape=image.shape, chunks=(1, *image.shape[1:]), dtype=image.dtype)
    src[...] = image
    out = zarr.create_array(tmp_path / "out.zarr", shape=image.shape, chunks=(2, *image.shape[1:]), dtype=np.uint8)
    res = semiseg.predict_volume(tiny_model, src, out={"mask": out}, probabilities=False, batch_size=3)
    assert res["mask"] is out
    np.testing.assert_array_equal(out[...], semiseg.predict_volume(tiny_model, image)["mask"])


def test_predict_along_other_axis(tiny_phantom):
    s = tiny_phantom
    cfg = semiseg.TrainConfig(steps=2, batch_size=2, crop=16, axis=2)
    labels = np.zeros_like(s.labels)
    labels[:, :, 20] = s.truth[:, :, 20]
    labels[2:5, 10:14, 7] = 1
    model = semiseg.train(s.image, labels, params=TINY_PARAMS, config=cfg)
    res = semiseg.predict_volume(model, s.image)
    assert res["mask"].shape == s.image.shape
    assert res["probabilities"].shape == (2, *s.image.shape)


def test_predict_errors(tiny_model, tiny_phantom):
    with pytest.raises(InputError, match="channel"):
        semiseg.predict_volume(tiny_model, np.stack([tiny_phantom.image] * 2))
    with pytest.raises(InputError, match="no output"):
        semiseg.predict_volume(tiny_model, tiny_phantom.image, outputs=["residual"])
    with pytest.raises(InputError, match="cannot sample"):
        semiseg.sample_tumours(tiny_model, tiny_phantom.image, 0, 2)
