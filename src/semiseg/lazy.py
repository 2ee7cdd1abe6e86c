"""Lazy, chunked prediction of volumes larger than memory, with dask.

The volume is viewed as a dask array and cut into *slabs*: ``batch_size`` whole slices along the
model's slicing axis (every other axis in one piece). One task per slab reads it, normalises it
and runs the network (:func:`semiseg.inference.predict_normalised_slices`); the results are
written to zarr with :func:`dask.array.store`, slab by slab. Networks are 2D: every slice is
predicted on its own (whole, or in blended windows of the training crop inside the slice), so
slabs need **no overlap** along the slicing axis (no halo, no seams between slabs) and peak
memory is a few slabs whatever the volume size. 3D methods (``spatial_dims == 3``) predict
slabs of at least twice the window depth, each read with a halo of one window depth on both
sides (:func:`semiseg.inference.slab_plan`), and keep the slab's own slices.

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

from .data import InputError
from .inference import check_prediction_inputs
from .model import Model

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

            from .model import FORMAT, FORMAT_VERSION, _to_cpu

            state = _to_cpu(self._model.method.state_dict())
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

                from .engine import resolve_device

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
def _predict_slab(block, handle, *, axis, outputs, kinds, probabilities, mask_dtype):
    """Predict one slab ``(C, ...)`` whose slicing axis is ``axis + 1``.

    Returns the mask slab ``(...)`` when only the mask is wanted, else a float32 stack
    ``(K [+ C * len(outputs)], ...)`` of probabilities and outputs (the mask is its argmax).
    """
    from .inference import predict_normalised_slices

    model = handle.get()
    x = np.moveaxis(np.asarray(block, dtype=np.float32), axis + 1, 0)  # (B, C, H, W)
    pred = predict_normalised_slices(model.method, model.normaliser(x, channel_axis=1), outputs)
    if not np.isfinite(pred["probabilities"]).all():
        from .engine import PredictionError

        raise PredictionError("the model produced non-finite values")
    if not probabilities and not outputs:
        return np.moveaxis(pred["mask"].astype(mask_dtype), 0, axis)
    parts = [pred["probabilities"]]
    lo = np.asarray(model.normaliser.low, np.float32)[None, :, None, None]
    hi = np.asarray(model.normaliser.high, np.float32)[None, :, None, None]
    for name in outputs:
        y = pred[name]
        y = y * (hi - lo) / 2 if kinds[name] == "difference" else (y + 1) * (hi - lo) / 2 + lo
        parts.append(y)
    stack = np.concatenate(parts, axis=1)  # (B, K + C*n, H, W)
    return np.moveaxis(stack, 0, axis + 1)


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
        Slices per slab: per task, per forward pass and per zarr write.
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
        each output (shaped like ``image``). Their chunks are one slab.

    Raises
    ------
    InputError
        On a channel mismatch, an output the method lacks or a bad batch size.
    """
    import dask
    import dask.array as da

    image, squeeze = check_prediction_inputs(model, image, outputs, batch_size)
    method = model.method
    if not isinstance(image, da.Array):
        chunks = getattr(image, "chunks", None)
        image = da.from_array(image, chunks=chunks if isinstance(chunks, tuple) else -1)
    if getattr(method, "spatial_dims", 2) == 3:
        return _lazy_predict_3d(model, image, batch_size=batch_size, probabilities=probabilities, device=device)
    axis = model.axis
    c = image.shape[0]
    k = model.num_classes
    mask_dtype = np.dtype(np.uint8 if k <= 256 else np.uint16)
    # One slab = batch_size slices along the model's axis; whole along every other axis.
    slab = [-1] * 4
    slab[axis + 1] = batch_size
    image = image.rechunk(tuple(slab))
    handle = dask.delayed(ModelHandle(model, device), name=f"semiseg-model-{uuid.uuid4().hex}")
    kwargs = {
        "axis": axis,
        "outputs": tuple(outputs),
        "kinds": {o: method.outputs[o] for o in outputs},
        "probabilities": probabilities,
        "mask_dtype": mask_dtype,
    }
    name = f"semiseg-predict-{uuid.uuid4().hex}"
    if not probabilities and not outputs:
        mask = da.map_blocks(
            _predict_slab, image, handle, drop_axis=0, dtype=mask_dtype,
            chunks=image.chunks[1:], name=name, meta=np.empty((0,) * 3, mask_dtype), **kwargs,
        )
        return {"mask": mask}
    depth = k + c * len(outputs)
    stack = da.map_blocks(
        _predict_slab, image, handle, dtype=np.float32, chunks=((depth,), *image.chunks[1:]),
        name=name, meta=np.empty((0,) * 4, np.float32), **kwargs,
    )
    res = {"mask": stack[:k].argmax(axis=0).astype(mask_dtype)}
    if probabilities:
        res["probabilities"] = stack[:k]
    for i, o in enumerate(outputs):
        y = stack[k + i * c : k + (i + 1) * c]
        res[o] = y[0] if squeeze else y
    return res


