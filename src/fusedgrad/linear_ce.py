"""Linear layer + softmax cross-entropy, fused: a language model's loss without its logits; the
public :func:`linear_cross_entropy` (``fg.linear_cross_entropy``, ``docs/api.md``). The module
is not named after the function: importing a submodule sets the package attribute of its name,
which would then hide the function.

    Z = X W^T + b,   loss = CE(Z, target)
    X: input (N, d),  W: linear_weight (C, d),  b: linear_bias (C,),  Z: logits (N, C)

The (N, C) logits are the largest tensor of a language model's step and exist only to be
reduced, so they are formed a chunk of rows ``[r0, r1)`` at a time in one buffer, which the
cross-entropy kernel (the backend of ``fusedgrad.cross_entropy``) overwrites in place with the
chunk's gradient ``G = dloss/dZ[r0:r1]``. The three gradients follow from G by matrix products
(``docs/derivations.md``, section 3): Z_nc = sum_k X_nk W_ck + b_c, so

    dloss/dX[r0:r1] = G W                     (the chunk's rows only: written straight in)
    dloss/dW       += G^T X[r0:r1]            (every chunk adds its rows' share)
    dloss/db       += sum over the rows of G

Each row's G depends on nothing but its own logits and target, its upstream gradient and the
"mean" denominator (the summed target weights of all non-ignored rows), which is computed over
the whole batch before the loop (``fusedgrad.cross_entropy.prepare_for_shape``): so the chunked
gradients are those of the unchunked loss, for any chunk size. The per-row losses are gathered
and reduced at the end by the cross-entropy call's own :meth:`CheckedCall.reduce`.

Matrix products are the array library's (NumPy's BLAS on the host, PyTorch's or CuPy's on the
GPU) behind the device-array interface (``fusedgrad._device.arrays``: ``matmul``,
``add_to_rows``, ``column_sums``, ``copyto``), so nothing here depends on the device.

Memory beyond the inputs and the returned gradients: the chunk buffer (``chunk_rows x C``), the
temporary of accumulating ``dloss/dW`` where the library cannot add into its output (at most
half the chunk buffer, on the host at most 4 MiB, ``fusedgrad._matmul.product``), and a few
float64 values per row (the losses, the gradient scale for "none").
:func:`default_chunk_rows` keeps all of it under 1/8 of the logits' size.

Internal interface, for ``fusedgrad.torch``'s autograd Function (``fusedgrad._torch_ops``):
:func:`prepare` checks a call and returns a :class:`LinearCall`; :func:`fused_of_checked` runs
the loss and the wanted gradients in one loop, :func:`forward_of_checked` the loss and the
per-row log-sum-exp only, :func:`backward_of_checked` the gradients from that log-sum-exp
(recomputing each chunk's logits) for an upstream gradient known only then.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _device
from . import cross_entropy as _ce
from ._validate import check_dtype, check_int, check_shape, is_scalar, stat_dtype

__all__ = ["linear_cross_entropy"]

#: ``chunk_size=None``: the chunk loop's extra memory stays within 1/MEMORY_SHARE of the
#: whole (N, C) logits...
MEMORY_SHARE = 8
#: ... and a chunk's logits within about this many bytes: by then a chunk has hundreds of
#: rows, where the products are as efficient as they get (measured at N=2048, d=1024,
#: C=32000 on the 2-core Xeon: 128 rows 1.68 s, 256 rows 1.45 s, 512 rows 1.36 s), so more
#: rows would cost memory for little...
CHUNK_BYTES = 64 << 20
#: ... and never fewer rows than this (or the batch): a product with few rows reads all of W
#: for little arithmetic, and a small batch's logits are small anyway (the memory bound is
#: then exceeded: at most MIN_CHUNK_ROWS rows of logits).
MIN_CHUNK_ROWS = 32
#: Bytes per row of the batch, and per class, that a call keeps besides the chunk buffer
#: (float64 losses, log-sum-exps, gradient scales and int64 targets; float64 class weights and
#: the per-chunk results).
ROW_BYTES = 4 * 8
CLASS_BYTES = 2 * 8

#: Which gradients a call computes: (input, linear_weight, linear_bias).
ALL_GRADIENTS = (True, True, True)


def default_chunk_rows(n_rows: int, n_classes: int, itemsize: int,
                       accumulates_in_place: bool, scratch_bytes: int | None = None) -> int:
    """Rows per chunk for ``chunk_size=None``: as many as the memory bound allows, up to
    CHUNK_BYTES of logits, and at least MIN_CHUNK_ROWS (or all N rows, if fewer).

    The bound: the chunk buffer (``rows * C * itemsize``), plus, where the library cannot
    add a product into its output (``accumulates_in_place`` False: NumPy, CuPy), the weight
    gradient's temporary of at most half the buffer and at most ``scratch_bytes``
    (``fusedgrad._matmul.product``), plus ROW_BYTES per row of the batch and CLASS_BYTES per
    class, within 1/MEMORY_SHARE of the logits' N * C * itemsize.
    """
    row_bytes = n_classes * itemsize
    budget = (n_rows * row_bytes / MEMORY_SHARE - n_rows * ROW_BYTES
              - n_classes * CLASS_BYTES)
    if accumulates_in_place:
        by_memory = int(budget // row_bytes)
    else:
        # the temporary is the smaller of its two bounds: each gives a chunk that fits
        by_memory = int(budget // (row_bytes * 3 / 2))
        if scratch_bytes is not None:
            by_memory = max(by_memory, int((budget - scratch_bytes) // row_bytes))
    by_bytes = CHUNK_BYTES // max(1, row_bytes)
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, min(by_memory, by_bytes))))


@dataclass(frozen=True)
class LinearCall:
    """A validated call: the cross-entropy call of the whole (N, C) logits (targets, class
    weights, options, "mean" denominator, reduction; ``ce.logits`` is None) and the operands of
    the linear layer, as arrays of the device."""

    ce: _ce.CheckedCall
    input: object             # (N, d)
    linear_weight: object     # (C, d), the dtype of input
    linear_bias: object       # (C,) or None
    chunk_rows: int

    @property
    def arrays(self):
        return self.ce.arrays

    def chunks(self):
        """``(r0, r1)`` of each chunk, in order."""
        n_rows = self.input.shape[0]
        return [(r0, min(r0 + self.chunk_rows, n_rows))
                for r0 in range(0, n_rows, self.chunk_rows)]


def prepare(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
            label_smoothing, z_loss, softcap, chunk_size, **other_arrays) -> LinearCall:
    """Check every argument (``other_arrays``: further array arguments, only for the host /
    device check) and prepare the kernels' arrays; nothing is written."""
    location = _device.array_location(input=input, linear_weight=linear_weight, target=target,
                                      linear_bias=linear_bias, weight=weight, **other_arrays)
    arrays = _device.arrays(location)
    input = arrays.as_array("input", input)
    check_dtype("input", input, arrays.DTYPES)
    if input.ndim != 2:
        raise ValueError(f"input must be shaped (N, d), got shape {tuple(input.shape)}")
    n_rows, n_features = input.shape
    linear_weight = arrays.as_array("linear_weight", linear_weight)
    if linear_weight.ndim != 2 or linear_weight.shape[1] != n_features:
        raise ValueError(f"linear_weight must be shaped (C, d) with d = {n_features} (the last "
                         f"axis of input), got shape {tuple(linear_weight.shape)}")
    n_classes = linear_weight.shape[0]
    if n_classes < 1:
        raise ValueError("linear_weight must have at least one row (one class), got shape "
                         f"{tuple(linear_weight.shape)}")
    _check_dtype_of_input("linear_weight", linear_weight, input)
    if linear_bias is not None:
        linear_bias = arrays.as_array("linear_bias", linear_bias)
        check_shape("linear_bias", linear_bias, (n_classes,))
        _check_dtype_of_input("linear_bias", linear_bias, input)
    if weight is not None:
        weight = arrays.as_array("weight", weight)
        _check_dtype_of_input("weight", weight, input)
    target = arrays.as_array("target", target)
    if target.dtype.kind == "f":
        _check_dtype_of_input("target (class probabilities)", target, input)
    if chunk_size is None:
        chunk_rows = default_chunk_rows(
            n_rows, n_classes, input.dtype.itemsize,
            arrays.matmul_accumulates_in_place(input.dtype, stat_dtype(input.dtype)),
            arrays.MATMUL_SCRATCH_BYTES)
    else:
        chunk_rows = check_int("chunk_size", chunk_size)
        if chunk_rows < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_rows}")
    ce = _ce.prepare_for_shape(location, (n_rows, n_classes), input.dtype, target, weight,
                               ignore_index, reduction, label_smoothing, z_loss,
                               softcap=softcap)
    return LinearCall(ce, input, linear_weight, linear_bias, max(1, min(chunk_rows, n_rows)))


