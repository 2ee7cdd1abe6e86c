"""Statistics shared by the benchmark reports."""

from __future__ import annotations

import numpy as np


def paired_difference(a, b, n_boot: int = 10_000) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired runs (seeds) with a percentile-bootstrap 95 % interval.

    The bootstrap resamples seeds with a fixed generator, so a report is reproducible.

    Returns
    -------
    mean, low, high : float
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(0)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)
