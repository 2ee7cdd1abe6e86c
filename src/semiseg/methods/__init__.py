"""Training methods behind one interface (:class:`~semiseg.methods.base.Method`).

Each built-in method lives in its own module and registers itself on import; the registry
(in :mod:`semiseg.methods.base`) imports them on first use so ``import semiseg`` stays light.
"""

from __future__ import annotations

from .base import BUILTIN_MODULES, Method, MethodParams, get_method, list_methods, register_method

__all__ = ["BUILTIN_MODULES", "Method", "MethodParams", "get_method", "list_methods", "register_method"]
