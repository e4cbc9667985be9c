"""Softmax cross-entropy on NVIDIA GPUs: the ``@cuda.jit`` kernels, the online-softmax device
functions they use, and their host launchers.

Backend interface: the same functions, arguments and results as ``fusedgrad.cpu.cross_entropy``
(see its docstring), on device arrays: ``index_target``, ``check_index_target``,
``class_weights``, ``target_weight_sum``, ``count_denominator``, ``sample_scale``,
``per_sample``, ``reduced_loss``, ``sample_result`` and the kernels ``fused``, ``forward``,
``backward``. The arrays themselves (wrapping, allocation, the ``out=`` checks) are
``fusedgrad.cuda._arrays``'s. Arrays are objects with ``__cuda_array_interface__`` (wrapped
zero-copy as Numba device arrays); results are Numba ``DeviceNDArray`` objects. Per-sample
arrays are flat float64 device arrays of length ``N * S``. The kernel entry points take two
extra keywords: ``stream=None`` (see ``_arrays``) and ``threads_per_row=None`` (override the
launch shape chosen from C and S; tests use it to run every path on tiny inputs).

The "mean" denominator, the gradient scale and the reduced loss stay on the device (one-value
device arrays and one-thread kernels): a call waits for the device once, in
``check_index_target``, which must read the targets' check on the host to raise before anything
is written (class-index targets only), where it used to wait three times (the denominator and
the summed loss were read back as Python floats).

Math (per sample; the same as ``fusedgrad.reference`` and the CPU kernels; derived in
``docs/derivations.md``, section 1(d)). With logits ``z`` (C classes),
``lse = log sum_j exp(z_j)``, ``p = exp(z - lse)``, the smoothed target
``q_c = (1 - s) y_c + s / C`` (``y`` one-hot for class indices, the given probabilities
otherwise) and class weights ``w``:

    loss    = sum_c w_c q_c (lse - z_c) + z_loss * w_t * lse^2
            = A (lse - K) - B + z_loss * w_t * lse^2,
              A = sum_c w_c q_c,  B = sum_c w_c q_c (z_c - K)
    dloss/dz_j = p_j (A + 2 z_loss w_t lse) - w_j q_j

``w_t`` is the target class's weight (1 for probability targets) and ``K`` any finite constant:
we take the sample's first logit (0 if that is a -inf mask), so that ``A (lse - K) - B`` does not
cancel catastrophically when the logits are large (1e4) and the accumulation is float32. For the
same reason ``lse`` is kept as ``m + log_sum`` (``m`` the row maximum) inside the fused kernel:
``lse - K = (m - K) + log_sum`` and ``z - lse = (z - m) - log_sum`` lose nothing to rounding.
Ignored samples (index targets equal to ``ignore_index``) get loss 0 and gradient 0 but still a
log-sum-exp.

Soft-capping (``softcap`` = c): each logit is read as ``z' = c tanh(z / c)`` (:func:`_soft_cap`,
CUDA's ``tanh`` in the accumulation dtype) wherever it is read, so the statistics, ``K``,
``lse`` and the loss are those of ``z'``; the gradient pass multiplies each element by the
slope ``dz'/dz = 1 - tanh^2(z / c)`` (the chain rule back to the uncapped logits,
``docs/derivations.md``, section 1(e)). The kernel takes the cap as a float64, :data:`NO_CAP`
(0) for none: numba-cuda 0.30 compiles a ``None`` argument but cannot launch with one
(``NotImplementedError: (none, None)``, seen on the H200), so the cap is tested at run time, one
test that every thread of a launch takes the same way.

Kernel layout: logits are viewed without copying as ``(N, C, S)`` (``S`` = product of the spatial
axes, 1 for ``(N, C)``), sample ``r = n * S + s``. Two kernels, one launch shape: a "group" of
``blockDim.x`` threads handles one sample and ``blockDim.y`` samples share a block. The
dense-row kernel (:func:`_dense_kernel`, one compiled kernel per ``blockDim.x``) takes the
common case at about 17 instructions per logit: contiguous rows (``S = 1``), class-index
targets, 16/32-bit logits, groups of 32 threads or more. :func:`_ce_rows` takes every other
case (spatial logits, probability targets, float64, a thread per sample).

* ``blockDim.x = 256 or 1024`` (large C): a block per sample; each thread runs the online softmax
  (:func:`_online_lse_update`) over classes ``tx, tx + 256, ...`` (logits read once for the
  statistics), the group reduces ``max``, the rescaled sums, ``A`` and ``B``; the second read of
  the row writes the gradient.
* ``blockDim.x = 32`` (moderate C): a warp per sample, 8 samples per block.
* ``blockDim.x = 1`` (small C, or ``S > 1`` where the class axis is strided): a thread per sample,
  256 samples per block; with ``S > 1`` neighbouring threads read neighbouring spatial positions,
  so every class step is a coalesced load.

Accumulation is float32 for float16/bfloat16/float32 logits and float64 for float64 (``acc``
below: the dtype of the ``acc_like`` argument); per-sample losses and lse are stored as float64
(the backend interface) and summed in float64 by the fixed-order ``_arrays.device_sum``.
Nothing uses floating-point atomics: results are bitwise reproducible.

Every launch of :func:`_ce_rows` runs in one of the modes of ``fusedgrad._options``
(``MODE_FUSED``: loss, lse and gradient; ``MODE_FORWARD``: loss and lse; ``MODE_BACKWARD``: the
gradient from a saved lse), the convention the CPU kernels share.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float64

from .._device import is_device_array
from .._options import MODE_BACKWARD, MODE_FORWARD, MODE_FUSED, sample_count
from .._validate import stat_dtype
from . import _arrays
from ._reduce import OP_MAX, OP_SUM, SCRATCH_SIZE, THREADS, WARP_SIZE, group_reduce
from ._target import SIMULATED

#: The kernel's ``softcap`` when there is no cap (a cap is > 0).
NO_CAP = 0.0


def cap_argument(softcap) -> float:
    """The kernel's float64 ``softcap`` for an option that is None (no cap) or a cap > 0."""
    return NO_CAP if softcap is None else float(softcap)