def _check_dtype_of_input(name: str, arr, input) -> None:
    if arr.dtype != input.dtype:
        raise TypeError(f"{name} must have the dtype of input ({input.dtype}), "
                        f"got {arr.dtype}")


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None, grad_loss=1.0, chunk_size=None):
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)`` of
    ``softmax_cross_entropy(input @ linear_weight.T + linear_bias, target, ...)``, computed a
    chunk of rows at a time: the (N, C) logits never exist whole.

    ``input`` (N, d); ``linear_weight`` (C, d); ``linear_bias`` (C,) or None; ``target`` class
    indices (N,) or probabilities (N, C); ``weight`` (C,); every floating array has the dtype
    of ``input`` (float32 or float64 on the CPU). The options are those of
    :func:`fusedgrad.softmax_cross_entropy`. ``grad_loss`` is the gradient flowing into the
    loss: a scalar, or for ``reduction="none"`` also an (N,) array; every gradient returned is
    ``grad_loss`` times that of the loss. ``grad_input`` has the dtype of ``input``;
    ``grad_linear_weight`` and ``grad_linear_bias`` (None without a bias) are accumulated over
    the chunks in float64 for float64 input and float32 otherwise. ``chunk_size``: rows per
    chunk (None: :func:`default_chunk_rows`).
    """
    _ce.check_grad_loss_type(grad_loss)
    call = prepare(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                   label_smoothing, z_loss, softcap, chunk_size,
                   grad_loss=None if is_scalar(grad_loss) else grad_loss)
    grad_loss = _ce.check_grad_loss(call.arrays, grad_loss, call.ce.reduction,
                                    call.ce.sample_shape, scalar_for_none=True)
    return fused_of_checked(call, grad_loss, ALL_GRADIENTS)


def fused_of_checked(call: LinearCall, grad_loss, wanted):
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)`` of a validated call, for
    the upstream gradient ``grad_loss``, in one loop over the chunks: logits, then the fused
    cross-entropy kernel in place (loss and G), then the products of the ``wanted`` gradients
    (``(input, linear_weight, linear_bias)`` flags; the others are None and cost nothing)."""
    ce, arrays = call.ce, call.arrays
    backend = ce.backend
    scale = backend.sample_scale(grad_loss, ce.denominator, ce.n_samples)
    per_row_loss = arrays.empty((ce.n_samples,), np.float64)
    grads = _gradient_arrays(call, wanted)
    buffer = _chunk_buffer(call)
    for r0, r1 in call.chunks():
        logits = _chunk_logits(call, buffer, r0, r1)
        with arrays.kernels_between_products():
            loss = backend.fused(logits, ce.target[r0:r1], ce.weights, logits,
                                 _rows_of(scale, r0, r1), ce.options)
        arrays.copyto(per_row_loss[r0:r1], loss)
        _add_chunk_gradients(call, logits, r0, r1, grads)
    _zero_gradients_of_empty_batch(call, buffer, grads)
    return (ce.reduce(per_row_loss), *grads)


