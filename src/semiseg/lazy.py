"""Lazy, chunked prediction of volumes larger than memory, with dask.

The volume is viewed as a dask array and cut into *slabs*: ``batch_size`` whole slices along the
model's slicing axis (every other axis in one piece), fewer when slices are large
(:func:`semiseg.inference.slab_slices`). One task per slab reads it, normalises it and runs the
network (:func:`semiseg.inference.predict_slab`); each of its results (mask, probabilities,
outputs) is its own dask array, written to zarr with :func:`dask.array.store`, slab by slab.
Networks are 2D: every slice is predicted on its own (whole, or in blended windows of the
training crop inside the slice), so without slice context slabs need **no overlap** along the
slicing axis (no halo, no seams between slabs). A model with a slice context of N
(:attr:`semiseg.model.Model.context`) reads each slab with a halo of N slices on each side,
reflected at the volume's ends, exactly the slices in-memory prediction reads. 3D methods
(``spatial_dims == 3``, no slice context) predict slabs of at least twice the window depth, each
read with a halo of one window depth on both sides (:func:`semiseg.inference.volume_slab_plan`),
and keep the slab's own slices (:func:`semiseg.inference.predict_slab_3d`), under the same lock.

Peak memory is bounded by the slab, not the volume: one slab is predicted at a time in each
process (a lock; the other threads of the local scheduler read the next slab and write the last
one meanwhile), so a volume of 8 or of 2,000 slices peaks at the same resident memory.

The same graph runs on dask's local schedulers (threads by default, or ``"synchronous"``) or on
a ``dask.distributed`` cluster given its scheduler address; the model travels to each worker
once, as the bytes of its safe model file.

Results are bitwise identical to :func:`semiseg.inference.predict_volume` with the same
``batch_size`` (same slice batches, same arithmetic).
"""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .device import resolve_device
from .errors import InputError
from .inference import (
    check_prediction_inputs,
    mask_dtype,
    predict_slab,
    predict_slab_3d,
    release_free_memory,
    slab_slices,
    volume_slab_plan,
)
from .io import _suffix, atomic_path
from .methods.base import state_to_cpu
from .model import FORMAT, FORMAT_VERSION, Model

__all__ = [
    "ModelHandle",
    "is_lazy",
    "lazy_predict",
    "open_scheduler",
    "predict_to_zarr",
]


def is_lazy(image) -> bool:
    """Whether ``image`` is a lazy array (dask, zarr, h5py, ...) rather than in memory."""
    return not isinstance(image, np.ndarray) and (hasattr(image, "dask") or hasattr(image, "chunks"))


# ----------------------------------------------------------------------------- model transport
_CACHE: dict[str, Model] = {}
_CACHE_LOCK = threading.Lock()


class ModelHandle:
    """A model that pickles as the bytes of its safe model file.

    Shipped once to each dask worker (process or remote machine), where :meth:`get` loads it on
    ``device`` (``auto``: the worker's GPU if it has one) and keeps it for the following slabs.
    In the process that made the handle, :meth:`get` returns the original model.

    Parameters
    ----------
    model : Model
    device : str
        Device on the workers.
    """

    def __init__(self, model: Model, device: str = "auto"):
        self.key = uuid.uuid4().hex
        self.device = str(device)
        self._model: Model | None = model
        self._payload: bytes | None = None

    def _bytes(self) -> bytes:
        if self._payload is None:
            import json

            import torch

            state = state_to_cpu(self._model.method.state_dict())
            state["opts"] = {}  # prediction needs no optimiser state
            payload = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": json.dumps(self._model.config()),
                "state": state,
            }
            buf = io.BytesIO()
            torch.save(payload, buf)
            self._payload = buf.getvalue()
        return self._payload

    def __getstate__(self):
        return {"key": self.key, "device": self.device, "payload": self._bytes()}

    def __setstate__(self, state):
        self.key, self.device = state["key"], state["device"]
        self._payload, self._model = state["payload"], None

    def get(self) -> Model:
        """The model, loaded once per process and put in eval mode."""
        if self._model is not None:
            return self._model
        with _CACHE_LOCK:
            model = _CACHE.get(self.key)
            if model is None:
                import os
                import tempfile

                fd, name = tempfile.mkstemp(suffix=".pt")
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(self._payload)
                    model = Model.load(name, device=resolve_device(self.device))
                finally:
                    os.unlink(name)
                _set_eval(model)
                _CACHE.clear()  # one model per worker process at a time
                _CACHE[self.key] = model
            self._model = model
        return model


