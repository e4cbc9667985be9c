"""Softmax cross-entropy, forward and backward, fused: the public API (``docs/api.md``).

This module validates arguments, then dispatches by device to the backend with the same
function names (``fusedgrad.cpu.cross_entropy`` for host arrays, ``fusedgrad.cuda.cross_entropy``
for arrays exposing ``__cuda_array_interface__``; see the CPU module's docstring for the backend
interface). Arrays are handled through the device's array interface
(``fusedgrad._device.arrays``). Every check runs before any backend kernel writes anything.

Per sample, with q = (1 - s) y + s / C the smoothed target distribution and w the class
weights (w_t: the target-class weight, 1 for probability targets)::

    loss = sum_c w_c q_c (lse - z_c) + z_loss * w_t * lse^2,      lse = log sum_c exp(z_c)
    dloss/dz_j = p_j (sum_c w_c q_c + 2 z_loss w_t lse) - w_j q_j,  p = softmax(z)

"mean" divides by the summed target-class weights of non-ignored samples (index targets) or by
the number of samples (probability targets), as ``torch.nn.functional.cross_entropy`` does
(derived in ``docs/derivations.md``, section 1(d)).

``softcap=c`` replaces every logit by ``z' = c tanh(z / c)`` first (inside the kernels' pass over
the logits, no capped copy): the formulas above then read z', lse is that of z', and the
gradient is taken with respect to the uncapped z, dloss/dz_j = dloss/dz'_j (1 - tanh^2(z_j / c))
(``docs/derivations.md``, section 1(e)).

Internal interface, for ``fusedgrad.torch``'s autograd Function (``fusedgrad._torch_ops``),
which keeps the forward's validated call for its backward: :func:`prepare` checks a call and
returns a :class:`CheckedCall`; :func:`forward_of_checked` and :func:`backward_of_checked` run
the kernels on one. ``fusedgrad.linear_cross_entropy``, whose logits never exist whole, checks
its targets and class weights with :func:`prepare_for_shape` and reduces with the call's
:meth:`CheckedCall.reduce`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _device, _options
from ._options import CrossEntropyOptions
from ._validate import (INT_DTYPES, check_bool, check_dtype, check_int, check_ndim, check_out,
                        check_real, check_reduction, check_shape, check_softcap, stat_dtype)
from ._validate import is_scalar as _is_scalar

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_forward",
           "softmax_cross_entropy_backward"]


def _backend(location: str):
    return _device.backend("cross_entropy", location)


@dataclass(frozen=True)
class CheckedCall:
    """A validated call: array interface, backend, kernel-ready arrays and the reduction's
    constants."""

    arrays: object            # fusedgrad._device.arrays of the call's device
    backend: object
    logits: object            # None where the logits never exist whole (prepare_for_shape)
    target: object            # int64 flat indices, or probabilities shaped like logits
    weights: object           # float64 (C,)
    sample_shape: tuple
    n_samples: int
    #: "mean" divides the summed losses by this, the backend's scalar (a float on the host, a
    #: one-value device array on the GPU, which so needs no synchronisation); None otherwise.
    denominator: object
    reduction: str
    options: CrossEntropyOptions
    result_dtype: np.dtype    # dtype of loss and lse

    def reduce(self, per_sample):
        """The reduced loss from the backend's per-sample float64 losses."""
        be = self.backend
        if self.reduction == "none":
            return be.sample_result(per_sample, self.sample_shape, self.result_dtype)
        return be.reduced_loss(per_sample, self.denominator, self.result_dtype)


def prepare(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, *,
            softcap=None, **other_arrays) -> CheckedCall:
    """Check the arguments common to every entry point (``other_arrays``: further array
    arguments, only for the host / device check) and prepare the kernels' arrays."""
    location = _device.array_location(logits=logits, target=target, weight=weight,
                                      **other_arrays)
    arrays = _device.arrays(location)
    logits = arrays.as_array("logits", logits)
    check_dtype("logits", logits, arrays.DTYPES)
    check_ndim("logits", logits, 2, "shaped (N, C) or (N, C, d1, ..., dk)")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class on axis 1, "
                         f"got shape {tuple(logits.shape)}")
    return prepare_for_shape(location, tuple(logits.shape), logits.dtype, target, weight,
                             ignore_index, reduction, label_smoothing, z_loss, softcap=softcap,
                             logits=logits)


