"""CPU backend of softmax cross-entropy: fused ``@njit(parallel=True)`` kernels.

Backend interface
=================
``fusedgrad.cross_entropy`` (the public API) validates arguments, then calls only the functions
below, so a backend for another device (``fusedgrad.cuda.cross_entropy``) provides the same
names, arguments and results. Shapes: ``N`` samples, ``C`` classes, ``S = d1 * ... * dk``
spatial positions (1 for 2-D logits); a "sample" is one (n, d1, ..., dk) position, and
"per-sample arrays" are flat, length ``N * S``, in C order of ``(N, d1, ..., dk)``.

The arrays themselves (wrapping arguments, the dtypes taken, allocating the gradient, the
``out=`` checks) are the device's array interface, ``fusedgrad._device.arrays`` (here
``fusedgrad.cpu._arrays``), not the backend's. The scalar options and the kernel modes are
``fusedgrad._options``'s, shared by both backends.

Preparing the kernels' arrays (no kernel runs, nothing is written):

``index_target(target) -> array``
    Class indices as a flat contiguous int64 array of length ``N * S`` (int32 or strided input
    is converted; this is a per-sample array, never N x C).
``check_index_target(target, n_classes, ignore_index) -> None``
    Raises ``ValueError`` naming ``target`` unless every value is in ``[0, n_classes)`` or equal
    to ``ignore_index``. Called before anything is written.
``class_weights(weight, n_classes) -> array``
    float64 ``(C,)`` contiguous: ``weight`` converted, or ones when ``weight is None``.
``target_weight_sum(target, weights, ignore_index, *, unit_weights=False) -> denominator``
    ``sum_i w[target_i]`` over non-ignored samples: the "mean" denominator for index targets,
    as the backend's scalar (here a float; on the GPU a one-value float64 device array, so
    that nothing waits for the device). ``unit_weights`` (every weight is 1, as for
    ``weight=None``): the sum is the count of non-ignored samples, counted without reading the
    weights (the same value, exactly).
``count_denominator(n_samples) -> denominator``
    ``n_samples`` as the backend's scalar: the "mean" denominator for probability targets.
``sample_scale(grad_loss, denominator, n_samples) -> array``
    float64 gradient scale per sample, ``factor * grad_loss`` with ``factor`` 1 when
    ``denominator`` is None, else 1 / denominator (0 when it is 0: every target ignored):
    length 1 for a scalar ``grad_loss`` (``None`` means 1; on the GPU also a one-value device
    array), or length ``N * S`` (flattened) for an array ``grad_loss`` shaped like the samples
    ("none" reduction).
``per_sample(values, n_samples) -> array``
    An array shaped like the samples (``lse`` given to backward) as flat float64, length N * S.
``reduced_loss(values, denominator, dtype) -> array``
    A 0-d array of ``dtype``: the sum of a per-sample float64 array in a fixed order
    (deterministic), divided by ``denominator`` unless it is None (NaN when it is 0).
``sample_result(values, sample_shape, dtype) -> array``
    A per-sample float64 array reshaped to ``sample_shape`` and cast to ``dtype``.

Kernels (``options`` is ``fusedgrad._options.CrossEntropyOptions``; ``target`` is either the
int64 array from ``index_target`` or a probability array with the shape and dtype of
``logits``; ``weights`` is from ``class_weights``; ``grad_scale`` from ``sample_scale``):

``fused(logits, target, weights, grad, grad_scale, options) -> loss``
    Writes ``grad`` (shape and dtype of ``logits``; may be ``logits`` itself for inplace, or any
    strided array) with ``grad_scale * d(loss_i)/d(logits)`` per sample, zeros for ignored
    samples and wherever the scale is 0; returns the per-sample losses (float64, length N * S,
    0 for ignored samples). One trip over each row: logits are read once from memory.
``forward(logits, target, weights, options) -> (loss, lse)``
    Per-sample losses and log-sum-exp (float64, length N * S); writes nothing else.
``backward(logits, target, weights, lse, grad, grad_scale, options) -> None``
    Writes ``grad`` from the saved per-sample ``lse`` (float64, length N * S).

Math (per sample, logits z over C classes, derived in ``docs/derivations.md``, section 1(d),
and next to the kernels below): with q_c = (1 - s) y_c + s / C (y one-hot for index targets,
s = label_smoothing), class weights w, w_t the target-class weight (1 for probability
targets), lse = log sum_c exp(z_c), p_c = exp(z_c - lse):

    loss = sum_c w_c q_c (lse - z_c) + z_loss * w_t * lse^2
    dloss/dz_j = p_j * (sum_c w_c q_c + 2 z_loss w_t lse) - w_j q_j

With ``options.softcap`` = c every logit is read as z' = c tanh(z / c) inside the kernels' own
loops (no capped copy), the formulas above hold for z' (lse is that of z'), and the gradient,
with respect to the uncapped z, is multiplied element by element by 1 - tanh^2(z / c)
(section 1(e); the row primitives below say how each pass does it).

Kernels (chosen by ``_run``; each runs in one of the modes of ``fusedgrad._options``:
``MODE_FUSED``, ``MODE_FORWARD``, ``MODE_BACKWARD``):

* ``_rows_index_kernel`` / ``_rows_prob_kernel``: (N, C) logits, vectorised along the row.
  Online softmax over L1-sized blocks of BLOCK classes: block max, then exp(z - block max)
  written straight into the gradient buffer while summing, then one in-place scaling of the
  row (still in L1/L2). One exp per element, logits read from memory once. Compiled for
  512-bit vectors where the CPU has them (``_codegen``). One worker per thread takes a
  contiguous share of the rows. Rows of more than one block with a gradient of at least
  STREAM_MIN_BYTES (large vocabularies), on CPUs where non-temporal stores pay
  (``_stream.STREAMING_PAYS``), keep the exponentials in a staging row of the
  worker's instead, and each block, once scaled, goes to the gradient with non-temporal
  stores (``_stream``), so the gradient's lines are never read from memory before being
  written (see :func:`_streams_rows`).
* ``_tiles_index_kernel`` / ``_tiles_prob_kernel``: (N, C, S) views of k-D logits (no
  transposing copy), vectorised across TILE spatial positions, which are contiguous for a
  fixed (n, c): one sample per vector lane (``_index_lanes`` for class indices).
* ``_rows_small_kernel``: (N, C) with C <= SMALL_C (e.g. 65536 x 10), rows too short to
  vectorise along: blocks of rows are copied transposed into an L1 scratch and computed by
  the same ``_index_lanes``, one row per lane.

Determinism: every sample is computed by one thread in a fixed order of blocks, and the only
cross-sample reductions (``reduced_loss``, ``target_weight_sum``) run in a fixed order, so results
are bitwise identical for any number of threads.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from .._options import MODE_BACKWARD, MODE_FORWARD, MODE_FUSED, sample_count
from ._codegen import prefer_wide_vectors
from ._math import (FASTMATH_SOFTMAX, cast_like, divide, exp_of_shifted, fast_exp,
                    fast_tanh, fmax, log_f64, select)
from ._prefetch import prefetch_run
from ._reduce import chunked_sum, ordered_gather_sum, ordered_sum, worker_share
from . import _stream
from ._stream import STREAM_MIN_BYTES, store_fence, stream_copy

#: Elements of one row processed together: the block of logits and of the gradient it writes
#: (2 x 16 KiB in float64) stays in L1 between the max, exp and scale steps.
BLOCK = 2048
#: The (N, C, S) kernels deal samples to threads in chunks of about this many elements. The
#: chunking depends only on the shape, never on the thread count.
CHUNK_ELEMENTS = 1 << 15
#: The row kernels prefetch the logits (:func:`_prefetch_logits`) from this size on, beyond
#: the L2 caches; below it the prefetches only cost instructions (256 x 1000 float32:
#: 0.068-0.070 ms without, 0.075-0.076 ms with them).
PREFETCH_MIN_BYTES = 4 * 1024 * 1024
#: Rows with at most this many classes go to the small-C kernel (one row per vector lane).
SMALL_C = 32
#: Rows the small-C kernel computes at once, one per vector lane (its transposed scratch:
#: 2 x 32 x 256 x 4 bytes, 64 KiB, at most; 20 KiB for 10 float32 classes).
SMALL_LANES = 256
#: Most scratch-owning groups the small-C blocks are dealt to (bounds the scratch memory).
SMALL_GROUPS = 64
#: Spatial positions handled together (the vector lanes) by the (N, C, S) kernels.
TILE = 64


# --------------------------------------------------------------------------------------------
# Preparing the kernels' arrays
# --------------------------------------------------------------------------------------------
def index_target(target):
    return np.ascontiguousarray(target, dtype=np.int64).reshape(-1)


def check_index_target(target, n_classes, ignore_index) -> None:
    bad = _first_bad_index(target, n_classes, ignore_index)
    if bad >= 0:
        raise ValueError(
            f"target values must be class indices in [0, {n_classes}) or ignore_index="
            f"{ignore_index}; got {int(target[bad])} at flat position {bad}")


def class_weights(weight, n_classes):
    if weight is None:
        return np.ones(n_classes, dtype=np.float64)
    return np.ascontiguousarray(weight, dtype=np.float64)


def target_weight_sum(target, weights, ignore_index, *, unit_weights=False) -> float:
    if unit_weights:
        return float(_kept_count(target, ignore_index))
    return float(ordered_gather_sum(weights, target, ignore_index))


def count_denominator(n_samples) -> float:
    return float(n_samples)


def sample_scale(grad_loss, denominator, n_samples):
    # a zero denominator (the targets' summed weight) leaves "mean" undefined: NaN, which the
    # kernels carry into the rows they do not zero-fill as ignored (PyTorch's 0 / 0)
    factor = 1.0 if denominator is None else math.nan if denominator == 0.0 else 1.0 / denominator
    if grad_loss is None:
        return np.array([factor], dtype=np.float64)
    values = np.asarray(grad_loss, dtype=np.float64)
    if values.ndim == 0:
        return np.array([factor * float(values)], dtype=np.float64)
    return factor * values.reshape(n_samples)


def per_sample(values, n_samples):
    return np.ascontiguousarray(values, dtype=np.float64).reshape(n_samples)


def reduced_loss(values, denominator, dtype):
    total = chunked_sum(values)
    if denominator is not None:
        total = math.nan if denominator == 0.0 else total / denominator
    return np.array(total, dtype=dtype)


def sample_result(values, sample_shape, dtype):
    return values.reshape(sample_shape).astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------
# Kernels: public entry points
# --------------------------------------------------------------------------------------------
def fused(logits, target, weights, grad, grad_scale, options):
    loss = np.empty(sample_count(logits.shape), dtype=np.float64)
    lse = np.empty_like(loss)
    _run(MODE_FUSED, logits, target, weights, grad, grad_scale, lse, loss, options)
    return loss


def forward(logits, target, weights, options):
    loss = np.empty(sample_count(logits.shape), dtype=np.float64)
    lse = np.empty_like(loss)
    unit_scale = np.ones(1, dtype=np.float64)
    _run(MODE_FORWARD, logits, target, weights, None, unit_scale, lse, loss, options)
    return loss, lse


def backward(logits, target, weights, lse, grad, grad_scale, options):
    unused_loss = np.empty(0, dtype=np.float64)
    _run(MODE_BACKWARD, logits, target, weights, grad, grad_scale, lse, unused_loss, options)


def _shape3(shape) -> tuple:
    """(N, C, d1..dk) -> (N, C, S), S = d1 * ... * dk spelled out: NumPy cannot infer a -1
    axis of an empty array."""
    return (shape[0], shape[1], math.prod(shape[2:]))


def _spatial_view(a):
    """(N, C, d1..dk) -> (N, C, S) as a view, or None when the strides do not allow one."""
    try:
        return np.reshape(a, _shape3(a.shape), copy=False)
    except ValueError:
        return None


def _run(mode, logits, target, weights, grad, grad_scale, lse, loss, options):
    """Choose a row kernel (2-D logits: few classes, index or probability targets) or an
    (N, C, S) tile kernel (k-D logits).

    ``grad=None`` (forward) passes ``logits`` in its place: the kernels never write it in that
    mode, and one argument type less means one compiled specialisation less (read-only logits
    get a stand-in, :func:`_unwritten_stand_in`). When the strides
    of a k-D array cannot be merged into (N, C, S), the kernel works on a contiguous copy
    (and the gradient is copied back), the only case with an N x C temporary.
    """
    if target.dtype == np.int64 and logits.ndim == 2:
        if logits.shape[1] <= SMALL_C:
            _launch(_rows_small_kernel, mode, logits, target, weights, grad, grad_scale, lse,
                    loss, options)
        else:
            _launch_rows(_rows_index_kernel, mode, logits, target, weights, grad, grad_scale,
                         lse, loss, options)
        return
    if logits.ndim == 2:
        _launch_rows(_rows_prob_kernel, mode, logits, target, weights, grad, grad_scale, lse,
                     loss, options)
        return
    logits3 = _spatial_view(logits)
    if logits3 is None:
        logits3 = np.ascontiguousarray(logits).reshape(_shape3(logits.shape))
    grad3 = None if grad is None else _spatial_view(grad)
    copy_back = grad is not None and grad3 is None
    if copy_back:
        grad3 = np.empty(logits3.shape, dtype=logits3.dtype)
    if target.dtype == np.int64:
        _launch(_tiles_index_kernel, mode, logits3, target, weights, grad3, grad_scale, lse,
                loss, options)
    else:
        target3 = _spatial_view(target)
        if target3 is None:
            target3 = np.ascontiguousarray(target).reshape(logits3.shape)
        _launch(_tiles_prob_kernel, mode, logits3, target3, weights, grad3, grad_scale, lse,
                loss, options)
    if copy_back:
        np.copyto(grad, grad3.reshape(grad.shape))


def _launch(kernel, mode, logits, target, weights, grad, grad_scale, lse, loss, options,
            *row_arguments):
    """Call a kernel; inplace (``grad`` is the logits' memory) it reads the logits through
    ``grad``: with a single pointer LLVM needs no runtime overlap check, which would send the
    loops to their scalar fallback (slower, and rounding differently from the out= path)."""
    inplace = grad is not None and np.shares_memory(grad, logits)
    if grad is None:
        grad = logits if logits.flags.writeable else _unwritten_stand_in(logits)
    kernel(mode, logits, target, weights, grad, grad_scale, lse, loss, options.ignore_index,
           options.label_smoothing, options.z_loss, inplace, options.softcap, *row_arguments)


def _unwritten_stand_in(logits):
    """The gradient argument of a forward on read-only logits, which Numba types read-only
    and so refuses as an argument the kernel could write (even where the mode never does): a
    writeable array of the logits' shape and dtype over one value (every stride 0)."""
    return np.lib.stride_tricks.as_strided(np.empty(1, dtype=logits.dtype), shape=logits.shape,
                                           strides=(0,) * logits.ndim)


def _launch_rows(kernel, mode, logits, target, weights, grad, grad_scale, lse, loss, options):
    """:func:`_launch` for the (N, C) row kernels, which also take their number of workers (one
    per thread, read here: inside a kernel the call would keep Numba from caching it) and
    whether they stream (:func:`_streams_rows`)."""
    n_workers = max(1, min(numba.get_num_threads(), logits.shape[0]))
    _launch(kernel, mode, logits, target, weights, grad, grad_scale, lse, loss, options,
            n_workers, mode == MODE_FUSED and _streams_rows(grad))


def _streams_rows(grad) -> bool:
    """Whether the fused row kernels write ``grad`` with non-temporal stores: on a CPU where they
    pay (``_stream.STREAMING_PAYS``), rows of more than one BLOCK, contiguous, of at least
    STREAM_MIN_BYTES in all. Through the API on the Xeon of
    docs/performance.md (2026-12-05, two threads, float32, each version alternately): 4096 x
    32000 53.8 -> 47.7-49.2 ms, 1024 x 128256 52.8 -> 45.6-47.3 ms. Rows of one block are
    not streamed: streamed through a staging row, 8192 x 1000 (whose logits and gradient can
    stay in the L3 cache from call to call) took 2.9-3.4 ms against 2.1-2.5. Nor is a whole
    row streamed after its scaling: at 4096 x 32000 that gained nothing (51.6 against 50.9
    ms), each block's second read then coming from L2 instead of L1. The backward mode (one
    trip: read the logits, write the gradient) keeps ordinary stores: streamed block by block
    through the staging row, 4096 x 32000 took 40.9-41.4 ms either way.
    """
    return (_stream.STREAMING_PAYS and grad.shape[1] > BLOCK
            and grad.strides[1] == grad.itemsize and grad.nbytes >= STREAM_MIN_BYTES)


# --------------------------------------------------------------------------------------------
# Small jitted helpers
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _first_bad_index(target, n_classes, ignore_index):
    """First flat position of a target outside ``[0, C)`` and not ignored, or -1.

    A branch-free scan first (it vectorises; an early exit would not), then the search for
    the position only when the scan found one.

    target: (N*S,) int64.
    """
    bad = 0
    for i in range(target.shape[0]):
        t = target[i]
        bad |= ((t < 0) | (t >= n_classes)) & (t != ignore_index)
    if not bad:
        return -1
    for i in range(target.shape[0]):
        t = target[i]
        if (t < 0 or t >= n_classes) and t != ignore_index:
            return i
    return -1


@njit(cache=True)
def _kept_count(target, ignore_index):
    """Number of targets not equal to ``ignore_index`` (an integer count: it vectorises, where
    the float64 gather of :func:`ordered_gather_sum` cannot)."""
    kept = 0
    for i in range(target.shape[0]):
        kept += target[i] != ignore_index
    return kept


# Row primitives without a leading underscore are shared with the vocabulary-parallel kernels
# of ``fusedgrad.distributed``, which apply the same math to a slice of the classes.
#
# Logit soft-capping (``softcap``: None, or c > 0). Every primitive that reads logits takes
# ``softcap`` and, given a c, reads each logit z_j as z'_j = c t_j, t_j = tanh(z_j / c), inside
# its own loop (the vectorised ``fast_tanh``: no capped copy of the logits is ever made). The
# loss formulas then hold for z' unchanged, and the gradient with respect to the uncapped z
# follows by the chain rule (``docs/derivations.md``, section 1(e)):
#
#     dloss/dz_j = dloss/dz'_j * dz'_j/dz_j,     dz'_j/dz_j = 1 - t_j^2  ("the slope")
#
# ``softcap=None`` is a different Numba type from a float, so every ``softcap is None`` test
# below is settled when the kernel is compiled: the uncapped kernels run the arithmetic they ran
# before soft-capping existed (the slope is the constant 1, and multiplying by it is folded
# away), bit for bit.
@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def max_of(z):
    """max_j z_j (NaN if any z_j is NaN); vectorised through ``fmax``."""
    m = z[0]
    for j in range(z.shape[0]):
        m = fmax(m, z[j])
    return m


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def tanh_over_cap(value, softcap):
    """t = tanh(z / c) of one logit ``value``, in its dtype (``softcap`` = c, a float).

    ``divide`` (not ``/``) keeps the loop-invariant 1 / c free of a zero test, so LLVM hoists
    it out of the loops and still vectorises them.
    """
    return fast_tanh(value * cast_like(divide(1.0, softcap), value))


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def soft_cap(value, softcap):
    """z' = c tanh(z / c) of one logit, in its dtype; ``value`` itself when softcap is None.

    tanh is increasing, so the cap of a row's maximum is the maximum of the capped row: the
    shift of a row's exponentials costs one tanh per row (or block), not one per element.
    """
    if softcap is None:
        return value
    return cast_like(softcap, value) * tanh_over_cap(value, softcap)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def soft_cap_and_slope(value, softcap):
    """(z', dz'/dz) of one logit as float64: (z, 1) when softcap is None, else (c t, 1 - t^2),
    t = tanh(z / c), rounded as the row loops round them (the target class's terms)."""
    if softcap is None:
        return np.float64(value), 1.0
    t = tanh_over_cap(value, softcap)
    return np.float64(cast_like(softcap, t) * t), np.float64(cast_like(1.0, t) - t * t)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def exp_and_stored(z_j, shift, softcap):
    """(exp(z'_j - shift), the value the exp pass stores in the gradient buffer).

    Without a cap the buffer keeps the exponential itself, and the gradient pass only scales
    it. With a cap it keeps t_j = tanh(z_j / c): the gradient pass needs t_j for the slope
    1 - t_j^2 and recomputes the exponential from it (the logits themselves may be gone,
    overwritten in place), so each element costs one tanh and two exps in all.
    """
    if softcap is None:
        e = exp_of_shifted(z_j - shift)
        return e, e
    t = tanh_over_cap(z_j, softcap)
    return exp_of_shifted(cast_like(softcap, t) * t - shift), t


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def stored_exp_and_slope(stored, shift, softcap):
    """(exp(z'_j - shift), slope) from what :func:`exp_and_stored` stored (same ``shift``):
    (the stored exponential, 1) without a cap, (exp(c t_j - shift), 1 - t_j^2) with one."""
    if softcap is None:
        return stored, cast_like(1.0, stored)
    return (exp_of_shifted(cast_like(softcap, stored) * stored - shift),
            cast_like(1.0, stored) - stored * stored)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def exp_and_slope(z_j, shift, softcap):
    """(exp(z'_j - shift), slope) of one logit, for the gradient from a saved lse. The full
    ``fast_exp``: the lse is the caller's, and nothing bounds z' - lse above when it is not
    the one the forward returned."""
    if softcap is None:
        return fast_exp(z_j - shift), cast_like(1.0, z_j)
    t = tanh_over_cap(z_j, softcap)
    return fast_exp(cast_like(softcap, t) * t - shift), cast_like(1.0, t) - t * t


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def sum_exp_shifted(z, g, shift, store, inplace, softcap, z_next):
    """(sum_j exp(z'_j - shift), max_j z_next_j): the sum accumulated in the dtype of z over
    one block (z' = z, or the capped logits with a ``softcap``).

    With ``store`` the exponentials (t_j with a cap, see :func:`exp_and_stored`) are also
    written to ``g`` (the gradient buffer, later scaled in place), so each element costs
    exactly one exp (one tanh and one exp capped) in this pass. ``inplace`` means ``g`` is the
    memory of ``z``: the loop then reads and writes through ``g`` alone, because with two
    overlapping pointers LLVM's runtime overlap check would select the scalar loop.

    ``z_next``: None (then the maximum returned is 0, unused), or the next row, as long as
    ``z``, whose maximum the same loop takes (see :func:`_row_exp_blocks`).
    """
    total = cast_like(0.0, z)
    following = cast_like(-np.inf if z_next is not None else 0.0, z)
    if not store:
        for j in range(z.shape[0]):
            total += exp_of_shifted(soft_cap(z[j], softcap) - shift)
            if z_next is not None:
                following = fmax(following, z_next[j])
    elif inplace:
        for j in range(g.shape[0]):
            e, stored = exp_and_stored(g[j], shift, softcap)
            g[j] = stored
            total += e
            if z_next is not None:
                following = fmax(following, z_next[j])
    else:
        for j in range(z.shape[0]):
            e, stored = exp_and_stored(z[j], shift, softcap)
            g[j] = stored
            total += e
            if z_next is not None:
                following = fmax(following, z_next[j])
    return total, following


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def weighted_sum(z, w, softcap):
    """sum_j w_j z'_j in float64 (the label-smoothing term of the loss). With a cap this costs
    one more tanh per element: the sum is taken before an inplace pass overwrites the logits."""
    total = 0.0
    for j in range(z.shape[0]):
        total += w[j] * soft_cap(z[j], softcap)
    return total


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def fill_zero(g):
    zero = cast_like(0.0, g)
    for j in range(g.shape[0]):
        g[j] = zero


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _scale_minus_weighted(g, shift, factor, smooth, w, softcap):
    """g_j = (factor * e_j - smooth * w_j) * slope_j from what the exp pass stored in g
    (shifted by ``shift``; see :func:`stored_exp_and_slope`); smooth = 0 skips the weights."""
    f = cast_like(factor, g)
    sh = cast_like(shift, g)
    if smooth == 0.0:
        for j in range(g.shape[0]):
            e, slope = stored_exp_and_slope(g[j], sh, softcap)
            g[j] = e * f * slope
    else:
        sm = cast_like(smooth, g)
        for j in range(g.shape[0]):
            e, slope = stored_exp_and_slope(g[j], sh, softcap)
            g[j] = (e * f - sm * cast_like(w[j], g)) * slope


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def exp_scale_minus_weighted(z, g, shift, factor, smooth, w, inplace, softcap):
    """g_j = (factor * exp(z'_j - shift) - smooth * w_j) * slope_j: the gradient from a saved
    lse (slope 1 without a cap; ``inplace``: z is g's memory, read through g as in
    :func:`sum_exp_shifted`)."""
    if inplace:
        _exp_scale_minus_weighted_loop(g, g, shift, factor, smooth, w, softcap)
    else:
        _exp_scale_minus_weighted_loop(z, g, shift, factor, smooth, w, softcap)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def lse_rounding_factor(lse, rounded):
    """exp(rounded - lse), in float64: what turns exp(z' - rounded), the exponentials a loop in
    the logits' dtype forms against the saved float64 lse rounded to that dtype, into
    exp(z' - lse). Without it the rounding of lse (up to half an ulp: 0.0005 at lse = 1e4 in
    float32) would become a relative error of every gradient element; with it what remains is
    the rounding of z' - rounded, exact where z' is within a factor 2 of lse (Sterbenz), i.e.
    for every p_j that is not negligible. Exactly 1 for float64 logits.

    exp(d) for the tiny d = rounded - lse as its Taylor series to d^4 (error under d^5 / 120:
    1e-17 for |lse| < 2^14 in float32, 8e-9 up to 2^20, where float32 logits have lost more
    than that already), plain arithmetic that vectorises in the lane loops."""
    d = np.float64(rounded) - lse
    return 1.0 + d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0))))


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _exp_scale_minus_weighted_loop(z, g, shift, factor, smooth, w, softcap):
    sh = cast_like(shift, z)
    f = cast_like(factor * lse_rounding_factor(shift, sh), g)
    if smooth == 0.0:
        for j in range(z.shape[0]):
            e, slope = exp_and_slope(z[j], sh, softcap)
            g[j] = e * f * slope
    else:
        sm = cast_like(smooth, g)
        for j in range(z.shape[0]):
            e, slope = exp_and_slope(z[j], sh, softcap)
            g[j] = (e * f - sm * cast_like(w[j], g)) * slope


