"""Argument checks shared by the public operations.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument and what was
expected. The API modules run all checks before any kernel writes anything, so a failed call
leaves outputs and running buffers untouched.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

FLOAT_DTYPES_CPU = (np.dtype(np.float32), np.dtype(np.float64))
INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
REDUCTIONS = ("mean", "sum", "none")


def stat_dtype(dtype) -> np.dtype:
    """dtype of the per-channel statistics, losses and accumulators for inputs of ``dtype``:
    float64 for float64, float32 for the rest (float32; float16 and bfloat16 on the GPU)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d) for d in dtypes)


def as_host_array(name: str, value) -> np.ndarray:
    """``np.asarray(value)`` with a clear error for objects NumPy cannot take."""
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


def check_dtype(name: str, arr, allowed) -> None:
    """Raise ``TypeError`` unless ``arr.dtype`` is one of ``allowed``."""
    if np.dtype(arr.dtype) not in allowed:
        raise TypeError(f"{name} must have dtype {_dtype_names(allowed)}, got {arr.dtype}")


def check_shape(name: str, arr, shape: tuple) -> None:
    """Raise ``ValueError`` unless ``arr.shape == shape``."""
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def check_ndim(name: str, arr, min_ndim: int, what: str) -> None:
    """Raise ``ValueError`` unless ``arr.ndim >= min_ndim``; ``what`` describes the layout."""
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must be {what} (at least {min_ndim}-D), "
                         f"got shape {tuple(arr.shape)}")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {reduction!r}")
    return reduction


def check_real(name: str, value, *, low=None, high=None, low_open=False) -> float:
    """A finite Python float in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if type(value) is not float and (isinstance(value, bool)
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def check_int(name: str, value) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


def check_out(name: str, out, *, shape: tuple, dtype, forbid_alias=()) -> None:
    """Check a caller-provided output array: shape, dtype, writeable, not aliasing inputs.

    ``forbid_alias`` holds ``(argument name, array)`` pairs that ``out`` must not overlap.
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    check_shape(name, out, shape)
    if out.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    check_writeable(name, out)
    for other_name, other in forbid_alias:
        if other is not None and np.shares_memory(out, other):
            raise ValueError(f"{name} must not share memory with {other_name}")


def check_writeable(name: str, arr) -> None:
    if isinstance(arr, np.ndarray) and not arr.flags.writeable:
        raise ValueError(f"{name} must be writeable")
