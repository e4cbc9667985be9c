"""Vectorisable ``exp`` and ``tanh`` for float32 and float64, in plain arithmetic for Numba.

Numba 0.68 on this platform has no SVML, so ``math.exp`` or ``math.tanh`` inside a loop is a
scalar libm call and stops LLVM from vectorising the loop. :func:`fast_exp` and
:func:`fast_tanh` use only multiplies, FMAs, divisions, ``floor``, ``abs``, ``copysign``,
compares, an int conversion and a bit cast or ``ldexp``, which LLVM turns into vector code
(``ymm``/``zmm``) inside a loop. Each is one Numba intrinsic that writes its LLVM IR directly
(``_emit_exp``, ``_emit_tanh``), see the note above :func:`_emit_polynomial` for why.

exp
---
Method (Cody-Waite range reduction + polynomial + exponent bits)::

    exp(x) = 2^k * exp(r),   k = round(x / ln2),   r = x - k ln2,   |r| <= ln2 / 2

``r`` is computed as ``(x - k*LN2_HI) - k*LN2_LO`` where ``LN2_HI`` has few enough significant
bits that ``k*LN2_HI`` is exact. ``exp(r) = 1 + r (1 + r g(r))`` with ``g`` a near-minimax
polynomial for ``(exp(r) - 1 - r) / r^2`` on ``[-ln2/2, ln2/2]`` (fitted with mpmath's
``chebyfit``; approximation error 0.17 ulp for float32 with 5 terms, 0.002 ulp for float64
with 11 terms), evaluated by Horner's rule to the end: two FMAs after ``g``, where
``(1 + r) + r^2 g`` took three vector instructions and rounded worse (at most 1.3 ulp and 0.35
on average over the sweeps below, against 0.92 and 0.26). The product ``exp(r) * 2^k`` is
rounded once, so results in the subnormal
range (or at 0) round as a correctly rounded result would, to within the polynomial's error:
on AVX-512 CPUs by ``vscalefps`` / ``vscalefpd`` (LLVM's ``ldexp``), elsewhere by applying
``2^k`` as two factors ``2^(k//2) * 2^(k - k//2)`` built from their IEEE-754 bits, each a
normal number over the whole clamped range. Both give the same bits
(``tests/test_cpu_math.py`` compares them).

Accuracy and range (measured in ``tests/test_cpu_math.py``: at most 0.92 ulp in float32 and
0.86 in float64 over dense sweeps, subnormal results included; 0.26 on average):

* float32: x < -104 returns +0.0 (exp(-104) = 6.8e-46 is below half the smallest subnormal),
  x > 89 returns +inf (float32 overflows at 88.72), ``exp(-inf) = 0``, ``exp(+inf) = inf``.
* float64: x < -746 returns +0.0, x > 710 returns +inf (overflow at 709.78).
* NaN in, NaN out: the clamps are written so that a NaN fails both comparisons and flows
  through the polynomial.

tanh
----
Method: tanh is odd, so it is computed for ``a = |x|`` and the sign of ``x`` is copied onto the
result (``copysign``, which also keeps ``tanh(-0.0) = -0.0``). Two formulas, both evaluated and
one selected per element (an LLVM ``select``, which vectorises; a branch would not)::

    a < 0.75:    tanh(a) = a + a u P(u),           u = a^2
    a >= 0.75:   tanh(a) = 1 - 2 / (exp(2a) + 1)   (the exp above)

``P`` is a near-minimax polynomial for ``(tanh(sqrt(u)) - sqrt(u)) / u^1.5`` on
``[0, 0.5625]`` (mpmath's ``chebyfit``, computed at 60 digits): 6 terms for float32
(approximation error 1.2e-8 in ``P``, at most 8e-9 relative in tanh), 13 for float64 (1.1e-17
in ``P``, at most 7e-18 relative in tanh). The second formula never cancels badly because its
result is at least tanh(0.75) = 0.635: the relative error of ``2 / (exp(2a) + 1)`` (the exp's
ulp, and two roundings) reaches the result scaled by ``(1 - tanh a) / tanh a <= 0.57``. The
switch point 0.75 is where that scaled error has come down to about one ulp; a lower switch
point needs fewer terms but loses accuracy just above it (with the switch at 0.55, where
tanh = 0.5: 1.6 ulp in float32, 1.7 in float64).

Accuracy and range (measured in ``tests/test_cpu_math.py`` against NumPy's ``tanh`` in x87
extended precision, over dense sweeps of ``[-20, 20]``, of ``+-[0.7, 0.8]`` around the switch
(every float32 there), and of tiny and subnormal arguments): at most 1.06 ulp for float32 and
for float64, both just above the switch point; on average 0.12 ulp (float32) and 0.25 ulp
(float64) over ``[-20, 20]``.

* Small arguments: ``a + a u P(u)`` returns ``x`` itself once ``u P(u)`` is below half an
  ulp, subnormal ``x`` included (``u`` underflows to 0).
* Large arguments saturate by themselves: ``exp(2a)`` grows until ``2 / (exp(2a) + 1)`` is below
  half an ulp of 1 (from ``|x|`` = 9.01 in float32, 19.06 in float64) and then overflows to
  inf, so ``tanh(+-inf) = +-1``.
* NaN in, NaN out: ``NaN < 0.75`` is false, so the exp branch is taken, and the exp passes the
  NaN through.
* The division is :func:`divide` (an ``fdiv`` instruction): Numba's ``/`` checks for a zero
  divisor to raise ``ZeroDivisionError``, and that branch stops the vectoriser.

log (float64 only: the kernels take log-sum-exps in float64)
---------------------------------------------------------
Method (the classic atanh series, as in fdlibm): with the bits of x offset by those of
sqrt(1/2), an arithmetic shift gives the exponent k and the rest a significand
m = x / 2^k in [sqrt(1/2), sqrt(2)), so::

    log(x) = k ln2 + log(1 + f),   f = m - 1 (exact),   s = f / (2 + f),   u = s^2
    log(1 + f) = 2 atanh(s) = f - s (f - R) = f - (f^2/2 - s (f^2/2 + R)),
    R = sum_{j>=1} 2 u^j / (2j + 1)

(2s = f - s f). |s| <= 0.1716, so u <= 0.0295, and the series' first ten terms leave a
truncation error below 1e-18 relative to the result: its Taylor coefficients 2 / (2j + 1)
serve as they are. ``k ln2`` is added as ``k LN2_HI`` (exact) plus ``k LN2_LO``. Subnormal x
are first scaled by 2^54; 0 gives -inf, inf gives inf, negative x and NaN give NaN.

Accuracy (``tests/test_cpu_math.py``, against ``np.log`` in extended precision over dense
sweeps of [1, 64], the range the cross-entropy kernels use, and of the whole positive range,
subnormals included): at most 1.2 ulp, 0.3 ulp on average.

This module also holds the two sets of LLVM fast-math flags the CPU kernels are compiled with,
:data:`FASTMATH_SUMS` and :data:`FASTMATH_SOFTMAX` (below). Neither has ``nnan``/``ninf``:
``-inf`` logits are a supported way to mask classes, and NaN and inf inputs must propagate as
they do in PyTorch.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

#: Fast-math flags of loops that only add, subtract and multiply (batch norm's kernels):
#: ``reassoc`` lets LLVM vectorise the accumulations, ``contract`` forms FMAs, ``nsz`` ignores
#: the sign of zero. The order ``reassoc`` lets LLVM pick is the same in every process that
#: runs the same machine code, but LLVM picks again each time it optimises a function, and a
#: process that compiles a parallel kernel runs a copy optimised once where the cache holds
#: one optimised twice: the known first-compile exception to bitwise reproducibility
#: (``docs/api.md``, Devices). Nothing more, because ``arcp`` and ``afn`` act only on
#: divisions and on library functions (exp, log, sqrt, ...), and these loops have neither
#: (their divisions and square roots are in the per-channel coefficients, computed outside
#: them): compiled with :data:`FASTMATH_SOFTMAX` instead, they give the same machine code.
FASTMATH_SUMS = {"nsz", "contract", "reassoc"}

#: Fast-math flags of the softmax kernels (cross-entropy, its class-sharded form in
#: ``fusedgrad.distributed``, and the exp and tanh of this module): :data:`FASTMATH_SUMS` plus
#: ``arcp``, so that a division by a row's sum of exponentials may become a multiplication by
#: its reciprocal, and ``afn``, which lets LLVM approximate the ``exp`` / ``log`` calls.
FASTMATH_SOFTMAX = FASTMATH_SUMS | {"arcp", "afn"}


@functools.cache
def _target_has_scalef() -> bool:
    """Whether the CPU Numba compiles for has AVX-512 (``vscalefps`` / ``vscalefpd``).

    Read as Numba reads it for its target machine: ``NUMBA_CPU_FEATURES`` when set, else the
    host's features (both fixed for the process, so they are read once). Numba's cache index
    holds the CPU's name and features too, so a kernel compiled here is never loaded on a CPU
    that chose the other way.
    """
    features = config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


def _emit_scale_by_pow2(builder, p, k, scalef: bool | None = None):
    """LLVM IR for ``p * 2^k`` (``k`` an integer-valued float, ``p`` in [0.5, 2)), rounded once.

    With AVX-512 it is LLVM's ``ldexp``, which the x86 backend turns into one ``vscalefps`` (or
    ``vscalefpd``) per vector: the product rounded once, into the subnormal range or to 0 or
    inf as IEEE arithmetic does. In a float32 loop like the cross-entropy's exp pass that made 108
    instructions per 64 elements instead of 127, 0.315-0.33 instead of 0.36-0.38 ns per element
    on one core (2026-12-05, the Xeon of ``docs/performance.md``), with every result bit for bit
    equal. Without AVX-512 the backend makes a vector ``ldexp`` into one libm call per element,
    so there the scaling is integer arithmetic on the bits instead (``scalef`` forces one way
    or the other, for the test that compares them; ``None`` asks :func:`_target_has_scalef`):

    ``k`` is converted to an integer of the float's width and split as ``h = k >> 1`` and
    ``k - h``. ``p * 2^(k - h)`` is formed exactly by adding ``(k - h) << mantissa_bits`` to the
    bits of ``p`` (the result is a normal number over the clamped range); ``2^h`` is a float
    whose exponent field is ``h + bias``. The single remaining multiply rounds once, into the
    subnormal range when the true result is there. Doing the split with one integer add (not
    two multiplies) keeps fast-math reassociation from forming the overflowing ``2^k``.
    """
    float_type = p.type
    int_bits, mantissa_bits, bias = _FLOAT_LAYOUT[float_type.intrinsic_name]
    int_type = ir.IntType(int_bits)
    if _target_has_scalef() if scalef is None else scalef:
        exponent_type = ir.IntType(32)
        ldexp = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(float_type, [float_type, exponent_type]),
            f"llvm.ldexp.{float_type.intrinsic_name}.i32")
        return builder.call(ldexp, [p, builder.fptosi(k, exponent_type)])
    k_int = builder.fptosi(k, int_type)
    k_half = builder.ashr(k_int, ir.Constant(int_type, 1))
    k_rest = builder.sub(k_int, k_half)
    p_bits = builder.bitcast(p, int_type)
    shifted = builder.add(p_bits, builder.shl(k_rest, ir.Constant(int_type, mantissa_bits)))
    half_bits = builder.shl(builder.add(k_half, ir.Constant(int_type, bias)),
                            ir.Constant(int_type, mantissa_bits))
    return builder.fmul(builder.bitcast(shifted, float_type),
                        builder.bitcast(half_bits, float_type))


#: Bits of the float, of its mantissa, and the exponent bias, by LLVM type name.
_FLOAT_LAYOUT = {"f32": (32, 23, 127), "f64": (64, 52, 1023)}


def _emit_reduce_by_ln2(builder, x, k, ln2_hi: float, ln2_lo: float):
    """LLVM IR for ``r = (x - k*ln2_hi) - k*ln2_lo`` that fast-math cannot re-associate.

    Numba adds the kernel's fast-math flags only to float instructions that carry none, so
    giving these instructions just ``contract`` (FMA contraction, which makes the reduction
    more exact) keeps ``reassoc`` from folding them into ``x - k*(ln2_hi + ln2_lo)``, which
    would lose the low part of ln2 (measured: 214 ulp at x = 709 in float64).
    """
    hi = ir.Constant(x.type, ln2_hi)
    lo = ir.Constant(x.type, ln2_lo)
    head = builder.fsub(x, builder.fmul(k, hi, flags=("contract",)), flags=("contract",))
    return builder.fsub(head, builder.fmul(k, lo, flags=("contract",)), flags=("contract",))


class _ExpConstants(NamedTuple):
    """exp's clamps, log2(e), ln2 split as hi + lo (``hi`` has few enough significant bits that
    k * hi is exact) and g's coefficients, lowest degree first."""
    low: float
    high: float
    log2e: float
    ln2_hi: float
    ln2_lo: float
    g: tuple


