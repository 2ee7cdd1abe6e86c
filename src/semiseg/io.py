"""Reading and writing volumes (TIFF, OME-TIFF, zarr v3, OME-Zarr level 0, .npy).

Every writer here is atomic: it writes to a temporary name in the destination folder and renames
it into place, so an interrupted write leaves any previous file intact.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "atomic_path",
    "atomic_paths",
    "read_volume",
    "write_volume",
    "write_volumes",
]

SUPPORTED_SUFFIXES = (".tif", ".tiff", ".zarr", ".npy")


def _suffix(path: Path) -> str:
    s = path.suffix.lower()
    if s == ".zarr" or path.name.lower().endswith(".ome.zarr"):
        return ".zarr"
    return s


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` when the block succeeds.

    Works for files and for directories (zarr stores). On error the temporary is removed and
    ``path`` is untouched. Files are flushed to disk (``fsync``) before the rename, so a crash
    or power loss leaves either the old or the new file, never a truncated one. Temporaries
    left by a killed process (``.NAME.tmp-PID-*``) are removed on the next write of ``path``.

    Raises
    ------
    InputError
        When the destination folder does not exist or is not writable.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder is not writable: {parent}")
    _recover(path, parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".tmp", dir=parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        if path.is_dir() and not path.is_symlink():
            # Directories cannot be replaced atomically: swap via a second rename so the old
            # store survives until the new one is complete (``_recover`` undoes a half swap).
            old = parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_paths(paths) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several outputs at once: all are replaced, or none.

    Every temporary is written before the first rename, so a failed write (full disk, bad
    data) leaves every destination untouched.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _recover(path: Path, parent: Path) -> None:
    """Clean up after a writer of ``path`` that was killed: stale temporaries, half swaps."""
    for stale in parent.glob(f".{glob.escape(path.name)}.*"):
        rest = stale.name[len(path.name) + 2 :]
        kind, _, tail = rest.partition("-")
        pid = tail.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            os.replace(stale, path)  # killed between the two renames of a folder swap
        elif stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


# ----------------------------------------------------------------------------- reading
def read_volume(path: str | Path, *, lazy: bool = False):
    """Read an image or label volume.

    Parameters
    ----------
    path : str or Path
        ``.tif``/``.tiff`` (OME-TIFF too), ``.npy``, or a ``.zarr`` store holding an array, an
        OME-Zarr multiscale group (level 0 is read) or a group with a single array.
    lazy : bool
        For zarr, return the zarr array itself instead of loading it into memory.

    Returns
    -------
    ndarray or zarr.Array

    Raises
    ------
    InputError
        For missing files, unknown suffixes and unreadable or corrupt files.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    suffix = _suffix(path)
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
            if arr.size == 0:  # tifffile logs and returns an empty array for broken files
                raise InputError(f"cannot read {path}: no image data (corrupt or truncated TIFF)")
            return arr
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".zarr":
            arr = open_zarr_array(path)
            return arr if lazy else arr[...]
    except InputError:
        raise
    except Exception as exc:  # corrupt files raise many different types
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    raise InputError(f"unsupported file type {path.suffix!r} (use {', '.join(SUPPORTED_SUFFIXES)})")


def open_zarr_array(path: str | Path):
    """Open a zarr array, the level 0 of an OME-Zarr image, or a group's only array."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return node
    attrs = dict(node.attrs)
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales")
    if multiscales:
        return node[multiscales[0]["datasets"][0]["path"]]
    arrays = list(node.array_keys())
    if len(arrays) == 1:
        return node[arrays[0]]
    raise InputError(f"{path}: zarr group holds {len(arrays)} arrays and no OME multiscales")


# ----------------------------------------------------------------------------- writing
def write_volume(
    path: str | Path,
    data,
    *,
    axes: str | None = None,
    chunks: tuple[int, ...] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``data`` to TIFF (OME-TIFF with axes), zarr v3 or .npy, atomically.

    Parameters
    ----------
    path : str or Path
        Destination; the suffix picks the format.
    data : array-like
        Numpy array (dask arrays are streamed into zarr chunk by chunk).
    axes : str, optional
        Axes letters for OME-TIFF metadata, e.g. ``"ZYX"``. Defaults by dimensionality.
    chunks : tuple of int, optional
        Zarr chunk shape; one slice per chunk by default.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The written path.

    Raises
    ------
    InputError
        For unsupported suffixes, existing files when ``overwrite`` is False, unwritable folders
        or a full disk.
    """
    return write_volumes([(path, data)], axes=axes, chunks=chunks, overwrite=overwrite)[0]


def write_volumes(items, *, axes: str | None = None, chunks=None, overwrite: bool = True) -> list[Path]:
    """Write several volumes all-or-nothing: ``items`` is a sequence of ``(path, data)``.

    Every file is written to a temporary first; only when all succeeded are they renamed into
    place, so a full disk or a bad array leaves every earlier file untouched. Arguments as in
    :func:`write_volume` (``axes`` applies to every item; None picks by dimensionality).

    Raises
    ------
    InputError
        As :func:`write_volume`; no destination is changed then.
    """
    items = [(Path(p), d) for p, d in items]
    for path, _ in items:
        if _suffix(path) not in SUPPORTED_SUFFIXES:
            raise InputError(
                f"unsupported output type {path.suffix!r} (use {', '.join(SUPPORTED_SUFFIXES)})"
            )
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists (pass overwrite to replace it)")
    if len({p.resolve() for p, _ in items}) != len(items):
        raise InputError("two outputs have the same path")
    try:
        with atomic_paths([p for p, _ in items]) as tmps:
            for (path, data), tmp in zip(items, tmps):
                _write_one(tmp, _suffix(path), data, axes, chunks)
    except OSError as exc:
        raise InputError(f"cannot write {_describe(items)}: {exc.strerror or exc}") from None
    except MemoryError:
        raise InputError(f"not enough memory to write {_describe(items)}") from None
    return [p for p, _ in items]


def _describe(items) -> str:
    return ", ".join(str(p) for p, _ in items)


def _write_one(tmp: Path, suffix: str, data, axes, chunks) -> None:
    ndim = len(data.shape)
    if axes is None or len(axes) != ndim:
        axes = {2: "YX", 3: "ZYX", 4: "CZYX"}.get(ndim, "Q" * (ndim - 3) + "ZYX")
    if suffix in (".tif", ".tiff"):
        import tifffile

        arr = np.asarray(data)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        tifffile.imwrite(tmp, arr, ome=True, metadata={"axes": axes}, photometric="minisblack")
    elif suffix == ".npy":
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(data), allow_pickle=False)
    else:
        _write_zarr(tmp, data, chunks)


def _write_zarr(path: Path, data, chunks):
    import zarr

    shape = tuple(data.shape)
    if chunks is None:
        chunks = (1,) * max(0, len(shape) - 2) + shape[-2:]
    dtype = np.dtype(data.dtype)
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    out = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=dtype, zarr_format=3)
    if hasattr(data, "dask"):
        import dask.array as da

        da.store(data.astype(dtype), out, lock=False)
    else:
        out[...] = np.asarray(data, dtype=dtype)

