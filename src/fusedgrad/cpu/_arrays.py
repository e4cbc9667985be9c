"""Host arrays for the CPU backend: the array interface of ``fusedgrad._device.arrays``.

The interface is documented once, in ``fusedgrad._device.arrays``; ``fusedgrad.cuda._arrays`` is
the device side. Here the arrays are NumPy arrays: anything ``np.asarray`` takes is accepted as
an input, and large outputs come from the pool of released host buffers (``_alloc``).
"""
from __future__ import annotations

import numpy as np

from . import _alloc

#: Floating dtypes the CPU kernels are compiled for (big arrays and per-channel or per-class
#: vectors alike).
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_array(name: str, value) -> np.ndarray:
    """``np.asarray(value)`` (an ndarray is returned as it is); ``TypeError`` naming ``name``
    for objects NumPy cannot take or turns into an object array."""
    if isinstance(value, np.ndarray):
        return value
    try:
        arr = np.asarray(value)
    except Exception as exc:  # e.g. a ragged list
        raise TypeError(f"{name} must be an array, got {type(value).__name__}: {exc}") from None
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got an object array "
                        f"from {type(value).__name__}")
    return arr


def empty(shape, dtype) -> np.ndarray:
    """Uninitialised C-contiguous array; large ones reuse released outputs (``_alloc``), so the
    operating system does not zero fresh pages on every call."""
    return _alloc.empty(shape, dtype)


def empty_like(arr) -> np.ndarray:
    """Uninitialised array with the shape and dtype of ``arr`` (see :func:`empty`)."""
    return _alloc.empty(arr.shape, arr.dtype)


def is_writeable(arr) -> bool:
    return bool(arr.flags.writeable)


def shares_memory(a, b) -> bool:
    """Whether two arrays overlap in memory (exact: ``np.shares_memory``)."""
    return np.shares_memory(a, b)
