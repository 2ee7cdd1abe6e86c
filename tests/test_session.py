"""The Train dock's session without a display: start, progress, stop, cancel, error, continue,
rollback, lazy outputs and sampling; and the form's decisions (:mod:`semiseg.napari._settings`:
settings -> job, layer choices, button states, status lines). No Qt, no napari: runs with
``-p no:xvfb``."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import semiseg
from semiseg import InputError, ModelFileError, PredictionError, TrainConfig, TrainingError
from semiseg.napari import _jobs
from semiseg.napari._session import Event, Running, Session, error_title, is_lazy, run_inline
from semiseg.napari._settings import (
    LayerChoices,
    TrainSettings,
    button_states,
    checked_images,
    error_text,
    export_format,
    layer_choices,
    make_job,
    method_summary,
    slice_count,
    slice_span,
    start_text,
    suggestion_feed,
)

from ._util import TINY_PARAMS, array_hash, gui_modules_loaded_by


class StepRunner:
    """A runner the test drives by hand: ``step()`` runs the job to its next record."""

    def __init__(self):
        self.gen = None

    def __call__(self, gen, yielded, returned, finished):
        self.gen, self.yielded, self.returned, self.finished = gen, yielded, returned, finished
        return "worker"

    def step(self) -> bool:
        """Run to the next record (True) or to the end (False: returned and finished called)."""
        try:
            self.yielded(next(self.gen))
            return True
        except StopIteration as stop:
            self.returned(stop.value)
            self.finished()
            return False

    def finish(self) -> None:
        while self.step():
            pass


def _record(session: Session) -> list:
    """Every event of ``session`` as ``(name, argument)``, in order."""
    seen = []
    for name in ("started", "progress", "done", "error", "finished", "model_changed"):
        getattr(session.events, name).connect(lambda *a, name=name: seen.append((name, a[0] if a else None)))
    return seen


def _job(s, steps=2, **kw) -> _jobs.TrainJob:
    return _jobs.TrainJob(
        image=s.image[None],
        labels=s.labels.copy(),
        tags=s.tags,
        params=dict(kw.pop("params", TINY_PARAMS)),
        config=TrainConfig(steps=steps, batch_size=2, crop=32, seed=0, preview_every=0.0),
        device="cpu",
        **kw,
    )


@pytest.fixture
def session(tmp_path):
    return Session(backend="thread", runs_dir=tmp_path / "runs")


def test_importing_the_session_loads_no_qt_or_napari():
    res = gui_modules_loaded_by("import semiseg.napari._session")
    assert res.returncode == 0, res.stdout + res.stderr


def test_train_reports_progress_then_done_and_keeps_a_run(session, tiny_phantom, tmp_path):
    s = tiny_phantom
    before = array_hash(s.labels)
    seen = _record(session)
    job = _job(s, uncertainty=True)
    running = session.train(job, "scan")
    assert running is not None and running.kind == "train" and not running.continued
    assert not session.busy and session.phase == "idle"  # the inline runner ran it to the end
    names = [n for n, _ in seen]
    assert names[0] == "started" and names[-2:] == ["done", "finished"]
    assert "error" not in names and names.index("model_changed") < names.index("done")
    phases = [p.phase for n, p in seen if n == "progress"]
    assert phases.index("train") < phases.index("predict") < phases.index("uncertainty")
    done = seen[names.index("done")][1]
    assert done.kind == "train" and done.image_name == "scan"
    # A 2-step model is noise: the status line says so after the run's own line (issue 19).
    assert done.message.startswith("Trained 2 steps on cpu; not converged: class 1 covers")
    assert session.model is done.result.model and session.model_image == "scan"
    assert session.model_input is job.image
    assert done.outputs["mask"].shape == s.labels.shape and isinstance(done.outputs["mask"], np.ndarray)
    assert array_hash(s.labels) == before  # the user's labels are never changed
    # The session filled in the job's run store: the run is kept in its folder, no model path.
    assert running.job.runs_dir == str(tmp_path / "runs") and running.job.out_dir is None
    assert done.result.run is not None and done.result.run.path.parent == tmp_path / "runs"
    assert [r.path for r in session.list_runs()] == [done.result.run.path]


def test_continue_and_from_scratch(session, tiny_phantom):
    s = tiny_phantom
    session.train(_job(s), "scan")
    first = session.model
    running = session.train(_job(s, steps=3), "scan", continue_model=True)
    assert running.continued and session.model.method.step == 5 and len(session.model.history) == 2
    running = session.train(_job(s, steps=1), "scan", continue_model=False)
    assert not running.continued and session.model.method.step == 1 and len(session.model.history) == 1
    assert session.model is not first
    assert [r.steps for r in session.list_runs()] == [1, 3, 2]  # newest first
    # Prediction continues the current model whatever the flag, and keeps no run.
    model = session.model
    running = session.predict(_job(s), "scan")
    assert running.continued and running.job.runs_dir is None and not running.job.train
    assert session.model.method.step == model.method.step and len(session.list_runs()) == 3
    assert session.last_result.run is None


def test_one_job_at_a_time_and_stop_ends_training_then_predicts(tmp_path, tiny_phantom):
    runner = StepRunner()
    session = Session(backend="thread", runner=runner, runs_dir=tmp_path / "runs")
    seen = _record(session)
    assert session.stop() is None  # nothing runs
    running = session.train(_job(tiny_phantom, steps=100_000), "scan")
    assert session.busy and session.phase == "train" and running.worker == "worker"
    assert session.train(_job(tiny_phantom), "scan") is None  # busy: refused
    assert session.sample(0, 2) is None
    for _ in range(3):
        assert runner.step()
    assert session.stop() == "Stopping training..."
    while session.phase == "train":
        assert runner.step()
    assert session.phase == "predict"  # Stop acts at the next step; the volume is predicted
    runner.finish()
    assert not session.busy
    done = next(a for n, a in seen if n == "done")
    assert done.result.stopped and done.outputs is not None
    assert 1 <= session.model.history[-1]["steps"] < 100_000
    assert "steps on cpu (stopped)" in done.message  # (then the not-converged warning)


def test_stop_during_prediction_cancels_it_and_keeps_the_model(tmp_path, tiny_phantom):
    runner = StepRunner()
    session = Session(backend="thread", runner=runner, runs_dir=tmp_path / "runs")
    seen = _record(session)
    session.train(_job(tiny_phantom, uncertainty=True), "scan")
    while session.phase == "train":
        runner.step()
    assert session.stop() == "Cancelling prediction..."
    runner.finish()
    done = next(a for n, a in seen if n == "done")
    assert done.outputs is None and done.result.uncertainty is None
    assert session.model is done.result.model and session.model.history[-1]["steps"] == 2
    assert done.message == "Trained 2 steps on cpu; prediction cancelled"


def test_cancel_abandons_training_and_prediction(tmp_path, tiny_phantom):
    runner = StepRunner()
    session = Session(backend="thread", runner=runner, runs_dir=tmp_path / "runs")
    seen = _record(session)
    session.train(_job(tiny_phantom, steps=100_000), "scan")
    runner.step()
    session.cancel()
    runner.finish()
    done = next(a for n, a in seen if n == "done")
    assert done.outputs is None and done.result.stopped
    assert "predict" not in [p.phase for n, p in seen if n == "progress"]


def test_errors_are_events_and_keep_the_previous_model(session, tiny_phantom, monkeypatch):
    s = tiny_phantom
    seen = _record(session)
    job = dataclasses.replace(_job(s), labels=np.zeros((3, 5, 5), np.uint8))
    session.train(job, "scan")
    errors = [a for n, a in seen if n == "error"]
    assert len(errors) == 1 and isinstance(errors[0], InputError) and "does not match" in str(errors[0])
    assert session.model is None and session.last_error is errors[0] and not session.busy
    assert [n for n, _ in seen][-1] == "finished"
    # Predicting without a model is an error of the job too.
    session.predict(_job(s), "scan")
    assert isinstance(session.last_error, InputError) and "needs a model" in str(session.last_error)
    session.train(_job(s), "scan")
    good = session.model
    from semiseg.methods.supervised import Supervised

    monkeypatch.setattr(Supervised, "training_step", lambda self, batch: {"dice_loss": float("nan")})
    session.train(_job(s), "scan")
    assert isinstance(session.last_error, TrainingError) and session.model is good


@pytest.mark.parametrize(
    ("exc", "title"),
    [
        (PredictionError("x"), "Prediction failed"),
        (TrainingError("x"), "Training failed"),
        (ModelFileError("x"), "Cannot load the model"),
        (InputError("x"), "Cannot train"),
        (ValueError("x"), "Error"),
        (OSError("x"), "Error"),
    ],
)
def test_error_titles_by_class(exc, title):
    assert error_title(exc) == title


def test_rollback_loads_a_kept_run_and_a_bad_one_changes_nothing(session, tiny_phantom, tmp_path):
    s = tiny_phantom
    with pytest.raises(InputError, match="no training run"):
        session.rollback("")
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError):
        session.rollback(str(bad))
    assert session.model is None
    session.train(_job(s, steps=3), "scan")
    session.train(_job(s, steps=2), "scan")
    runs = session.list_runs()
    assert [r.steps for r in runs] == [2, 3]
    changed = []
    session.events.model_changed.connect(changed.append)
    model = session.rollback(str(runs[1].path), "scan", s.image[None])
    assert changed == [model] and session.model is model
    assert model.method.step == 3 and len(model.history) == 1
    assert len(session.list_runs()) == 2  # rolling back keeps every run
    assert session.model_image == "scan" and session.model_input.shape == (1, *s.image.shape)
    path = session.save_model(tmp_path / "m.pt")
    assert semiseg.Model.load(path).method.step == 3


def test_lazy_outputs_stay_on_disk_until_replaced_or_shut_down(session, tiny_phantom):
    s = tiny_phantom
    assert is_lazy(np.zeros(4)) is False and is_lazy(np.zeros(4), lazy_bytes=0) is True
    seen = _record(session)
    running = session.train(_job(s), "scan", lazy_bytes=0)
    assert running.lazy and running.out_dir
    done = [a for n, a in seen if n == "done"][-1]
    assert hasattr(done.outputs["mask"], "dask")  # shown lazily
    first = list(session.lazy_dirs)
    assert first == [running.out_dir] and all(os.path.isdir(d) for d in first)
    session.train(_job(s), "scan", lazy_bytes=0)
    assert session.lazy_dirs != first and not any(os.path.isdir(d) for d in first)
    dirs = list(session.lazy_dirs)
    session.shutdown()
    assert session.lazy_dirs == [] and not any(os.path.isdir(d) for d in dirs)


def test_sampling_is_a_job_of_the_session(session, tiny_phantom):
    s = tiny_phantom
    assert session.sample(0, 2) is None  # no model
    session.train(_job(s), "scan")
    assert not session.can_sample and session.sample(0, 2) is None  # supervised cannot sample
    params = {**TINY_PARAMS, "unique_channels": 4, "disc_features": (8, 16), "disc_scales": 1}
    session.train(_job(s, method="translation", params=params), "scan", continue_model=False)
    assert session.can_sample
    seen = _record(session)
    running = session.sample(4, 3)
    assert running.kind == "sample" and running.sample_index == 4
    assert running.job.image.shape == (1, 1, *s.image.shape[1:])  # only the slice travels
    done = next(a for n, a in seen if n == "done")
    assert done.kind == "sample" and done.result.index == 4 and done.image_name == "scan"
    assert done.result.samples.shape == (3, 1, *s.image.shape[1:])  # (n, C, Y, X)
    expected = semiseg.sample_tumours(session.model, s.image[None], 4, 3)  # the whole volume
    np.testing.assert_allclose(done.result.samples, expected, rtol=1e-5, atol=1e-6)
    assert done.message == "3 sampled tumours on slice 4 (slider: sample)"


def test_events_and_runners():
    ev = Event()
    got = []
    ev.connect(got.append)
    cb = ev.connect(lambda x: got.append(-x))
    ev.emit(2)
    ev.disconnect(cb)
    ev.emit(3)
    assert got == [2, -2, 3]

    def gen():
        yield 1
        yield 2
        return "r"

    calls = []
    run_inline(gen(), lambda p: calls.append(("y", p)), lambda v: calls.append(("r", v)), lambda: calls.append("f"))
    assert calls == [("y", 1), ("y", 2), ("r", "r"), "f"]
    with pytest.raises(ValueError, match="backend"):
        Session(backend="gpu")


def test_process_backend_same_events_and_its_job_folder_is_removed(tmp_path, tiny_phantom):
    import time

    pool = _jobs.ProcessPool(threads=1, nice=0)
    session = Session(backend="process", runs_dir=tmp_path / "runs", pool=pool)
    try:
        seen = _record(session)
        running = session.train(_job(tiny_phantom), "scan")
        assert running.out_dir and not running.lazy  # the model and outputs travel through it
        names = [n for n, _ in seen]
        assert names[0] == "started" and names[-2:] == ["done", "finished"] and "error" not in names
        done = seen[names.index("done")][1]
        assert isinstance(done.outputs["mask"], np.ndarray) and session.lazy_dirs == []
        assert done.result.run is not None and session.model.history[-1]["steps"] == 2
        deadline = time.monotonic() + 30
        while os.path.isdir(running.out_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.isdir(running.out_dir)  # outputs were loaded: the folder is gone
    finally:
        session.shutdown()


# ---------------------------------------------------------------------- the form's decisions
def test_importing_the_settings_loads_no_qt_or_napari():
    res = gui_modules_loaded_by("import semiseg.napari._settings")
    assert res.returncode == 0, res.stdout + res.stderr


def test_settings_make_the_job_and_never_hand_over_the_labels(tiny_phantom):
    s = tiny_phantom
    settings = TrainSettings(images=("scan",), labels="scan labels", method="mean-teacher",
                             params={"features": (8, 16)}, steps=7, minutes=0.0, batch_size=3,
                             crop=48, seed=5, device="cpu", tta=True)
    image, labels = s.image[None], s.labels.copy()
    job = make_job(settings, image, labels, s.tags, train=True, preview_every=0.5)
    assert job.config == TrainConfig(steps=7, minutes=None, batch_size=3, crop=48, seed=5, preview_every=0.5)
    assert (job.method, job.device, job.train, job.uncertainty, job.tta) == ("mean-teacher", "cpu", True, True, True)
    assert job.params == {"features": (8, 16)} and job.params is not settings.params
    assert job.image is image and job.tags is s.tags
    assert job.labels is not labels and np.array_equal(job.labels, labels)
    job.labels[:] = 9  # the job's copy, not the layer's data
    assert array_hash(labels) == array_hash(s.labels)
    assert make_job(dataclasses.replace(settings, minutes=2.5), image, labels, None, train=True).config.minutes == 2.5
    # Without labels: prediction only, on empty labels, no tags and no uncertainty pass.
    with pytest.raises(InputError, match="labels layer"):
        make_job(settings, image, None, None, train=True)
    job = make_job(settings, image, None, s.tags, train=False)
    assert job.labels.shape == s.labels.shape and not job.labels.any() and job.labels.dtype == np.uint8
    assert job.tags is None and not job.uncertainty and not job.train


def test_settings_context_and_a_continued_model_keeps_its_own(tiny_phantom, tiny_model):
    s = tiny_phantom
    image, labels = s.image[None], s.labels.copy()
    settings = TrainSettings(context=2, crop=48)
    assert make_job(settings, image, labels, None, train=True).config.context == 2
    continued = dataclasses.replace(tiny_model, context=1)  # the current model's context wins
    assert make_job(settings, image, labels, None, train=True, model=continued).config.context == 1
    scratch = dataclasses.replace(settings, continue_model=False)
    assert make_job(scratch, image, labels, None, train=True, model=continued).config.context == 2


class _Layer:
    def __init__(self, name, data=None, metadata=None):
        self.name, self.data, self.metadata = name, data, metadata or {}
        self.ndim = 0 if data is None else data.ndim


class _Image(_Layer):
    pass


class _Labels(_Layer):
    pass


def test_layer_choices_offer_no_overlays_as_inputs():
    layers = [_Image("scan"), _Labels("scan labels"), _Image("scan probability"), _Labels("scan prediction"),
              _Labels("drawn", metadata={"semiseg_overlay": True}), _Image("t2"), _Layer("points")]
    choices = layer_choices(layers, _Image, _Labels)
    assert choices.images == ["scan", "t2"]
    assert choices.labels == ["scan labels"]
    # Overlays can be exported, the prediction first (issue 20 item 9); never a preview.
    assert choices.export == ["scan prediction", "scan labels", "drawn"]
    with_preview = layer_choices([*layers, _Labels("scan preview")], _Image, _Labels)
    assert "scan preview" not in with_preview.export
    assert layer_choices([], _Image, _Labels) == LayerChoices([], [], [])


def test_checked_images_keep_the_choice_or_check_the_first():
    assert checked_images(["a", "b", "c"], []) == [True, False, False]
    assert checked_images(["a", "b", "c"], ["c", "b"]) == [False, True, True]
    assert checked_images(["a", "b"], ["gone"]) == [False, False]  # a removed choice checks nothing new
    assert checked_images([], ["a"]) == []


def test_slices_and_export_format():
    assert slice_count(_Layer("v", np.zeros((2, 7, 5, 4)))) == 7  # (C, Z, Y, X): Z is axis -3
    assert slice_count(_Layer("v", np.zeros((5, 4)))) == 1
    assert slice_span(None, None, 3) == (3, 3)
    assert slice_span(6, 2, 0) == (2, 6) and slice_span(4, None, 0) == (4, 4)
    assert [export_format(p) for p in ("m.zarr", "m.TIF", "a/b.tiff")] == ["zarr", "tiff", "tiff"]
    with pytest.raises(InputError, match="export to a"):
        export_format("m.png")


def test_button_states_follow_busy_model_and_runs(tiny_model):
    idle = button_states(busy=False, model=None, n_runs=0)
    assert idle == {"train_button": True, "predict_button": False, "stop_button": False, "sample_button": False,
                    "save_button": False, "load_button": True, "rollback_button": False,
                    "continue_check": False, "sample_row": True,
                    "correct_box": False, "suggestions_box": False}  # shown once there is a model
    trained = button_states(busy=False, model=tiny_model, n_runs=2)
    assert trained["predict_button"] and trained["save_button"] and trained["rollback_button"]
    assert trained["continue_check"] and not trained["sample_button"] and not trained["sample_row"]
    assert trained["correct_box"] and trained["suggestions_box"]
    busy = button_states(busy=True, model=tiny_model, n_runs=2)
    assert busy["stop_button"] and busy["save_button"]
    assert not any(busy[k] for k in ("train_button", "predict_button", "load_button", "rollback_button"))
    # Predicting only (e.g. after Stop): Train may interrupt it (issue 20 item 4).
    predicting = button_states(busy=True, model=tiny_model, n_runs=2, interruptible=True)
    assert predicting["train_button"] and predicting["stop_button"] and not predicting["predict_button"]


class _Sampler:
    class method:  # stands in for a model's method
        can_sample = True


def test_button_states_of_a_model_that_can_sample():
    assert button_states(busy=False, model=_Sampler, n_runs=0)["sample_button"]
    assert button_states(busy=False, model=_Sampler, n_runs=0)["sample_row"]
    assert not button_states(busy=True, model=_Sampler, n_runs=0)["sample_button"]


def test_status_lines_and_method_summary():
    job = _jobs.SampleJob(image=np.zeros((1, 1, 4, 4)), index=0, n=3, device="cpu")
    assert start_text(Running("sample", job, _jobs.JobControl(), "scan", None, sample_index=6), "thread") == (
        "Sampling 3 tumours on slice 6..."
    )
    assert start_text(Running("train", None, _jobs.JobControl(), "scan", None), "process") == (
        "Starting training (worker process)"
    )
    assert start_text(Running("predict", None, _jobs.JobControl(), "scan", None), "thread") == (
        "Starting prediction (worker thread)"
    )
    assert error_text(TrainingError("nan loss"), has_model=False) == "Training failed: nan loss"
    assert error_text(ValueError("x"), has_model=True) == "Error: x (the previous model is kept)"
    translation = semiseg.get_method("translation")
    text = method_summary(translation)
    assert text.startswith(translation.summary) and "uses weak tags" in text and "can sample tumours" in text
    assert method_summary(semiseg.get_method("supervised")) == semiseg.get_method("supervised").summary


def test_suggestion_feed_skips_stale_results(session, tiny_phantom):
    session.train(_job(tiny_phantom, uncertainty=True), "scan")
    result = session.last_result
    assert suggestion_feed(result, session.model, "scan", ["scan", "scan labels"]) == "result"
    no_pass = dataclasses.replace(result, uncertainty=None)
    assert suggestion_feed(no_pass, session.model, "scan", ["scan"]) == "model"
    assert suggestion_feed(result, session.model, "scan", ["other"]) is None  # the image layer is gone
    assert suggestion_feed(result, object(), "scan", ["scan"]) is None  # a newer model


def test_run_store_is_pruned_to_the_newest_and_labels_are_short(tmp_path):
    """Issue 20 item 10: runs are capped on disk; the list says method, steps and time."""
    from semiseg.napari._session import prune_runs
    from semiseg.napari._settings import run_label
    from semiseg.runs import RunInfo

    names = [f"20261201-2201{i:02d}.000-supervised.pt" for i in range(5)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.pt").write_bytes(b"not a run")
    removed = prune_runs(tmp_path, 2)
    assert sorted(p.name for p in removed) == names[:3]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted([*names[3:], "notes.pt"])
    info = RunInfo("20261201-220111.103-supervised", tmp_path / "x.pt", "supervised", 300, 5, {}, [])
    assert run_label(info, today="20261201") == "supervised · 300 steps · 22:01"
    assert run_label(info, today="20261202") == "supervised · 300 steps · 2026-12-01 22:01"


def test_inputs_are_checked_before_a_job_starts(tiny_model):
    """Issue 20 item 7: the engine's first checks, in the viewer (one line each)."""
    from semiseg import InputError, get_method
    from semiseg.napari._settings import check_job

    labels = np.zeros((4, 16, 16), np.uint8)
    job = _jobs.TrainJob(image=np.zeros((1, 4, 16, 16), np.float32), labels=labels)
    with pytest.raises(InputError, match="no annotated slice"):
        check_job(job, get_method("supervised"))
    check_job(dataclasses.replace(job, train=False), get_method("supervised"))  # predicting: fine
    with pytest.raises(InputError, match="does not match image shape"):
        check_job(dataclasses.replace(job, labels=np.zeros((4, 8, 8), np.uint8)), get_method("supervised"))
    painted = labels.copy()
    painted[1, 4:8, 4:8] = 1
    check_job(dataclasses.replace(job, labels=painted), get_method("supervised"))
    with pytest.raises(InputError, match="translation needs slices tagged healthy"):
        check_job(dataclasses.replace(job, labels=painted), get_method("translation"))
    tags = np.array([0, 1, -1, -1], np.int8)
    check_job(dataclasses.replace(job, labels=painted, tags=tags), get_method("translation"))
