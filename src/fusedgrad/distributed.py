"""Batch norm over a batch split across processes, cross-entropy over classes split across them.

Two layers:

1. Framework-free building blocks on NumPy arrays, the algebra that makes both operations
   exact when the data is split: each process reduces its own part, the small per-part results
   are exchanged (by any transport) and combined in a FIXED order, so every process obtains the
   same bits, whatever the thread counts.
2. The same operations on ``torch.distributed`` (gloo on CPUs), autograd-aware:
   :class:`SyncBatchNorm` (a drop-in for ``torch.nn.SyncBatchNorm``), :func:`convert_sync_batchnorm`
   and :func:`vocab_parallel_softmax_cross_entropy`.

Batch norm over a split batch
-----------------------------
Each part p (a process's slice of the batch) computes per channel ``(n_p, mean_p, M2_p)`` with
``M2_p = sum (x - mean_p)^2`` (:func:`bn_partial_stats`, the CPU backend's cache-blocked kernel).
:func:`bn_merge_stats` combines them with Chan's update in part order (skipping empty parts)::

    n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta n_b / n,
    M2 = M2_a + M2_b + delta^2 n_a n_b / n

which is exact algebra for any counts (no sum(x^2) - n mean^2 cancellation), so the merged
statistics equal those of the concatenated batch up to rounding. Then, with the global count n,
``var = M2 / n`` (biased, for normalising) and ``M2 / (n - 1)`` (unbiased, running buffer)::

    y  = (x - mean) invstd weight + bias,                         invstd = 1 / sqrt(var + eps)
    dx = weight invstd (dy - sum(dy) / n - xhat sum(dy xhat) / n),  xhat = (x - mean) invstd

The backward needs only two global per-channel sums: :func:`bn_backward_reduce` gives a part's
``(sum dy, sum dy xhat)``, the parts' sums are added, and :func:`bn_backward_elementwise` writes
the part's dx from the global sums. A part's own sums are its ``dbias`` and ``dweight``
(data-parallel training adds them across processes, as for any parameter gradient).

Cross-entropy over class shards
-------------------------------
Shard k holds the logits of classes ``[o_k, o_k + C_k)`` for every row; the target is a global
class index, the same on every shard. Per row and shard (:func:`ce_shard_stats`)::

    m_k = max_j z_j,   s_k = sum_j exp(z_j - m_k),   t_k = z_target if the target is here else 0,
    u_k = sum_j w_j z_j                                (only with label smoothing)

:func:`ce_combine` (fixed shard order): ``M = max_k m_k``, ``S = sum_k s_k exp(m_k - M)``,
``lse = M + log S``, ``z_t = sum_k t_k`` (one shard holds it; the others add an exact 0),
``U = sum_k u_k``. With q_c = (1 - s) y_c + s / C and W = sum_c w_c (:func:`ce_loss`)::

    loss = (1 - s) w_t (lse - z_t) + (s / C)(lse W - U) + z_loss w_t lse^2

and each shard writes its own gradient slice (:func:`ce_shard_grad`) from the global lse alone,
p_j = exp(z_j - lse)::

    dloss/dz_j = p_j [(1 - s) w_t + (s / C) W + 2 z_loss w_t lse]
                 - (s / C) w_j - (1 - s) w_t [j = t]

With the global maximum known first (as on torch.distributed, where it is one all-reduce), the
shards shift by M itself (``shift=M``) and the ``s_k`` simply add up. Supported exactly: class
indices with ``ignore_index``, class ``weight`` (the full (C,) vector, replicated), label
smoothing, ``z_loss``, ``softcap`` and the reductions "mean" | "sum" | "none" with PyTorch's
normalisation. The cap z -> c tanh(z / c) acts on each logit alone, so every shard caps its
own classes: z' stands for z in everything above (m_k is the cap of the shard's maximum), and
the gradient slice is multiplied by the slope 1 - tanh^2(z_j / c).
Probability targets are refused with a ``TypeError`` (an (N, C) target would itself have to be
sharded); logits must be 2-D ``(N, C_k)``.

On torch.distributed
--------------------
``SyncBatchNorm`` forward: ONE ``all_gather_single`` of the packed float64 vector
``[n_p, mean_p (C), M2_p (C)]``, merged by every rank in rank order (an all-reduce of sums would
be neither exact nor ordered); backward: ONE ``all_reduce`` of ``[sum dy (C), sum dy xhat (C)]``.
Ranks with an empty batch take part with ``n_p = 0``. Eval mode uses the running statistics with
no collective. ``vocab_parallel_softmax_cross_entropy``: two small all-reduces in forward (MAX of
the row maxima, packed with the shard widths so the class offsets come for free; SUM of
``[s, t, u]``), none in backward. Tensors must be on the CPU (the building blocks run the CPU
kernels; CUDA tensors are refused with a ``TypeError``). :class:`CollectiveCounter` counts the
collectives issued, to check these numbers.

This module imports torch (unlike ``import fusedgrad``); its NumPy building blocks need no
process group.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from numba import njit, prange
from torch import nn

from . import _layout
from ._options import CrossEntropyOptions
from ._torch_arrays import ChannelLayout, kernel_array
from ._torch_ops import (adopt_state, batch_norm, bias_keyword, kernel_backward,
                         meta_copy_arguments, step_options)
from ._validate import (INT_DTYPES, check_dtype, check_int, check_ndim, check_real, check_out,
                        check_reduction, check_shape, check_softcap, check_writeable,
                        check_written_in_place)
from .cross_entropy import check_grad_loss, check_grad_loss_type
from .cpu import _arrays as host_arrays
from .cpu import batch_norm as _bn_cpu
from .cpu import cross_entropy as _ce_cpu
from .cpu._math import FASTMATH_SOFTMAX, cast_like
from .cpu._reduce import merge_moments
from .cpu.cross_entropy import (BLOCK, CHUNK_ELEMENTS, exp_scale_minus_weighted, fill_zero,
                                index_coefficient, max_of, soft_cap, soft_cap_and_slope,
                                sum_exp_shifted, weighted_sum)

__all__ = ["bn_partial_stats", "bn_merge_stats", "bn_forward_from_stats", "bn_backward_reduce",
           "bn_backward_elementwise", "ShardStats", "ce_shard_max", "ce_shard_stats",
           "ce_combine", "ce_loss", "ce_shard_grad",
           "SyncBatchNorm", "convert_sync_batchnorm", "vocab_parallel_softmax_cross_entropy",
           "CollectiveCounter"]


# ============================================================================================
# Batch norm building blocks
# ============================================================================================
def _kernel_view(x, axis: int):
    """(P, C, S) C-contiguous view (a copy only if ``x`` is not contiguous); see cpu.batch_norm.

    ``x`` is made C-contiguous first, so ``host_view``'s channels-last case never applies
    (``channels_last=False``): P is the product of the axes before the channel axis, S of those
    after it, for any channel axis.
    """
    return _layout.host_view(np.ascontiguousarray(x), axis, False)


def _bn_input(name, x, channel_axis):
    """Validated float array and its channel axis (in [0, ndim), as in ``fg.batch_norm_*``)."""
    x = host_arrays.as_array(name, x)
    check_dtype(name, x, host_arrays.DTYPES)
    check_ndim(name, x, 2, "an array with channels on channel_axis")
    axis = _layout.channel_axis(channel_axis, x.ndim)
    if x.shape[axis] == 0:
        raise ValueError(f"{name} must have at least one channel, got shape {x.shape}")
    return x, axis


def _channel_vector(name, vec, n_channels, *, writeable=False):
    """``vec`` checked as a float32/float64 ``(n_channels,)`` array (also the class weights),
    or None."""
    if vec is None:
        return None
    given = vec
    vec = host_arrays.as_array(name, vec)
    check_dtype(name, vec, host_arrays.DTYPES)
    check_shape(name, vec, (n_channels,))
    if writeable:
        check_written_in_place(name, given, vec)
        check_writeable(host_arrays, name, vec)
    return vec


def _real_array(name, value):
    """``value`` as a host array of real numbers (integer or floating dtype), else TypeError
    naming the argument (NumPy would convert strings with an error naming none, and complex
    numbers by dropping their imaginary part with only a warning)."""
    array = host_arrays.as_array(name, value)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _f64_vector(name, vec, n_channels):
    """A required (C,) statistic as a contiguous float64 array (``None`` is refused: unlike
    weight or bias it has no default)."""
    if vec is None:
        raise TypeError(f"{name} must be a ({n_channels},) array, got None")
    return np.ascontiguousarray(_channel_vector(name, vec, n_channels), dtype=np.float64)


def _output(out, x, inputs, name="out"):
    """``out`` checked (shape and dtype of x, C-contiguous, writeable, sharing no memory with
    any of ``inputs``, ``(name, array or None)`` pairs: the kernels read them while they write
    it) or a new array (large ones reuse released buffers, like the single-process operations'
    outputs)."""
    if out is None:
        return host_arrays.empty(x.shape, x.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    check_out(host_arrays, name, out, shape=x.shape, dtype=x.dtype, dtype_of=inputs[0][0],
              forbid_alias=inputs)
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous array")
    return out


def bn_partial_stats(x, *, channel_axis=1):
    """One part's per-channel statistics ``(count, mean, m2)``.

    x: float32/float64 with channels on ``channel_axis``, any axis (1 for ``(N, C, ...)``, -1
    for channels-last ``(N, ..., C)``); N may be 0. Returns count = values per channel (int),
    mean and m2 = sum (x - mean)^2, ``(C,)`` float64 (zeros for an empty part).
    """
    x, axis = _bn_input("x", x, channel_axis)
    n_channels = x.shape[axis]
    if x.size == 0:
        return 0, np.zeros(n_channels), np.zeros(n_channels)
    return _bn_cpu.channel_stats(_kernel_view(x, axis))


def bn_merge_stats(counts, means, m2s):
    """Chan-merge K parts' statistics in index order: ``(count, mean, m2)``.

    counts: (K,) non-negative integers; means, m2s: (K, C) as from :func:`bn_partial_stats`.
    Parts with count 0 are skipped (their mean and m2 are not read); a single non-empty part is
    returned bitwise unchanged. With every part empty the result is ``(0, zeros, zeros)``.
    """
    counts = _real_array("counts", counts)
    means = _real_array("means", means)
    m2s = _real_array("m2s", m2s)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D (K,), got shape {counts.shape}")
    if means.ndim != 2 or means.shape[0] != counts.shape[0]:
        raise ValueError(f"means must have shape (K={counts.shape[0]}, C), got {means.shape}")
    check_shape("m2s", m2s, means.shape)
    if counts.shape[0] == 0:
        raise ValueError("counts must hold at least one part")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(
            counts != np.round(counts)):
        raise ValueError(f"counts must be non-negative integers, got {counts}")
    kept = counts > 0
    if not np.any(kept):
        return 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    count, mean, m2 = merge_moments(
        np.ascontiguousarray(counts[kept], dtype=np.float64),
        np.ascontiguousarray(means[kept], dtype=np.float64),
        np.ascontiguousarray(m2s[kept], dtype=np.float64))
    return int(count), mean, m2


def bn_forward_from_stats(x, count, mean, m2, weight=None, bias=None, running_mean=None,
                          running_var=None, *, momentum=0.1, eps=1e-5, channel_axis=1, out=None):
    """Normalise one part with the merged statistics; update the running buffers.

    count, mean, m2: the GLOBAL statistics from :func:`bn_merge_stats` (count >= 2).
    y = (x - mean) invstd weight + bias, invstd = 1 / sqrt(m2 / count + eps); running buffers
    (optional, (C,), updated in place) get ``r = (1 - momentum) r + momentum stat`` with the
    unbiased variance m2 / (count - 1). Returns ``(y, mean, invstd)``: y like x (written into
    ``out`` if given), mean and invstd ``(C,)`` float64 (pass them to the backward blocks).
    """
    x, axis = _bn_input("x", x, channel_axis)
    n_channels = x.shape[axis]
    count = check_int("count", count)
    if count < 2:
        raise ValueError(f"count must be >= 2 (values per channel over all parts in training), "
                         f"got {count}")
    mean = _f64_vector("mean", mean, n_channels)
    m2 = _f64_vector("m2", m2, n_channels)
    weight = _channel_vector("weight", weight, n_channels)
    bias = _channel_vector("bias", bias, n_channels)
    running_mean = _channel_vector("running_mean", running_mean, n_channels, writeable=True)
    running_var = _channel_vector("running_var", running_var, n_channels, writeable=True)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    y = _output(out, x, (("x", x), ("mean", mean), ("m2", m2), ("weight", weight),
                         ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)))
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    if x.size:
        _bn_cpu.normalize(_kernel_view(x, axis), mean, invstd, weight, bias,
                          _kernel_view(y, axis))
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        running_var[...] = (1.0 - momentum) * running_var + momentum * (m2 / (count - 1))
    return y, mean, invstd


def _bn_grad_inputs(dy, x, mean, invstd, channel_axis):
    x, axis = _bn_input("x", x, channel_axis)
    dy = host_arrays.as_array("dy", dy)
    check_shape("dy", dy, x.shape)
    check_dtype("dy", dy, (x.dtype,))
    n_channels = x.shape[axis]
    return (dy, x, axis, _f64_vector("mean", mean, n_channels),
            _f64_vector("invstd", invstd, n_channels))


def bn_backward_reduce(dy, x, mean, invstd, *, channel_axis=1):
    """One part's ``(sum dy, sum dy xhat)`` per channel, ``(C,)`` float64 each.

    xhat = (x - mean) invstd with the global mean / invstd. Also the part's dbias and dweight.
    """
    dy, x, axis, mean, invstd = _bn_grad_inputs(dy, x, mean, invstd, channel_axis)
    if x.size == 0:
        return np.zeros(mean.shape[0]), np.zeros(mean.shape[0])
    return _bn_cpu.backward_reduce(_kernel_view(dy, axis), _kernel_view(x, axis), mean, invstd)


def bn_backward_elementwise(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, *,
                            channel_axis=1, out=None):
    """One part's dx = weight invstd (dy - sum_dy / count - xhat sum_dy_xhat / count).

    sum_dy, sum_dy_xhat: the GLOBAL sums (added over parts); count: the GLOBAL values per
    channel. Returns dx like x (written into ``out`` if given).
    """
    dy, x, axis, mean, invstd = _bn_grad_inputs(dy, x, mean, invstd, channel_axis)
    n_channels = mean.shape[0]
    weight = _channel_vector("weight", weight, n_channels)
    sum_dy = _f64_vector("sum_dy", sum_dy, n_channels)
    sum_dy_xhat = _f64_vector("sum_dy_xhat", sum_dy_xhat, n_channels)
    count = check_int("count", count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    dx = _output(out, x, (("x", x), ("dy", dy), ("mean", mean), ("invstd", invstd),
                          ("weight", weight), ("sum_dy", sum_dy), ("sum_dy_xhat", sum_dy_xhat)))
    if x.size:
        _bn_cpu.backward_elementwise(_kernel_view(dy, axis), _kernel_view(x, axis), mean, invstd,
                                     weight, sum_dy, sum_dy_xhat, count, _kernel_view(dx, axis))
    return dx


# ============================================================================================
# Cross-entropy over class shards: kernels
# ============================================================================================
@njit(cache=True, inline="always")
def _row_chunks(n_rows, n_cols):
    """(rows per chunk, chunks): chunks of about CHUNK_ELEMENTS logits, as the single-process
    (N, C, S) kernels cut their samples; the chunking depends on the shape only (each row is
    computed by one thread, in a fixed order of blocks). A rank may hold no classes, hence
    max(1, n_cols)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    return rows, (n_rows + rows - 1) // rows


