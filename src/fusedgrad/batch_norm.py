"""Batch normalization forward and backward: the public API (``shared/API.md``).

Validates every argument (before anything is written), views the arrays in the backends'
kernel layout ``(P, C, S)`` without copying, and dispatches by device: host arrays to
``fusedgrad.cpu.batch_norm``, CUDA-array-interface objects to ``fusedgrad.cuda.batch_norm``
(imported only then). The math, per channel over its m reduced values (seed, question 2):

    mean = sum x / m,   var = sum (x - mean)^2 / m,   invstd = 1 / sqrt(var + eps)
    y    = (x - mean) invstd weight + bias
    dbias = sum dy,   dweight = sum dy xhat,   xhat = (x - mean) invstd
    dx   = weight invstd / m (m dy - dbias - xhat dweight)          (training)
    dx   = weight invstd dy                                       (eval: statistics are constants)

Layouts: the channel axis may be any axis (1 for ``(N, C)``, ``(N, C, L)``, NCHW, NCDHW; -1 for
channels-last). On the CPU a C-contiguous array is viewed as ``(P, C, S)``; an array whose memory
is channels-last (e.g. a PyTorch ``channels_last`` tensor seen as NCHW) is viewed as
``(P*S, C, 1)`` and its output is allocated with the same memory layout; any other strides are
copied once to a contiguous array.
"""
from __future__ import annotations

import math

import numpy as np

from . import _device
from ._validate import (as_host_array, check_dtype, check_int, check_ndim,
                        check_out, check_real, check_shape, check_writeable)


def _backend(location: str):
    return _device.backend("batch_norm", location)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _channel_axis(channel_axis, ndim: int) -> int:
    axis = check_int("channel_axis", channel_axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel_axis must be in [{-ndim}, {ndim}) for a {ndim}-D x, "
                         f"got {channel_axis}")
    return axis % ndim


class _Arrays:
    """The call's arrays on one device, with device-specific wrapping and validation."""

    def __init__(self, location: str, backend):
        self.location = location
        self.float_dtypes = backend.DTYPES

    def wrap(self, name: str, value):
        if value is None:
            return None
        if self.location == _device.HOST:
            return as_host_array(name, value)
        from .cuda import _arrays
        return _arrays.as_device(name, value)

    def check_vector(self, name: str, vec, n_channels: int) -> None:
        if vec is None:
            return
        check_dtype(name, vec, self.float_dtypes)
        check_shape(name, vec, (n_channels,))

    def check_out(self, out, shape, dtype, inputs) -> None:
        if self.location == _device.HOST:
            check_out("out", out, shape=shape, dtype=dtype, forbid_alias=inputs)
            return
        check_shape("out", out, shape)
        if np.dtype(out.dtype) != np.dtype(dtype):
            raise TypeError(f"out must have dtype {np.dtype(dtype)}, got {out.dtype}")


def _host_view(arr: np.ndarray, axis: int, channels_last: bool) -> np.ndarray:
    """``arr`` as the CPU kernel layout: (P, C, S), or (P*S, C, 1) for channels-last memory."""
    n_outer, n_inner = math.prod(arr.shape[:axis]), math.prod(arr.shape[axis + 1:])
    if channels_last:
        return np.moveaxis(arr, axis, -1).reshape(n_outer * n_inner, arr.shape[axis], 1)
    return arr.reshape(n_outer, arr.shape[axis], n_inner)


def _is_channels_last(arr: np.ndarray, axis: int) -> bool:
    return (axis != arr.ndim - 1 and not arr.flags.c_contiguous
            and np.moveaxis(arr, axis, -1).flags.c_contiguous)


def _host_layout(x: np.ndarray, axis: int):
    """(x made contiguous if its strides fit neither layout, whether it is channels-last)."""
    if x.flags.c_contiguous:
        return x, False
    if _is_channels_last(x, axis):
        return x, True
    return np.ascontiguousarray(x), False


def _host_like(x: np.ndarray, axis: int, channels_last: bool, arr: np.ndarray) -> np.ndarray:
    """``arr`` (x's shape) in x's memory layout: itself when it already is, else a copy."""
    if channels_last == _is_channels_last(arr, axis) and (channels_last or arr.flags.c_contiguous):
        return arr
    if not channels_last:
        return np.ascontiguousarray(arr)
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(arr, axis, -1)), -1, axis)


def _host_empty(backend, x: np.ndarray, axis: int, channels_last: bool) -> np.ndarray:
    """An output of x's shape in x's memory layout, from ``backend.empty``: large outputs then
    reuse released buffers instead of fresh pages the OS must zero on first write (that
    zeroing cost as much as a whole pass over the data)."""
    if channels_last:
        return np.moveaxis(backend.empty(np.moveaxis(x, axis, -1).shape, x.dtype), -1, axis)
    return backend.empty(x.shape, x.dtype)


