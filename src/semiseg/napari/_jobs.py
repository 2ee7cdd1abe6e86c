"""Every job of the Train dock, in a worker thread or a spawned process.

No Qt here. A job is a picklable record (:class:`TrainJob`: training + whole-volume prediction
+ the suggestion list's uncertainty pass; :class:`SampleJob`: tumour samples of one slice;
:class:`UncertaintyJob`: the suggestion list's Refresh) and
:func:`iter_job` turns it into a generator of :class:`~semiseg.engine.Progress` (``phase=
"train"``, then ``"predict"``, then ``"uncertainty"``) that returns its result
(:class:`JobResult`, :class:`SampleResult`). The session (:mod:`._session`) hands that
generator to a runner (napari's ``thread_worker`` in the widget). Two backends drive the *same*
generator:

``"process"`` (default)
    :func:`iter_job_process` hands the job to a spawned Python process (torch limited to
    ``threads`` intra-op threads) and relays its Progress records from a queue. The GUI
    process only waits on the queue, so training never holds napari's GIL, and the process
    exit frees every byte of GPU memory. A spare process is pre-started (:class:`ProcessPool`)
    so that pressing Train does not wait for ``import torch``. Models travel as model files
    (:meth:`semiseg.Model.save`), outputs as a zarr group on disk.
``"thread"``
    :func:`iter_job` runs in the worker thread itself (used by scripts and as a fallback).

Stopping: ``control.stop_training`` ends training before the next step (the engine's
``should_stop`` callback; the generator returns the model trained so far), then the volume is
still predicted; ``control.cancel`` also abandons prediction.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import multiprocessing as mp
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np

from .. import InputError, Model, ModelFileError, PredictionError, TrainingError
from ..engine import Progress, TrainConfig, iter_train
from ..inference import iter_predict_volume
from ..runs import RunInfo, run_info, save_run
from ..suggest import UncertaintyResult, iter_uncertainty

log = logging.getLogger(__name__)

#: Zarr group (inside a job's folder) holding the uncertainty of the suggestion list.
UNCERTAINTY_ZARR = "uncertainty.zarr"

__all__ = [
    "JobControl",
    "JobResult",
    "ProcessPool",
    "SampleJob",
    "SampleResult",
    "TrainJob",
    "UncertaintyJob",
    "iter_job",
    "iter_job_process",
    "open_outputs",
    "open_uncertainty",
]


@dataclasses.dataclass
class TrainJob:
    """Everything one training + prediction run needs (picklable).

    Attributes
    ----------
    image : (C, Z, Y, X) array-like
        numpy, dask or zarr; read slice by slice.
    labels : (Z, Y, X) int ndarray
        A snapshot of the user's labels (the layer itself is never handed over).
    tags : (Z,) int8 ndarray or None
    planes : tuple of (axis, index) or None
        Fully annotated slices in any plane (:mod:`semiseg.planes`); None reads the annotated
        slices off the labels.
    method : str
    params : dict
        Method hyperparameters (strings are coerced by the method).
    config : TrainConfig
    device : str
    preset : str
        Model sizes of a new model (``auto``, ``cpu``, ``paper``; see :func:`semiseg.engine.iter_train`).
    train : bool
        Train (False: only predict with the given model).
    predict : bool
        Predict the whole volume after training.
    out_dir : str or None
        Folder for a zarr group of outputs; None keeps outputs in memory (thread backend with a
        numpy image).
    uncertainty : bool
        After predicting, also compute the per-voxel uncertainty and slice scores for the
        suggestion list (:func:`semiseg.suggest.iter_uncertainty`), in the worker, so the
        viewer process does not run a second whole-volume pass.
    tta : bool
        Test-time augmentation for that uncertainty pass.
    runs_dir : str or None
        Keep the trained model as a new run in this run store (:func:`semiseg.runs.save_run`),
        written by the worker so the viewer does not wait for the file.
    init_from : bool
        The model handed with the job is a warm start: train a new ``method`` model from its
        segmentation weights (``iter_train(init_from=...)``) instead of continuing it.
    """

    image: Any
    labels: np.ndarray
    tags: np.ndarray | None = None
    planes: tuple | None = None
    method: str = "supervised"
    params: dict = dataclasses.field(default_factory=dict)
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    device: str = "auto"
    preset: str = "auto"
    train: bool = True
    predict: bool = True
    out_dir: str | None = None
    uncertainty: bool = False
    tta: bool = False
    runs_dir: str | None = None
    init_from: bool = False


@dataclasses.dataclass
class JobResult:
    """What a finished job hands back.

    Attributes
    ----------
    model : Model
    outputs : dict or None
        ``mask`` (Z, Y, X), ``probabilities`` (K, Z, Y, X) and each method output
        (C, Z, Y, X); None when prediction was skipped or cancelled.
    stopped : bool
        Training was ended early by Stop.
    device : str
        Device used for training.
    out_dir : str or None
        Folder still backing lazy outputs (zarr), if any.
    uncertainty : UncertaintyResult or None
        The suggestion list's uncertainty pass, when the job asked for it and was not cancelled.
    run : RunInfo or None
        The run kept in ``job.runs_dir``.
    run_error : str or None
        Why the run could not be kept (training itself succeeded).
    """

    model: Model
    outputs: dict | None
    stopped: bool
    device: str
    out_dir: str | None = None
    uncertainty: UncertaintyResult | None = None
    run: RunInfo | None = None
    run_error: str | None = None


@dataclasses.dataclass
class SampleJob:
    """Tumour samples of one slice (picklable): absence->presence translations.

    Attributes
    ----------
    image : (C, Z, Y, X) array-like
        The model's input; only slice ``index`` (along the model's axis) is read.
    index : int
    n : int
        Number of samples.
    device : str
        Where the process backend loads the model (the thread backend uses it as it is).
    out_dir : str or None
        Folder the model file travels through (process backend).
    """

    image: Any
    index: int
    n: int = 4
    device: str = "cpu"
    out_dir: str | None = None


@dataclasses.dataclass
class SampleResult:
    """What a finished :class:`SampleJob` hands back.

    Attributes
    ----------
    samples : (n, [C,] Y, X) float ndarray
    index : int
        The slice they were drawn on.
    """

    samples: np.ndarray
    index: int


@dataclasses.dataclass
class UncertaintyJob:
    """The suggestion list's uncertainty pass on its own (its Refresh; picklable).

    Attributes
    ----------
    image : (C, Z, Y, X) or (Z, Y, X) array-like
    tta : bool
        Test-time augmentation.
    """

    image: Any
    tta: bool = False


class JobControl:
    """Stop / cancel flags and the preview slice getter shared with a running job."""

    def __init__(self, preview_index: Callable[[], int | None] | None = None):
        self.stop_training = threading.Event()
        self.cancel = threading.Event()
        self.preview_index = preview_index


# ----------------------------------------------------------------------------- the job
def iter_job(job, control: JobControl, model: Model | None = None) -> Generator[Progress, None, Any]:
    """The generator of ``job``: a :class:`TrainJob` trains (continuing ``model`` when given),
    then predicts the volume and returns a :class:`JobResult`; a :class:`SampleJob` returns a
    :class:`SampleResult`; an :class:`UncertaintyJob` an
    :class:`~semiseg.suggest.UncertaintyResult` (None once cancelled)."""
    if isinstance(job, SampleJob):
        return (yield from _iter_sample(job, model))
    if isinstance(job, UncertaintyJob):
        if model is None:
            raise InputError("the uncertainty pass needs a model: train one or load a model file")
        return (yield from _cancellable(iter_uncertainty(model, job.image, tta=job.tta), control))
    config = copy.copy(job.config)
    stopped = False
    run = run_error = None
    if not job.train:
        if model is None:
            raise InputError("predicting needs a model: train one or load a model file")
    else:
        model = yield from _train(job, control, model, config)
        stopped = control.stop_training.is_set() or control.cancel.is_set()
        run, run_error = _keep_run(job, model)
    device = str(model.method.device)
    outputs = None
    if job.predict and not control.cancel.is_set():
        names = tuple(model.method.outputs)
        out = _zarr_outputs(job.out_dir, model, tuple(job.image.shape), names) if job.out_dir else None
        outputs = yield from _cancellable(iter_predict_volume(model, job.image, outputs=names, out=out), control)
    unc = None
    if outputs is not None and job.uncertainty:
        unc = yield from _uncertainty(job, control, model)
    if model.method.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    return JobResult(model, outputs, stopped, device, job.out_dir, unc, run, run_error)


def _iter_sample(job: SampleJob, model: Model | None):
    from ..inference import sample_tumours

    if model is None:
        raise InputError("sampling needs a model: train one or load a model file")
    yield from ()  # no progress: one quick pass
    return SampleResult(sample_tumours(model, job.image, job.index, job.n), job.index)


def _keep_run(job: TrainJob, model: Model):
    """Save the trained model as a run of ``job.runs_dir``: (RunInfo, None) or (None, error)."""
    if not job.runs_dir or not model.history:
        return None, None
    try:
        return save_run(model, None, job.runs_dir), None
    except (InputError, OSError) as exc:
        return None, str(exc)


def _uncertainty(job: TrainJob, control: JobControl, model: Model):
    """The suggestion list's uncertainty pass (None when cancelled)."""
    out = None
    if job.out_dir:
        import zarr

        spatial = tuple(job.image.shape[-3:])
        root = zarr.open_group(str(Path(job.out_dir) / UNCERTAINTY_ZARR), mode="w")
        axis = model.axis
        chunks = tuple(1 if i == axis else n for i, n in enumerate(spatial))
        out = root.create_array("uncertainty", shape=spatial, chunks=chunks, dtype=np.float32)
    return (yield from _cancellable(iter_uncertainty(model, job.image, tta=job.tta, out=out), control))


