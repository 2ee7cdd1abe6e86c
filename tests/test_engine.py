import itertools

import numpy as np
import pytest
import torch

import semiseg
from semiseg.data import InputError
from semiseg.engine import Progress, TrainConfig, TrainingError, iter_train, run

from ._util import TINY_PARAMS, array_hash


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.method.nets["seg"].parameters()])


def test_progress_records(tiny_phantom, tiny_config):
    s = tiny_phantom
    records = []
    model = run(iter_train(s.image, s.labels, params=TINY_PARAMS, config=tiny_config), records.append)
    assert all(isinstance(r, Progress) for r in records)
    assert [r.step for r in records] == [0, 1, 2]
    assert records[-1].fraction == 1.0
    assert set(records[-1].losses) == {"dice_loss", "ce"}
    assert all(np.isfinite(v) for v in records[-1].losses.values())
    assert records[-1].elapsed >= records[1].elapsed >= 0
    assert isinstance(model, semiseg.Model)
    assert model.history[-1]["steps"] == 2
    assert model.history[-1]["annotated_slices"] == s.annotated.tolist()


def test_same_seed_same_weights_different_seed_differs(tiny_phantom):
    s = tiny_phantom
    cfg = {"steps": 3, "batch_size": 2, "crop": 32}
    a = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=TrainConfig(seed=1, **cfg))
    b = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=TrainConfig(seed=1, **cfg))
    c = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=TrainConfig(seed=2, **cfg))
    assert torch.equal(_weights(a), _weights(b))
    assert not torch.equal(_weights(a), _weights(c))


def test_inputs_never_modified(tiny_phantom, tiny_config):
    s = tiny_phantom
    image, labels, tags = s.image.copy(), s.labels.copy(), s.tags.copy()
    hashes = [array_hash(a) for a in (image, labels, tags)]
    model = semiseg.train(image, labels, tags=tags, params=TINY_PARAMS, config=tiny_config)
    semiseg.predict_volume(model, image)
    assert [array_hash(a) for a in (image, labels, tags)] == hashes


def test_time_budget_stops_early(tiny_phantom):
    s = tiny_phantom
    cfg = TrainConfig(steps=10_000, minutes=0.02, batch_size=2, crop=32)
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=cfg)
    assert 1 <= model.history[-1]["steps"] < 10_000
    assert model.history[-1]["seconds"] < 10


def test_should_stop_ends_training_between_steps(tiny_phantom):
    s = tiny_phantom
    seen = []
    cfg = TrainConfig(steps=1000, batch_size=2, crop=32)
    model = run(
        iter_train(s.image, s.labels, params=TINY_PARAMS, config=cfg, should_stop=lambda: len(seen) >= 4),
        seen.append,
    )
    # Records for steps 0..3 arrive before the 4th check says stop: 3 steps were trained.
    assert model.history[-1]["steps"] == model.method.step == 3
    assert cfg.steps == 1000  # the config is not touched


def test_continue_training_keeps_normaliser_and_counts_steps(tiny_phantom, tiny_config):
    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=tiny_config)
    norm = model.normaliser
    again = semiseg.train(s.image * 2, s.labels, model=model, config=tiny_config)
    assert again is model and again.normaliser == norm
    assert model.method.step == 4 and len(model.history) == 2


def test_continue_rejects_mismatches(tiny_phantom, tiny_config):
    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=tiny_config)
    two = np.stack([s.image, s.image])
    with pytest.raises(InputError, match="channel"):
        semiseg.train(two, s.labels, model=model, config=tiny_config)
    more = s.labels.copy()
    more[s.annotated[0], 0, 0] = 2
    with pytest.raises(InputError, match="classes"):
        semiseg.train(s.image, more, model=model, config=tiny_config)


def test_preview_callback(tiny_phantom):
    s = tiny_phantom
    cfg = TrainConfig(steps=3, batch_size=2, crop=32, preview_every=0.0)
    previews = [
        p for p in iter_train(s.image, s.labels, params=TINY_PARAMS, config=cfg, preview_index=lambda: 4)
        if p.preview is not None
    ]
    assert previews and previews[0].preview.shape == s.image.shape[1:]
    assert previews[0].preview_index == 4


