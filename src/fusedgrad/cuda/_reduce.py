"""Reductions shared by every ``@cuda.jit`` kernel of fusedgrad: in a group of threads, in a
block, and over a grid.

Determinism is part of the contract: no floating-point atomics anywhere. Every reduction combines
values in an order fixed by the launch shape (threads per block, number of blocks), which the
launchers derive from the array shapes only, so a result is bitwise identical from run to run.

Two implementations of the in-block reduction, chosen once at import time:

* real GPU: a warp reduces with ``cuda.shfl_xor_sync`` (lane distances 16, 8, 4, 2, 1), which
  leaves the result in every lane: a group of one warp (a warp per row) needs nothing more,
  no shared memory and no block barrier (a ``syncwarp``, for memory ordering between the
  warp's threads); in a wider group lane 0 of each warp stores its value in
  shared memory and the group's first warp combines them with ``cuda.shfl_down_sync``;
* Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, see ``_target.SIMULATED``): the simulator
  has no warp shuffles, so a shared-memory tree (halving strides with ``syncthreads``) does the
  same job.

Both are selected under the single name :func:`group_reduce`, so kernels are written once. The
PTX compilation test (``fusedgrad.cuda._compile``) runs without the simulator and therefore
compiles the shuffle path; the simulator tests run the tree path.

A "group" is the ``blockDim.x`` threads sharing one ``threadIdx.y``: a block may process
``blockDim.y`` rows at once (one group per row). ``blockDim.x`` must be a power of two and, on a
GPU, 1 (a thread per row: nothing to reduce) or a multiple of 32 (whole warps, all lanes active in
the shuffles). Every thread of the block must call a group reduction the same number of times
(they contain ``syncthreads``).

Besides the in-block reductions, this module holds the combine operations they use: a sum, a
NaN-propagating maximum (:func:`combine`) and Chan's merge of ``(count, mean, m2)`` triples
(:func:`chan_merge`), and :func:`segment_reduce`, a shared-memory tree that reduces (Chan merge
or sum) the threads with the same ``threadIdx.x % segment`` (one channel per segment, used by
batch norm). The scalar helpers of one operation live with its kernels (the online softmax in
``cross_entropy.py``, the shifted-data moments in ``batch_norm.py``).

Grid level: blocks never combine their results through atomics; each writes a partial, and a
second launch folds the partials in index order (:func:`sum_chunks` for a 1-D array, launched by
``_arrays.device_sum``; the batch norm module merges per-channel partials the same way).
"""
from __future__ import annotations

from numba import cuda, float64

from ._target import SIMULATED

#: Operation codes for :func:`group_reduce` (sum, max) and :func:`segment_reduce` (sum, Chan);
#: literal arguments, so the branches fold at compile time.
OP_SUM = 0
OP_MAX = 1
OP_CHAN = 2

#: Shared-memory scratch entries a kernel must provide per block (the largest block size).
SCRATCH_SIZE = 1024
WARP_SIZE = 32
#: Threads per block of the 1-D launches of every kernel module (a power of two and whole warps
#: on a GPU, as :func:`group_reduce` needs); small under the simulator, which runs one Python
#: thread per GPU thread.
THREADS = 32 if SIMULATED else 256
_FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True, inline=True)
def combine(a, b, op):
    """``a + b`` or ``max(a, b)``; a NaN operand propagates through the maximum."""
    if op == OP_SUM:
        return a + b
    if a != a or a > b:
        return a
    return b


@cuda.jit(device=True, inline=True)
def _group_reduce_tree(value, scratch, op):
    """Shared-memory tree over the group's ``blockDim.x`` entries of ``scratch`` (simulator path).

    The group of ``threadIdx.y`` owns ``scratch[y * blockDim.x : (y + 1) * blockDim.x]``. After
    the halving loop entry 0 holds the combination, in an order fixed by the group size.
    """
    width = cuda.blockDim.x
    lane = cuda.threadIdx.x
    base = cuda.threadIdx.y * width
    scratch[base + lane] = value
    cuda.syncthreads()
    stride = width // 2
    while stride > 0:
        if lane < stride:
            scratch[base + lane] = combine(scratch[base + lane], scratch[base + lane + stride], op)
        cuda.syncthreads()
        stride //= 2
    total = scratch[base]
    cuda.syncthreads()  # everyone has read the result before the scratch is reused
    return total


@cuda.jit(device=True, inline=True)
def _warp_butterfly(value, op):
    """``value`` combined over the 32 lanes of a warp, in every lane: ``shfl_xor`` with lane
    distances 16, 8, 4, 2, 1, a fixed order."""
    offset = WARP_SIZE // 2
    while offset > 0:
        value = combine(value, cuda.shfl_xor_sync(_FULL_MASK, value, offset), op)
        offset //= 2
    return value


