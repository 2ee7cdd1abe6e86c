"""Training jobs (no Qt): the suggestion list's uncertainty pass runs inside the job."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tests._util import TINY_PARAMS

from semiseg import InputError, ModelFileError, PredictionError, TrainingError
from semiseg.engine import TrainConfig, run
from semiseg.napari import _jobs
from semiseg.suggest import uncertainty_volume


def _job(phantom, tmp_path, *, uncertainty: bool, out_dir: bool) -> _jobs.TrainJob:
    return _jobs.TrainJob(
        image=phantom.image[None],
        labels=phantom.labels.copy(),
        tags=phantom.tags,
        params=dict(TINY_PARAMS),
        config=TrainConfig(steps=2, batch_size=2, crop=32, seed=0),
        device="cpu",
        out_dir=str(tmp_path / "job") if out_dir else None,
        uncertainty=uncertainty,
    )


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_job_returns_the_uncertainty_of_its_model(phantom, tmp_path, backend):
    job = _job(phantom, tmp_path, uncertainty=True, out_dir=backend == "process")
    if job.out_dir:
        (tmp_path / "job").mkdir()
    phases = []
    control = _jobs.JobControl()
    if backend == "thread":
        result = run(_jobs.iter_job(job, control), lambda p: phases.append(p.phase))
    else:
        pool = _jobs.ProcessPool(threads=1, nice=0)
        try:
            result = run(_jobs.iter_job_process(job, control, pool=pool), lambda p: phases.append(p.phase))
        finally:
            pool.shutdown()
    assert phases.index("train") < phases.index("predict") < phases.index("uncertainty")
    unc = result.uncertainty
    assert unc is not None and unc.axis == 0 and unc.mass.shape == (phantom.image.shape[0],)
    expected = uncertainty_volume(result.model, phantom.image)
    np.testing.assert_allclose(np.asarray(unc.uncertainty), expected, rtol=1e-4, atol=1e-5)
    assert unc.peak == pytest.approx(float(expected.max()), rel=1e-4)


def test_job_without_uncertainty_or_when_cancelled(phantom, tmp_path):
    result = run(_jobs.iter_job(_job(phantom, tmp_path, uncertainty=False, out_dir=False), _jobs.JobControl()))
    assert result.outputs is not None and result.uncertainty is None

    control = _jobs.JobControl()

    def cancel_in_uncertainty(p):
        if p.phase == "uncertainty":
            control.cancel.set()

    result = run(_jobs.iter_job(_job(phantom, tmp_path, uncertainty=True, out_dir=False), control),
                 cancel_in_uncertainty)
    assert result.uncertainty is None


def test_cancel_during_prediction_keeps_the_model_and_drops_outputs(phantom, tmp_path):
    control = _jobs.JobControl()
    seen = []

    def cancel_in_prediction(p):
        seen.append(p.phase)
        if p.phase == "predict" and p.step > 0:
            control.cancel.set()

    job = _job(phantom, tmp_path, uncertainty=True, out_dir=False)
    result = run(_jobs.iter_job(job, control), cancel_in_prediction)
    assert result.outputs is None and result.uncertainty is None
    assert result.model.history[-1]["steps"] == 2  # the trained model is still returned
    assert "uncertainty" not in seen


def test_sampling_runs_as_a_job_in_either_backend(phantom, tmp_path):
    """Tumour sampling goes through the same job machinery as training (thread and process)."""
    from semiseg import sample_tumours

    params = {**TINY_PARAMS, "unique_channels": 4, "disc_features": (8, 16), "disc_scales": 1}
    job = dataclasses.replace(_job(phantom, tmp_path, uncertainty=False, out_dir=False), method="translation",
                              params=params, predict=False)
    model = run(_jobs.iter_job(job, _jobs.JobControl())).model
    image = phantom.image[None]
    expected = sample_tumours(model, image, 3, 2)
    thread = run(_jobs.iter_job(_jobs.SampleJob(image=image, index=3, n=2), _jobs.JobControl(), model))
    assert thread.index == 3
    np.testing.assert_array_equal(thread.samples, expected)
    with pytest.raises(InputError, match="sampling needs a model"):
        run(_jobs.iter_job(_jobs.SampleJob(image=image, index=3, n=2), _jobs.JobControl(), None))
    out = tmp_path / "sample-job"
    out.mkdir()
    pool = _jobs.ProcessPool(threads=1, nice=0)
    try:
        job = _jobs.SampleJob(image=image[:, 3:4], index=0, n=2, out_dir=str(out))
        proc = run(_jobs.iter_job_process(job, _jobs.JobControl(), model, pool=pool))  # only the slice travels
    finally:
        pool.shutdown()
    np.testing.assert_allclose(proc.samples, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (PredictionError("p"), PredictionError),
        (TrainingError("t"), TrainingError),
        (ModelFileError("m"), ModelFileError),
        (InputError("i"), InputError),
        (ValueError("v"), InputError),
        (KeyError("k"), InputError),
    ],
)
def test_worker_errors_cross_the_process_boundary_as_their_class(exc, cls):
    back = _jobs._error_from(_jobs._error_kind(exc), str(exc))
    assert type(back) is cls and str(exc) in str(back)


def test_unknown_worker_errors_become_training_errors_naming_their_class():
    back = _jobs._error_from(_jobs._error_kind(ZeroDivisionError("z")), "z")
    assert type(back) is TrainingError and str(back) == "ZeroDivisionError: z"


def test_the_suggestion_lists_uncertainty_pass_is_a_job_too(phantom, tmp_path):
    model = run(_jobs.iter_job(_job(phantom, tmp_path, uncertainty=False, out_dir=False), _jobs.JobControl())).model
    phases = []
    result = run(_jobs.iter_job(_jobs.UncertaintyJob(phantom.image), _jobs.JobControl(), model),
                 lambda p: phases.append(p.phase))
    assert set(phases) == {"uncertainty"}
    np.testing.assert_allclose(np.asarray(result.uncertainty), uncertainty_volume(model, phantom.image),
                               rtol=1e-4, atol=1e-5)
    control = _jobs.JobControl()
    control.cancel.set()
    assert run(_jobs.iter_job(_jobs.UncertaintyJob(phantom.image), control, model)) is None
    with pytest.raises(InputError, match="needs a model"):
        run(_jobs.iter_job(_jobs.UncertaintyJob(phantom.image), _jobs.JobControl(), None))


_ORPHAN_SCRIPT = r"""
import sys, time
from semiseg import make_phantom
from semiseg.engine import TrainConfig
from semiseg.napari import _jobs

