"""Which device computations run on."""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["resolve_device"]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else MPS, else CPU; errors for unavailable devices.

    Raises
    ------
    InputError
        When CUDA or MPS is asked for but not available.
    """
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available")
    if dev.type == "mps" and not _mps_available():
        raise InputError("MPS was requested but is not available")
    return dev