def test_non_finite_loss_restores_last_good_weights(tiny_phantom, monkeypatch):
    s = tiny_phantom
    cfg = TrainConfig(steps=5, batch_size=2, crop=32)
    gen = iter_train(s.image, s.labels, params=TINY_PARAMS, config=cfg)
    next(gen)  # inputs validated, model built
    model_ref = {}
    cls = semiseg.get_method("supervised")
    original = cls.training_step
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        model_ref["m"] = self
        if calls["n"] == 1:
            model_ref["before"] = [p.detach().clone() for p in self.nets["seg"].parameters()]
        out = original(self, batch)
        return {**out, "dice_loss": float("nan")} if calls["n"] == 2 else out

    monkeypatch.setattr(cls, "training_step", flaky)
    with pytest.raises(TrainingError, match="non-finite"):
        run(gen)
    restored = list(model_ref["m"].nets["seg"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(model_ref["before"], restored))


def test_bad_inputs_fail_before_training():
    with pytest.raises(InputError, match="no annotated"):
        semiseg.train(np.zeros((3, 16, 16)), np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(KeyError, match="unknown method"):
        semiseg.train(np.random.default_rng(0).random((3, 16, 16)), np.ones((3, 16, 16), np.uint8), method="nope")
    with pytest.raises(InputError, match="steps"):
        TrainConfig(steps=0)


def test_cuda_request_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(InputError, match="CUDA"):
        semiseg.engine.resolve_device("cuda")


@pytest.mark.parametrize(
    ("done", "anneal", "expected"),
    [(0.0, 0.5, 1.0), (0.5, 0.5, 1.0), (0.75, 0.5, 0.5), (1.0, 0.5, 0.0), (1.5, 0.5, 0.0),
     (0.0, 1.0, 1.0), (0.5, 1.0, 0.5), (0.9, 0.0, 1.0)],
)
def test_lr_factor(done, anneal, expected):
    from semiseg.engine import lr_factor

    assert lr_factor(done, anneal) == pytest.approx(expected, abs=1e-12)


def _spy_before_each_step(monkeypatch, read):
    """Record ``read(method)`` before every supervised step."""
    from semiseg.methods.supervised import Supervised

    seen = []
    original = Supervised.training_step

    def spy(self, batch):
        seen.append(read(self))
        return original(self, batch)

    monkeypatch.setattr(Supervised, "training_step", spy)
    return seen


def _spy_learning_rate(monkeypatch):
    """The first optimiser's learning rate before every supervised step."""
    return _spy_before_each_step(monkeypatch, lambda m: next(iter(m.opts.values())).param_groups[0]["lr"])


def test_anneal_lowers_learning_rate_each_step_then_restores_it(tiny_phantom, monkeypatch):
    seen = _spy_learning_rate(monkeypatch)
    s = tiny_phantom
    cfg = TrainConfig(steps=5, batch_size=2, crop=32, anneal=1.0)
    model = semiseg.train(s.image, s.labels, params={**TINY_PARAMS, "lr": 0.01}, config=cfg)
    # Half cosine over the 5 steps, sampled before each step (done = 0, 0.2, ..., 0.8).
    expected = [0.005 * (1 + np.cos(np.pi * i / 5)) for i in range(5)]
    assert seen == pytest.approx(expected)
    group = next(iter(model.method.opts.values())).param_groups[0]
    assert group["lr"] == pytest.approx(0.01)
    # Training on anneals anew from the method's own rate.
    seen.clear()
    semiseg.train(s.image, s.labels, model=model, config=cfg)
    assert seen == pytest.approx(expected)


def test_model_saved_mid_anneal_trains_on_at_its_own_rate(tiny_phantom, tmp_path, monkeypatch):
    s = tiny_phantom
    model = semiseg.train(s.image, s.labels, params={**TINY_PARAMS, "lr": 0.01},
                          config=TrainConfig(steps=2, batch_size=2, crop=32, anneal=1.0))
    for group in next(iter(model.method.opts.values())).param_groups:
        group["lr"] = 1e-5  # as an autosave taken near the end of an annealed run holds it
    model.save(tmp_path / "m.pt")
    seen = _spy_learning_rate(monkeypatch)
    semiseg.train(s.image, s.labels, model=semiseg.load_model(tmp_path / "m.pt"),
                  config=TrainConfig(steps=2, batch_size=2, crop=32))
    assert seen == pytest.approx([0.01, 0.01])


def test_no_anneal_keeps_learning_rate(tiny_phantom, monkeypatch):
    seen = _spy_learning_rate(monkeypatch)
    s = tiny_phantom
    semiseg.train(s.image, s.labels, params={**TINY_PARAMS, "lr": 0.01},
                  config=TrainConfig(steps=3, batch_size=2, crop=32))
    assert seen == [0.01] * 3


def test_anneal_follows_a_time_budget(tiny_phantom, monkeypatch):
    from semiseg import engine

    # A fake process clock that advances 15 s per reading: the 1-minute budget, not the
    # 10**6 steps, decides how far the run is.
    ticks = iter(range(0, 10**6, 15))
    monkeypatch.setattr(engine.time, "process_time", lambda: float(next(ticks)))
    seen = _spy_learning_rate(monkeypatch)
    s = tiny_phantom
    cfg = TrainConfig(steps=10**6, minutes=1, clock="process", batch_size=2, crop=32, anneal=1.0)
    semiseg.train(s.image, s.labels, params={**TINY_PARAMS, "lr": 0.01}, config=cfg)
    assert 1 <= len(seen) < 10
    assert 0 < seen[0] < 0.01  # the clock has moved before the first step: already annealing
    assert all(a > b for a, b in itertools.pairwise(seen))


def test_bad_anneal_rejected():
    with pytest.raises(InputError, match="anneal"):
        TrainConfig(anneal=1.5)


def _spy_progress(monkeypatch):
    """``Method.progress`` before every supervised step."""
    return _spy_before_each_step(monkeypatch, lambda m: m.progress)


def test_method_progress_follows_a_step_budget(tiny_phantom, monkeypatch):
    seen = _spy_progress(monkeypatch)
    s = tiny_phantom
    semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=TrainConfig(steps=4, batch_size=2, crop=32))
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_method_progress_follows_a_time_budget(tiny_phantom, monkeypatch):
    from semiseg import engine

    ticks = iter(range(0, 10**6, 15))  # 15 CPU-seconds per clock reading
    monkeypatch.setattr(engine.time, "process_time", lambda: float(next(ticks)))
    seen = _spy_progress(monkeypatch)
    s = tiny_phantom
    cfg = TrainConfig(steps=10**6, minutes=1, clock="process", batch_size=2, crop=32)
    semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=cfg)
    assert 1 <= len(seen) < 10
    assert all(0 < a < b <= 1 for a, b in itertools.pairwise(seen))