@njit(inline="always")
def _index_loss(lse, z_t, w_t, weighted, weight_total, smoothing, z_loss, n_classes):
    """Loss of one sample with class-index target t (q = (1 - s) onehot(t) + s / C):

        sum_c w_c q_c (lse - z_c) + z_loss w_t lse^2
          = (1 - s) w_t (lse - z_t) + (s / C)(lse W - sum_c w_c z_c) + z_loss w_t lse^2

    with W = ``weight_total`` = sum_c w_c and ``weighted`` = sum_c w_c z_c.
    """
    return ((1.0 - smoothing) * w_t * (lse - z_t)
            + smoothing / n_classes * (lse * weight_total - weighted)
            + z_loss * w_t * lse * lse)


@njit(inline="always")
def index_coefficient(lse, w_t, weight_total, smoothing, z_loss, n_classes):
    """The factor of p_j in dloss/dz_j for a class-index target:

        d/dz_j [lse sum_c w_c q_c + z_loss w_t lse^2] = p_j (sum_c w_c q_c + 2 z_loss w_t lse),
        sum_c w_c q_c = (1 - s) w_t + (s / C) W.

    The rest of the gradient, -w_j q_j, is -(s / C) w_j - (1 - s) w_t [j == t].
    """
    return ((1.0 - smoothing) * w_t + smoothing / n_classes * weight_total
            + 2.0 * z_loss * w_t * lse)