_EXP_CONSTANTS = {
    "f32": _ExpConstants(
        low=-104.0, high=89.0, log2e=float(np.float32(1.4426950408889634)),
        ln2_hi=0.693359375,                                  # 8 significant bits
        ln2_lo=float(np.float32(-2.12194440e-4)),            # ln2 - ln2_hi
        g=tuple(float(np.float32(c)) for c in (
            0.5, 0.1666657702559799, 0.041666554662050534, 0.008363173074513711,
            0.001392617611993558))),
    "f64": _ExpConstants(
        low=-746.0, high=710.0, log2e=1.4426950408889634,
        ln2_hi=0.69314718055966295651160180568695068359375,  # 32 significant bits
        ln2_lo=0.28235290563031577122588448175013436025525412068e-12,
        g=(0.5, 0.1666666666666667, 0.04166666666666667, 0.008333333333326141,
           0.0013888888888883752, 0.00019841269874800493, 2.4801587325533363e-05,
           2.7557255425746435e-06, 2.7557273661348637e-07, 2.510520637395701e-08,
           2.0914679376583935e-09)),
}

# tanh: the switch point between the two formulas, and P's coefficients, lowest degree first.
_TANH_SWITCH = 0.75
_TANH_P = {
    "f32": tuple(float(np.float32(c)) for c in (
        -0.3333333134651184, 0.1333317905664444, -0.05393585190176964, 0.021615318953990936,
        -0.00793380755931139, 0.0019095024326816201)),
    "f64": (-0.3333333333333333, 0.13333333333332661, -0.05396825396758208,
            0.021869488509711037, -0.008863234987439102, 0.0035921213885060418,
            -0.0014557818253310693, 0.0005897469986953327, -0.00023809406936979282,
            9.42476297649358e-05, -3.449472469998217e-05, 1.0048053928129499e-05,
            -1.6408599646831444e-06),
}