def _cancellable(gen, control: JobControl):
    """Relay ``gen``'s Progress records and return its value; None once ``control.cancel`` is set."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        yield p
        if control.cancel.is_set():
            gen.close()
            return None


def open_uncertainty(
    out_dir: str, mass, axis: int, peak: float | None, descriptors=None, *, load: bool
) -> UncertaintyResult:
    """The uncertainty a worker wrote under ``out_dir``, as numpy (``load``) or dask."""
    import zarr

    arr = zarr.open_group(str(Path(out_dir) / UNCERTAINTY_ZARR), mode="r")["uncertainty"]
    return UncertaintyResult(_read(arr, load), np.asarray(mass, np.float64), int(axis), peak, descriptors)


def _train(job: TrainJob, control: JobControl, model: Model | None, config: TrainConfig):
    gen = iter_train(
        job.image,
        job.labels,
        tags=job.tags,
        method=job.method,
        params=job.params or None,
        config=config,
        model=None if job.init_from else model,
        init_from=model if job.init_from else None,
        device=job.device,
        preset=job.preset,
        preview_index=control.preview_index,
        should_stop=lambda: control.stop_training.is_set() or control.cancel.is_set(),
        planes=job.planes,
    )
    return (yield from gen)


def _zarr_outputs(out_dir: str, model: Model, image_shape: tuple, names: tuple) -> dict:
    import zarr

    if len(image_shape) == 3:
        image_shape = (1, *image_shape)
    spatial = image_shape[1:]
    k = model.num_classes
    root = zarr.open_group(str(Path(out_dir) / "outputs.zarr"), mode="w")
    out = {
        "mask": root.create_array(
            "mask", shape=spatial, chunks=(1, *spatial[1:]), dtype=np.uint8 if k <= 256 else np.uint16
        ),
        "probabilities": root.create_array(
            "probabilities", shape=(k, *spatial), chunks=(1, 1, *spatial[1:]), dtype=np.float32
        ),
    }
    for name in names:
        out[name] = root.create_array(name, shape=image_shape, chunks=(1, 1, *spatial[1:]), dtype=np.float32)
    return out


def _read(arr, load: bool):
    """A zarr array as numpy (``load``) or as a lazy dask array."""
    if load:
        return np.asarray(arr[...])
    import dask.array as da

    return da.from_zarr(arr)


def open_outputs(out_dir: str, *, load: bool) -> dict:
    """Open the outputs a job wrote under ``out_dir``: numpy (``load``) or lazy dask arrays."""
    import zarr

    root = zarr.open_group(str(Path(out_dir) / "outputs.zarr"), mode="r")
    return {name: _read(root[name], load) for name in root.array_keys()}


# ----------------------------------------------------------------------------- process backend
class _Handle:
    """One spawned worker process with its queues and shared flags."""

    def __init__(self, ctx, threads: int, nice: int = 0):
        self.jobs = ctx.Queue()
        self.msgs = ctx.Queue()
        self.stop_training = ctx.Event()
        self.cancel = ctx.Event()
        self.preview = ctx.Value("i", -1, lock=False)
        self.ready = False
        self.proc = ctx.Process(
            target=_serve,
            args=(self.jobs, self.msgs, self.stop_training, self.cancel, self.preview, threads, nice),
            daemon=True,
            name="semiseg-train",
        )
        self.proc.start()

    def close(self, timeout: float = 2.0) -> None:
        """Ask the process to finish; terminate it if it has not ended after ``timeout``.

        Does not block: a daemon timer does the waiting (a finished job's process exits by
        itself; interpreter teardown can take a second or two on a busy machine).
        """
        self.cancel.set()
        for q in (self.jobs, self.msgs):
            q.cancel_join_thread()

        def reap():
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout)

        threading.Thread(target=reap, daemon=True, name="semiseg-reaper").start()


class ProcessPool:
    """Keeps at most one warm spare worker process (spawned, torch already imported).

    Parameters
    ----------
    threads : int
        torch intra-op threads in the worker; 1 leaves the other cores to the viewer.
    nice : int
        Niceness added to the worker (POSIX): on busy machines the viewer gets the CPU first.
    """

    def __init__(self, threads: int = 1, nice: int = 10):
        self.threads = int(threads)
        self.nice = int(nice)
        self._ctx = mp.get_context("spawn")
        self._spare: _Handle | None = None
        self._lock = threading.Lock()

    def prestart(self) -> None:
        """Start a spare process now (it imports torch and waits for a job)."""
        with self._lock:
            if self._spare is None or not self._spare.proc.is_alive():
                self._spare = _Handle(self._ctx, self.threads, self.nice)

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Block until the spare process has imported torch (for benchmarks and tests)."""
        with self._lock:
            h = self._spare
        if h is None:
            return False
        if h.ready:
            return True
        try:
            msg = h.msgs.get(timeout=timeout)
        except queue.Empty:
            return False
        h.ready = msg[0] == "ready"
        return h.ready

    def take(self) -> _Handle:
        with self._lock:
            h, self._spare = self._spare, None
        if h is None or not h.proc.is_alive():
            h = _Handle(self._ctx, self.threads, self.nice)
        return h

    def shutdown(self) -> None:
        with self._lock:
            h, self._spare = self._spare, None
        if h is not None:
            h.close(timeout=0.5)


