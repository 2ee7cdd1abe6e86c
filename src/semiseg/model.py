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

from .data import InputError, Normaliser
from .methods import get_method
from .methods.base import Method

__all__ = ["FORMAT", "Model", "ModelFileError", "load_model"]

#: Marker stored in every model file.
FORMAT = "napari-semiseg-model"
FORMAT_VERSION = 1


class ModelFileError(InputError):
    """A file that is not a readable napari-semiseg model."""


@dataclasses.dataclass
class Model:
    """A method instance plus what prediction needs to match training.

    Attributes
    ----------
    method : Method
    normaliser : Normaliser
    axis : int
        Spatial slicing axis used in training.
    history : list of dict
        One record per training run: steps, losses, label budget, settings.
    """

    method: Method
    normaliser: Normaliser
    axis: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return self.method.in_channels

    @property
    def num_classes(self) -> int:
        return self.method.num_classes

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the weights)."""
        return {
            "method": self.method.name,
            "params": _jsonable(dataclasses.asdict(self.method.params)),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "normaliser": self.normaliser.to_dict(),
            "axis": self.axis,
            "tile_size": self.method.tile_size,
            # 3D methods: the (D, H, W) prediction window (absent from older files).
            "window_size": _window(self.method),
            "history": self.history,
        }

    def save(self, path: str | Path) -> Path:
        """Write the model to one file atomically and return its path."""
        from .io import atomic_path

        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.config()),
            "state": _to_cpu(self.method.state_dict()),
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
        method = method_cls(
            cfg["in_channels"], cfg["num_classes"], params=cfg["params"], device=device, amp=amp
        )
        try:
            method.load_state_dict(payload["state"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{path}: weights do not fit the model ({str(exc)[:200]})") from None
        try:
            method.tile_size = _tile_size(cfg)
            window = cfg.get("window_size")
            if window is not None:
                if len(window) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window):
                    raise ValueError(f"window_size must be three integers >= 1, got {window!r}")
                method.window_size = tuple(window)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: damaged model configuration ({exc})") from None
        return cls(method, Normaliser.from_dict(cfg["normaliser"]), cfg["axis"], cfg["history"])

    def predict(self, image, **kwargs):
        """Predict a whole volume; see :func:`semiseg.inference.predict_volume`."""
        from .inference import predict_volume

        return predict_volume(self, image, **kwargs)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> Model:
    """Load a model file; see :meth:`Model.load`."""
    return Model.load(path, device=device)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _window(method: Method) -> list[int] | None:
    window = getattr(method, "window_size", None)
    return None if window is None else [int(w) for w in window]


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
