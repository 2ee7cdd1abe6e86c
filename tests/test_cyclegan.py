"""Tests of the image<->mask CycleGAN (Mondal et al.), its losses and networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg.data import Normaliser
from semiseg.engine import TrainConfig, train
from semiseg.gan_losses import image_cycle_loss, lsgan_d_loss, lsgan_g_loss, mask_cycle_loss
from semiseg.methods import get_method, list_methods
from semiseg.methods.cyclegan import HistoryPool
from semiseg.model import Model
from semiseg.nets.gan_blocks import PixelDiscriminator, ResnetGenerator
from semiseg.synthetic import make_phantom

from ._util import random_batch

TINY = {"features": (8, 16), "seg_features": (8, 16), "n_blocks": 1, "disc_features": 8, "pool_size": 4, "warmup": 0.0}


def make(k=3, **over):
    torch.manual_seed(0)
    return get_method("cyclegan")(1, k, params={**TINY, **over})


batch = random_batch


# ----------------------------------------------------------------------------- loss formulas
@pytest.mark.parametrize(
    ("real", "fake", "expected"),
    [
        ([1.0], [0.0], 0.0),  # the discriminator's optimum
        ([0.0], [0.0], 1.0),
        ([0.5, 1.0], [0.0, 2.0], (0.25 + 0.0) / 2 + (0.0 + 4.0) / 2),
        ([-1.0, 3.0], [1.0, -1.0], (4.0 + 4.0) / 2 + (1.0 + 1.0) / 2),
    ],
)
def test_lsgan_d_loss_matches_formula(real, fake, expected):
    got = lsgan_d_loss(torch.tensor(real), torch.tensor(fake))
    assert got.item() == pytest.approx(expected)


@pytest.mark.parametrize(("fake", "expected"), [([1.0], 0.0), ([0.0, 2.0], 1.0), ([0.5, -1.0], (0.25 + 4.0) / 2)])
def test_lsgan_g_loss_matches_formula(fake, expected):
    assert lsgan_g_loss(torch.tensor(fake)).item() == pytest.approx(expected)


def test_lsgan_losses_average_views():
    real = [torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]  # view terms 0 and 1
    fake = [torch.zeros(1, 1, 4, 4), torch.full((1, 1, 2, 2), 2.0)]  # view terms 0 and 4
    assert lsgan_d_loss(real, fake).item() == pytest.approx((0 + 0 + 1 + 4) / 2)
    assert lsgan_g_loss(fake).item() == pytest.approx((1 + 1) / 2)
    with pytest.raises(ValueError):
        lsgan_d_loss(real, fake[:1])


def test_image_cycle_loss_is_mean_l1():
    rec = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    x = torch.zeros(1, 1, 2, 2)
    assert image_cycle_loss(rec, x).item() == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    with pytest.raises(ValueError, match="shapes"):
        image_cycle_loss(rec, torch.zeros(1, 1, 2, 3))


def test_mask_cycle_loss_is_cross_entropy():
    # Pixel 0: logits (ln 3, 0), label 0 -> -log(3/4); pixel 1: logits (0, 0), label 1 -> log 2.
    logits = torch.tensor([[[[math.log(3), 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    mask = torch.tensor([[[0, 1]]])
    expected = (-math.log(0.75) + math.log(2)) / 2
    assert mask_cycle_loss(logits, mask).item() == pytest.approx(expected, rel=1e-5)
    soft = torch.nn.functional.one_hot(mask, 2).permute(0, 3, 1, 2).float()
    assert mask_cycle_loss(logits, soft).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- networks
@pytest.mark.parametrize("hw", [(32, 32), (30, 34), (9, 17)])
def test_pixel_discriminator_output_has_input_size(hw):
    d = PixelDiscriminator(3, features=4)
    assert d(torch.zeros(2, 3, *hw)).shape == (2, 1, *hw)


@pytest.mark.parametrize(("features", "side"), [((8,), 10), ((8, 16), 32), ((4, 8, 16), 24)])
def test_resnet_generator_shapes_and_activations(features, side):
    x = torch.randn(2, 2, side, side)
    g = ResnetGenerator(2, 3, features=features, n_blocks=1, out_activation="tanh")
    y = g(x)
    assert y.shape == (2, 3, side, side) and y.abs().max() <= 1
    p = ResnetGenerator(2, 3, features=features, n_blocks=1, out_activation="softmax")(x)
    assert torch.allclose(p.sum(1), torch.ones(2, side, side), atol=1e-5)
    with pytest.raises(ValueError):
        ResnetGenerator(2, 3, out_activation="relu")


# ----------------------------------------------------------------------------- history pool
def test_history_pool_fills_then_mixes():
    torch.manual_seed(0)
    pool = HistoryPool(3)
    first = torch.arange(3.0).view(3, 1)
    assert torch.equal(pool.query(first), first)  # filling: returned unchanged
    new = torch.arange(10.0, 110.0).view(100, 1)
    out = pool.query(new)
    assert out.shape == new.shape
    swapped = (out != new).flatten()
    assert 20 < int(swapped.sum()) < 80  # about half come from the history
    assert HistoryPool(0).query(new) is not None and torch.equal(HistoryPool(0).query(new), new)
    # A new crop size resets the pool instead of failing.
    assert pool.query(torch.zeros(2, 1, 5)).shape == (2, 1, 5)


# ----------------------------------------------------------------------------- method
def test_registered():
    assert "cyclegan" in list_methods()
    cls = get_method("cyclegan")
    # The paper's optimiser and loss weights (Sec. 4), as the ``paper`` preset gives them.
    p = cls.parse_params(cls.preset_params("paper"))
    assert (p.lr, p.beta1, p.beta2) == (2e-4, 0.5, 0.999)
    lambdas = (p.lambda_gen_image, p.lambda_cycle_mask, p.lambda_cycle_image, p.lambda_adv_mask, p.lambda_adv_image)
    assert lambdas == (1, 0.05, 1, 1, 1)


def test_segmenter_gets_gradient_from_mask_discriminator():
    m = make()
    terms, _ = m.generator_terms(batch())
    for net in m.nets.values():
        net.zero_grad(set_to_none=True)
    terms["adv_mask"].backward()
    seg_grad = sum(p.grad.abs().sum().item() for p in m.nets["seg"].parameters() if p.grad is not None)
    assert seg_grad > 0, "D_S must see softmax probabilities, not an argmax"
    # The image generator is not on the path G_IS -> D_S.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.nets["gen"].parameters())


def test_image_generator_gets_gradient_from_image_discriminator():
    m = make()
    terms, _ = m.generator_terms(batch())
    terms["adv_image"].backward()
    assert sum(p.grad.abs().sum().item() for p in m.nets["gen"].parameters() if p.grad is not None) > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.nets["seg"].parameters())


def test_training_step_finite_and_updates_all_networks():
    m = make()
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in m.nets.items()}
    losses = m.training_step(batch())
    expected = {"ce", "dice_loss", "gen_l2", "cycle_mask", "cycle_image", "adv_mask", "adv_image", "d_mask", "d_image"}
    assert set(losses) == expected
    assert all(math.isfinite(v) for v in losses.values())
    for k, net in m.nets.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters())), k
    # Discriminators are trainable again after the generator step.
    assert all(p.requires_grad for p in m.nets["disc_mask"].parameters())


def test_predict_and_translate_shapes():
    m = make(k=3)
    x = torch.randn(3, 1, 16, 24)
    p = m.predict(x)["probabilities"]
    assert p.shape == (3, 3, 16, 24)
    assert torch.allclose(p.sum(1), torch.ones(3, 16, 24), atol=1e-5)
    img = m.translate(torch.zeros(3, 16, 24, dtype=torch.long))
    assert img.shape == (3, 1, 16, 24) and img.abs().max() <= 1
    assert m.size_multiple == 2


def test_model_round_trip(tmp_path):
    m = make(k=2)
    b = batch(k=2)
    m.training_step(b)
    m.step = 1
    model = Model(m, Normaliser((0.0,), (1.0,)), 0)
    path = model.save(tmp_path / "cg.pt")
    loaded = Model.load(path)  # weights_only=True inside
    assert loaded.method.name == "cyclegan" and loaded.method.step == 1
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(m.predict(x)["probabilities"], loaded.method.predict(x)["probabilities"], atol=1e-6)
    # The history pools are training buffers, not part of the file.
    assert loaded.method.mask_pool.count == 0
    loaded.method.training_step(b)


def test_engine_trains_and_leaves_labels_untouched():
    s = make_phantom(0, shape=(8, 32, 32), labelled=2, n_tumours=1)
    labels = s.labels.copy()
    image = s.image.copy()
    model = train(
        s.image, s.labels, tags=s.tags, method="cyclegan", params=TINY,
        config=TrainConfig(steps=2, batch_size=2, crop=32, seed=0), device="cpu",
    )
    assert np.array_equal(s.labels, labels) and np.array_equal(s.image, image)
    out = model.predict(s.image)
    assert out["mask"].shape == s.image.shape
    assert model.history[-1]["steps"] == 2


def test_bad_params_raise():
    with pytest.raises(ValueError):
        make(pool_size=-1)
    with pytest.raises(ValueError, match="segmenter"):
        make(segmenter="vit")
    with pytest.raises(ValueError, match="seg_lr"):
        make(seg_lr=0.0)
    with pytest.raises(ValueError):
        make(warmup=1.5)
    with pytest.raises(ValueError):
        get_method("cyclegan").parse_params({"lambda_typo": 1})


# ----------------------------------------------------------------------------- CPU defaults
def test_cpu_default_segmenter_is_the_unet_and_the_paper_preset_the_resnet():
    cls = get_method("cyclegan")
    from semiseg.nets.unet import UNet

    cpu = cls(1, 2, params={**TINY, "seg_features": (8, 16)})
    assert isinstance(cpu.nets["seg"], UNet)
    paper = cls(1, 2, params=cls.preset_params("paper", {"features": (8, 16), "n_blocks": 1, "disc_features": 8}))
    assert isinstance(paper.nets["seg"], ResnetGenerator)
    # The paper weighs the mask discriminator as every other term; the CPU default less.
    assert (paper.params.lambda_adv_mask, cpu.params.lambda_adv_mask) == (1.0, 0.1)
    # The paper's single Adam: one rate and beta1 for both generators.
    groups = paper.opts["gen"].param_groups
    assert {g["lr"] for g in groups} == {2e-4} and {g["betas"] for g in groups} == {(0.5, 0.999)}
    # The CPU default: the segmenter at supervised's rate, the image generator at the paper's.
    seg_group, gen_group = cpu.opts["gen"].param_groups
    assert (seg_group["lr"], seg_group["betas"][0]) == (1e-3, 0.9)
    assert (gen_group["lr"], gen_group["betas"][0]) == (2e-4, 0.5)
    # A 4-level U-Net segmenter needs multiples of 8.
    assert cls(1, 2, params={**TINY, "seg_features": (8, 16, 32, 64)}).size_multiple == 8


def test_warm_up_trains_the_supervised_terms_only_until_its_share():
    m = make(warmup=0.3)
    discs = {k: [p.detach().clone() for p in m.nets[k].parameters()] for k in ("disc_mask", "disc_image")}
    seg0 = [p.detach().clone() for p in m.nets["seg"].parameters()]
    m.progress = 0.29
    losses = m.training_step(batch())
    assert set(losses) == {"ce", "dice_loss", "gen_l2"}
    for k, before in discs.items():
        assert all(torch.equal(a, b) for a, b in zip(before, m.nets[k].parameters())), k
    assert any(not torch.equal(a, b) for a, b in zip(seg0, m.nets["seg"].parameters()))
    m.progress = 0.3
    assert "adv_mask" in m.training_step(batch())


def test_warm_up_switches_at_its_share_of_a_step_budget(monkeypatch):
    from semiseg.methods.cyclegan import CycleGAN

    seen = []
    warm, full = CycleGAN.supervised_step, CycleGAN.generator_terms
    monkeypatch.setattr(CycleGAN, "supervised_step", lambda self, b: seen.append("warm") or warm(self, b))
    monkeypatch.setattr(CycleGAN, "generator_terms", lambda self, b: seen.append("full") or full(self, b))
    s = make_phantom(0, shape=(8, 32, 32), labelled=2, n_tumours=1)
    labels = s.labels.copy()
    train(
        s.image, s.labels, tags=s.tags, method="cyclegan", params={**TINY, "warmup": 0.3},
        config=TrainConfig(steps=10, batch_size=2, crop=32, seed=0), device="cpu",
    )
    assert seen == ["warm"] * 3 + ["full"] * 7
    assert np.array_equal(s.labels, labels)


def test_files_from_before_the_unet_segmenter_load_as_resnet(tmp_path):
    import json

    old = get_method("cyclegan")(1, 2, params={**TINY, "segmenter": "resnet", "seg_lr": 2e-4, "seg_beta1": 0.5})
    path = Model(old, Normaliser((0.0,), (1.0,)), 0).save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    for key in ("segmenter", "seg_features", "seg_lr", "seg_beta1", "warmup"):
        cfg["params"].pop(key)
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    loaded = Model.load(path)
    assert loaded.method.params.segmenter == "resnet" and loaded.method.params.warmup == 0.0
    x = torch.randn(1, 1, 16, 16)
    assert torch.allclose(old.predict(x)["probabilities"], loaded.method.predict(x)["probabilities"], atol=1e-6)
