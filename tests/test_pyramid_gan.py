"""Tests of the pyramid GAN (Li et al.), feature matching and the pyramid networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg.data import Normaliser
from semiseg.engine import TrainConfig, train
from semiseg.gan_losses import feature_matching_loss
from semiseg.methods import get_method, list_methods
from semiseg.model import Model
from semiseg.nets.gan_blocks import MultiViewPatchDiscriminator, SinGANGenerator
from semiseg.synthetic import make_phantom

TINY = {
    "features": (8, 16),
    "num_scales": 2,
    "phase_steps": 4,
    "phase_fractions": (0.5, 0.5),
    "gen_features": 8,
    "gen_blocks": 2,
    "disc_features": 8,
    "disc_layers": 2,
}


def make(k=2, **over):
    torch.manual_seed(0)
    return get_method("pyramid-gan")(1, k, params={**TINY, **over})


def batch(b=2, side=32, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, side, side, dtype=torch.long)
    mask[:, side // 4 : side // 2, side // 4 : 3 * side // 4] = k - 1
    return {
        "labelled": torch.randn(b, 1, side, side, generator=g) + mask[:, None].float(),
        "mask": mask,
        "unlabelled": torch.randn(b, 1, side, side, generator=g),
    }


# ----------------------------------------------------------------------------- feature matching
def test_feature_matching_matches_formula():
    real = [torch.ones(1, 2, 2, 2), torch.zeros(1, 1, 3, 3)]
    fake = [torch.zeros(1, 2, 2, 2), torch.full((1, 1, 3, 3), -3.0)]
    # Layer means |1 - 0| = 1 and |0 + 3| = 3, averaged over layers.
    assert feature_matching_loss(real, fake).item() == pytest.approx(2.0)
    # Nested per-view lists flatten to the same layers.
    assert feature_matching_loss([real[:1], real[1:]], [fake[:1], fake[1:]]).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        feature_matching_loss(real, fake[:1])


def test_feature_matching_trains_only_the_fake_side():
    real = torch.tensor([1.0, 2.0], requires_grad=True)
    fake = torch.tensor([0.0, 4.0], requires_grad=True)
    loss = feature_matching_loss([real], [fake])
    assert loss.item() == pytest.approx((1 + 2) / 2)
    loss.backward()
    assert real.grad is None
    assert torch.allclose(fake.grad, torch.tensor([-0.5, 0.5]))


# ----------------------------------------------------------------------------- networks
def test_singan_generator_is_residual_on_the_upsampled_image():
    g = SinGANGenerator(1, 3, features=4, n_blocks=2)
    last = g.body[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    up = torch.randn(2, 1, 8, 8)
    mask = torch.rand(2, 3, 8, 8)
    assert torch.equal(g(mask, torch.randn(2, 1, 8, 8), up), up)
    assert torch.equal(g(mask, torch.randn(2, 1, 8, 8)), torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize(("side", "views"), [(8, 1), (32, 2), (64, 3), (128, 3)])
def test_multiview_discriminator_views_and_features(side, views):
    d = MultiViewPatchDiscriminator(3, num_views=3, features=4, n_layers=2, min_size=16)
    scores, feats = d(torch.randn(2, 3, side, side))
    assert len(scores) == len(feats) == views
    assert all(len(f) == 3 for f in feats)  # 2 stride-2 layers + 1 stride-1 layer
    assert scores[0].shape[:2] == (2, 1) and scores[0].shape[-1] == math.ceil(side / 4)


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("steps", "fractions", "ends", "levels"),
    [
        (100, (0.25, 0.25, 0.5), (25, 50, 100), {0: 0, 24: 0, 25: 1, 49: 1, 50: 2, 99: 2, 500: 2}),
        (10, (1, 1), (5, 10), {0: 0, 4: 0, 5: 1, 10: 1}),
        (3, (1.0,), (3,), {0: 0, 100: 0}),
    ],
)
def test_phase_schedule(steps, fractions, ends, levels):
    m = make(num_scales=len(fractions), phase_steps=steps, phase_fractions=fractions)
    assert m.phase_ends == ends
    for step, lv in levels.items():
        assert m.level_at(step) == lv


def test_warm_up_per_level():
    m = make(phase_steps=12, phase_fractions=(0.5, 0.5), synth_warmup=1 / 3)
    warm = [m.warmed_up(s) for s in range(14)]
    assert warm == [False, False, True, True, True, True, False, False, True, True, True, True, True, True]


@pytest.mark.parametrize(
    "over",
    [{"phase_fractions": (1.0,)}, {"phase_fractions": (1.0, 0.0)}, {"num_scales": 0}, {"synth_warmup": 2.0}],
)
def test_bad_params_raise(over):
    with pytest.raises(ValueError):
        make(**over)


# ----------------------------------------------------------------------------- training
def test_registered():
    assert "pyramid-gan" in list_methods()
    cls = get_method("pyramid-gan")
    assert cls.can_sample
    p = cls.Params()
    assert (p.rec_weight, p.feat_weight, p.perc_weight, p.ce_weight, p.synth_ce_weight) == (0.001, 10, 10, 1, 0.03)


def test_training_runs_coarse_to_fine_and_freezes_coarse_levels():
    m = make()
    b = batch()
    keys = {"d", "g_adv", "g_rec", "g_feat", "s_ce", "s_dice_loss", "s_adv", "s_synth"}
    snapshot = None
    for step in range(6):
        lv = m.level
        assert lv == (0 if step < 2 else 1)
        before = {k: [p.detach().clone() for p in n.parameters()] for k, n in m.nets.items()}
        losses = m.training_step(b)
        assert set(losses) == keys and all(math.isfinite(v) for v in losses.values())
        assert (losses["s_synth"] > 0) == m.warmed_up(step)
        for kind in ("gen", "seg", "disc"):
            changed = any(not torch.equal(a, q) for a, q in zip(before[f"{kind}{lv}"], m.nets[f"{kind}{lv}"].parameters()))
            assert changed, f"{kind}{lv} not trained"
        m.step += 1
        if step == 2:
            snapshot = {k: [p.detach().clone() for p in m.nets[k].parameters()] for k in ("gen0", "seg0", "disc0")}
    # Level 0 stays frozen during level 1's phase.
    for k, params in snapshot.items():
        assert all(torch.equal(a, q) for a, q in zip(params, m.nets[k].parameters())), k


@pytest.mark.parametrize("init", [True, False])
def test_finer_level_starts_from_coarser_weights(init):
    m = make(init_from_coarser=init)
    b = batch()
    m.training_step(b)
    m.step = 2  # first step of level 1
    coarse = [q.detach().clone() for q in m.nets["seg0"].parameters()]
    fine = [q.detach().clone() for q in m.nets["seg1"].parameters()]
    m.training_step(b)
    assert m.nets["seg1"].state_dict().keys() == m.nets["seg0"].state_dict().keys()
    # After one Adam step from the copied weights, level 1 is close to level 0 (lr 5e-4).
    dist = lambda ref: max((a - q).abs().max().item() for a, q in zip(ref, m.nets["seg1"].parameters()))  # noqa: E731
    assert (dist(coarse) < dist(fine)) == init


def test_predict_shapes_at_every_level():
    m = make(k=3)
    x = torch.randn(2, 1, 16, 24)
    assert m.size_multiple == 4
    for step in (0, 3):
        m.step = step
        p = m.predict(x)["probabilities"]
        assert p.shape == (2, 3, 16, 24)
        assert torch.allclose(p.sum(1), torch.ones(2, 16, 24), atol=1e-5)


def test_training_crops_are_cut_to_the_size_multiple():
    m = make(features=(8, 16, 32))  # multiple 2 * 4 = 8
    assert math.isfinite(m.training_step(batch(side=36))["s_ce"])
    with pytest.raises(ValueError, match="size multiple"):
        m.training_step(batch(side=6))


@pytest.mark.parametrize("step", [0, 3])
def test_sampling_is_seeded(step):
    m = make()
    m.training_step(batch())
    m.step = step
    x = batch(b=2, side=16)["labelled"]
    a = m.sample_tumours(x, 3, seed=5)
    assert a.shape == (3, 2, 1, 16, 16)
    assert torch.equal(a, m.sample_tumours(x, 3, seed=5))
    assert not torch.allclose(a, m.sample_tumours(x, 3, seed=6))
    assert not torch.allclose(a[0], a[1])  # the n samples differ from each other
    g = m.generate(torch.zeros(1, 16, 16, dtype=torch.long), n=2, seed=1)
    assert g.shape == (2, 1, 1, 16, 16)


def test_model_round_trip_restores_level(tmp_path):
    m = make()
    b = batch()
    m.training_step(b)
    m.step = 3
    path = Model(m, Normaliser((0.0,), (1.0,)), 0).save(tmp_path / "pg.pt")
    loaded = Model.load(path).method
    assert loaded.name == "pyramid-gan" and loaded.level == m.level == 1
    x = batch(side=16)["unlabelled"]
    assert torch.allclose(m.predict(x)["probabilities"], loaded.predict(x)["probabilities"], atol=1e-6)
    assert torch.equal(m.sample_tumours(x, 2, seed=3), loaded.sample_tumours(x, 2, seed=3))


def test_engine_trains_samples_and_leaves_labels_untouched():
    import semiseg

    s = make_phantom(0, shape=(8, 32, 32), labelled=2, n_tumours=1)
    labels = s.labels.copy()
    model = train(
        s.image, s.labels, tags=s.tags, method="pyramid-gan", params=TINY,
        config=TrainConfig(steps=3, batch_size=2, crop=32, seed=0), device="cpu",
    )
    assert np.array_equal(s.labels, labels)
    assert model.method.step == 3 and model.method.level == 1
    assert model.predict(s.image)["mask"].shape == s.image.shape
    tumours = semiseg.sample_tumours(model, s.image, 4, 2, seed=0)
    assert tumours.shape == (2, 32, 32) and np.isfinite(tumours).all()


# ----------------------------------------------------------------------------- progress schedule (issue 19)
def test_level_follows_the_run_progress_and_never_goes_back():
    m = make(phase_steps=0, phase_fractions=(0.5, 0.5))
    b = batch()
    assert m.phase_ends is None and m.phase_shares == (0.5, 1.0)
    levels = []
    for progress in (0.0, 0.25, 0.5, 0.75):
        m.progress = progress
        levels.append(m.level)
        m.training_step(b)
        m.step += 1
    assert levels == [0, 0, 1, 1]
    # Continuing: the new run's progress starts again at 0, the level stays the finest reached.
    m.progress = 0.0
    assert m.level == 1 and m.warmed_up()
    state = m.state_dict()
    fresh = make(phase_steps=0, phase_fractions=(0.5, 0.5))
    fresh.load_state_dict(state)
    assert fresh.level == 1


def test_progress_schedule_copies_the_coarser_weights_when_a_level_is_entered():
    m = make(phase_steps=0, phase_fractions=(0.5, 0.5))
    b = batch()
    m.progress = 0.1
    m.training_step(b)
    m.progress = 0.6
    m.training_step(b)  # enters level 1 from level 0's weights, then one Adam step
    dist = max((a - q).abs().max().item() for a, q in zip(m.nets["seg0"].parameters(), m.nets["seg1"].parameters()))
    assert dist < 0.01


def test_engine_reaches_the_finest_level_in_any_budget():
    s = make_phantom(0, shape=(8, 32, 32), labelled=2, n_tumours=1)
    params = {**TINY, "phase_steps": 0}
    model = train(
        s.image, s.labels, tags=s.tags, method="pyramid-gan", params=params,
        config=TrainConfig(steps=4, batch_size=2, crop=32, seed=0), device="cpu",
    )
    assert model.method.level == 1


def test_segmenter_adversarial_weight_is_0_1_on_cpu_and_the_papers_1_in_its_preset():
    from semiseg.methods import get_method

    cls = get_method("pyramid-gan")
    assert cls.parse_params(cls.preset_params("cpu")).seg_adv_weight == 0.1
    assert cls.parse_params(cls.preset_params("paper")).seg_adv_weight == 1.0