def iter_job_process(
    job,
    control: JobControl,
    model: Model | None = None,
    *,
    pool: ProcessPool | None = None,
    load_outputs: bool = True,
) -> Generator[Progress, None, Any]:
    """Run :func:`iter_job` in a spawned process; same records and result as the thread backend.

    ``job.out_dir`` must be set (outputs and model files travel through it). Outputs come back
    as numpy arrays (``load_outputs``) or as lazy dask arrays over the zarr group.
    """
    if not job.out_dir:
        raise ValueError("the process backend needs job.out_dir")
    out_dir = Path(job.out_dir)
    model_in = str(model.save(out_dir / "model-in.pt")) if model is not None else None
    h = (pool or ProcessPool()).take()
    h.jobs.put((job, model_in))
    try:
        while True:
            if control.preview_index is not None:
                idx = control.preview_index()
                h.preview.value = -1 if idx is None else int(idx)
            if control.stop_training.is_set():
                h.stop_training.set()
            if control.cancel.is_set():
                h.cancel.set()
            try:
                msg = h.msgs.get(timeout=0.05)
            except queue.Empty:
                if not h.proc.is_alive():
                    raise TrainingError(
                        f"the training process ended unexpectedly (exit code {h.proc.exitcode})"
                    ) from None
                continue
            kind = msg[0]
            if kind == "progress":
                yield msg[1]
            elif kind == "error":
                raise _error_from(msg[1], msg[2])
            elif kind == "done":
                return _unpack(job, msg[1], out_dir, load_outputs)
    finally:
        h.close()