@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _shard_max_kernel(logits, out, softcap):
    """out[i] = max_j z'_ij (NaN if any is NaN), in float64: z' = z, or with a ``softcap`` c
    the capped logits c tanh(z / c), whose maximum is the cap of the maximum.

    logits: (N, C_shard) float32 / float64, C-contiguous; out: (N,) float64, written;
    softcap: None or a float.
    """
    n, c = logits.shape
    rows, n_chunks = _row_chunks(n, c)
    for chunk in prange(n_chunks):
        for i in range(chunk * rows, min(n, (chunk + 1) * rows)):
            out[i] = np.float64(soft_cap(max_of(logits[i]), softcap))


@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _shard_stats_kernel(logits, target, offset, weights, shift, ignore_index, with_weighted,
                        sum_exp, target_logit, weighted, softcap):
    """Per row: sum_j exp(z'_j - shift_i), z'_target (0 if not on this shard), sum_j w_j z'_j,
    with z' the logits, capped with a ``softcap`` (each shard caps its own classes).

    ``shift`` holds the row maxima (the shard's or the global); a row whose maximum is -inf
    (every class masked) is shifted by 0 instead, so its sum is an exact 0. Each BLOCK of the
    row is summed in the logits' dtype (vectorised exp) and the blocks in float64.

    logits: (N, C_shard) float32 / float64, C-contiguous; target: (N,) int64 global class
    indices; weights: (C_shard,) float64, this shard's slice; shift: (N,) float64;
    sum_exp, target_logit, weighted: (N,) float64, written; softcap: None or a float.
    """
    n, c = logits.shape
    rows, n_chunks = _row_chunks(n, c)
    for chunk in prange(n_chunks):
        for i in range(chunk * rows, min(n, (chunk + 1) * rows)):
            z = logits[i]
            s = shift[i] if shift[i] > -np.inf else 0.0
            s_cast = cast_like(s, z)
            total = 0.0
            w_total = 0.0
            for lo in range(0, c, BLOCK):
                zb = z[lo:min(c, lo + BLOCK)]
                total += np.float64(sum_exp_shifted(zb, zb, s_cast, False, False, softcap,
                                                           None)[0])
                if with_weighted:
                    w_total += weighted_sum(zb, weights[lo:min(c, lo + BLOCK)], softcap)
            sum_exp[i] = total
            weighted[i] = w_total
            local = target[i] - offset
            on_shard = target[i] != ignore_index and 0 <= local < c
            target_logit[i] = np.float64(soft_cap(z[local], softcap)) if on_shard else 0.0


