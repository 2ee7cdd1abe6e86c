"""Issue 18 (and #20 item 1): schedules that follow the run's progress, self-training, the EMA
teacher's horizon, entropy-min's class-prior bound, warm starts and the continue rule."""

import hashlib
import math

import numpy as np
import pytest
import torch

import semiseg
from semiseg import InputError, TrainConfig
from semiseg.consistency import ema_decay_for_run, progress_weight
from semiseg.methods import get_method
from semiseg.metrics import dice_per_class

from ._util import TINY_PARAMS

SSL = ["self-training", "mean-teacher", "entropy-min", "mutual-info", "autoencoder"]
#: The loss key each method's unlabelled term reports.
TERM = {"self-training": "pseudo", "mean-teacher": "consistency", "entropy-min": "entropy",
        "mutual-info": "mi", "autoencoder": "rec"}


def tiny_batch(seed=0, n=2, size=16, channels=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "labelled": torch.randn(n, channels, size, size, generator=g),
        "mask": torch.randint(0, 2, (n, size, size), generator=g),
        "unlabelled": torch.randn(n, channels, size, size, generator=g),
    }


def make(name, **params):
    torch.manual_seed(0)
    return get_method(name)(1, 2, params={"features": (8, 16), **params}, device="cpu")


# ----------------------------------------------------------------------------- schedules
def test_progress_weight_warms_up_ramps_and_saturates():
    assert progress_weight(0.29, 0.3, 0.2) == 0.0
    assert progress_weight(0.3, 0.3, 0.2) == pytest.approx(math.exp(-5))
    assert progress_weight(0.4, 0.3, 0.2) == pytest.approx(math.exp(-5 * 0.25))
    assert progress_weight(0.5, 0.3, 0.2) == progress_weight(1.0, 0.3, 0.2) == 1.0
    assert progress_weight(0.0, 0.0, 0.0) == 1.0


@pytest.mark.parametrize("name", SSL)
def test_every_semi_supervised_method_is_marked_and_has_a_warmup_share(name):
    cls = get_method(name)
    assert cls.semi_supervised and 0 <= cls.Params().warmup <= 1
    assert not get_method("supervised").semi_supervised
    with pytest.raises(ValueError, match="warmup"):
        make(name, warmup=1.5)


@pytest.mark.parametrize("name", SSL)
def test_warmup_follows_progress_not_steps(name):
    m = make(name, warmup=0.5)
    m.step = 10_000  # a step count that any step-based warm-up would be long past
    m.progress = 0.49
    batch = tiny_batch()
    del batch["unlabelled"]  # the warm-up does not even look at unannotated crops
    assert TERM[name] not in m.training_step(batch)
    m.step, m.progress = 0, 0.5
    assert TERM[name] in m.training_step(tiny_batch())


def _spy_terms(monkeypatch, cls):
    seen = []
    original = cls.training_step

    def spy(self, batch):
        losses = original(self, batch)
        seen.append((self.progress, self.params.warmup, TERM[self.name] in losses))
        return losses

    monkeypatch.setattr(cls, "training_step", spy)
    return seen


@pytest.mark.parametrize("name", ["self-training", "mean-teacher", "entropy-min"])
@pytest.mark.parametrize("budget", ["steps", "time"])
def test_schedule_is_the_same_under_step_and_time_budgets(tiny_phantom, monkeypatch, name, budget):
    from semiseg import engine

    cls = get_method(name)
    seen = _spy_terms(monkeypatch, cls)
    if budget == "time":  # a fake process clock, 2 CPU-seconds per reading: the minute binds
        ticks = iter(range(0, 10**6, 2))
        monkeypatch.setattr(engine.time, "process_time", lambda: float(next(ticks)))
        cfg = TrainConfig(steps=10**6, minutes=1, clock="process", batch_size=2, crop=32)
    else:
        cfg = TrainConfig(steps=8, batch_size=2, crop=32)
    s = tiny_phantom
    semiseg.train(s.image, s.labels, method=name, params={**TINY_PARAMS, "warmup": 0.5}, config=cfg)
    assert 4 <= len(seen) < 100
    # The unannotated term is on exactly from half of the run, however the run is measured.
    assert [on for _, _, on in seen] == [p >= 0.5 for p, _, _ in seen]
    assert any(on for *_, on in seen) and not all(on for *_, on in seen)