@njit(inline="always")
def _prob_loss(lse, wy, wyz, wz, weight_total, smoothing, z_loss, n_classes):
    """Loss of one sample with target probabilities y (q = (1 - s) y + s / C):

        sum_c w_c q_c (lse - z_c) + z_loss lse^2
          = (1 - s)(lse Y - sum_c w_c y_c z_c) + (s / C)(lse W - sum_c w_c z_c) + z_loss lse^2

    with ``wy`` = Y = sum_c w_c y_c, ``wyz`` = sum_c w_c y_c z_c (terms with y_c = 0 left out,
    so a -inf logit of probability 0 adds 0, not 0 * inf) and ``wz`` = sum_c w_c z_c (only
    read when s > 0).
    """
    smooth_term = lse * weight_total - wz if smoothing > 0.0 else 0.0
    return ((1.0 - smoothing) * (lse * wy - wyz) + smoothing / n_classes * smooth_term
            + z_loss * lse * lse)


@njit(inline="always")
def _prob_coefficient(lse, wy, weight_total, smoothing, z_loss, n_classes):
    """Factor of p_j in dloss/dz_j for probability targets: sum_c w_c q_c + 2 z_loss lse,
    sum_c w_c q_c = (1 - s) Y + (s / C) W. The rest of the gradient is -w_j q_j."""
    return ((1.0 - smoothing) * wy + smoothing / n_classes * weight_total
            + 2.0 * z_loss * lse)