def _check_x(arrays: _Arrays, x, channel_axis):
    check_ndim("x", x, 2, "an array with channels on channel_axis")
    check_dtype("x", x, arrays.float_dtypes)
    axis = _channel_axis(channel_axis, x.ndim)
    return axis, int(x.shape[axis])


def _check_like_x(name: str, arr, x) -> None:
    """``arr`` must have ``x``'s shape (``ValueError``) and dtype (``TypeError``)."""
    check_shape(name, arr, tuple(x.shape))
    if np.dtype(arr.dtype) != np.dtype(x.dtype):
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {arr.dtype}")


def _check_running(arrays, name, buf, n_channels, *, written: bool) -> None:
    arrays.check_vector(name, buf, n_channels)
    if written and arrays.location == _device.HOST:
        check_writeable(name, buf)


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, channel_axis=1, out=None,
                       relu=False):
    """Normalise ``x`` per channel; returns ``(y, mean, invstd)`` (see ``shared/API.md``).

    x: float32/float64 array, ndim >= 2, channels on ``channel_axis``; weight, bias,
    running_mean, running_var: (C,) or None. Training: batch statistics, running buffers
    updated in place (momentum, unbiased variance); fewer than 2 values per channel raises
    ValueError. Eval: running statistics (both required). ``out``: optional array for y.
    Returns y (x's shape and dtype), mean and invstd (C,) (float64 for float64 x, else float32).

    ``relu=True`` (an addition to the contract; host arrays only): y = max(BN(x), 0), a batch
    norm followed by a ReLU in one pass over memory (NaN stays NaN, as in ``torch.relu``).
    Pass this y as ``relu_output`` to :func:`batch_norm_backward`.
    """
    location = _device.array_location(x=x, weight=weight, bias=bias, running_mean=running_mean,
                                      running_var=running_var, out=out)
    backend = _backend(location)
    arrays = _Arrays(location, backend)
    x = arrays.wrap("x", x)
    weight, bias = arrays.wrap("weight", weight), arrays.wrap("bias", bias)
    running_mean = arrays.wrap("running_mean", running_mean)
    running_var = arrays.wrap("running_var", running_var)
    out = arrays.wrap("out", out)

    axis, n_channels = _check_x(arrays, x, channel_axis)
    training = _check_bool("training", training)
    relu = _check_bool("relu", relu)
    if relu and location != _device.HOST:
        raise NotImplementedError("relu=True (the fused ReLU) runs on the CPU kernels only; on "
                                  "the GPU apply the ReLU separately")
    momentum = check_real("momentum", momentum)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    arrays.check_vector("weight", weight, n_channels)
    arrays.check_vector("bias", bias, n_channels)
    _check_running(arrays, "running_mean", running_mean, n_channels, written=training)
    _check_running(arrays, "running_var", running_var, n_channels, written=training)
    if training:
        per_channel = math.prod(x.shape) // n_channels if n_channels else 0
        if per_channel < 2:
            raise ValueError(f"x must have at least 2 values per channel in training, got "
                             f"{per_channel} (shape {tuple(x.shape)}, channel_axis "
                             f"{channel_axis})")
    elif running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise ValueError(f"{missing} is required when training=False")
    if out is not None:
        arrays.check_out(out, tuple(x.shape), x.dtype,
                         (("x", x), ("weight", weight), ("bias", bias),
                          ("running_mean", running_mean), ("running_var", running_var)))

    kwargs = dict(training=training, momentum=momentum, eps=eps)
    if location == _device.HOST:
        x, channels_last = _host_layout(x, axis)
        y = out if out is not None else _host_empty(backend, x, axis, channels_last)
        y_kernel = _host_like(x, axis, channels_last, y)
        mean, invstd = backend.forward(_host_view(x, axis, channels_last), weight, bias,
                                       running_mean, running_var,
                                       _host_view(y_kernel, axis, channels_last), relu=relu,
                                       **kwargs)
        if y_kernel is not y:
            np.copyto(y, y_kernel)
        return y, mean, invstd

    from .cuda import _arrays as device_arrays
    y = out if out is not None else backend.empty(tuple(x.shape), x.dtype)
    mean, invstd = backend.forward(device_arrays.view3("x", x, axis), weight, bias, running_mean,
                                   running_var, device_arrays.view3("out", y, axis), **kwargs)
    return y, mean, invstd


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, channel_axis=1,
                        out=None, relu_output=None):
    """Gradients of :func:`batch_norm_forward`; returns ``(dx, dweight, dbias)``.

    dy, x: same shape and dtype (float32/float64); mean, invstd: (C,) as returned by the
    forward; weight: (C,) or None. ``out``: optional array for dx. dweight = sum dy xhat and
    dbias = sum dy are (C,) (float64 for float64 x, else float32); dx has x's shape and dtype.

    ``relu_output`` (an addition to the contract; host arrays only): the y of a forward with
    ``relu=True``. dy is then the gradient of that ReLU's output, and the ReLU's backward
    (dy where ``relu_output > 0``, else 0) is fused in: every formula above uses that masked
    dy.
    """
    location = _device.array_location(dy=dy, x=x, mean=mean, invstd=invstd, weight=weight,
                                      out=out, relu_output=relu_output)
    backend = _backend(location)
    arrays = _Arrays(location, backend)
    dy, x = arrays.wrap("dy", dy), arrays.wrap("x", x)
    mean, invstd = arrays.wrap("mean", mean), arrays.wrap("invstd", invstd)
    weight, out = arrays.wrap("weight", weight), arrays.wrap("out", out)
    relu_output = arrays.wrap("relu_output", relu_output)

    axis, n_channels = _check_x(arrays, x, channel_axis)
    _check_like_x("dy", dy, x)
    if relu_output is not None:
        _check_like_x("relu_output", relu_output, x)
    if relu_output is not None and location != _device.HOST:
        raise NotImplementedError("relu_output (the fused ReLU) runs on the CPU kernels only")
    training = _check_bool("training", training)
    for name, vec in (("mean", mean), ("invstd", invstd)):
        if vec is None:
            raise TypeError(f"{name} must be a ({n_channels},) array, got None")
        arrays.check_vector(name, vec, n_channels)
    arrays.check_vector("weight", weight, n_channels)
    if out is not None:
        arrays.check_out(out, tuple(x.shape), x.dtype,
                         (("dy", dy), ("x", x), ("mean", mean), ("invstd", invstd),
                          ("weight", weight), ("relu_output", relu_output)))

    return _run_backward(location, backend, dy, x, mean, invstd, weight, out, axis, training,
                         relu_output)