@pytest.mark.parametrize(
    ("shape", "dims", "expected"),
    [((224, 224), 2, 160), ((128, 128), 2, 128), ((100, 300), 2, 96), ((40, 40), 2, 32), ((8, 8), 2, 16),
     ((512, 512), 2, 160), ((224, 224), 3, 96)],
)
def test_auto_crop_covers_the_slice_up_to_a_cap(shape, dims, expected):
    from semiseg.engine import auto_crop

    assert auto_crop(shape, dims) == expected


@pytest.mark.parametrize(
    ("shape", "cost", "expected"),
    [((128, 128), 1.0, 128), ((224, 224), 1.0, 160), ((224, 224), 1.2, 128), ((128, 128), 1.6, 96),
     ((128, 128), 2.0, 96), ((128, 128), 2.7, 96), ((224, 224), 1.5, 112), ((224, 224), 2.0, 96),
     ((224, 224), 0.5, 160), ((64, 64), 2.7, 64), ((224, 224), 100.0, 96), ((80, 80), 100.0, 80)],
)
def test_auto_crop_shrinks_with_the_cost_of_a_step(shape, cost, expected):
    from semiseg.engine import auto_crop

    assert auto_crop(shape, 2, cost) == expected
    # 3D methods keep their own cap.
    assert auto_crop(shape, 3, cost) == auto_crop(shape, 3)


def test_a_costlier_methods_crop_costs_at_most_the_step_budget_down_to_a_floor():
    """Above the floor, cost x crop² never exceeds the budget (a supervised step at
    COSTLY_STEP_SIDE²) and the next multiple of 16 would; below it, the floor holds."""
    from semiseg.engine import COSTLY_STEP_SIDE, MIN_COSTLY_CROP, auto_crop

    for cost in (1.05, 1.3, 1.5, 1.7, 2.2, 3.0, 5.0):
        crop = auto_crop((512, 512), 2, cost)
        if crop > MIN_COSTLY_CROP:
            assert cost * crop**2 <= COSTLY_STEP_SIDE**2 < cost * (crop + 16) ** 2
        else:
            assert crop == MIN_COSTLY_CROP and cost * (crop + 16) ** 2 > COSTLY_STEP_SIDE**2


def test_costlier_methods_get_a_smaller_automatic_crop_on_the_cpu():
    from semiseg.methods import get_method

    s = semiseg.make_phantom(0, shape=(12, 128, 128), labelled=3)
    assert get_method("mutual-info").step_cost > 2  # by the issue-19 measurement
    crops = {}
    for name in ("supervised", "mutual-info"):
        model = semiseg.train(
            s.image, s.labels, tags=s.tags, method=name, params={"features": (8, 16)},
            config=TrainConfig(steps=1, batch_size=2), device="cpu",
        )
        crops[name] = model.tile_size
    assert crops == {"supervised": 128, "mutual-info": 96}


def test_default_crop_is_chosen_from_the_volume_and_kept_when_training_on(tiny_phantom):
    s = tiny_phantom
    h, w = s.image.shape[1:]
    model = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=TrainConfig(steps=1, batch_size=2))
    expected = min(h, w) // 16 * 16
    assert model.tile_size == expected and model.history[-1]["config"]["crop"] == expected
    # Along another axis the in-plane sides differ: the crop follows that axis's slices.
    along_y = semiseg.train(s.image, s.labels, params=TINY_PARAMS,
                            config=TrainConfig(steps=1, batch_size=2, axis=1))
    assert along_y.tile_size == max(16, min(s.image.shape[0], w) // 16 * 16) == 16
    # Training on keeps the model's own crop; an explicit crop still wins.
    small = semiseg.train(s.image, s.labels, params=TINY_PARAMS, config=TrainConfig(steps=1, batch_size=2, crop=16))
    again = semiseg.train(s.image, s.labels, model=small, config=TrainConfig(steps=1, batch_size=2))
    assert again.tile_size == 16 and again.history[-1]["config"]["crop"] == 16


def test_bad_crop_rejected():
    with pytest.raises(InputError, match="crop"):
        TrainConfig(crop=4)