#: Errors that cross the process boundary as themselves (first match wins: subclasses first).
_RELAYED = (PredictionError, TrainingError, ModelFileError, InputError)


def _error_kind(exc: BaseException) -> str:
    """The name an error travels under: a class of :data:`_RELAYED` (by ``isinstance``),
    ``"InputError"`` for other ValueError/KeyError, else the class's own name."""
    for cls in _RELAYED:
        if isinstance(exc, cls):
            return cls.__name__
    if isinstance(exc, (ValueError, KeyError)):
        return InputError.__name__
    return type(exc).__name__


def _error_from(kind: str, text: str) -> Exception:
    """The error the viewer raises for a worker's ``(kind, text)``; unknown kinds become a
    TrainingError naming the original class."""
    for cls in _RELAYED:
        if kind == cls.__name__:
            return cls(text)
    return TrainingError(f"{kind}: {text}")


def _pack(job, result, out_dir: Path):
    """The worker's side of a finished job: small, picklable parts (arrays stay in zarr)."""
    if isinstance(job, SampleJob):
        return result
    path = result.model.save(out_dir / "model.pt")
    unc = result.uncertainty
    unc = None if unc is None else (unc.mass, unc.axis, unc.peak, unc.descriptors)
    run_path = str(result.run.path) if result.run is not None else None
    return (str(path), result.stopped, result.device, result.outputs is not None, unc, run_path, result.run_error)