@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _shard_grad_kernel(logits, target, offset, weights, target_weights, lse, scale,
                       per_row_scale, n_classes, weight_total, smoothing, z_loss, ignore_index,
                       grad, softcap):
    """grad[i, j] = scale_i (p_ij coef_i - (s / C) w_j - (1 - s) w_t [j = t - offset]) slope_ij.

    coef_i = (1 - s) w_t + (s / C) W + 2 z_loss w_t lse_i; p_ij = exp(z'_ij - lse_i), with z'
    the (capped, with a ``softcap``) logits and slope_ij = dz'_ij / dz_ij (1 without a cap,
    1 - tanh^2(z_ij / c) with one); rows that are ignored, or whose scale is 0, get zeros.
    ``weights`` is this shard's slice of w, ``target_weights`` holds w_t per row (0 for
    ignored rows).

    logits: (N, C_shard) float32 / float64, C-contiguous; target: (N,) int64 global class
    indices; weights: (C_shard,) float64; target_weights: (N,) float64; lse: (N,) float64;
    scale: (1,) or (N,) float64; grad: (N, C_shard), the dtype of logits, written;
    softcap: None or a float.
    """
    n, c = logits.shape
    rows, n_chunks = _row_chunks(n, c)
    for chunk in prange(n_chunks):
        for i in range(chunk * rows, min(n, (chunk + 1) * rows)):
            g = grad[i]
            sc = scale[i] if per_row_scale else scale[0]
            if target[i] == ignore_index:
                fill_zero(g)
                continue
            w_t = target_weights[i]
            coef = index_coefficient(lse[i], w_t, weight_total, smoothing, z_loss, n_classes)
            exp_scale_minus_weighted(logits[i], g, lse[i], sc * coef,
                                     sc * smoothing / n_classes, weights, False, softcap)
            local = target[i] - offset
            if 0 <= local < c:
                _, slope = soft_cap_and_slope(logits[i, local], softcap)
                g[local] -= cast_like(sc * (1.0 - smoothing) * w_t * slope, g)


