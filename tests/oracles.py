"""Oracles shared by the test files (imported like ``cuda_support``)."""
from __future__ import annotations

import numpy as np


def central_differences(objective, x, h=1e-6):
    """d objective / d x by central differences, one element of ``x`` at a time (float64):
    ``objective`` takes an array shaped like ``x`` and returns a float."""
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (objective(up) - objective(down)) / (2 * h)
    return numeric


def assert_close_scaled(actual, expected, rtol, atol, err_msg=""):
    """``assert_allclose`` in float64 with ``atol`` scaled by the largest ``|expected|`` (at
    least 1), so a tolerance fits losses and gradients of any magnitude."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=err_msg)
