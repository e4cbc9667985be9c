"""Accuracy of the vectorisable exp, tanh and log (fusedgrad.cpu._math), measured in ulp.

The oracles are NumPy's exp and tanh in x87 extended precision (``np.longdouble``, 64-bit
mantissa), which are accurate to far below a float64 ulp, so the measured error is our error.
"""
import re

import numpy as np
import pytest

from numba import njit
from numba.extending import intrinsic

from fusedgrad.cpu._math import (FASTMATH_SOFTMAX, _emit_scale_by_pow2, _target_has_scalef,
                                 exp_array, exp_of_shifted, log_array, tanh_array)

# np.longdouble is x87 extended precision on x86-64 Linux; where it is plain float64 (other
# platforms) it cannot measure a float64 function's error.
EXTENDED = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant
needs_extended = pytest.mark.skipif(not EXTENDED, reason="np.longdouble is float64 here")

# Dense sweeps over the whole useful range of each dtype, including the subnormal results
# and both overflow / underflow edges.
SWEEPS = {
    np.float32: (-110.0, 95.0, 4_000_001),
    np.float64: (-760.0, 720.0, 4_000_001),
}
#: Measured maxima are 0.92 ulp (float32) and 0.86 ulp (float64).
MAX_ULP = {np.float32: 1.0, np.float64: 1.0}


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


def _scale_by_pow2_kernel(scalef):
    """A loop of ``p * 2^k`` through the vscalef (``ldexp``) path or the integer-bits path."""
    @intrinsic
    def scale(typingctx, p, k):
        def codegen(context, builder, signature, args):
            return _emit_scale_by_pow2(builder, *args, scalef=scalef)

        return p(p, k), codegen

    @njit
    def kernel(p, k, out):
        for i in range(p.shape[0]):
            out[i] = scale(p[i], k[i])

    return kernel


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_scaling_by_vscalef_and_by_exponent_bits_give_the_same_bits(dtype):
    # AVX-512 CPUs scale by ldexp (vscalef), others by two factors built from exponent bits;
    # both must round p * 2^k once, so every result, subnormals and overflow included, agrees.
    k_low, k_high = (-159, 128) if dtype == np.float32 else (-1077, 1025)
    rng = np.random.default_rng(7)
    k = np.repeat(np.arange(k_low, k_high + 1), 64).astype(dtype)
    p = rng.uniform(0.5, 2.0, k.size).astype(dtype)
    p[::64] = dtype(1.0)
    results = []
    for scalef in (True, False):
        out = np.empty_like(p)
        with np.errstate(over="ignore"):
            _scale_by_pow2_kernel(scalef)(p, k, out)
        results.append(out)
    assert np.array_equal(results[0].view(np.uint8), results[1].view(np.uint8))
    with np.errstate(over="ignore", under="ignore"):
        exact = (p.astype(np.longdouble) * np.exp2(k.astype(np.longdouble))).astype(dtype)
    assert np.array_equal(results[0], exact)


def _vectorised_loop_asm(array_function, dtype):
    """Assembly of a fresh compilation of an ``*_array`` loop (code loaded from Numba's cache has
    none), checked to be vectorised and free of libm calls (exp, tanh, or a scalarised ldexp)."""
    loop = njit(fastmath=FASTMATH_SOFTMAX)(array_function.py_func)
    x = np.linspace(-3.0, 3.0, 64).astype(dtype)
    loop(x, np.empty_like(x))
    asm = loop.inspect_asm(loop.signatures[0])
    assert re.search(r"\b[yz]mm\d+", asm), "the loop was not vectorised"
    assert not re.search(r"\$(tanh|tanhf|exp|expf|ldexp|ldexpf)\b", asm), \
        "a libm call is left in the loop"
    return asm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_loop_is_vectorised_with_vscalef_on_avx512(dtype):
    # Without AVX-512 a vector ldexp would be one libm call per element, which is why the
    # integer path exists.
    asm = _vectorised_loop_asm(exp_array, dtype)
    assert bool(re.search(r"\bvscalefp[sd]\b", asm)) == _target_has_scalef()