# ============================================================================================
# Cross-entropy over class shards: building blocks
# ============================================================================================
class ShardStats(NamedTuple):
    """Per-row statistics of one class shard, each ``(N,)`` float64 (see the module docstring).

    ``row_max``: the shift the exponentials were taken against (the shard's maximum, or the
    global one when given); ``sum_exp``: sum_j exp(z_j - row_max); ``target_logit``: z_target or
    0; ``weighted_sum``: sum_j w_j z_j (zeros unless label smoothing asked for it).
    """

    row_max: np.ndarray
    sum_exp: np.ndarray
    target_logit: np.ndarray
    weighted_sum: np.ndarray


def _shard_logits(logits_shard):
    logits = host_arrays.as_array("logits_shard", logits_shard)
    check_dtype("logits_shard", logits, host_arrays.DTYPES)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits_shard must be 2-D (N, C_shard) with C_shard >= 1, "
                         f"got shape {logits.shape}")
    return np.ascontiguousarray(logits)


def _index_target(target, n_rows):
    target = host_arrays.as_array("target", target)
    if target.dtype.kind == "f":
        raise TypeError("target must hold integer class indices: probability targets are not "
                        "supported over class shards")
    check_dtype("target", target, INT_DTYPES)
    check_shape("target", target, (n_rows,))
    return _ce_cpu.index_target(target)


def _target_and_weights(target, n_rows, n_classes, weight, ignore_index):
    """``(target, weights, ignore_index)`` checked in that order: int64 ``(N,)`` class indices
    or ignore_index, the full ``(C,)`` float64 class weights, the int ignore_index."""
    ignore_index = check_int("ignore_index", ignore_index)
    target = _index_target(target, n_rows)
    _ce_cpu.check_index_target(target, n_classes, ignore_index)
    weights = _ce_cpu.class_weights(_channel_vector("weight", weight, n_classes), n_classes)
    return target, weights, ignore_index


def _shard_bounds(class_offset, n_classes, width):
    offset = check_int("class_offset", class_offset)
    n_classes = check_int("n_classes", n_classes)
    if offset < 0 or offset + width > n_classes:
        raise ValueError(f"class_offset must place the shard's {width} classes inside "
                         f"[0, n_classes={n_classes}), got class_offset={offset}")
    return offset, n_classes


def _row_max(logits, softcap):
    """:func:`ce_shard_max` of checked (C-contiguous) logits and softcap."""
    out = np.empty(logits.shape[0])
    _shard_max_kernel(logits, out, softcap)
    return out


def ce_shard_max(logits_shard, *, softcap=None):
    """Row maxima of one shard's logits ``(N, C_shard)``, capped as
    ``softcap * tanh(max / softcap)`` when ``softcap`` is given: ``(N,)`` float64."""
    return _row_max(_shard_logits(logits_shard), check_softcap(softcap))


