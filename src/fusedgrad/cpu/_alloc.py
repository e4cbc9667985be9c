"""Reused host buffers for large outputs (gradients, normalised activations).

Why: a fresh multi-megabyte ``np.empty`` is backed by pages the kernel has never touched, and
the operating system zeroes each page on first write. For the gradient of a 1024 x 128256
float32 logits array (525 MB) that zeroing costs about as much as half of the fused kernel
itself, on every call, although a training loop frees the previous step's gradient just before
asking for the next one. So large outputs come from a small cache of released buffers, in the
spirit of PyTorch's caching allocator on CUDA.

How a buffer comes back: :func:`empty` wraps an ``arena`` (a uint8 array kept by this module)
in a ``lease``, ``np.frombuffer(memoryview(arena))``. NumPy collapses a view's ``.base`` chain
only through arrays, and the lease's base is a memoryview, so every view a caller ever makes of
the result, however derived, has the lease as its base and keeps it alive; the lease's
finalizer returns the arena to the cache only when the last of them is gone. Values are never
shared between live arrays.

Bounds: only buffers of at least ``MIN_BYTES`` go through the cache, and it retains at most
``FUSEDGRAD_HOST_CACHE_MB`` MiB (environment variable, default 1024; 0 disables it), dropping
the oldest released buffers first. :func:`empty_cache` releases everything it holds.
"""
from __future__ import annotations

import collections
import math
import os
import threading
import weakref

import numpy as np

MIN_BYTES = 1 << 20


def _limit_bytes() -> int:
    raw = os.environ.get("FUSEDGRAD_HOST_CACHE_MB", "1024")
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"FUSEDGRAD_HOST_CACHE_MB must be a number of MiB, got {raw!r}") from None
    return max(0, int(megabytes * (1 << 20)))


_lock = threading.Lock()
_released: "collections.OrderedDict[int, list]" = collections.OrderedDict()
_released_bytes = 0


def _take(nbytes: int):
    global _released_bytes
    with _lock:
        arenas = _released.get(nbytes)
        if not arenas:
            return None
        arena = arenas.pop()
        if not arenas:
            del _released[nbytes]
        _released_bytes -= nbytes
        return arena


def _give_back(arena: np.ndarray) -> None:
    global _released_bytes
    limit = _limit_bytes()
    if arena.nbytes > limit:
        return
    with _lock:
        _released.setdefault(arena.nbytes, []).append(arena)
        _released.move_to_end(arena.nbytes)
        _released_bytes += arena.nbytes
        while _released_bytes > limit:  # drop the least recently released sizes first
            size, arenas = next(iter(_released.items()))
            arenas.pop(0)
            if not arenas:
                del _released[size]
            _released_bytes -= size


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, from a released buffer of the same size if any."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or _limit_bytes() == 0:
        return np.empty(shape, dtype)
    arena = _take(nbytes)
    if arena is None:
        arena = np.empty(nbytes, np.uint8)
    lease = np.frombuffer(memoryview(arena), np.uint8)
    finalizer = weakref.finalize(lease, _give_back, arena)
    finalizer.atexit = False
    return lease.view(dtype).reshape(shape)


def empty_cache() -> int:
    """Release every cached buffer to the operating system; returns the bytes released."""
    global _released_bytes
    with _lock:
        freed = _released_bytes
        _released.clear()
        _released_bytes = 0
    return freed


def cached_bytes() -> int:
    """Bytes currently held in released buffers, waiting for reuse."""
    return _released_bytes