# --------------------------------------------------------------------------------------------
# Row kernel: (N, C) logits, class-index targets; vectorised along the row
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _row_layout(c, n_workers, grad, stream):
    """Blocks per row and each worker's scratch: block shifts and sums (float64,
    n_workers x n_blocks), when streaming a staging row of grad's dtype (n_workers x C;
    n_workers x 0 otherwise), and a spare row of zeros (n_workers x C for a one-block row, x 0
    otherwise: see :func:`_enter_row`)."""
    n_blocks = (c + BLOCK - 1) // BLOCK
    block_shift = np.empty((n_workers, n_blocks), dtype=np.float64)
    block_sum = np.empty((n_workers, n_blocks), dtype=np.float64)
    staging = np.empty((n_workers, c if stream else 0), dtype=grad.dtype)
    spare = np.zeros((n_workers, c if n_blocks == 1 else 0), dtype=grad.dtype)
    return n_blocks, block_shift, block_sum, staging, spare


@njit(inline="always")
def _block_bounds(b, c):
    lo = b * BLOCK
    return lo, min(c, lo + BLOCK)


@njit(inline="always")
def _prefetch_logits(z, lo, hi):
    """Ask for z[lo:hi] of a row (its next block, or the next row's first) before its max pass
    reads it. Rows lie one after another, but the hardware prefetchers start over at each
    4 KiB page, and a row of 1000 float32 logits is one page. Measured on 8192 x 1000 float32
    (2026-12-05, two threads, a bare loop of the row kernel's three passes): 2.16-2.27 ms
    without, 1.96-2.09 ms with the next row asked for (two rows ahead: 2.09; four: no gain;
    asking for the next row's gradient lines for writing too: slower, 2.42)."""
    if hi > lo and z.strides[0] == z.itemsize:
        prefetch_run(z, lo, hi - lo)


@njit(inline="always")
def _enter_row(logits, i, end, prefetch, spare):
    """Row i of a worker's share (which ends before row ``end``) and the row whose maximum row
    i's exp pass takes: the next row, whose first block is asked for with ``prefetch``, or, for
    the share's last row, ``spare``, a row of zeros nobody writes (that maximum is then unused).

    Not row i itself: in place, the exp pass writes row i, and LLVM's runtime overlap check
    between the row written and the row whose maximum is taken then selects the scalar loop,
    whose sum rounds differently. Where the shares end depends on the thread count, so those
    rows differed by an ulp between one and two threads (seen 2026-12-05: one of 16 rows of
    16 x 300 float64 logits, fused in place, as linear + cross-entropy runs it)."""
    if i + 1 < end:
        if prefetch:
            _prefetch_logits(logits[i + 1], 0, min(logits.shape[1], BLOCK))
        return logits[i], logits[i + 1]
    return logits[i], spare


@njit(inline="always")
def _block_factor(factor, block_shift, block_sum, top, total):
    """factor * exp(m_b - M) / S: what turns block b's stored exponentials into factor * p_j
    (0 for a block of -inf logits, whose sum is 0). A row of nothing but -inf (S = 0) has no
    softmax: NaN, as exp(z - lse) gives in the backward and PyTorch gives."""
    if block_sum == 0.0:
        return 0.0 if total > 0.0 else math.nan
    return factor * _block_rescale(block_shift, top) / total


@njit(inline="always")
def _block_rescale(block_shift, top):
    """exp(m_b - M), which brings a block's sum of exponentials (shifted by its own maximum
    m_b) to the row's shift M: exactly 1, without a libm call, for the block that holds the
    row's maximum, which is the only block of a row of up to BLOCK classes."""
    if block_shift == top:
        return 1.0
    return math.exp(block_shift - top)


@njit(inline="always")
def _shift_of(block_max, z):
    """The shift of a block's exponentials: its maximum, or 0 for a block of -inf logits."""
    return block_max if block_max > -np.inf else cast_like(0.0, z)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _row_exp_blocks(z, g, store, inplace, w, with_weighted, block_shift, block_sum, softcap,
                    prefetch, known_max, z_next):
    """One trip over a row in L1-sized blocks; returns (M, S, sum_j w_j z'_j, the next row's
    maximum or NaN). With ``prefetch`` each block asks for the next one first
    (:func:`_prefetch_logits`).

    Online softmax at block granularity: block b has maximum m_b and partial sum
    s_b = sum_{j in b} exp(z'_j - m_b) (the exponentials, or t_j with a cap, go to ``g`` when
    ``store``). The row maximum is M = max_b m_b and the row sum S = sum_b s_b exp(m_b - M), so
    lse = M + log S and the softmax is p_j = exp(z'_j - m_b) * exp(m_b - M) / S: the logits are
    read from memory once, the second read of each block (for the exp) hits L1.
    Blocks made only of -inf have s_b = 0 and are skipped (shift 0 avoids -inf - -inf). With a
    cap (z' = c tanh(z / c)) m_b is the cap of the block's maximum, and no z' is -inf.

    A row of one block skips its max pass when the previous row's exp pass took its maximum
    (``known_max``, NaN when unknown: a NaN maximum is then merely taken again), and takes the
    maximum of ``z_next`` (the next row, or a spare row for a worker's last, see
    :func:`_enter_row`) in its own exp pass: the exps keep the vector units busy while the next
    row's logits arrive, where a max pass of their own waits on memory. Measured on
    8192 x 1000 float32 (2026-12-05, two threads, a bare loop of the three passes): 1.79-1.80
    ms with a max pass per row, 1.49-1.56 ms with the max taken one row ahead. The maximum is
    the same whichever loop takes it.
    """
    c = z.shape[0]
    if c <= BLOCK:
        m = known_max if known_max == known_max else max_of(z)
        shift = _shift_of(soft_cap(m, softcap), z)
        weighted = weighted_sum(z, w, softcap) if with_weighted else 0.0
        block_sum[0], following = sum_exp_shifted(z, g, shift, store, inplace, softcap, z_next)
        block_shift[0] = shift
        return np.float64(shift), np.float64(block_sum[0]), weighted, following
    n_blocks = (c + BLOCK - 1) // BLOCK
    row_max = -np.inf
    weighted = 0.0
    for b in range(n_blocks):
        lo, hi = _block_bounds(b, c)
        if prefetch and b + 1 < n_blocks:
            _prefetch_logits(z, hi, min(c, hi + BLOCK))
        zb = z[lo:hi]
        m = soft_cap(max_of(zb), softcap)
        shift = _shift_of(m, z)
        if with_weighted:
            weighted += weighted_sum(zb, w[lo:hi], softcap)
        block_sum[b], unused = sum_exp_shifted(zb, g[lo:hi], shift, store, inplace, softcap,
                                               None)
        block_shift[b] = shift
        row_max = fmax(row_max, np.float64(m))
    top = row_max if row_max > -np.inf else 0.0
    total = 0.0
    for b in range(n_blocks):
        if block_sum[b] != 0.0:
            total += block_sum[b] * _block_rescale(block_shift[b], top)
    return top, total, weighted, cast_like(np.nan, z)