# --------------------------------------------------------------------------------------------
# Device functions
# --------------------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def _online_lse_update(running_max, running_sum, z, neg_inf):
    """One step of the online softmax: fold logit ``z`` into ``(m, s = sum exp(z_j - m))``.

        m' = max(m, z),   s' = s exp(m - m') + exp(z - m')

    One ``exp`` per logit except when ``z`` raises the maximum. ``-inf`` logits (masks) add
    nothing and never form ``inf - inf``. ``neg_inf`` is ``-inf`` in the accumulation dtype (typed
    constants keep float32 kernels free of float64 arithmetic).
    """
    if z > running_max:
        running_sum = running_sum * math.exp(running_max - z)
        running_max = z
    if z != neg_inf:
        running_sum += math.exp(z - running_max)
    return running_max, running_sum


@cuda.jit(device=True, inline=True)
def _rescale_sum(running_max, running_sum, new_max, neg_inf):
    """``s exp(m - M)``: a thread's partial sum of exponentials re-based on the group max ``M``."""
    if running_max == neg_inf:
        return running_sum
    return running_sum * math.exp(running_max - new_max)


@cuda.jit(device=True, inline=True)
def _lse_parts(row_max, row_sum, neg_inf):
    """``(m, log(sum exp(z - m)))``, whose sum is ``lse``; kept apart so ``z - lse`` can be
    formed as ``(z - m) - log_sum`` without rounding ``lse`` (large logits in float32).
    A row of ``-inf`` logits gives ``(-inf, 0)``."""
    if row_max == neg_inf:
        return row_max, row_sum
    return row_max, math.log(row_sum)


@cuda.jit(device=True, inline=True)
def _split_lse(saved_lse, acc_like):
    """A saved float64 ``lse`` as ``(center, rest)`` in the accumulation dtype, the parts the
    gradient pass takes in place of ``(m, log_sum)``: ``center`` is ``lse`` rounded and ``rest``
    what the rounding lost (0 in float64). ``z - lse = (z - center) - rest`` then keeps the
    accuracy of float32 arithmetic for large logits: ``lse`` rounded to float32 alone would
    be off by up to half a unit in the last place, 5e-4 at 1e4, a relative error of 5e-4 in
    every probability. One float64 subtraction per sample."""
    acc = acc_like.dtype.type
    center = acc(saved_lse)
    return center, acc(saved_lse - float64(center))


@cuda.jit(device=True, inline=True)
def _soft_cap(z, softcap, acc_like):
    """``(z', dz'/dz)`` of one logit ``z`` (already in the accumulation dtype): ``(z, 1)`` when
    ``softcap`` is :data:`NO_CAP`, else ``(c t, 1 - t^2)`` with ``t = tanh(z / c)``."""
    acc = acc_like.dtype.type
    cap = acc(softcap)  # compared in the accumulation dtype: no float64 in float32 kernels
    if cap == acc(NO_CAP):
        return z, acc(1.0)
    t = math.tanh(z / cap)
    return cap * t, acc(1.0) - t * t


@cuda.jit(device=True, inline=True)
def _class_coefficient(c, n, s, target_class, target_prob, is_prob, weight, keep,
                       smooth_per_class, acc_like):
    """``w_c q_c`` with ``q_c = (1 - s) y_c + s / C`` (``keep = 1 - s``), in the accumulation
    dtype (that of ``acc_like``; explicit conversions keep float64 out of float32 kernels)."""
    acc = acc_like.dtype.type
    if is_prob:
        q = keep * acc(target_prob[n, c, s]) + smooth_per_class
    elif c == target_class:
        q = keep + smooth_per_class
    else:
        q = smooth_per_class
    if q == acc(0.0):
        return q  # without smoothing only the target class reads its weight
    return q * acc(weight[c])


