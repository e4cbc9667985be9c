"""Argument checks shared by the public operations.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument and what was
expected. The API modules run all checks before any kernel writes anything, so a failed call
leaves outputs and running buffers untouched. The checks of writeable and overlapping arrays
take the array interface of the call's device (``fusedgrad._device.arrays``) as ``arrays``, so
they hold on the GPU as on the host.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
REDUCTIONS = ("mean", "sum", "none")


def stat_dtype(dtype) -> np.dtype:
    """dtype of the per-channel statistics, losses and accumulators for inputs of ``dtype``:
    float64 for float64, float32 for the rest (float32; float16 and bfloat16 on the GPU)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d) for d in dtypes)


def is_scalar(value) -> bool:
    """A Python/NumPy real number or a 0-d array (host or device)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return True
    return getattr(value, "ndim", None) == 0 or getattr(value, "shape", None) == ()


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


def check_softcap(softcap) -> float | None:
    """``None`` (no logit capping) or a finite real ``> 0``, as a Python float."""
    if softcap is None:
        return None
    return check_real("softcap", softcap, low=0.0, low_open=True)


def check_bool(name: str, value) -> bool:
    """A flag: True or False (NumPy's bool too), never a truthy stand-in such as "no"."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_written_in_place(name: str, given, arr) -> None:
    """An argument written in place must be the host array itself: ``arr``, what conversion
    made of ``given``, differs for a list, say, whose converted copy would be written and lost
    (``TypeError``)."""
    if arr is not given:
        raise TypeError(f"{name} is written in place, so it must be a NumPy array, got "
                        f"{type(given).__name__}")


def check_int(name: str, value) -> int:
    """``value`` as a Python int that the kernels' int64 arguments hold."""
    if type(value) is int and -2**63 <= value < 2**63:  # the usual call, checked cheaply
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in a 64-bit signed integer, got {value}")
    return value


def check_out(arrays, name: str, out, *, shape: tuple, dtype, dtype_of=None,
              forbid_alias=()) -> None:
    """Check a caller-provided output array of the ``arrays`` interface (already its array
    type): shape (``ValueError``), dtype (``TypeError``; ``dtype_of`` names the input whose
    dtype it must have), writeable, not overlapping the inputs (``ValueError``).

    ``forbid_alias`` holds ``(what the message calls it, array)`` pairs, usually the argument's
    name, that ``out`` must not overlap; ``None`` arrays are skipped.
    """
    check_shape(name, out, shape)
    if np.dtype(out.dtype) != np.dtype(dtype):
        source = f" (that of {dtype_of})" if dtype_of else ""
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}{source}, got {out.dtype}")
    check_writeable(arrays, name, out)
    for other_name, other in forbid_alias:
        if other is not None and arrays.shares_memory(out, other):
            raise ValueError(f"{name} must not share memory with {other_name}")


def check_writeable(arrays, name: str, arr) -> None:
    """Raise ``ValueError`` if ``arr``, an array the call will write, is read-only."""
    if not arrays.is_writeable(arr):
        raise ValueError(f"{name} must be writeable")