def _call_intrinsic(builder, name, *args):
    """A call of the LLVM intrinsic ``llvm.<name>`` on floats of one type."""
    float_type = args[0].type
    fn = builder.module.declare_intrinsic(f"llvm.{name}", [float_type],
                                          ir.FunctionType(float_type, [float_type] * len(args)))
    return builder.call(fn, args)


@intrinsic
def fmax(typingctx, a, b):
    """NaN-propagating maximum of two floats of one type (``llvm.maximum``).

    Unlike ``max`` or a compare-and-select, this intrinsic is recognised by LLVM's loop
    vectoriser as a reduction (``vmaxps`` on ``ymm``) without the ``nnan`` fast-math flag, and
    a NaN anywhere in a row makes the row maximum NaN, so NaN logits give a NaN loss.
    """
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        return _call_intrinsic(builder, "maximum", *args)

    return a(a, b), codegen


@intrinsic
def divide(typingctx, a, b):
    """``a / b`` for two floats of one type, as a bare ``fdiv`` instruction.

    Numba's ``/`` tests the divisor for zero to raise ``ZeroDivisionError``; that branch keeps
    LLVM from vectorising the loop around it. Here a zero divisor gives inf or NaN, as in IEEE
    arithmetic (the kernel's fast-math flags are added to the instruction as to any other).
    """
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        return builder.fdiv(*args)

    return a(a, b), codegen