def _predict_slab_3d(block, handle, *, keep, probabilities, mask_dtype):
    """Predict one slab (with its halo) of a 3D method; see :func:`semiseg.inference.slab_plan`."""
    from .inference import predict_block_3d

    model = handle.get()
    pred = predict_block_3d(model, block, keep)
    if not np.isfinite(pred["probabilities"]).all():
        from .engine import PredictionError

        raise PredictionError("the model produced non-finite values")
    done = _SLAB_DONE
    if done is not None:  # local schedulers: dask fuses these tasks, so they report themselves
        done()
    return pred["probabilities"] if probabilities else pred["mask"].astype(mask_dtype)


#: Called by every finished 3D slab while :func:`predict_to_zarr` runs on a local scheduler.
_SLAB_DONE: Callable[[], None] | None = None


def _lazy_predict_3d(model: Model, image, *, batch_size: int, probabilities: bool, device: str) -> dict:
    """:func:`lazy_predict` of a 3D method: one task per slab along the model's axis, each
    reading its slices plus a halo of the window depth (:func:`semiseg.inference.slab_plan`),
    so results equal :func:`semiseg.inference.predict_volume` with the same ``batch_size``."""
    import dask
    import dask.array as da

    from .inference import slab_plan

    method, axis = model.method, model.axis
    spatial = tuple(image.shape[1:])
    k = model.num_classes
    mask_dtype = np.dtype(np.uint8 if k <= 256 else np.uint16)
    window = method.window()
    depth = window[0] if window else method.patch_depth
    handle = dask.delayed(ModelHandle(model, device), name=f"semiseg-model-{uuid.uuid4().hex}")
    name = f"semiseg-predict-{uuid.uuid4().hex}"
    parts = []
    for i, (s, e, rs, re) in enumerate(slab_plan(spatial[axis], depth, batch_size)):
        idx = [slice(None)] * 4
        idx[axis + 1] = slice(rs, re)
        shape = list(spatial)
        shape[axis] = e - s
        task = dask.delayed(_predict_slab_3d)(
            image[tuple(idx)], handle, keep=(s - rs, e - rs), probabilities=probabilities,
            mask_dtype=mask_dtype, dask_key_name=f"{name}-{i}",
        )
        if probabilities:
            parts.append(da.from_delayed(task, shape=(k, *shape), dtype=np.float32))
        else:
            parts.append(da.from_delayed(task, shape=tuple(shape), dtype=mask_dtype))
    if not probabilities:
        return {"mask": da.concatenate(parts, axis=axis)}
    probs = da.concatenate(parts, axis=axis + 1)
    return {"mask": probs.argmax(axis=0).astype(mask_dtype), "probabilities": probs}


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
        Threads of the local threaded scheduler (default 2: one slab computes while another is
        read or written; the network's own ops use torch's intra-op threads).

    Raises
    ------
    InputError
        When the cluster cannot be reached or ``distributed`` is not installed.
    """
    if scheduler is None or scheduler == "threads":
        yield {"scheduler": "threads", "num_workers": num_workers or 2}
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
    """Local-scheduler callback: calls ``fn(done, total)`` as prediction tasks finish."""

    def __init__(self, prefix: str, total: int, fn: Callable[[int, int], None]):
        from dask.callbacks import Callback

        self.done = 0
        lock = threading.Lock()

        def posttask(key, result, dsk, state, worker_id):
            name = key[0] if isinstance(key, tuple) else key
            if isinstance(name, str) and name.startswith(prefix):
                with lock:
                    self.done += 1
                    fn(self.done, total)

        self.callback = Callback(posttask=posttask)


@contextlib.contextmanager
def _self_reported_progress(total: int, fn: Callable[[int, int], None]):
    """Count the 3D slabs that finish while the block runs (see :data:`_SLAB_DONE`)."""
    global _SLAB_DONE
    lock = threading.Lock()
    count = [0]

    def done():
        with lock:
            count[0] += 1
            fn(count[0], total)

    _SLAB_DONE = done
    try:
        yield
    finally:
        _SLAB_DONE = None


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

    from .io import _suffix, atomic_path

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
            local = progress is not None and not _is_client(kw["scheduler"])
            if local and getattr(model.method, "spatial_dims", 2) == 3:
                cb = _self_reported_progress(n_slabs, progress)
            elif local:
                cb = _SlabProgress("semiseg-predict-", n_slabs, progress).callback
            with cb:
                da.store(sources, targets, lock=False, **kw)
    finally:
        for k, n in model.method.nets.items():
            n.train(modes[k])
    return paths


def _is_client(obj) -> bool:
    return not isinstance(obj, str) and obj.__class__.__name__ == "Client"