def _set_eval(model: Model) -> dict[str, bool]:
    """Put every network in eval mode (so concurrent slab threads never toggle modes)."""
    modes = {k: n.training for k, n in model.method.nets.items()}
    for n in model.method.nets.values():
        n.eval()
    return modes


# ----------------------------------------------------------------------------- the graph
#: One slab predicted at a time per process: the network's ops already use every core (torch's
#: intra-op threads) or the one GPU, and two slabs in flight would double the peak memory.
_PREDICT_LOCK = threading.Lock()


def _predict_slab(block, handle, *, axis, outputs, context=0):
    """Predict one slab ``(C, ...)`` whose slicing axis is ``axis + 1``.

    With ``context`` N the block carries a halo of N slices on each side (already reflected at
    the volume's ends), and its ``B`` central slices are predicted.

    Returns a dict of ``mask`` (...), ``probabilities`` (K, ...) and each output (C, ...),
    with the slab's axes.
    """
    with _PREDICT_LOCK:
        model = handle.get()
        x = np.moveaxis(np.asarray(block), axis + 1, 0)  # (B + 2 context, C, H, W)
        del block
        rows = None
        if context:  # slice i of the slab sees rows i .. i + 2 context of the block
            rows = np.arange(x.shape[0] - 2 * context)[:, None] + np.arange(2 * context + 1)
        pred = predict_slab(model, x, outputs, rows=rows)
        del x
        release_free_memory()
    res = {"mask": np.moveaxis(pred.pop("mask"), 0, axis)}
    for name, value in pred.items():
        res[name] = np.moveaxis(value, 0, axis + 1)
    return res


def _predict_slab_3d(block, handle, *, axis, keep):
    """Predict one slab of a 3D method, read with its halo (``(C, ...)``, slicing axis
    ``axis + 1``), and keep its slices ``keep``; returns a dict like :func:`_predict_slab`."""
    with _PREDICT_LOCK:
        model = handle.get()
        x = np.moveaxis(np.asarray(block), axis + 1, 0)  # (B, C, H, W)
        del block
        pred = predict_slab_3d(model, x, keep)
        del x
        release_free_memory()
    return {
        "mask": np.moveaxis(pred.pop("mask"), 0, axis),
        "probabilities": np.moveaxis(pred.pop("probabilities"), 0, axis + 1),
    }


def _take(res: dict, key: str):
    """One result of a slab (dask drops the slab's dict once every result is taken)."""
    return res[key]


