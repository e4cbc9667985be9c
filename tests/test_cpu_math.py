"""Accuracy of the vectorisable exp (fusedgrad.cpu._math), measured in ulp.

The oracle is NumPy's exp in x87 extended precision (``np.longdouble``, 64-bit mantissa),
which is accurate to far below a float64 ulp, so the measured error is our error.
"""
import numpy as np
import pytest

from fusedgrad.cpu._math import exp_array

# Dense sweeps over the whole useful range of each dtype, including the subnormal results
# and both overflow / underflow edges.
SWEEPS = {
    np.float32: (-110.0, 95.0, 4_000_001),
    np.float64: (-760.0, 720.0, 4_000_001),
}
MAX_ULP = {np.float32: 1.5, np.float64: 1.5}


def _ulp_error(x, got):
    exact = np.exp(x.astype(np.longdouble))
    with np.errstate(over="ignore", under="ignore"):
        exact_rounded = exact.astype(x.dtype)
    finite = np.isfinite(exact_rounded) & (exact_rounded != 0)
    spacing = np.spacing(exact_rounded[finite]).astype(np.longdouble)
    ulp = np.abs(got[finite].astype(np.longdouble) - exact[finite]) / spacing
    return ulp, exact_rounded, finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_dense_sweep_ulp(dtype):
    low, high, count = SWEEPS[dtype]
    x = np.linspace(low, high, count).astype(dtype)
    got = np.empty_like(x)
    exp_array(x, got)
    ulp, exact_rounded, finite = _ulp_error(x, got)
    worst = x[finite][ulp.argmax()]
    assert ulp.max() <= MAX_ULP[dtype], f"max error {ulp.max():.3f} ulp at x={worst}"
    # Underflow to exactly 0 and overflow to inf where the correctly rounded result does
    # (up to the last ulp at the thresholds).
    zero_mismatch = (exact_rounded == 0) != (got == 0)
    inf_mismatch = np.isinf(exact_rounded) != np.isinf(got)
    assert zero_mismatch.sum() <= 1 and inf_mismatch.sum() <= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_random_arguments_in_softmax_range(dtype):
    # exp(z - max) takes arguments <= 0 in the kernels: check many random ones closely.
    rng = np.random.default_rng(7)
    x = (-rng.exponential(5.0, 1_000_000)).astype(dtype)
    got = np.empty_like(x)
    exp_array(x, got)
    ulp, _, _ = _ulp_error(x, got)
    assert ulp.max() <= MAX_ULP[dtype]
    assert np.mean(ulp) < 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_special_values(dtype):
    info = np.finfo(dtype)
    x = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, 1.0, -1e30, 1e30, info.tiny, -info.tiny],
                 dtype=dtype)
    got = np.empty_like(x)
    exp_array(x, got)
    assert got[0] == 0.0
    assert got[1] == np.inf
    assert np.isnan(got[2])
    assert got[3] == 1.0 and got[4] == 1.0
    assert got[5] == np.exp(dtype(1.0)) or abs(got[5] - np.e) <= np.spacing(dtype(np.e))
    assert got[6] == 0.0 and got[7] == np.inf
    assert got[8] == 1.0 and got[9] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_subnormal_results(dtype):
    # Results below the smallest normal number are rounded into the subnormal range, not
    # flushed to zero: compare with the correctly rounded value, allowing 1 subnormal step.
    tiny = np.finfo(dtype).tiny
    x = np.linspace(np.log(tiny) - 15.0, np.log(tiny), 10_001).astype(dtype)
    got = np.empty_like(x)
    exp_array(x, got)
    exact = np.exp(x.astype(np.longdouble)).astype(dtype)
    step = np.spacing(dtype(0))
    assert np.all(np.abs(got - exact) <= step + np.spacing(exact))
    assert np.count_nonzero(got) > 0.9 * np.count_nonzero(exact)
