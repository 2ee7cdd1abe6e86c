"""npe2 writers: a labels layer to zarr (v3, one slice per chunk) or (OME-)TIFF.

Both go through :func:`semiseg.io.write_volume` (atomic) and return the paths written.
"""

from __future__ import annotations

from typing import Any

from ..io import write_volume


def write_labels_zarr(path: str, data: Any, meta: dict) -> list[str]:
    """Write labels ``data`` to a zarr store at ``path``; returns ``[path]``."""
    return [str(write_volume(path, data))]


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """Write labels ``data`` to an OME-TIFF at ``path``; returns ``[path]``."""
    return [str(write_volume(path, data))]