@cuda.jit(device=True, inline=True)
def _group_reduce_shuffle(value, scratch, op):
    """Warp shuffles; a one-warp group is done there, without shared memory or a block barrier.
    Wider groups: each warp's lane 0 stores the warp's value, then the group's first warp
    combines those ``n_warps`` values (a power of two) with ``shfl_down`` in a fixed tree."""
    if cuda.blockDim.x == 1:
        return value
    value = _warp_butterfly(value, op)
    if cuda.blockDim.x == WARP_SIZE:
        # a memory barrier among the warp's threads, as syncthreads is for wider groups: the
        # kernels rely on every thread's reads before a reduction preceding the others'
        # writes after it (in-place cross-entropy: each thread reads the row's first logit)
        cuda.syncwarp(_FULL_MASK)
        return value
    lane = cuda.threadIdx.x % WARP_SIZE
    warp = cuda.threadIdx.x // WARP_SIZE
    n_warps = cuda.blockDim.x // WARP_SIZE
    base = cuda.threadIdx.y * n_warps
    if lane == 0:
        scratch[base + warp] = value
    cuda.syncthreads()
    if warp == 0:
        total = scratch[base + (lane & (n_warps - 1))]  # lanes past n_warps never reach lane 0
        offset = n_warps // 2
        while offset > 0:
            total = combine(total, cuda.shfl_down_sync(_FULL_MASK, total, offset), op)
            offset //= 2
        if lane == 0:
            scratch[base] = total
    cuda.syncthreads()
    total = scratch[base]
    cuda.syncthreads()  # everyone has read the result before the scratch is reused
    return total


#: Reduce ``value`` over the ``blockDim.x`` threads of this ``threadIdx.y`` group; every thread
#: of the group gets the result. ``scratch``: shared array of at least ``SCRATCH_SIZE`` entries
#: of the accumulation dtype; ``op``: ``OP_SUM`` or ``OP_MAX``.
group_reduce = _group_reduce_tree if SIMULATED else _group_reduce_shuffle


@cuda.jit(device=True, inline=True)
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of two float64 ``(count, mean, m2)`` summaries.

        n = na + nb,  d = mb - ma,  mean = ma + d nb / n,  m2 = m2a + m2b + d^2 na nb / n
    """
    if count_b == 0.0:
        return count_a, mean_a, m2_a
    if count_a == 0.0:
        return count_b, mean_b, m2_b
    count = count_a + count_b
    delta = mean_b - mean_a
    frac_b = count_b / count
    return count, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * count_a * frac_b


@cuda.jit(device=True, inline=True)
def _merge_entries(s_a, s_b, s_c, dst, src, op):
    """Fold entry ``src`` into ``dst``: Chan merge of ``(count, mean, m2)`` or a sum of
    ``(a, b)`` (``s_c`` unused)."""
    if op == OP_CHAN:
        count, mean, m2 = chan_merge(s_a[dst], s_b[dst], s_c[dst], s_a[src], s_b[src], s_c[src])
        s_a[dst] = count
        s_b[dst] = mean
        s_c[dst] = m2
    else:
        s_a[dst] += s_a[src]
        s_b[dst] += s_b[src]


@cuda.jit(device=True, inline=True)
def segment_reduce(a, b, c, s_a, s_b, s_c, segment, op):
    """Reduce the values of threads with equal ``threadIdx.x % segment`` (1-D blocks).

    ``op``: ``OP_CHAN`` merges ``(count, mean, m2) = (a, b, c)`` triples with
    :func:`chan_merge`; ``OP_SUM`` sums ``a`` and ``b``. Shared-memory tree with halving strides
    down to ``segment`` (both powers of two): a fixed order. Afterwards entry
    ``threadIdx.x % segment`` of ``s_a``/``s_b``/``s_c`` (float64 shared arrays of
    ``blockDim.x`` entries) holds the segment's result; the caller reads it, then
    ``syncthreads`` before reusing the arrays.
    """
    tid = cuda.threadIdx.x
    s_a[tid] = a
    s_b[tid] = b
    s_c[tid] = c
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride >= segment:
        if tid < stride:
            _merge_entries(s_a, s_b, s_c, tid, tid + stride, op)
        cuda.syncthreads()
        stride //= 2


# --------------------------------------------------------------------------------------------
# Deterministic sum of a 1-D array on the device (grid level, no atomics)
# --------------------------------------------------------------------------------------------
@cuda.jit
def sum_chunks(values, partials, chunk):
    """``partials[b] = sum(values[b*chunk:(b+1)*chunk])`` (float64), one block per chunk.

    values: (n,) any float dtype; partials: (n_blocks,) float64 (one entry per block launched);
    chunk: values per block.

    Each thread adds its strided elements in order, then :func:`group_reduce` folds the block's
    threads in a fixed tree: the result does not depend on scheduling.
    """
    scratch = cuda.shared.array(SCRATCH_SIZE, float64)
    start = cuda.blockIdx.x * chunk
    stop = min(start + chunk, values.shape[0])
    total = 0.0
    for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
        total += float64(values[i])
    total = group_reduce(total, scratch, OP_SUM)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = total