@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _rows_index_kernel(mode, logits, target, weights, grad, grad_scale, lse_out, loss_out,
                       ignore_index, smoothing, z_loss, inplace, softcap, n_workers, stream):
    """Softmax cross-entropy of (N, C) logits against class indices, one row per sample.

    For a row with target t (one-hot y), smoothing s and q_c = (1 - s) y_c + s / C:

        sum_c w_c q_c = (1 - s) w_t + (s / C) W,                 W = sum_c w_c
        loss = (1 - s) w_t (lse - z_t) + (s / C)(lse W - sum_c w_c z_c) + z_loss w_t lse^2

    and differentiating (d lse / d z_j = p_j):

        dloss/dz_j = p_j [(1 - s) w_t + (s / C) W + 2 z_loss w_t lse] - (s / C) w_j
                     - (1 - s) w_t [j == t]

    The gradient written is ``grad_scale * dloss/dz``: in the fused mode p_j is built from the
    exponentials stored during the exp pass (scaled in place, block still in L1/L2), in the
    backward mode from the saved lse with one exp per element.

    With ``softcap`` = c, z' = c tanh(z / c) replaces z in all of the above (lse is that of z'),
    and each gradient element is multiplied by its slope 1 - t_j^2, t_j = tanh(z_j / c): the
    exp pass stores t_j in the gradient buffer and the scaling pass rebuilds p_j from it.

    logits: (N, C) float32 / float64, any strides;
    target: (N,) int64 class indices or ``ignore_index``;
    weights: (C,) float64;
    grad: (N, C), the dtype of logits, any strides; written unless ``MODE_FORWARD`` (then the
    logits stand in for it, unwritten); may be the logits' memory (``inplace``);
    grad_scale: (1,) or (N,) float64, the gradient's factor per sample;
    lse_out: (N,) float64, written (read in ``MODE_BACKWARD``);
    loss_out: (N,) float64, written (a (0,) stand-in in ``MODE_BACKWARD``);
    softcap: None, or the cap c > 0 (float);
    n_workers: the parallel workers, each taking a contiguous share of the rows;
    stream: (fused mode only) the exponentials go to a staging row, and each block of the
    gradient, once scaled, to ``grad`` with non-temporal stores (``grad`` contiguous rows).
    """
    n, c = logits.shape
    weight_total = ordered_sum(weights)
    smooth_per_class = smoothing / c
    n_blocks, block_shift, block_sum, staging, spare = _row_layout(c, n_workers, grad,
                                                                  stream)
    per_sample_scale = grad_scale.shape[0] > 1
    prefetch = logits.size * logits.itemsize >= PREFETCH_MIN_BYTES
    for worker in prange(n_workers):
        prefer_wide_vectors()
        shifts = block_shift[worker]
        sums = block_sum[worker]
        first, end = worker_share(worker, n_workers, n)
        # the maximum of row i, when row i - 1's exp pass took it (NaN: not known)
        next_max = cast_like(np.nan, logits)
        for i in range(first, end):
            z, z_next = _enter_row(logits, i, end, prefetch, spare[worker])
            known_max = next_max
            next_max = cast_like(np.nan, logits)
            g = grad[i]
            # where the exp pass stores: the worker's staging row when streaming
            stored = staging[worker] if stream else g
            t = target[i]
            ignored = t == ignore_index
            scale = grad_scale[i] if per_sample_scale else grad_scale[0]
            # 1. an ignored row's gradient is zero: only zero-filled (not a row scaled by 0,
            #    whose NaN or inf logits give NaN, 0 * NaN, as in PyTorch)
            if mode != MODE_FORWARD and ignored:
                fill_zero(g)
                if mode == MODE_FUSED:
                    loss_out[i] = 0.0
                continue
            w_t = 0.0 if ignored else weights[t]
            # the target logit z'_t and its slope, read before g overwrites z (an ignored row
            # has no target term; its slope is 1 like every uncapped one, a constant then)
            z_t, slope_t = (0.0, 1.0) if ignored else soft_cap_and_slope(z[t], softcap)
            # 2. lse: the saved one, or one trip over the row in blocks (the exponentials go
            #    to ``stored`` in the fused mode). ``top`` and ``total`` are set on every path:
            #    a variable the prange body defines on one branch only is live into the loop
            #    for Numba's parfor pass, and reading it (step 4) then took the value passed
            #    into the loop instead of this row's in some compile orders (2026-12-06)
            top = 0.0
            total = 0.0
            if mode == MODE_BACKWARD:
                lse = lse_out[i]
            else:
                top, total, weighted, next_max = _row_exp_blocks(
                    z, stored, mode == MODE_FUSED, inplace and not stream, weights,
                    smoothing > 0.0, shifts, sums, softcap, prefetch, known_max, z_next)
                lse = top + math.log(total)
                lse_out[i] = lse
                # 3. the loss (0 for an ignored row)
                if ignored:
                    loss_out[i] = 0.0
                    continue
                loss_out[i] = _index_loss(lse, z_t, w_t, weighted, weight_total, smoothing,
                                          z_loss, c)
                if mode == MODE_FORWARD:
                    continue
            # 4. the gradient: p_j times the row's coefficient minus the smoothing term, from
            #    the stored exponentials (fused) or exp(z' - lse) (backward), times the slope,
            #    then the target-class term (times its slope)
            coef = scale * index_coefficient(lse, w_t, weight_total, smoothing, z_loss, c)
            target_term = cast_like(scale * (1.0 - smoothing) * w_t * slope_t, g)
            if mode == MODE_FUSED:
                for b in range(n_blocks):
                    lo, hi = _block_bounds(b, c)
                    _scale_minus_weighted(
                        stored[lo:hi], shifts[b],
                        _block_factor(coef, shifts[b], sums[b], top, total),
                        scale * smooth_per_class, weights[lo:hi], softcap)
                    if lo <= t < hi:
                        stored[t] -= target_term
                    if stream:
                        stream_copy(g, lo, stored[lo:hi], hi - lo)
            else:
                exp_scale_minus_weighted(z, g, lse, coef, scale * smooth_per_class, weights,
                                         inplace, softcap)
                g[t] -= target_term
        if stream:
            store_fence()


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _row_target_sums(z, y, w, with_logits, softcap):
    """(Y, sum_c w_c y_c z'_c, sum_c w_c z'_c) for one row of probability targets, in float64;
    the sums over z' only ``with_logits`` (forward and fused), skipping y_c = 0 terms."""
    wy = 0.0
    wyz = 0.0
    wz = 0.0
    if with_logits and softcap is None:
        # the loop as it was before soft-capping: reading z_j once above the select, as the
        # capped loop does, changes how LLVM vectorises it, and so the rounding of the sums
        for j in range(z.shape[0]):
            wyj = w[j] * y[j]
            wy += wyj
            # y_j = 0 skips a masked class (z_j = -inf); a class weighted 0 with y_j > 0 and
            # z_j = -inf gives 0 * -inf = NaN, as in PyTorch
            wyz += wyj * z[j] if y[j] != 0.0 else 0.0
            wz += w[j] * z[j]
    elif with_logits:
        # z'_j (a tanh) once, for both sums
        for j in range(z.shape[0]):
            zj = soft_cap(z[j], softcap)
            wyj = w[j] * y[j]
            wy += wyj
            wyz += wyj * zj if y[j] != 0.0 else 0.0
            wz += w[j] * zj
    else:
        for j in range(y.shape[0]):
            wy += w[j] * y[j]
    return wy, wyz, wz


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _scale_minus_target(g, shift, factor, y, w, keep, smooth_per_class, scale, softcap):
    """g_j = (factor * e_j - scale * w_j ((1 - s) y_j + s / C)) * slope_j, with keep = 1 - s,
    from what the exp pass stored in g (shifted by ``shift``; see
    :func:`stored_exp_and_slope`)."""
    f = cast_like(factor, g)
    sh = cast_like(shift, g)
    a = cast_like(scale * keep, g)
    b = cast_like(scale * smooth_per_class, g)
    for j in range(g.shape[0]):
        e, slope = stored_exp_and_slope(g[j], sh, softcap)
        g[j] = (e * f - cast_like(w[j], g) * (a * y[j] + b)) * slope


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _exp_scale_minus_target(z, g, lse, coef, y, w, keep, smooth_per_class, scale, inplace,
                            softcap):
    """g_j = (coef * p_j - scale * w_j q_j) * slope_j from the saved lse, p_j = exp(z'_j - lse).

    Without a cap, two passes: the exponentials times ``coef``, then the target term (as
    :func:`_scale_minus_target` with factor 1). With a cap the slope multiplies both terms, so
    one pass computes t_j, p_j and the slope together (``inplace``: reading through g).
    """
    if softcap is None:
        exp_scale_minus_weighted(z, g, lse, coef, 0.0, w, inplace, softcap)
        _scale_minus_target(g, 0.0, 1.0, y, w, keep, smooth_per_class, scale, softcap)
    elif inplace:
        _exp_scale_minus_target_loop(g, g, lse, coef, y, w, keep, smooth_per_class, scale,
                                     softcap)
    else:
        _exp_scale_minus_target_loop(z, g, lse, coef, y, w, keep, smooth_per_class, scale,
                                     softcap)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _exp_scale_minus_target_loop(z, g, lse, coef, y, w, keep, smooth_per_class, scale,
                                 softcap):
    sh = cast_like(lse, z)
    f = cast_like(coef * lse_rounding_factor(lse, sh), g)
    a = cast_like(scale * keep, g)
    b = cast_like(scale * smooth_per_class, g)
    for j in range(z.shape[0]):
        e, slope = exp_and_slope(z[j], sh, softcap)
        g[j] = (e * f - cast_like(w[j], g) * (a * y[j] + b)) * slope


