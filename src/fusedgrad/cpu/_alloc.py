"""Reused host buffers for large outputs (gradients, normalised activations).

Why: a fresh multi-megabyte ``np.empty`` is backed by pages the kernel has never touched, and
the operating system zeroes each page on first write. For the gradient of a 1024 x 128256
float32 logits array (525 MB) that zeroing costs about as much as half of the fused kernel
itself, on every call, although a training loop frees the previous step's gradient just before
asking for the next one. So large outputs come from a pool of released buffers
(``fusedgrad._buffer_cache``, shared with the GPU backend), in the spirit of PyTorch's caching
allocator on CUDA.

How a buffer comes back: :func:`empty` wraps an ``arena`` (a uint8 array kept by the pool) in a
``lease``, ``np.frombuffer(memoryview(arena))``. NumPy collapses a view's ``.base`` chain only
through arrays, and the lease's base is a memoryview, so every view a caller ever makes of the
result, however derived, has the lease as its base and keeps it alive; the lease's finalizer
returns the arena to the pool only when the last of them is gone. Values are never shared
between live arrays.

Bounds: only buffers of at least ``MIN_BYTES`` go through the pool, and it retains at most
``FUSEDGRAD_HOST_CACHE_MB`` MiB (environment variable, default 1024; 0 disables it), dropping
the least recently released sizes first. ``fusedgrad.empty_cache()`` releases everything.
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from .._buffer_cache import MIN_BYTES, ReleasedBuffers
from ._stream import STREAM_BYTES

_POOL = ReleasedBuffers("FUSEDGRAD_HOST_CACHE_MB", default_mb=1024)

#: Pooled buffers start on a cache line (NumPy's own large arrays start 16 bytes past a page):
#: the kernels write whole lines of them with non-temporal stores (``_stream``).
ALIGNMENT = STREAM_BYTES


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, from a released buffer of the same size if any;
    from ``MIN_BYTES`` on, its data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or _POOL.limit_bytes() == 0:
        return np.empty(shape, dtype)
    arena = _POOL.take(nbytes)
    if arena is None:
        arena = np.empty(nbytes + ALIGNMENT - 1, np.uint8)
    offset = -arena.ctypes.data % ALIGNMENT
    lease = np.frombuffer(memoryview(arena)[offset:offset + nbytes], np.uint8)
    finalizer = weakref.finalize(lease, _POOL.give_back, nbytes, arena, arena.nbytes)
    finalizer.atexit = False
    return lease.view(dtype).reshape(shape)


def empty_cache() -> int:
    """Release every cached host buffer to the operating system; returns the bytes released."""
    return _POOL.clear()


def cached_bytes() -> int:
    """Bytes currently held in released host buffers, waiting for reuse."""
    return _POOL.cached_bytes
