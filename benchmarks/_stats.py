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


def gap_share(method, baseline, bound, *, min_gap: float = 0.01, n_boot: int = 10_000):
    """Share of the baseline-to-bound gap a method recovers, paired by seed (Peng et al.).

    ``(mean(method) - mean(baseline)) / (mean(bound) - mean(baseline))`` over runs paired by
    seed (same volume, same budget), with a percentile-bootstrap 95 % interval that resamples
    seeds with a fixed generator (a resample whose gap is below ``min_gap`` has no share and
    is left out of the interval).

    Parameters
    ----------
    method, baseline, bound : array-like of float
        Scores of the same seeds, in the same order.
    min_gap : float
        A mean gap below this (including a zero or negative one: the bound does not beat the
        baseline) leaves nothing to recover: the share is undefined, never a division by ~0.

    Returns
    -------
    dict or None
        ``share``, ``low``, ``high`` and ``gap`` (the mean bound-minus-baseline), or None when
        the share is undefined.
    """
    m, b, f = (np.asarray(v, float) for v in (method, baseline, bound))
    if not (len(m) == len(b) == len(f)) or len(m) == 0:
        raise ValueError("method, baseline and bound need the same, non-zero number of paired runs")
    gain, gap = m - b, f - b
    if gap.mean() < min_gap:
        return None
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(m), size=(n_boot, len(m)))
    g, n = gap[idx].mean(1), gain[idx].mean(1)
    ok = g >= min_gap
    lo, hi = np.percentile(n[ok] / g[ok], [2.5, 97.5])
    return {"share": float(gain.mean() / gap.mean()), "low": float(lo), "high": float(hi), "gap": float(gap.mean())}
