"""Where batch norm's channels are, and how a host array is viewed in the CPU kernel layout.

Shared by ``fusedgrad.batch_norm`` (the public API) and ``fusedgrad.distributed`` (the
split-batch building blocks), which must agree on both.

The channel axis may be any axis of an array with ``ndim >= 2`` (1 for ``(N, C)``,
``(N, C, L)``, NCHW, NCDHW; -1 for channels-last), :func:`channel_axis`. The CPU kernels take
their big arrays as ``(P, C, S)``: P the product of the axes before the channel axis, S of those
after it (:func:`host_view`). A C-contiguous array is viewed so without copying. An array whose
memory is channels-last (e.g. a PyTorch ``channels_last`` tensor seen as NCHW) is viewed as
``(P*S, C, 1)``, and its outputs are allocated in the same memory layout (:func:`host_empty`,
:func:`host_like`); any other strides are copied once to a contiguous array
(:func:`host_layout`).
"""
from __future__ import annotations

import math

import numpy as np

from ._validate import check_int
from .cpu import _arrays as host_arrays


def channel_axis(axis, ndim: int) -> int:
    """The channel axis ``axis`` of an ``ndim``-D array as an index in ``[0, ndim)``: any axis,
    negative ones counted from the end; ``TypeError`` / ``ValueError`` naming ``channel_axis``."""
    value = check_int("channel_axis", axis)
    if not -ndim <= value < ndim:
        raise ValueError(f"channel_axis must be in [{-ndim}, {ndim}) for a {ndim}-D x, "
                         f"got {axis}")
    return value % ndim


def host_view(arr: np.ndarray, axis: int, channels_last: bool) -> np.ndarray:
    """``arr`` as the CPU kernel layout: (P, C, S), or (P*S, C, 1) for channels-last memory."""
    n_outer, n_inner = math.prod(arr.shape[:axis]), math.prod(arr.shape[axis + 1:])
    if channels_last:
        return np.moveaxis(arr, axis, -1).reshape(n_outer * n_inner, arr.shape[axis], 1)
    return arr.reshape(n_outer, arr.shape[axis], n_inner)


def is_channels_last(arr: np.ndarray, axis: int) -> bool:
    """Whether ``arr``'s memory holds the channels innermost although ``axis`` is not last."""
    return (axis != arr.ndim - 1 and not arr.flags.c_contiguous
            and np.moveaxis(arr, axis, -1).flags.c_contiguous)


def host_layout(x: np.ndarray, axis: int):
    """(x made contiguous if its strides fit neither layout, whether it is channels-last)."""
    if x.flags.c_contiguous:
        return x, False
    if is_channels_last(x, axis):
        return x, True
    return np.ascontiguousarray(x), False


def host_like(x: np.ndarray, axis: int, channels_last: bool, arr: np.ndarray) -> np.ndarray:
    """``arr`` (x's shape) in x's memory layout: itself when it already is, else a copy."""
    if channels_last == is_channels_last(arr, axis) and (channels_last or arr.flags.c_contiguous):
        return arr
    if not channels_last:
        return np.ascontiguousarray(arr)
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(arr, axis, -1)), -1, axis)


def host_empty(x: np.ndarray, axis: int, channels_last: bool) -> np.ndarray:
    """An output of x's shape in x's memory layout, from the host ``empty``: large outputs then
    reuse released buffers instead of fresh pages the OS must zero on first write (that
    zeroing cost as much as a whole pass over the data)."""
    if channels_last:
        return np.moveaxis(host_arrays.empty(np.moveaxis(x, axis, -1).shape, x.dtype), -1, axis)
    return host_arrays.empty(x.shape, x.dtype)