def ce_shard_stats(logits_shard, target, class_offset, n_classes, *, shift=None, weight=None,
                   ignore_index=-100, label_smoothing=0.0, softcap=None):
    """Per-row :class:`ShardStats` of the shard holding classes ``[class_offset, +C_shard)``.

    logits_shard: float32/float64 ``(N, C_shard)``; target: ``(N,)`` int32/int64 GLOBAL class
    indices (or ``ignore_index``), the same on every shard; n_classes: C over all shards;
    shift: optional ``(N,)`` row maxima to exponentiate against (the global maxima, so the
    shards' ``sum_exp`` add up directly), default the shard's own; weight: optional full
    ``(C,)`` class weights (this shard reads its slice); the weighted sum is computed only when
    ``label_smoothing > 0``. softcap: ``None`` or a float > 0: every statistic is then of the
    capped logits ``softcap * tanh(z / softcap)`` (and a given ``shift`` must be their maxima,
    as :func:`ce_shard_max` with the same ``softcap`` returns them).
    """
    logits = _shard_logits(logits_shard)
    n, width = logits.shape
    offset, n_classes = _shard_bounds(class_offset, n_classes, width)
    target, weights, ignore_index = _target_and_weights(target, n, n_classes, weight,
                                                        ignore_index)
    smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    softcap = check_softcap(softcap)
    if shift is None:
        row_max = _row_max(logits, softcap)
    else:
        row_max = np.ascontiguousarray(_real_array("shift", shift), dtype=np.float64)
        check_shape("shift", row_max, (n,))
    return _shard_stats(logits, target, offset, weights, row_max, ignore_index, smoothing,
                        softcap)


def _shard_stats(logits, target, offset, weights, row_max, ignore_index, smoothing, softcap):
    """:func:`ce_shard_stats` of checked arguments (``weights``: the full ``(C,)`` float64)."""
    n, width = logits.shape
    sum_exp, target_logit, weighted = np.empty(n), np.empty(n), np.empty(n)
    _shard_stats_kernel(logits, target, offset, weights[offset:offset + width], row_max,
                        ignore_index, smoothing > 0.0, sum_exp, target_logit, weighted, softcap)
    return ShardStats(row_max, sum_exp, target_logit, weighted)


def _lse(row_max, sum_exp):
    """log-sum-exp from a shift and the sum of exponentials against it (shift 0 for -inf)."""
    with np.errstate(divide="ignore"):
        return np.where(row_max > -np.inf, row_max, 0.0) + np.log(sum_exp)


def ce_combine(shard_stats):
    """Combine the shards' :class:`ShardStats` in list order: ``(lse, target_logit, weighted)``.

    M = max_k m_k; S = sum_k s_k exp(m_k - M) (shards with s_k = 0 add nothing);
    lse = M + log S; target_logit and weighted: plain sums in shard order. Each ``(N,)`` float64.
    """
    shard_stats = list(shard_stats)
    if not shard_stats:
        raise ValueError("shard_stats must hold at least one shard's statistics")
    rows = None
    for k, stats in enumerate(shard_stats):
        if not isinstance(stats, ShardStats):
            raise TypeError(f"shard_stats[{k}] must be a ShardStats (from ce_shard_stats), got "
                            f"{type(stats).__name__}")
        for field, values in zip(ShardStats._fields, stats):
            if not (isinstance(values, np.ndarray) and values.ndim == 1
                    and values.dtype == np.float64):
                raise TypeError(f"shard_stats[{k}].{field} must be a 1-D float64 array")
            rows = values.shape[0] if rows is None else rows
            if values.shape[0] != rows:
                raise ValueError(f"shard_stats[{k}].{field} has {values.shape[0]} rows, "
                                 f"shard_stats[0] has {rows}: every shard holds the same rows")
    top = shard_stats[0].row_max.copy()
    for stats in shard_stats[1:]:
        top = np.fmax(top, stats.row_max)
    shift = np.where(top > -np.inf, top, 0.0)
    total = np.zeros_like(top)
    target_logit = np.zeros_like(top)
    weighted = np.zeros_like(top)
    for stats in shard_stats:
        own_shift = np.where(stats.row_max > -np.inf, stats.row_max, 0.0)
        with np.errstate(invalid="ignore"):
            total += np.where(stats.sum_exp != 0.0,
                              stats.sum_exp * np.exp(own_shift - shift), 0.0)
        target_logit += stats.target_logit
        weighted += stats.weighted_sum
    return _lse(top, total), target_logit, weighted


class _CheckedCall(NamedTuple):
    """The checked arguments of a class-sharded cross-entropy call, shared by its statistics,
    loss and gradient (each public building block checks its own; the autograd Function checks
    once in forward and keeps this for backward)."""

    target: np.ndarray          # (N,) int64 global class indices or ignore_index
    n_classes: int              # C over all shards
    weights: np.ndarray         # (C,) float64, the full class weights
    target_weights: np.ndarray  # (N,) float64 w_t, 0 for ignored rows
    reduction: str
    options: CrossEntropyOptions


def _check_call(target, n_rows, n_classes, weight, ignore_index, reduction, label_smoothing,
                z_loss, softcap=None) -> _CheckedCall:
    n_classes = check_int("n_classes", n_classes)
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    target, weights, ignore_index = _target_and_weights(target, n_rows, n_classes, weight,
                                                        ignore_index)
    ignored = target == ignore_index
    target_weights = np.where(ignored, 0.0, weights[np.where(ignored, 0, target)])
    reduction = check_reduction(reduction)
    options = CrossEntropyOptions(
        ignore_index=ignore_index,
        label_smoothing=check_real("label_smoothing", label_smoothing, low=0.0, high=1.0),
        z_loss=check_real("z_loss", z_loss, low=0.0),
        softcap=check_softcap(softcap))
    return _CheckedCall(target, n_classes, weights, target_weights, reduction, options)


def _mean_denominator(call: _CheckedCall) -> float:
    return _ce_cpu.target_weight_sum(call.target, call.weights, call.options.ignore_index)


