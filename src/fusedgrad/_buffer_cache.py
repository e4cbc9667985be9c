"""Released output buffers, kept for reuse: the bookkeeping shared by the host and device caches.

Why reuse at all: a training loop frees the previous step's gradient or activation just before
asking for the next one of the same size, and a fresh buffer costs time on both backends. On
the host the operating system zeroes every new page on first write (about half the fused
cross-entropy kernel's time at 1024 x 128256). On the GPU Numba allocates with ``cuMemAlloc``
and frees with ``cuMemFree`` (deferred, then synchronising the device). Measured on an H200: a
1 GiB allocation and free took 0.12 ms (0.43 ms with the free carried out at once) against
0.02 ms from the pool, and the full cross-entropy call at 4096 x 65536 went from 5.42 to 4.07 ms
with the pool, more than the allocation alone accounts for; what the rest is (first writes to
new memory, say) was not measured. PyTorch's caching allocator works the same way on CUDA.

A :class:`ReleasedBuffers` pool only keeps buffers that their backend has handed back (the
backend decides when no view of an output is left, see ``cpu/_alloc.py`` and
``cuda/_arrays.py``) and gives one out again for the same key: the byte size, plus the device and
stream on the GPU, because a kernel still queued on another stream could be reading it. Each
pool is bounded by an environment variable in MiB (0 disables it) and drops the least recently
released sizes first. :func:`empty_cache` (public as ``fusedgrad.empty_cache``) empties every
pool that exists, without importing a backend.
"""
from __future__ import annotations

import collections
import os
import threading

#: Host outputs smaller than this are allocated directly: for them allocation is cheap (the
#: device pool takes every size: there allocation and freeing wait for the device, see
#: ``cuda/_arrays.py``).
MIN_BYTES = 1 << 20


class ReleasedBuffers:
    """Buffers given back by a backend, by key, within a byte limit read from ``env_var``."""

    def __init__(self, env_var: str, default_mb: int):
        self.env_var = env_var
        self.default_mb = default_mb
        self._lock = threading.Lock()
        self._by_key: "collections.OrderedDict[object, list]" = collections.OrderedDict()
        self._bytes = 0
        _POOLS.append(self)

    def limit_bytes(self) -> int:
        """The limit in bytes (``ValueError`` naming the variable when it is not a number)."""
        raw = os.environ.get(self.env_var, str(self.default_mb))
        try:
            megabytes = float(raw)
        except ValueError:
            raise ValueError(f"{self.env_var} must be a number of MiB, got {raw!r}") from None
        return max(0, int(megabytes * (1 << 20)))

    def take(self, key):
        """A buffer released under ``key`` (most recent first), or None."""
        with self._lock:
            buffers = self._by_key.get(key)
            if not buffers:
                return None
            buffer, nbytes = buffers.pop()
            if not buffers:
                del self._by_key[key]
            self._bytes -= nbytes
            return buffer

    def give_back(self, key, buffer, nbytes: int) -> None:
        """Keep ``buffer`` (``nbytes`` large) for reuse under ``key``, within the limit."""
        limit = self.limit_bytes()
        if nbytes > limit:
            return
        with self._lock:
            self._by_key.setdefault(key, []).append((buffer, nbytes))
            self._by_key.move_to_end(key)
            self._bytes += nbytes
            while self._bytes > limit:  # drop the least recently released keys first
                oldest_key, buffers = next(iter(self._by_key.items()))
                _, dropped = buffers.pop(0)
                if not buffers:
                    del self._by_key[oldest_key]
                self._bytes -= dropped

    def clear(self) -> int:
        """Drop every buffer held (the backend frees them); returns the bytes dropped."""
        with self._lock:
            dropped = self._bytes
            self._by_key.clear()
            self._bytes = 0
        return dropped

    @property
    def cached_bytes(self) -> int:
        """Bytes held in released buffers, waiting for reuse."""
        return self._bytes


_POOLS: "list[ReleasedBuffers]" = []


def empty_cache() -> int:
    """Release every output buffer fusedgrad keeps for reuse, on the host and on GPUs, back to
    the operating system or the CUDA driver; returns the number of bytes released."""
    return sum(pool.clear() for pool in _POOLS)