def prepare_for_shape(location, logits_shape, logits_dtype, target, weight, ignore_index,
                      reduction, label_smoothing, z_loss, *, softcap=None,
                      logits=None) -> CheckedCall:
    """The checks and kernel arrays of :func:`prepare` that need only the shape and dtype of the
    logits (already checked), on ``location`` (``fusedgrad._device``'s ``HOST`` or ``DEVICE``).

    ``fusedgrad.linear_cross_entropy`` calls it with ``logits=None``: its logits exist one chunk
    of rows at a time, yet the targets, the class weights and the "mean" denominator are those
    of the whole (N, C) logits.
    """
    arrays = _device.arrays(location)
    backend = _backend(location)
    n_classes = logits_shape[1]
    sample_shape = (logits_shape[0],) + tuple(logits_shape[2:])
    n_samples = _options.sample_count(logits_shape)

    reduction = check_reduction(reduction)
    ignore_index = check_int("ignore_index", ignore_index)
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = check_real("z_loss", z_loss, low=0.0)
    softcap = check_softcap(softcap)

    target = arrays.as_array("target", target)
    if target.dtype.kind in "iu":
        check_dtype("target", target, INT_DTYPES)
        check_shape("target", target, sample_shape)
    elif target.dtype.kind == "f":
        if target.dtype != logits_dtype:
            raise TypeError(f"target holds class probabilities, so it must have the dtype of "
                            f"logits ({logits_dtype}), got {target.dtype}")
        check_shape("target", target, tuple(logits_shape))
        if ignore_index >= 0:
            # as PyTorch: a class index to ignore means nothing to probability targets, and a
            # caller passing one most likely meant class-index targets
            raise ValueError(f"ignore_index must be negative (no class is ignored) for "
                             f"probability targets, got {ignore_index}")
    else:
        int_names = " or ".join(map(str, INT_DTYPES))
        raise TypeError(f"target must be integer class indices ({int_names}) or floating "
                        f"class probabilities, got dtype {target.dtype}")
    if weight is not None:
        weight = arrays.as_array("weight", weight)
        check_dtype("weight", weight, arrays.DTYPES)
        check_shape("weight", weight, (n_classes,))
    weights = backend.class_weights(weight, n_classes)

    if target.dtype.kind != "f":
        target = backend.index_target(target)
        backend.check_index_target(target, n_classes, ignore_index)
    if reduction != "mean":
        denominator = None
    elif target.dtype.kind == "f":
        denominator = backend.count_denominator(n_samples)
    else:
        denominator = backend.target_weight_sum(target, weights, ignore_index,
                                                unit_weights=weight is None)
    options = CrossEntropyOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                  z_loss=z_loss, softcap=softcap)
    result_dtype = stat_dtype(logits_dtype)
    return CheckedCall(arrays, backend, logits, target, weights, sample_shape, n_samples,
                       denominator, reduction, options, result_dtype)


def _gradient_buffer(call: CheckedCall, original_logits, out, inplace, *, forbid_alias=()):
    """The array the gradient goes to: ``out``, the logits themselves, or a new one."""
    arrays = call.arrays
    if out is not None and inplace:
        raise ValueError("out and inplace=True are mutually exclusive: give one of them")
    if inplace:
        if call.logits is not original_logits:
            raise TypeError("inplace=True needs logits to be an array of the backend "
                            f"(got {type(original_logits).__name__}), so the gradient can be "
                            "written over it")
        if not arrays.is_writeable(call.logits):
            raise ValueError("inplace=True needs logits to be writeable")
        for other_name, other in forbid_alias:
            # the kernels would overwrite an input they are still reading
            if other is not None and arrays.shares_memory(call.logits, other):
                raise ValueError(f"inplace=True writes the gradient over logits, so {other_name} "
                                 "must not share memory with logits")
        return call.logits
    if out is None:
        return arrays.empty_like(call.logits)
    out_array = arrays.as_array("out", out)
    if out_array is not out:
        raise TypeError(f"out must be an array of the backend, got {type(out).__name__}")
    check_out(arrays, "out", out_array, shape=tuple(call.logits.shape), dtype=call.logits.dtype,
              dtype_of="logits",
              forbid_alias=(("logits (use inplace=True to overwrite logits)", call.logits),)
              + tuple(forbid_alias))
    return out_array


def softmax_cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, z_loss=0.0, softcap=None, out=None,
                          inplace=False):
    """Loss and its gradient in one fused pass: ``(loss, grad)``.

    ``logits`` (N, C) or (N, C, d1, ..., dk), float32/float64 on the CPU; ``target`` class
    indices (N, d1, ..., dk) int32/int64 (or ``ignore_index``) or probabilities shaped like
    ``logits``; ``weight`` (C,). ``loss`` is a 0-d array for "mean"/"sum" (float64 for float64
    logits, else float32), per-sample for "none". ``grad`` = d(loss)/d(logits) (of the summed
    per-sample losses for "none"), shaped like ``logits``; written into ``out`` or, with
    ``inplace=True``, over ``logits`` (no allocation of that size). ``softcap`` (``None`` or a
    float > 0): the logits are capped as ``softcap * tanh(logits / softcap)`` in the same pass;
    ``grad`` is still with respect to the uncapped ``logits``.
    """
    call = prepare(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap=softcap, out=out)
    forbid = (("target", call.target), ("weight", weight))
    grad = _gradient_buffer(call, logits, out, check_bool("inplace", inplace), forbid_alias=forbid)
    be = call.backend
    scale = be.sample_scale(None, call.denominator, call.n_samples)
    per_sample = be.fused(call.logits, call.target, call.weights, grad, scale, call.options)
    return call.reduce(per_sample), grad