@cuda.jit(device=True, inline=True)
def _row_statistics(logits, n, s, c_begin, c_step, shift, read_logits, target_class, target_prob,
                    is_prob, weight, keep, smooth_per_class, acc_like, neg_inf, softcap):
    """One thread's share of a sample: online ``(max, sum exp)``, ``A`` and ``B`` (see top), of
    the capped logits with a ``softcap``.

    With ``read_logits`` false (backward from a saved lse) only ``A`` is accumulated and the
    logits are not touched.
    """
    acc_zero = acc_like.dtype.type(0.0)
    running_max = neg_inf
    running_sum = acc_zero
    a = acc_zero
    b = acc_zero
    for c in range(c_begin, logits.shape[1], c_step):
        coef = _class_coefficient(c, n, s, target_class, target_prob, is_prob, weight, keep,
                                  smooth_per_class, acc_like)
        a += coef
        if read_logits:
            z, _ = _soft_cap(logits[n, c, s] + acc_zero, softcap, acc_like)
            running_max, running_sum = _online_lse_update(running_max, running_sum, z, neg_inf)
            if coef != acc_zero:  # q_c = 0 must not meet a -inf mask logit (0 * inf = nan)
                b += coef * (z - shift)
    return running_max, running_sum, a, b


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@cuda.jit
def _ce_rows(mode, logits, target_index, target_prob, is_prob, weight, ignore_index, smoothing,
             z_loss, softcap, acc_like, lse, loss, grad, grad_scale):
    """Statistics, loss and/or gradient of ``blockDim.y`` samples per block (module docstring).

    logits: (N, C, S), float16 / bfloat16 / float32 / float64;
    target_index: (N*S,) int64 class indices (a dummy with ``is_prob``);
    target_prob: (N, C, S), the dtype of logits (a dummy without ``is_prob``);
    weight: (C,) float64;
    softcap: the cap c > 0, or NO_CAP (float64);
    acc_like: (1,), the accumulation dtype (float64 for float64 logits, else float32);
    lse: (N*S,) float64, written (``MODE_FUSED``, ``MODE_FORWARD``) or read (``MODE_BACKWARD``);
    loss: (N*S,) float64, written unless ``MODE_BACKWARD``;
    grad: (N, C, S), the dtype of logits, written unless ``MODE_FORWARD``; may alias logits
    (in place: every element is read by the thread that then overwrites it);
    grad_scale: (1,) or (N*S,) float64, the gradient's factor per sample.

    ``mode`` (``fusedgrad._options``): with ``MODE_FUSED`` or ``MODE_FORWARD`` the statistics are
    computed and ``lse`` / ``loss`` stored, with ``MODE_BACKWARD`` the saved ``lse`` is read;
    unless ``MODE_FORWARD`` the gradient pass runs, times the sample's scale.
    """
    compute_lse = mode != MODE_BACKWARD
    write_grad = mode != MODE_FORWARD
    acc = acc_like.dtype.type
    acc_zero = acc(0.0)
    neg_inf = acc(-math.inf)
    scratch = cuda.shared.array(SCRATCH_SIZE, acc_like.dtype)

    # 1. this group's sample: row r = n * S + s; idle groups of the last block keep taking part
    #    in the block's reductions (they contain syncthreads), on a valid row
    n_classes = logits.shape[1]
    n_spatial = logits.shape[2]
    n_rows = logits.shape[0] * n_spatial
    row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    active = row < n_rows
    if not active:
        row = 0
    n = row // n_spatial
    s = row - n * n_spatial

    # 2. the sample's target: class and weight w_t, or probabilities; ignored samples read no
    #    logits unless their lse is wanted
    smooth = acc(smoothing)
    keep = acc(1.0) - smooth
    smooth_per_class = smooth / acc(n_classes)
    target_class = -1
    valid = active
    w_target = acc(1.0)
    if not is_prob:
        target_class = target_index[row]
        valid = active and target_class != ignore_index
        if valid:
            w_target = acc(weight[target_class])
    c_begin = cuda.threadIdx.x if valid or compute_lse and active else n_classes
    shift, _ = _soft_cap(logits[n, 0, s] + acc_zero, softcap, acc_like)
    if math.isinf(shift) or math.isnan(shift):
        shift = acc_zero  # K only has to be finite (a masked first class is -inf)

    # 3. one read of the row: each thread's online (max, sum exp), A and B over its classes
    running_max, running_sum, a, b = _row_statistics(
        logits, n, s, c_begin, cuda.blockDim.x, shift, compute_lse, target_class, target_prob,
        is_prob, weight, keep, smooth_per_class, acc_like, neg_inf, softcap)

    # 4. the group's sums and maximum; lse = center + log_sum, and the loss, by thread 0
    a = group_reduce(a, scratch, OP_SUM)
    if compute_lse:
        row_max = group_reduce(running_max, scratch, OP_MAX)
        row_sum = group_reduce(_rescale_sum(running_max, running_sum, row_max, neg_inf), scratch,
                               OP_SUM)
        b = group_reduce(b, scratch, OP_SUM)
        center, log_sum = _lse_parts(row_max, row_sum, neg_inf)
        row_lse = center + log_sum
        if active and cuda.threadIdx.x == 0:
            lse[row] = row_lse
            row_loss = acc_zero
            if valid:
                row_loss = (a * ((center - shift) + log_sum) - b
                            + acc(z_loss) * w_target * row_lse * row_lse)
            loss[row] = row_loss
    else:
        center, log_sum = _split_lse(lse[row], acc_like)
        row_lse = center + log_sum

    # 5. second read of the row: grad = scale (p (A + 2 z_loss w_t lse) - w q) times the
    #    slope dz'/dz (1 without a cap), zeros for ignored samples and where the scale is 0
    if write_grad and active:
        scale = acc_zero
        if valid:
            scale = acc(grad_scale[row if grad_scale.shape[0] > 1 else 0])
        coef = a + acc(2.0) * acc(z_loss) * w_target * row_lse
        for c in range(cuda.threadIdx.x, n_classes, cuda.blockDim.x):
            g = acc_zero
            if scale != acc_zero:
                z, slope = _soft_cap(logits[n, c, s] + acc_zero, softcap, acc_like)
                wq = _class_coefficient(c, n, s, target_class, target_prob, is_prob, weight,
                                        keep, smooth_per_class, acc_like)
                g = scale * (math.exp((z - center) - log_sum) * coef - wq) * slope
            grad[n, c, s] = g