# ----------------------------------------------------------------------------- EMA teacher
def test_ema_horizon_caps_the_decay_of_a_short_run_only():
    # 100 steps into a run of 200 (progress 0.5): a horizon of 0.1 averages over ~20 steps.
    assert ema_decay_for_run(100, 0.5, 0.99, horizon=0.1) == pytest.approx(1 - 1 / 20)
    # 5 000 of 10 000 steps: the cap (1 - 1/1000) is above alpha, which rules.
    assert ema_decay_for_run(5000, 0.5, 0.99, horizon=0.1) == 0.99
    assert ema_decay_for_run(100, 0.5, 0.99, horizon=0.0) == 0.99
    assert ema_decay_for_run(3, 0.0, 0.99, horizon=0.1) == pytest.approx(0.75)  # 1 - 1/(t+1)


def test_mean_teacher_keeps_up_with_its_student_in_a_short_run():
    def gap(horizon):
        m = make("mean-teacher", warmup=0.0, ema_horizon=horizon)
        for step in range(20):  # a 20-step run
            m.step, m.progress = step, step / 20
            m.training_step(tiny_batch(step))
        s, t = (torch.cat([q.flatten() for q in m.nets[k].parameters()]) for k in ("seg", "teacher"))
        return float((s - t).detach().norm())

    assert gap(0.1) < 0.5 * gap(0.0)


# ----------------------------------------------------------------------------- no graphs
def _record_grad(net):
    calls = []
    net.register_forward_hook(lambda mod, inp, out: calls.append((inp[0].shape[0], out.requires_grad)))
    return calls


def test_self_training_pseudo_labels_build_no_graph():
    m = make("self-training", warmup=0.0)
    calls = _record_grad(m.nets["seg"])
    m.progress = 0.9
    m.training_step(tiny_batch(n=2))
    # one pass on the two unannotated crops (the targets), without a graph; one with
    # (annotated + strong views)
    assert calls == [(2, False), (4, True)]


def test_mean_teacher_target_builds_no_graph():
    m = make("mean-teacher", warmup=0.0)
    teacher, student = _record_grad(m.nets["teacher"]), _record_grad(m.nets["seg"])
    m.progress = 0.9
    m.training_step(tiny_batch())
    assert teacher == [(2, False)] and student == [(4, True)]


# ----------------------------------------------------------------------------- entropy-min
def test_entropy_min_bounds_the_predicted_foreground_by_the_annotated_prior():
    m = make("entropy-min", warmup=0.0, rampup=0.0)
    with torch.no_grad():  # a network that calls every pixel foreground
        m.nets["seg"].head.bias.copy_(torch.tensor([-10.0, 10.0]))
    batch = tiny_batch()
    batch["mask"] = torch.zeros_like(batch["mask"])  # the annotations hold no foreground
    m.progress = 0.9
    losses = m.training_step(batch)
    assert losses["prior"] == pytest.approx(1.0, abs=1e-3)  # the whole excess share
    assert "prior" not in make("entropy-min", warmup=0.0, prior_weight=0.0).training_step(tiny_batch())