@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _rows_prob_kernel(mode, logits, target, weights, grad, grad_scale, lse_out, loss_out,
                      ignore_index, smoothing, z_loss, inplace, softcap, n_workers, stream):
    """Probability targets y (N, C) with the row machinery of :func:`_rows_index_kernel`:
    loss and gradient per :func:`_prob_loss` / :func:`_prob_coefficient`,
    dloss/dz_j = p_j (sum_c w_c q_c + 2 z_loss lse) - w_j q_j (of z', times the slope
    1 - t_j^2, with a ``softcap``). The target sums are taken in a first trip over the row
    (before an inplace exp overwrites the logits); the exp trip and the scaling then find the
    row in cache. ``ignore_index`` is unused; ``n_workers`` and ``stream`` as there.

    logits: (N, C) float32 / float64, any strides;
    target: (N, C) probabilities, the dtype of logits;
    weights: (C,) float64;
    grad: (N, C), the dtype of logits, any strides; written unless ``MODE_FORWARD`` (then the
    logits stand in for it, unwritten); may be the logits' memory (``inplace``);
    grad_scale: (1,) or (N,) float64, the gradient's factor per sample;
    lse_out: (N,) float64, written (read in ``MODE_BACKWARD``);
    loss_out: (N,) float64, written (a (0,) stand-in in ``MODE_BACKWARD``);
    softcap: None, or the cap c > 0 (float).
    """
    n, c = logits.shape
    weight_total = ordered_sum(weights)
    smooth_per_class = smoothing / c
    n_blocks, block_shift, block_sum, staging, spare = _row_layout(c, n_workers, grad,
                                                                  stream)
    per_sample_scale = grad_scale.shape[0] > 1
    prefetch = logits.size * logits.itemsize >= PREFETCH_MIN_BYTES
    for worker in prange(n_workers):
        prefer_wide_vectors()
        shifts = block_shift[worker]
        sums = block_sum[worker]
        first, end = worker_share(worker, n_workers, n)
        next_max = cast_like(np.nan, logits)
        for i in range(first, end):
            z, z_next = _enter_row(logits, i, end, prefetch, spare[worker])
            known_max = next_max
            next_max = cast_like(np.nan, logits)
            y = target[i]
            g = grad[i]
            stored = staging[worker] if stream else g
            scale = grad_scale[i] if per_sample_scale else grad_scale[0]
            # 1. the target sums Y, sum w y z', sum w z': a first trip over the row, before an
            #    inplace exp overwrites the logits (Y alone in the backward mode)
            wy, wyz, wz = _row_target_sums(z, y, weights, mode != MODE_BACKWARD, softcap)
            # 2. lse: the saved one, or the exp trip over the row in blocks (the exponentials
            #    go to ``stored`` in the fused mode; ``top`` and ``total`` set on every path,
            #    as in _rows_index_kernel)
            top = 0.0
            total = 0.0
            if mode == MODE_BACKWARD:
                lse = lse_out[i]
            else:
                top, total, unused, next_max = _row_exp_blocks(
                    z, stored, mode == MODE_FUSED, inplace and not stream, weights, False,
                    shifts, sums, softcap, prefetch, known_max, z_next)
                lse = top + math.log(total)
                lse_out[i] = lse
                # 3. the loss
                loss_out[i] = _prob_loss(lse, wy, wyz, wz, weight_total, smoothing, z_loss, c)
                if mode == MODE_FORWARD:
                    continue
            # 4. the gradient, p_j times the row's coefficient minus w_j q_j, times the slope:
            #    block by block from the stored exponentials (fused), or from exp(z' - lse)
            #    (backward)
            coef = scale * _prob_coefficient(lse, wy, weight_total, smoothing, z_loss, c)
            if mode == MODE_FUSED:
                for b in range(n_blocks):
                    lo, hi = _block_bounds(b, c)
                    _scale_minus_target(stored[lo:hi], shifts[b],
                                        _block_factor(coef, shifts[b], sums[b], top, total),
                                        y[lo:hi], weights[lo:hi], 1.0 - smoothing,
                                        smooth_per_class, scale, softcap)
                    if stream:
                        stream_copy(g, lo, stored[lo:hi], hi - lo)
            else:
                _exp_scale_minus_target(z, g, lse, coef, y, weights, 1.0 - smoothing,
                                        smooth_per_class, scale, inplace, softcap)
        if stream:
            store_fence()


# --------------------------------------------------------------------------------------------
# Small-C kernel: contiguous (N, C) logits with few classes; vectorised across rows
# --------------------------------------------------------------------------------------------
@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _rows_small_kernel(mode, logits, target, weights, grad, grad_scale, lse_out, loss_out,
                       ignore_index, smoothing, z_loss, inplace, softcap):
    """Class-index targets, (N, C) logits with C <= SMALL_C.

    Same math as :func:`_rows_index_kernel`, but a row of 10 classes is too short to
    vectorise along, so SMALL_LANES rows at a time are copied transposed into a (C, lanes)
    scratch and computed across the rows by :func:`_index_lanes` (the (N, C, S) kernels' code,
    one sample per lane), and their gradient is copied back. The scratch stays in L1 (C <=
    SMALL_C), each row's arithmetic is the same whatever block it falls in, so the results do
    not depend on the blocking or the thread count; an inplace call reads every logit of a
    block before writing any of its gradient.

    logits: (N, C) float32 / float64, any strides;
    target: (N,) int64 class indices or ``ignore_index``;
    weights: (C,) float64;
    grad: (N, C), the dtype of logits, any strides; written unless ``MODE_FORWARD`` (then the
    logits stand in for it, unwritten); may be the logits' memory (``inplace``);
    grad_scale: (1,) or (N,) float64, the gradient's factor per sample;
    lse_out: (N,) float64, written (read in ``MODE_BACKWARD``);
    loss_out: (N,) float64, written (a (0,) stand-in in ``MODE_BACKWARD``);
    softcap: None, or the cap c > 0 (float).
    """
    n, c = logits.shape
    weight_total = ordered_sum(weights)
    n_blocks = (n + SMALL_LANES - 1) // SMALL_LANES
    n_groups = max(1, min(SMALL_GROUPS, n_blocks))
    blocks_per_group = (n_blocks + n_groups - 1) // n_groups
    z_columns = np.empty((n_groups, c, SMALL_LANES), dtype=logits.dtype)
    g_columns = np.empty((n_groups, c, SMALL_LANES), dtype=logits.dtype)
    lanes = np.empty((n_groups, 4, SMALL_LANES), dtype=logits.dtype)
    sample_lanes = np.empty((n_groups, 3, SMALL_LANES), dtype=np.float64)
    for group in prange(n_groups):
        z_t = z_columns[group]
        g_t = g_columns[group]
        for block in range(group * blocks_per_group,
                           min(n_blocks, (group + 1) * blocks_per_group)):
            r0 = block * SMALL_LANES
            width = min(n, r0 + SMALL_LANES) - r0
            # column by column: a strided read and a contiguous write per class vectorises
            # (vector gathers); row by row it was one scalar copy per logit (65536 x 10: the
            # kernel 7% slower)
            for j in range(c):
                column, lane = logits[r0:r0 + width, j], z_t[j]
                for r in range(width):
                    lane[r] = column[r]
            _index_lanes(mode, z_t, g_t, width, target, r0, lanes[group], sample_lanes[group],
                         weights, weight_total, grad_scale, lse_out, loss_out, ignore_index,
                         smoothing, z_loss, False, softcap)
            if mode != MODE_FORWARD:
                for r in range(width):
                    row = grad[r0 + r]
                    for j in range(c):
                        row[j] = g_t[j, r]


