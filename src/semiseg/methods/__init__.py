"""Training methods behind one interface (:class:`~semiseg.methods.base.Method`).

Each built-in method lives in its own module and registers itself on import; the registry
imports them on first use so ``import semiseg`` stays light.
"""

from __future__ import annotations

import importlib

from .base import Method, MethodParams, get_method, list_methods, register_method

__all__ = ["Method", "MethodParams", "get_method", "list_methods", "register_method"]

#: Built-in method modules, in the order the CLI and the widget list them.
BUILTIN_MODULES = (
    "supervised",
    "autoencoder",
    "mean_teacher",
    "entropy_min",
    "mutual_info",
    "translation",
    "cyclegan",
    "pyramid_gan",
    "semantic_gan",
    "unet3d",
)

_loaded = False


def _load_builtin_methods() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{mod}")