def _unpack(job, payload, out_dir: Path, load_outputs: bool):
    """The viewer's side: the job's result, read back from ``payload`` and ``out_dir``."""
    if isinstance(job, SampleJob):
        return payload
    model_path, stopped, device, predicted, unc, run_path, run_error = payload
    t0 = time.perf_counter()
    trained = Model.load(model_path, device="cpu")
    log.debug("model loaded in %.2f s", time.perf_counter() - t0)
    outputs = open_outputs(str(out_dir), load=load_outputs) if predicted else None
    if unc is not None:
        unc = open_uncertainty(str(out_dir), *unc, load=load_outputs)
    run = None
    if run_path:
        try:
            run = run_info(run_path)
        except ModelFileError as exc:
            run_error = str(exc)
    return JobResult(trained, outputs, stopped, device, None if load_outputs else str(out_dir), unc, run, run_error)


def _exit_with_parent(job_dir: list) -> None:
    """Exit this worker process as soon as its parent (the viewer) dies.

    A viewer killed by SIGTERM runs no clean-up and a daemon process is only ended by a
    parent that exits normally: the worker trained on, holding its memory, and its job
    folder was left behind (issue 20 item 11). A daemon thread waits on the parent's
    sentinel (closed by the kernel when the parent dies, whatever killed it), removes the
    job's folder (``job_dir[0]``, once known) and ends the process.
    """
    import os

    parent = mp.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()  # returns once the parent's sentinel is closed: the parent is gone
        remove_dir(job_dir[0] if job_dir else None)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="semiseg-parent-watch").start()


def _serve(jobs, msgs, stop_training, cancel, preview, threads: int, nice: int = 0) -> None:
    """Worker process main: import torch, say ready, run one job, report, exit."""
    import os

    job_dir: list = []
    _exit_with_parent(job_dir)
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    import torch

    torch.set_num_threads(max(1, int(threads)))
    import zarr  # noqa: F401  (imported before "ready" so the first job does not wait for it)

    from ..engine import resolve_device, run
    from ..methods import list_methods

    list_methods()  # import every method module now, not at the first step
    msgs.put(("ready",))
    job, model_in = jobs.get()
    job_dir.append(job.out_dir)
    model = None
    try:
        if model_in:
            model = Model.load(model_in, device=resolve_device(job.device))
        control = JobControl(lambda: None if preview.value < 0 else int(preview.value))
        control.stop_training = stop_training
        control.cancel = cancel
        result = run(iter_job(job, control, model), lambda p: msgs.put(("progress", p)))
        # Small parts travel in the message; arrays and the model stay in the job's folder.
        msgs.put(("done", _pack(job, result, Path(job.out_dir))))
    except BaseException as exc:  # reported to the viewer, never lost
        msgs.put(("error", _error_kind(exc), str(exc) or repr(exc)))
    finally:
        model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        msgs.close()
        msgs.join_thread()


def new_out_dir(root: str | None = None) -> str:
    """A fresh temporary folder for one job's files."""
    return tempfile.mkdtemp(prefix="semiseg-job-", dir=root)


def remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