# --------------------------------------------------------------------------------------------
# Tile kernels: (N, C, S) logits; vectorised across TILE spatial positions (the lanes)
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _tile_layout(n, c, n_pos):
    """Tiles of TILE positions per sample, and chunks of tiles (one scratch each) that share
    out about CHUNK_ELEMENTS logits: (tiles_per_sample, n_tiles, tiles_per_chunk, n_chunks)."""
    tiles_per_sample = (n_pos + TILE - 1) // TILE
    n_tiles = n * tiles_per_sample
    tiles_per_chunk = max(1, CHUNK_ELEMENTS // (c * TILE))
    n_chunks = (n_tiles + tiles_per_chunk - 1) // tiles_per_chunk
    return tiles_per_sample, n_tiles, tiles_per_chunk, n_chunks


@njit(inline="always")
def _tile_position(tile, tiles_per_sample, n_pos):
    """(sample n, first position, number of positions, flat index of the first sample)."""
    i = tile // tiles_per_sample
    p0 = (tile % tiles_per_sample) * TILE
    return i, p0, min(TILE, n_pos - p0), i * n_pos + p0


# The lane functions read row c of a (C, >= w) array as z[c, :w], w the length of their
# per-lane arrays: for a C-contiguous scratch that slice is typed contiguous, which LLVM needs
# to vectorise the loops (a view sliced to w columns beforehand is typed as any-strided).
@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _lanes_max(z, shift, softcap):
    """shift_k = max_c z'[c, k] per lane, in z's dtype (0 for a lane whose logits are all
    -inf; with a cap the maximum is that of z, capped, and never -inf)."""
    for k in range(shift.shape[0]):
        shift[k] = z[0, k]
    for c in range(1, z.shape[0]):
        zc = z[c, :shift.shape[0]]
        for k in range(shift.shape[0]):
            shift[k] = fmax(shift[k], zc[k])
    zero = cast_like(0.0, shift)
    for k in range(shift.shape[0]):
        capped = soft_cap(shift[k], softcap)
        shift[k] = capped if capped > -np.inf else zero


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _lanes_sum_exp(z, g, shift, total, store, inplace, softcap):
    """total_k = sum_c exp(z'[c, k] - shift_k), summed in z's dtype like the row kernels' sums
    (``shift`` and ``total`` have z's dtype: a float64 accumulator of float32 exponentials
    would keep LLVM from vectorising the loop); the exponentials (t with a cap, see
    :func:`exp_and_stored`) go to g when ``store`` (``inplace``: z is g's memory, read
    through g as in :func:`sum_exp_shifted`)."""
    for k in range(total.shape[0]):
        total[k] = 0
    for c in range(z.shape[0]):
        zc = z[c, :total.shape[0]]
        gc = g[c, :total.shape[0]]
        if not store:
            for k in range(total.shape[0]):
                total[k] += exp_of_shifted(soft_cap(zc[k], softcap) - shift[k])
        elif inplace:
            for k in range(total.shape[0]):
                e, stored = exp_and_stored(gc[k], shift[k], softcap)
                gc[k] = stored
                total[k] += e
        else:
            for k in range(total.shape[0]):
                e, stored = exp_and_stored(zc[k], shift[k], softcap)
                gc[k] = stored
                total[k] += e


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _lanes_lse(shift, total, lse):
    """lse_k = shift_k + log(total_k) in float64, for all lanes in one vector loop (a libm
    ``log`` per lane, in the scalar loss loop, cost more than the lanes' exps together)."""
    for k in range(lse.shape[0]):
        lse[k] = np.float64(shift[k]) + log_f64(np.float64(total[k]))


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _lanes_shift_and_lse(mode, z, g, shift, total, weighted, weights, lse, smoothing, inplace,
                         softcap):
    """The lane kernels' common step: ``shift`` = the saved ``lse`` in ``MODE_BACKWARD``;
    otherwise the lane maxima, ``weighted`` = sum_c w_c z'_c when smoothing, ``total`` = the
    sums of exponentials (stored to g in ``MODE_FUSED``) and ``lse`` = shift + log(total)."""
    if mode == MODE_BACKWARD:
        for k in range(shift.shape[0]):
            shift[k] = cast_like(lse[k], shift)
        return
    _lanes_max(z, shift, softcap)
    if smoothing > 0.0:
        _lanes_weighted_sum(z, weights, weighted, softcap)
    _lanes_sum_exp(z, g, shift, total, mode == MODE_FUSED, inplace, softcap)
    _lanes_lse(shift, total, lse)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _lanes_weighted_sum(z, w, out, softcap):
    """out_k = sum_c w_c z'[c, k] (float64)."""
    for k in range(out.shape[0]):
        out[k] = 0.0
    for c in range(z.shape[0]):
        zc = z[c, :out.shape[0]]
        wc = w[c]
        for k in range(out.shape[0]):
            out[k] += wc * soft_cap(zc[k], softcap)


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _lanes_gradient(z, g, shift, factor, smooth, w, fused, inplace, softcap):
    """g[c, k] = (factor_k * e[c, k] - smooth_k * w_c) * slope[c, k], with e from what g
    stores (fused: the stored exponentials, or t with a cap) or e = exp(z'[c, k] - shift_k)
    (backward: shift is the saved lse); the slope is 1 without a cap. ``shift``, ``factor``
    and ``smooth`` have z's dtype, so the loops stay in one width and vectorise."""
    for c in range(z.shape[0]):
        gc = g[c, :factor.shape[0]]
        zc = z[c, :factor.shape[0]]
        wc = cast_like(w[c], gc)
        if fused:
            for k in range(factor.shape[0]):
                e, slope = stored_exp_and_slope(gc[k], shift[k], softcap)
                gc[k] = (e * factor[k] - smooth[k] * wc) * slope
        elif inplace:
            for k in range(factor.shape[0]):
                e, slope = exp_and_slope(gc[k], shift[k], softcap)
                gc[k] = (e * factor[k] - smooth[k] * wc) * slope
        else:
            for k in range(factor.shape[0]):
                e, slope = exp_and_slope(zc[k], shift[k], softcap)
                gc[k] = (e * factor[k] - smooth[k] * wc) * slope


@njit(inline="always", fastmath=FASTMATH_SOFTMAX)
def _index_lanes(mode, z, g, width, target, first, lanes, sample_lanes, weights,
                 weight_total, grad_scale, lse_out, loss_out, ignore_index, smoothing, z_loss,
                 inplace, softcap):
    """The math of :func:`_rows_index_kernel` for ``w`` samples at once, one per vector lane:
    z (C, w) holds sample ``first + k`` in column k (classes down the rows), so every loop runs
    across the samples and vectorises however few the classes.

    z: (C, >= w) logits, the dtype of the kernel's, any strides, of which the first
    ``width`` = w columns are computed; g: (C, >= w) gradient, written unless ``MODE_FORWARD``
    (may be z's memory: ``inplace``); lanes: (4, >= w) scratch of z's dtype, the rows the
    vector loops read and write: 0 = shift (lane max, or the saved lse), 1 = sum of
    exponentials, 2 = gradient factor, 3 = smoothing coefficient; sample_lanes: (3, >= w)
    float64 scratch: 0 = target logit z'_t, 1 = its slope (1 - t_t^2 with a cap, else 1),
    2 = sum_c w_c z'_c. The other arguments as in :func:`_rows_index_kernel`, the per-sample
    ones indexed from ``first``.
    """
    c = z.shape[0]
    shift, total = lanes[0, :width], lanes[1, :width]
    factor, smooth = lanes[2, :width], lanes[3, :width]
    target_logit = sample_lanes[0, :width]
    target_slope = sample_lanes[1, :width]
    weighted = sample_lanes[2, :width]
    per_sample_scale = grad_scale.shape[0] > 1
    # the block's samples as slices indexed by k: Numba cannot tell that first + k is not
    # negative, and its wraparound test per lane turns the vector loads into gathers
    targets, lse_lanes = target[first:first + width], lse_out[first:first + width]
    scales = grad_scale[first:first + width] if per_sample_scale else grad_scale
    # 1. the target logits z'_t and their slopes, read before g overwrites z (steps 1-3 have
    #    no branch per lane, so they vectorise: an ignored lane reads class 0 and selects 0)
    for k in range(width):
        t = targets[k]
        kept = t != ignore_index
        z_t, slope_t = soft_cap_and_slope(z[t if kept else 0, k], softcap)
        target_logit[k] = select(kept, z_t, 0.0)
        target_slope[k] = select(kept, slope_t, 0.0)
    # 2. the shift: the saved lse, or the lane maxima; then lse and the loss per lane
    _lanes_shift_and_lse(mode, z, g, shift, total, weighted, weights, lse_lanes, smoothing,
                         inplace, softcap)
    if mode != MODE_BACKWARD:
        loss_lanes = loss_out[first:first + width]
        for k in range(width):
            t = targets[k]
            kept = t != ignore_index
            loss = _index_loss(lse_lanes[k], target_logit[k], weights[t if kept else 0],
                               weighted[k] if smoothing > 0.0 else 0.0, weight_total,
                               smoothing, z_loss, c)
            loss_lanes[k] = select(kept, loss, 0.0)
        if mode == MODE_FORWARD:
            return
    # 3. each lane's gradient factor (0 for an ignored sample) and smoothing coefficient
    smooth_per_class = smoothing / c
    for k in range(width):
        t = targets[k]
        kept = t != ignore_index
        scale = scales[k] if per_sample_scale else scales[0]
        lse = lse_lanes[k]  # given in backward, stored by step 2 otherwise
        coef = scale * index_coefficient(lse, weights[t if kept else 0], weight_total,
                                         smoothing, z_loss, c)
        if mode == MODE_FUSED:
            coef = divide(coef, np.float64(total[k]))
        else:  # the saved lse, rounded to z's dtype in ``shift`` (lse_rounding_factor)
            coef *= lse_rounding_factor(lse, shift[k])
        factor[k] = cast_like(select(kept, coef, 0.0), factor)
        smooth[k] = cast_like(select(kept, scale * smooth_per_class, 0.0), smooth)
    # 4. the gradient, then the target-class term (times the target's slope)
    _lanes_gradient(z, g, shift, factor, smooth, weights, mode == MODE_FUSED, inplace,
                    softcap)
    for k in range(width):
        t = targets[k]
        if t != ignore_index:
            scale = scales[k] if per_sample_scale else scales[0]
            term = scale * (1.0 - smoothing) * weights[t]
            if softcap is not None:
                term *= target_slope[k]
            g[t, k] -= cast_like(term, g)


@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _tiles_index_kernel(mode, logits, target, weights, grad, grad_scale, lse_out, loss_out,
                        ignore_index, smoothing, z_loss, inplace, softcap):
    """Class-index targets for (N, C, S) logits: :func:`_index_lanes` on TILE positions at a
    time (for fixed n, c the positions are contiguous).

    logits: (N, C, S) float32 / float64, any strides;
    target: (N*S,) int64 class indices or ``ignore_index``;
    weights: (C,) float64;
    grad: (N, C, S), the dtype of logits, any strides; written unless ``MODE_FORWARD`` (then the
    logits stand in for it, unwritten); may be the logits' memory (``inplace``);
    grad_scale: (1,) or (N*S,) float64, the gradient's factor per sample;
    lse_out: (N*S,) float64, written (read in ``MODE_BACKWARD``);
    loss_out: (N*S,) float64, written (a (0,) stand-in in ``MODE_BACKWARD``);
    softcap: None, or the cap c > 0 (float).
    """
    n, c, n_pos = logits.shape
    weight_total = ordered_sum(weights)
    tiles_per_sample, n_tiles, tiles_per_chunk, n_chunks = _tile_layout(n, c, n_pos)
    lanes = np.empty((n_chunks, 4, TILE), dtype=logits.dtype)
    sample_lanes = np.empty((n_chunks, 3, TILE), dtype=np.float64)
    for chunk in prange(n_chunks):
        for tile in range(chunk * tiles_per_chunk, min(n_tiles, (chunk + 1) * tiles_per_chunk)):
            i, p0, width, first = _tile_position(tile, tiles_per_sample, n_pos)
            _index_lanes(mode, logits[i, :, p0:p0 + width], grad[i, :, p0:p0 + width], width,
                         target, first, lanes[chunk], sample_lanes[chunk], weights,
                         weight_total, grad_scale, lse_out, loss_out, ignore_index, smoothing,
                         z_loss, inplace, softcap)


@njit(cache=True, parallel=True, fastmath=FASTMATH_SOFTMAX)
def _tiles_prob_kernel(mode, logits, target, weights, grad, grad_scale, lse_out, loss_out,
                       ignore_index, smoothing, z_loss, inplace, softcap):
    """Probability targets y (N, C, S), same dtype as the logits (``ignore_index`` unused).

    With q_c = (1 - s) y_c + s / C, Y = sum_c w_c y_c, W = sum_c w_c:

        sum_c w_c q_c = (1 - s) Y + (s / C) W
        loss = (1 - s)(lse Y - sum_c w_c y_c z_c) + (s / C)(lse W - sum_c w_c z_c)
               + z_loss lse^2
        dloss/dz_j = p_j [(1 - s) Y + (s / C) W + 2 z_loss lse] - w_j q_j

    Terms with y_c = 0 are skipped so that a -inf (masked) logit with zero probability
    contributes 0 rather than 0 * inf. Lane rows, in z's dtype (``exp_lanes``): 0 shift/lse,
    1 sum of exponentials; in float64 (``lanes``): 2 Y, 3 sum w y z, 4 sum w z, 5 gradient
    factor, 6 per-sample gradient scale (0 and 1 unused there). With a
    ``softcap`` z' = c tanh(z / c) stands for z, and the gradient is multiplied by the slope
    1 - tanh^2(z / c).

    logits: (N, C, S) float32 / float64, any strides;
    target: (N, C, S) probabilities, the dtype of logits, any strides;
    weights: (C,) float64;
    grad: (N, C, S), the dtype of logits, any strides; written unless ``MODE_FORWARD`` (then the
    logits stand in for it, unwritten); may be the logits' memory (``inplace``);
    grad_scale: (1,) or (N*S,) float64, the gradient's factor per sample;
    lse_out: (N*S,) float64, written (read in ``MODE_BACKWARD``);
    loss_out: (N*S,) float64, written (a (0,) stand-in in ``MODE_BACKWARD``);
    softcap: None, or the cap c > 0 (float).
    """
    n, c, n_pos = logits.shape
    weight_total = ordered_sum(weights)
    smooth_per_class = smoothing / c
    tiles_per_sample, n_tiles, tiles_per_chunk, n_chunks = _tile_layout(n, c, n_pos)
    lanes = np.empty((n_chunks, 7, TILE), dtype=np.float64)
    exp_lanes = np.empty((n_chunks, 2, TILE), dtype=logits.dtype)
    per_sample_scale = grad_scale.shape[0] > 1
    for chunk in prange(n_chunks):
        for tile in range(chunk * tiles_per_chunk, min(n_tiles, (chunk + 1) * tiles_per_chunk)):
            i, p0, width, first = _tile_position(tile, tiles_per_sample, n_pos)
            shift = exp_lanes[chunk, 0, :width]
            total = exp_lanes[chunk, 1, :width]
            wy = lanes[chunk, 2, :width]
            wyz = lanes[chunk, 3, :width]
            wz = lanes[chunk, 4, :width]
            factor = lanes[chunk, 5, :width]
            scale = lanes[chunk, 6, :width]
            z = logits[i, :, p0:p0 + width]
            y = target[i, :, p0:p0 + width]
            g = grad[i, :, p0:p0 + width]
            for k in range(width):
                wy[k] = 0.0
                wyz[k] = 0.0
            for cls in range(c):
                zc = z[cls]
                yc = y[cls]
                wc = weights[cls]
                for k in range(width):
                    wyk = wc * np.float64(yc[k])
                    wy[k] += wyk
                    if mode != MODE_BACKWARD and yc[k] != 0.0:
                        wyz[k] += wyk * soft_cap(zc[k], softcap)
            # per-sample values as slices indexed by k (see _index_lanes)
            lse_lanes = lse_out[first:first + width]
            scales = grad_scale[first:first + width] if per_sample_scale else grad_scale
            _lanes_shift_and_lse(mode, z, g, shift, total, wz, weights, lse_lanes, smoothing,
                                 inplace, softcap)
            if mode != MODE_BACKWARD:
                loss_lanes = loss_out[first:first + width]
                for k in range(width):
                    loss_lanes[k] = _prob_loss(lse_lanes[k], wy[k], wyz[k], wz[k],
                                               weight_total, smoothing, z_loss, c)
                if mode == MODE_FORWARD:
                    continue
            for k in range(width):
                scale[k] = scales[k] if per_sample_scale else scales[0]
                lse = lse_lanes[k]  # given in backward, stored by the loop above otherwise
                coef = scale[k] * _prob_coefficient(lse, wy[k], weight_total, smoothing,
                                                    z_loss, c)
                factor[k] = (coef / np.float64(total[k]) if mode == MODE_FUSED
                             else coef * lse_rounding_factor(lse, shift[k]))
            for cls in range(c):
                zc = z[cls]
                yc = y[cls]
                gc = g[cls]
                wc = weights[cls]
                for k in range(width):
                    if mode == MODE_FUSED:
                        e, slope = stored_exp_and_slope(gc[k], cast_like(shift[k], gc), softcap)
                    else:
                        e, slope = exp_and_slope(zc[k], cast_like(shift[k], zc), softcap)
                    q = (1.0 - smoothing) * np.float64(yc[k]) + smooth_per_class
                    gc[k] = ((e * cast_like(factor[k], gc) - cast_like(scale[k] * wc * q, gc))
                             * slope)
