"""Batch normalization forward and backward: the public API (``docs/api.md``).

Validates every argument (before anything is written), views the arrays in the backends'
kernel layout ``(P, C, S)`` without copying, and dispatches by device: host arrays to
``fusedgrad.cpu.batch_norm``, CUDA-array-interface objects to ``fusedgrad.cuda.batch_norm``
(imported only then). Arrays are handled through the device's array interface
(``fusedgrad._device.arrays``), so the checks are the same on both devices. The math, per
channel over its m reduced values (derived in ``docs/derivations.md``, section 2):

    mean = sum x / m,   var = sum (x - mean)^2 / m,   invstd = 1 / sqrt(var + eps)
    y    = (x - mean) invstd weight + bias
    dbias = sum dy,   dweight = sum dy xhat,   xhat = (x - mean) invstd
    dx   = weight invstd / m (m dy - dbias - xhat dweight)          (training)
    dx   = weight invstd dy                                       (eval: statistics are constants)

Layouts: the channel axis may be any axis (``fusedgrad._layout``). On the CPU the arrays are
viewed as ``(P, C, S)`` or, for channels-last memory, ``(P*S, C, 1)``, and outputs take x's
memory layout (``_layout``'s host functions); on the GPU the kernels take any strides, so the
arrays are viewed as ``(P, C, S)`` as they are (``fusedgrad.cuda._arrays.view3``).

Internal interface: :func:`backward_of_checked`, the backward of ``fusedgrad.torch``'s autograd
Function (``fusedgrad._torch_ops``), whose arguments a checked forward produced.
"""
from __future__ import annotations

import math

import numpy as np

from . import _device
from ._layout import channel_axis as _channel_axis
from ._layout import host_empty, host_layout, host_like, host_view
from ._validate import (check_bool, check_dtype, check_ndim, check_out, check_real,
                        check_shape, check_writeable, check_written_in_place)

__all__ = ["batch_norm_forward", "batch_norm_backward"]


def _backend(location: str):
    return _device.backend("batch_norm", location)


def _as_array(arrays, name: str, value):
    """``arrays.as_array`` of an optional argument (``None`` stays ``None``)."""
    return None if value is None else arrays.as_array(name, value)


def _as_written(arrays, name: str, value):
    """:func:`_as_array` of an argument the call writes in place: it must already be an array
    of its device (``TypeError`` for a list, say, whose converted copy would be written and
    lost)."""
    arr = _as_array(arrays, name, value)
    if arr is not None and arrays is _device.arrays(_device.HOST):
        check_written_in_place(name, value, arr)
    return arr


def _check_vector(arrays, name: str, vec, n_channels: int) -> None:
    """An optional (C,) parameter: ``None``, or a float vector of the device's dtypes."""
    if vec is None:
        return
    check_dtype(name, vec, arrays.DTYPES)
    check_shape(name, vec, (n_channels,))


def _check_x(arrays, x, channel_axis):
    check_ndim("x", x, 2, "an array with channels on channel_axis")
    check_dtype("x", x, arrays.DTYPES)
    axis = _channel_axis(channel_axis, x.ndim)
    return axis, int(x.shape[axis])


def _check_like_x(name: str, arr, x) -> None:
    """``arr`` must have ``x``'s shape (``ValueError``) and dtype (``TypeError``)."""
    check_shape(name, arr, tuple(x.shape))
    if np.dtype(arr.dtype) != np.dtype(x.dtype):
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {arr.dtype}")


