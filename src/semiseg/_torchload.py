"""Imported first by ``semiseg/__init__``: loads torch through
:func:`semiseg.threads.import_torch` (the passive OpenMP wait policy) before any other module of
the package imports it. OpenMP reads its wait policy once, when torch's runtime loads."""

from .threads import import_torch

torch = import_torch()
