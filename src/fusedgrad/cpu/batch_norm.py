"""Batch normalization on the CPU: fused, cache-blocked, deterministic ``@njit`` kernels.

Kernel layout
-------------
Every backend function takes its big arrays already viewed in the *kernel layout*: a
C-contiguous 3-D array ``(P, C, S)`` whose axis 1 holds the channels, P being the product of the
axes before the channel axis and S of those after it. The API builds it with a reshape, never a
copy: NCHW -> ``(N, C, H*W)``; channels-last NHWC (``channel_axis=-1``) -> ``(N*H*W, C, 1)``;
``(N, C)`` -> ``(N, C, 1)``. ``S == 1`` is the rows layout (channels contiguous).

Backend interface (``fusedgrad.cuda.batch_norm`` has the same names and signatures)
------------------------------------------------------------------------------------
Notation: x3, dy3, out3 are ``(P, C, S)`` arrays of one float dtype (float32 or float64);
"stat dtype" is float64 for float64 x and float32 otherwise; ``(C,)`` parameters (weight, bias,
mean, invstd, running buffers) may be float32 or float64, ``None`` for weight/bias means 1/0.

Fused single-process entry points (what ``fusedgrad.batch_norm`` calls):

``forward(x3, weight, bias, running_mean, running_var, out3, *, training, momentum, eps)``
    Writes y = (x - mean) * invstd * weight + bias into out3 and returns ``(mean, invstd)``, new
    ``(C,)`` arrays of the stat dtype. Training: batch mean and biased variance, and running
    buffers (if given) updated in place, ``r = (1 - momentum) r + momentum stat`` with the
    unbiased variance. Eval: ``running_mean`` / ``running_var`` normalise (both required).
``backward(dy3, x3, mean, invstd, weight, out3, *, training)``
    Writes dx into out3 and returns ``(dweight, dbias)``, new ``(C,)`` arrays of the stat dtype.

The caller allocates the outputs, with the device's array interface (``fusedgrad._device.arrays``;
here ``fusedgrad.cpu._arrays.empty``).

Split building blocks (for SyncBatchNorm: reduce locally, merge across processes, apply):

``channel_stats(x3) -> (count, mean, m2)``
    count: int, values per channel (P*S); mean, m2: ``(C,)`` float64, the channel means and sums
    of squared deviations from them. Merge several with ``fusedgrad.cpu._reduce.merge_moments``.
``normalize(x3, mean, invstd, weight, bias, out3) -> out3``
    y = (x - mean) * invstd * weight + bias; pass float64 mean/invstd for full accuracy.
``backward_reduce(dy3, x3, mean, invstd) -> (sum_dy, sum_dy_xhat)``
    ``(C,)`` float64: sum dy and sum dy * xhat over P and S, xhat = (x - mean) * invstd.
``backward_elementwise(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, out3, *,
training=True) -> out3``
    Training: dx = weight invstd (dy - sum_dy / count - xhat sum_dy_xhat / count), with count
    the GLOBAL number of values per channel and the sums global. Eval: dx = weight invstd dy.

``forward`` equals channel_stats + normalize(mean, 1 / sqrt(m2 / count + eps)) and ``backward``
equals backward_reduce + backward_elementwise(count = P*S), bit for bit.

For a batch norm followed by a ReLU (``fusedgrad.torch.BatchNormReLU*d``):
``forward(..., relu=True)`` and ``normalize(..., relu=True)`` write max(y, 0);
``backward(..., relu_output3=y3)`` and ``backward_elementwise(..., relu_output3=y3)`` take that
output and use dy masked where it is not positive (the ReLU's backward) in every formula above.
The GPU backend takes the same arguments.

Work decomposition ("tiles")
----------------------------
Each (p, c) holds S contiguous values. When S is long it is cut into q sub-rows of W values
(W the largest divisor of S <= MAX_TILE_WIDTH); otherwise q = 1 and W = S. The data is then a
matrix of P*q rows; a tile is a block of R consecutive rows times a block of cb consecutive
channels (cb * W contiguous values per row; cb > 1 only when q == 1). The tile sizes depend on the
shape alone, never on the thread count, and every tile writes its own partial results, merged
afterwards in tile order (``_reduce``): the results are bitwise identical for any number of
threads. The shape regimes all fall out of this one scheme:

* many channels, small spatial size (32 x 2048 x 7 x 7): R = all rows, cb = 20 channels per tile,
  103 tiles in parallel; each channel lies in one tile.
* medium channels (64 x 256 x 28 x 28): R = all rows, cb = 1..2 channels (about 200 KB).
* channels too big for the cache (few channels, large spatial size): row blocks of one channel,
  partial moments / sums per block merged in fixed order.
* rows layout ``(N, C)`` and channels-last: row blocks of R rows x all channels, vectorised over
  the contiguous channels, per-block per-channel partials merged in fixed order.

When a tile holds whole channels (one row block, at most FUSE_BYTES of data per channel block)
the phases are fused: the forward computes the tile's statistics and normalises it while it is
still in the L2 cache, and the backward reduces and writes dx the same way, so x and dy are read
from memory once per direction. Otherwise a second parallel sweep applies the merged statistics.
Sweeps that only apply per-channel coefficients (eval forward, and the second sweep of the
unfused regimes) involve no reduction, so they may cut the work differently without changing a
bit: with long runs they take whole rows across all channels, i.e. contiguous memory.

In NCHW a tile's rows lie one image apart, so each run starts cold for the hardware
prefetchers; the run loops prefetch the rows two ahead in software (``_prefetch``; at
64 x 256 x 28 x 28, forward + backward 14.0 -> 10.7 ms).

In training, the second sweeps write their output with non-temporal stores (``_stream``: each
tile row or run is computed into a staging row in L1, then copied out in whole 64-byte lines
without the line being read first) when the output is at least STREAM_MIN_BYTES and every piece
starts on a cache line (the buffer pool's outputs start on one); see ``_streams`` for why not in
eval. Channels-last 64 x 28 x 28 x 256, forward + backward through the API, freed memory kept:
14.9-15.9 -> 12.3-12.6 ms among the other batch-norm cases, 14.0-14.2 -> 9.5-9.9 ms on its own
(the inputs then stay in the L3 cache from one call to the next, no longer evicted by the
outputs); (N, C) 4096 x 1024 4.6 -> 3.5 ms. The fused NCHW tiles keep ordinary stores: streamed,
their backward took 6.6 against 5.7 ms. On the Zen 5 EPYC of docs/performance.md streaming pays
too, since the elementwise loops use 256-bit vectors there (``_codegen.prefer_narrow_vectors``):
forward + backward through the API, each version in turn in one process, (N, C) 4096 x 1024
1.76-1.86 -> 1.57-1.63 ms, channels-last 6.85-7.13 -> 6.18-6.31 ms, NCHW level (5.73-5.80 either
way); with 512-bit loops it had been level or slower ((N, C) 1.91 against 1.65 ms).

Each sweep starts one worker per thread, and worker w takes the w-th contiguous share of the
tiles (``_worker_tiles``). The second sweep of an unfused call walks each share backwards, so a
core begins with the memory its first sweep read last, which is still in its L2 cache (4096 x 1024
float32: 10% less kernel time than walking forwards). Which thread computes a tile never changes
the tile's result.

Numerics
--------
Statistics take one pass per tile: with d = x - K, K a value of the channel (its first in the
tile), mean = K + sum d / n and M2 = sum d^2 - (sum d)^2 / n. The sums stay of the size of the
spread, not of the mean, so they are summed in the input dtype (float32: 8 or 16 lanes per
instruction, where float64 accumulators would halve that and add a conversion per value)
within one run or FOLD_ROWS rows, then folded into float64 totals; tiles are merged with
Chan's formula. A float32 channel with mean 1e4 and spread 1 keeps its variance to float32
precision (the tests' offset case), a constant channel gets exactly zero variance; errors
against the float64 reference stay about 1e-7 relative. The backward's two sums (sum dy and
sum dy (x - mean_hi)) are summed the same way. The elementwise passes run in the input dtype
(8 float32 lanes per AVX2 instruction) but split the float64 mean into mean_hi (rounded to the
dtype) + mean_lo: x - mean_hi is exact for x near the mean, and mean_lo goes into the constant
term, so x - mean is as accurate as in float64 (y keeps float32 precision at mean 1e4, std 1):

    y  = (x - mean_hi) * s + (bias - mean_lo * s),                      s = weight invstd
    dx = a dy + b (x - mean_hi) + (c - b mean_lo),   a = weight invstd,
         b = -a invstd sum_dy_xhat / m,  c = -a sum_dy / m                  (training)

which is dx = gamma invstd / m (m dy - sum dy - xhat sum dy xhat) (``docs/derivations.md``,
section 2(b)) with xhat recomputed from x, so no temporary of x's size is ever allocated.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from .._validate import stat_dtype
from ._codegen import prefer_narrow_vectors
from ._math import FASTMATH_SUMS
from ._prefetch import prefetch_run, prefetch_run_for_write
from ._stream import STREAM_BYTES, STREAM_MIN_BYTES, store_fence, stream_copy
from ._reduce import chunk_bounds, chunk_count, merge_moments, sum_partials, worker_share

#: Widest tile row, in values: the column accumulators (2 x 8 bytes float64 and 2 x 4 in the
#: input dtype per column) and per-column vectors of a tile stay inside the 48 KB L1.
MAX_TILE_WIDTH = 1024
#: Tile rows whose column sums are accumulated in x's dtype before they are folded into the
#: float64 totals (even: rows go in pairs): each float32 lane adds at most this many terms.
FOLD_ROWS = 64
#: The run loops (S >= RUN_MIN_WIDTH) prefetch the tile row this many rows ahead, for reading
#: in the reductions and for writing in the elementwise passes (``_prefetch``: a tile's rows
#: lie far apart in NCHW, so each would start cold for the hardware prefetchers); not where the
#: rows are adjacent. The column loops do not: at 32 x 2048 x 7 x 7 (rows of 20 channels x 49
#: values) prefetching made forward + backward 12% slower (2.10 against 1.87 ms).
PREFETCH_ROWS = 2
#: Narrowest useful sub-row when a long S is cut into q pieces.
MIN_TILE_WIDTH = 256
#: Runs of at least this many values per channel are looped over one by one (scalar
#: coefficients, register accumulators); shorter ones column-wise across the tile row.
RUN_MIN_WIDTH = 128
#: A channel block up to this size is processed fused: x, dy and dx of it fit in the L2 cache.
FUSE_BYTES = 512 * 1024
#: Data per tile when a channel is too big to fuse (row blocks): its second statistics pass
#: still hits the 2 MB L2, and there are few per-block partials to allocate and merge.
ROW_BLOCK_BYTES = 1024 * 1024
#: Fused channel blocks are capped at C / MIN_TILES channels so there are tiles to share out...
MIN_TILES = 8
#: ...but keep at least this many contiguous values per tile row (vector loops, cache lines).
MIN_ROW_VALUES = 64


def plan_tiles(shape3, itemsize):
    """Tile sizes for an ``(P, C, S)`` array: ``(q, W, cb, R)`` (see the module docstring).

    Depends only on the shape and the item size, so every thread count cuts the work the same way.
    """
    n_outer, n_channels, n_inner = (int(v) for v in shape3)
    if n_inner <= MAX_TILE_WIDTH:
        q, width = 1, n_inner
    else:
        width = max((d for d in range(MIN_TILE_WIDTH, MAX_TILE_WIDTH + 1) if n_inner % d == 0),
                    default=n_inner)
        q = n_inner // width
    rows = n_outer * q
    channel_bytes = max(1, n_outer * n_inner * itemsize)
    min_cb = min(n_channels, chunk_count(MIN_ROW_VALUES, width)) if q == 1 else 1
    if min_cb * channel_bytes <= FUSE_BYTES:
        per_tile = FUSE_BYTES // channel_bytes if q == 1 else 1
        share = max(chunk_count(n_channels, MIN_TILES), min_cb)
        cb = max(1, min(per_tile, MAX_TILE_WIDTH // width, share))
        return q, width, cb, max(1, rows)
    cb = max(1, min(n_channels, MAX_TILE_WIDTH // width)) if q == 1 else 1
    return q, width, cb, max(1, ROW_BLOCK_BYTES // (cb * width * itemsize))


# --------------------------------------------------------------------------------------------
# Inner loops over one tile: rows r0..r1, channels c0..c0+nch. Tile row r starts at flat offset
#   (r // q) * C*S + c0*S + (r % q) * W
# and holds nch runs of W (= sub) contiguous values, one run per channel. Two loop shapes:
# * runs (W >= RUN_MIN_WIDTH): one channel's run at a time with scalar coefficients and
#   register accumulators (one horizontal reduction per long run);
# * columns (short W: 7 x 7 = 49, or 1 in the rows layout): the whole tile row at once against
#   per-column vectors (column accumulators in x's dtype folded into float64 every FOLD_ROWS
#   rows, coefficients expanded per column), two rows per accumulator update to halve the
#   accumulator traffic - never a horizontal reduction per short segment.
# Both give a fixed summation order for a given shape.
# --------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _row_start(r, q, row_stride, j0, sub):
    if q == 1:  # the common case; spares two integer divisions per row
        return r * row_stride + j0
    return (r // q) * row_stride + j0 + (r % q) * sub


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _run_moments(x, i0, n, shift):
    """(sum d, sum d^2) over one run, d = x - shift, summed in x's dtype and returned as
    float64 (a run holds at most MAX_TILE_WIDTH values, spread over the vector lanes)."""
    run = x[i0:i0 + n]
    sum_d = run.dtype.type(0)
    sum_d2 = run.dtype.type(0)
    for i in range(n):
        d = run[i] - shift
        sum_d += d
        sum_d2 += d * d
    return np.float64(sum_d), np.float64(sum_d2)


@njit(cache=True, inline="always")
def _relu(v, zero):
    """max(v, 0) that keeps NaN, as ``torch.relu`` does."""
    return zero if v < zero else v


@njit(cache=True, inline="always")
def _masked(g, y, zero):
    """The ReLU's backward: the upstream gradient where the ReLU's output is positive, else 0."""
    return g if y > zero else zero


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _run_grad(dy, x, relu_y, i0, n, mean_hi):
    """(sum g, sum g * (x - mean_hi)) over one run, summed in x's dtype and returned as
    float64; g = dy, or with a fused ReLU (``relu_y`` its output, else None) dy masked where the
    output is not positive."""
    g_run, x_run = dy[i0:i0 + n], x[i0:i0 + n]
    zero = x_run.dtype.type(0)
    total_dy = zero
    total_dyd = zero
    if relu_y is None:
        for i in range(n):
            g = g_run[i]
            total_dy += g
            total_dyd += g * (x_run[i] - mean_hi)
    else:
        y_run = relu_y[i0:i0 + n]
        for i in range(n):
            g = _masked(g_run[i], y_run[i], zero)
            total_dy += g
            total_dyd += g * (x_run[i] - mean_hi)
    return np.float64(total_dy), np.float64(total_dyd)


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _run_affine(x_run, o_run, mean_hi, scale, shift, relu):
    prefer_narrow_vectors()
    n = o_run.shape[0]
    zero = o_run.dtype.type(0)
    if relu:
        for i in range(n):
            o_run[i] = _relu((x_run[i] - mean_hi) * scale + shift, zero)
    else:
        for i in range(n):
            o_run[i] = (x_run[i] - mean_hi) * scale + shift


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _run_dx(g_run, x_run, y_run, o_run, mean_hi, a, b, c):
    prefer_narrow_vectors()
    n = o_run.shape[0]
    if y_run is None:
        for i in range(n):
            o_run[i] = a * g_run[i] + b * (x_run[i] - mean_hi) + c
    else:
        zero = y_run.dtype.type(0)
        for i in range(n):
            o_run[i] = a * _masked(g_run[i], y_run[i], zero) + b * (x_run[i] - mean_hi) + c


@njit(cache=True, inline="always")
def _ahead_row_start(r, r1, q, row_stride, j0, sub, width):
    """Start of the tile row PREFETCH_ROWS after row r, the one the run loops prefetch; -1 when
    the tile has no such row or its rows of ``width`` values are adjacent in memory (one stream,
    which the hardware prefetchers follow)."""
    if r + PREFETCH_ROWS < r1 and width < row_stride:
        return _row_start(r + PREFETCH_ROWS, q, row_stride, j0, sub)
    return -1


@njit(cache=True, inline="always")
def _prefetch_grad_row(dy, x, relu_y, start, n):
    """Prefetch what the backward's sums read of one tile row: dy, x and a fused ReLU's output."""
    prefetch_run(dy, start, n)
    prefetch_run(x, start, n)
    if relu_y is not None:
        prefetch_run(relu_y, start, n)


@njit(cache=True, inline="always")
def _row_pair(i, r0, r1, q, row_stride, j0, sub):
    """Starts of the i-th pair of tile rows and the pair's weight. An odd last row is paired
    with itself at weight 0.5, which halves the doubled sum exactly."""
    r = r0 + 2 * i
    s0 = _row_start(r, q, row_stride, j0, sub)
    if r + 1 < r1:
        return s0, _row_start(r + 1, q, row_stride, j0, sub), 1.0
    return s0, s0, 0.5


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _fold_block(block1, block2, acc1, acc2):
    """acc += block (float64 += x's dtype), then block = 0: one block of rows folded in."""
    for j in range(acc1.shape[0]):
        acc1[j] += np.float64(block1[j])
        acc2[j] += np.float64(block2[j])
        block1[j] = 0
        block2[j] = 0


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _cols_moments(x, r0, r1, q, row_stride, j0, sub, shift, block1, block2, acc1, acc2):
    """acc1[j] += sum d, acc2[j] += sum d^2 over the tile rows, d = x - shift[j], column by
    column, two rows per update: summed in x's dtype (block1, block2, zero on entry) over
    FOLD_ROWS rows at a time, each block then folded into the float64 acc1, acc2."""
    width = acc1.shape[0]
    weight_of = x.dtype.type
    pairs = (r1 - r0 + 1) // 2
    for p0 in range(0, pairs, FOLD_ROWS // 2):
        for i in range(p0, min(pairs, p0 + FOLD_ROWS // 2)):
            s0, s1, weight = _row_pair(i, r0, r1, q, row_stride, j0, sub)
            row0, row1 = x[s0:s0 + width], x[s1:s1 + width]
            w = weight_of(weight)
            for j in range(width):
                d0 = row0[j] - shift[j]
                d1 = row1[j] - shift[j]
                block1[j] += (d0 + d1) * w
                block2[j] += (d0 * d0 + d1 * d1) * w
        _fold_block(block1, block2, acc1, acc2)


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _cols_grad(dy, x, relu_y, r0, r1, q, row_stride, j0, sub, mean_hi, block_dy, block_dyd,
               acc_dy, acc_dyd):
    """acc_dy[j] += g, acc_dyd[j] += g * (x - mean_hi[j]) over the tile rows; g as in
    :func:`_run_grad`; summed in x's dtype over FOLD_ROWS rows, then folded into float64 (as
    :func:`_cols_moments`)."""
    width = acc_dy.shape[0]
    weight_of = x.dtype.type
    pairs = (r1 - r0 + 1) // 2
    for p0 in range(0, pairs, FOLD_ROWS // 2):
        for i in range(p0, min(pairs, p0 + FOLD_ROWS // 2)):
            s0, s1, weight = _row_pair(i, r0, r1, q, row_stride, j0, sub)
            g0, g1 = dy[s0:s0 + width], dy[s1:s1 + width]
            row0, row1 = x[s0:s0 + width], x[s1:s1 + width]
            w = weight_of(weight)
            if relu_y is None:
                for j in range(width):
                    a0, a1 = g0[j], g1[j]
                    block_dy[j] += (a0 + a1) * w
                    block_dyd[j] += (a0 * (row0[j] - mean_hi[j])
                                     + a1 * (row1[j] - mean_hi[j])) * w
            else:
                y0, y1 = relu_y[s0:s0 + width], relu_y[s1:s1 + width]
                zero = y0.dtype.type(0)
                for j in range(width):
                    a0 = _masked(g0[j], y0[j], zero)
                    a1 = _masked(g1[j], y1[j], zero)
                    block_dy[j] += (a0 + a1) * w
                    block_dyd[j] += (a0 * (row0[j] - mean_hi[j])
                                     + a1 * (row1[j] - mean_hi[j])) * w
        _fold_block(block_dy, block_dyd, acc_dy, acc_dyd)


@njit(cache=True, inline="always")
def _whole_lines(out, q, row_stride, j0, sub, width):
    """Whether every piece of ``width`` values that a tile loop writes at once (a tile row of
    the column loops, a run of the run loops) covers whole cache lines of ``out``, given that
    ``out`` itself starts on one: all the offsets of ``_row_start`` are multiples of a line."""
    line = STREAM_BYTES // out.itemsize
    return (row_stride % line == 0 and j0 % line == 0 and width % line == 0
            and (q == 1 or sub % line == 0))


@njit(cache=True, inline="always")
def _affine_row(x_row, o_row, mean_hi, scale, shift, relu):
    zero = o_row.dtype.type(0)
    if relu:
        for j in range(o_row.shape[0]):
            o_row[j] = _relu((x_row[j] - mean_hi[j]) * scale[j] + shift[j], zero)
    else:
        for j in range(o_row.shape[0]):
            o_row[j] = (x_row[j] - mean_hi[j]) * scale[j] + shift[j]


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _cols_affine(x, out, r0, r1, q, row_stride, j0, sub, mean_hi, scale, shift, relu, stream):
    """Tile rows r0..r1 of out = (x - mean_hi) * scale + shift (max(., 0) with ``relu``);
    ``stream``: each row goes through a staging row in L1 to non-temporal stores.

    Two loops rather than one writing to ``staged if stream else out[...]``: with that single
    loop the unstreamed channels-last forward + backward took 16.2-16.4 ms against 14.4-14.5
    (2026-12-05, freed memory kept), so each target gets a loop of its own (same in _cols_dx).
    """
    prefer_narrow_vectors()
    width = scale.shape[0]
    if stream and _whole_lines(out, q, row_stride, j0, sub, width):
        staged = np.empty(width, out.dtype)
        for r in range(r0, r1):
            s0 = _row_start(r, q, row_stride, j0, sub)
            _affine_row(x[s0:s0 + width], staged, mean_hi, scale, shift, relu)
            stream_copy(out, s0, staged, width)
    else:
        for r in range(r0, r1):
            s0 = _row_start(r, q, row_stride, j0, sub)
            _affine_row(x[s0:s0 + width], out[s0:s0 + width], mean_hi, scale, shift, relu)


@njit(cache=True, inline="always")
def _dx_row(g_row, x_row, y_row, o_row, mean_hi, a, b, c):
    """One tile row of dx; ``y_row``: a fused ReLU's output (dy masked where it is not
    positive), or None."""
    if y_row is None:
        for j in range(o_row.shape[0]):
            o_row[j] = a[j] * g_row[j] + b[j] * (x_row[j] - mean_hi[j]) + c[j]
    else:
        zero = y_row.dtype.type(0)
        for j in range(o_row.shape[0]):
            o_row[j] = (a[j] * _masked(g_row[j], y_row[j], zero)
                        + b[j] * (x_row[j] - mean_hi[j]) + c[j])


@njit(cache=True, inline="always")
def _row_or_none(a, s0, width):
    return None if a is None else a[s0:s0 + width]


@njit(cache=True, fastmath=FASTMATH_SUMS)
def _cols_dx(dy, x, relu_y, out, r0, r1, q, row_stride, j0, sub, mean_hi, a, b, c, stream):
    """Tile rows r0..r1 of dx (``stream``: as in :func:`_cols_affine`)."""
    prefer_narrow_vectors()
    width = a.shape[0]
    if stream and _whole_lines(out, q, row_stride, j0, sub, width):
        staged = np.empty(width, out.dtype)
        for r in range(r0, r1):
            s0 = _row_start(r, q, row_stride, j0, sub)
            _dx_row(dy[s0:s0 + width], x[s0:s0 + width], _row_or_none(relu_y, s0, width),
                    staged, mean_hi, a, b, c)
            stream_copy(out, s0, staged, width)
    else:
        for r in range(r0, r1):
            s0 = _row_start(r, q, row_stride, j0, sub)
            _dx_row(dy[s0:s0 + width], x[s0:s0 + width], _row_or_none(relu_y, s0, width),
                    out[s0:s0 + width], mean_hi, a, b, c)


@njit(cache=True)
def _expand(values, sub, vec):
    """vec[k*sub:(k+1)*sub] = values[k]: per-channel values to per-column vectors."""
    for k in range(values.shape[0]):
        vec[k * sub:(k + 1) * sub] = values[k]


@njit(cache=True)
def _fold(acc, sub, totals):
    """totals[k] = sum of local channel k's `sub` columns of acc."""
    for k in range(totals.shape[0]):
        total = 0.0
        for j in range(k * sub, (k + 1) * sub):
            total += acc[j]
        totals[k] = total


# Tile-level operations: dispatch to the run or column loops. Per-channel inputs and outputs
# are local arrays of the tile's nch channels.
@njit(cache=True)
def _tile_moments(x, r0, r1, q, row_stride, j0, sub, shift, sum_d, sum_d2):
    """sum_d[k], sum_d2[k] = float64 sums of d and d^2 over local channel k, d = x - shift[k]."""
    nch = sum_d.shape[0]
    sum_d[:] = 0.0
    sum_d2[:] = 0.0
    if sub >= RUN_MIN_WIDTH:
        for r in range(r0, r1):
            start = _row_start(r, q, row_stride, j0, sub)
            ahead = _ahead_row_start(r, r1, q, row_stride, j0, sub, nch * sub)
            if ahead >= 0:
                prefetch_run(x, ahead, nch * sub)
            for k in range(nch):
                s1, s2 = _run_moments(x, start + k * sub, sub, shift[k])
                sum_d[k] += s1
                sum_d2[k] += s2
    else:
        shift_cols = np.empty(nch * sub, x.dtype)
        _expand(shift, sub, shift_cols)
        blocks = np.zeros((2, nch * sub), x.dtype)
        acc = np.zeros((2, nch * sub))
        _cols_moments(x, r0, r1, q, row_stride, j0, sub, shift_cols, blocks[0], blocks[1],
                      acc[0], acc[1])
        _fold(acc[0], sub, sum_d)
        _fold(acc[1], sub, sum_d2)


@njit(cache=True)
def _tile_grad(dy, x, relu_y, r0, r1, q, row_stride, j0, sub, mean_hi, totals_dy, totals_dyd):
    nch = totals_dy.shape[0]
    totals_dy[:] = 0.0
    totals_dyd[:] = 0.0
    if sub >= RUN_MIN_WIDTH:
        for r in range(r0, r1):
            start = _row_start(r, q, row_stride, j0, sub)
            ahead = _ahead_row_start(r, r1, q, row_stride, j0, sub, nch * sub)
            if ahead >= 0:
                _prefetch_grad_row(dy, x, relu_y, ahead, nch * sub)
            for k in range(nch):
                s_dy, s_dyd = _run_grad(dy, x, relu_y, start + k * sub, sub, mean_hi[k])
                totals_dy[k] += s_dy
                totals_dyd[k] += s_dyd
    else:
        mean_cols = np.empty(nch * sub, x.dtype)
        _expand(mean_hi, sub, mean_cols)
        blocks = np.zeros((2, nch * sub), x.dtype)
        acc = np.zeros((2, nch * sub))
        _cols_grad(dy, x, relu_y, r0, r1, q, row_stride, j0, sub, mean_cols, blocks[0],
                   blocks[1], acc[0], acc[1])
        _fold(acc[0], sub, totals_dy)
        _fold(acc[1], sub, totals_dyd)


@njit(cache=True)
def _tile_affine(x, out, r0, r1, q, row_stride, j0, sub, mean_hi, scale, shift, relu, stream):
    nch = scale.shape[0]
    if sub >= RUN_MIN_WIDTH:
        # streamed: each run through a staging run in L1 (then no prefetch for writing)
        stream = stream and _whole_lines(out, q, row_stride, j0, sub, sub)
        staged = np.empty(sub if stream else 0, out.dtype)
        for r in range(r0, r1):
            start = _row_start(r, q, row_stride, j0, sub)
            ahead = -1 if stream else _ahead_row_start(r, r1, q, row_stride, j0, sub, nch * sub)
            if ahead >= 0:
                prefetch_run_for_write(out, ahead, nch * sub)
            for k in range(nch):
                i0 = start + k * sub
                if stream:
                    _run_affine(x[i0:i0 + sub], staged, mean_hi[k], scale[k], shift[k], relu)
                    stream_copy(out, i0, staged, sub)
                else:
                    _run_affine(x[i0:i0 + sub], out[i0:i0 + sub], mean_hi[k], scale[k],
                                shift[k], relu)
    else:
        cols = np.empty((3, nch * sub), x.dtype)
        _expand(mean_hi, sub, cols[0])
        _expand(scale, sub, cols[1])
        _expand(shift, sub, cols[2])
        _cols_affine(x, out, r0, r1, q, row_stride, j0, sub, cols[0], cols[1], cols[2], relu,
                     stream)


@njit(cache=True)
def _tile_dx(dy, x, relu_y, out, r0, r1, q, row_stride, j0, sub, mean_hi, a, b, c, stream):
    nch = a.shape[0]
    if sub >= RUN_MIN_WIDTH:
        stream = stream and _whole_lines(out, q, row_stride, j0, sub, sub)
        staged = np.empty(sub if stream else 0, out.dtype)
        for r in range(r0, r1):
            start = _row_start(r, q, row_stride, j0, sub)
            ahead = -1 if stream else _ahead_row_start(r, r1, q, row_stride, j0, sub, nch * sub)
            if ahead >= 0:
                prefetch_run_for_write(out, ahead, nch * sub)
            for k in range(nch):
                i0 = start + k * sub
                g_run, x_run = dy[i0:i0 + sub], x[i0:i0 + sub]
                y_run = _row_or_none(relu_y, i0, sub)
                if stream:
                    _run_dx(g_run, x_run, y_run, staged, mean_hi[k], a[k], b[k], c[k])
                    stream_copy(out, i0, staged, sub)
                else:
                    _run_dx(g_run, x_run, y_run, out[i0:i0 + sub], mean_hi[k], a[k], b[k],
                            c[k])
    else:
        cols = np.empty((4, nch * sub), x.dtype)
        _expand(mean_hi, sub, cols[0])
        _expand(a, sub, cols[1])
        _expand(b, sub, cols[2])
        _expand(c, sub, cols[3])
        _cols_dx(dy, x, relu_y, out, r0, r1, q, row_stride, j0, sub, cols[0], cols[1], cols[2],
                 cols[3], stream)


# --------------------------------------------------------------------------------------------
# Per-channel coefficients (float64 math, stored in x's dtype) for the tile's channels c0 + k.
# The float64 mean m is split as m = mean_hi + mean_lo with mean_hi = m rounded to x's dtype;
# x - mean_hi is then exact for x near the mean (Sterbenz), and mean_lo is folded into the
# constant term, so the elementwise loops keep float64 accuracy with float32 arithmetic:
#   y  = (x - mean_hi) * s + (beta - mean_lo * s),                       s = gamma invstd
#   dx = a dy + b (x - mean_hi) + (c - b mean_lo)
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _split_mean(mean, c0, mean_hi, mean_lo):
    for k in range(mean_hi.shape[0]):
        m = np.float64(mean[c0 + k])
        mean_hi[k] = m
        mean_lo[k] = m - np.float64(mean_hi[k])


@njit(cache=True)
def _affine_coefficients(mean, invstd, gamma, beta, c0, mean_hi, scale, shift):
    mean_lo = np.empty(mean_hi.shape[0])
    _split_mean(mean, c0, mean_hi, mean_lo)
    for k in range(mean_hi.shape[0]):
        s = gamma[c0 + k] * np.float64(invstd[c0 + k])
        scale[k] = s
        shift[k] = beta[c0 + k] - mean_lo[k] * s


@njit(cache=True)
def _dx_coefficients(mean, invstd, gamma, sum_dy, sum_dy_xhat, count, training, c0,
                     mean_hi, a, b, c):
    """dx = a dy + b (x - mean) + c: a = gamma invstd; training: b = -a invstd sum_dy_xhat / m,
    c = -a sum_dy / m (dx of ``docs/derivations.md``, section 2(b), with xhat = (x - mean)
    invstd); eval: b = c = 0."""
    mean_lo = np.empty(mean_hi.shape[0])
    _split_mean(mean, c0, mean_hi, mean_lo)
    for k in range(mean_hi.shape[0]):
        ch = c0 + k
        inv = np.float64(invstd[ch])
        ak = gamma[ch] * inv
        bk = -ak * inv * sum_dy_xhat[ch] / count if training else 0.0
        ck = -ak * sum_dy[ch] / count if training else 0.0
        a[k] = ak
        b[k] = bk
        c[k] = ck - bk * mean_lo[k]


@njit(cache=True, inline="always")
def _tile(t, n_outer, n_channels, q, cb, block_rows):
    """(row block index, first row, end row, first channel, channel count) of tile t."""
    n_cb = (n_channels + cb - 1) // cb
    rb = t // n_cb
    r0, r1 = chunk_bounds(rb, n_outer * q, block_rows)
    c0, c1 = chunk_bounds(t % n_cb, n_channels, cb)
    return rb, r0, r1, c0, c1 - c0


@njit(cache=True, inline="always")
def _worker_tiles(worker, n_workers, n_tiles, backwards):
    """``range`` arguments for the worker's contiguous share of the tiles, the same share in
    every sweep of a call, walked backwards if asked.

    Only which thread computes a tile depends on it, never the tile's result (each tile writes
    its own partials, merged in tile order), so any split gives the same bits.
    """
    lo, hi = worker_share(worker, n_workers, n_tiles)
    return (hi - 1, lo - 1, -1) if backwards else (lo, hi, 1)


@njit(cache=True, inline="always")
def _n_tiles(n_outer, n_channels, q, cb, block_rows):
    return ((n_outer * q + block_rows - 1) // block_rows) * ((n_channels + cb - 1) // cb)


# --------------------------------------------------------------------------------------------
# Parallel sweeps over the tiles. x, dy, out are flat (P*C*S,) views; n_outer, n_channels,
# n_inner = P, C, S. Per-row-block partials go to (n_row_blocks, C) float64 arrays.
# --------------------------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def _stats_sweep(x, n_outer, n_channels, n_inner, q, sub, cb, block_rows,
                 part_mean, part_m2, fuse, gamma, beta, eps, invstd_out, out, relu, n_workers):
    """Per-tile mean and M2 (one pass over the tile, shifted sums) into the partials.

    fuse (only when each tile holds whole channels): also normalise the tile with its final
    statistics, y = (x - mean) * invstd * gamma + beta (then max(y, 0) with ``relu``), writing
    invstd_out for its channels.
    """
    row_stride = n_channels * n_inner
    n_tiles = _n_tiles(n_outer, n_channels, q, cb, block_rows)
    for worker in prange(n_workers):
        for t in range(*_worker_tiles(worker, n_workers, n_tiles, False)):
            rb, r0, r1, c0, nch = _tile(t, n_outer, n_channels, q, cb, block_rows)
            j0 = c0 * n_inner
            count = (r1 - r0) * sub
            mean = part_mean[rb, c0:c0 + nch]
            m2 = part_m2[rb, c0:c0 + nch]
            # Shifted one-pass moments: with d = x - K (K a value of the channel, its first in
            # the tile), mean = K + sum d / n and M2 = sum d^2 - (sum d)^2 / n. Both sums stay
            # of the size of the spread, not of the mean (mean 1e4, spread 1 included), so
            # they can be summed in x's dtype; a constant channel gets d = 0 and M2 = 0 exactly.
            first = _row_start(r0, q, row_stride, j0, sub)
            shift = np.empty(nch, x.dtype)
            for k in range(nch):
                shift[k] = x[first + k * sub]
            _tile_moments(x, r0, r1, q, row_stride, j0, sub, shift, mean, m2)
            for k in range(nch):
                sum_d = mean[k]
                mean[k] = np.float64(shift[k]) + sum_d / count
                m2[k] = max(m2[k] - sum_d * sum_d / count, 0.0)
            if fuse:
                for c in range(c0, c0 + nch):
                    invstd_out[c] = 1.0 / np.sqrt(part_m2[rb, c] / count + eps)
                coef = np.empty((3, nch), x.dtype)
                _affine_coefficients(part_mean[rb], invstd_out, gamma, beta, c0,
                                     coef[0], coef[1], coef[2])
                _tile_affine(x, out, r0, r1, q, row_stride, j0, sub, coef[0], coef[1], coef[2],
                             relu, False)


@njit(cache=True, parallel=True)
def _normalize_sweep(x, out, n_outer, n_channels, n_inner, q, sub, cb, block_rows,
                     mean, invstd, gamma, beta, relu, stream, n_workers):
    """out = (x - mean) * invstd * gamma + beta (then max(out, 0) with ``relu``), tile by
    tile (``stream``: see :func:`_streams`)."""
    row_stride = n_channels * n_inner
    n_tiles = _n_tiles(n_outer, n_channels, q, cb, block_rows)
    for worker in prange(n_workers):
        for t in range(*_worker_tiles(worker, n_workers, n_tiles, True)):
            rb, r0, r1, c0, nch = _tile(t, n_outer, n_channels, q, cb, block_rows)
            coef = np.empty((3, nch), x.dtype)
            _affine_coefficients(mean, invstd, gamma, beta, c0, coef[0], coef[1], coef[2])
            _tile_affine(x, out, r0, r1, q, row_stride, c0 * n_inner, sub,
                         coef[0], coef[1], coef[2], relu, stream)
        store_fence()


@njit(cache=True, parallel=True)
def _grad_sweep(dy, x, relu_y, n_outer, n_channels, n_inner, q, sub, cb, block_rows, mean,
                invstd, part_dy, part_dy_xhat, fuse, gamma, training, out, n_workers):
    """Per-tile sum dy and sum dy * xhat into the partials (one pass over x and dy). With a
    fused ReLU (``relu_y`` its output, else None), dy is masked where the output is not
    positive, here and in the dx this sweep writes.

    fuse (only when each tile holds whole channels): also write the tile's dx, whose
    coefficients need just these (then complete) sums, while x and dy are still in cache.
    """
    row_stride = n_channels * n_inner
    n_tiles = _n_tiles(n_outer, n_channels, q, cb, block_rows)
    for worker in prange(n_workers):
        for t in range(*_worker_tiles(worker, n_workers, n_tiles, False)):
            rb, r0, r1, c0, nch = _tile(t, n_outer, n_channels, q, cb, block_rows)
            j0 = c0 * n_inner
            mean_hi = np.empty(nch, x.dtype)
            mean_lo = np.empty(nch)
            _split_mean(mean, c0, mean_hi, mean_lo)
            sum_dy = part_dy[rb, c0:c0 + nch]
            sum_dyd = part_dy_xhat[rb, c0:c0 + nch]
            _tile_grad(dy, x, relu_y, r0, r1, q, row_stride, j0, sub, mean_hi, sum_dy, sum_dyd)
            # sum dy (x - mean) = sum dy (x - mean_hi) - mean_lo sum dy; times invstd: sum dy xhat
            for k in range(nch):
                sum_dyd[k] = (sum_dyd[k] - mean_lo[k] * sum_dy[k]) * np.float64(invstd[c0 + k])
            if fuse:
                coef = np.empty((4, nch), x.dtype)
                _dx_coefficients(mean, invstd, gamma, part_dy[rb], part_dy_xhat[rb],
                                 n_outer * n_inner, training, c0,
                                 coef[0], coef[1], coef[2], coef[3])
                _tile_dx(dy, x, relu_y, out, r0, r1, q, row_stride, j0, sub,
                         coef[0], coef[1], coef[2], coef[3], False)


@njit(cache=True, parallel=True)
def _dx_sweep(dy, x, relu_y, out, n_outer, n_channels, n_inner, q, sub, cb, block_rows,
              mean, invstd, gamma, sum_dy, sum_dy_xhat, count, training, stream, n_workers):
    """dx from complete sums, tile by tile (dy masked by a fused ReLU's output ``relu_y``;
    ``stream``: see :func:`_streams`)."""
    row_stride = n_channels * n_inner
    n_tiles = _n_tiles(n_outer, n_channels, q, cb, block_rows)
    for worker in prange(n_workers):
        for t in range(*_worker_tiles(worker, n_workers, n_tiles, True)):
            rb, r0, r1, c0, nch = _tile(t, n_outer, n_channels, q, cb, block_rows)
            coef = np.empty((4, nch), x.dtype)
            _dx_coefficients(mean, invstd, gamma, sum_dy, sum_dy_xhat, count, training, c0,
                             coef[0], coef[1], coef[2], coef[3])
            _tile_dx(dy, x, relu_y, out, r0, r1, q, row_stride, c0 * n_inner, sub,
                     coef[0], coef[1], coef[2], coef[3], stream)
        store_fence()

# --------------------------------------------------------------------------------------------
# Python-level backend functions (the interface in the module docstring).
# --------------------------------------------------------------------------------------------
def _n_workers() -> int:
    """One parallel worker per Numba thread (read here: inside a kernel the call would keep
    Numba from caching it)."""
    return numba.get_num_threads()


def _as_f64(vec, n_channels, default):
    """A (C,) float64 copy of weight/bias/statistics, or the constant `default` when None."""
    if vec is None:
        return np.full(n_channels, default)
    return np.ascontiguousarray(vec, dtype=np.float64)


class _Geometry:
    """Shape, tile plan and row-block count of a kernel-layout array (immutable; one per shape
    and item size, see :func:`_geometry`)."""

    def __init__(self, shape3, itemsize):
        self.n_outer, self.n_channels, self.n_inner = shape3
        self.itemsize = itemsize
        self.q, self.sub, self.cb, self.block_rows = plan_tiles(shape3, itemsize)
        self.n_row_blocks = chunk_count(self.n_outer * self.q, self.block_rows)
        self.fusable = self.n_row_blocks == 1
        self.count = self.n_outer * self.n_inner
        rows = np.full(self.n_row_blocks, self.block_rows, dtype=np.int64)
        if self.n_row_blocks:  # an empty batch (eval) has none
            rows[-1] = self.n_outer * self.q - self.block_rows * (self.n_row_blocks - 1)
        #: Values per channel in each row block (the last block may be shorter); read-only.
        self.block_counts = rows * self.sub
        self.block_counts.flags.writeable = False

    @property
    def args(self):
        return (self.n_outer, self.n_channels, self.n_inner, self.q, self.sub, self.cb,
                self.block_rows)

    @property
    def elementwise_args(self):
        """Tiles for the sweeps that only apply coefficients (no reduction, so any cut gives the
        same bits): with run loops, whole rows of all channels, i.e. contiguous memory, which
        streams faster than the channel blocks the fused reductions need."""
        if self.q != 1 or self.sub < RUN_MIN_WIDTH:
            return self.args
        row_bytes = self.n_channels * self.sub * self.itemsize
        return (self.n_outer, self.n_channels, self.n_inner, 1, self.sub, self.n_channels,
                max(1, ROW_BLOCK_BYTES // max(1, row_bytes)))

    def partials(self):
        return np.empty((self.n_row_blocks, self.n_channels)), \
            np.empty((self.n_row_blocks, self.n_channels))


@functools.lru_cache(maxsize=256)
def _geometry_of(shape3, itemsize):
    return _Geometry(shape3, itemsize)


def _geometry(x3):
    """The (cached) :class:`_Geometry` of ``x3``: a model calls its layers with the same few
    shapes every step, and planning the tiles costs more than a small layer's kernel."""
    return _geometry_of(x3.shape, x3.dtype.itemsize)


def _flat(a):
    return a.reshape(-1)


def _streams(out3) -> bool:
    """Whether a training sweep writes ``out3`` with non-temporal stores: when it is larger
    than the two L2 caches together (it is not going to stay in them for its next reader
    anyway) and starts on a cache line (then the loops stream every row or run whose lines it
    fills whole, see :func:`_whole_lines`); on every CPU (see the module docstring; the
    cross-entropy decides per CPU family, ``_stream.STREAMING_PAYS``). An ordinary store first
    reads the line it writes, so a streamed output costs one transfer per byte instead of two.
    Not in eval: its single pass over x and y can live in the L3 cache from call to call, which
    streamed stores defeat (eval NCHW 64 x 256 x 28 x 28, freed memory kept: 2.39-2.51 ms with
    ordinary stores, 3.74-3.75 streamed)."""
    return out3.nbytes >= STREAM_MIN_BYTES and out3.ctypes.data % STREAM_BYTES == 0


def _flat_or_none(a):
    return None if a is None else a.reshape(-1)


def _unused_out(x3):
    """Placeholder output for a sweep that only reduces (its fused write is switched off)."""
    return np.empty(1, x3.dtype)


def _moments(x3, gamma, beta, eps, out3, relu=False):
    """(count, mean, m2, invstd or None): statistics, normalising into out3 when fusable."""
    geo = _geometry(x3)
    part_mean, part_m2 = geo.partials()
    fuse = out3 is not None and geo.fusable
    invstd = np.empty(geo.n_channels)
    _stats_sweep(_flat(x3), *geo.args, part_mean, part_m2, fuse,
                 gamma, beta, eps, invstd, _flat(out3) if fuse else _unused_out(x3), relu,
                 _n_workers())
    if geo.fusable:  # one row block: what merge_moments returns for one part, without the call
        mean, m2 = part_mean[0], part_m2[0]
    else:  # the merged count is the sum of the block counts, geo.count
        _, mean, m2 = merge_moments(geo.block_counts, part_mean, part_m2)
    return geo.count, mean, m2, (invstd if fuse else None)


def channel_stats(x3):
    """(count, mean, m2) per channel of a (P, C, S) array; mean and m2 (C,) float64."""
    c = x3.shape[1]
    count, mean, m2, _ = _moments(x3, _as_f64(None, c, 1.0), _as_f64(None, c, 0.0), 0.0, None)
    return count, mean, m2


def normalize(x3, mean, invstd, weight, bias, out3, *, relu=False, stream=False):
    """out3 = (x - mean) * invstd * weight + bias per channel, then max(out3, 0) with ``relu``
    (CPU only); returns out3. ``stream``: non-temporal stores where :func:`_streams` allows."""
    if x3.size == 0:  # no tile to plan (an empty batch or spatial axis): nothing to write
        return out3
    geo = _geometry(x3)
    c = geo.n_channels
    _normalize_sweep(_flat(x3), _flat(out3), *geo.elementwise_args, _as_f64(mean, c, 0.0),
                     _as_f64(invstd, c, 1.0), _as_f64(weight, c, 1.0), _as_f64(bias, c, 0.0),
                     relu, stream and _streams(out3), _n_workers())
    return out3


def _grad_sums(dy3, x3, mean, invstd, gamma, training, out3, relu_output3=None):
    """(sum_dy, sum_dy_xhat, fused): the sums, writing dx into out3 when fusable."""
    if x3.size == 0:  # sums over no value (and no dx to write)
        return np.zeros(x3.shape[1]), np.zeros(x3.shape[1]), True
    geo = _geometry(x3)
    part_dy, part_dy_xhat = geo.partials()
    fuse = out3 is not None and geo.fusable
    _grad_sweep(_flat(dy3), _flat(x3), _flat_or_none(relu_output3), *geo.args, mean, invstd,
                part_dy, part_dy_xhat, fuse, gamma, training,
                _flat(out3) if fuse else _unused_out(x3), _n_workers())
    if geo.fusable:  # one row block: what sum_partials returns for one part, without the call
        return part_dy[0], part_dy_xhat[0], fuse
    return sum_partials(part_dy), sum_partials(part_dy_xhat), fuse


def backward_reduce(dy3, x3, mean, invstd):
    """(sum_dy, sum_dy_xhat) per channel, (C,) float64 each."""
    c = x3.shape[1]
    sum_dy, sum_dy_xhat, _ = _grad_sums(dy3, x3, _as_f64(mean, c, 0.0), _as_f64(invstd, c, 1.0),
                                        _as_f64(None, c, 1.0), True, None)
    return sum_dy, sum_dy_xhat


def backward_elementwise(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, out3, *,
                         training=True, relu_output3=None, stream=False):
    """dx into out3 from (global) sums and count; returns out3. ``relu_output3`` (CPU only):
    the output of a forward with a fused ReLU, whose backward masks dy where it is not
    positive (the sums must then be those of the masked dy)."""
    geo = _geometry(x3)
    c = geo.n_channels
    _dx_sweep(_flat(dy3), _flat(x3), _flat_or_none(relu_output3), _flat(out3),
              *geo.elementwise_args, _as_f64(mean, c, 0.0),
              _as_f64(invstd, c, 1.0), _as_f64(weight, c, 1.0), _as_f64(sum_dy, c, 0.0),
              _as_f64(sum_dy_xhat, c, 0.0), float(count), bool(training),
              stream and _streams(out3), _n_workers())
    return out3


@njit(cache=True)
def _update_running(running, stat, momentum, scale):
    """running = (1 - momentum) running + momentum (stat * scale), in float64, stored in the
    buffer's dtype; scale = m / (m - 1) turns the biased batch variance into the unbiased one."""
    for c in range(running.shape[0]):
        running[c] = (1.0 - momentum) * np.float64(running[c]) + momentum * (stat[c] * scale)


def forward(x3, weight, bias, running_mean, running_var, out3, *, training, momentum, eps,
            relu=False):
    """Fused forward; see the module docstring. Returns (mean, invstd) in the stat dtype.
    ``relu`` (CPU only): write max(y, 0), a batch norm followed by a ReLU in one pass."""
    c = x3.shape[1]
    stat = stat_dtype(x3.dtype)
    gamma, beta = _as_f64(weight, c, 1.0), _as_f64(bias, c, 0.0)
    if training:
        count, mean, m2, invstd = _moments(x3, gamma, beta, eps, out3, relu)
        var = m2 / count
        if invstd is None:
            invstd = 1.0 / np.sqrt(var + eps)
            normalize(x3, mean, invstd, gamma, beta, out3, relu=relu, stream=True)
        if running_mean is not None:
            _update_running(running_mean, mean, momentum, 1.0)
        if running_var is not None:
            _update_running(running_var, var, momentum, count / (count - 1))
    else:
        mean = _as_f64(running_mean, c, 0.0)
        invstd = 1.0 / np.sqrt(_as_f64(running_var, c, 1.0) + eps)
        normalize(x3, mean, invstd, gamma, beta, out3, relu=relu)
    return mean.astype(stat), invstd.astype(stat)


def backward(dy3, x3, mean, invstd, weight, out3, *, training, relu_output3=None):
    """Fused backward; see the module docstring. Returns (dweight, dbias) in the stat dtype.
    ``relu_output3`` (CPU only): the output of a forward with ``relu=True``; the ReLU's
    backward (dy where that output is positive, else 0) is fused in."""
    c = x3.shape[1]
    stat = stat_dtype(x3.dtype)
    mean, invstd, gamma = _as_f64(mean, c, 0.0), _as_f64(invstd, c, 1.0), _as_f64(weight, c, 1.0)
    sum_dy, sum_dy_xhat, fused = _grad_sums(dy3, x3, mean, invstd, gamma, training, out3,
                                            relu_output3)
    if not fused:
        backward_elementwise(dy3, x3, mean, invstd, gamma, sum_dy, sum_dy_xhat,
                             x3.shape[0] * x3.shape[2], out3, training=training,
                             relu_output3=relu_output3, stream=training)
    return sum_dy_xhat.astype(stat), sum_dy.astype(stat)