# --------------------------------------------------------------------------------------------
# Dense rows: the common case, with few instructions per logit
# --------------------------------------------------------------------------------------------
#: Logits a thread of the dense-row kernel loads before folding them into its running
#: ``(max, sum)``: that many independent loads in flight per thread, and one rescale of the
#: running sum per chunk instead of a compare-and-branch per logit.
CHUNK = 8
_LOG2E = np.float32(1.4426950408889634)
_NEG_INF32 = np.float32(-math.inf)
_ZERO32 = np.float32(0.0)
_ONE32 = np.float32(1.0)


@cuda.jit(device=True, inline=True)
def _to_float32(value):
    """A logit in float32: no instruction for float32 logits (``value + 0.0`` would be an
    ``FADD``), a conversion for float16 and bfloat16."""
    return np.float32(value)


@cuda.jit(device=True, inline=True)
def _capped32(z, cap, inv_cap):
    """``(z', dz'/dz)`` in float32: ``(z, 1)`` without a cap (``cap == 0``), else
    ``(c t, 1 - t^2)``, ``t = tanh(z / c)`` (``tanh.approx`` under the kernel's fast math)."""
    if cap == _ZERO32:
        return z, _ONE32
    t = math.tanh(z * inv_cap)
    return cap * t, _ONE32 - t * t


@cuda.jit(device=True, inline=True)
def _exp_shifted(z, row_max, log_sum2):
    """``exp((z - m) - log_sum)`` as ``2^((z - m) log2 e - log_sum log2 e)``: ``z - m`` comes
    first and is exact for nearby values, so large logits (1e4) lose nothing to the rounding
    of ``m log2 e``; one ``MUFU.EX2``."""
    return math.exp2((z - row_max) * _LOG2E - log_sum2)


@cuda.jit(device=True, inline=True)
def _load_chunk(z, start, width, n_classes, guarded, cap, inv_cap, values):
    """Capped logits ``start + k width`` (k < CHUNK) into ``values``; returns their maximum.
    ``guarded`` (a constant): the chunk may run past the row, whose missing logits read as
    ``-inf``; the unguarded form has no index arithmetic at all (constant offsets)."""
    chunk_max = _NEG_INF32
    for k in range(CHUNK):
        c = start + np.uint64(k * width)
        value = _NEG_INF32
        if not guarded or c < n_classes:
            value, _ = _capped32(_to_float32(z[c]), cap, inv_cap)
        values[k] = value
        chunk_max = max(chunk_max, value)
    return chunk_max


@cuda.jit(device=True, inline=True)
def _fold_chunk(values, chunk_max, running_max, running_sum):
    """Online softmax over a chunk: ``(m', s')`` with ``m' = max(m, chunk max)`` and
    ``s' = s e^(m - m') + sum_k e^(z_k - m')``. While everything so far is ``-inf`` the
    exponentials are taken relative to 0 (0 for ``-inf``; a NaN stays NaN)."""
    new_max = max(running_max, chunk_max)
    base = new_max if new_max != _NEG_INF32 else _ZERO32
    running_sum *= _exp_shifted(running_max, base, _ZERO32)
    for k in range(CHUNK):
        running_sum += _exp_shifted(values[k], base, _ZERO32)
    return new_max, running_sum


@cuda.jit(device=True, inline=True)
def _smoothing_chunk(values, weight, start, width, n_classes, guarded, shift, weight_sum,
                     weighted_z):
    """``sum_c w_c`` and ``sum_c w_c (z_c - K)`` over the chunk's classes (label smoothing;
    ``guarded`` as for :func:`_load_chunk`)."""
    for k in range(CHUNK):
        c = start + np.uint64(k * width)
        if not guarded or c < n_classes:
            w_c = np.float32(weight[c])
            weight_sum += w_c
            weighted_z += w_c * (values[k] - shift)
    return weight_sum, weighted_z


@cuda.jit(device=True, inline=True)
def _statistics_chunk(z, weight, start, width, n_classes, guarded, cap, inv_cap, smoothed,
                      shift, values, running_max, running_sum, weight_sum, weighted_z):
    """Pass 1 over one chunk: :func:`_load_chunk`, :func:`_fold_chunk` and with label
    smoothing :func:`_smoothing_chunk`; returns the four running values."""
    chunk_max = _load_chunk(z, start, width, n_classes, guarded, cap, inv_cap, values)
    running_max, running_sum = _fold_chunk(values, chunk_max, running_max, running_sum)
    if smoothed:
        weight_sum, weighted_z = _smoothing_chunk(values, weight, start, width, n_classes,
                                                  guarded, shift, weight_sum, weighted_z)
    return running_max, running_sum, weight_sum, weighted_z


