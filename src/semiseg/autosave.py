"""Autosave of labels and weak tags to a sidecar store, written by a background thread.

Pure Python (no Qt): the napari widget (``semiseg.napari._autosave``) and scripts use it alike.

The store is a zarr folder, by default beside the image (``<image>.semiseg-autosave.zarr``) or
in a folder the user picks (``<folder>/<image stem>-<hash>.semiseg-autosave.zarr``)::

    store.zarr/
        zarr.json                  zarr v3 group
        labels/                    (Z, Y, X) labels, one chunk per slice
        semiseg-autosave.json      image identity (path, shape, dtype, cheap hash), weak tags,
                                   time of the last save

Writes are atomic file by file: every chunk and the JSON are written to a temporary name and
renamed (zarr v3's local store does this for chunks), and a first save or a change of shape
builds a new store beside the old one and swaps it in. A killed process therefore leaves each
slice either as it was at the previous save or at the new one, never a torn file.

:class:`Autosaver` never blocks its caller beyond copying what changed: :meth:`Autosaver.submit`
copies the changed slices (or the whole labels array when it is small) and returns; a thread
writes them after a quiet period (``debounce``) and at least every ``interval`` seconds while
changes keep coming.

>>> saver = Autosaver.for_image(image, image_path="scan.tif")      # doctest: +SKIP
>>> saver.submit(labels, tags, changed=[12])                         # doctest: +SKIP
>>> found = find_autosave("scan.tif")                                # doctest: +SKIP
>>> labels, tags, meta = restore(found.path)                         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import glob
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import atomic_path

__all__ = [
    "AutosaveInfo",
    "Autosaver",
    "default_store_path",
    "find_autosave",
    "image_identity",
    "restore",
]

META_NAME = "semiseg-autosave.json"
SUFFIX = ".semiseg-autosave.zarr"
FORMAT = "napari-semiseg-autosave"
#: Labels up to this many bytes are copied whole on every submit (cheap, and simplest).
SMALL_BYTES = 32 * 2**20


# ----------------------------------------------------------------------------- identity
def cheap_hash(image, *, n_slices: int = 4, side: int = 128) -> str:
    """A fast fingerprint of an image: shape, dtype and a few strided slices (sha1, 16 hex).

    Reads at most ``n_slices`` slices of a lazy (zarr, dask) image, so it costs milliseconds
    for any size. Two images that differ only outside the sampled pixels get the same hash;
    that is fine for recognising "the same image" again.
    """
    shape = tuple(int(s) for s in image.shape)
    h = hashlib.sha1(f"{shape}|{np.dtype(image.dtype).str}".encode())
    if len(shape) >= 3 and shape[0] > 0:
        idx = np.unique(np.linspace(0, shape[0] - 1, min(shape[0], n_slices)).round().astype(int))
        steps = tuple(max(1, s // side) for s in shape[1:])
        for i in idx:
            sl = (int(i), *(slice(None, None, st) for st in steps))
            h.update(np.ascontiguousarray(np.asarray(image[sl])).tobytes())
    elif shape:
        steps = tuple(max(1, s // side) for s in shape)
        h.update(np.ascontiguousarray(np.asarray(image[tuple(slice(None, None, st) for st in steps)])).tobytes())
    return h.hexdigest()[:16]


def image_identity(image, path: str | Path | None = None) -> dict:
    """``{"path", "name", "shape", "dtype", "hash"}`` of an image (see :func:`cheap_hash`)."""
    return {
        "path": str(Path(path).resolve()) if path else None,
        "name": Path(path).name if path else None,
        "shape": [int(s) for s in image.shape],
        "dtype": np.dtype(image.dtype).str,
        "hash": cheap_hash(image),
    }


def default_store_path(identity: dict, folder: str | Path | None = None) -> Path:
    """Where the autosave of an image goes.

    Beside the image (``<image>.semiseg-autosave.zarr``) when ``folder`` is None and the image
    has a path; otherwise ``<folder>/<stem>-<hash>.semiseg-autosave.zarr``.

    Raises
    ------
    InputError
        When neither a folder nor an image path is known.
    """
    if folder is None:
        if not identity.get("path"):
            raise InputError("the image has no file: choose an autosave folder")
        p = Path(identity["path"])
        return p.with_name(p.name + SUFFIX)
    stem = Path(identity.get("name") or "image").name.split(".")[0] or "image"
    return Path(folder) / f"{stem}-{identity['hash'][:8]}{SUFFIX}"


# ----------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class AutosaveInfo:
    """A found autosave: its store, when it was written, and the image it belongs to."""

    path: Path
    saved_at: str
    identity: dict
    labels_shape: tuple
    exact: bool
    """True when the image hash matches too (not only the path or the shape)."""


def _read_meta(store: Path) -> dict | None:
    try:
        meta = json.loads((store / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _info(store: Path, meta: dict, identity: dict | None) -> AutosaveInfo:
    ident = meta.get("identity", {})
    exact = identity is not None and ident.get("hash") == identity.get("hash")
    return AutosaveInfo(store, meta.get("saved_at", ""), ident, tuple(meta.get("labels_shape", ())), exact)


def find_autosave(image_or_identity, folder: str | Path | None = None) -> AutosaveInfo | None:
    """Find the autosave of an image.

    Parameters
    ----------
    image_or_identity : str, Path or dict
        The image's path (its sidecar store is looked up) or an identity from
        :func:`image_identity` (the sidecar of its path, then every store in ``folder`` whose
        image hash, or failing that path and shape, matches).
    folder : str or Path, optional
        A user-chosen autosave folder to search too.

    Returns
    -------
    AutosaveInfo or None
        The newest match; stores whose labels shape differs from the image are ignored.
    """
    identity = image_or_identity if isinstance(image_or_identity, dict) else None
    path = identity.get("path") if identity else str(Path(image_or_identity).resolve())
    candidates: list[Path] = []
    if path:
        p = Path(path)
        # The sidecar, and earlier sessions' stores kept beside it (``<image>.kept-*``).
        candidates.append(p.with_name(p.name + SUFFIX))
        if p.parent.is_dir():
            candidates += sorted(p.parent.glob(f"{glob.escape(p.name)}.kept-*{SUFFIX}"))
    if folder is not None and Path(folder).is_dir():
        candidates += sorted(Path(folder).glob(f"*{SUFFIX}"))
    found = []
    for store in candidates:
        meta = _read_meta(store)
        if meta is None:
            continue
        ident = meta.get("identity", {})
        if identity is not None:
            if list(meta.get("labels_shape", [])) != _spatial(identity["shape"]):
                continue
            same_hash = ident.get("hash") == identity.get("hash")
            same_path = bool(path) and ident.get("path") == path
            if not (same_hash or same_path):
                continue
        elif ident.get("path") not in (None, path):
            continue
        found.append(_info(store, meta, identity))
    if not found:
        return None
    return max(found, key=lambda i: (i.exact, i.saved_at, ".kept-" not in i.path.name))


def _spatial(shape) -> list[int]:
    """Labels shape of an image shape: a leading channel axis of a 4D image is dropped."""
    shape = [int(s) for s in shape]
    return shape[1:] if len(shape) == 4 else shape


def restore(store: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read an autosave: ``(labels, tags, meta)``; ``tags`` is None when none were saved.

    Raises
    ------
    InputError
        When the store is missing or damaged.
    """
    import zarr

    store = Path(store)
    meta = _read_meta(store)
    if meta is None:
        raise InputError(f"{store} is not a napari-semiseg autosave")
    try:
        labels = np.asarray(zarr.open_array(str(store / "labels"), mode="r")[...])
    except Exception as exc:
        raise InputError(f"cannot read the autosaved labels in {store}: {type(exc).__name__}: {exc}") from None
    if list(labels.shape) != list(meta.get("labels_shape", labels.shape)):
        raise InputError(f"{store}: autosaved labels have shape {labels.shape}, expected {meta['labels_shape']}")
    tags = meta.get("tags")
    return labels, (None if tags is None else np.asarray(tags, dtype=np.int8)), meta