def forward_of_checked(call: LinearCall, *, lse_dtype=None):
    """``(loss, lse)`` of a validated call: the loss and the per-row log-sum-exp of the logits
    (shaped (N,), ``lse_dtype`` or else the dtype of the loss), which
    :func:`backward_of_checked` needs; no gradient is formed."""
    ce, arrays = call.ce, call.arrays
    backend = ce.backend
    per_row_loss = arrays.empty((ce.n_samples,), np.float64)
    per_row_lse = arrays.empty((ce.n_samples,), np.float64)
    buffer = _chunk_buffer(call)
    for r0, r1 in call.chunks():
        logits = _chunk_logits(call, buffer, r0, r1)
        with arrays.kernels_between_products():
            loss, lse = backend.forward(logits, ce.target[r0:r1], ce.weights, ce.options)
        arrays.copyto(per_row_loss[r0:r1], loss)
        arrays.copyto(per_row_lse[r0:r1], lse)
    lse = backend.sample_result(per_row_lse, ce.sample_shape, lse_dtype or ce.result_dtype)
    return ce.reduce(per_row_loss), lse


def backward_of_checked(call: LinearCall, grad_loss, lse, wanted):
    """``(grad_input, grad_linear_weight, grad_linear_bias)`` of a validated call for the
    upstream gradient ``grad_loss`` (a scalar, or an (N,) array for "none"), from the ``lse``
    that :func:`forward_of_checked` returned: each chunk's logits are formed again and the
    cross-entropy backward kernel writes G over them. ``wanted`` as in
    :func:`fused_of_checked`."""
    ce = call.ce
    backend = ce.backend
    scale = backend.sample_scale(grad_loss, ce.denominator, ce.n_samples)
    lse_rows = backend.per_sample(lse, ce.n_samples)
    grads = _gradient_arrays(call, wanted)
    buffer = _chunk_buffer(call)
    for r0, r1 in call.chunks():
        logits = _chunk_logits(call, buffer, r0, r1)
        with call.arrays.kernels_between_products():
            backend.backward(logits, ce.target[r0:r1], ce.weights, lse_rows[r0:r1], logits,
                             _rows_of(scale, r0, r1), ce.options)
        _add_chunk_gradients(call, logits, r0, r1, grads)
    _zero_gradients_of_empty_batch(call, buffer, grads)
    return grads


