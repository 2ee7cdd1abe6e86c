"""Tests of the translation method (Vorontsov et al.) and its networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.data import InputError
from semiseg.engine import TrainConfig, iter_train, run
from semiseg.inference import predict_normalised_slices
from semiseg.methods import get_method
from semiseg.nets.discriminators import has_spectral_norm, hinge_d_loss, hinge_g_loss
from semiseg.nets.translation import TaskLayerNorm, TranslationNet

SMALL = {"features": (8, 16, 32), "unique_channels": 8, "disc_features": (8, 16), "disc_scales": 3}


def make_method(**kw):
    torch.manual_seed(0)
    return get_method("translation")(1, 2, params={**SMALL, **kw}, device="cpu")


def small_net(seed=0, num_classes=2):
    torch.manual_seed(seed)
    return TranslationNet(1, num_classes, features=(8, 16, 32), unique_channels=8).eval()


def test_registered_with_outputs():
    cls = get_method("translation")
    assert cls.outputs == {"healthy": "image", "residual": "difference"}
    assert cls.can_sample and cls.uses_tags
    # The batch's crops split between the domains (CPU default), N + N as the paper, and the
    # annotated crops of the supervised objective.
    assert cls.batch_needs(make_method(), 5) == {"labelled": 5, "diseased": 2, "healthy": 2}
    assert cls.batch_needs(make_method(batch_split=False), 5) == {"labelled": 5, "diseased": 5, "healthy": 5}


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 1, 24, 40), (3, 1, 32, 8)])
def test_reconstruction_is_healthy_plus_residual(shape):
    net = small_net()
    with torch.no_grad():
        out = net.translate(torch.randn(shape))
    assert out["healthy"].shape == shape and out["residual"].shape == shape
    assert torch.equal(out["reconstruction"], out["healthy"] + out["residual"])
    m = make_method()
    o = m.forward_all(torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16))
    assert torch.equal(o["x_PP"], o["x_PA"] + o["res_PA"])


@pytest.mark.parametrize("spectral", [True, False])
def test_every_network_is_spectrally_normalised(spectral):
    # The paper's setting (the paper preset) normalises every network; the CPU default leaves
    # the generator alone (its segmentation path learns nothing in minutes with it, issue 19).
    m = make_method(spectral=spectral)
    assert set(m.nets) == {"gen", "disc_a", "disc_p"}
    for name, net in m.nets.items():
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert layers, name
        normalised = [has_spectral_norm(m) for m in layers]
        expected = spectral or name != "gen"
        assert all(n == expected for n in normalised), f"{name}: spectral norm {normalised}"
    # 3 scales per discriminator.
    assert len(m.nets["disc_a"].nets) == 3
    assert get_method("translation").preset_params("paper")["spectral"] is True


def _perturb(param: torch.Tensor) -> None:
    with torch.no_grad():
        param.add_(0.5 * torch.randn_like(param))


def test_segmentation_shares_convolutions_but_not_norms():
    net = small_net()
    dec = net.residual
    x = torch.randn(2, 1, 16, 16)

    def both():
        with torch.no_grad():
            c, u, sk = net.encode(x)
            return net.decode_residual(c, u, sk), net.segment_codes(c, u, sk)

    res0, seg0 = both()
    norms = [m for m in dec.modules() if isinstance(m, TaskLayerNorm)]
    assert norms
    for n in norms:
        assert set(n.weight) == {"translation", "segmentation"}
        assert n.weight["translation"] is not n.weight["segmentation"]
    # Segmentation norm parameters change the segmentation only.
    for n in norms:
        _perturb(n.weight["segmentation"])
        _perturb(n.bias["segmentation"])
    res1, seg1 = both()
    assert torch.equal(res0, res1) and not torch.allclose(seg0, seg1)
    # Translation norm parameters change the residual only.
    for n in norms:
        _perturb(n.weight["translation"])
        _perturb(n.bias["translation"])
    res2, seg2 = both()
    assert torch.equal(seg1, seg2) and not torch.allclose(res1, res2)
    # A shared convolution of the body changes both.
    _perturb(dec.blocks[0].conv.parametrizations.weight.original)
    res3, seg3 = both()
    assert not torch.allclose(res2, res3) and not torch.allclose(seg2, seg3)
    # The only segmentation-specific layers are the classifier and the norm parameters.
    seg_only = {n for n, _ in dec.named_parameters() if "segmentation" in n or n.startswith("classifier")}
    assert seg_only and all("segmentation" in n or "classifier" in n for n in seg_only)


def test_common_decoder_never_receives_unique_code():
    net = small_net()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = net.translate(x)

    def scramble_u(module, inputs, output):
        code, skips = output
        code = code.clone()
        code[:, net.common_channels :] = torch.randn_like(code[:, net.common_channels :]) * 5
        return code, skips

    handle = net.encoder.register_forward_hook(scramble_u)
    try:
        with torch.no_grad():
            out = net.translate(x)
    finally:
        handle.remove()
    assert torch.equal(out["healthy"], ref["healthy"])
    assert not torch.allclose(out["residual"], ref["residual"])
    # And no gradient flows from the healthy image into u.
    c, u, skips = net.encode(x)
    u = u.detach().requires_grad_(True)
    healthy = net.decode_common(c, skips)
    assert torch.autograd.grad(healthy.sum(), u, allow_unused=True)[0] is None


def test_sampled_tumours_are_seeded_and_vary_with_u():
    m = make_method()
    x = torch.randn(2, 1, 16, 24)
    a = m.sample_tumours(x, 3, seed=7)
    assert a.shape == (3, 2, 1, 16, 24)
    assert torch.equal(a, m.sample_tumours(x, 3, seed=7))
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(a, m.sample_tumours(x, 3, seed=8))
    # Every sample is the healthy translation plus a residual drawn from g_res(c, u).
    healthy = m.predict(x)["healthy"]
    assert bool(((a - healthy).abs().flatten(2).amax(-1) > 0).all())


def test_hinge_losses_hand_computed():
    real = [torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0]])]
    fake = [torch.tensor([[-2.0, 0.0]]), torch.tensor([[1.0]])]
    # scale 1: mean(relu(1-0.5), relu(1-2)) = 0.25; mean(relu(1-2), relu(1+0)) = 0.5 -> 0.75
    # scale 2: relu(1+1) = 2; relu(1+1) = 2 -> 4; average over scales: (0.75 + 4) / 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.375)
    # generator: -(mean(-2, 0) + 1) / 2 = -(-1 + 1) / 2 = 0
    assert hinge_g_loss(fake).item() == pytest.approx(0.0)
    assert hinge_g_loss([torch.tensor([[3.0]])]).item() == pytest.approx(-3.0)
    # Perfect separation beyond the margins gives zero discriminator loss.
    assert hinge_d_loss([torch.full((1, 4), 1.5)], [torch.full((1, 4), -1.5)]).item() == 0.0


def test_one_training_step_updates_both_players():
    m = make_method(lr=1e-3, warmup=0.0)
    g = torch.Generator().manual_seed(0)
    batch = {
        "healthy": torch.randn(3, 1, 16, 16, generator=g),
        "diseased": torch.randn(3, 1, 16, 16, generator=g),
        "diseased_mask": torch.randint(0, 2, (3, 16, 16), generator=g),
        "diseased_has_mask": torch.tensor([True, False, True]),
    }
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in m.nets.items()}
    losses = m.training_step(batch)
    assert set(losses) == {"seg", "rec", "lat", "cyc", "adv_g", "adv_d", "sparse"}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["seg"] > 0
    for k, n in m.nets.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], n.parameters())), k
    # No mask in the batch: the Dice term is zero, the rest still trains.
    batch["diseased_has_mask"] = torch.tensor([False, False, False])
    assert m.training_step(batch)["seg"] == 0.0


def test_weights_are_normalised_like_the_paper():
    w = make_method(w_seg=0.01, w_adv=3.0, w_sparse=0.0)._weights()
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["rec"] / w["adv"] == pytest.approx(50 / 3)
    with pytest.raises(ValueError):
        make_method(w_rec=-1.0)
    with pytest.raises(ValueError, match="w_sparse"):
        make_method(w_sparse=-1.0)
    with pytest.raises(ValueError, match="sparse_margin"):
        make_method(sparse_margin=-1)


def _volume(seed=0, z=6, size=24):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, (z, size, size)).astype(np.float32)
    labels = np.zeros((z, size, size), np.uint8)
    labels[1, 8:14, 8:14] = 1
    image[1:3, 8:14, 8:14] += 60
    tags = np.array([0, 1, 1, 0, -1, 0], np.int8)[:z]
    return image, labels, tags


def test_missing_healthy_tags_is_a_clear_input_error():
    image, labels, tags = _volume()
    tags = np.where(tags == 0, -1, tags)
    gen = iter_train(
        image, labels, tags=tags, method="translation", params=SMALL,
        config=TrainConfig(steps=1, batch_size=2, crop=16), device="cpu",
    )
    with pytest.raises(InputError, match="tagged healthy"):
        run(gen)


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 1, 21, 37)])
def test_predict_shapes(shape):
    m = make_method()
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = predict_normalised_slices(m, x, outputs=("healthy", "residual"), tile_size=None)
    b, _, h, w = shape
    assert out["probabilities"].shape == (b, 2, h, w)
    assert out["mask"].shape == (b, h, w)
    assert out["healthy"].shape == out["residual"].shape == shape
    np.testing.assert_allclose(out["probabilities"].sum(1), 1, atol=1e-5)


def test_cli_predict_writes_translation_outputs(tmp_path):
    from semiseg.cli import main
    from semiseg.data import write_weak_csv
    from semiseg.io import write_volume

    image, labels, tags = _volume()
    write_volume(tmp_path / "image.npy", image)
    write_volume(tmp_path / "labels.npy", labels)
    write_weak_csv(tmp_path / "weak.csv", tags)
    model = tmp_path / "model.pt"
    params = ["--param", "features=8,16,32", "--param", "unique_channels=8", "--param", "disc_features=8,16"]
    rc = main([
        "train", str(tmp_path / "image.npy"), str(tmp_path / "labels.npy"), "-o", str(model),
        "--method", "translation", "--weak", str(tmp_path / "weak.csv"), "--steps", "2",
        "--batch-size", "2", "--crop", "16", "--device", "cpu", *params,
    ])
    assert rc == 0
    out = {k: tmp_path / f"{k}.npy" for k in ("mask", "residual", "healthy", "tumours")}
    rc = main([
        "predict", str(model), str(tmp_path / "image.npy"), "-o", str(out["mask"]),
        "--residual", str(out["residual"]), "--healthy", str(out["healthy"]),
        "--tumours", str(out["tumours"]), "--n-samples", "3", "--device", "cpu",
    ])
    assert rc == 0
    res = {k: np.load(v) for k, v in out.items()}
    assert res["mask"].shape == image.shape
    assert res["residual"].shape == res["healthy"].shape == image.shape
    assert res["tumours"].shape == (3, *image.shape)
    # Healthy image is in image intensity units, not normalised units.
    assert abs(float(res["healthy"].mean()) - 100) < 100
    for v in res.values():
        assert np.all(np.isfinite(v))


# ----------------------------------------------------------------------------- warm start (issue 19)
def _spy_phases(monkeypatch):
    """(progress, phase) of every step: ``warm`` when the step trained the supervised
    objective alone, ``translation`` when the translation losses ran too."""
    cls = get_method("translation")
    seen = []
    original = cls.training_step

    def spy(self, batch):
        out = original(self, batch)
        seen.append((self.progress, "warm" if set(out) == {"seg"} else "translation", self.translation_share()))
        return out

    monkeypatch.setattr(cls, "training_step", spy)
    return seen


def test_warm_start_switches_at_the_stated_share_of_a_step_budget(monkeypatch):
    seen = _spy_phases(monkeypatch)
    image, labels, tags = _volume()
    before = labels.copy()
    run(iter_train(
        image, labels, tags=tags, method="translation", params={**SMALL, "warmup": 0.3, "ramp": 0.4},
        config=TrainConfig(steps=10, batch_size=2, crop=16), device="cpu",
    ))
    assert np.array_equal(labels, before)
    assert [phase for _, phase, _ in seen] == ["warm"] * 3 + ["translation"] * 7
    # The translation weights ramp from 0 at 30 % to full at 70 % of the run.
    shares = [share for _, _, share in seen]
    assert shares == pytest.approx([0.0] * 4 + [0.25, 0.5, 0.75] + [1.0] * 3)


def test_warm_start_switches_at_the_stated_share_of_a_time_budget(monkeypatch):
    from semiseg import engine

    ticks = iter(range(0, 10**6, 6))  # 6 CPU-seconds per clock reading: about 10 steps in 1 minute
    monkeypatch.setattr(engine.time, "process_time", lambda: float(next(ticks)))
    seen = _spy_phases(monkeypatch)
    image, labels, tags = _volume()
    run(iter_train(
        image, labels, tags=tags, method="translation", params={**SMALL, "warmup": 0.5},
        config=TrainConfig(steps=10**6, minutes=1, clock="process", batch_size=2, crop=16), device="cpu",
    ))
    assert len(seen) >= 4
    for progress, phase, _ in seen:
        assert phase == ("warm" if progress < 0.5 else "translation"), seen
    assert {phase for _, phase, _ in seen} == {"warm", "translation"}


def test_warm_up_trains_only_the_encoder_and_segmentation_path():
    m = make_method(warmup=1.0)
    g = torch.Generator().manual_seed(0)
    batch = {
        "labelled": torch.randn(2, 1, 16, 16, generator=g), "mask": torch.randint(0, 2, (2, 16, 16), generator=g),
        "healthy": torch.randn(2, 1, 16, 16, generator=g), "diseased": torch.randn(2, 1, 16, 16, generator=g),
        "diseased_mask": torch.zeros(2, 16, 16, dtype=torch.long), "diseased_has_mask": torch.tensor([False, False]),
    }
    gen = m.nets["gen"]
    before = {k: v.detach().clone() for k, v in gen.state_dict().items()}
    disc = [p.detach().clone() for p in m.nets["disc_a"].parameters()]
    assert set(m.training_step(batch)) == {"seg"}
    changed = {k for k, v in gen.state_dict().items() if not torch.equal(before[k], v)}
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("residual.") for k in changed)
    assert not any(k.startswith("common.") for k in changed)  # the healthy decoder waits
    assert all(torch.equal(a, b) for a, b in zip(disc, m.nets["disc_a"].parameters()))


def test_missing_healthy_tags_fail_at_the_first_step_even_in_the_warm_up():
    m = make_method(warmup=0.5)
    batch = {"labelled": torch.randn(2, 1, 16, 16), "mask": torch.zeros(2, 16, 16, dtype=torch.long),
             "diseased": torch.randn(2, 1, 16, 16)}
    with pytest.raises(InputError, match="tagged healthy"):
        m.training_step(batch)


def test_bad_warmup_share_raises():
    with pytest.raises(ValueError, match="warmup and ramp"):
        make_method(warmup=1.5)


def test_sample_tumours_are_drawn_in_the_prediction_windows(monkeypatch):
    import semiseg
    from semiseg.model import Model

    image, labels, tags = _volume(size=40)
    model = semiseg.train(image, labels, tags=tags, method="translation", params=SMALL,
                          config=TrainConfig(steps=1, batch_size=2, crop=16), device="cpu")
    assert isinstance(model, Model) and model.tile_size == 16
    seen = []
    original = type(model.method).sample_tumours

    def spy(self, x, n, seed=0):
        seen.append(tuple(x.shape[-2:]))
        return original(self, x, n, seed)

    monkeypatch.setattr(type(model.method), "sample_tumours", spy)
    out = semiseg.sample_tumours(model, image, 1, 2, seed=3)
    assert out.shape == (2, 40, 40) and np.isfinite(out).all()
    assert len(seen) > 1 and all(s == (16, 16) for s in seen)  # windows of the training crop
    assert np.array_equal(out, semiseg.sample_tumours(model, image, 1, 2, seed=3))


# ---------------------------------------------------------------- residual locality (issue 19)
def test_sparsity_loss_is_zero_inside_the_dilated_tumour_and_positive_outside():
    m = make_method(w_sparse=10.0, sparse_margin=1)
    tumour = torch.zeros(1, 12, 12)
    tumour[0, 4:8, 4:8] = 1
    res = torch.zeros(1, 1, 12, 12)
    res[0, 0, 3:9, 3:9] = 5.0  # the tumour and its 1-pixel margin
    assert m.sparsity_loss(res, tumour).item() == 0.0
    res[0, 0, 0, 0] = -2.0  # far from the tumour
    assert m.sparsity_loss(res, tumour).item() == pytest.approx(2.0 / 144)
    # Without the margin the border pixels count too.
    m0 = make_method(w_sparse=10.0, sparse_margin=0)
    assert m0.sparsity_loss(res, tumour).item() == pytest.approx((2.0 + 5.0 * (36 - 16)) / 144)
    # A probability map weights each pixel by 1 - p.
    assert m0.sparsity_loss(torch.ones(1, 1, 4, 4), torch.full((1, 4, 4), 0.25)).item() == pytest.approx(0.75)


def test_tumour_map_takes_painted_masks_on_annotated_crops_and_probabilities_elsewhere():
    m = make_method(w_sparse=10.0)
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[0, 1, 1] = 1
    batch = {"diseased_mask": mask, "diseased_has_mask": torch.tensor([True, False])}
    p = torch.full((2, 4, 4), 0.5)
    t = m._tumour_map(batch, p)
    assert torch.equal(t[0], (mask[0] > 0).float())
    assert torch.equal(t[1], p[1])
    assert m._tumour_map({}, p) is p


def test_paper_preset_keeps_the_paper_objective():
    from semiseg.methods.translation import Translation, TranslationParams

    paper = Translation.presets["paper"]
    assert paper["w_sparse"] == 0.0 and paper["sparse_healthy"] is False and paper["w_adv"] == 3.0
    assert TranslationParams().w_sparse > 0  # the CPU default departs from the paper
    m = make_method(w_sparse=0.0, warmup=0.0)
    g = torch.Generator().manual_seed(0)
    batch = {"healthy": torch.randn(2, 1, 16, 16, generator=g), "diseased": torch.randn(2, 1, 16, 16, generator=g)}
    assert "sparse" not in m.training_step(batch)
    assert "sparse" not in m._weights() or m._weights()["sparse"] == 0.0


def test_sparsity_term_trains_the_residual_towards_zero_outside_the_tumour():
    params = {"warmup": 0.0, "ramp": 0.0, "w_sparse": 1.0, "w_adv": 0.0, "w_rec": 0.0, "w_lat": 0.0, "w_cyc": 0.0,
              "w_seg": 0.0, "lr": 1e-2, "sparse_healthy": True}
    m = make_method(**params)
    g = torch.Generator().manual_seed(0)
    batch = {
        "healthy": torch.randn(2, 1, 16, 16, generator=g), "diseased": torch.randn(2, 1, 16, 16, generator=g),
        "diseased_mask": torch.zeros(2, 16, 16, dtype=torch.long), "diseased_has_mask": torch.tensor([True, True]),
    }
    first = m.training_step(batch)["sparse"]
    assert first > 0
    for _ in range(5):
        last = m.training_step(batch)["sparse"]
    assert last < first


def test_two_training_steps_with_the_default_residual_term():
    image, labels, tags = _volume()
    config = TrainConfig(steps=2, batch_size=2, crop=16)
    model = run(iter_train(image, labels, tags=tags, method="translation",
                           params={**SMALL, "warmup": 0.0}, config=config, device="cpu"))
    h = model.history[-1]
    assert h["steps"] == 2
    assert "sparse" in h["losses"] and math.isfinite(h["losses"]["sparse"])