def lazy_predict(
    model: Model,
    image,
    *,
    batch_size: int = 8,
    outputs: Sequence[str] = (),
    probabilities: bool = False,
    device: str = "auto",
) -> dict:
    """Describe the prediction of a volume as dask arrays; nothing is computed yet.

    Parameters
    ----------
    model : Model
    image : (Z, Y, X) or (C, Z, Y, X) array-like
        Numpy, dask, zarr (OME-Zarr level 0 via :func:`semiseg.io.open_zarr_array`) or any
        array with ``chunks``. Read one slab at a time.
    batch_size : int
        Slices per slab (per task, per forward pass and per zarr write), at most: large slices
        go in fewer (:func:`semiseg.inference.slab_slices`).
    outputs : sequence of str
        Extra method outputs (``model.method.outputs``), in image intensity units.
    probabilities : bool
        Also return class probabilities ``(K, Z, Y, X)``.
    device : str
        Device of the workers of a distributed cluster (local schedulers use the model's).

    Returns
    -------
    dict of dask.array.Array
        ``mask`` (Z, Y, X) uint8/uint16, optionally ``probabilities`` (K, Z, Y, X) float32 and
        each output (shaped like ``image``). Their chunks are one slab; all of them come from
        one prediction task per slab.

    Raises
    ------
    InputError
        On a channel mismatch, an output the method lacks or a bad batch size.
    """
    import dask
    import dask.array as da

    image, squeeze = check_prediction_inputs(model, image, outputs, batch_size)
    if not isinstance(image, da.Array):
        chunks = getattr(image, "chunks", None)
        image = da.from_array(image, chunks=chunks if isinstance(chunks, tuple) else -1)
    if getattr(model.method, "spatial_dims", 2) == 3:
        return _lazy_predict_3d(model, image, batch_size=batch_size, probabilities=probabilities, device=device)
    axis = model.axis
    c = image.shape[0]
    k = model.num_classes
    plane = [d for i, d in enumerate(image.shape[1:]) if i != axis]
    size = slab_slices(model, plane, batch_size, outputs=len(outputs), itemsize=image.dtype.itemsize)
    # One slab = size slices along the model's axis; whole along every other axis.
    slab = [-1] * 4
    slab[axis + 1] = size
    image = image.rechunk(tuple(slab))
    out_chunks = image.chunks
    if model.context:  # each slab is read with its neighbours (see _predict_slab)
        image = _with_halo(image, axis + 1, model.context)
    handle = dask.delayed(ModelHandle(model, device), name=f"semiseg-model-{uuid.uuid4().hex}")
    uid = uuid.uuid4().hex
    wanted = ["mask", *(["probabilities"] if probabilities else []), *outputs]
    dtypes = {"mask": mask_dtype(k), "probabilities": np.dtype(np.float32)}
    blocks = image.to_delayed().reshape(-1)
    parts: dict[str, list] = {key: [] for key in wanted}
    for j, block in enumerate(blocks):
        n_j = out_chunks[axis + 1][j]
        spatial = list(image.shape[1:])
        spatial[axis] = n_j
        res = dask.delayed(_predict_slab, pure=False)(
            block, handle, axis=axis, outputs=tuple(outputs), context=model.context,
            dask_key_name=f"semiseg-predict-{uid}-{j}"
        )
        for key in wanted:
            shape = spatial if key == "mask" else [k if key == "probabilities" else c, *spatial]
            item = dask.delayed(_take, pure=True)(res, key, dask_key_name=f"semiseg-take-{key}-{uid}-{j}")
            parts[key].append(da.from_delayed(item, shape=tuple(shape), dtype=dtypes.get(key, np.float32)))
    out = {}
    for key in wanted:
        arr = da.concatenate(parts[key], axis=axis if key == "mask" else axis + 1)
        out[key] = arr[0] if squeeze and key in outputs else arr
    return out


def _lazy_predict_3d(model: Model, image, *, batch_size: int, probabilities: bool, device: str) -> dict:
    """:func:`lazy_predict` of a 3D method: one task per slab along the model's axis, each
    reading its slices plus a halo of the window depth, so results equal
    :func:`semiseg.inference.predict_volume` with the same ``batch_size`` (same plan:
    :func:`semiseg.inference.volume_slab_plan`)."""
    import dask
    import dask.array as da

    axis = model.axis
    spatial = tuple(image.shape[1:])
    k = model.num_classes
    handle = dask.delayed(ModelHandle(model, device), name=f"semiseg-model-{uuid.uuid4().hex}")
    uid = uuid.uuid4().hex
    wanted = ["mask", *(["probabilities"] if probabilities else [])]
    dtypes = {"mask": mask_dtype(k), "probabilities": np.dtype(np.float32)}
    parts: dict[str, list] = {key: [] for key in wanted}
    plan = volume_slab_plan(model, spatial, batch_size, itemsize=image.dtype.itemsize)
    for j, (s, e, rs, re) in enumerate(plan):
        idx = [slice(None)] * 4
        idx[axis + 1] = slice(rs, re)
        shape = list(spatial)
        shape[axis] = e - s
        res = dask.delayed(_predict_slab_3d, pure=False)(
            image[tuple(idx)], handle, axis=axis, keep=(s - rs, e - rs),
            dask_key_name=f"semiseg-predict-{uid}-{j}",
        )
        for key in wanted:
            full = shape if key == "mask" else [k, *shape]
            item = dask.delayed(_take, pure=True)(res, key, dask_key_name=f"semiseg-take-{key}-{uid}-{j}")
            parts[key].append(da.from_delayed(item, shape=tuple(full), dtype=dtypes[key]))
    return {key: da.concatenate(parts[key], axis=axis if key == "mask" else axis + 1) for key in wanted}


