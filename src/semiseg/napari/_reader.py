"""npe2 reader: TIFF, zarr (array or OME-Zarr level 0, opened lazily) and ``.npy``.

Integer volumes whose file name contains ``label``, ``mask`` or ``seg``, and zarr arrays our
writer marked as labels (:data:`._writer.LAYER_TYPE_ATTR`), open as a Labels layer (loaded
into memory so they can be painted); everything else opens as an Image. Zarr images stay lazy:
napari receives a dask array over the store and reads only the slices it shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import SUPPORTED_SUFFIXES, _suffix, open_zarr_array, read_volume

LABEL_WORDS = ("label", "mask", "seg")


def napari_get_reader(path):
    """Return :func:`read` when ``path`` is one existing file we can read, else ``None``.

    Never raises: napari tries other readers when this returns ``None``.
    """
    try:
        if isinstance(path, list | tuple):
            if len(path) != 1:
                return None
            path = path[0]
        p = Path(path)
        if _suffix(p) not in SUPPORTED_SUFFIXES or not p.exists():
            return None
        if _suffix(p) == ".zarr":
            open_zarr_array(p)  # unreadable stores fall through to other readers
        return read
    except Exception:
        return None


def _is_labels(path: Path, dtype, attrs=None) -> bool:
    from ._writer import LAYER_TYPE_ATTR

    if np.dtype(dtype).kind not in "ui":
        return False
    if attrs is not None and attrs.get(LAYER_TYPE_ATTR) == "labels":
        return True
    name = path.name.lower()
    return any(w in name for w in LABEL_WORDS)


def read(path) -> list[tuple]:
    """Read one volume as a napari LayerData tuple.

    Returns
    -------
    list of (data, meta, layer_type)
    """
    if isinstance(path, list | tuple):
        path = path[0]
    p = Path(path)
    name = p.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif", ".npy"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if _suffix(p) == ".zarr":
        import dask.array as da

        arr = open_zarr_array(p)
        if _is_labels(p, arr.dtype, dict(arr.attrs)):
            return [(np.asarray(arr[...]), {"name": name}, "labels")]
        return [(da.from_zarr(arr), {"name": name}, "image")]
    data = read_volume(p)
    layer_type = "labels" if _is_labels(p, data.dtype) else "image"
    return [(data, {"name": name}, layer_type)]
