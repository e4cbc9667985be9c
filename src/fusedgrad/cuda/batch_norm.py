"""Batch normalization on NVIDIA GPUs: the ``@cuda.jit`` kernels, the shifted-data moments they
start from, and their host launchers.

Backend interface: the same functions, arguments and semantics as ``fusedgrad.cpu.batch_norm``
(see its docstring), on device arrays, each with an extra keyword ``stream=None`` (see
``_arrays``): ``forward``, ``backward``, and the split building blocks ``channel_stats``,
``normalize``, ``backward_reduce``, ``backward_elementwise``; the fused ReLU too, as on the CPU:
``forward(..., relu=True)`` / ``normalize(..., relu=True)`` write ``max(y, 0)``, and
``backward(..., relu_output3=y3)`` / ``backward_elementwise(..., relu_output3=y3)`` mask dy
where that output is not positive, in the sums and in dx. Outputs are allocated with
``_arrays.empty`` (the array interface of ``fusedgrad._device.arrays``). Big arrays come
in the kernel layout ``(P, C, S)`` (any strides; NCHW -> ``(N, C, H*W)``, channels-last ->
``(N*H*W, C, 1)``); ``(C,)`` parameters may be float32 or float64 device arrays or ``None``.
Results are new device arrays (``channel_stats``' count is a Python int).

Math (``docs/derivations.md``, section 2), per channel over its m = P*S values:

    mean = sum x / m,  var = sum (x - mean)^2 / m,  invstd = 1 / sqrt(var + eps)
    y    = (x - mean) invstd w + b
    dx   = w invstd (dy - sum dy / m - xhat sum(dy xhat) / m),  xhat = (x - mean) invstd

Work decomposition (fixed by the shape only, so results are bitwise reproducible):

* Reductions (statistics; backward sums) run on a grid ``(channel blocks, parts)``. The m
  positions ``j = p * S + s`` of a channel are cut into ``parts`` contiguous ranges. A block of
  ``_reduce.THREADS`` threads serves ``seg`` channels: ``seg = 1`` when ``S > 1`` (consecutive
  threads read consecutive ``s``: coalesced) and ``seg = 32`` for the rows / channels-last
  layout ``(P, C, 1)`` (consecutive threads read consecutive channels of one row: coalesced).
  Each thread accumulates in the accumulation dtype (float32 for float16/32 input), then the
  block merges its threads in float64 with a fixed shared-memory tree
  (:func:`~fusedgrad.cuda._reduce.segment_reduce`: for the statistics shifted sums ->
  ``(count, mean, m2)`` -> Chan merge; plain sums for the backward), and writes one partial per
  (part, channel). A second kernel, one thread per channel, merges the partials in part order.
  No floating-point atomics anywhere. Rows of unit-stride positions (NCHW) take
  :func:`_spatial_partials` instead: a block per (channel, part of whole rows), the
  positions of each row in chunks at constant offsets, no integer division (about 5
  instructions per element for the statistics, against about 42 in :func:`_partials`); dense
  rows of channels (channels-last, ``(N, C)``) take :func:`_columns_partials`: a thread per
  channel and row group, flat indices advanced by one addition per element.
  :func:`_kernel_family` picks the family from the arrays a pass touches.
* Elementwise passes (normalise, dx) are one kernel over all elements with per-channel
  coefficients precomputed by a tiny kernel: ``out = alpha dy + beta ((x - mean_hi) - mean_lo)
  + gamma``. The float64 mean is split into two floats ``mean_hi + mean_lo`` so that ``x - mean``
  keeps full accuracy in float32 arithmetic when the mean is large compared with the spread.
  Rows of unit-stride positions (NCHW) take :func:`_spatial_apply` (coefficients in
  registers per row, 8 loads in flight per thread, about 7 instructions per element in the
  forward against about 31 for :func:`_apply`), dense rows of channels :func:`_columns_apply`
  (about 10); :func:`_apply` takes every other layout.
* Running statistics are updated on the device by the per-channel kernel, in float64.
* Launches: the fused ``forward`` is three (the statistics' partials; one per-channel kernel,
  :func:`_forward_channels`, that merges them, computes ``invstd``, updates the running
  buffers and the coefficients; the elementwise pass), the fused ``backward`` three (the
  partials, which split the mean themselves; :func:`_backward_channels`; dx). The split building
  blocks (``channel_stats``, ``normalize``, ``backward_reduce``, ``backward_elementwise``)
  launch the same per-channel arithmetic as separate kernels, so split and fused give the
  same bits.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float64

from .._validate import stat_dtype
from . import _arrays
from ._reduce import (OP_CHAN, OP_SUM, SCRATCH_SIZE, THREADS, WARP_SIZE, chan_merge,
                      segment_reduce)
from ._target import SIMULATED

#: Values a thread accumulates per part, on average: sets the number of parts per channel.
_ITEMS_PER_THREAD = 4 if SIMULATED else 16
#: Upper bound on the parts of one channel (the merge kernel walks them sequentially).
_MAX_PARTS = 1024
#: Channels per block in the rows / channels-last layout (a warp reads 32 adjacent channels).
_ROW_SEGMENT = 8 if SIMULATED else WARP_SIZE

#: Narrowest row segment of the elementwise kernel's blocks (a warp on a GPU).
_MIN_APPLY_WIDTH = 4 if SIMULATED else WARP_SIZE
#: gridDim.y limit of CUDA; the elementwise kernel loops over further rows.
_MAX_GRID_Y = 65535
#: Blocks of the spatial elementwise kernel at most: enough to fill any current GPU many times
#: over (132 SMs x 8 blocks of 256 threads is one wave on an H100/H200); its blocks loop over
#: the remaining rows.
_SPATIAL_MAX_BLOCKS = 132 * 8 * 8

# Rows of the per-channel coefficient array consumed by the elementwise kernel.
_MEAN_HI, _MEAN_LO, _ALPHA, _BETA, _GAMMA, _N_COEF = range(6)


# --------------------------------------------------------------------------------------------
# Device functions
# --------------------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def _shifted_moments(count, sum_shifted, sum_sq_shifted, shift):
    """``(count, mean, m2)`` in float64 from sums of ``x - shift`` and ``(x - shift)^2``.

    The shifted-data algorithm: with ``shift`` one of the values themselves, the cancellation in
    ``m2 = S2 - S1^2 / n`` is harmless even when the mean is far from zero.
    """
    n = float64(count)
    if count == 0:
        return n, n, n
    s1 = float64(sum_shifted)
    mean_shift = s1 / n
    return n, float64(shift) + mean_shift, max(float64(sum_sq_shifted) - s1 * mean_shift, 0.0)


@cuda.jit(device=True, inline=True)
def _relu(v, zero):
    """max(v, 0) that keeps NaN, as ``torch.relu`` does."""
    return zero if v < zero else v


@cuda.jit(device=True, inline=True)
def _masked(g, y, zero):
    """The ReLU's backward: the upstream gradient where the ReLU's output is positive, else 0."""
    return g if y > zero else zero


@cuda.jit(device=True, inline=True)
def _part_positions(n_positions, n_parts, part):
    """``[start, stop)`` of the positions of one part: equal contiguous ranges, fixed by shape."""
    per_part = (n_positions + n_parts - 1) // n_parts
    start = part * per_part
    return start, min(start + per_part, n_positions)


@cuda.jit(device=True, inline=True)
def _block_channel(seg, n_channels):
    """This thread's channel, its lane among the threads of that channel, and the lane count."""
    # 32-bit unsigned: seg <= 32 and blockDim.x <= 1024, and Numba's int64 division would be a
    # call of the software 64-bit division.
    tid = np.uint32(cuda.threadIdx.x)
    seg32 = np.uint32(seg)
    channel = cuda.blockIdx.x * seg + np.int64(tid % seg32)
    return (channel, np.int64(tid // seg32), np.int64(np.uint32(cuda.blockDim.x) // seg32),
            channel < n_channels)


@cuda.jit(device=True, inline=True)
def _accumulate_pair(x3, dy3, relu_y3, with_grad, relu, c, start, stop, step, n_inner, shift,
                     mean_hi, mean_lo, invstd, acc_zero):
    """A thread's sums over positions ``j = start, start+step, .. < stop`` of channel ``c``.

    Statistics (``with_grad`` false): ``sum (x - shift)``, ``sum (x - shift)^2`` (shifted data).
    Backward: ``sum dy``, ``sum dy * xhat`` with ``xhat = ((x - mean_hi) - mean_lo) invstd``;
    with a fused ReLU (``relu``; ``relu_y3`` its output) dy is masked where that output is not
    positive.
    Returns ``(count, u, v)``. Position ``j`` is element ``(p, s) = divmod(j, S)``; ``(p, s)``
    advance by a precomputed ``divmod(step, S)`` with one carry, so the loop has no integer
    division (64-bit division costs far more than the memory access on a GPU).
    """
    u = acc_zero
    v = acc_zero
    count = 0
    p = start // n_inner
    s = start - p * n_inner
    dp = step // n_inner
    ds = step - dp * n_inner
    for _ in range(start, stop, step):
        x = x3[p, c, s] + acc_zero
        if with_grad:
            g = dy3[p, c, s] + acc_zero
            if relu:
                g = _masked(g, relu_y3[p, c, s] + acc_zero, acc_zero)
            u += g
            v += g * (((x - mean_hi) - mean_lo) * invstd)
        else:
            d = x - shift
            u += d
            v += d * d
        count += 1
        p += dp
        s += ds
        if s >= n_inner:
            s -= n_inner
            p += 1
    return count, u, v


@cuda.jit(device=True, inline=True)
def _reduction_constants(with_grad, acc_like, mean, invstd, c, first_value):
    """``(shift, mean_hi, mean_lo, invstd)`` of channel ``c`` for the sums of
    :func:`_accumulate_pair`: the statistics shift the data by one of the channel's values,
    ``first_value`` (see :func:`_shifted_moments`); the backward centres it with ``mean[c]``
    split into ``hi + lo`` (as :func:`_store_center` splits it for the elementwise pass) and
    scales by ``invstd``. In the accumulation dtype (that of ``acc_like``)."""
    acc = acc_like.dtype.type
    zero = acc(0.0)
    if with_grad:
        center = float64(mean[c])
        hi = acc(center)
        return zero, hi, acc(center - float64(hi)), acc(invstd[c])
    return acc(first_value), zero, zero, zero


@cuda.jit(device=True, inline=True)
def _finish_partials(with_grad, count, u, v, shift, segment, write, entry, s_a, s_b, s_c,
                     part_a, part_b, part_c, part, c):
    """The block's part of a reduction kernel: its threads of each channel combined with
    :func:`~fusedgrad.cuda._reduce.segment_reduce` (sums, or Chan merges of each thread's
    shifted moments), then the threads with ``write`` store scratch ``entry``, their channel's
    result, as the ``(part, c)`` partials."""
    if with_grad:
        segment_reduce(float64(u), float64(v), 0.0, s_a, s_b, s_c, segment, OP_SUM)
    else:
        n, mean, m2 = _shifted_moments(count, u, v, shift)
        segment_reduce(n, mean, m2, s_a, s_b, s_c, segment, OP_CHAN)
    if write:
        part_a[part, c] = s_a[entry]
        part_b[part, c] = s_b[entry]
        if not with_grad:
            part_c[part, c] = s_c[entry]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@cuda.jit
def _partials(x3, dy3, relu_y3, with_grad, relu, acc_like, mean, invstd, seg, n_parts, part_a,
              part_b, part_c):
    """One partial per (part, channel) of a (P, C, S) array, float64, for block
    ``(channel block, part)``.

    x3: (P, C, S), float16 / bfloat16 / float32 / float64;
    dy3: (P, C, S), the dtype of x3;
    relu_y3: (P, C, S), the dtype of x3: with ``relu`` (and ``with_grad``) the output of a
    forward with a fused ReLU, whose backward masks dy; else a stand-in (x3), not read;
    acc_like: any array of the accumulation dtype (float64 for float64 x3, else float32);
    mean, invstd: (C,) any float dtype (stand-ins, not read, for the statistics);
    part_a, part_b, part_c: (n_parts, C) float64, written.

    * statistics (``with_grad`` false): ``(count, mean, m2)`` of ``x3`` into
      ``part_a, part_b, part_c`` (``dy3`` is a dummy);
    * backward: ``sum dy`` and ``sum dy xhat`` into ``part_a, part_b`` (``part_c`` untouched),
      ``xhat = ((x - mean_hi) - mean_lo) invstd`` (:func:`_reduction_constants`).
    """
    acc = acc_like.dtype.type
    s_a = cuda.shared.array(SCRATCH_SIZE, float64)
    s_b = cuda.shared.array(SCRATCH_SIZE, float64)
    s_c = cuda.shared.array(SCRATCH_SIZE, float64)
    n_inner = x3.shape[2]
    c, lane, lanes, valid = _block_channel(seg, x3.shape[1])
    start, stop = _part_positions(x3.shape[0] * n_inner, n_parts, cuda.blockIdx.y)
    count = 0
    u = acc(0.0)
    v = acc(0.0)
    shift = acc(0.0)
    if valid:
        shift, mean_hi, mean_lo, inv = _reduction_constants(with_grad, acc_like, mean, invstd, c,
                                                            x3[0, c, 0])
        count, u, v = _accumulate_pair(x3, dy3, relu_y3, with_grad, relu, c, start + lane, stop,
                                       lanes, n_inner, shift, mean_hi, mean_lo, inv, acc(0.0))
    _finish_partials(with_grad, count, u, v, shift, seg, lane == 0 and valid, cuda.threadIdx.x,
                     s_a, s_b, s_c, part_a, part_b, part_c, cuda.blockIdx.y, c)


@cuda.jit(device=True, inline=True)
def _merged_parts(part_count, part_mean, part_m2, c):
    """``(mean, m2)`` of channel ``c``: its partials Chan-merged in part order (float64)."""
    n = part_count[0, c]
    mu = part_mean[0, c]
    sq = part_m2[0, c]
    for k in range(1, part_count.shape[0]):
        n, mu, sq = chan_merge(n, mu, sq, part_count[k, c], part_mean[k, c], part_m2[k, c])
    return mu, sq


@cuda.jit
def _merge_stat_parts(part_count, part_mean, part_m2, mean, m2):
    """Chan-merge the partials of each channel in part order (one thread per channel).

    part_count, part_mean, part_m2: (n_parts, C) float64; mean, m2: (C,) float64, written.
    """
    c = cuda.grid(1)
    if c >= mean.shape[0]:
        return
    mean[c], m2[c] = _merged_parts(part_count, part_mean, part_m2, c)


@cuda.jit(device=True, inline=True)
def _summed_parts(part_dy, part_dy_xhat, c):
    """``(sum dy, sum dy xhat)`` of channel ``c``: its partials summed in part order."""
    a = part_dy[0, c]
    b = part_dy_xhat[0, c]
    for k in range(1, part_dy.shape[0]):
        a += part_dy[k, c]
        b += part_dy_xhat[k, c]
    return a, b


@cuda.jit
def _sum_grad_parts(part_dy, part_dy_xhat, sum_dy, sum_dy_xhat):
    """Sum the partials of each channel in part order (one thread per channel).

    part_dy, part_dy_xhat: (n_parts, C) float64; sum_dy, sum_dy_xhat: (C,) float64, written.
    """
    c = cuda.grid(1)
    if c >= sum_dy.shape[0]:
        return
    sum_dy[c], sum_dy_xhat[c] = _summed_parts(part_dy, part_dy_xhat, c)


@cuda.jit(device=True, inline=True)
def _optional(vec, has, c, default):
    return float64(vec[c]) if has else default


@cuda.jit(device=True, inline=True)
def _store_center(coef, c, mean):
    """``mean`` split into ``hi + lo`` in the accumulation dtype of ``coef``."""
    acc = coef.dtype.type
    hi = acc(mean)
    coef[_MEAN_HI, c] = hi
    coef[_MEAN_LO, c] = acc(mean - float64(hi))


@cuda.jit(device=True, inline=True)
def _normalizing_stats(mean, m2, count, training, eps, running_mean, running_var, has_running,
                       momentum, c):
    """``(mean, invstd)`` that normalise channel ``c``: the batch's (``mean``, ``m2`` of its
    ``count`` values) in training, the running buffers in eval; ``invstd = 1 / sqrt(var +
    eps)``. In training also the running-buffer update ``r = (1 - momentum) r + momentum
    stat``, with the unbiased variance ``m2 / (count - 1)``. float64."""
    if training:
        var = m2 / count
        if has_running:
            running_mean[c] = (1.0 - momentum) * float64(running_mean[c]) + momentum * mean
            running_var[c] = ((1.0 - momentum) * float64(running_var[c])
                              + momentum * (m2 / (count - 1.0)))
    else:
        mean = float64(running_mean[c])
        var = float64(running_var[c])
    return mean, 1.0 / math.sqrt(var + eps)


@cuda.jit(device=True, inline=True)
def _store_normalize_coefficients(coef, c, mean, invstd, weight, has_weight, bias, has_bias):
    """Channel ``c``'s ``y = beta ((x - mean_hi) - mean_lo) + gamma``: ``beta = invstd w``,
    ``gamma = b``, ``alpha = 0`` (no dy term); ``mean`` and ``invstd`` float64."""
    _store_center(coef, c, mean)
    coef[_ALPHA, c] = 0.0
    coef[_BETA, c] = invstd * _optional(weight, has_weight, c, 1.0)
    coef[_GAMMA, c] = _optional(bias, has_bias, c, 0.0)


@cuda.jit
def _forward_channels(part_count, part_mean, part_m2, count, training, eps, running_mean,
                      running_var, has_running, momentum, weight, has_weight, bias, has_bias,
                      mean_out, invstd_out, coef):
    """The fused forward's per-channel step, one thread per channel, one launch for what
    :func:`_merge_stat_parts`, the statistics and :func:`_normalize_coefficients` compute
    (the same float64 arithmetic): in training the partials merged (:func:`_merged_parts`),
    then :func:`_normalizing_stats` (and the running-buffer update), then the normalising
    coefficients.

    part_count, part_mean, part_m2: (n_parts, C) float64 (stand-ins, not read, in eval);
    running_mean, running_var: (C,) any float dtype (stand-ins without ``has_running``);
    weight, bias: (C,) any float dtype (stand-ins without ``has_weight`` / ``has_bias``);
    mean_out, invstd_out: (C,) the stat dtype, written; coef: (6, C), the accumulation dtype,
    written.
    """
    c = cuda.grid(1)
    if c >= coef.shape[1]:
        return
    mean = 0.0
    m2 = 0.0
    if training:
        mean, m2 = _merged_parts(part_count, part_mean, part_m2, c)
    mean, invstd = _normalizing_stats(mean, m2, count, training, eps, running_mean, running_var,
                                      has_running, momentum, c)
    mean_out[c] = mean
    invstd_out[c] = invstd
    _store_normalize_coefficients(coef, c, mean, invstd, weight, has_weight, bias, has_bias)


@cuda.jit
def _normalize_coefficients(mean, invstd, weight, has_weight, bias, has_bias, coef):
    """Per channel, :func:`_store_normalize_coefficients` (the split API's normalise).

    mean, invstd: (C,) any float dtype; weight, bias: (C,) any float dtype (1-element stand-ins
    without ``has_weight`` / ``has_bias``); coef: (6, C), the accumulation dtype, written.
    """
    c = cuda.grid(1)
    if c >= coef.shape[1]:
        return
    _store_normalize_coefficients(coef, c, float64(mean[c]), float64(invstd[c]), weight,
                                  has_weight, bias, has_bias)


@cuda.jit(device=True, inline=True)
def _store_dx_coefficients(coef, ch, mean, invstd, weight, has_weight, sum_dy, sum_dy_xhat,
                           count, training):
    """Channel ``ch``'s ``dx = a dy + b (x - mean) + c`` (float64 ``mean``, ``invstd`` and
    sums): in training ``a = w invstd``, ``b = -a invstd sum(dy xhat) / m``,
    ``c = -a sum(dy) / m``; in eval ``b = c = 0``."""
    alpha = _optional(weight, has_weight, ch, 1.0) * invstd
    _store_center(coef, ch, mean)
    coef[_ALPHA, ch] = alpha
    if training:
        coef[_BETA, ch] = -alpha * invstd * sum_dy_xhat / count
        coef[_GAMMA, ch] = -alpha * sum_dy / count
    else:
        coef[_BETA, ch] = 0.0
        coef[_GAMMA, ch] = 0.0


@cuda.jit
def _dx_coefficients(mean, invstd, weight, has_weight, sum_dy, sum_dy_xhat, count, training,
                     coef):
    """Per channel, :func:`_store_dx_coefficients` (the split API's backward elementwise).

    mean, invstd: (C,) any float dtype; weight: (C,) any float dtype (a 1-element stand-in
    without ``has_weight``); sum_dy, sum_dy_xhat: (C,) float64; coef: (6, C), the accumulation
    dtype, written.
    """
    ch = cuda.grid(1)
    if ch >= coef.shape[1]:
        return
    _store_dx_coefficients(coef, ch, float64(mean[ch]), float64(invstd[ch]), weight, has_weight,
                           sum_dy[ch], sum_dy_xhat[ch], count, training)


@cuda.jit
def _backward_channels(part_dy, part_dy_xhat, mean, invstd, weight, has_weight, count,
                       training, coef, grads):
    """The fused backward's per-channel step, one thread per channel, one launch for what
    :func:`_sum_grad_parts`, :func:`_dx_coefficients` and the conversion of the sums compute:
    the partials summed in part order, the dx coefficients from those sums, and the sums in
    the stat dtype (``grads[0]`` = sum dy = dbias, ``grads[1]`` = sum dy xhat = dweight).

    part_dy, part_dy_xhat: (n_parts, C) float64; mean, invstd, weight: as for
    :func:`_dx_coefficients`; coef: (6, C), the accumulation dtype, written; grads: (2, C), the
    stat dtype, written.
    """
    c = cuda.grid(1)
    if c >= coef.shape[1]:
        return
    sum_dy, sum_dy_xhat = _summed_parts(part_dy, part_dy_xhat, c)
    _store_dx_coefficients(coef, c, float64(mean[c]), float64(invstd[c]), weight, has_weight,
                           sum_dy, sum_dy_xhat, count, training)
    grads[0, c] = sum_dy
    grads[1, c] = sum_dy_xhat


@cuda.jit(device=True, inline=True)
def _apply_one(x3, dy3, relu_y3, has_dy, relu, out3, p, c, s, mean_hi, mean_lo, alpha, beta,
               gamma, acc_zero):
    """One element of :func:`_apply`."""
    centered = (x3[p, c, s] + acc_zero - mean_hi) - mean_lo
    value = beta * centered + gamma
    if has_dy:
        g = dy3[p, c, s] + acc_zero
        if relu:
            g = _masked(g, relu_y3[p, c, s] + acc_zero, acc_zero)
        value += alpha * g
    elif relu:
        value = _relu(value, acc_zero)
    out3[p, c, s] = value


@cuda.jit
def _apply(x3, dy3, relu_y3, has_dy, relu, coef, out3):
    """``out = alpha dy + beta ((x - mean_hi) - mean_lo) + gamma`` per channel, every element.

    Fused ReLU (``relu``, one flag for both directions, as the CPU kernels' ``relu`` /
    ``relu_y``): without ``has_dy`` (the forward) the kernel writes ``max(out, 0)`` (NaN stays
    NaN); with ``has_dy`` (the backward) ``relu_y3`` is the forward's output and dy is masked
    where it is not positive (the ReLU's backward). A stand-in array (x3) takes ``relu_y3``'s
    place otherwise: numba-cuda 0.30.4 types a ``None`` argument but cannot launch with one
    (``NotImplementedError: (none, None)`` in the dispatcher's ``_prepare_args``, seen on an
    H200), the reason the CPU's None-or-array ``relu_y`` is a flag and an array here.

    Launched (:func:`_launch_apply`) for the layouts the spatial and column kernels do not
    take (:func:`_kernel_family`).
    2-D blocks and grid: ``y`` walks the rows of the view, ``x`` runs along the contiguous axis.
    With ``S > 1`` a row is one ``(p, c)`` (its channel computed once per row), threads along
    ``s``; with ``S == 1`` (rows / channels-last) a row is one ``p``, threads along ``c``. Short
    rows (7x7 maps) share a block (``blockDim.y`` rows). No per-element integer division (two
    per row: the row's channel and the inner range's trip count). A division-free variant (a
    carried ``(p, c)``, while loops, coefficients hoisted per row) was 1.05-1.5x slower on an
    H200: LLVM unrolled its loops four rows deep (72 -> 118 registers); see docs/gpu.md.

    x3: (P, C, S), float16 / bfloat16 / float32 / float64; dy3: (P, C, S), the dtype of x3
    (read with ``has_dy`` only); relu_y3: (P, C, S), the dtype of x3 (read with ``has_dy`` and
    ``relu`` only); coef: (6, C), the accumulation dtype; out3: (P, C, S), the dtype of x3,
    written.
    """
    acc_zero = coef.dtype.type(0.0)
    n_channels = x3.shape[1]
    n_inner = x3.shape[2]
    spatial = n_inner > 1
    n_rows = x3.shape[0] * n_channels if spatial else x3.shape[0]
    length = n_inner if spatial else n_channels
    first_row = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    for row in range(first_row, n_rows, cuda.gridDim.y * cuda.blockDim.y):
        p = row // n_channels if spatial else row
        c = row - p * n_channels if spatial else 0
        for k in range(cuda.grid(1), length, cuda.gridsize(1)):
            s = k if spatial else 0
            if not spatial:
                c = k
            _apply_one(x3, dy3, relu_y3, has_dy, relu, out3, p, c, s, coef[_MEAN_HI, c],
                       coef[_MEAN_LO, c], coef[_ALPHA, c], coef[_BETA, c], coef[_GAMMA, c],
                       acc_zero)


# --------------------------------------------------------------------------------------------
# The elementwise pass over rows of contiguous positions (NCHW): few instructions per element
# --------------------------------------------------------------------------------------------
#: Elements a thread of :func:`_spatial_apply` loads before computing any: that many
#: independent loads in flight per thread (of x, and of dy and the ReLU's output when read).
CHUNK = 8
#: Threads per row of the spatial elementwise kernel: the narrow one for rows shorter than
#: ``CHUNK`` times the wide one (tests use smaller widths in the simulator).
SPATIAL_WIDTHS = (4, 8) if SIMULATED else (WARP_SIZE, 256)


@cuda.jit(device=True, inline=True)
def _load_chunk(x, dy, relu_y, first, index_step, position, position_step, limit, guarded,
                with_dy, relu, xs, gs, acc_like):
    """Every load of a chunk of :data:`CHUNK` elements, before any arithmetic or store (an
    output may alias an input, so the compiler keeps a load after every store before it, and
    one load in flight per thread would follow): x, and with ``with_dy`` dy (masked where the
    fused ReLU's output ``relu_y`` is not positive), at flat indices ``first + k index_step``
    of the 1-D views ``x``, ``dy``, ``relu_y``, into ``xs`` and ``gs`` in the accumulation dtype
    (that of ``acc_like``: a conversion costs no instruction for x of that dtype, where ``x + 0.0``
    would be an ``FADD``). Element ``k`` is at ``position + k position_step``, in the row while
    below ``limit``; ``guarded`` (a constant): the chunk may run past it. The spatial kernels
    step by a constant (``index_step = width``: constant offsets, no index arithmetic), the
    column ones by a row (one addition per element)."""
    acc = acc_like.dtype.type
    index = first
    for k in range(CHUNK):
        if not guarded or position < limit:
            xs[k] = acc(x[index])
            if with_dy:
                g = acc(dy[index])
                if relu:
                    g = _masked(g, acc(relu_y[index]), acc(0.0))
                gs[k] = g
        index += index_step
        position += position_step


@cuda.jit(device=True, inline=True)
def _sum_chunk(position, position_step, limit, guarded, with_grad, shift, mean_hi, mean_lo,
               invstd, xs, gs, count, u, v):
    """:func:`_accumulate_pair`'s sums over a chunk loaded by :func:`_load_chunk`; returns the
    updated ``(count, u, v)``."""
    for k in range(CHUNK):
        if not guarded or position < limit:
            if with_grad:
                u += gs[k]
                v += gs[k] * (((xs[k] - mean_hi) - mean_lo) * invstd)
            else:
                d = xs[k] - shift
                u += d
                v += d * d
            count += 1
        position += position_step
    return count, u, v


@cuda.jit(device=True, inline=True)
def _store_chunk(out, first, index_step, position, position_step, limit, guarded, has_dy, relu,
                 mean_hi, mean_lo, alpha, beta, gamma, xs, gs, acc_like):
    """:func:`_apply_one` over a chunk loaded by :func:`_load_chunk`, stored at the indices it
    was loaded from (of ``out``); ``acc_like`` gives the accumulation dtype."""
    acc_zero = acc_like.dtype.type(0.0)
    index = first
    for k in range(CHUNK):
        if not guarded or position < limit:
            value = beta * ((xs[k] - mean_hi) - mean_lo) + gamma
            if has_dy:
                value += alpha * gs[k]
            elif relu:
                value = _relu(value, acc_zero)
            out[index] = value
        index += index_step
        position += position_step


@functools.cache
def _spatial_apply(width):
    """:func:`_apply` for rows of contiguous positions (``S > 1``, unit stride along ``S``:
    NCHW and its like), with ``width`` threads per row as a constant of the compiled code (one
    kernel per width, built on first use and kept).

    A group of ``width`` threads (``threadIdx.y`` picks the group) takes rows ``r = (p, c)``
    in a grid-stride loop: the row's five coefficients go to registers once (one 64-bit
    division per row gives ``(p, c)``), then each thread walks its positions
    ``s = lane + k width`` in chunks of :data:`CHUNK` at constant offsets
    (:func:`_load_chunk`, :func:`_store_chunk`), with unsigned indices (no negative-index
    fix-up); only its last, partial chunk checks the row's end. Arguments and results: those
    of :func:`_apply`.
    """
    step = np.uint64(width)
    stride = np.uint64(CHUNK * width)
    tail = np.uint64((CHUNK - 1) * width)

    @cuda.jit
    def apply_spatial(x3, dy3, relu_y3, has_dy, relu, coef, out3):
        n_channels = x3.shape[1]
        n_inner = np.uint64(x3.shape[2])
        full_end = n_inner - tail if n_inner > tail else np.uint64(0)
        n_rows = x3.shape[0] * n_channels
        lane = np.uint64(cuda.threadIdx.x)
        xs = cuda.local.array(CHUNK, coef.dtype)
        gs = cuda.local.array(CHUNK, coef.dtype)
        row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        while row < n_rows:
            p = row // n_channels
            c = row - p * n_channels
            mean_hi = coef[_MEAN_HI, c]
            mean_lo = coef[_MEAN_LO, c]
            alpha = coef[_ALPHA, c]
            beta = coef[_BETA, c]
            gamma = coef[_GAMMA, c]
            x, dy, relu_y, out = x3[p, c], dy3[p, c], relu_y3[p, c], out3[p, c]
            start = lane
            while start < full_end:
                _load_chunk(x, dy, relu_y, start, step, start, step, n_inner, False, has_dy,
                            relu, xs, gs, coef)
                _store_chunk(out, start, step, start, step, n_inner, False, has_dy, relu,
                             mean_hi, mean_lo, alpha, beta, gamma, xs, gs, coef)
                start += stride
            if start < n_inner:
                _load_chunk(x, dy, relu_y, start, step, start, step, n_inner, True, has_dy,
                            relu, xs, gs, coef)
                _store_chunk(out, start, step, start, step, n_inner, True, has_dy, relu,
                             mean_hi, mean_lo, alpha, beta, gamma, xs, gs, coef)
            row += cuda.gridDim.x * cuda.blockDim.y

    return apply_spatial


@functools.cache
def _spatial_partials(width):
    """:func:`_partials` for rows of unit-stride positions (``S > 1``: NCHW and its like), with
    ``width`` threads per row as a constant of the compiled code (one kernel per width, built
    on first use and kept).

    Block ``(c, part)``, 1-D, ``THREADS`` threads: channel ``c``, rows ``p`` in
    ``[part * rows_per_part, ...)``. The block's threads form ``THREADS / width`` groups of
    ``width``; group ``q`` takes rows ``p = first + q, first + q + THREADS / width, ...``, and
    each of its threads the positions ``s = lane + k width`` of the row, in chunks of
    :data:`CHUNK` at constant offsets (:func:`_load_chunk`, :func:`_sum_chunk`). Then the
    block reduces all its threads (one channel) with
    :func:`~fusedgrad.cuda._reduce.segment_reduce` as
    :func:`_partials` does, and thread 0 writes the ``(part, c)`` partial. No index arithmetic
    per element, no integer division at all. Arguments: those of :func:`_partials` with
    ``rows_per_part`` in place of ``seg`` and ``n_parts``.
    """
    step = np.uint64(width)
    stride = np.uint64(CHUNK * width)
    tail = np.uint64((CHUNK - 1) * width)
    groups = THREADS // width

    @cuda.jit
    def partials_spatial(x3, dy3, relu_y3, with_grad, relu, acc_like, mean, invstd,
                         rows_per_part, part_a, part_b, part_c):
        acc = acc_like.dtype.type
        s_a = cuda.shared.array(SCRATCH_SIZE, float64)
        s_b = cuda.shared.array(SCRATCH_SIZE, float64)
        s_c = cuda.shared.array(SCRATCH_SIZE, float64)
        xs = cuda.local.array(CHUNK, acc_like.dtype)
        gs = cuda.local.array(CHUNK, acc_like.dtype)
        c = cuda.blockIdx.x
        part = cuda.blockIdx.y
        n_inner = np.uint64(x3.shape[2])
        full_end = n_inner - tail if n_inner > tail else np.uint64(0)
        lane = np.uint64(cuda.threadIdx.x % width)
        p = part * rows_per_part + cuda.threadIdx.x // width
        p_stop = min((part + 1) * rows_per_part, x3.shape[0])
        shift, mean_hi, mean_lo, inv = _reduction_constants(with_grad, acc_like, mean, invstd, c,
                                                            x3[0, c, 0])
        count = 0
        u = acc(0.0)
        v = acc(0.0)
        while p < p_stop:
            x, dy, relu_y = x3[p, c], dy3[p, c], relu_y3[p, c]
            start = lane
            while start < full_end:
                _load_chunk(x, dy, relu_y, start, step, start, step, n_inner, False, with_grad,
                            relu, xs, gs, acc_like)
                count, u, v = _sum_chunk(start, step, n_inner, False, with_grad, shift,
                                         mean_hi, mean_lo, inv, xs, gs, count, u, v)
                start += stride
            if start < n_inner:
                _load_chunk(x, dy, relu_y, start, step, start, step, n_inner, True, with_grad,
                            relu, xs, gs, acc_like)
                count, u, v = _sum_chunk(start, step, n_inner, True, with_grad, shift,
                                         mean_hi, mean_lo, inv, xs, gs, count, u, v)
            p += groups
        _finish_partials(with_grad, count, u, v, shift, 1, cuda.threadIdx.x == 0, 0, s_a, s_b,
                         s_c, part_a, part_b, part_c, part, c)

    return partials_spatial


# --------------------------------------------------------------------------------------------
# Dense rows of channels (channels-last, (N, C)): a thread per channel and row group
# --------------------------------------------------------------------------------------------
#: Row groups per block of the column kernels: a block is ``COLUMN_LANES`` adjacent channels
#: (a warp reads one row's 32 channels: 128 contiguous bytes in float32) times this many rows.
COLUMN_LANES = 8 if SIMULATED else WARP_SIZE
COLUMN_GROUPS = THREADS // COLUMN_LANES


@cuda.jit(device=True, inline=True)
def _column_position():
    """``(lane, group)`` of this thread in a column-kernel block (constant divisors)."""
    return cuda.threadIdx.x % COLUMN_LANES, cuda.threadIdx.x // COLUMN_LANES


@cuda.jit
def _columns_partials(x, dy, relu_y, with_grad, relu, acc_like, mean, invstd, n_channels,
                      rows_per_part, part_a, part_b, part_c):
    """:func:`_partials` for dense rows of channels (``S = 1``, C-contiguous ``(P, C)``:
    channels-last and ``(N, C)``), passed flat: x, dy, relu_y are 1-D views of the ``P * C``
    elements, element ``(p, c)`` at ``p * C + c``. Block ``(channel block, part)`` of
    ``THREADS`` threads: ``COLUMN_LANES`` adjacent channels (one per lane) times
    ``COLUMN_GROUPS`` row groups; group ``q`` takes the part's rows ``first + q``,
    ``first + q + COLUMN_GROUPS``, ..., :data:`CHUNK` at a time with all their loads first;
    only the part's last chunk checks the rows' end. Then
    :func:`~fusedgrad.cuda._reduce.segment_reduce` over the threads of each channel (a fixed
    tree) and group 0 writes the ``(part, c)`` partials. Other arguments: those of
    :func:`_partials`, with ``rows_per_part`` in place of ``seg`` and ``n_parts``.
    """
    acc = acc_like.dtype.type
    acc_zero = acc(0.0)
    s_a = cuda.shared.array(SCRATCH_SIZE, float64)
    s_b = cuda.shared.array(SCRATCH_SIZE, float64)
    s_c = cuda.shared.array(SCRATCH_SIZE, float64)
    xs = cuda.local.array(CHUNK, acc_like.dtype)
    gs = cuda.local.array(CHUNK, acc_like.dtype)
    lane, group = _column_position()
    n_channels = np.uint64(n_channels)
    c = np.uint64(cuda.blockIdx.x * COLUMN_LANES + lane)
    valid = c < n_channels
    part = cuda.blockIdx.y
    n_rows = np.uint64(x.shape[0]) // n_channels
    p_stop = min(np.uint64((part + 1) * rows_per_part), n_rows)
    row_step = np.uint64(COLUMN_GROUPS)
    tail = np.uint64((CHUNK - 1) * COLUMN_GROUPS)
    shift = acc_zero
    count = 0
    u = acc_zero
    v = acc_zero
    if valid:
        shift, mean_hi, mean_lo, inv = _reduction_constants(with_grad, acc_like, mean, invstd, c,
                                                            x[c])
        index_step = row_step * n_channels
        p = np.uint64(part * rows_per_part) + np.uint64(group)
        while p < p_stop:
            guarded = p + tail >= p_stop
            first = p * n_channels + c
            if guarded:
                _load_chunk(x, dy, relu_y, first, index_step, p, row_step, p_stop, True,
                            with_grad, relu, xs, gs, acc_like)
                count, u, v = _sum_chunk(p, row_step, p_stop, True, with_grad, shift,
                                         mean_hi, mean_lo, inv, xs, gs, count, u, v)
            else:
                _load_chunk(x, dy, relu_y, first, index_step, p, row_step, p_stop, False,
                            with_grad, relu, xs, gs, acc_like)
                count, u, v = _sum_chunk(p, row_step, p_stop, False, with_grad, shift,
                                         mean_hi, mean_lo, inv, xs, gs, count, u, v)
            p += np.uint64(CHUNK) * row_step
    _finish_partials(with_grad, count, u, v, shift, COLUMN_LANES, group == 0 and valid, lane,
                     s_a, s_b, s_c, part_a, part_b, part_c, part, c)


@cuda.jit
def _columns_apply(x, dy, relu_y, has_dy, relu, coef, out, n_channels):
    """:func:`_apply` for dense rows of channels, passed flat as in :func:`_columns_partials`
    (``out`` too): each thread keeps one channel's five coefficients in registers and walks
    rows ``CHUNK`` at a time (all loads of a chunk before its stores) in a grid-stride loop over
    row groups; blocks as in :func:`_columns_partials`. Other arguments: those of
    :func:`_apply`."""
    xs = cuda.local.array(CHUNK, coef.dtype)
    gs = cuda.local.array(CHUNK, coef.dtype)
    lane, group = _column_position()
    n_channels = np.uint64(n_channels)
    c = np.uint64(cuda.blockIdx.x * COLUMN_LANES + lane)
    if c >= n_channels:
        return
    n_rows = np.uint64(x.shape[0]) // n_channels
    mean_hi = coef[_MEAN_HI, c]
    mean_lo = coef[_MEAN_LO, c]
    alpha = coef[_ALPHA, c]
    beta = coef[_BETA, c]
    gamma = coef[_GAMMA, c]
    row_step = np.uint64(cuda.gridDim.y * COLUMN_GROUPS)
    index_step = row_step * n_channels
    tail = np.uint64(CHUNK - 1) * row_step
    p = np.uint64(cuda.blockIdx.y * COLUMN_GROUPS + group)
    while p < n_rows:
        first = p * n_channels + c
        if p + tail >= n_rows:
            _load_chunk(x, dy, relu_y, first, index_step, p, row_step, n_rows, True, has_dy,
                        relu, xs, gs, coef)
            _store_chunk(out, first, index_step, p, row_step, n_rows, True, has_dy, relu,
                         mean_hi, mean_lo, alpha, beta, gamma, xs, gs, coef)
        else:
            _load_chunk(x, dy, relu_y, first, index_step, p, row_step, n_rows, False, has_dy,
                        relu, xs, gs, coef)
            _store_chunk(out, first, index_step, p, row_step, n_rows, False, has_dy, relu,
                         mean_hi, mean_lo, alpha, beta, gamma, xs, gs, coef)
        p += np.uint64(CHUNK) * row_step


# --------------------------------------------------------------------------------------------
# Host launchers (the backend interface)
# --------------------------------------------------------------------------------------------
#: Kernel families (:func:`_kernel_family`).
SPATIAL, COLUMNS, GENERAL = "spatial", "columns", "general"


def _kernel_family(arrays):
    """``(family, width)`` of the kernels for these (P, C, S) arrays (every array a pass reads
    or writes): :data:`SPATIAL` and its threads per row for rows of unit-stride positions
    (``S > 1``, unit stride along ``S`` in every array: NCHW); :data:`COLUMNS` for dense rows
    of channels (``S = 1``, every array a C-contiguous ``(P, C)``, ``_arrays.dense_rows``:
    channels-last, ``(N, C)``); else :data:`GENERAL` (``_partials`` and ``_apply``, any
    strides). ``width`` is None but for :data:`SPATIAL`."""
    n_inner = int(arrays[0].shape[2])
    if n_inner > 1 and all(a.strides[2] == a.dtype.itemsize for a in arrays):
        narrow, wide = SPATIAL_WIDTHS
        return SPATIAL, wide if n_inner >= CHUNK * wide else narrow
    if all(_arrays.dense_rows(a) is not None for a in arrays):
        return COLUMNS, None
    return GENERAL, None


class _Plan:
    """Launch geometry of the reductions over a (P, C, S) array: a function of the shape, and of
    the kernel family (:func:`_kernel_family`) of ``x3`` and the other arrays the reductions
    read, ``inputs``; the spatial and column kernels cut the parts in whole rows."""

    def __init__(self, x3, *inputs):
        n_outer, self.n_channels, n_inner = (int(v) for v in x3.shape)
        self.count = n_outer * n_inner
        seg = _ROW_SEGMENT if n_inner == 1 else 1
        while seg > 1 and seg // 2 >= self.n_channels:
            seg //= 2
        self.seg = seg
        lanes = THREADS // seg
        self.n_parts = int(min(_MAX_PARTS, max(1, -(-self.count // (lanes * _ITEMS_PER_THREAD)))))
        self.grid = (_arrays.launch_blocks(self.n_channels, seg), self.n_parts)
        self.family, self.width = _kernel_family(
            (x3,) + tuple(a for a in inputs if a is not None))
        if self.family != GENERAL:
            # the same target number of parts, in whole rows: P is cut into n_parts ranges
            self.rows_per_part = max(1, -(-n_outer // min(self.n_parts, max(n_outer, 1))))
            self.n_parts = max(1, -(-n_outer // self.rows_per_part))
            self.grid = ((self.n_channels if self.family == SPATIAL
                          else _arrays.launch_blocks(self.n_channels, COLUMN_LANES)),
                         self.n_parts)
        self.channel_blocks = _arrays.launch_blocks(self.n_channels, THREADS)
        rows, length = ((n_outer * self.n_channels, n_inner) if n_inner > 1
                        else (n_outer, self.n_channels))
        width = THREADS
        while width > _MIN_APPLY_WIDTH and width // 2 >= length:
            width //= 2
        self.apply_block = (width, THREADS // width)
        self.apply_grid = (_arrays.launch_blocks(length, width),
                           int(min(_arrays.launch_blocks(rows, THREADS // width), _MAX_GRID_Y)))


def _flat(arr3):
    """The 1-D view of a dense ``(P, C, 1)`` array (``_arrays.dense_rows``; what the column
    kernels take)."""
    return _arrays.strided_view(arr3, (arr3.shape[0] * arr3.shape[1],), (arr3.dtype.itemsize,))


def _launch_partials(plan, x3, dy3, relu_y3, with_grad, relu, acc_like, mean, invstd, parts,
                     stream):
    """The reduction kernel of the plan's family (:func:`_kernel_family`):
    :func:`_spatial_partials`, :func:`_columns_partials` or :func:`_partials`; ``parts``: the
    three ``(plan.n_parts, C)`` float64 partial arrays."""
    if x3.size == 0:
        # an empty batch (eval's backward): sums of nothing, where a launch would read x[0]
        for part in parts:
            part.copy_to_device(np.zeros(part.shape), stream=stream)
        return
    if plan.family == SPATIAL:
        _spatial_partials(plan.width)[plan.grid, THREADS, stream](
            x3, dy3, relu_y3, with_grad, relu, acc_like, mean, invstd, plan.rows_per_part,
            *parts)
    elif plan.family == COLUMNS:
        _columns_partials[plan.grid, THREADS, stream](
            _flat(x3), _flat(dy3), _flat(relu_y3), with_grad, relu, acc_like, mean, invstd,
            plan.n_channels, plan.rows_per_part, *parts)
    else:
        _partials[plan.grid, THREADS, stream](x3, dy3, relu_y3, with_grad, relu, acc_like, mean,
                                              invstd, plan.seg, plan.n_parts, *parts)


def _launch_apply(plan, x3, dy3, relu_y3, has_dy, relu, coef, out3, stream):
    """The elementwise kernel of the arrays' family (:func:`_kernel_family`): the spatial one
    (a few waves of blocks that loop over the rows), the column one (a grid of channel blocks
    times row blocks, ``CHUNK`` rows per thread, looping beyond ``_MAX_GRID_Y``), or
    :func:`_apply`."""
    n_outer, n_channels, n_inner = (int(v) for v in x3.shape)
    if n_outer * n_channels * n_inner == 0:
        return  # an empty batch (eval): nothing to write, and idle threads would read x[0]
    family, width = _kernel_family((x3, dy3, relu_y3, out3))
    if family == SPATIAL:
        rows_per_block = max(1, THREADS // width)
        blocks = min(_arrays.launch_blocks(n_outer * n_channels, rows_per_block),
                     _SPATIAL_MAX_BLOCKS)
        _spatial_apply(width)[blocks, (width, rows_per_block), stream](
            x3, dy3, relu_y3, has_dy, relu, coef, out3)
        return
    if family == COLUMNS:
        grid = (_arrays.launch_blocks(n_channels, COLUMN_LANES),
                min(_arrays.launch_blocks(n_outer, COLUMN_GROUPS * CHUNK), _MAX_GRID_Y))
        _columns_apply[grid, THREADS, stream](_flat(x3), _flat(dy3), _flat(relu_y3), has_dy,
                                              relu, coef, _flat(out3), n_channels)
        return
    _apply[plan.apply_grid, plan.apply_block, stream](x3, dy3, relu_y3, has_dy, relu, coef, out3)


def _optional_vector(name, vec):
    """``(device array, present)``; a cached 1-element stand-in for ``None``."""
    if vec is None:
        return _arrays.stand_in(np.float64), False
    return _arrays.as_array(name, vec), True


def _device3(name, arr):
    arr = _arrays.as_array(name, arr)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (P, C, S) kernel-layout array, got shape "
                         f"{tuple(arr.shape)}")
    return arr


def _stat_partials(x3, plan, stream):
    """The ``(count, mean, m2)`` partials per (part, channel): three (n_parts, C) float64
    device arrays."""
    acc_like = _arrays.stand_in(stat_dtype(x3.dtype), (1, 1))
    unused = _arrays.stand_in(np.float64)
    parts = [_arrays.empty((plan.n_parts, plan.n_channels), np.float64, stream)
             for _ in range(3)]
    _launch_partials(plan, x3, x3, x3, False, False, acc_like, unused, unused, parts, stream)
    return parts


def _moments(x3, plan, stream):
    """``(mean, m2)`` (C,) float64 device arrays: partials per (part, channel), then merged."""
    parts = _stat_partials(x3, plan, stream)
    mean = _arrays.empty((plan.n_channels,), np.float64, stream)
    m2 = _arrays.empty((plan.n_channels,), np.float64, stream)
    _merge_stat_parts[plan.channel_blocks, THREADS, stream](*parts, mean, m2)
    return mean, m2


def channel_stats(x3, *, stream=None):
    """``(count, mean, m2)``: values per channel (int) and (C,) float64 device arrays."""
    x3 = _device3("x3", x3)
    stream = _arrays.resolve_stream(stream)
    plan = _Plan(x3)
    mean, m2 = _moments(x3, plan, stream)
    return plan.count, mean, m2


def _apply_normalize(x3, plan, mean, invstd, weight, bias, out3, relu, stream):
    weight, has_weight = _optional_vector("weight", weight)
    bias, has_bias = _optional_vector("bias", bias)
    coef = _arrays.empty((_N_COEF, plan.n_channels), stat_dtype(x3.dtype), stream)
    _normalize_coefficients[plan.channel_blocks, THREADS, stream](
        mean, invstd, weight, has_weight, bias, has_bias, coef)
    _launch_apply(plan, x3, x3, x3, False, relu, coef, out3, stream)


def _relu_output3(relu_output3, x3):
    """The (P, C, S) device array of a fused ReLU's output, or None."""
    if relu_output3 is None:
        return None
    relu_output3 = _device3("relu_output3", relu_output3)
    if tuple(relu_output3.shape) != tuple(x3.shape) or relu_output3.dtype != x3.dtype:
        raise ValueError(f"relu_output3 must have x3's shape {tuple(x3.shape)} and dtype "
                         f"{x3.dtype}, got {tuple(relu_output3.shape)} {relu_output3.dtype}")
    return relu_output3


def normalize(x3, mean, invstd, weight, bias, out3, *, relu=False, stream=None):
    """``out3 = (x - mean) * invstd * weight + bias`` per channel, then ``max(out3, 0)`` with
    ``relu``; returns ``out3``."""
    x3, out3 = _device3("x3", x3), _device3("out3", out3)
    stream = _arrays.resolve_stream(stream)
    _apply_normalize(x3, _Plan(x3), _arrays.as_array("mean", mean),
                     _arrays.as_array("invstd", invstd), weight, bias, out3, bool(relu), stream)
    return out3


def forward(x3, weight, bias, running_mean, running_var, out3, *, training, momentum, eps,
            relu=False, stream=None):
    """Fused forward: statistics (training) or running statistics (eval), running-buffer update,
    ``y`` into ``out3`` (``max(y, 0)`` with ``relu``: a batch norm followed by a ReLU in the
    same pass). Returns ``(mean, invstd)``, new (C,) device arrays of the stat dtype."""
    x3, out3 = _device3("x3", x3), _device3("out3", out3)
    stream = _arrays.resolve_stream(stream)
    plan = _Plan(x3)
    stat = stat_dtype(x3.dtype)
    has_running = running_mean is not None and running_var is not None
    if training:
        parts = _stat_partials(x3, plan, stream)
    elif not has_running:
        raise ValueError("running_mean and running_var are required when training=False")
    else:
        parts = [_arrays.stand_in(np.float64, (1, 1))] * 3
    running_mean_d, _ = _optional_vector("running_mean", running_mean if has_running else None)
    running_var_d, _ = _optional_vector("running_var", running_var if has_running else None)
    weight, has_weight = _optional_vector("weight", weight)
    bias, has_bias = _optional_vector("bias", bias)
    mean_out = _arrays.empty((plan.n_channels,), stat, stream)
    invstd_out = _arrays.empty((plan.n_channels,), stat, stream)
    coef = _arrays.empty((_N_COEF, plan.n_channels), stat, stream)
    _forward_channels[plan.channel_blocks, THREADS, stream](
        *parts, float(plan.count), bool(training), float(eps), running_mean_d, running_var_d,
        has_running, float(momentum), weight, has_weight, bias, has_bias, mean_out, invstd_out,
        coef)
    _launch_apply(plan, x3, x3, x3, False, bool(relu), coef, out3, stream)
    return mean_out, invstd_out


def _grad_partials(dy3, x3, relu_y3, plan, mean, invstd, stream):
    """The ``(sum dy, sum dy xhat)`` partials per (part, channel): two (n_parts, C) float64
    device arrays."""
    acc_like = _arrays.stand_in(stat_dtype(x3.dtype), (1, 1))
    part_dy = _arrays.empty((plan.n_parts, plan.n_channels), np.float64, stream)
    part_dy_xhat = _arrays.empty((plan.n_parts, plan.n_channels), np.float64, stream)
    _launch_partials(plan, x3, dy3, x3 if relu_y3 is None else relu_y3, True,
                     relu_y3 is not None, acc_like, mean, invstd,
                     (part_dy, part_dy_xhat, part_dy), stream)
    return part_dy, part_dy_xhat


def _grad_sums(dy3, x3, relu_y3, plan, mean, invstd, stream):
    """``(sum dy, sum dy xhat)`` as one (2, C) float64 device array."""
    part_dy, part_dy_xhat = _grad_partials(dy3, x3, relu_y3, plan, mean, invstd, stream)
    sums = _arrays.empty((2, plan.n_channels), np.float64, stream)
    _sum_grad_parts[plan.channel_blocks, THREADS, stream](part_dy, part_dy_xhat, sums[0],
                                                          sums[1])
    return sums


def backward_reduce(dy3, x3, mean, invstd, *, stream=None):
    """``(sum_dy, sum_dy_xhat)``: (C,) float64 device arrays."""
    dy3, x3 = _device3("dy3", dy3), _device3("x3", x3)
    stream = _arrays.resolve_stream(stream)
    sums = _grad_sums(dy3, x3, None, _Plan(x3, dy3), _arrays.as_array("mean", mean),
                      _arrays.as_array("invstd", invstd), stream)
    return sums[0], sums[1]


def _apply_dx(dy3, x3, relu_y3, plan, mean, invstd, weight, sum_dy, sum_dy_xhat, count, out3,
              training, stream):
    weight, has_weight = _optional_vector("weight", weight)
    coef = _arrays.empty((_N_COEF, plan.n_channels), stat_dtype(x3.dtype), stream)
    _dx_coefficients[plan.channel_blocks, THREADS, stream](
        mean, invstd, weight, has_weight, sum_dy, sum_dy_xhat, float(count), bool(training),
        coef)
    _launch_apply(plan, x3, dy3, x3 if relu_y3 is None else relu_y3, True, relu_y3 is not None,
                  coef, out3, stream)


def backward_elementwise(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, out3, *,
                         training=True, relu_output3=None, stream=None):
    """``dx`` into ``out3`` from the (global) sums and ``count``; returns ``out3``.
    ``relu_output3``: the output of a forward with ``relu=True``, whose backward masks dy where
    it is not positive (the sums must then be those of the masked dy)."""
    dy3, x3, out3 = _device3("dy3", dy3), _device3("x3", x3), _device3("out3", out3)
    stream = _arrays.resolve_stream(stream)
    _apply_dx(dy3, x3, _relu_output3(relu_output3, x3), _Plan(x3),
              _arrays.as_array("mean", mean), _arrays.as_array("invstd", invstd), weight,
              _arrays.as_array("sum_dy", sum_dy), _arrays.as_array("sum_dy_xhat", sum_dy_xhat),
              count, out3, training, stream)
    return out3


def backward(dy3, x3, mean, invstd, weight, out3, *, training, relu_output3=None, stream=None):
    """Fused backward (reduce + elementwise). Returns ``(dweight, dbias)``, new (C,) device
    arrays of the stat dtype. ``relu_output3``: the output of a forward with ``relu=True``; the
    ReLU's backward (dy where that output is positive, else 0) is fused into both passes."""
    dy3, x3, out3 = _device3("dy3", dy3), _device3("x3", x3), _device3("out3", out3)
    relu_y3 = _relu_output3(relu_output3, x3)
    stream = _arrays.resolve_stream(stream)
    plan = _Plan(x3, dy3, relu_y3)
    mean, invstd = _arrays.as_array("mean", mean), _arrays.as_array("invstd", invstd)
    part_dy, part_dy_xhat = _grad_partials(dy3, x3, relu_y3, plan, mean, invstd, stream)
    weight, has_weight = _optional_vector("weight", weight)
    coef = _arrays.empty((_N_COEF, plan.n_channels), stat_dtype(x3.dtype), stream)
    grads = _arrays.empty((2, plan.n_channels), stat_dtype(x3.dtype), stream)
    _backward_channels[plan.channel_blocks, THREADS, stream](
        part_dy, part_dy_xhat, mean, invstd, weight, has_weight, float(plan.count),
        bool(training), coef, grads)
    _launch_apply(plan, x3, dy3, x3 if relu_y3 is None else relu_y3, True, relu_y3 is not None,
                  coef, out3, stream)
    return grads[1], grads[0]  # (dweight = sum dy xhat, dbias = sum dy)
