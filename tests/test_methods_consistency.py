"""Training-level tests of the consistency family: autoencoder, mean-teacher, entropy-min,
mutual-info."""

import hashlib
import math

import pytest
import torch

import semiseg
from semiseg.methods import get_method
from semiseg.methods.autoencoder import ReconstructionDecoder

METHODS = ["autoencoder", "mean-teacher", "entropy-min", "mutual-info", "self-training"]
TINY = {"features": (8, 16)}


def base_params(name):
    """Tiny nets; unsupervised terms from the first step."""
    return {**TINY, "warmup": 0.0}


def make(name, **params):
    torch.manual_seed(0)
    return get_method(name)(1, 3, params={**base_params(name), **params}, device="cpu")


def tiny_batch(seed=0, n=2, size=16):
    g = torch.Generator().manual_seed(seed)
    return {
        "labelled": torch.randn(n, 1, size, size, generator=g),
        "mask": torch.randint(0, 3, (n, size, size), generator=g),
        "unlabelled": torch.randn(n, 1, size, size, generator=g),
    }


@pytest.mark.parametrize("name", METHODS)
def test_registered_with_params(name):
    cls = get_method(name)
    assert name in semiseg.list_methods()
    assert cls.name == name and cls.summary and cls.reference
    assert "unlabelled" in cls(1, 2, params=TINY).batch_needs(4)


@pytest.mark.parametrize("name", METHODS)
def test_two_steps_finite_and_shapes(name):
    m = make(name)
    for s in range(2):
        losses = m.training_step(tiny_batch(s))
        m.step += 1
        assert losses and all(math.isfinite(v) for v in losses.values()), losses
    x = torch.randn(3, 1, 16, 16)
    out = m.predict(x)
    assert out["probabilities"].shape == (3, 3, 16, 16)
    assert torch.allclose(out["probabilities"].sum(1), torch.ones(3, 16, 16), atol=1e-5)
    for key in m.outputs:
        assert out[key].shape == (3, 1, 16, 16)
    assert m.uncertainty(x).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("autoencoder", {"dice_loss", "ce", "rec"}),
        ("mean-teacher", {"dice_loss", "ce", "consistency"}),
        ("entropy-min", {"dice_loss", "ce", "entropy", "prior"}),
        ("mutual-info", {"dice_loss", "ce", "mi", "reg"}),
        ("self-training", {"dice_loss", "ce", "pseudo"}),
    ],
)
def test_named_losses(name, keys):
    assert set(make(name).training_step(tiny_batch())) == keys


@pytest.mark.parametrize("name", METHODS)
def test_iter_train_leaves_labels_untouched(name):
    s = semiseg.make_phantom(0, shape=(8, 32, 32), labelled=2)
    labels = s.labels
    before = hashlib.sha256(labels.tobytes()).hexdigest()
    image_before = hashlib.sha256(s.image.tobytes()).hexdigest()
    cfg = semiseg.TrainConfig(steps=2, batch_size=2, crop=16)
    model = semiseg.run(
        semiseg.iter_train(s.image, labels, tags=s.tags, method=name, params=base_params(name), config=cfg, device="cpu")
    )
    assert model.history[-1]["steps"] == 2
    assert hashlib.sha256(labels.tobytes()).hexdigest() == before
    assert hashlib.sha256(s.image.tobytes()).hexdigest() == image_before
    out = semiseg.predict_volume(model, s.image)
    assert out["mask"].shape == s.image.shape


def test_autoencoder_reconstruction_decoder_has_no_skips():
    m = make("autoencoder")
    rec = m.nets["rec"]
    assert isinstance(rec, ReconstructionDecoder)
    # Structure: every block keeps its channel count (a skip would concatenate and double it).
    for block in rec.up:
        convs = [mod for mod in block.modules() if isinstance(mod, torch.nn.Conv2d)]
        assert convs[0].in_channels == convs[0].out_channels
    # Data flow: the reconstruction depends on the bottleneck only, not on the finer features.
    x = torch.randn(2, 1, 16, 16)
    feats = [f.detach().requires_grad_(True) for f in m.nets["seg"].encode(x)]
    out = rec(feats[-1])
    out.sum().backward()
    assert feats[-1].grad is not None and feats[-1].grad.abs().sum() > 0
    assert all(f.grad is None for f in feats[:-1])
    # whereas the segmentation decoder does use them
    logits = m.nets["seg"].decode(feats)
    logits.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats[:-1])