def _gradient_arrays(call: LinearCall, wanted):
    """New ``(grad_input, grad_linear_weight, grad_linear_bias)``, None where not wanted (or no
    bias). The weight and bias gradients are sums over all chunks: float32 for half-precision
    input, so that the chunks add up in float32."""
    arrays = call.arrays
    accumulate_dtype = stat_dtype(call.input.dtype)
    want_input, want_weight, want_bias = wanted
    return (arrays.empty(call.input.shape, call.input.dtype) if want_input else None,
            arrays.empty(call.linear_weight.shape, accumulate_dtype) if want_weight else None,
            arrays.empty((call.linear_weight.shape[0],), accumulate_dtype)
            if want_bias and call.linear_bias is not None else None)


def _chunk_buffer(call: LinearCall):
    """The one (chunk_rows, C) buffer every chunk's logits, then gradient, are written to."""
    return call.arrays.empty((call.chunk_rows, call.linear_weight.shape[0]), call.input.dtype)


def _chunk_logits(call: LinearCall, buffer, r0: int, r1: int):
    """Z[r0:r1] = X[r0:r1] W^T (+ b), into the first ``r1 - r0`` rows of ``buffer``."""
    logits = buffer[:r1 - r0]
    call.arrays.matmul(call.input[r0:r1], call.linear_weight, logits, transpose_b=True)
    if call.linear_bias is not None:
        call.arrays.add_to_rows(logits, call.linear_bias)
    return logits


def _rows_of(scale, r0: int, r1: int):
    """The chunk's share of ``sample_scale``'s result: all of it when it is one value."""
    return scale if scale.shape[0] == 1 else scale[r0:r1]


def _rows(a, r0: int, r1: int):
    """Rows ``[r0, r1)`` of ``a``; ``a`` itself when that is all of it (numba-cuda cannot
    slice an empty device array: 'non-empty slice into empty slice', seen on the H200)."""
    return a if r0 == 0 and r1 == a.shape[0] else a[r0:r1]


def _add_chunk_gradients(call: LinearCall, grad_logits, r0: int, r1: int, grads) -> None:
    """The products of one chunk's G = dloss/dZ[r0:r1] (``grad_logits``): dX[r0:r1] = G W,
    dW += G^T X[r0:r1], db += column sums of G. The first chunk writes dW and db, the others
    add to them, so they need no zero-filling."""
    arrays = call.arrays
    grad_input, grad_weight, grad_bias = grads
    first = r0 == 0
    if grad_input is not None:
        arrays.matmul(grad_logits, call.linear_weight, _rows(grad_input, r0, r1))
    if grad_weight is not None:
        arrays.matmul(grad_logits, _rows(call.input, r0, r1), grad_weight, transpose_a=True,
                      accumulate=not first)
    if grad_bias is not None:
        arrays.column_sums(grad_logits, grad_bias, accumulate=not first)


def _zero_gradients_of_empty_batch(call: LinearCall, buffer, grads) -> None:
    """An empty batch has no chunk, and its weight and bias gradients are sums over no rows:
    the products of the empty buffer write those zeros (the kernels never see an empty
    chunk)."""
    if call.input.shape[0] == 0:
        _add_chunk_gradients(call, buffer[:0], 0, 0, grads)