def ce_loss(lse, target_logit, weighted_sum, target, n_classes, *, weight=None,
            ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """The loss from the combined statistics (module docstring), PyTorch's reductions.

    lse, target_logit, weighted_sum: ``(N,)`` from :func:`ce_combine`; target ``(N,)`` global
    class indices; weight: optional full ``(C,)``. Returns a 0-d float64 array ("mean": divided
    by the summed target weights of non-ignored rows, NaN if all are ignored; "sum"), or the
    ``(N,)`` float64 per-row losses ("none", 0 for ignored rows).
    """
    lse = np.asarray(_real_array("lse", lse), dtype=np.float64)
    if lse.ndim != 1:
        raise ValueError(f"lse must have shape (N,), got {lse.shape}")
    call = _check_call(target, lse.shape[0], n_classes, weight, ignore_index, reduction,
                       label_smoothing, z_loss)
    statistics = []
    for name, values in (("target_logit", target_logit), ("weighted_sum", weighted_sum)):
        values = np.asarray(host_arrays.as_array(name, values), dtype=np.float64)
        check_shape(name, values, lse.shape)
        statistics.append(values)
    return _loss(lse, *statistics, call)


def _loss(lse, target_logit, weighted_sum, call: _CheckedCall):
    """:func:`ce_loss` of float64 ``(N,)`` statistics and a checked call."""
    options = call.options
    s, w_t = options.label_smoothing, call.target_weights
    per_row = ((1.0 - s) * w_t * (lse - target_logit)
               + (s / call.n_classes) * (lse * call.weights.sum() - weighted_sum)
               + options.z_loss * w_t * lse * lse)
    per_row = np.where(call.target == options.ignore_index, 0.0, per_row)
    if call.reduction == "none":
        return per_row
    denominator = _mean_denominator(call) if call.reduction == "mean" else None
    return _ce_cpu.reduced_loss(per_row, denominator, np.float64)


def ce_shard_grad(logits_shard, target, class_offset, lse, n_classes, *, weight=None,
                  ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=None, grad_loss=None, out=None):
    """This shard's slice of d(loss)/d(logits), ``(N, C_shard)`` in the logits' dtype.

    lse: the GLOBAL ``(N,)`` log-sum-exp (from :func:`ce_combine`); grad_loss: the upstream
    gradient (a scalar for "mean"/"sum", ``(N,)`` for "none"; ``None`` means 1). "mean" divides
    by the summed target weights (when they are 0: NaN rows, ignored rows zeros). Written into
    ``out`` if given. With a ``softcap`` (that of the statistics) the gradient is with respect
    to the uncapped logits.
    """
    logits = _shard_logits(logits_shard)
    n, width = logits.shape
    offset, n_classes = _shard_bounds(class_offset, n_classes, width)
    call = _check_call(target, n, n_classes, weight, ignore_index, reduction, label_smoothing,
                       z_loss, softcap)
    given_lse = _real_array("lse", lse)
    lse = np.ascontiguousarray(given_lse, dtype=np.float64)
    check_shape("lse", lse, (n,))
    given_scale = None
    if grad_loss is None:
        scale = np.ones(1)
    else:
        check_grad_loss_type(grad_loss)
        given_scale = check_grad_loss(host_arrays, grad_loss, call.reduction, (n,),
                                      scalar_for_none=False)
        scale = np.ascontiguousarray(np.asarray(given_scale, dtype=np.float64).reshape(-1))
    # the arguments as given: what the kernel reads is either their memory or a fresh copy
    inputs = (("logits_shard", logits_shard), ("lse", given_lse), ("grad_loss", given_scale),
              ("target", call.target), ("weight", call.weights))
    return _shard_grad(logits, offset, lse, scale, call, _output(out, logits, inputs))


def _shard_grad(logits, offset, lse, scale, call: _CheckedCall, grad):
    """:func:`ce_shard_grad` of checked arguments, written into ``grad``: ``lse`` ``(N,)``
    float64, ``scale`` the upstream gradient as a contiguous float64 ``(1,)`` or (for "none")
    ``(N,)`` vector."""
    width = logits.shape[1]
    options = call.options
    if call.reduction == "mean":
        denominator = _mean_denominator(call)
        scale = scale / denominator if denominator != 0.0 else np.full(1, np.nan)
    _shard_grad_kernel(logits, call.target, offset,
                       np.ascontiguousarray(call.weights[offset:offset + width]),
                       call.target_weights, lse, scale, scale.shape[0] > 1,
                       call.n_classes, float(call.weights.sum()), options.label_smoothing,
                       options.z_loss, options.ignore_index, grad, options.softcap)
    return grad


# ============================================================================================
# torch.distributed: counting collectives
# ============================================================================================
class CollectiveCounter:
    """Context manager counting the ``torch.distributed`` collectives called while it is active.

    It wraps the collective functions of the ``torch.distributed`` module and restores them on
    exit, so it sees every call made through that module (fusedgrad's, and PyTorch's own
    SyncBatchNorm Function) but not calls that bypass it. Used by the tests and the benchmark
    to check "one collective per direction"::

        with CollectiveCounter() as counter:
            y = sync_bn(x)
            assert counter.take() == 1
    """

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
             "all_gather_object", "broadcast", "reduce", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
             "barrier")

    def __init__(self):
        self.count = 0
        self._originals = {}

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._counted(self._originals[name]))
        return self

    def __exit__(self, *exc_info):
        for name, function in self._originals.items():
            setattr(dist, name, function)
        self._originals.clear()

    def _counted(self, function):
        def counted(*args, **kwargs):
            self.count += 1
            return function(*args, **kwargs)
        return counted

    def take(self) -> int:
        """Collectives counted since the last ``take`` (or the start); resets the count."""
        count, self.count = self.count, 0
        return count