def _check_running(arrays, name, buf, n_channels, *, written: bool) -> None:
    _check_vector(arrays, name, buf, n_channels)
    if written and buf is not None:
        check_writeable(arrays, name, buf)


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, channel_axis=1, out=None,
                       relu=False):
    """Normalise ``x`` per channel; returns ``(y, mean, invstd)`` (see ``docs/api.md``).

    x: float32/float64 array, ndim >= 2, channels on ``channel_axis``; weight, bias,
    running_mean, running_var: (C,) or None. Training: batch statistics, running buffers
    updated in place (momentum, unbiased variance); fewer than 2 values per channel raises
    ValueError. Eval: running statistics (both required). ``out``: optional array for y.
    Returns y (x's shape and dtype), mean and invstd (C,) (float64 for float64 x, else float32).

    ``relu=True`` (an addition to the contract; host and device arrays): y = max(BN(x), 0), a
    batch norm followed by a ReLU in one pass over memory (NaN stays NaN, as in ``torch.relu``).
    Pass this y as ``relu_output`` to :func:`batch_norm_backward`.
    """
    location = _device.array_location(x=x, weight=weight, bias=bias, running_mean=running_mean,
                                      running_var=running_var, out=out)
    backend = _backend(location)
    arrays = _device.arrays(location)
    x = arrays.as_array("x", x)
    weight, bias = _as_array(arrays, "weight", weight), _as_array(arrays, "bias", bias)
    written = _as_written if training else _as_array
    running_mean = written(arrays, "running_mean", running_mean)
    running_var = written(arrays, "running_var", running_var)
    out = _as_written(arrays, "out", out)

    axis, n_channels = _check_x(arrays, x, channel_axis)
    training = check_bool("training", training)
    relu = check_bool("relu", relu)
    momentum = check_real("momentum", momentum)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    _check_vector(arrays, "weight", weight, n_channels)
    _check_vector(arrays, "bias", bias, n_channels)
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
        check_out(arrays, "out", out, shape=tuple(x.shape), dtype=x.dtype, dtype_of="x",
                  forbid_alias=(("x", x), ("weight", weight), ("bias", bias),
                                ("running_mean", running_mean), ("running_var", running_var)))

    kwargs = dict(training=training, momentum=momentum, eps=eps)
    if location == _device.HOST:
        x, channels_last = host_layout(x, axis)
        y = out if out is not None else host_empty(x, axis, channels_last)
        y_kernel = host_like(x, axis, channels_last, y)
        mean, invstd = backend.forward(host_view(x, axis, channels_last), weight, bias,
                                       running_mean, running_var,
                                       host_view(y_kernel, axis, channels_last), relu=relu,
                                       **kwargs)
        if y_kernel is not y:
            np.copyto(y, y_kernel)
        return y, mean, invstd

    y = out if out is not None else arrays.empty(tuple(x.shape), x.dtype)
    mean, invstd = backend.forward(arrays.view3("x", x, axis), weight, bias, running_mean,
                                   running_var, arrays.view3("out", y, axis), relu=relu,
                                   **kwargs)
    return y, mean, invstd


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, channel_axis=1,
                        out=None, relu_output=None):
    """Gradients of :func:`batch_norm_forward`; returns ``(dx, dweight, dbias)``.

    dy, x: same shape and dtype (float32/float64); mean, invstd: (C,) as returned by the
    forward; weight: (C,) or None. ``out``: optional array for dx. dweight = sum dy xhat and
    dbias = sum dy are (C,) (float64 for float64 x, else float32); dx has x's shape and dtype.

    ``relu_output`` (an addition to the contract; host and device arrays): the y of a forward with
    ``relu=True``. dy is then the gradient of that ReLU's output, and the ReLU's backward
    (dy where ``relu_output > 0``, else 0) is fused in: every formula above uses that masked
    dy.
    """
    location = _device.array_location(dy=dy, x=x, mean=mean, invstd=invstd, weight=weight,
                                      out=out, relu_output=relu_output)
    backend = _backend(location)
    arrays = _device.arrays(location)
    dy, x = arrays.as_array("dy", dy), arrays.as_array("x", x)
    mean, invstd = _as_array(arrays, "mean", mean), _as_array(arrays, "invstd", invstd)
    weight, out = _as_array(arrays, "weight", weight), _as_written(arrays, "out", out)
    relu_output = _as_array(arrays, "relu_output", relu_output)

    axis, n_channels = _check_x(arrays, x, channel_axis)
    _check_like_x("dy", dy, x)
    if relu_output is not None:
        _check_like_x("relu_output", relu_output, x)
    training = check_bool("training", training)
    for name, vec in (("mean", mean), ("invstd", invstd)):
        if vec is None:
            raise TypeError(f"{name} must be a ({n_channels},) array, got None")
        _check_vector(arrays, name, vec, n_channels)
    _check_vector(arrays, "weight", weight, n_channels)
    if out is not None:
        check_out(arrays, "out", out, shape=tuple(x.shape), dtype=x.dtype, dtype_of="x",
                  forbid_alias=(("dy", dy), ("x", x), ("mean", mean), ("invstd", invstd),
                                ("weight", weight), ("relu_output", relu_output)))

    return _run_backward(location, backend, arrays, dy, x, mean, invstd, weight, out, axis,
                         training, relu_output)


def backward_of_checked(dy, x, mean, invstd, weight, *, training, channel_axis,
                        relu_output=None):
    """:func:`batch_norm_backward` without the argument checks (internal interface), for
    callers whose arguments are consistent by construction: ``fusedgrad.torch``'s autograd
    Function passes the ``x``, ``weight``, ``mean`` and ``invstd`` of a forward that
    :func:`batch_norm_forward` checked, and the upstream gradient autograd hands over, which has
    the output's shape and dtype. (Checking them again cost more than the kernel on a small
    layer.)"""
    location = _device.HOST if type(x) is np.ndarray else _device.DEVICE
    backend = _backend(location)
    arrays = _device.arrays(location)
    if location == _device.DEVICE:
        dy, x = arrays.as_array("dy", dy), arrays.as_array("x", x)
        mean, invstd = arrays.as_array("mean", mean), arrays.as_array("invstd", invstd)
        weight = _as_array(arrays, "weight", weight)
        relu_output = _as_array(arrays, "relu_output", relu_output)
    return _run_backward(location, backend, arrays, dy, x, mean, invstd, weight, None,
                         channel_axis % x.ndim, training, relu_output)


def _run_backward(location, backend, arrays, dy, x, mean, invstd, weight, out, axis, training,
                  relu_output=None):
    """The backward on checked arguments, already arrays of ``arrays``; ``axis`` in
    [0, ndim); ``relu_output`` fuses a ReLU's backward."""
    if location == _device.HOST:
        x, channels_last = host_layout(x, axis)
        dy = host_like(x, axis, channels_last, dy)
        dx = out if out is not None else host_empty(x, axis, channels_last)
        dx_kernel = host_like(x, axis, channels_last, dx)
        relu_kernel = None if relu_output is None else host_view(
            host_like(x, axis, channels_last, relu_output), axis, channels_last)
        dweight, dbias = backend.backward(
            host_view(dy, axis, channels_last), host_view(x, axis, channels_last), mean,
            invstd, weight, host_view(dx_kernel, axis, channels_last), training=training,
            relu_output3=relu_kernel)
        if dx_kernel is not dx:
            np.copyto(dx, dx_kernel)
        return dx, dweight, dbias

    dx = out if out is not None else arrays.empty(tuple(x.shape), x.dtype)
    dweight, dbias = backend.backward(
        arrays.view3("dy", dy, axis), arrays.view3("x", x, axis), mean, invstd, weight,
        arrays.view3("out", dx, axis), training=training,
        relu_output3=None if relu_output is None else arrays.view3("relu_output", relu_output,
                                                                   axis))
    return dx, dweight, dbias