def test_autoencoder_learns_to_reconstruct():
    m = make("autoencoder", lr=3e-3)
    first = m.training_step(tiny_batch(0))["rec"]
    for _ in range(15):
        last = m.training_step(tiny_batch(0))["rec"]
    assert last < first


def test_mean_teacher_teacher_is_ema_and_predicts():
    m = make("mean-teacher", ema_decay=0.99, ema_warmup=False)
    student, teacher = m.nets["seg"], m.nets["teacher"]
    assert all(not q.requires_grad for q in teacher.parameters())
    t0 = [q.detach().clone() for q in teacher.parameters()]
    m.training_step(tiny_batch())
    for t, a, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(t, 0.99 * a + 0.01 * s.detach(), atol=1e-6)
    # predictions come from the teacher: perturbing the student alone leaves them unchanged
    x = torch.randn(1, 1, 16, 16)
    before = m.predict(x)["probabilities"]
    with torch.no_grad():
        for q in student.parameters():
            q.add_(1.0)
    assert torch.equal(m.predict(x)["probabilities"], before)
    # and the uncertainty is the teacher/student disagreement, now nonzero
    assert m.uncertainty(x).max() > 0


def test_mean_teacher_uncertainty_zero_when_identical():
    m = make("mean-teacher")
    x = torch.randn(1, 1, 16, 16)
    assert torch.allclose(m.uncertainty(x), torch.zeros(1, 16, 16))


def test_mean_teacher_paper_variant_and_rampup():
    m = make("mean-teacher", ema_decay=0.99, ema_warmup=False, consistency_weight=0.01, rampup=0)
    assert m.consistency_weight() == pytest.approx(0.01)
    m2 = make("mean-teacher", consistency_weight=1.0, rampup=0.5)
    assert m2.consistency_weight() == pytest.approx(math.exp(-5))
    m2.progress = 0.5  # the ramp follows the run's progress, not the step count
    assert m2.consistency_weight() == pytest.approx(1.0)


def test_mean_teacher_state_roundtrip():
    m = make("mean-teacher")
    m.training_step(tiny_batch())
    m.step = 1
    m2 = make("mean-teacher")
    m2.load_state_dict(m.state_dict())
    x = torch.randn(1, 1, 16, 16)
    assert torch.allclose(m.predict(x)["probabilities"], m2.predict(x)["probabilities"])


def test_mutual_info_mse_variant_and_ablation():
    m = make("mutual-info", consistency="mse", mi_weight=0.0)
    losses = m.training_step(tiny_batch())
    assert math.isfinite(losses["reg"]) and 0 <= losses["mi"] <= math.log(3) + 1e-6


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("mutual-info", {"consistency": "l2"}),
        ("mutual-info", {"radius": -1}),
        ("mean-teacher", {"ema_decay": 1.5}),
        ("entropy-min", {"entropy_weight": -1.0}),
        ("autoencoder", {"rec_weight": -1.0}),
        ("mean-teacher", {"no_such_param": 1}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(ValueError):
        make(name, **params)


def test_params_from_strings():
    m = make("mean-teacher", ema_warmup="false", ema_decay="0.99", consistency_weight="0.01")
    assert m.params.ema_warmup is False and m.params.ema_decay == 0.99
    assert get_method("mutual-info").Params().weight == 0.1
    assert get_method("mean-teacher").Params().ema_decay == 0.99


@pytest.mark.parametrize(
    ("name", "term"), [("mean-teacher", "consistency"), ("entropy-min", "entropy"), ("mutual-info", "mi")]
)
def test_warmup_is_supervised_only(name, term):
    m = make(name, warmup=0.5)
    batch = tiny_batch()
    del batch["unlabelled"]  # not even looked at during the warm-up
    assert term not in m.training_step(batch)
    m.progress = 0.5
    assert term in m.training_step(tiny_batch())


@pytest.mark.parametrize("name", METHODS)
def test_unlabelled_ratio(name):
    assert make(name, unlabelled_ratio=0.5).batch_needs(8) == {"labelled": 8, "unlabelled": 4}