@intrinsic
def select(typingctx, condition, if_true, if_false):
    """``if_true if condition else if_false`` as one LLVM ``select`` of two floats of one type.

    A conditional expression is a branch in Numba's IR; once a function holding one is inlined
    several times into a kernel, Numba's SSA pass warns about the merged variable. A select
    has no branch, and it is what the vectoriser turns into a blend anyway.
    """
    if condition != types.boolean or if_true != if_false:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(*args)

    return if_true(condition, if_true, if_false), codegen


@intrinsic
def _float64_bits(typingctx, x):
    """The IEEE-754 bits of a float64 as an int64 (a bit cast, no conversion)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(x), codegen


@intrinsic
def _float64_from_bits(typingctx, bits):
    """The float64 whose IEEE-754 bits are the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


def cast_like(value, array):
    """``value`` converted to the dtype of ``array``, an array or a scalar (so float32 kernels
    stay in float32 lanes)."""
    return array.dtype.type(value)


@overload(cast_like, inline="always")
def _cast_like_overload(value, array):
    dtype = array.dtype if isinstance(array, types.Array) else array
    return lambda value, array: dtype(value)


@intrinsic
def _reduce_by_ln2_f64(typingctx, x, k):
    """``x - k ln2`` in float64, ``k`` an integer-valued float64 (for :func:`log_f64`)."""
    if x != types.float64 or k != types.float64:
        return None

    def codegen(context, builder, signature, args):
        constants = _EXP_CONSTANTS["f64"]
        return _emit_reduce_by_ln2(builder, *args, constants.ln2_hi, constants.ln2_lo)

    return types.float64(x, k), codegen


