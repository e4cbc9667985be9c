"""Deterministic reductions: fixed chunking and a fixed combine order.

A parallel reduction is bitwise reproducible only if neither the split into pieces nor the order
in which the pieces' partial results are combined depends on the number of threads. Kernels
therefore cut their work with :func:`chunk_count` / :func:`chunk_bounds` (sizes fixed by the
problem shape alone), write one partial per chunk into an explicit array, and combine the
partials here, sequentially in chunk order. ``prange``'s own reductions (whose combine order
follows the thread schedule) are never used.

Moments are combined with Chan et al.'s pairwise update (Chan, Golub & LeVeque, 1983). For two
disjoint pieces a, b with counts n_a, n_b, means mu_a, mu_b and sums of squared deviations
M2_a = sum (x - mu_a)^2, M2_b:

    n     = n_a + n_b
    delta = mu_b - mu_a
    mu    = mu_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

Every term is a difference from a piece's own mean, so a large common offset (mean 1e4, spread
1) never meets a catastrophic cancellation, unlike sum(x^2) - n mu^2.

Every compiled function here says ``fastmath=False``. Numba compiles a callee with its caller's
``fastmath`` flags unless the callee sets its own, and keeps that compilation for every later
call with the same types: the cross-entropy kernels (``FASTMATH_SOFTMAX``, with ``reassoc``)
call :func:`ordered_sum`, so without the flag its additions could be reordered, and the bits of
every sum in the process (and in the disk cache) would depend on which call compiled it first.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Accumulators of :func:`ordered_sum`: enough independent additions in flight to hide the
#: latency of a floating-point add (4 cycles, two ports: 8), so a long sum runs at load speed
#: instead of one add per 4 cycles.
SUM_LANES = 8
#: Values per chunk of :func:`chunked_sum`. Long sums are split so that both cores add (a
#: per-sample loss array right after the kernel that wrote it: each core then reads mostly the
#: half it wrote itself); up to this length it is :func:`ordered_sum`, bit for bit.
SUM_CHUNK = 16384


def chunk_count(n: int, chunk: int) -> int:
    """Number of chunks of at most ``chunk`` items covering ``n`` items (0 for ``n == 0``)."""
    return -(-n // chunk)


@njit(cache=True, inline="always")
def chunk_bounds(index, n, chunk):
    """``[lo, hi)`` of chunk ``index`` when ``n`` items are cut into chunks of ``chunk``."""
    lo = index * chunk
    return lo, min(n, lo + chunk)


@njit(cache=True, inline="always")
def worker_share(worker, n_workers, n):
    """``[lo, hi)`` of worker ``worker``'s contiguous share when ``n`` items are dealt to
    ``n_workers`` (one per thread). Only which thread computes an item depends on it, so it may
    follow the thread count where :func:`chunk_bounds` may not: no result depends on it."""
    return (worker * n) // n_workers, ((worker + 1) * n) // n_workers


@njit(cache=True, fastmath=False)
def merge_moments(counts, means, m2s):
    """Chan-merge K partial moments in index order, independently for each of C columns.

    counts: (K,) number of values behind each partial (any real or integer dtype, > 0);
    means, m2s: (K, C) float64 partial means and sums of squared deviations.
    Returns ``(count, mean, m2)``: a float, and two new (C,) float64 arrays. With K == 1 the
    first partial is returned unchanged (bitwise), so merging a single piece is the identity.
    """
    n_parts, n_cols = means.shape
    mean = means[0].copy()
    m2 = m2s[0].copy()
    n_a = float(counts[0])
    for k in range(1, n_parts):
        n_b = float(counts[k])
        n = n_a + n_b
        w_b = n_b / n
        w_ab = n_a * n_b / n
        for c in range(n_cols):
            delta = means[k, c] - mean[c]
            mean[c] += delta * w_b
            m2[c] += m2s[k, c] + delta * delta * w_ab
        n_a = n
    return n_a, mean, m2


@njit(cache=True, fastmath=False)
def sum_partials(parts):
    """Sum the rows of ``parts`` (K, C) float64 in row order: one (C,) float64 array."""
    total = parts[0].copy()
    for k in range(1, parts.shape[0]):
        for c in range(parts.shape[1]):
            total[c] += parts[k, c]
    return total


@njit(cache=True, inline="always")
def _combine_lanes(lanes):
    """Sum of the SUM_LANES accumulators as a fixed tree: ((0+1)+(2+3))+((4+5)+(6+7))."""
    return (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])))


@njit(cache=True, inline="always")
def _lanes_sum(values, lo, hi):
    """float64 sum of ``values[lo:hi]``: value lo + i goes to accumulator i mod SUM_LANES, and
    the accumulators are combined by :func:`_combine_lanes`."""
    lanes = np.zeros(SUM_LANES, dtype=np.float64)
    full = lo + (hi - lo) // SUM_LANES * SUM_LANES
    for i in range(lo, full, SUM_LANES):
        for k in range(SUM_LANES):
            lanes[k] += values[i + k]
    for i in range(full, hi):
        lanes[i - full] += values[i]
    return _combine_lanes(lanes)


@njit(cache=True, fastmath=False)
def ordered_sum(values):
    """float64 sum of ``values`` (n,) in an order fixed by n alone: value i goes to accumulator
    i mod SUM_LANES, and the accumulators are combined by :func:`_combine_lanes`. The same
    bits for any thread count; exact for integers below 2**53."""
    return _lanes_sum(values, 0, values.shape[0])


@njit(cache=True, parallel=True, fastmath=False)
def _chunked_sum_parallel(values, n_chunks):
    n = values.shape[0]
    partials = np.empty(n_chunks, dtype=np.float64)
    for chunk in prange(n_chunks):
        lo, hi = chunk_bounds(chunk, n, SUM_CHUNK)
        partials[chunk] = _lanes_sum(values, lo, hi)
    total = partials[0]
    for chunk in range(1, n_chunks):
        total += partials[chunk]
    return total


def chunked_sum(values) -> float:
    """float64 sum of ``values`` (n,): chunks of SUM_CHUNK values, each summed as by
    :func:`ordered_sum`, on the threads in parallel, their partials added in chunk order. The
    order is fixed by n alone (the same bits for any thread count), and a sum of at most
    SUM_CHUNK values is :func:`ordered_sum` itself (no parallel region to start)."""
    if values.shape[0] <= SUM_CHUNK:
        return float(ordered_sum(values))
    return float(_chunked_sum_parallel(values, chunk_count(values.shape[0], SUM_CHUNK)))


@njit(cache=True, fastmath=False)
def ordered_gather_sum(table, index, skip):
    """float64 sum of ``table[index[i]]`` over the i with ``index[i] != skip``, in the order
    of :func:`ordered_sum` (position i to accumulator i mod SUM_LANES).

    table: (C,) float64; index: (n,) int64, in [0, C) or equal to ``skip``.
    """
    lanes = np.zeros(SUM_LANES, dtype=np.float64)
    n = index.shape[0]
    full = n - n % SUM_LANES
    for i in range(0, full, SUM_LANES):
        for k in range(SUM_LANES):
            t = index[i + k]
            if t != skip:
                lanes[k] += table[t]
    for i in range(full, n):
        t = index[i]
        if t != skip:
            lanes[i - full] += table[t]
    return _combine_lanes(lanes)