def softmax_cross_entropy_forward(logits, target, *, weight=None, ignore_index=-100,
                                  reduction="mean", label_smoothing=0.0, z_loss=0.0,
                                  softcap=None):
    """``(loss, lse)``: the loss as in :func:`softmax_cross_entropy` and the per-sample
    log-sum-exp (shaped like the "none" loss; of the capped logits with ``softcap``), the only
    thing backward needs saved."""
    return forward_of_checked(prepare(logits, target, weight, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap=softcap))


def forward_of_checked(call: CheckedCall, *, lse_dtype=None):
    """``(loss, lse)`` of a validated call (internal interface: ``fusedgrad.torch``'s autograd
    Function keeps the call for its backward, and the float64 lse the kernels form, where the
    API returns it rounded to ``result_dtype``: see ``cpu.cross_entropy.lse_rounding_factor``).
    """
    per_sample, lse = call.backend.forward(call.logits, call.target, call.weights,
                                           call.options)
    lse = call.backend.sample_result(lse, call.sample_shape, lse_dtype or call.result_dtype)
    return call.reduce(per_sample), lse


def softmax_cross_entropy_backward(grad_loss, logits, target, lse, *, weight=None,
                                   ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   z_loss=0.0, softcap=None, out=None, inplace=False):
    """``grad_loss * d(loss)/d(logits)`` from the saved ``lse`` (one exp per element, and one
    tanh with ``softcap``).

    ``grad_loss``: a scalar for "mean"/"sum", an array shaped like the loss for "none". The
    options, ``softcap`` included, must be those of the forward.
    """
    check_grad_loss_type(grad_loss)
    call = prepare(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap=softcap, lse=lse,
                   grad_loss=None if _is_scalar(grad_loss) else grad_loss, out=out)
    lse_array = call.arrays.as_array("lse", lse)
    check_shape("lse", lse_array, call.sample_shape)
    if lse_array.dtype.kind != "f":
        raise TypeError(f"lse must be a floating array, got dtype {lse_array.dtype}")
    grad_loss = check_grad_loss(call.arrays, grad_loss, call.reduction, call.sample_shape,
                                scalar_for_none=False)
    forbid = (("target", call.target), ("weight", weight), ("lse", lse_array))
    if not _is_scalar(grad_loss):
        forbid += (("grad_loss", grad_loss),)
    grad = _gradient_buffer(call, logits, out, check_bool("inplace", inplace), forbid_alias=forbid)
    return backward_of_checked(call, grad_loss, lse_array, grad)


def check_grad_loss_type(grad_loss) -> None:
    """Raise ``TypeError`` unless ``grad_loss`` is a real number, a 0-d array of one, or
    array-like (its shape and dtype are checked by :func:`check_grad_loss`, once the call's
    reduction and sample shape are known)."""
    if _is_scalar(grad_loss):
        kind = np.dtype(getattr(grad_loss, "dtype", np.float64)).kind
        if kind not in "fiu":
            raise TypeError(f"grad_loss must be a real number, got dtype {grad_loss.dtype}")
    elif not (hasattr(grad_loss, "shape") or isinstance(grad_loss, (list, tuple))):
        raise TypeError(f"grad_loss must be a real number or a floating array, got "
                        f"{type(grad_loss).__name__}")


def check_grad_loss(arrays, grad_loss, reduction: str, sample_shape: tuple, *,
                    scalar_for_none: bool):
    """A ``grad_loss`` that :func:`check_grad_loss_type` passed, as the backends' scale takes
    it: a real number (or 0-d array) for "mean" and "sum", an array of ``arrays`` shaped like
    the per-sample loss (``sample_shape``) and of a floating dtype for "none" (or a number
    there too with ``scalar_for_none``, which scales every sample alike)."""
    if _is_scalar(grad_loss):
        if reduction == "none" and not scalar_for_none:
            raise ValueError(f"grad_loss must be an array of shape {sample_shape} for "
                             "reduction='none', got a scalar")
        return grad_loss
    if reduction != "none":
        raise ValueError(f"grad_loss must be a scalar (or 0-d array) for reduction="
                         f"{reduction!r}, got shape {tuple(np.shape(grad_loss))}")
    grad_loss = arrays.as_array("grad_loss", grad_loss)
    check_shape("grad_loss", grad_loss, sample_shape)
    if grad_loss.dtype.kind != "f":
        raise TypeError(f"grad_loss must be floating, got dtype {grad_loss.dtype}")
    return grad_loss


def backward_of_checked(call: CheckedCall, grad_loss, lse, grad):
    """Write ``grad_loss * d(loss)/d(logits)`` of a validated call into ``grad`` and return it.

    ``fusedgrad.torch``'s autograd Function calls this with the call its forward validated
    (internal interface): autograd hands back an upstream gradient shaped like the loss and the
    ``lse`` that forward returned, so nothing needs checking again (the target scan and the
    "mean" denominator are not recomputed).
    """
    be = call.backend
    scale = be.sample_scale(grad_loss, call.denominator, call.n_samples)
    lse_rows = be.per_sample(lse, call.n_samples)
    be.backward(call.logits, call.target, call.weights, lse_rows, grad, scale, call.options)
    return grad