def _backward_of_checked(dy, x, mean, invstd, weight, *, training, channel_axis,
                         relu_output=None):
    """:func:`batch_norm_backward` without the argument checks, for callers whose arguments are
    consistent by construction: ``fusedgrad.torch`` passes the ``x``, ``weight``, ``mean`` and
    ``invstd`` of a forward that :func:`batch_norm_forward` checked, and the upstream gradient
    autograd hands over, which has the output's shape and dtype. (Checking them again cost more
    than the kernel on a small layer.)"""
    location = _device.HOST if type(x) is np.ndarray else _device.DEVICE
    backend = _backend(location)
    if location == _device.DEVICE:
        arrays = _Arrays(location, backend)
        dy, x = arrays.wrap("dy", dy), arrays.wrap("x", x)
        mean, invstd = arrays.wrap("mean", mean), arrays.wrap("invstd", invstd)
        weight = arrays.wrap("weight", weight)
    return _run_backward(location, backend, dy, x, mean, invstd, weight, None,
                         channel_axis % x.ndim, training, relu_output)


def _run_backward(location, backend, dy, x, mean, invstd, weight, out, axis, training,
                  relu_output=None):
    """The backward on checked, backend-wrapped arguments; ``axis`` in [0, ndim);
    ``relu_output`` (host only) fuses a ReLU's backward."""
    if location == _device.HOST:
        x, channels_last = _host_layout(x, axis)
        dy = _host_like(x, axis, channels_last, dy)
        dx = out if out is not None else _host_empty(backend, x, axis, channels_last)
        dx_kernel = _host_like(x, axis, channels_last, dx)
        relu_kernel = None if relu_output is None else _host_view(
            _host_like(x, axis, channels_last, relu_output), axis, channels_last)
        dweight, dbias = backend.backward(
            _host_view(dy, axis, channels_last), _host_view(x, axis, channels_last), mean,
            invstd, weight, _host_view(dx_kernel, axis, channels_last), training=training,
            relu_output3=relu_kernel)
        if dx_kernel is not dx:
            np.copyto(dx, dx_kernel)
        return dx, dweight, dbias

    from .cuda import _arrays as device_arrays
    dx = out if out is not None else backend.empty(tuple(x.shape), x.dtype)
    dweight, dbias = backend.backward(
        device_arrays.view3("dy", dy, axis), device_arrays.view3("x", x, axis), mean, invstd,
        weight, device_arrays.view3("out", dx, axis), training=training)
    return dx, dweight, dbias