@cuda.jit(device=True, inline=True)
def _write_chunk(z, g, weight, start, width, n_classes, guarded, cap, inv_cap, row_max,
                 log_sum2, p_factor, smooth_term, smoothed, values, weights):
    """``g_c = (p_c A' - [smoothing] w_c s scale / C) dz'/dz`` for the chunk's classes: the
    gradient of every class but the target's own term (see :func:`_dense_kernel`).

    All the chunk's logits (and weights) are loaded into ``values`` (``weights``) before the
    first store: ``g`` may alias ``z``, so the compiler keeps every load after the stores that
    precede it in the code, and a load after each store would leave one load in flight per
    thread."""
    for k in range(CHUNK):
        c = start + np.uint64(k * width)
        if not guarded or c < n_classes:
            values[k] = _to_float32(z[c])
            if smoothed:
                weights[k] = np.float32(weight[c])
    if smoothed:  # two loops, so that the common one carries no predicated smoothing code
        for k in range(CHUNK):
            c = start + np.uint64(k * width)
            if not guarded or c < n_classes:
                value, slope = _capped32(values[k], cap, inv_cap)
                p = _exp_shifted(value, row_max, log_sum2) * p_factor
                g[c] = (p - smooth_term * weights[k]) * slope
    else:
        for k in range(CHUNK):
            c = start + np.uint64(k * width)
            if not guarded or c < n_classes:
                value, slope = _capped32(values[k], cap, inv_cap)
                g[c] = _exp_shifted(value, row_max, log_sum2) * p_factor * slope


@functools.cache
def _dense_kernel(width):
    """The dense-row kernel for ``width`` threads per row (a constant of the compiled code:
    the ``k``-th logit of a chunk sits at the constant offset ``k * width`` from the first,
    so the loads of a chunk need no index arithmetic); built on first use and kept.

    It does what :func:`_ce_rows` does, the same math (module docstring), for the common case
    at a handful of instructions per logit: rows of contiguous classes (``S = 1``),
    class-index targets, float16 / bfloat16 / float32 logits (float32 accumulation),
    ``blockDim = (width, rows per block)``, ``width`` a multiple of 32. Arguments: those of
    :func:`_ce_rows` without ``target_prob``, ``is_prob`` and ``acc_like``; logits and grad
    are ``(N, C)`` and C-contiguous; grad may alias logits (each element is read, then
    written, by one thread: both passes give class ``c`` to the same thread); without label
    smoothing only the target's entry of ``weight`` is read.

    * Pass 1 loads :data:`CHUNK` logits per thread (:func:`_load_chunk`), then rescales the
      running sum once and adds their exponentials (:func:`_fold_chunk`); only the last,
      partial chunk of a thread checks the row's end. Unsigned 64-bit indices: Numba adds a
      negative-index fix-up to every signed index.
    * ``A`` and ``B`` come from the target's logit and weight, read once per thread, and with
      label smoothing from two running sums, ``sum_c w_c`` and ``sum_c w_c (z_c - K)``.
    * Pass 2 writes every class as if it were not the target (:func:`_write_chunk`); then the
      thread that owns the target class rewrites that one element with the target term
      ``-scale (1 - s) w_t dz'/dz`` subtracted, instead of comparing every class with it.
    * Fast math: ``exp2``, ``tanh`` and divisions are the hardware approximations (relative
      error about 2^-22) and denormal results flush to zero.
    """
    stride = np.uint64(CHUNK * width)
    tail = np.uint64((CHUNK - 1) * width)

    # the launch's block size as a bound: ptxas then keeps the registers within what a block
    # of that size can hold (64 per thread at 1,024 threads), whatever ptxas the driver has;
    # the simulator's jit takes no such option
    bounds = {} if SIMULATED else {"launch_bounds": max(THREADS, width)}

    @cuda.jit(fastmath=True, **bounds)
    def ce_dense_rows(mode, logits, target_index, weight, ignore_index, smoothing, z_loss,
                      softcap, lse, loss, grad, grad_scale):
        compute_lse = mode != MODE_BACKWARD
        write_grad = mode != MODE_FORWARD
        scratch = cuda.shared.array(SCRATCH_SIZE, np.float32)
        n_rows = logits.shape[0]
        n_classes = np.uint64(logits.shape[1])
        full_end = n_classes - tail if n_classes > tail else np.uint64(0)
        lane = np.uint64(cuda.threadIdx.x)
        row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = row < n_rows
        if not active:
            row = 0  # idle groups take part in the block's reductions on a valid row
        z = logits[row]
        g = grad[row]

        cap = np.float32(softcap)
        inv_cap = _ONE32 / cap if cap != _ZERO32 else _ZERO32
        target = target_index[row]
        valid = active and target != ignore_index
        target_class = np.uint64(target) if valid else np.uint64(0)
        w_target = np.float32(weight[target_class]) if valid else _ZERO32
        capped_target, slope_target = _capped32(_to_float32(z[target_class]), cap, inv_cap)
        shift, _ = _capped32(_to_float32(z[0]), cap, inv_cap)
        if math.isinf(shift) or math.isnan(shift):
            shift = _ZERO32  # K only has to be finite
        smooth = np.float32(smoothing)
        smoothed = smooth != _ZERO32
        keep = _ONE32 - smooth
        smooth_per_class = smooth / np.float32(n_classes)

        # 1. this thread's share of the row: online (max, sum exp), and with label smoothing
        #    sum_c w_c and sum_c w_c (z_c - K)
        running_max = _NEG_INF32
        running_sum = _ZERO32
        weight_sum = _ZERO32
        weighted_z = _ZERO32
        values = cuda.local.array(CHUNK, np.float32)
        weights = cuda.local.array(CHUNK, np.float32)
        if compute_lse:
            start = lane
            while start < full_end:  # whole chunks, then at most one that the row's end cuts
                running_max, running_sum, weight_sum, weighted_z = _statistics_chunk(
                    z, weight, start, width, n_classes, False, cap, inv_cap, smoothed, shift,
                    values, running_max, running_sum, weight_sum, weighted_z)
                start += stride
            if start < n_classes:
                running_max, running_sum, weight_sum, weighted_z = _statistics_chunk(
                    z, weight, start, width, n_classes, True, cap, inv_cap, smoothed, shift,
                    values, running_max, running_sum, weight_sum, weighted_z)
        elif smoothed:
            for c in range(cuda.threadIdx.x, logits.shape[1], width):
                weight_sum += np.float32(weight[c])

        # 2. the row's statistics, A = sum_c w_c q_c, B = sum_c w_c q_c (z_c - K), the loss
        if smoothed:
            weight_sum = group_reduce(weight_sum, scratch, OP_SUM)
        a = keep * w_target + smooth_per_class * weight_sum
        if compute_lse:
            row_max = group_reduce(running_max, scratch, OP_MAX)
            base = row_max if row_max != _NEG_INF32 else _ZERO32
            row_sum = group_reduce(running_sum * _exp_shifted(running_max, base, _ZERO32),
                                   scratch, OP_SUM)
            if smoothed:
                weighted_z = group_reduce(weighted_z, scratch, OP_SUM)
            log_sum = math.log(row_sum) if row_max != _NEG_INF32 else row_sum
            row_lse = row_max + log_sum
            if active and lane == 0:
                lse[row] = row_lse
                row_loss = _ZERO32
                if valid:
                    b = (keep * w_target * (capped_target - shift)
                         + smooth_per_class * weighted_z)
                    row_loss = (a * ((row_max - shift) + log_sum) - b
                                + np.float32(z_loss) * w_target * row_lse * row_lse)
                loss[row] = row_loss
        else:
            row_max, log_sum = _split_lse(lse[row], scratch)  # float32, as scratch
            row_lse = row_max + log_sum

        # 3. second read of the row: grad = scale (p (A + 2 z_loss w_t lse) - w q) dz'/dz
        if write_grad and active:
            scale = _ZERO32
            if valid:
                scale = np.float32(grad_scale[row if grad_scale.shape[0] > 1 else 0])
            if scale == _ZERO32:
                for c in range(cuda.threadIdx.x, logits.shape[1], width):
                    g[c] = _ZERO32
                return
            p_factor = scale * (a + np.float32(2.0) * np.float32(z_loss) * w_target * row_lse)
            smooth_term = scale * smooth_per_class
            log_sum2 = log_sum * _LOG2E
            start = lane
            while start < full_end:
                _write_chunk(z, g, weight, start, width, n_classes, False, cap, inv_cap,
                             row_max, log_sum2, p_factor, smooth_term, smoothed, values,
                             weights)
                start += stride
            if start < n_classes:
                _write_chunk(z, g, weight, start, width, n_classes, True, cap, inv_cap,
                             row_max, log_sum2, p_factor, smooth_term, smoothed, values,
                             weights)
            if valid and target_class % np.uint64(width) == lane:
                # the target's own term, on the value this thread has just written (from the
                # logit read before any write: in place, it is gone by now)
                p = _exp_shifted(capped_target, row_max, log_sum2) * p_factor
                if smoothed:
                    p -= smooth_term * w_target
                g[target_class] = p * slope_target - scale * keep * w_target * slope_target

    return ce_dense_rows