def test_entropy_min_prior_term_is_zero_within_the_prior():
    m = make("entropy-min", warmup=0.0, rampup=0.0)
    with torch.no_grad():  # a network that calls every pixel background
        m.nets["seg"].head.bias.copy_(torch.tensor([10.0, -10.0]))
    m.progress = 0.9
    assert m.training_step(tiny_batch())["prior"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- self-training
def test_self_training_never_writes_the_users_labels_and_learns(tiny_phantom):
    s = tiny_phantom
    labels = s.labels.copy()
    labels.flags.writeable = False  # any write would raise
    digest = hashlib.sha256(labels.tobytes()).hexdigest()
    params = {**TINY_PARAMS, "lr": 0.01, "warmup": 0.3, "threshold": 0.8}

    def unannotated_dice(steps):
        model = semiseg.train(s.image, labels, method="self-training", params=params,
                              config=TrainConfig(steps=max(steps, 1), batch_size=4, crop=32, seed=0),
                              should_stop=(lambda: True) if steps == 0 else None)
        pred = semiseg.predict_volume(model, s.image)["mask"]
        return model, dice_per_class(pred, s.truth, classes=[1], exclude_slices=s.annotated)[1]

    _, untrained = unannotated_dice(0)
    model, dice = unannotated_dice(80)
    assert hashlib.sha256(labels.tobytes()).hexdigest() == digest
    assert np.array_equal(labels, s.labels)
    assert model.history[-1]["losses"]["pseudo"] > 0  # pseudo-labels were used
    assert model.method.confident_share > 0.5
    assert model.history[-1]["losses"]["dice_loss"] < 0.6
    assert dice > max(0.15, 2 * untrained)


def test_self_training_honours_slice_context(tiny_phantom):
    s = tiny_phantom
    cfg = TrainConfig(steps=2, batch_size=2, crop=32, context=1)
    model = semiseg.train(s.image, s.labels, method="self-training", params={**TINY_PARAMS, "warmup": 0.0},
                          config=cfg)
    assert model.context == 1 and model.method.in_channels == 3
    assert "pseudo" in model.history[-1]["losses"]


def test_self_training_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        make("self-training", threshold=0.0)
    with pytest.raises(ValueError, match="class_balance"):
        make("self-training", class_balance=1.5)


def test_class_balance_keeps_the_most_confident_share_of_each_class():
    # 10 pixels: 8 background (all confident), 2 foreground (0.6 and 0.7, below the threshold)
    conf = torch.tensor([[[0.99] * 8 + [0.6, 0.7]]])
    labels = torch.tensor([[[0] * 8 + [1, 1]]])
    plain = make("self-training", threshold=0.9).confident(conf, labels)
    assert plain.tolist() == [[[True] * 8 + [False, False]]]  # FixMatch drops the rare class
    balanced = make("self-training", threshold=0.9, class_balance=0.5).confident(conf, labels)
    assert balanced.tolist() == [[[True] * 8 + [False, True]]]  # its more confident half is kept


def test_tag_loss_asks_a_diseased_crop_for_some_confident_foreground():
    m = make("self-training", tag_weight=1.0, tag_share=0.1)
    logits = torch.zeros(1, 2, 10, 10)
    logits[:, 0] = 5.0  # background everywhere: the lesion the tag promises is missing
    missing = m.tag_loss(logits).item()
    logits[:, 0, :1, :] = -5.0  # one row (10 % of the pixels) confidently foreground
    assert missing > 4.0 and m.tag_loss(logits).item() < 0.01


def test_tag_term_trains_only_on_unannotated_crops_tagged_diseased():
    m = make("self-training", warmup=0.0, rampup=0.0, tag_weight=1.0)
    m.progress = 0.9
    batch = tiny_batch()
    assert "tag" not in m.training_step(batch)  # no tags: no term
    batch["unlabelled_diseased"] = torch.tensor([False, False])
    assert "tag" not in m.training_step(batch)
    batch["unlabelled_diseased"] = torch.tensor([True, False])
    assert m.training_step(batch)["tag"] > 0
    off = make("self-training", warmup=0.0, rampup=0.0)
    off.progress = 0.9
    assert "tag" not in off.training_step(batch)  # tag_weight 0 by default
    with pytest.raises(ValueError, match="tag_share"):
        make("self-training", tag_share=0.0)


def test_class_balance_averages_the_pseudo_loss_per_class():
    ce = torch.tensor([[[1.0] * 8 + [3.0, 3.0]]])
    target = torch.tensor([[[0] * 8 + [1, 1]]])
    chosen = torch.ones_like(target, dtype=torch.bool)
    assert make("self-training").pseudo_loss(ce, target, chosen).item() == pytest.approx(1.4)  # 14 / 10
    balanced = make("self-training", class_balance=0.5).pseudo_loss(ce, target, chosen)
    assert balanced.item() == pytest.approx(2.0)  # (1 + 3) / 2: the two foreground pixels weigh half


# ----------------------------------------------------------------------------- warm start
@pytest.fixture(scope="module")
def supervised_model(tiny_phantom):
    s = tiny_phantom
    return semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=TrainConfig(steps=3, batch_size=2, crop=32))


