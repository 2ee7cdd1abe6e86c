"""A trained model: a method with its normalisation and metadata, saved as one safe file.

The file is a ``torch.save`` archive of tensors and plain Python types only, read back with
``torch.load(weights_only=True)``, which refuses anything that would execute code on load.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Normaliser
from .errors import InputError, ModelFileError
from .inference import predict_volume
from .io import atomic_path
from .methods import get_method
from .methods.base import Method, state_to_cpu

__all__ = ["FORMAT", "Model", "ModelFileError", "load_model"]  # ModelFileError: from .errors

#: Marker stored in every model file.
FORMAT = "napari-semiseg-model"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Model:
    """A method instance plus what prediction needs to match training.

    The model owns the prediction settings (``normaliser``, ``axis``, ``tile_size``,
    ``context``): training
    sets them, model files keep them (:meth:`config`, :meth:`load`) and prediction
    (:mod:`semiseg.inference`, :mod:`semiseg.lazy`, :mod:`semiseg.suggest`) reads them from
    here. A new setting is one more field with a default, written by :meth:`config` under its
    own key and read by :func:`_prediction_settings` with that default for older files.

    Attributes
    ----------
    method : Method
    normaliser : Normaliser
        Maps raw intensities to the network's range.
    axis : int
        Spatial slicing axis used in training.
    history : list of dict
        One record per training run: steps, losses, label budget, settings.
    tile_size : int or None
        Side of the square windows prediction slides over slices larger than it (the
        training crop; see :meth:`~semiseg.methods.base.Method.prediction_window`); ``None``
        predicts every slice whole.
    window_size : (D, H, W) tuple of int or None
        3D methods (``spatial_dims == 3``): the window prediction slides over a slab (the
        training patch: depth along ``axis``, then the crop); ``None`` uses
        ``(patch_depth, tile_size, tile_size)``. See :meth:`volume_window`.
    context : int
        Neighbouring slices on each side that the network sees with every slice (2.5D input,
        :func:`semiseg.data.context_indices`): its networks take ``in_channels * (2 context + 1)``
        channels. Fixed once trained; files written before it was stored load with 0.
    """

    method: Method
    normaliser: Normaliser
    axis: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tile_size: int | None = None
    window_size: tuple[int, int, int] | None = None
    context: int = 0

    @property
    def in_channels(self) -> int:
        """Channels of the image (the network takes ``in_channels * (2 context + 1)``)."""
        return self.method.in_channels // (2 * self.context + 1)

    @property
    def num_classes(self) -> int:
        return self.method.num_classes

    def volume_window(self) -> tuple[int, int, int] | None:
        """``(D, H, W)`` windows a 3D method predicts slabs in, or ``None`` to predict whole
        slabs (``tile_size`` is ``None``, as 2D methods then predict whole slices)."""
        if not self.tile_size:
            return None
        if self.window_size is not None:
            return tuple(int(s) for s in self.window_size)
        return (int(self.method.patch_depth), int(self.tile_size), int(self.tile_size))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the weights)."""
        return {
            "method": self.method.name,
            "params": _jsonable(dataclasses.asdict(self.method.params)),
            "in_channels": self.method.in_channels,
            "num_classes": self.num_classes,
            "normaliser": self.normaliser.to_dict(),
            "axis": self.axis,
            "tile_size": self.tile_size,
            # 3D methods: the (D, H, W) prediction window (absent from older files).
            "window_size": None if self.window_size is None else [int(w) for w in self.window_size],
            "context": self.context,
            "history": self.history,
        }

    def save(self, path: str | Path) -> Path:
        """Write the model to one file atomically and return its path."""
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.config()),
            "state": state_to_cpu(self.method.state_dict()),
        }
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", amp: bool = True) -> Model:
        """Read a model file written by :meth:`save`.

        Raises
        ------
        ModelFileError
            For files that are missing, corrupt, not ours, or would run code when unpickled.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"no such model file: {path}")
        if not zipfile.is_zipfile(path):
            # Every file Model.save writes is a torch zip archive; anything else is not ours.
            raise ModelFileError(f"{path} is not a napari-semiseg model file")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelFileError(
                f"{path} is not a safe napari-semiseg model (refused to unpickle: "
                f"{str(exc).splitlines()[0][:200]})"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ModelFileError(f"{path} is not a napari-semiseg model file ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ModelFileError(f"{path} is not a napari-semiseg model file")
        if payload.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFileError(f"{path} was written by a newer napari-semiseg")
        try:
            cfg = json.loads(payload["config"])
            method_cls = get_method(cfg["method"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path}: damaged model configuration ({exc})") from None
        # Files of older versions may store hyperparameters since replaced: dropped here.
        params = {k: v for k, v in cfg["params"].items() if k not in method_cls.retired_params}
        # ... and lack those added since, which then mean what that version did.
        params = {**method_cls.legacy_params, **params}
        method = method_cls(cfg["in_channels"], cfg["num_classes"], params=params, device=device, amp=amp)
        try:
            method.load_state_dict(payload["state"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{path}: weights do not fit the model ({str(exc)[:200]})") from None
        try:
            settings = _prediction_settings(cfg)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: damaged model configuration ({exc})") from None
        return cls(method, history=cfg["history"], **settings)

    def predict(self, image, **kwargs):
        """Predict a whole volume; see :func:`semiseg.inference.predict_volume`."""
        return predict_volume(self, image, **kwargs)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> Model:
    """Load a model file; see :meth:`Model.load`."""
    return Model.load(path, device=device)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _prediction_settings(cfg: dict) -> dict[str, Any]:
    """The :class:`Model` prediction settings stored in a model file's configuration."""
    return {
        "normaliser": Normaliser.from_dict(cfg["normaliser"]),
        "axis": cfg["axis"],
        "tile_size": _tile_size(cfg),
        "window_size": _window_size(cfg),
        "context": _context(cfg),
    }


def _window_size(cfg: dict) -> tuple[int, int, int] | None:
    """``(D, H, W)`` prediction window of a 3D model (``None``: absent, as in older files)."""
    window = cfg.get("window_size")
    if window is None:
        return None
    if len(window) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window):
        raise ValueError(f"window_size must be three integers >= 1, got {window!r}")
    return tuple(window)


def _tile_size(cfg: dict) -> int | None:
    """Prediction window of a saved model; files written before it was stored use the crop of
    their last training run."""
    if "tile_size" in cfg:
        tile = cfg["tile_size"]
    else:
        crops = [(run.get("config") or {}).get("crop") for run in cfg.get("history") or []]
        tile = next((c for c in reversed(crops) if c), None)
    if tile is None:
        return None
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 8:
        raise ValueError(f"tile_size must be an integer >= 8, got {tile!r}")
    return tile


def _context(cfg: dict) -> int:
    """Slice context of a saved model; files written before it was stored have none (0)."""
    context = cfg.get("context", 0)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be an integer >= 0, got {context!r}")
    if cfg["in_channels"] % (2 * context + 1):
        raise ValueError(f"{cfg['in_channels']} network channels do not fit context {context}")
    return context