@cuda.jit
def _first_bad_target(target, n_classes, ignore_index, first_bad):
    """``first_bad[0] = min`` flat position of a target outside ``[0, C)`` and not ignored
    (integer atomics: the result does not depend on the order).

    target: (N*S,) int64; first_bad: (1,) int64, holding N*S on entry.
    """
    i = cuda.grid(1)
    if i < target.shape[0]:
        t = target[i]
        if (t < 0 or t >= n_classes) and t != ignore_index:
            cuda.atomic.min(first_bad, 0, i)


@cuda.jit
def _target_weights(target, weights, ignore_index, sample_weight):
    """Per-sample ``w_t`` (0 for ignored samples): summed, the weighted-mean denominator.

    target: (N*S,) int64; weights: (C,) float64; sample_weight: (N*S,) float64, written.
    """
    i = cuda.grid(1)
    if i < target.shape[0]:
        t = target[i]
        sample_weight[i] = weights[t] if t != ignore_index else 0.0


@cuda.jit(device=True, inline=True)
def _mean_factor(denominator, divide):
    """What a sum of per-sample losses is multiplied by for the reduction: 1 unless
    ``divide``, else 1 / denominator[0], NaN when that is 0 (the targets' summed weight: the
    rows not ignored then get NaN, ignored ones zeros), as the host backend's ``sample_scale``
    computes it (float64, correctly rounded: the same bits)."""
    if not divide:
        return 1.0
    d = denominator[0]
    return math.nan if d == 0.0 else 1.0 / d


@cuda.jit
def _scaled_copy(src, dst, denominator, divide):
    """``dst[i] = factor * src[i]`` with dtype conversion (1-D), factor from
    :func:`_mean_factor`: the gradient scale per sample.

    src: (n,) any float dtype, any stride; dst: (n,) float64; denominator: (1,) float64
    (read with ``divide`` only).
    """
    i = cuda.grid(1)
    if i < dst.shape[0]:
        dst[i] = _mean_factor(denominator, divide) * float64(src[i])


@cuda.jit
def _reduced_value(total, denominator, divide, out):
    """``out[0]`` = the summed losses ``total[0]``, divided by ``denominator[0]`` with
    ``divide`` (NaN when it is 0, PyTorch's mean over no sample), rounded to out's dtype.

    total, denominator: (1,) float64; out: (1,) float32 or float64.
    """
    if cuda.grid(1) == 0:
        value = total[0]
        if divide:
            d = denominator[0]
            value = math.nan if d == 0.0 else value / d
        out[0] = value


