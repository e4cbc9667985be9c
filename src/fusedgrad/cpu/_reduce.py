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
"""
from __future__ import annotations

from numba import njit


def chunk_count(n: int, chunk: int) -> int:
    """Number of chunks of at most ``chunk`` items covering ``n`` items (0 for ``n == 0``)."""
    return -(-n // chunk)


@njit(cache=True, inline="always")
def chunk_bounds(index, n, chunk):
    """``[lo, hi)`` of chunk ``index`` when ``n`` items are cut into chunks of ``chunk``."""
    lo = index * chunk
    return lo, min(n, lo + chunk)


@njit(cache=True)
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


@njit(cache=True)
def sum_partials(parts):
    """Sum the rows of ``parts`` (K, C) float64 in row order: one (C,) float64 array."""
    total = parts[0].copy()
    for k in range(1, parts.shape[0]):
        for c in range(parts.shape[1]):
            total[c] += parts[k, c]
    return total