ph = make_phantom(0, shape=(8, 48, 48), labelled=2)
out = _jobs.new_out_dir()
job = _jobs.TrainJob(image=ph.image[None], labels=ph.labels.copy(), tags=ph.tags,
                     params={"features": "8,16"}, device="cpu", out_dir=out,
                     config=TrainConfig(steps=1_000_000, batch_size=2, crop=32, seed=0))
pool = _jobs.ProcessPool(threads=1, nice=0)
gen = _jobs.iter_job_process(job, _jobs.JobControl(), pool=pool)
next(gen)  # the first training step arrived: the worker is busy training
import multiprocessing as mp
(child,) = mp.active_children()
print(child.pid, out, flush=True)
for _ in gen:  # train on until killed
    pass
"""


def test_worker_exits_and_removes_its_folder_when_the_viewer_is_killed(tmp_path):
    """Item 11 of issue 20: SIGTERM of the viewer (no clean-up runs) must not leave the
    training process alive, nor its job folder."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True, env=env)
    pid = None
    try:
        line = proc.stdout.readline().split()
        assert len(line) == 2, "the script did not start training"
        pid, out = int(line[0]), Path(line[1])
        assert out.is_dir()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

        def alive(p):
            try:
                os.kill(p, 0)
            except ProcessLookupError:
                return False
            try:  # a zombie (exited, not reaped by the dead parent's init yet) counts as gone
                return Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the worker process outlived its parent"
        deadline = time.monotonic() + 5
        while out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not out.exists(), "the job folder was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid is not None:  # never leave an orphan training behind, pass or fail
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