# ============================================================================================
# torch.distributed: SyncBatchNorm
# ============================================================================================
def _cpu_tensor(name, tensor):
    if isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu":
        raise TypeError(f"{name} must be a CPU tensor (fusedgrad.distributed runs the CPU "
                        f"kernels), got device {tensor.device}")
    return kernel_array(name, tensor)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the concatenated batch of all ranks of ``group``.

    Saves the (channel-layout) input, ``weight``, the global mean / invstd (float64) and the
    global count.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group,
                world_size):
        layout = ChannelLayout(x)
        x_kernel = layout.to_kernel(x)
        x_array = _cpu_tensor("input", x_kernel)
        count, mean, m2 = bn_partial_stats(x_array, channel_axis=layout.channel_axis)
        # One collective: every rank's [count, mean (C), M2 (C)], then the same fixed-order
        # merge on every rank (so all ranks normalise with identical statistics).
        local = torch.from_numpy(np.concatenate(([float(count)], mean, m2)))
        gathered = torch.empty(world_size * local.numel(), dtype=torch.float64)
        dist.all_gather_single(gathered, local, group=group)
        parts = gathered.view(world_size, -1).numpy()
        n_channels = mean.shape[0]
        count, mean, m2 = bn_merge_stats(parts[:, 0], parts[:, 1:1 + n_channels],
                                         parts[:, 1 + n_channels:])
        if count < 2:
            raise ValueError(f"Expected more than 1 value per channel when training across "
                             f"all ranks, got {count} (input size {tuple(x.shape)} here)")
        y, mean, invstd = bn_forward_from_stats(
            x_array, count, mean, m2, _cpu_tensor("weight", weight), _cpu_tensor("bias", bias),
            _cpu_tensor("running_mean", running_mean), _cpu_tensor("running_var", running_var),
            momentum=momentum, eps=eps, channel_axis=layout.channel_axis)
        ctx.layout, ctx.count, ctx.group = layout, count, group
        ctx.save_for_backward(x_kernel, weight, torch.from_numpy(mean),
                              torch.from_numpy(invstd))
        return layout.from_kernel(torch.from_numpy(y))

    @staticmethod
    @kernel_backward("fusedgrad.distributed.SyncBatchNorm")
    def backward(ctx, grad_output):
        x_kernel, weight, mean, invstd = ctx.saved_tensors
        layout = ctx.layout
        x_array = x_kernel.numpy()
        dy_array = layout.to_kernel(grad_output.to(x_kernel.dtype)).numpy()
        axis = layout.channel_axis
        sum_dy, sum_dy_xhat = bn_backward_reduce(dy_array, x_array, mean.numpy(),
                                                 invstd.numpy(), channel_axis=axis)
        grad_input = None
        if ctx.needs_input_grad[0]:
            # One collective: the two global per-channel sums dx needs.
            sums = torch.from_numpy(np.concatenate((sum_dy, sum_dy_xhat)))
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            global_dy, global_dy_xhat = sums.numpy().reshape(2, -1)
            dx = bn_backward_elementwise(
                dy_array, x_array, mean.numpy(), invstd.numpy(), _cpu_tensor("weight", weight),
                global_dy, global_dy_xhat, ctx.count, channel_axis=axis)
            grad_input = layout.from_kernel(torch.from_numpy(dx))
        # The parameter gradients stay local, as in torch.nn.SyncBatchNorm: data-parallel
        # training (DDP) reduces them with the other parameters.
        grad_weight = torch.from_numpy(sum_dy_xhat) if ctx.needs_input_grad[1] else None
        grad_bias = torch.from_numpy(sum_dy) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors, with fusedgrad's kernels and exact statistics.

    Same constructor (``num_features, eps, momentum, affine, track_running_stats,
    process_group, device, dtype, *, bias``), parameters, buffers and ``state_dict`` keys, so
    checkpoints load in both directions. In training, with ``torch.distributed`` initialised and
    more than one rank in the group, every rank normalises its input ``(N, C, *)`` with the
    statistics of the concatenated batch of all ranks (N may differ per rank and be 0): one
    all-gather in forward, one all-reduce in backward. The running buffers are updated
    identically on every rank (unbiased variance with the global count). Otherwise (eval, one
    rank, no process group) it is a plain fused batch norm (``fusedgrad.torch.batch_norm``) with
    no collective.

    It derives from ``_BatchNorm``, not from ``nn.SyncBatchNorm``, because
    ``DistributedDataParallel`` refuses CPU modules containing an ``nn.SyncBatchNorm``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **bias_keyword(bias))
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input):
        self._check_input_dim(input)
        step = step_options(self)
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        world_size = dist.get_world_size(group) if group is not None else 1
        if not (self.training and world_size > 1):
            return batch_norm(input, step.running_mean, step.running_var, self.weight,
                              self.bias, step.use_batch_stats, step.momentum, self.eps)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, step.running_mean,
                                            step.running_var, self.eps, step.momentum, group,
                                            world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every batch-norm layer in ``module`` by this class, in place.

        Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: any ``_BatchNorm`` (torch's,
        fusedgrad's, torch's SyncBatchNorm) becomes a :class:`SyncBatchNorm` holding the very
        same parameter and buffer tensors and train/eval flag. Returns ``module``, or its
        replacement when ``module`` itself is a batch-norm layer. A model holding
        ``fusedgrad.torch.BatchNormReLU*d`` layers is refused (``ValueError``): converting them
        would drop their ReLU.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        fused_relu = next((m for m in module.modules() if getattr(m, "_relu", False)), None)
        if fused_relu is not None:  # checked before anything is converted
            raise ValueError(
                f"{type(fused_relu).__name__} applies a fused ReLU, which SyncBatchNorm does not: "
                "convert the model with fusedgrad.torch.convert_model(model) (fuse_relu=False) "
                "before convert_sync_batchnorm")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) is not cls:
            return _sync_copy(module, cls, process_group)
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                module.add_module(name, converted)
        return module