#: log: the bits of sqrt(1/2), the significand's lower bound; 2^54 and the smallest normal
#: float64 (below it x is scaled first); 2 / (2j + 1), j = 1..10, the series' coefficients.
_LOG_OFFSET_BITS = 0x3FE6A09E667F3BCD
_TWO_54 = 18014398509481984.0
_SMALLEST_NORMAL = 2.2250738585072014e-308
_LOG_R = tuple(2.0 / (2 * j + 1) for j in range(1, 11))
_R1, _R2, _R3, _R4, _R5, _R6, _R7, _R8, _R9, _R10 = _LOG_R


@njit(inline="always", fastmath=FASTMATH_SOFTMAX, cache=True)
def log_f64(x):
    """log(x) for a float64 ``x``; max error about 1 ulp (see module). Vectorises."""
    subnormal = x < _SMALLEST_NORMAL
    scaled = select(subnormal, x * _TWO_54, x)
    offset = _float64_bits(scaled) - _LOG_OFFSET_BITS
    k = offset >> 52
    m = _float64_from_bits(_float64_bits(scaled) - (k << 52))
    exponent = np.float64(k) - select(subnormal, 54.0, 0.0)
    f = m - 1.0
    s = divide(f, 2.0 + f)
    u = s * s
    r = u * (_R1 + u * (_R2 + u * (_R3 + u * (_R4 + u * (_R5 + u * (_R6 + u * (
        _R7 + u * (_R8 + u * (_R9 + u * _R10)))))))))
    half_square = 0.5 * f * f
    log_m = f - (half_square - s * (half_square + r))
    result = _reduce_by_ln2_f64(log_m, -exponent)
    result = select(x == 0.0, -np.inf, result)
    result = select(x == np.inf, np.inf, result)
    return select(x < 0.0, np.nan, select(x != x, x, result))


# exp and tanh are emitted as LLVM IR by one intrinsic each, rather than written as jitted
# functions inlined into the kernels: Numba inlines an ``inline="always"`` function by copying
# and re-typing its IR at every call site, and the soft-capped kernels call tanh (which holds
# an exp) at a dozen sites per mode; their first compilation took 18-20 s each (7 s without
# the cap). The instructions, their order and their fast-math flags (the kernel's, added by
# Numba to every float instruction that has none) are those the jitted functions produced.
def _constant(float_type, value):
    return ir.Constant(float_type, float(value))


def _emit_polynomial(builder, x, coefficients):
    """c0 + x (c1 + x (c2 + ... + x c_n)), evaluated innermost first."""
    float_type = x.type
    total = builder.fmul(x, _constant(float_type, coefficients[-1]))
    for degree in range(len(coefficients) - 2, -1, -1):
        total = builder.fadd(_constant(float_type, coefficients[degree]), total)
        if degree > 0:
            total = builder.fmul(x, total)
    return total


