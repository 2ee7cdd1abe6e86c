"""The 3D U-Net from sparse slices (method ``unet3d``): loss mask, sampler, net, windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import semiseg
from semiseg.data import InputError, Normaliser, as_channels, make_pools
from semiseg.engine import TrainConfig, preview_slab, train
from semiseg.inference import apply_in_windows, predict_volume, slab_plan
from semiseg.methods import get_method, list_methods
from semiseg.methods.unet3d import weighted_dice_ce
from semiseg.model import Model
from semiseg.nets.unet3d import UNet3D, plan_pooling
from semiseg.patches import PatchSampler
from semiseg.planes import annotated_voxel_mask

TINY3D = {"features": (4, 8)}


@pytest.fixture(scope="module")
def phantom():
    # Seed 0: seed 1 at this size is an all-zero image (every input blank, see inference).
    return semiseg.make_phantom(0, shape=(10, 28, 30), labelled=3, n_tumours=2)


@pytest.fixture(scope="module")
def trained(phantom):
    cfg = TrainConfig(steps=2, batch_size=8, crop=16, seed=0)
    return train(phantom.image, phantom.labels, tags=phantom.tags, method="unet3d",
                 params=dict(TINY3D, patch_depth=6), config=cfg, device="cpu")


# ----------------------------------------------------------------------------- planes
def test_annotated_voxel_mask_marks_whole_planes():
    m = annotated_voxel_mask((4, 5, 6), [(0, 1), (2, 5), (0, 1)])
    assert m.shape == (4, 5, 6) and m.dtype == bool
    expect = np.zeros((4, 5, 6), bool)
    expect[1] = True
    expect[:, :, 5] = True
    np.testing.assert_array_equal(m, expect)
    assert not annotated_voxel_mask((4, 5, 6), []).any()


@pytest.mark.parametrize("planes", [[(3, 0)], [(0, 4)], [(1, -1)]])
def test_annotated_voxel_mask_rejects_bad_planes(planes):
    with pytest.raises(ValueError):
        annotated_voxel_mask((4, 5, 6), planes)


# ----------------------------------------------------------------------------- loss
def test_truth_of_unannotated_voxels_changes_neither_loss_nor_gradient():
    rng = np.random.default_rng(0)
    shape = (2, 5, 9, 11)
    weight = torch.zeros(shape)
    weight[:, 2] = 1  # one annotated slice per patch
    weight[1, :, 3] = 1  # and one plane across the slices
    mask = torch.as_tensor(rng.integers(0, 3, shape))
    other = torch.where(weight > 0, mask, torch.as_tensor(rng.integers(0, 3, shape)))
    assert (other != mask).any()
    base = torch.as_tensor(rng.standard_normal((2, 3, *shape[1:])), dtype=torch.float32)

    def loss_and_grad(m):
        logits = base.clone().requires_grad_(True)
        terms = weighted_dice_ce(logits, m, weight)
        (terms["dice_loss"] + terms["ce"]).backward()
        return terms, logits.grad

    t1, g1 = loss_and_grad(mask)
    t2, g2 = loss_and_grad(other)
    assert torch.equal(t1["dice_loss"], t2["dice_loss"]) and torch.equal(t1["ce"], t2["ce"])
    assert torch.equal(g1, g2)
    assert float(g1.abs().sum()) > 0
    assert float(g1.abs().sum(1)[weight == 0].sum()) == 0  # none reaches unannotated voxels
    # The same change on annotated voxels does change the loss.
    flipped = torch.where(weight > 0, (mask + 1) % 3, mask)
    t3, _ = loss_and_grad(flipped)
    assert t3["ce"] != t1["ce"]


def test_perfect_prediction_on_annotated_voxels_has_near_zero_loss():
    mask = torch.zeros((1, 3, 8, 8), dtype=torch.long)
    mask[0, 1, 2:5, 2:5] = 1
    weight = torch.zeros(mask.shape)
    weight[0, 1] = 1
    logits = 50 * (torch.nn.functional.one_hot(mask, 2).movedim(-1, 1).float() - 0.5)
    logits[:, :, 0] = -logits[:, :, 0]  # wrong everywhere off the annotated slice
    terms = weighted_dice_ce(logits, mask, weight)
    assert float(terms["ce"]) < 1e-6 and float(terms["dice_loss"]) < 1e-6


# ----------------------------------------------------------------------------- net
@pytest.mark.parametrize(
    ("shape", "features", "pools"),
    [
        ((1, 1, 13, 37, 34), (4, 8, 16), None),
        ((2, 2, 5, 30, 31), (4, 8, 16), [(1, 2, 2), (2, 2, 2)]),
        ((1, 1, 1, 17, 9), (4, 8), [(1, 2, 2)]),
        ((1, 3, 16, 16, 16), (4, 8, 16, 32), [(2, 2, 2)] * 3),
    ],
)
def test_unet3d_shapes(shape, features, pools):
    net = UNet3D(shape[1], 3, features=features, pools=pools)
    assert net(torch.zeros(shape)).shape == (shape[0], 3, *shape[2:])


def test_inplane_levels_convolve_within_each_slice_at_the_top_levels():
    torch.manual_seed(0)
    net = UNet3D(1, 2, features=(4, 8, 16), inplane_levels=1)
    kernels = [block[0].kernel_size for block in net.down] + [block[0].kernel_size for block in net.up]
    assert kernels == [(1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (1, 3, 3)]
    # With every level in-plane (in-plane pooling, no instance norm over the patch) a
    # slice's logits ignore its neighbours.
    flat = UNet3D(1, 2, features=(4, 8), pools=[(1, 2, 2)], inplane_levels=2, norm="none").eval()
    x = torch.randn(1, 1, 5, 16, 16)
    y = x.clone()
    y[:, :, 0] += 1.0
    torch.testing.assert_close(flat(x)[:, :, 1:], flat(y)[:, :, 1:])
    assert not torch.allclose(net.eval()(x)[:, :, 1:], net(y)[:, :, 1:])
    with pytest.raises(ValueError, match="inplane_levels"):
        UNet3D(1, 2, features=(4, 8), inplane_levels=3)


def test_inplane_levels_is_a_method_parameter_saved_with_the_model(tmp_path):
    import json

    m = get_method("unet3d")(1, 2, params={**TINY3D, "inplane_levels": 1}, device="cpu")
    assert m.nets["seg"].down[0][0].kernel_size == (1, 3, 3)
    assert m.params.inplane_levels == 1
    assert get_method("unet3d").Params().inplane_levels == 3  # the measured default
    # The coarsest level always convolves in 3D: the default on a two-level network, or any
    # larger value, means "all but the coarsest".
    for given in ({}, {"inplane_levels": 5}):
        two = get_method("unet3d")(1, 2, params={**TINY3D, **given}, device="cpu").nets["seg"]
        assert two.down[0][0].kernel_size == (1, 3, 3) and two.down[1][0].kernel_size == (3, 3, 3)
    four = get_method("unet3d")(1, 2, device="cpu").nets["seg"]
    assert [level[0].kernel_size for level in four.down] == [(1, 3, 3)] * 3 + [(3, 3, 3)]
    # A file written before the parameter existed holds the all-3x3x3 network and still loads.
    old = get_method("unet3d")(1, 2, params={**TINY3D, "inplane_levels": 0}, device="cpu")
    path = Model(old, Normaliser.fit(np.zeros((2, 4, 4), np.float32))).save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    del cfg["params"]["inplane_levels"]
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    loaded = Model.load(path)
    assert loaded.method.params.inplane_levels == 0
    assert loaded.method.nets["seg"].down[0][0].kernel_size == (3, 3, 3)


def test_channels_last_3d_gives_the_contiguous_networks_numbers():
    torch.manual_seed(0)
    plain = UNet3D(1, 2, features=(4, 8, 16), channels_last=False)
    fast = UNet3D(1, 2, features=(4, 8, 16))
    fast.load_state_dict(plain.state_dict())
    w = fast.down[1][0].weight  # (8, 4, 3, 3, 3): the layouts differ with more than one channel in
    assert w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
    x = torch.randn(2, 1, 6, 20, 22)
    y_plain, y_fast = plain(x), fast(x)
    assert y_fast.is_contiguous()  # callers get an ordinary tensor
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-4, atol=1e-5)
    y_plain.square().mean().backward()
    y_fast.square().mean().backward()
    torch.testing.assert_close(fast.down[0][0].weight.grad, plain.down[0][0].weight.grad, rtol=1e-3, atol=1e-5)


def test_placed_3d_network_keeps_its_layout_on_every_device():
    from semiseg.methods.base import memory_format_for

    net = UNet3D(1, 2, features=(4, 8))
    # 2D channels_last cannot hold 5-D weights (it raises): on CUDA a 3D net keeps its own.
    assert memory_format_for(net, "cuda") == torch.channels_last_3d
    assert memory_format_for(net, "cpu") == torch.channels_last_3d
    assert memory_format_for(torch.nn.Conv2d(1, 1, 3), "cuda") == torch.channels_last
    assert memory_format_for(torch.nn.Conv2d(1, 1, 3), "cpu") == torch.contiguous_format
    m = get_method("unet3d")(1, 2, params=TINY3D, device="cpu")
    assert m.nets["seg"].down[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize(
    ("depth", "spacing", "levels", "expect"),
    [
        (16, (1, 1, 1), 4, [2, 2, 2]),  # isotropic: pool everywhere
        (16, (5, 1, 1), 4, [1, 1, 2]),  # coarse Z: in-plane until spacing is 5 vs 4
        (16, (3, 1, 1), 4, [1, 2, 2]),  # 3 >= 2x1: in-plane once, then 3 < 2x2
        (16, (2, 1, 1), 3, [1, 2]),  # exactly twice counts as coarse
        (6, (1, 1, 1), 4, [2, 1, 1]),  # thin: 6 -> 3 slices, too few to halve again
        (3, (1, 1, 1), 3, [1, 1]),
        (16, (1, 1, 2), 3, [2, 2]),  # the finer in-plane side decides
    ],
)
def test_pooling_follows_anisotropy_and_thinness(depth, spacing, levels, expect):
    pools = plan_pooling(depth, spacing, levels)
    assert [p[0] for p in pools] == expect
    assert all(p[1:] == (2, 2) for p in pools)


def test_method_plans_pooling_from_spacing_and_axis():
    cls = get_method("unet3d")
    p = cls.resolve_params({"spacing": "4,1,1"}, (40, 64, 64), 0)
    assert p["pool_z"] == (1, 1, 2) and p["patch_depth"] == 16
    # Trained along Y, the patch depth runs along Y (spacing 1): pool everywhere.
    p = cls.resolve_params({"spacing": "4,1,1"}, (40, 64, 64), 1)
    assert p["pool_z"] == (2, 2, 2)
    net = cls(1, 2, params=cls.resolve_params({"spacing": "4,1,1"}, (40, 64, 64), 0)).nets["seg"]
    assert net.pools == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize(("axis", "patch"), [(0, (4, 16, 16)), (0, (3, 40, 12)), (2, (5, 8, 8))])
def test_patches_always_hold_annotated_voxels(phantom, axis, patch):
    image = as_channels(phantom.image)
    pools = make_pools(phantom.labels, axis=axis) if axis == 0 else None
    if axis == 0:
        planes = [(0, int(i)) for i in pools.annotated]
        labels = phantom.labels
    else:  # one painted plane along X
        labels = np.zeros_like(phantom.labels)
        labels[:, :, 7] = phantom.truth[:, :, 7]
        planes = [(2, 7)]
    sampler = PatchSampler(image, labels, planes, Normaliser.fit(image), axis=axis, patch=patch)
    rng = np.random.default_rng(0)
    batch = sampler.sample(rng, {"labelled": 3})
    assert batch["labelled"].shape == (3, 1, *patch) and batch["labelled"].dtype == np.float32
    assert batch["mask"].shape == (3, *patch) and batch["weight"].shape == (3, *patch)
    for _ in range(60):
        img, lab, wt = sampler.draw(rng)
        assert wt.sum() > 0
        assert (lab[wt == 0] >= 0).all() and set(np.unique(wt)) <= {0.0, 1.0}
    # Without augmentation a patch is the volume's box: weights mark exactly the voxels of
    # the annotated planes in it, labels and intensities are the volume's.
    sampler.augment = False
    d0, y0, x0 = sampler._box(np.random.default_rng(3))
    img, lab, wt = sampler.draw(np.random.default_rng(3))
    order = [axis] + [a for a in range(3) if a != axis]
    mask = np.transpose(annotated_voxel_mask(labels.shape, planes), order)
    if mask.shape[1] >= patch[1] and mask.shape[2] >= patch[2]:  # no in-plane padding
        box = (slice(d0, d0 + patch[0]), slice(y0, y0 + patch[1]), slice(x0, x0 + patch[2]))
        np.testing.assert_array_equal(wt, mask[box])
        np.testing.assert_array_equal(lab, np.transpose(labels, order)[box])
        raw = np.transpose(np.asarray(image[0]), order)[box]
        np.testing.assert_allclose(img[0], sampler._slices.normaliser(raw[None])[0], rtol=1e-6)


def test_sampler_oversamples_foreground(phantom):
    image = as_channels(phantom.image)
    pools = make_pools(phantom.labels)
    planes = [(0, int(i)) for i in pools.annotated]
    fg = []
    for fraction in (0.0, 1.0):
        s = PatchSampler(image, phantom.labels, planes, Normaliser.fit(image), patch=(4, 8, 8),
                         foreground_fraction=fraction, augment=False)
        rng = np.random.default_rng(0)
        fg.append(np.mean([(s.draw(rng)[1] > 0).any() for _ in range(80)]))
    assert fg[1] > fg[0]


def test_patch_deeper_than_volume_is_refused(phantom):
    image = as_channels(phantom.image)
    with pytest.raises(InputError, match="patch depth 11 exceeds the 10 slices"):
        PatchSampler(image, phantom.labels, [(0, 2)], Normaliser.fit(image), patch=(11, 8, 8))


# ----------------------------------------------------------------------------- training
def test_two_training_steps_and_registry(phantom, trained):
    assert "unet3d" in list_methods()
    m = trained.method
    assert m.name == "unet3d" and m.step == 2
    assert trained.window_size == (6, 16, 16) and m.params.patch_depth == 6
    assert set(trained.history[-1]["losses"]) == {"dice_loss", "ce"}


def _thin_stack():
    image = np.random.default_rng(0).normal(size=(5, 24, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[2, 8:14, 6:12] = 1
    return image, labels


def test_default_patch_depth_adapts_to_thin_stacks():
    image, labels = _thin_stack()
    cfg = TrainConfig(steps=1, batch_size=4, crop=16)
    model = train(image, labels, method="unet3d", params=TINY3D, config=cfg, device="cpu")
    assert model.method.params.patch_depth == 5 and model.window_size == (5, 16, 16)
    assert predict_volume(model, image)["mask"].shape == (5, 24, 24)


def test_explicit_patch_depth_larger_than_stack_is_input_error():
    image, labels = _thin_stack()
    with pytest.raises(InputError, match="patch_depth 8 exceeds the 5 slices"):
        train(image, labels, method="unet3d", params=dict(TINY3D, patch_depth=8),
              config=TrainConfig(steps=1, crop=16), device="cpu")


def test_preview_is_the_viewed_slice_of_a_slab(phantom, trained):
    # The preview predicts a slab of window depth (6) around the viewed slice and shows that
    # slice: the same as predicting the slab as a volume of its own.
    image = as_channels(phantom.image)
    sampler = PatchSampler(image, phantom.labels, [(0, 0)], trained.normaliser, patch=(6, 16, 16))
    for idx, lo in ((0, 0), (5, 2), (9, 4)):
        prev = preview_slab(trained, sampler, idx)
        slab = predict_volume(trained, phantom.image[lo : lo + 6])["mask"]
        assert prev.shape == (28, 30)
        np.testing.assert_array_equal(prev, slab[idx - lo])


def test_live_preview_during_training(phantom):
    cfg = TrainConfig(steps=2, batch_size=4, crop=16, preview_every=0.0)
    gen = semiseg.engine.iter_train(phantom.image, phantom.labels, method="unet3d", params=TINY3D,
                                    config=cfg, device="cpu", preview_index=lambda: 3)
    previews = [p for p in gen if p.preview is not None]
    assert previews and previews[0].preview.shape == (28, 30) and previews[0].preview_index == 3


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize(
    ("shape", "window"),
    [((1, 1, 13, 37, 34), (6, 16, 16)), ((2, 2, 4, 50, 21), (6, 16, 32)), ((1, 1, 7, 9, 40), (8, 8, 8))],
)
def test_3d_windows_blend_a_voxelwise_map_exactly(shape, window):
    method = get_method("unet3d")(shape[1], 2, params=TINY3D)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    seen = []

    def fn(t):
        seen.append(tuple(t.shape[-3:]))
        return {"double": 2 * t, "first": t[:, :1]}

    out = apply_in_windows(method, x, fn, window)
    np.testing.assert_allclose(out["double"].numpy(), 2 * x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["first"].numpy(), x[:, :1], rtol=1e-5, atol=1e-5)
    assert set(seen) == {window} and len(seen) > 1


@pytest.mark.parametrize(("n", "depth", "batch"), [(10, 6, 8), (48, 16, 8), (5, 5, 1), (100, 4, 8)])
def test_slab_plan_covers_the_volume_with_halo(n, depth, batch):
    plan = slab_plan(n, depth, batch)
    assert plan[0][0] == 0 and plan[-1][1] == n
    for (s, e, rs, re), nxt in zip(plan, [*plan[1:], None]):
        assert rs == max(0, s - depth) and re == min(n, e + depth) and s < e
        if nxt:
            assert nxt[0] == e


def test_predict_volume_of_3d_model_and_round_trip(tmp_path, phantom, trained):
    res = predict_volume(trained, phantom.image)
    assert res["mask"].shape == phantom.image.shape and res["probabilities"].shape == (2, *phantom.image.shape)
    np.testing.assert_allclose(res["probabilities"].sum(0), 1, atol=1e-5)
    path = trained.save(tmp_path / "m3d.pt")
    loaded = Model.load(path)
    assert loaded.window_size == (6, 16, 16) and loaded.method.nets["seg"].pools == trained.method.nets["seg"].pools
    again = predict_volume(loaded, phantom.image)
    np.testing.assert_array_equal(again["mask"], res["mask"])
    np.testing.assert_array_equal(again["probabilities"], res["probabilities"])


def test_3d_model_trained_along_another_axis(phantom):
    labels = np.zeros_like(phantom.labels)
    labels[:, :, 10] = phantom.truth[:, :, 10]
    labels[:, :, 10][0, 0] = 1  # something painted even if the truth misses the plane
    cfg = TrainConfig(steps=1, batch_size=4, crop=8, axis=2)
    model = train(phantom.image, labels, method="unet3d", params=TINY3D, config=cfg, device="cpu")
    assert model.method.params.patch_depth == 16 and model.window_size == (16, 8, 8)
    assert predict_volume(model, phantom.image)["mask"].shape == phantom.image.shape


def test_lazy_prediction_equals_in_memory(tmp_path, phantom, trained):
    import dask.array as da

    from semiseg.io import read_volume
    from semiseg.lazy import lazy_predict, predict_to_zarr

    image = da.from_array(phantom.image, chunks=(3, 28, 30))
    ref = predict_volume(trained, phantom.image, batch_size=2)
    lazy = lazy_predict(trained, image, batch_size=2, probabilities=True)
    np.testing.assert_array_equal(lazy["mask"].compute(), ref["mask"])
    np.testing.assert_array_equal(lazy["probabilities"].compute(), ref["probabilities"])
    done = []
    paths = predict_to_zarr(trained, image, {"mask": tmp_path / "m.zarr"}, batch_size=2,
                            progress=lambda d, t: done.append((d, t)))
    np.testing.assert_array_equal(read_volume(paths["mask"]), ref["mask"])
    n_slabs = len(slab_plan(10, 6, 2))
    assert done and done[-1] == (n_slabs, n_slabs)


@pytest.mark.parametrize("tta", [False, True])
def test_uncertainty_of_a_3d_model_matches_its_prediction(phantom, trained, tta):
    from semiseg.suggest import iter_uncertainty, suggest_slices

    res = semiseg.engine.run(iter_uncertainty(trained, phantom.image, tta=tta, batch_size=2))
    assert res.uncertainty.shape == phantom.image.shape and np.isfinite(res.uncertainty).all()
    if not tta:  # the entropy of the probabilities predict_volume gives (same slabs, same windows)
        p = predict_volume(trained, phantom.image, batch_size=2)["probabilities"].clip(1e-8)
        np.testing.assert_allclose(res.uncertainty, -(p * np.log(p)).sum(0), rtol=1e-4, atol=1e-5)
    assert len(suggest_slices(trained, phantom.image, phantom.labels, n=2)) == 2


def test_no_tile_size_predicts_whole_slabs(phantom, trained):
    method = trained.method
    tile, trained.tile_size = trained.tile_size, None
    try:
        assert trained.volume_window() is None
        sizes = []
        predict = method.predict
        method.predict = lambda x: sizes.append(tuple(x.shape[-3:])) or predict(x)
        try:
            predict_volume(trained, phantom.image, probabilities=False)
        finally:
            del method.predict
        assert sizes == [(10, 28, 30)]  # one slab, read whole (10 slices < 2 x depth 6)
    finally:
        trained.tile_size = tile
    assert trained.volume_window() == (6, 16, 16)


def test_3d_loss_weights_a_sagittal_plane_given_in_planes(phantom):
    # Planes in any axis feed the 3D loss mask: with planes listing axial slices and one
    # sagittal slice (X = 13), the patches' weights are 1 on that sagittal slice's voxels,
    # and the sampler's planes are pools.planes (not only the annotated axial slices).
    from semiseg.engine import _make_sampler, sampler_planes

    labels = np.zeros_like(phantom.labels)
    labels[2] = phantom.truth[2]
    labels[:, :, 13] = phantom.truth[:, :, 13]
    planes = [(0, 2), (2, 13)]
    pools = make_pools(labels, axis=0, planes=planes)
    assert sampler_planes(pools, 0) == [(0, 2), (2, 13)]
    cfg = TrainConfig(steps=1, batch_size=4, crop=16, seed=0)
    model = train(phantom.image, labels, method="unet3d", params=dict(TINY3D, patch_depth=4),
                  config=cfg, planes=planes, device="cpu")
    sampler = _make_sampler(as_channels(phantom.image), labels, pools, model, cfg)
    assert sampler.planes == [(0, 2), (2, 13)]
    expect = annotated_voxel_mask(labels.shape, planes)
    np.testing.assert_array_equal(sampler.weight, expect)  # (Z, Y, X): no in-plane padding
    assert sampler.weight[:, :, 13].all() and sampler.weight[5, :, 3].sum() == 0
    # A patch through the sagittal slice weights exactly its voxels there (and the axial
    # slice's), the batch weight the loss is multiplied by (weighted_dice_ce).
    sampler.augment = False
    seen = 0
    for seed in range(60):
        d0, y0, x0 = sampler._box(np.random.default_rng(seed))
        _img, _lab, wt = sampler.draw(np.random.default_rng(seed))
        box = (slice(d0, d0 + 4), slice(y0, y0 + 16), slice(x0, x0 + 16))
        np.testing.assert_array_equal(wt, expect[box])
        if x0 <= 13 < x0 + 16 and not d0 <= 2 < d0 + 4:  # through the sagittal plane only
            seen += 1
            assert wt[:, :, 13 - x0].all() and wt.sum() == wt[:, :, 13 - x0].sum()
    assert seen > 0


def test_blank_rule_applies_to_3d_windows(phantom, trained):
    # A constant volume carries no information: every 3D window is certain background, as
    # blank slices are for 2D methods; a blank slab next to content keeps the content's answer.
    blank = np.zeros_like(phantom.image)
    res = predict_volume(trained, blank, batch_size=2)
    assert (res["mask"] == 0).all() and (res["probabilities"][0] == 1).all()
    image = phantom.image.copy()
    image[:, :, :] = 0
    image[:3] = phantom.image[:3]
    res = predict_volume(trained, image, batch_size=2)
    assert not (res["probabilities"][0, :3] == 1).all()


def test_unet3d_refuses_slice_context():
    # Slice context (2.5D input channels) is for 2D methods: a 3D network sees the neighbours.
    image, labels = _thin_stack()
    with pytest.raises(InputError, match="takes no slice context") as err:
        train(image, labels, method="unet3d", params=TINY3D,
              config=TrainConfig(steps=1, crop=16, context=1), device="cpu")
    assert "\n" not in str(err.value)
