"""Tests of the SemanticGAN method (Li et al., CVPR 2021) and its StyleGAN2-style networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg.engine import TrainConfig, train
from semiseg.methods import get_method, list_methods
from semiseg.methods.semantic_gan import (
    d_hinge_loss,
    d_logistic_loss,
    g_hinge_loss,
    g_nonsaturating_loss,
    r1_penalty,
    ssim,
)
from semiseg.model import Model
from semiseg.nets.stylegan import ModulatedConv2d, SemanticStyleGenerator, channels_for
from semiseg.synthetic import make_phantom

from ._util import random_batch

TINY = {"features": (8, 16), "size": 32, "latent_dim": 16, "mapping_layers": 2, "tto_batch": 16}


def make(**over):
    torch.manual_seed(0)
    return get_method("semantic-gan")(1, 3, params={**TINY, **over})


batch = random_batch


# ----------------------------------------------------------------------------- loss formulas
@pytest.mark.parametrize(
    ("real", "fake", "expected"),
    [
        ([0.0], [0.0], 2 * math.log(2)),
        ([2.0], [-1.0], math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))),
        ([1.0, -1.0], [0.0, 3.0], (math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2 + (math.log(2) + math.log1p(math.exp(3))) / 2),
    ],
)
def test_logistic_loss_matches_formula(real, fake, expected):
    got = d_logistic_loss(torch.tensor(real), torch.tensor(fake))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_nonsaturating_generator_loss():
    assert g_nonsaturating_loss(torch.tensor([0.0, 1.0])).item() == pytest.approx(
        (math.log(2) + math.log1p(math.exp(-1))) / 2, rel=1e-6
    )


@pytest.mark.parametrize(
    ("real", "fake", "expected"),
    [
        # relu(1 - [0.5, 2]) = [0.5, 0] -> 0.25; relu(1 + [-2, 0]) = [0, 1] -> 0.5; half the sum.
        ([[0.5, 2.0]], [[-2.0, 0.0]], 0.375),
        # Two scales are averaged: real terms 0 and 2, fake terms 0 and 1 -> 0.5 * (1 + 0.5).
        ([[1.0, 3.0], [-1.0, -1.0]], [[-1.0, -5.0], [0.0, 0.0]], 0.75),
        ([[1.0]], [[-1.0]], 0.0),  # margins met: no loss
    ],
)
def test_hinge_loss_matches_formula(real, fake, expected):
    got = d_hinge_loss([torch.tensor(r) for r in real], [torch.tensor(f) for f in fake])
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_generator_hinge_loss():
    assert g_hinge_loss([torch.tensor([1.0, 3.0]), torch.tensor([-2.0])]).item() == pytest.approx(-0.0)
    assert g_hinge_loss(torch.tensor([0.5, 1.5])).item() == pytest.approx(-1.0)


def test_r1_penalty_of_linear_and_quadratic_critics():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    a = torch.tensor([0.5, -2.0])
    # D(x) = a.x -> grad a, ||a||^2 = 4.25 for every sample.
    assert r1_penalty(x @ a, x).item() == pytest.approx(4.25)
    # D(x) = ||x||^2 -> grad 2x; mean over samples of 4 ||x||^2 = 4 * (5 + 10) / 2.
    assert r1_penalty((x**2).sum(1), x).item() == pytest.approx(30.0)


def test_r1_penalty_is_differentiable():
    w = torch.tensor([2.0], requires_grad=True)
    x = torch.ones(3, 1, requires_grad=True)
    r1_penalty(w * x.sum(1), x).backward()  # penalty w^2 -> d/dw = 2w
    assert w.grad.item() == pytest.approx(4.0)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (32, 32)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0)
    got = ssim(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]).item()
    assert got == pytest.approx(ref, abs=1e-5)
    assert ssim(torch.from_numpy(a)[None, None], torch.from_numpy(a)[None, None]).item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- networks
def test_channels_for():
    assert channels_for((8, 16), 32) == {4: 16, 8: 16, 16: 16, 32: 8}


@pytest.mark.parametrize("size", [12, 0, 4, 48])
def test_size_must_be_power_of_two(size):
    with pytest.raises(ValueError, match="power of two"):
        get_method("semantic-gan")(1, 2, params={**TINY, "size": size})


@pytest.mark.parametrize(("demodulate", "factor"), [(True, 1.0), (False, 2.0)])
def test_demodulation_removes_style_scale(demodulate, factor):
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 4, 3, 5, demodulate=demodulate)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(2, 5)
    y1 = conv(x, w)
    with torch.no_grad():  # doubles the style s = affine(w)
        conv.affine.weight.mul_(2)
        conv.affine.bias.mul_(2)
    torch.testing.assert_close(conv(x, w), factor * y1, rtol=1e-4, atol=1e-5)


def test_generator_shapes_and_style_count():
    g = SemanticStyleGenerator(2, 3, size=32, latent_dim=8, features=(4, 8))
    assert g.num_ws == 8
    img, seg = g.synthesis(torch.randn(5, g.num_ws, 8), "zero")
    assert img.shape == (5, 2, 32, 32) and seg.shape == (5, 3, 32, 32)


def test_generator_renders_from_given_features_at_one_resolution():
    torch.manual_seed(0)
    g = SemanticStyleGenerator(1, 2, size=32, latent_dim=8, features=(4, 8))
    assert g.channels_at(16) == 8 and g.channels_at(32) == 4
    ws = torch.randn(2, g.num_ws, 8)
    feats = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        img, seg = g.synthesis(ws, "zero", feats)
        # The features replace what the generator's own convolutions at 16 computed: changing
        # those leaves the output as it was, and changes it without features.
        own_img, _ = g.synthesis(ws, "zero")
        g.convs[4].conv.weight.mul_(-1)
        img_b, seg_b = g.synthesis(ws, "zero", feats)
        own_img_b, _ = g.synthesis(ws, "zero")
        # A local change of the features changes the labels near it only.
        moved = feats.clone()
        moved[:, :, :4, :4] += 5
        _, seg_m = g.synthesis(ws, "zero", moved)
    torch.testing.assert_close(img_b, img)
    torch.testing.assert_close(seg_b, seg)
    assert not torch.allclose(own_img_b, own_img)
    diff = (seg_m - seg).abs().sum((0, 1))
    assert diff[:8, :8].sum() > 0 and diff[20:, 20:].sum() == 0
    with pytest.raises(ValueError, match="features must be"):
        g.synthesis(ws, "zero", torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="resolution 12"):
        g.synthesis(ws, "zero", torch.randn(2, 8, 12, 12))


def test_spatial_code_reaches_the_labels_and_the_paper_preset_has_none():
    m = make()
    assert m.params.spatial_res == 16
    x = torch.randn(3, 1, 32, 32)
    ws, feats = m.encode(x)
    assert ws.shape == (3, m.nets["gen"].num_ws, 16) and feats.shape == (3, 16, 16, 16)
    # The W+ code alone (what test-time optimisation asks for) is the same without the spatial head.
    with torch.no_grad():
        torch.testing.assert_close(m.nets["gen"].w_avg + m.nets["enc"](x), m.encode(x)[0])
    assert m.nets["enc"].encode(x, spatial=False)[1] is None
    # The encoder's supervised loss trains its spatial head (the label's spatial path).
    enc = m.nets["enc"]
    enc.zero_grad(set_to_none=True)
    b = batch()
    m.encoder_loss_terms(b["unlabelled"], b["labelled"], b["mask"])["dice_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.spatial.parameters())

    cls = get_method("semantic-gan")
    paper = cls.parse_params(cls.preset_params("paper"))
    assert paper.spatial_res == 0
    plain = make(spatial_res=0)
    assert plain.nets["enc"].spatial is None and plain.encode(torch.randn(1, 1, 32, 32))[1] is None
    for bad in (3, 12, 64):
        with pytest.raises(ValueError, match="spatial_res"):
            make(spatial_res=bad)


def test_model_files_from_before_the_spatial_code_load_without_it(tmp_path):
    import json

    from semiseg.data import Normaliser

    old = make(spatial_res=0)
    path = Model(old, Normaliser.fit(np.zeros((2, 4, 4), np.float32))).save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    del cfg["params"]["spatial_res"]  # as written before the parameter existed
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    loaded = Model.load(path)
    assert loaded.method.params.spatial_res == 0 and loaded.method.nets["enc"].spatial is None


# ----------------------------------------------------------------------------- stop-gradient
def _grads(net):
    return {n: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for n, p in net.named_parameters()}


def test_label_discriminator_does_not_train_image_branch():
    m = make()
    gen = m.nets["gen"]
    gen.zero_grad(set_to_none=True)
    m.generator_loss_terms(4)["g_seg"].backward()
    got = _grads(gen)
    img = [v for n, v in got.items() if n.startswith("img_branch")]
    seg = [v for n, v in got.items() if n.startswith("seg_branch")]
    shared = [v for n, v in got.items() if n.startswith("convs")]
    assert img and not any(img), "image branch received gradient from D_m"
    assert all(seg), "every label output must learn from D_m"
    assert any(shared), "shared style layers must learn from D_m"

    gen.zero_grad(set_to_none=True)
    m.generator_loss_terms(4)["g_img"].backward()
    got = _grads(gen)
    assert any(v for n, v in got.items() if n.startswith("img_branch"))
    assert not any(v for n, v in got.items() if n.startswith("seg_branch"))


# ----------------------------------------------------------------------------- training
def test_training_step_finite_and_updates_every_network():
    m = make()
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in m.nets.items()}
    losses = m.training_step(batch())
    assert {"d_img", "d_seg", "g_img", "g_seg", "r1_img", "r1_seg", "e_recon", "e_ce", "e_dice_loss"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["r1_seg"] > 0  # step 0 is a regularisation step
    for k, net in m.nets.items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters()))
        assert changed, f"{k} was not updated"
    assert set(m.opts) == {"gen", "d_img", "d_seg", "enc"}


def test_non_power_of_two_crops_are_resized():
    m = make()
    losses = m.training_step(batch(side=24))
    assert all(math.isfinite(v) for v in losses.values())
    assert m.train_crop == 24


def test_encoder_start_delays_encoder():
    m = make(encoder_start=5)
    w = [p.detach().clone() for p in m.nets["enc"].parameters()]
    losses = m.training_step(batch())
    assert "e_recon" not in losses
    assert all(torch.equal(a, b) for a, b in zip(w, m.nets["enc"].parameters()))


# ----------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (1, 1, 40, 56), (1, 1, 20, 20)])
def test_predict_shapes(steps, shape):
    m = make(tto_steps=steps)
    out = m.predict(torch.randn(*shape))
    b, _, h, w = shape
    assert out["probabilities"].shape == (b, 3, h, w)
    assert out["reconstruction"].shape == shape
    torch.testing.assert_close(out["probabilities"].sum(1), torch.ones(b, h, w))
    assert all(p.requires_grad for p in m.nets["gen"].parameters())


def test_test_time_optimisation_lowers_reconstruction_error():
    m = make(tto_steps=0)
    x = torch.randn(2, 1, 32, 32) * 0.3
    with torch.no_grad():
        ws0, img0, _ = m.invert(x, 0)
        ws1, img1, _ = m.invert(x, 30)
    assert not torch.equal(ws0, ws1)
    assert m.reconstruction_loss(img1, x).mean() < m.reconstruction_loss(img0, x).mean()
    for net in m.nets.values():
        assert all(p.grad is None for p in net.parameters())


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_seeded():
    m = make()
    x = torch.zeros(2, 1, 24, 28)
    a, b, c = m.sample_tumours(x, 3, seed=1), m.sample_tumours(x, 3, seed=1), m.sample_tumours(x, 3, seed=2)
    assert a.shape == (3, 2, 1, 24, 28)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert m.last_sample["labels"].shape == (3, 2, 24, 28)
    s = m.sample(4, seed=5)
    assert s["image"].shape == (4, 1, 32, 32) and s["labels"].shape == (4, 32, 32)
    assert torch.equal(s["labels"], m.sample(4, seed=5)["labels"])


def test_registered_with_display_outputs():
    cls = get_method("semantic-gan")
    assert "semantic-gan" in list_methods()
    assert cls.can_sample and cls.outputs == {"reconstruction": "image"}


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def phantom():
    return make_phantom(0, shape=(6, 32, 32), labelled=2)


def test_engine_round_trip_and_labels_untouched(phantom, tmp_path):
    labels = phantom.labels.copy()
    image = phantom.image.copy()
    params = {**TINY, "tto_steps": 2}
    model = train(phantom.image, phantom.labels, method="semantic-gan", params=params,
                  config=TrainConfig(steps=2, batch_size=2, crop=32), device="cpu")
    np.testing.assert_array_equal(phantom.labels, labels)
    np.testing.assert_array_equal(phantom.image, image)
    path = model.save(tmp_path / "sg.pt")
    loaded = Model.load(path)
    assert loaded.method.train_crop == 32 and loaded.method.params.tto_steps == 2
    for k, net in model.method.nets.items():
        for (n, a), b in zip(net.state_dict().items(), loaded.method.nets[k].state_dict().values()):
            assert torch.equal(a, b), f"{k}.{n}"
    p1 = model.predict(phantom.image, outputs=("reconstruction",))
    p2 = loaded.predict(phantom.image, outputs=("reconstruction",))
    np.testing.assert_allclose(p1["probabilities"], p2["probabilities"], atol=1e-5)
    assert p1["mask"].shape == phantom.image.shape
    assert p1["reconstruction"].shape == phantom.image.shape