@cuda.jit
def _fill(dst, value):
    """``dst[i] = value``. dst: (n,) float64."""
    i = cuda.grid(1)
    if i < dst.shape[0]:
        dst[i] = value


#: The widths :func:`_threads_per_row` picks for rows of more than 32 classes: those of the
#: dense-row kernels compiled to PTX in CI (any multiple of 32 works).
DENSE_WIDTHS = (WARP_SIZE, 256, 1024)


def _threads_per_row(n_classes: int, n_spatial: int) -> int:
    """Threads cooperating on one sample (see the module docstring)."""
    if n_spatial > 1 or n_classes <= 32:
        return 1
    if n_classes <= 2048:
        return WARP_SIZE
    return 1024 if n_classes >= 32768 and not SIMULATED else 256


# --------------------------------------------------------------------------------------------
# Preparing the kernels' arrays (backend interface)
# --------------------------------------------------------------------------------------------
def _flat(name, a):
    """1-D view of a device array whose axes merge into one stride (see ``_arrays``)."""
    if a.ndim == 1:
        return a
    size, stride = _arrays.merge_axes(name, a.shape, a.strides, a.dtype.itemsize)
    return _arrays.strided_view(a, (size,), (stride,))


def _blocks(n):
    return _arrays.launch_blocks(n, THREADS)


def index_target(target, *, stream=None):
    """Flat contiguous int64 class indices (int32 or strided input is converted on device)."""
    stream = _arrays.resolve_stream(stream)
    flat = _flat("target", _arrays.as_array("target", target))
    if flat.dtype == np.int64 and flat.strides[0] == 8:
        return flat
    out = _arrays.empty((flat.shape[0],), np.int64, stream)
    _arrays.convert[_blocks(out.shape[0]), THREADS, stream](flat, out)
    return out


def check_index_target(target, n_classes, ignore_index, *, stream=None) -> None:
    stream = _arrays.resolve_stream(stream)
    n = target.shape[0]
    first_bad = _arrays.to_device(np.array([n], dtype=np.int64), stream)
    _first_bad_target[_blocks(n), THREADS, stream](target, n_classes, ignore_index, first_bad)
    bad = int(first_bad.copy_to_host(stream=stream)[0])
    if bad < n:
        value = int(target[bad:bad + 1].copy_to_host(stream=stream)[0])
        raise ValueError(
            f"target values must be class indices in [0, {n_classes}) or ignore_index="
            f"{ignore_index}; got {value} at flat position {bad}")


def class_weights(weight, n_classes, *, stream=None):
    """float64 (C,) contiguous device array: ``weight`` converted, or ones."""
    stream = _arrays.resolve_stream(stream)
    out = _arrays.empty((n_classes,), np.float64, stream)
    if weight is None:
        _fill[_blocks(n_classes), THREADS, stream](out, 1.0)
    else:
        _arrays.convert[_blocks(n_classes), THREADS, stream](
            _flat("weight", _arrays.as_array("weight", weight)), out)
    return out


def target_weight_sum(target, weights, ignore_index, *, unit_weights=False, stream=None):
    """The host backend's, as a (1,) float64 device array that nothing waits for;
    ``unit_weights`` changes nothing here (the weights are summed on the device either way,
    ones included, which gives the count exactly)."""
    del unit_weights
    stream = _arrays.resolve_stream(stream)
    n = target.shape[0]
    sample_weight = _arrays.empty((n,), np.float64, stream)
    _target_weights[_blocks(n), THREADS, stream](target, weights, ignore_index, sample_weight)
    total = _arrays.empty((1,), np.float64, stream)
    _arrays.device_sum(sample_weight, total, stream)
    return total


def count_denominator(n_samples, *, stream=None):
    """``n_samples`` as a (1,) float64 device array (copied from the host, no wait)."""
    return _arrays.to_device(np.array([float(n_samples)]), _arrays.resolve_stream(stream))


def sample_scale(grad_loss, denominator, n_samples, *, stream=None):
    """float64 per-sample gradient scale, a device array: length 1 (a scalar ``grad_loss``,
    ``None`` = 1, or a one-value device array such as autograd's upstream gradient) or
    ``N * S`` (flattened), times the factor of ``denominator`` (:func:`_mean_factor`),
    computed on the device."""
    stream = _arrays.resolve_stream(stream)
    if grad_loss is None or np.ndim(grad_loss) == 0 and not is_device_array(grad_loss):
        values = _arrays.to_device(np.array([1.0 if grad_loss is None else float(grad_loss)]),
                                   stream)
        if denominator is None:
            return values
    else:
        values = _flat("grad_loss", _arrays.as_array("grad_loss", grad_loss))
        if values.shape[0] != 1 and values.shape[0] != n_samples:
            raise ValueError(f"grad_loss must hold 1 or {n_samples} values, "
                             f"got {values.shape[0]}")
    out = _arrays.empty((values.shape[0],), np.float64, stream)
    divide = denominator is not None
    _scaled_copy[_blocks(out.shape[0]), THREADS, stream](
        values, out, denominator if divide else _arrays.stand_in(np.float64), divide)
    return out