def _emit_exp(builder, x, clamp_above=True):
    """exp(x), float32 or float64 (the method of the module's docstring). Without
    ``clamp_above`` the clamp at ``high`` is left out, for arguments that never exceed it."""
    float_type = x.type
    c = _EXP_CONSTANTS[float_type.intrinsic_name]
    clamped = _call_intrinsic(builder, "maximum", x, _constant(float_type, c.low))
    if clamp_above:
        clamped = _call_intrinsic(builder, "minimum", clamped, _constant(float_type, c.high))
    k = _call_intrinsic(builder, "floor", builder.fadd(
        builder.fmul(clamped, _constant(float_type, c.log2e)), _constant(float_type, 0.5)))
    r = _emit_reduce_by_ln2(builder, clamped, k, c.ln2_hi, c.ln2_lo)
    g = _emit_polynomial(builder, r, c.g)
    one = _constant(float_type, 1.0)
    p = builder.fadd(one, builder.fmul(r, builder.fadd(one, builder.fmul(r, g))))
    return _emit_scale_by_pow2(builder, p, k)


def _emit_tanh(builder, x):
    """tanh(x), float32 or float64 (the method of the module's docstring)."""
    float_type = x.type
    one = _constant(float_type, 1.0)
    a = _call_intrinsic(builder, "fabs", x)
    u = builder.fmul(a, a)
    p = _emit_polynomial(builder, u, _TANH_P[float_type.intrinsic_name])
    near_zero = builder.fadd(a, builder.fmul(a, builder.fmul(u, p)))
    exp_2a = _emit_exp(builder, builder.fadd(a, a))
    away_from_zero = builder.fsub(
        one, builder.fdiv(_constant(float_type, 2.0), builder.fadd(exp_2a, one)))
    below_switch = builder.fcmp_ordered("<", a, _constant(float_type, _TANH_SWITCH))
    return _call_intrinsic(builder, "copysign",
                           builder.select(below_switch, near_zero, away_from_zero), x)


def _float_intrinsic(emit):
    """A Numba intrinsic of one float32 or float64 argument whose IR ``emit`` writes."""
    def typer(typingctx, x):
        if x not in (types.float32, types.float64):
            return None

        def codegen(context, builder, signature, args):
            return emit(builder, args[0])

        return x(x), codegen

    return intrinsic(typer)


_exp = _float_intrinsic(_emit_exp)
_exp_of_shifted = _float_intrinsic(lambda builder, x: _emit_exp(builder, x, clamp_above=False))
_tanh = _float_intrinsic(_emit_tanh)


def fast_exp(x):
    """exp(x) in the precision of ``x`` (float32 or float64) inside jitted code, about 1 ulp
    (see the module). Called from Python it is NumPy's ``np.exp``."""
    return np.exp(x)


def exp_of_shifted(x):
    """:func:`fast_exp` for ``x <= 0`` or NaN, such as a logit minus its row's or block's
    maximum: the clamp above (x > 89 in float32) is left out, one vector instruction of the
    ~18 in a float32 exp loop. Every result is the bits of :func:`fast_exp` for x <= 89.
    Called from Python it is NumPy's ``np.exp``."""
    return np.exp(x)


def fast_tanh(x):
    """tanh(x) in the precision of ``x`` inside jitted code, about 1 ulp (see the module), as
    :func:`fast_exp` is for exp. Called from Python it is NumPy's ``np.tanh``."""
    return np.tanh(x)


def _overload_for_floats(function, intrinsic_of_float):
    """Make ``function`` (a NumPy-backed Python function) call ``intrinsic_of_float`` inside
    jitted code, for float32 and float64 arguments."""
    @overload(function, inline="always")
    def _overload(x):
        if x in (types.float32, types.float64):
            return lambda x: intrinsic_of_float(x)
        return None


_overload_for_floats(fast_exp, _exp)
_overload_for_floats(exp_of_shifted, _exp_of_shifted)
_overload_for_floats(fast_tanh, _tanh)


@njit(cache=True, fastmath=FASTMATH_SOFTMAX)
def exp_array(x, out):
    """``out[i] = exp(x[i])`` for 1-D float32 or float64 arrays (test and benchmark helper)."""
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


@njit(cache=True, fastmath=FASTMATH_SOFTMAX)
def log_array(x, out):
    """``out[i] = log(x[i])`` for 1-D float64 arrays (test helper)."""
    for i in range(x.shape[0]):
        out[i] = log_f64(x[i])


@njit(cache=True, fastmath=FASTMATH_SOFTMAX)
def tanh_array(x, out):
    """``out[i] = tanh(x[i])`` for 1-D float32 or float64 arrays (test helper)."""
    for i in range(x.shape[0]):
        out[i] = fast_tanh(x[i])
