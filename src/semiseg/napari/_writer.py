"""npe2 writers: a labels layer to zarr (v3, one slice per chunk) or (OME-)TIFF.

Both go through :func:`semiseg.io.write_volume` (atomic) and return the paths written. A zarr
mask also records that it is a labels layer (:data:`LAYER_TYPE_ATTR` in the array's
attributes), which our reader (:mod:`._reader`) reads back, so a mask re-opens as Labels
whatever its file name; a TIFF has no such place and re-opens as Labels by its name (the
Train dock's Export names it ``...-mask.tif``).
"""

from __future__ import annotations

from typing import Any

from ..io import write_volume

#: Key of the zarr attribute that says which napari layer type the array is.
LAYER_TYPE_ATTR = "napari_layer_type"


def write_labels_zarr(path: str, data: Any, meta: dict) -> list[str]:
    """Write labels ``data`` to a zarr store at ``path``; returns ``[path]``."""
    import zarr

    written = write_volume(path, data)
    zarr.open_array(str(written), mode="r+").attrs[LAYER_TYPE_ATTR] = "labels"
    return [str(written)]


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """Write labels ``data`` to an OME-TIFF at ``path``; returns ``[path]``."""
    return [str(write_volume(path, data))]
