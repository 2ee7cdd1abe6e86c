"""Residual colour limits symmetric around zero (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.napari._display import difference_limits


def test_limits_are_symmetric_around_zero_for_a_lopsided_residual():
    rng = np.random.default_rng(0)
    residual = np.abs(rng.normal(0, 5, (4, 32, 32))).astype(np.float32) + 3  # all positive
    residual[0, 0, 0] = 1e4  # one outlier must not set the scale
    lo, hi = difference_limits(residual)
    assert lo == -hi and hi > 0
    assert hi < 100
    assert hi == pytest.approx(np.percentile(np.abs(residual), 99.5), rel=1e-5)


def test_negative_residual_and_degenerate_inputs():
    lo, hi = difference_limits(-np.linspace(0, 10, 1000).reshape(10, 10, 10))
    assert lo == -hi and hi > 9
    assert difference_limits(np.zeros((2, 4, 4))) == (-1.0, 1.0)
    assert difference_limits(np.full((2, 4, 4), np.nan)) == (-1.0, 1.0)


def test_lazy_input_reads_a_subsample():
    da = pytest.importorskip("dask.array")
    data = da.from_array(np.linspace(-2, 2, 200 * 64 * 64).reshape(200, 64, 64), chunks=(1, 64, 64))
    lo, hi = difference_limits(data, max_values=64 * 64 * 10)
    assert lo == -hi and 1.5 < hi <= 2.0
