"""The Train dock's state and decisions, without Qt: model, running job, outputs, run store.

:class:`Session` owns the current model (and the image it belongs to), the one running job
(its control flags, phase and output folder), the folders still backing lazy outputs and the
run store. The widget (:mod:`._train`) is layout and wiring: it builds a job record from its
form, asks the session to run it and shows what the session's events report.

Every job (training, prediction, tumour sampling) is a generator from :mod:`._jobs`; the
session hands it to a *runner*, the thing that runs a generator somewhere and reports back::

    runner(gen, yielded, returned, finished) -> worker

``yielded(record)`` for each record, ``returned(value)`` once, then ``finished()``, all on the
session's own thread. The widget's runner is napari's ``thread_worker`` (its signals arrive on
the GUI thread); :func:`run_inline` runs the generator in the calling thread (scripts, tests).
This is the split of stardist-napari and napari's ``qthreading``: a generator of work, and a
worker that runs it.

Events are plain lists of callables (:class:`Event`), no Qt signals:

``started(running)``
    A job was handed to the runner (``running`` is the :class:`Running` record).
``progress(p)``
    A :class:`~semiseg.engine.Progress` record of the running job.
``done(done)``
    The job succeeded (:class:`Done`); the session already holds its model.
``error(exc)``
    The job failed; the previous model is kept.
``finished(running)``
    After ``done`` or ``error``: the session is idle again.
``model_changed(model)``
    The current model changed (a job, a loaded file, a rollback).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import InputError, Model, ModelFileError, PredictionError, TrainingError
from ..runs import _ID_RE as _RUN_ID
from ..runs import RunInfo, list_runs, plugin_runs_dir
from . import _jobs

__all__ = ["KEEP_RUNS", "LAZY_BYTES", "Done", "Event", "Events", "Running", "Session", "error_title", "is_lazy", "run_inline"]

#: Image volumes above this many bytes get lazy (zarr-backed) outputs instead of numpy ones.
LAZY_BYTES = 512 * 2**20

#: Training runs the plugin keeps (the newest; ``SEMISEG_KEEP_RUNS`` changes it): each is a
#: model file of ~10 MB with the default U-Net, and every press of Train makes one.
KEEP_RUNS = 10


def keep_runs_default() -> int:
    """:data:`KEEP_RUNS`, or the ``SEMISEG_KEEP_RUNS`` environment variable (>= 1)."""
    try:
        return max(1, int(os.environ.get("SEMISEG_KEEP_RUNS", KEEP_RUNS)))
    except ValueError:
        return KEEP_RUNS


def prune_runs(runs_dir, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` runs of the store ``runs_dir``; returns the
    deleted model files. Files that cannot be deleted are left (and not returned)."""
    # By name, not by reading each file: run ids start with their time stamp (semiseg.runs).
    folder = Path(runs_dir)
    runs = sorted(p for p in folder.glob("*.pt") if _RUN_ID.match(p.name)) if folder.is_dir() else []
    removed = []
    for path in runs[: max(0, len(runs) - int(keep))]:
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed

#: Title of an error message, by class (first ``isinstance`` match wins: subclasses first).
ERROR_TITLES = (
    (PredictionError, "Prediction failed"),
    (TrainingError, "Training failed"),
    (ModelFileError, "Cannot load the model"),
    (InputError, "Cannot train"),
)


def error_title(exc: BaseException) -> str:
    """The title the widget shows before ``exc``'s message: ``"Training failed"``, ...,
    ``"Error"`` for anything else."""
    for cls, title in ERROR_TITLES:
        if isinstance(exc, cls):
            return title
    return "Error"


def is_lazy(image, lazy_bytes: int = LAZY_BYTES) -> bool:
    """Whether the outputs of ``image`` stay on disk (zarr, shown as dask): any image that is
    not a numpy array, and numpy images above ``lazy_bytes``."""
    return not isinstance(image, np.ndarray) or image.nbytes > lazy_bytes


def _is_shown_as_is(a) -> bool:
    return isinstance(a, np.ndarray) or hasattr(a, "dask")


class Event:
    """A list of callables, called in order with the event's arguments."""

    def __init__(self) -> None:
        self._callbacks: list[Callable] = []

    def connect(self, callback: Callable) -> Callable:
        self._callbacks.append(callback)
        return callback

    def disconnect(self, callback: Callable) -> None:
        self._callbacks.remove(callback)

    def emit(self, *args) -> None:
        for callback in list(self._callbacks):
            callback(*args)


class Events:
    """The session's events (see the module docstring)."""

    def __init__(self) -> None:
        self.started = Event()
        self.progress = Event()
        self.done = Event()
        self.error = Event()
        self.finished = Event()
        self.model_changed = Event()