def per_sample(values, n_samples, *, stream=None):
    """A per-sample device array (e.g. the saved ``lse``) as flat float64, length ``N * S``."""
    stream = _arrays.resolve_stream(stream)
    flat = _flat("lse", _arrays.as_array("lse", values))
    if flat.dtype == np.float64 and flat.strides[0] == 8:
        return flat
    out = _arrays.empty((n_samples,), np.float64, stream)
    _arrays.convert[_blocks(n_samples), THREADS, stream](flat, out)
    return out


def reduced_loss(values, denominator, dtype, *, stream=None):
    """A 0-d device array of ``dtype``: the per-sample float64 losses summed in a fixed order
    (``_arrays.device_sum``), divided by ``denominator`` unless None, all on the device."""
    stream = _arrays.resolve_stream(stream)
    total = _arrays.empty((1,), np.float64, stream)
    _arrays.device_sum(values, total, stream)
    out = _arrays.empty((1,), dtype, stream)
    divide = denominator is not None
    _reduced_value[1, 1, stream](
        total, denominator if divide else _arrays.stand_in(np.float64), divide, out)
    return out.reshape(())


def sample_result(values, sample_shape, dtype, *, stream=None):
    """A per-sample float64 device array reshaped to ``sample_shape``, cast to ``dtype``."""
    stream = _arrays.resolve_stream(stream)
    if np.dtype(dtype) == values.dtype:
        return values.reshape(tuple(sample_shape))
    out = _arrays.empty((values.shape[0],), dtype, stream)
    _arrays.convert[_blocks(values.shape[0]), THREADS, stream](values, out)
    return out.reshape(tuple(sample_shape))


# --------------------------------------------------------------------------------------------
# Kernels (backend interface)
# --------------------------------------------------------------------------------------------
def fused(logits, target, weights, grad, grad_scale, options, *, stream=None,
          threads_per_row=None):
    """Per-sample losses (float64 device array, N * S); writes ``grad`` in the same kernel."""
    n = sample_count(logits.shape)
    stream = _arrays.resolve_stream(stream)
    loss = _arrays.empty((n,), np.float64, stream)
    lse = _arrays.empty((n,), np.float64, stream)
    _run(MODE_FUSED, logits, target, weights, options, lse, loss, grad, grad_scale, stream,
         threads_per_row)
    return loss


def forward(logits, target, weights, options, *, stream=None, threads_per_row=None):
    """``(loss, lse)`` per sample (float64 device arrays, N * S); writes nothing else."""
    n = sample_count(logits.shape)
    stream = _arrays.resolve_stream(stream)
    loss = _arrays.empty((n,), np.float64, stream)
    lse = _arrays.empty((n,), np.float64, stream)
    _run(MODE_FORWARD, logits, target, weights, options, lse, loss, None, None, stream,
         threads_per_row)
    return loss, lse


def backward(logits, target, weights, lse, grad, grad_scale, options, *, stream=None,
             threads_per_row=None):
    """Writes ``grad`` from the saved per-sample ``lse`` (float64 device array, N * S)."""
    stream = _arrays.resolve_stream(stream)
    _run(MODE_BACKWARD, logits, target, weights, options, lse, lse, grad, grad_scale, stream,
         threads_per_row)


def _run(mode, logits, target, weights, options, lse, loss, grad, grad_scale, stream,
         threads_per_row):
    """Views the arrays as (N, C, S) and launches :func:`_ce_rows` in ``mode`` (see the module
    docstring). The arrays a mode does not touch get stand-ins, since the kernel's arguments
    are arrays in every mode: the logits for ``grad`` and ``lse`` for ``grad_scale``
    (``MODE_FORWARD``), ``lse`` for ``loss`` (``MODE_BACKWARD``)."""
    logits3 = _arrays.view3("logits", _arrays.as_array("logits", logits), 1)
    n_classes, n_spatial = int(logits3.shape[1]), int(logits3.shape[2])
    if sample_count(logits.shape) == 0:
        return  # nothing to write; a launch would still read sample 0 for its idle threads
    is_prob = target.dtype.kind == "f" or target.dtype == _arrays.BFLOAT16
    if is_prob:
        target_prob = _arrays.view3("target", _arrays.as_array("target", target), 1)
        target_index = _arrays.stand_in(np.int64)
    else:
        target_prob = logits3
        target_index = target
    if mode == MODE_FORWARD:
        grad3 = logits3
        grad_scale = lse
    else:
        grad3 = _arrays.view3("grad", _arrays.as_array("grad", grad), 1)
    acc_like = _arrays.stand_in(stat_dtype(logits3.dtype))

    per_row = threads_per_row or _threads_per_row(n_classes, n_spatial)
    threads = max(THREADS, per_row)
    rows_per_block = threads // per_row
    blocks = _arrays.launch_blocks(sample_count(logits.shape), rows_per_block)
    launch = (blocks, (per_row, rows_per_block), stream)
    dense_logits, dense_grad = _arrays.dense_rows(logits3), _arrays.dense_rows(grad3)
    if (per_row >= WARP_SIZE and not is_prob and acc_like.dtype == np.float32
            and dense_logits is not None and dense_grad is not None):
        _dense_kernel(per_row)[launch](
            mode, dense_logits, target_index, weights, int(options.ignore_index),
            float(options.label_smoothing), float(options.z_loss),
            cap_argument(options.softcap), lse, loss, dense_grad, grad_scale)
        return
    _ce_rows[launch](
        mode, logits3, target_index, target_prob, is_prob, weights, int(options.ignore_index),
        float(options.label_smoothing), float(options.z_loss), cap_argument(options.softcap),
        acc_like, lse, loss, grad3, grad_scale)