def _equal_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", SSL)
def test_warm_start_begins_with_the_models_weights(tiny_phantom, supervised_model, name):
    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, method=name, init_from=supervised_model, should_stop=lambda: True,
                          config=TrainConfig(steps=5, batch_size=2, crop=32))
    assert model.method.name == name and model.history[-1]["steps"] == 0
    assert _equal_weights(model.method.nets["seg"], supervised_model.method.nets["seg"])
    if name == "mean-teacher":
        assert _equal_weights(model.method.nets["teacher"], supervised_model.method.nets["seg"])
    assert model.normaliser == supervised_model.normaliser
    assert model.method.params.features == supervised_model.method.params.features
    assert [h["method"] for h in model.history] == ["supervised", name]
    assert model.method is not supervised_model.method  # the source model is left alone


def test_warm_start_then_trains_and_leaves_the_source_alone(tiny_phantom, supervised_model):
    s = tiny_phantom
    before = {k: v.clone() for k, v in supervised_model.method.nets["seg"].state_dict().items()}
    model = semiseg.train(s.image, s.labels, method="self-training", init_from=supervised_model,
                          params={"warmup": 0.0}, config=TrainConfig(steps=2, batch_size=2, crop=32))
    assert not _equal_weights(model.method.nets["seg"], supervised_model.method.nets["seg"])
    after = supervised_model.method.nets["seg"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": {"features": (4, 8)}}, "features"),
        ({"config": TrainConfig(steps=1, batch_size=2, crop=32, axis=1)}, "axis"),
        ({"config": TrainConfig(steps=1, batch_size=2, crop=32, context=1)}, "context"),
        ({"method": "unet3d"}, "3D"),
    ],
)
def test_warm_start_refuses_a_model_that_does_not_fit(tiny_phantom, supervised_model, kwargs, match):
    s = tiny_phantom
    kwargs = {"method": "mean-teacher", "config": TrainConfig(steps=1, batch_size=2, crop=32), **kwargs}
    with pytest.raises(InputError, match=match):
        semiseg.train(s.image, s.labels, init_from=supervised_model, **kwargs)


# ----------------------------------------------------------------------------- continue rule
def test_continuing_with_another_method_is_refused(tiny_phantom, supervised_model):
    s = tiny_phantom
    cfg = TrainConfig(steps=1, batch_size=2, crop=32)
    with pytest.raises(InputError, match="init_from"):
        semiseg.train(s.image, s.labels, method="translation", model=supervised_model, config=cfg)
    with pytest.raises(InputError, match="not both"):
        semiseg.train(s.image, s.labels, model=supervised_model, init_from=supervised_model, config=cfg)


def test_continuing_with_its_own_method_or_none_named(tiny_phantom, tiny_model):
    s = tiny_phantom
    cfg = TrainConfig(steps=1, batch_size=2, crop=32)
    for method in (None, "supervised"):
        model = semiseg.train(s.image, s.labels, method=method, model=tiny_model, config=cfg)
        assert model is tiny_model and model.history[-1]["method"] == "supervised"


# ----------------------------------------------------------------------------- old files
def test_model_files_with_step_schedules_still_load(tmp_path):
    import json

    m = make("mean-teacher")
    model = semiseg.Model(m, semiseg.data.Normaliser((0.0,), (1.0,)))
    path = model.save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    cfg["params"].update(warmup_steps=150, rampup_steps=200)  # as older versions wrote them
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    assert semiseg.load_model(path).method.params.warmup == 0.5
    with pytest.raises(ValueError, match="warmup_steps is gone: use warmup"):
        make("mean-teacher", warmup_steps=10)