def _exp_of_shifted_array(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_of_shifted(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_of_shifted_is_exp_bit_for_bit_without_the_clamp_above(dtype):
    # The cross-entropy's exp of a logit minus its row's maximum: no argument above 0, so the
    # clamp above (89 / 710) is left out, and nothing else changes.
    low = SWEEPS[dtype][0]
    x = np.concatenate([np.linspace(low, 0.0, 2_000_001), np.linspace(0.0, 80.0, 1001),
                        [-np.inf, np.nan, -0.0]]).astype(dtype)
    loop = njit(fastmath=FASTMATH_SOFTMAX)(_exp_of_shifted_array)
    got, expected = np.empty_like(x), np.empty_like(x)
    loop(x, got)
    exp_array(x, expected)
    np.testing.assert_array_equal(got.view(f"u{x.itemsize}"), expected.view(f"u{x.itemsize}"))
    asm = loop.inspect_asm(loop.signatures[0])
    assert re.search(r"\b[yz]mm\d+", asm), "the loop was not vectorised"
    assert not re.search(r"\bvminp[sd]\b", asm), "the clamp above is still there"


# --------------------------------------------------------------------------------------------
# tanh
# --------------------------------------------------------------------------------------------
#: Measured maxima are 1.06 ulp for both dtypes, just above the switch point.
TANH_MAX_ULP = {np.float32: 1.1, np.float64: 1.1}


def _tanh(x):
    got = np.empty_like(x)
    tanh_array(x, got)
    return got


def _tanh_ulp_error(x, got):
    """|got - tanh(x)| in ulp of the correctly rounded result (its spacing in x's dtype)."""
    exact = np.tanh(x.astype(np.longdouble))
    spacing = np.spacing(np.abs(exact.astype(x.dtype))).astype(np.longdouble)
    return np.abs(got.astype(np.longdouble) - exact) / spacing


def _symmetric(values, dtype):
    values = np.asarray(values).astype(dtype)
    return np.concatenate([values, -values])


@needs_extended
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("low,high", [(0.0, 20.0),       # everything, saturation included
                                      (0.7, 0.8),        # around the switch point 0.75
                                      (1e-6, 0.1),       # small: the polynomial alone
                                      (8.5, 20.0)])      # rounding to +-1
def test_tanh_dense_sweep_ulp(dtype, low, high):
    x = _symmetric(np.linspace(low, high, 2_000_001), dtype)
    ulp = _tanh_ulp_error(x, _tanh(x))
    assert ulp.max() <= TANH_MAX_ULP[dtype], \
        f"max error {ulp.max():.3f} ulp at x={x[ulp.argmax()]!r}"
    assert ulp.mean() < 0.35


@needs_extended
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_every_float32_near_the_switch_point(dtype):
    # Every float32 in [0.74, 0.76] (about 84000 of them), and the switch point's neighbours.
    start = np.float32(0.74).view(np.int32)
    stop = np.float32(0.76).view(np.int32)
    x = np.arange(start, stop, dtype=np.int32).view(np.float32).astype(dtype)
    switch = dtype(0.75)
    x = _symmetric(np.concatenate([x, [np.nextafter(switch, dtype(0)), switch,
                                       np.nextafter(switch, dtype(1))]]), dtype)
    ulp = _tanh_ulp_error(x, _tanh(x))
    assert ulp.max() <= TANH_MAX_ULP[dtype], f"max error {ulp.max():.3f} ulp"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_tiny_and_subnormal_arguments_are_returned_unchanged(dtype):
    # tanh(x) = x - x^3/3 + ...: x itself once x^2 / 3 is well below half an ulp (at
    # sqrt(eps) = 2^-k exactly, the correctly rounded result is already the float below x).
    info = np.finfo(dtype)
    smallest_subnormal = np.nextafter(dtype(0), dtype(1))
    tiny = np.concatenate([np.geomspace(smallest_subnormal, info.tiny, 1001),
                           np.geomspace(info.tiny, np.sqrt(info.eps) / 2, 1001)]).astype(dtype)
    x = _symmetric(tiny, dtype)
    np.testing.assert_array_equal(_tanh(x), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_random_arguments(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1_000_000) * rng.choice([0.1, 1.0, 5.0], 1_000_000)).astype(dtype)
    reference = np.tanh(x.astype(np.float64)).astype(dtype) if dtype == np.float32 \
        else np.tanh(x)
    # Against the correctly rounded (float32) or libm (float64) value: within 1 ulp + rounding.
    got = _tanh(x)
    assert np.all(np.abs(got - reference) <= 2 * np.spacing(np.abs(reference)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 9.5, 19.5, 0.75, -0.75],
                 dtype=dtype)
    got = _tanh(x)
    assert np.isnan(got[0])
    assert got[1] == 1.0 and got[2] == -1.0
    assert got[3] == 0.0 and not np.signbit(got[3])
    assert got[4] == 0.0 and np.signbit(got[4])
    assert got[5] == 1.0 and got[6] == -1.0
    assert got[7] == 1.0 if dtype == np.float32 else got[7] < 1.0   # float32 saturates at 9.01
    assert got[8] == 1.0                                             # float64 at 19.06
    assert got[9] == -got[10]
    assert np.all(np.abs(got[~np.isnan(got)]) <= 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_is_monotonic_on_a_dense_grid(dtype):
    # The kernels take the row maximum of the capped logits as the cap of the maximum.
    x = np.linspace(-12.0, 12.0, 1_000_001).astype(dtype)
    assert np.all(np.diff(_tanh(x)) >= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_loop_is_vectorised_without_libm_calls(dtype):
    _vectorised_loop_asm(tanh_array, dtype)


def _log_ulp_error(x):
    got = np.empty_like(x)
    log_array(x, got)
    exact = np.log(x.astype(np.longdouble))
    rounded = exact.astype(np.float64)
    finite = np.isfinite(rounded) & (rounded != 0)
    spacing = np.abs(np.spacing(rounded[finite])).astype(np.longdouble)
    return np.abs(got[finite].astype(np.longdouble) - exact[finite]) / spacing


@needs_extended
@pytest.mark.parametrize("name, x", [
    ("kernel range [1, 64]", np.linspace(1.0, 64.0, 2_000_001)),
    ("around 1", np.linspace(0.5, 2.0, 2_000_001)),
    ("whole positive range", np.exp(np.random.default_rng(0).uniform(-744.0, 709.7, 1_000_000))),
    ("subnormal", np.random.default_rng(1).uniform(0.0, 2.2250738585072014e-308, 100_000)),
])
def test_log_ulp(name, x):
    ulp = _log_ulp_error(x)
    assert ulp.max() <= 1.25, name
    assert ulp.mean() <= 0.35, name


def test_log_special_values():
    x = np.array([0.0, -0.0, -1.0, -np.inf, np.inf, np.nan, 5e-324, 1.0, np.finfo(np.float64).max])
    got = np.empty_like(x)
    log_array(x, got)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(got, np.log(x))
