"""Reading and writing volumes (TIFF, OME-TIFF, zarr v3, OME-Zarr level 0, .npy).

Every writer here is atomic: it writes to a temporary name in the destination folder and renames
it into place, so an interrupted write leaves any previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .data import InputError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "atomic_path",
    "read_volume",
    "write_volume",
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
    ``path`` is untouched.

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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            # Directories cannot be replaced atomically: swap via a second rename so the old
            # store survives until the new one is complete.
            old = parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


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

            return tifffile.imread(path)
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
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(f"unsupported output type {path.suffix!r} (use {', '.join(SUPPORTED_SUFFIXES)})")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists (pass overwrite to replace it)")
    ndim = len(data.shape)
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "CZYX"}.get(ndim, "Q" * (ndim - 3) + "ZYX")
    try:
        with atomic_path(path) as tmp:
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
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


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

