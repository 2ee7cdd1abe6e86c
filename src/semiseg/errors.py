"""The package's error classes and the helpers that classify and report faults.

Every module raises these; none of them imports anything else from the package, so any module
can import them without a circle.

- :class:`InputError` -- bad user input (shape, dtype, empty labels, unreadable file): the CLI
  exits 2 with its one-line message.
- :class:`ModelFileError` -- a file that is not a readable napari-semiseg model (an
  :class:`InputError`).
- :class:`TrainingError` -- training stopped on a fault; the model keeps its last good weights.
- :class:`PredictionError` -- prediction stopped on a fault; nothing was written.
"""

from __future__ import annotations

import torch

__all__ = [
    "InputError",
    "ModelFileError",
    "PredictionError",
    "TrainingError",
    "first_line",
    "is_out_of_memory",
]


class InputError(ValueError):
    """Raised for user input that cannot be used (wrong shape, dtype, empty labels, ...)."""


class ModelFileError(InputError):
    """A file that is not a readable napari-semiseg model."""


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss, out of memory); the model keeps its last
    good weights."""


class PredictionError(TrainingError):
    """Prediction stopped on a fault (out of memory even one slice at a time, non-finite
    output, an error in the network); nothing was written."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports exhausted GPU or host memory."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened for one-line reports."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:limit]