def _with_halo(slabs, ax: int, context: int):
    """``slabs`` (one chunk per slab along axis ``ax``) with every chunk widened by ``context``
    slices on each side, taken from the volume reflected at its ends (numpy's ``"reflect"``)."""
    import dask.array as da

    n = slabs.shape[ax]
    head = slabs[(slice(None),) * ax + (slice(context, 0, -1),)]  # slices N..1
    stop = n - 2 - context  # -1 would wrap round: None reads down to slice 0
    tail = slabs[(slice(None),) * ax + (slice(n - 2, stop if stop >= 0 else None, -1),)]
    padded = da.concatenate([head, slabs, tail], axis=ax)
    pieces, sizes, s = [], [], 0
    for size in slabs.chunks[ax]:
        pieces.append(padded[(slice(None),) * ax + (slice(s, s + size + 2 * context),)])
        sizes.append(size + 2 * context)
        s += size
    chunks = list(slabs.chunks)
    chunks[ax] = tuple(sizes)
    return da.concatenate(pieces, axis=ax).rechunk(tuple(chunks))


# ----------------------------------------------------------------------------- schedulers
@contextlib.contextmanager
def open_scheduler(scheduler=None, *, num_workers: int | None = None):
    """Yield ``compute`` keyword arguments for a scheduler spec.

    Parameters
    ----------
    scheduler : None, str or distributed.Client
        ``None`` or ``"threads"``: local threads; ``"synchronous"``: one thread, no pool;
        an address such as ``"tcp://10.0.0.1:8786"``: a ``dask.distributed`` cluster (a client
        is opened for the block and closed after); a ``Client``: used as is.
    num_workers : int, optional
        Threads of the local threaded scheduler (default 1). Slabs are predicted one at a time
        in any case (the network's own ops use torch's intra-op threads); a second thread only
        reads the next slab and writes the last one meanwhile, which bought nothing measurable
        on CPU (22.1 s vs 22.5 s for 32 slices of 2048 x 2048) and lets glibc's heaps fragment
        across threads: peak memory then creeps up with the number of slabs (+10 % from 8 to
        32 slices).

    Raises
    ------
    InputError
        When the cluster cannot be reached or ``distributed`` is not installed.
    """
    if scheduler is None or scheduler == "threads":
        yield {"scheduler": "threads", "num_workers": num_workers or 1}
        return
    if scheduler in ("synchronous", "sync", "single-threaded"):
        yield {"scheduler": "synchronous"}
        return
    try:
        from distributed import Client
    except ImportError:
        raise InputError(
            "a scheduler address needs dask.distributed: pip install 'napari-semiseg[distributed]'"
        ) from None
    if isinstance(scheduler, Client):
        yield {"scheduler": scheduler}
        return
    if not isinstance(scheduler, str) or ("://" not in scheduler and ":" not in scheduler):
        raise InputError(
            f"scheduler must be 'threads', 'synchronous' or an address like tcp://HOST:8786, got {scheduler!r}"
        )
    try:
        client = Client(scheduler, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
    try:
        yield {"scheduler": client}
    finally:
        client.close()


class _SlabProgress:
    """Local-scheduler callback: calls ``fn(done, total)`` as prediction tasks (keys naming
    ``prefix``) finish."""

    def __init__(self, prefix: str, total: int, fn: Callable[[int, int], None]):
        from dask.callbacks import Callback

        self.done = 0
        lock = threading.Lock()

        def posttask(key, result, dsk, state, worker_id):
            name = key[0] if isinstance(key, tuple) else key
            if isinstance(name, str) and prefix in name:  # also once fused with its consumers
                with lock:
                    self.done += 1
                    fn(self.done, total)

        self.callback = Callback(posttask=posttask)


def predict_to_zarr(
    model: Model,
    image,
    paths: Mapping[str, str | Path],
    *,
    batch_size: int = 8,
    scheduler=None,
    num_workers: int | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = True,
) -> dict[str, Path]:
    """Predict a volume slab by slab, writing each result to a zarr v3 array as it goes.

    Parameters
    ----------
    model : Model
    image : (Z, Y, X) or (C, Z, Y, X) array-like
        Lazy or in-memory; only a few slabs are ever held in memory.
    paths : mapping of str to path
        Where to write each result: ``mask`` (required), ``probabilities`` and output names
        (e.g. ``residual``). Paths end in ``.zarr``; on a cluster they must be on storage every
        worker can write (a shared file system).
    batch_size : int
        Slices per slab.
    scheduler : None, str or distributed.Client
        See :func:`open_scheduler`.
    num_workers : int, optional
        Threads of the local scheduler.
    device : str
        Device on cluster workers.
    progress : callable, optional
        ``progress(done, total)`` after each slab (local schedulers only).
    overwrite : bool
        Replace existing outputs.

    Returns
    -------
    dict of str to Path
        The written stores. Each is written to a temporary sibling and moved into place at the
        end, so an interrupted run leaves previous outputs intact.

    Raises
    ------
    InputError
        For a missing ``mask`` path, suffixes other than ``.zarr``, existing outputs without
        ``overwrite``, and the errors of :func:`lazy_predict` / :func:`open_scheduler`.
    """
    import dask.array as da
    import zarr

    paths = {k: Path(v) for k, v in paths.items() if v is not None}
    if "mask" not in paths:
        raise InputError("predict_to_zarr needs a 'mask' path")
    for key, p in paths.items():
        if _suffix(p) != ".zarr":
            raise InputError(f"chunked prediction writes zarr: {key} path {p} must end in .zarr")
        if p.exists() and not overwrite:
            raise InputError(f"{p} exists (pass overwrite to replace it)")
    outputs = [k for k in paths if k not in ("mask", "probabilities")]
    arrays = lazy_predict(
        model, image, batch_size=batch_size, outputs=outputs,
        probabilities="probabilities" in paths, device=device,
    )
    modes = _set_eval(model)
    try:
        with contextlib.ExitStack() as stack, open_scheduler(scheduler, num_workers=num_workers) as kw:
            tmps = {k: stack.enter_context(atomic_path(p)) for k, p in paths.items()}
            sources, targets = [], []
            for key, arr in arrays.items():
                # One zarr chunk per slice along the slicing axis: every slab covers whole
                # chunks, so slabs write concurrently without locks.
                chunks = list(arr.shape)
                chunks[arr.ndim - 3 + model.axis] = 1
                z = zarr.create_array(
                    str(tmps[key]), shape=arr.shape, chunks=tuple(chunks), dtype=arr.dtype,
                    zarr_format=3,
                )
                sources.append(arr)
                targets.append(z)
            n_slabs = arrays["mask"].numblocks[model.axis]
            cb = contextlib.nullcontext()
            if progress is not None and not _is_client(kw["scheduler"]):
                cb = _SlabProgress("semiseg-predict-", n_slabs, progress).callback
            with cb:
                da.store(sources, targets, lock=False, **kw)
    finally:
        for k, n in model.method.nets.items():
            n.train(modes[k])
    return paths


def _is_client(obj) -> bool:
    return not isinstance(obj, str) and obj.__class__.__name__ == "Client"