@dataclasses.dataclass
class Running:
    """The job in progress.

    Attributes
    ----------
    kind : {"train", "predict", "sample"}
    job : TrainJob or SampleJob
    control : JobControl
    image_name : str or None
        The image layer the outputs are named after.
    image : (C, Z, Y, X) array-like
        The model's input.
    lazy : bool
        Outputs stay in ``out_dir`` (zarr) and are shown as dask arrays.
    continued : bool
        Training continues the session's model (False: from scratch).
    out_dir : str or None
        The job's folder; deleted when the job ends unless it backs lazy outputs.
    phase : str
        ``"train"``, ``"predict"`` (also for the uncertainty pass) or ``"sample"``.
    sample_index : int or None
        The slice a sampling job draws on (its job holds only that slice).
    worker : object
        What the runner returned (napari's worker in the widget).
    """

    kind: str
    job: Any
    control: _jobs.JobControl
    image_name: str | None
    image: Any
    lazy: bool = False
    continued: bool = False
    out_dir: str | None = None
    phase: str = "idle"
    sample_index: int | None = None
    worker: Any = None


@dataclasses.dataclass
class Done:
    """A job that succeeded.

    Attributes
    ----------
    kind : {"train", "predict", "sample"}
    result : JobResult or SampleResult
    outputs : dict or None
        The arrays to show (numpy or dask; zarr outputs are opened as dask); None when the
        prediction was cancelled, and for samples.
    image_name : str or None
    message : str
        One status line: what was done, on which device.
    """

    kind: str
    result: Any
    outputs: dict | None
    image_name: str | None
    message: str


def run_inline(gen, yielded: Callable, returned: Callable, finished: Callable):
    """Runner that drives ``gen`` to the end in the calling thread; returns None."""
    while True:
        try:
            record = next(gen)
        except StopIteration as stop:
            value = stop.value
            break
        yielded(record)
    returned(value)
    finished()


def _relay(gen):
    """Run ``gen`` to the end; return ``("ok", result)`` or ``("error", exc)``.

    Errors are returned rather than raised so the session reports them once, as an event.
    """
    try:
        result = yield from gen
    except Exception as exc:
        return ("error", exc)
    return ("ok", result)