# ----------------------------------------------------------------------------- writing
def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="milliseconds")


def _write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())


class Autosaver:
    """Background, debounced, atomic autosave of one image's labels and weak tags.

    Parameters
    ----------
    store : str or Path
        The zarr folder to write (see :func:`default_store_path`).
    identity : dict
        From :func:`image_identity`; stored so :func:`find_autosave` can match the image.
    debounce : float
        Seconds without changes before a save.
    interval : float
        Longest delay of a save while changes keep coming (seconds).
    small_bytes : int
        Labels up to this size are copied whole on every submit; larger ones need ``changed``.
    on_saved : callable, optional
        ``on_saved(when: str)`` after each successful save (called from the writer thread).
    retry_delay : float
        Seconds before a failed save (full disk, folder gone) is tried again.
    on_error : callable, optional
        ``on_error(message: str)`` when a save fails; the pending data is kept and retried.

    Notes
    -----
    The thread is a daemon; call :meth:`close` (or :meth:`flush`) to make sure the last
    changes are written before exiting.
    """

    def __init__(
        self,
        store: str | Path,
        identity: dict,
        *,
        debounce: float = 2.0,
        interval: float = 60.0,
        small_bytes: int = SMALL_BYTES,
        retry_delay: float = 5.0,
        on_saved: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        self.store = Path(store)
        self.identity = dict(identity)
        self.debounce = float(debounce)
        self.interval = float(interval)
        self.small_bytes = int(small_bytes)
        self.retry_delay = float(retry_delay)
        self.on_saved = on_saved
        self.on_error = on_error
        self.last_saved: str | None = None
        self.last_error: str | None = None
        self.saves = 0
        self._cv = threading.Condition()
        self._full: np.ndarray | None = None
        self._slices: dict[int, np.ndarray] = {}
        self._shape: tuple | None = None
        self._dtype = None
        self._tags: np.ndarray | None = None
        self._have_tags = False
        self._first_change: float | None = None
        self._last_change = 0.0
        self._writing = False
        self._attempts = 0
        self._session_wrote = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="semiseg-autosave", daemon=True)
        self._thread.start()

    @classmethod
    def for_image(cls, image, *, image_path=None, folder=None, **kwargs) -> Autosaver:
        """An autosaver for ``image`` with its store at :func:`default_store_path`."""
        identity = image_identity(image, image_path)
        return cls(default_store_path(identity, folder), identity, **kwargs)

    # -------------------------------------------------------------- caller side
    @property
    def pending(self) -> bool:
        """Whether submitted changes are not written yet."""
        with self._cv:
            return self._full is not None or bool(self._slices) or self._have_tags or self._writing

    def submit(self, labels, tags=None, *, changed: Iterable[int] | None = None) -> None:
        """Queue the current labels (and tags) for saving; returns after copying them.

        Parameters
        ----------
        labels : (Z, Y, X) or (Y, X) array
        tags : (Z,) array of {-1, 0, 1}, optional
        changed : iterable of int, optional
            Slices (along axis 0) that changed since the last submit. When given and the
            labels are large, only these are copied; otherwise the whole array is copied.
        """
        if self._closed:
            raise RuntimeError("autosaver is closed")
        labels_shape = tuple(labels.shape)
        whole = (
            changed is None
            or len(labels_shape) < 3
            or labels.nbytes <= self.small_bytes
            or labels_shape != self._shape
            or np.dtype(labels.dtype) != self._dtype
        )
        copy = np.array(labels, copy=True) if whole else None
        parts = {} if whole else {int(i): np.array(labels[int(i)], copy=True) for i in set(changed)}
        tag_copy = None if tags is None else np.array(tags, dtype=np.int8, copy=True)
        with self._cv:
            if whole:
                self._full, self._slices = copy, {}
                self._shape, self._dtype = labels_shape, np.dtype(labels.dtype)
            elif self._full is not None:
                for i, a in parts.items():
                    self._full[i] = a
            else:
                self._slices.update(parts)
            if tags is not None:
                self._tags, self._have_tags = tag_copy, True
            now = time.monotonic()
            self._last_change = now
            if self._first_change is None:
                self._first_change = now
            self._cv.notify_all()

    def submit_tags(self, tags) -> None:
        """Queue only the weak tags."""
        with self._cv:
            self._tags, self._have_tags = np.array(tags, dtype=np.int8, copy=True), True
            now = time.monotonic()
            self._last_change = now
            if self._first_change is None:
                self._first_change = now
            self._cv.notify_all()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write pending changes now and wait for them; True when nothing is pending after."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            attempts = self._attempts
            if self._first_change is not None:
                self._first_change = -1e18  # due now
                self._cv.notify_all()
            while self._full is not None or self._slices or self._have_tags or self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._attempts > attempts and self.last_error and not self._writing:
                    return False  # the write failed; the data stays queued for a retry
                self._cv.wait(0.05 if left is None else min(left, 0.05))
        return self.last_error is None

    @contextlib.contextmanager
    def between_writes(self, timeout: float | None = 30.0):
        """Hold the writer between two writes while the block runs.

        Waits (up to ``timeout`` seconds) for a write in progress, then starts none until the
        block ends, so a reader never meets the store mid-swap: a new session's first write
        moves the earlier session's store aside before it renames its own in, and a search in
        between finds neither (:func:`find_autosave` returned None under load). Changes
        submitted meanwhile are kept and written after the block.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(0.05 if left is None else min(left, 0.05))
            yield self

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush, then stop the thread; True when everything was written."""
        ok = self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        return ok

    # -------------------------------------------------------------- writer thread
    def _due(self, now: float) -> float | None:
        """Seconds until the next save is due (<= 0: now), or None when nothing is pending."""
        if self._first_change is None:
            return None
        return min(self._last_change + self.debounce, self._first_change + self.interval) - now

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed and (self._first_change is None or self.last_error):
                        return
                    wait = self._due(time.monotonic())
                    if wait is not None and (wait <= 0 or self._closed):
                        break
                    self._cv.wait(wait if wait is not None else 1.0)
                full, slices, tags, have_tags = self._full, self._slices, self._tags, self._have_tags
                shape, dtype = self._shape, self._dtype
                self._full, self._slices, self._have_tags = None, {}, False
                self._first_change = None
                self._writing = True
            try:
                self._write(full, slices, tags if have_tags else None, shape, dtype)
            except Exception as exc:
                msg = f"autosave to {self.store} failed: {type(exc).__name__}: {exc}"
                with self._cv:
                    # Keep what failed for the next try (newer submits win).
                    if self._full is None and not self._slices:
                        self._full, self._slices = full, slices
                    elif self._full is None and full is None:
                        self._slices = {**slices, **self._slices}
                    if have_tags and not self._have_tags:
                        self._tags, self._have_tags = tags, True
                    if self._first_change is None and (full is not None or slices or have_tags):
                        now = time.monotonic()
                        self._first_change, self._last_change = now, now + max(self.debounce, self.retry_delay)
                    self.last_error = msg
                    self._attempts += 1
                    self._writing = False
                    self._cv.notify_all()
                if self.on_error is not None:
                    with contextlib.suppress(Exception):
                        self.on_error(msg)
                continue
            when = _now()
            with self._cv:
                self.last_saved, self.last_error = when, None
                self.saves += 1
                self._attempts += 1
                self._writing = False
                self._cv.notify_all()
            if self.on_saved is not None:
                with contextlib.suppress(Exception):
                    self.on_saved(when)

    def _meta(self, shape, dtype, tags) -> dict:
        old = _read_meta(self.store) or {}
        return {
            "format": FORMAT,
            "version": 1,
            "identity": self.identity,
            "labels_shape": list(shape),
            "labels_dtype": np.dtype(dtype).str,
            "tags": tags.tolist() if tags is not None else old.get("tags"),
            "saved_at": _now(),
        }

    def _write(self, full, slices, tags, shape, dtype) -> None:
        import zarr

        meta_old = _read_meta(self.store)
        if meta_old is not None and not self._session_wrote:
            # An earlier session's autosave: never overwrite it, keep it beside the new one.
            self._keep_previous(meta_old)
            meta_old = None
        fits = (
            meta_old is not None
            and list(meta_old.get("labels_shape", [])) == list(shape or [])
            and meta_old.get("labels_dtype") == (np.dtype(dtype).str if dtype is not None else None)
        )
        if full is not None and not fits:
            # New store (first save, or the labels changed shape): build it aside, swap it in.
            with atomic_path(self.store) as tmp:
                zarr.open_group(str(tmp), mode="w", zarr_format=3)
                chunks = (1,) * max(0, full.ndim - 2) + full.shape[-2:]
                arr = zarr.create_array(
                    str(tmp / "labels"), shape=full.shape, chunks=chunks, dtype=full.dtype, zarr_format=3
                )
                arr[...] = full
                _write_json_atomic(tmp / META_NAME, self._meta(full.shape, full.dtype, tags))
            self._session_wrote = True
            return
        if meta_old is None:
            if tags is None and not slices:
                return
            raise InputError(f"{self.store}: no autosave to update yet (submit the whole labels first)")
        arr = zarr.open_array(str(self.store / "labels"), mode="r+")
        if full is not None:
            # Same shape: rewrite only the slices that differ (each chunk file is replaced
            # atomically by zarr's local store).
            if full.ndim >= 3:
                for i in range(full.shape[0]):
                    if not np.array_equal(arr[i], full[i]):
                        arr[i] = full[i]
            else:
                arr[...] = full
        for i, a in slices.items():
            arr[i] = a
        _write_json_atomic(self.store / META_NAME, self._meta(arr.shape, arr.dtype, tags))
        self._session_wrote = True

    def _keep_previous(self, meta_old: dict) -> None:
        stamp = "".join(c for c in meta_old.get("saved_at", "") if c.isdigit()) or "old"
        base = self.store.name[: -len(SUFFIX)] if self.store.name.endswith(SUFFIX) else self.store.name
        kept = self.store.with_name(f"{base}.kept-{stamp}{SUFFIX}")
        n = 1
        while kept.exists():
            n += 1
            kept = self.store.with_name(f"{base}.kept-{stamp}-{n}{SUFFIX}")
        os.replace(self.store, kept)