def _sync_copy(bn, cls, process_group):
    # Built on the meta device (no throwaway parameters), then handed the original tensors.
    sync = adopt_state(bn, cls(process_group=process_group, **meta_copy_arguments(bn)))
    if hasattr(bn, "qconfig"):
        sync.qconfig = bn.qconfig
    return sync


def convert_sync_batchnorm(module, process_group=None):
    """:meth:`SyncBatchNorm.convert_sync_batchnorm` as a function."""
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)


# ============================================================================================
# torch.distributed: vocabulary-parallel cross-entropy
# ============================================================================================
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy whose classes are split over the ranks of ``group``, in rank order.

    Saves the logits shard and target (by reference) and the global lse per row, and keeps the
    call its forward checked (``_CheckedCall``: the checked target, the class weights) on
    ``ctx``, as ``fusedgrad.torch`` keeps its validated call: the backward needs no
    communication and checks nothing again.
    """

    @staticmethod
    def forward(ctx, logits_shard, target, weight, ignore_index, reduction, label_smoothing,
                z_loss, softcap, group):
        logits = _cpu_tensor("logits_shard", logits_shard)
        n_rows, width = logits.shape
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        # All-reduce 1 (MAX): the row maxima (of the capped logits, with a softcap: each rank
        # caps its own classes), and each rank's shard width in its own slot (zeros
        # elsewhere), so the maximum over ranks is the list of all widths.
        packed = torch.zeros(n_rows + world_size, dtype=torch.float64)
        logits = _shard_logits(logits)
        packed[:n_rows] = torch.from_numpy(_row_max(logits, softcap))
        packed[n_rows + rank] = width
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        row_max = packed[:n_rows].numpy()
        widths = packed[n_rows:].numpy().astype(np.int64)
        offset, n_classes = int(widths[:rank].sum()), int(widths.sum())
        # Target and weight checked once, here, for the statistics, the loss and the backward's
        # gradient (the public building blocks would check them again in each).
        call = _check_call(_cpu_tensor("target", target), n_rows, n_classes,
                           _cpu_tensor("weight", weight), ignore_index, reduction,
                           label_smoothing, z_loss, softcap)
        stats = _shard_stats(logits, call.target, offset, call.weights, row_max,
                             call.options.ignore_index, call.options.label_smoothing, softcap)
        # All-reduce 2 (SUM): exponentials against the common shift, the target logit (one
        # rank contributes it, the others an exact 0), and sum_j w_j z_j for label smoothing.
        sums = [stats.sum_exp, stats.target_logit]
        if label_smoothing > 0.0:
            sums.append(stats.weighted_sum)
        summed = torch.from_numpy(np.stack(sums))
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        summed = summed.numpy()
        weighted = summed[2] if label_smoothing > 0.0 else np.zeros(n_rows)
        lse = _lse(row_max, summed[0])
        loss = _loss(lse, summed[1], weighted, call)
        ctx.call, ctx.offset = call, offset
        ctx.save_for_backward(logits_shard, target, weight, torch.from_numpy(lse))
        return torch.from_numpy(loss).to(logits_shard.dtype)

    @staticmethod
    @kernel_backward("fusedgrad.distributed.vocab_parallel_softmax_cross_entropy")
    def backward(ctx, grad_loss):
        # Unpacking the saved tensors checks that none was modified in place since forward.
        logits_shard, _, _, lse = ctx.saved_tensors
        logits = np.ascontiguousarray(logits_shard.detach().numpy())
        # Autograd hands over a gradient shaped like the loss: () or, for "none", (N,).
        scale = grad_loss.to(torch.float64).contiguous().numpy().reshape(-1)
        grad = _shard_grad(logits, ctx.offset, lse.numpy(), scale, ctx.call,
                           _output(None, logits, ()))
        return torch.from_numpy(grad), None, None, None, None, None, None, None, None


def vocab_parallel_softmax_cross_entropy(logits_shard, target, group=None, *, weight=None,
                                         ignore_index=-100, reduction="mean",
                                         label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Softmax cross-entropy of logits whose classes are split over the ranks of ``group``.

    logits_shard: CPU float32/float64 ``(N, C_r)``, the classes ``[o_r, o_r + C_r)`` of every
    row on rank r, the shards in rank order (widths may differ; ``o_r`` = sum of the widths of
    lower ranks, found by the first all-reduce); target: ``(N,)`` int64/int32 GLOBAL class
    indices or ``ignore_index``, identical on every rank; weight: optional full ``(C,)`` class
    weights, identical on every rank. Semantics of ``torch.nn.functional.cross_entropy``
    (reductions, label smoothing) plus ``z_loss`` and ``softcap`` as in
    ``fusedgrad.softmax_cross_entropy`` (each rank caps its own classes). Returns the loss (the
    same on every rank) in the logits' dtype; autograd gives each rank the gradient of its own
    shard. Two all-reduces in forward, none in backward; every rank of the
    group must call it with the same N.
    """
    if not isinstance(logits_shard, torch.Tensor):
        raise TypeError(f"logits_shard must be a torch.Tensor, got {type(logits_shard).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        raise TypeError("target must hold integer class indices: probability targets are not "
                        "supported with vocabulary-parallel logits")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad: gradients with respect to the class "
                         "weights are not computed (pass weight.detach())")
    if logits_shard.dim() != 2 or logits_shard.shape[1] == 0:
        raise ValueError(f"logits_shard must be 2-D (N, C_shard) with C_shard >= 1, "
                         f"got shape {tuple(logits_shard.shape)}")
    check_reduction(reduction)
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = check_real("z_loss", z_loss, low=0.0)
    softcap = check_softcap(softcap)
    if group is None:
        group = dist.group.WORLD
    return _VocabParallelCrossEntropy.apply(logits_shard, target, weight, int(ignore_index),
                                            reduction, label_smoothing, z_loss, softcap, group)