def _not_converged(result: _jobs.JobResult, labels) -> str | None:
    """:func:`semiseg.metrics.convergence_warning` of a finished job's prediction (at most
    64 evenly spaced slices of a large or lazy mask are read for the predicted shares)."""
    from ..metrics import convergence_warning

    mask = result.outputs.get("mask") if isinstance(result.outputs, dict) else None
    annotated = result.model.history[-1].get("annotated_slices", [])
    if mask is None or not annotated:
        return None
    step = max(1, int(mask.shape[0]) // 64)
    return convergence_warning(np.asarray(mask[::step]), labels, annotated, axis=result.model.axis)


def _remove_later(path: str) -> None:
    """Delete a job folder off the caller's thread (the GUI thread must not wait for it)."""
    threading.Thread(target=_jobs.remove_dir, args=(path,), daemon=True, name="semiseg-cleanup").start()


class Session:
    """The model, the running job, its outputs and the run store of one Train dock.

    Parameters
    ----------
    backend : {"thread", "process"}
        Where jobs run: the runner's thread, or a spawned worker process (:mod:`._jobs`).
    runner : callable, optional
        ``runner(gen, yielded, returned, finished) -> worker``; default :func:`run_inline`.
    runs_dir : str or Path, optional
        Run store of every training run; default :func:`semiseg.runs.plugin_runs_dir`.
    pool : ProcessPool, optional
        Spare worker processes of the process backend (one is made when not given).
    keep_runs : int, optional
        How many runs the store keeps: older ones are deleted after each new run
        (:func:`prune_runs`); default :func:`keep_runs_default`.

    Raises
    ------
    ValueError
        For an unknown backend.
    """

    def __init__(self, *, backend: str = "thread", runner: Callable | None = None, runs_dir=None, pool=None,
                 keep_runs: int | None = None):
        if backend not in ("process", "thread"):
            raise ValueError("backend must be 'process' or 'thread'")
        self.backend = backend
        self.runner = runner or run_inline
        self.runs_dir = Path(runs_dir) if runs_dir is not None else plugin_runs_dir()
        self.keep_runs = int(keep_runs) if keep_runs is not None else keep_runs_default()
        self.pool = (pool or _jobs.ProcessPool(threads=1)) if backend == "process" else None
        self.events = Events()
        self.model: Model | None = None
        self.model_image: str | None = None  # image name the overlays are named after
        self.model_input = None  # (C, Z, Y, X) array the model was trained/predicted on
        self.running: Running | None = None
        self.last_result: _jobs.JobResult | None = None
        self.last_error: Exception | None = None
        self.lazy_dirs: list[str] = []

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self.running is not None

    @property
    def phase(self) -> str:
        """``"idle"`` or the running job's phase."""
        return self.running.phase if self.running is not None else "idle"

    @property
    def interruptible(self) -> bool:
        """True while the running job only predicts (a prediction job, or a training job past
        its training): a new training may cancel it."""
        r = self.running
        return r is not None and r.kind in ("train", "predict") and r.phase != "train"

    @property
    def can_sample(self) -> bool:
        return self.model is not None and bool(self.model.method.can_sample)

    # ------------------------------------------------------------------ starting jobs
    def train(self, job: _jobs.TrainJob, image_name: str | None = None, *, continue_model: bool = True,
              refine: bool = False, lazy_bytes: int = LAZY_BYTES,
              preview_index: Callable | None = None) -> Running | None:
        """Train on ``job`` (continuing the current model when ``continue_model``; with
        ``refine``, a new ``job.method`` model starting from the current model's segmentation
        weights), then predict.

        The session fills in the job's output folder and run store. Returns the running job,
        or None when one is already running.
        """
        if refine and self.model is not None:
            job = dataclasses.replace(job, init_from=True)
            continue_model = False
        return self._start_train_job(job, image_name, train=True, continue_model=continue_model,
                                     lazy_bytes=lazy_bytes, preview_index=preview_index)

    def predict(self, job: _jobs.TrainJob, image_name: str | None = None, *, lazy_bytes: int = LAZY_BYTES,
                preview_index: Callable | None = None) -> Running | None:
        """Predict ``job.image`` with the current model (no training, no new run)."""
        return self._start_train_job(job, image_name, train=False, continue_model=True,
                                     lazy_bytes=lazy_bytes, preview_index=preview_index)

    def _start_train_job(self, job, image_name, *, train, continue_model, lazy_bytes, preview_index):
        if self.busy:
            return None
        lazy = is_lazy(job.image, lazy_bytes)  # decided once, here
        out_dir = _jobs.new_out_dir() if (self.backend == "process" or lazy) else None
        job = dataclasses.replace(
            job, train=train, out_dir=out_dir, runs_dir=str(self.runs_dir) if train else None
        )
        continued = self.model is not None and (continue_model or not train)
        running = Running(
            kind="train" if train else "predict",
            job=job,
            control=_jobs.JobControl(preview_index=preview_index),
            image_name=image_name,
            image=job.image,
            lazy=lazy,
            continued=continued,
            out_dir=out_dir,
            phase="train" if train else "predict",
        )
        handed = self.model if continued or (train and job.init_from) else None
        return self._start(running, handed, load_outputs=not lazy)

    def sample(self, index: int, n: int) -> Running | None:
        """Draw ``n`` tumour samples on slice ``index`` of the model's input.

        Returns None when busy or when the model cannot sample.
        """
        if self.busy or not self.can_sample or self.model_input is None:
            return None
        model, image = self.model, self.model_input
        # Only the one slice travels to the worker: index 0 of a one-slice slab.
        idx = [slice(None)] * len(image.shape)
        idx[model.axis + len(image.shape) - 3] = slice(int(index), int(index) + 1)
        slab = image[tuple(idx)]
        out_dir = _jobs.new_out_dir() if self.backend == "process" else None
        job = _jobs.SampleJob(image=slab, index=0, n=int(n), device=str(model.method.device), out_dir=out_dir)
        running = Running("sample", job, _jobs.JobControl(), self.model_image, image, out_dir=out_dir,
                          phase="sample", sample_index=int(index))
        return self._start(running, model, load_outputs=True)

    def _start(self, running: Running, model: Model | None, *, load_outputs: bool) -> Running:
        if self.backend == "process":
            gen = _jobs.iter_job_process(running.job, running.control, model, pool=self.pool,
                                         load_outputs=load_outputs)
        else:
            gen = _jobs.iter_job(running.job, running.control, model)
        self.running = running
        self.events.started.emit(running)
        worker = self.runner(_relay(gen), self._on_yielded, self._on_returned, self._on_finished)
        if self.running is running:
            running.worker = worker
        return running

    # ------------------------------------------------------------------ stopping
    def stop(self) -> str | None:
        """Stop training at the next step (the volume is then predicted); during prediction
        (or sampling), cancel it. Returns a status line, or None when nothing runs."""
        if self.running is None:
            return None
        if self.running.phase == "train":
            self.running.control.stop_training.set()
            return "Stopping training..."
        self.running.control.cancel.set()
        return "Cancelling prediction..." if self.running.phase == "predict" else "Cancelling..."

    def cancel(self) -> None:
        """Abandon the running job: no more training, no prediction."""
        if self.running is not None:
            self.running.control.cancel.set()

    # ------------------------------------------------------------------ runner callbacks
    def _on_yielded(self, p) -> None:
        running = self.running
        if running is not None and running.phase == "train" and getattr(p, "phase", "train") != "train":
            running.phase = "predict"  # "predict", then "uncertainty" for the suggestion list
        self.events.progress.emit(p)

    def _on_returned(self, value) -> None:
        running = self.running
        kind, payload = value
        if kind == "error":
            self.last_error = payload
            self.events.error.emit(payload)
            return
        if running.kind == "sample":
            result: _jobs.SampleResult = payload
            index = running.sample_index
            result = _jobs.SampleResult(result.samples, index)
            msg = f"{len(result.samples)} sampled tumours on slice {index} (slider: sample)"
            self.events.done.emit(Done("sample", result, None, running.image_name, msg))
            return
        result: _jobs.JobResult = payload
        self.last_result = result
        if result.run is not None:
            prune_runs(self.runs_dir, self.keep_runs)  # a few unlinks: cheap
        self.model = result.model
        self.model_image = running.image_name
        self.model_input = running.image
        outputs = result.outputs
        if outputs is not None:
            if result.out_dir and not all(_is_shown_as_is(v) for v in outputs.values()):
                outputs = _jobs.open_outputs(result.out_dir, load=False)  # zarr -> dask
            # Older lazy outputs are no longer shown: drop their folders.
            for d in self.lazy_dirs:
                _jobs.remove_dir(d)
            self.lazy_dirs = [result.out_dir] if result.out_dir else []
        self.events.model_changed.emit(self.model)
        labels = getattr(running.job, "labels", None)
        self.events.done.emit(Done(running.kind, result, outputs, running.image_name,
                                   self.describe(result, running.kind, labels)))

    def _on_finished(self) -> None:
        running, self.running = self.running, None
        if running is not None and running.out_dir and running.out_dir not in self.lazy_dirs:
            _remove_later(running.out_dir)  # outputs were loaded into memory, or the job failed
        self.events.finished.emit(running)

    @staticmethod
    def describe(result: _jobs.JobResult, kind: str, labels=None) -> str:
        """One status line for a finished training or prediction job; with the job's
        ``labels``, it says when the prediction is clearly not converged
        (:func:`semiseg.metrics.convergence_warning`)."""
        steps = result.model.history[-1]["steps"] if result.model.history else 0
        if kind == "train" or result.outputs is None:
            msg = f"Trained {steps} steps on {result.device}" + (" (stopped)" if result.stopped else "")
        else:
            msg = f"Predicted on {result.device}"
        if result.outputs is None:
            msg += "; prediction cancelled"
        if result.run is None and result.run_error:
            msg += f"; run not kept: {result.run_error}"
        if labels is not None and result.outputs is not None and result.model.history:
            warning = _not_converged(result, labels)
            if warning:
                msg += f"; {warning}"
        return msg

    # ------------------------------------------------------------------ models and runs
    def set_model(self, model: Model, image_name: str | None = None, model_input=None) -> Model:
        self.model = model
        self.model_image = image_name
        self.model_input = model_input
        self.events.model_changed.emit(model)
        return model

    def load_model(self, path, image_name: str | None = None, model_input=None) -> Model:
        """Load a model file as the current model (on the CPU; jobs move it).

        Raises
        ------
        ModelFileError
            When the file is not a readable model file (the current model is kept).
        """
        return self.set_model(Model.load(path, device="cpu"), image_name, model_input)

    def save_model(self, path) -> Path:
        if self.model is None:
            raise InputError("no model to save: train or load one first")
        return self.model.save(path)

    def list_runs(self) -> list[RunInfo]:
        """The kept training runs, newest first."""
        return list(reversed(list_runs(None, self.runs_dir)))

    def rollback(self, run_path, image_name: str | None = None, model_input=None) -> Model:
        """Load a kept run's model as the current model (the runs themselves are kept).

        Raises
        ------
        InputError
            Without a run; ModelFileError for a run that is not a readable model file.
        """
        if not run_path:
            raise InputError("no training run to roll back to")
        return self.load_model(run_path, image_name, model_input)

    # ------------------------------------------------------------------ teardown
    def prestart(self) -> None:
        """Warm a spare worker process when idle (process backend)."""
        if self.pool is not None and not self.busy:
            self.pool.prestart()

    def shutdown(self) -> None:
        """Cancel a running job, stop the spare worker process and remove lazy outputs."""
        if self.running is not None:
            self.running.control.cancel.set()
        if self.pool is not None:
            self.pool.shutdown()
        for d in self.lazy_dirs:
            _jobs.remove_dir(d)
        self.lazy_dirs.clear()
