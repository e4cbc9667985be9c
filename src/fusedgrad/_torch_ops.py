"""The PyTorch operations behind ``fusedgrad.torch`` and ``fusedgrad.distributed``.

``fusedgrad.torch`` is the public facade (its modules, and these functional forms re-exported);
``fusedgrad.distributed`` builds ``SyncBatchNorm`` on the same pieces. Both import them from
here, so neither imports the other for them:

* the autograd Functions :class:`SoftmaxCrossEntropyFunction`,
  :class:`LinearCrossEntropyFunction` and :class:`BatchNormFunction`, and the functional forms
  :func:`softmax_cross_entropy`, :func:`linear_cross_entropy`, :func:`batch_norm` and
  :func:`batch_norm_with_relu`;
* the bookkeeping of a batch-norm module: :func:`step_options` (PyTorch's per-step logic of
  ``_BatchNorm.forward``), and :func:`meta_copy_arguments`, :func:`bias_keyword`,
  :func:`adopt_state` to replace a module by another class holding the same tensors.

How the Functions work
----------------------
Each ``forward`` calls fusedgrad's fused forward kernel and each ``backward`` the fused backward
kernel. Tensors reach the kernels without a copy (``fusedgrad._torch_arrays``): a CPU tensor as a
NumPy view of its memory, a CUDA tensor as itself, through ``__cuda_array_interface__``. Results
come back as NumPy or device arrays and are wrapped with ``torch.as_tensor``, again without a
copy. What is saved for backward is what the backward kernels need and nothing else:

- cross-entropy: the logits and target (the inputs, kept by reference, not copied) and the
  log-sum-exp of each row, so the backward pass rebuilds ``p = exp(z - lse)`` on the fly;
- linear + cross-entropy: for "mean" and "sum" the gradients themselves, formed by the forward's
  chunk loop; for "none" the inputs (by reference) and the log-sum-exp of each row, from which
  the backward forms each chunk's logits and gradient again;
- batch norm: the input and ``weight`` (by reference) and ``mean`` / ``invstd`` per channel
  (kept on ``ctx`` as the kernels returned them).

Each backward reuses the call its forward checked (``fusedgrad.cross_entropy.prepare``,
``fusedgrad.batch_norm.backward_of_checked``, the internal interfaces of the API modules) and
skips the argument checks: at the sizes of a typical model's layers that Python work cost more
than the kernels.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import batch_norm as _bn
from . import cross_entropy as _ce
from . import linear_ce as _lce
from ._torch_arrays import ChannelLayout, as_tensor, kernel_array
from ._validate import check_int, check_real, check_reduction, check_softcap


#: CPU inputs smaller than these go to PyTorch's own kernels (``F.cross_entropy``,
#: ``F.batch_norm``): there each call's fixed cost (an autograd Function, argument checks, a
#: Numba dispatch: about 80 us per cross-entropy and 140 us per batch-norm forward + backward
#: here, against 30-60 us for PyTorch's C++ path) outweighs what the fused kernels save.
#: Measured on the 2-core Xeon of docs/performance.md (forward + backward, medians of
#: interleaved rounds): batch norm broke even between 262,144 elements (0.83-0.85x) and
#: 524,288 (1.17x and more), cross-entropy between 256 rows (0.66x with 10 classes, 0.91x with
#: 1000) and 1024 (1.36x, 1.07x). Set either to 0 to always run fusedgrad's kernels.
BATCH_NORM_MIN_ELEMENTS = 1 << 19
CROSS_ENTROPY_MIN_SAMPLES = 512


def _channel_shape(tensor: torch.Tensor, ndim: int) -> tuple:
    """Shape ``(C, 1, ..., 1)`` that broadcasts a per-class vector over axis 1 of an ndim tensor."""
    return (tensor.shape[0],) + (1,) * (ndim - 2)


#: The floating dtypes of the CPU kernels (logits, batch-norm input and parameters).
CPU_FLOAT_DTYPES = (torch.float32, torch.float64)


def kernel_backward(name: str, composite_grads=None):
    """Decorate an autograd backward that runs fusedgrad's kernels, which autograd cannot see
    through (``once_differentiable``), so that differentiating it again is right or an error.

    Autograd runs a backward with grad mode on exactly when ``create_graph=True`` (a gradient
    penalty, MAML). Then ``composite_grads(ctx, *grad_outputs)`` forms the gradients instead,
    from PyTorch's differentiable operations (the function's math written with them), so that
    autograd differentiates them again; without a ``composite_grads`` that is a
    ``RuntimeError``. ``once_differentiable`` alone refuses a second differentiation only when
    an incoming gradient requires grad, and would otherwise return a gradient cut off from the
    graph: a wrong second-order result, without an error."""
    def decorate(backward):
        once = once_differentiable(backward)

        @functools.wraps(backward)
        def dispatch(ctx, *grad_outputs):
            if not torch.is_grad_enabled():
                return once(ctx, *grad_outputs)
            if composite_grads is None:
                raise RuntimeError(
                    f"{name} has no double backward: its gradient cannot be differentiated "
                    "again (create_graph=True). Use PyTorch's own function where "
                    "second-order gradients are needed.")
            return composite_grads(ctx, *grad_outputs)
        return dispatch
    return decorate


def gradients_of(composite, inputs, needs, grad_output):
    """``d(grad_output . composite(*inputs)) / d(input)`` for each input whose gradient is
    needed (None for the others), as tensors autograd can differentiate again. The inputs
    are the tensors the forward saved, the caller's own, so the graph reaches them."""
    with torch.enable_grad():
        output = composite(*inputs)
        wanted = [x for x, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True,
                                         allow_unused=True))
    return [next(grads) if need else None for need in needs]


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------
def cross_entropy_composite(logits, target, weight, reduction, options):
    """The softmax cross-entropy of the kernels written with PyTorch's differentiable
    operations (``fusedgrad.reference.softmax_cross_entropy`` in torch): the gradient's graph
    under ``create_graph=True``. ``options``: the checked call's ``CrossEntropyOptions``.
    ``F.cross_entropy`` on the capped logits, plus ``z_loss * w_t * lse^2`` per sample (w_t
    the target class's weight, 0 for an ignored sample, 1 for probability targets), "mean"
    dividing by PyTorch's denominator (the summed w_t, or the number of samples for
    probability targets)."""
    ignore_index, softcap, z_loss = options.ignore_index, options.softcap, options.z_loss
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    if not target.is_floating_point():
        target = target.long()
    per_sample = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index,
                                 reduction="none", label_smoothing=options.label_smoothing)
    if target.is_floating_point():
        valid = torch.ones_like(per_sample, dtype=torch.bool)
        sample_weight = torch.ones_like(per_sample)
    else:
        valid = target != ignore_index
        class_weight = torch.ones(z.shape[1], dtype=z.dtype, device=z.device) \
            if weight is None else weight
        sample_weight = torch.where(valid, class_weight[torch.where(valid, target, 0)], 0.0)
    if z_loss:
        # selected, not multiplied by a weight of 0: with every target ignored, "mean"
        # divides by 0, and inf * 0 would make the ignored rows' gradient NaN (it is 0)
        per_sample = per_sample + torch.where(
            valid, z_loss * sample_weight * torch.logsumexp(z, dim=1) ** 2, 0.0)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / sample_weight.sum()


def _cross_entropy_double(ctx, grad_loss):
    """:class:`SoftmaxCrossEntropyFunction`'s gradients under ``create_graph=True``."""
    logits, target, weight, _ = ctx.saved_tensors
    call = ctx.call
    grads = gradients_of(
        lambda z, y: cross_entropy_composite(z, y, weight, call.reduction, call.options),
        (logits, target), ctx.needs_input_grad[:2], grad_loss)
    return (*grads, None, None, None, None, None, None)


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """Fused softmax cross-entropy; saves the logits, the target and lse per row.

    The forward keeps the API's validated call (``fusedgrad.cross_entropy.prepare``: the
    kernel arrays, the checked targets and the "mean" denominator) for the backward, which
    therefore neither validates nor scans the targets again: at the loss sizes of a typical
    model (64 x 10) that Python work cost more than the kernels.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap):
        call = _ce.prepare(kernel_array("input", logits), kernel_array("target", target),
                           kernel_array("weight", weight), ignore_index, reduction,
                           label_smoothing, z_loss, softcap=softcap)
        # lse in float64: rounded to float32, its error (half an ulp, 0.0005 at 1e4) would
        # be a relative error of every gradient element that the backward rebuilds from it
        loss, lse = _ce.forward_of_checked(call, lse_dtype=np.float64)
        ctx.call = call
        ctx.save_for_backward(logits, target, weight, as_tensor(lse, logits.device))
        # The kernels return float32 losses for half-precision logits; F.cross_entropy returns
        # the input's dtype (a no-op cast for float32 and float64).
        return as_tensor(loss, logits.device).to(logits.dtype)

    @staticmethod
    @kernel_backward("fusedgrad.torch.softmax_cross_entropy", _cross_entropy_double)
    def backward(ctx, grad_loss):
        # Unpacking the saved tensors checks that none was modified in place since forward.
        logits, target, weight, lse = ctx.saved_tensors
        call = ctx.call
        arrays = call.arrays
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            if call.reduction == "none":
                # Autograd may hand over an expanded (stride-0) or half-precision gradient.
                upstream = arrays.as_array("grad_output", kernel_array(
                    "grad_output", grad_loss.to(lse.dtype).contiguous()))
            elif grad_loss.is_cuda:
                # one value that the kernels read on the device: float() would wait for it
                upstream = arrays.as_array("grad_output", kernel_array(
                    "grad_output", grad_loss.to(lse.dtype).reshape(1)))
            else:
                upstream = float(grad_loss)
            grad = _ce.backward_of_checked(call, upstream,
                                           arrays.as_array("lse", kernel_array("lse", lse)),
                                           arrays.empty_like(call.logits))
            grad_logits = as_tensor(grad, logits.device)
        if ctx.needs_input_grad[1]:
            grad_target = _probability_target_grad(grad_loss, logits, weight, lse,
                                                   call.reduction,
                                                   call.options.label_smoothing,
                                                   call.options.softcap)
        return grad_logits, grad_target, None, None, None, None, None, None


def _probability_target_grad(grad_loss, logits, weight, lse, reduction, label_smoothing,
                             softcap):
    """d(loss)/d(target) for probability targets (PyTorch differentiates these too).

    Each sample's loss is sum_c w_c q_c (lse - z_c) with q = (1 - s) y + s / C, so
    d loss / d y_c = (1 - s) w_c (lse - z_c) = -(1 - s) w_c log p_c; the z_loss term does not
    depend on y. With a ``softcap`` c, z_c is the capped logit c tanh(z_c / c) (lse is
    already that of the capped logits). The reduction scales it by the upstream gradient,
    divided by the number of samples for "mean".
    """
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    neg_log_p = lse.unsqueeze(1).to(logits.dtype) - logits
    grad = (1.0 - label_smoothing) * neg_log_p
    if weight is not None:
        grad = grad * weight.reshape(_channel_shape(weight, logits.dim()))
    if reduction == "none":
        return grad * grad_loss.unsqueeze(1)
    scale = grad_loss / lse.numel() if reduction == "mean" else grad_loss
    return grad * scale


def softmax_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, *, z_loss=0.0, softcap=None):
    """Softmax cross-entropy with fused forward and backward kernels; autograd-aware.

    Same arguments and semantics as ``torch.nn.functional.cross_entropy`` (without its
    deprecated ``size_average`` / ``reduce``): ``input`` (N, C), (N, C, d1, ..., dk) or
    unbatched (C,); ``target`` class indices (N, d1, ..., dk) (int64 or int32) or class
    probabilities shaped like ``input``; ``weight`` (C,); ``reduction`` "mean" | "sum" |
    "none"; ``label_smoothing`` in [0, 1]. ``z_loss`` adds PaLM's ``z_loss * lse**2`` per
    sample and ``softcap`` (``None`` or a float > 0) caps the logits as
    ``softcap * tanh(input / softcap)`` first, inside the kernels (see
    ``fusedgrad.softmax_cross_entropy``). Returns the loss in ``input``'s dtype: 0-d for
    "mean"/"sum", shaped like the per-sample target for "none".

    The gradient with respect to ``input`` is ``dL/dz = p - y`` (``docs/derivations.md``,
    section 1(b)) with weights, smoothing and the reduction folded in (section 1(d)), and the
    cap's slope ``1 - tanh^2(input / softcap)`` (section 1(e)), computed by the fused backward
    kernel from the saved log-sum-exp; probability targets also receive their gradient.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    check_reduction(reduction)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad: gradients with respect to the class "
                         "weights are not computed (pass weight.detach())")
    ignore_index = check_int("ignore_index", ignore_index)
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = check_real("z_loss", z_loss, low=0.0)
    softcap = check_softcap(softcap)
    if target.is_floating_point():
        # Probability targets: F.cross_entropy needs them in the input's dtype as well.
        target = target.to(input.dtype)
    if hands_over_cross_entropy(input, target, ignore_index, z_loss, softcap):
        return handed_over_cross_entropy(F.cross_entropy, input, target, weight,
                                         ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=label_smoothing)
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    loss = SoftmaxCrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
                                             label_smoothing, z_loss, softcap)
    return loss.squeeze(0) if unbatched and reduction == "none" else loss


def hands_over_cross_entropy(input: torch.Tensor, target: torch.Tensor, ignore_index: int,
                             z_loss: float, softcap) -> bool:
    """Whether a cross-entropy goes to PyTorch's own kernel, which computes the same loss: a
    batch too small for the kernels (see :data:`CROSS_ENTROPY_MIN_SAMPLES`), no option that
    ``F.cross_entropy`` lacks (``z_loss``, ``softcap``), and arguments the kernels take too
    (float32 / float64 logits; int64 or int32 class indices, or probabilities already in the
    logits' dtype, without an ``ignore_index`` >= 0): the others go to the kernels' path,
    which refuses them, so a small batch is refused as a large one is, with the same error."""
    samples = 1 if input.dim() == 1 else input.numel() // max(1, input.shape[1])
    if not (small_for_kernels(input, samples, CROSS_ENTROPY_MIN_SAMPLES) and z_loss == 0.0
            and softcap is None and input.dtype in CPU_FLOAT_DTYPES):
        return False
    if target.dtype in (torch.int64, torch.int32):
        return True
    return target.dtype == input.dtype and ignore_index < 0


def handed_over_cross_entropy(loss_function, input, target, *args, **kwargs):
    """PyTorch's cross-entropy on a small batch, its out-of-range target error (an IndexError
    there) raised as the ValueError the kernels raise (docs/api.md, Errors)."""
    if target.dtype == torch.int32:
        target = target.long()  # PyTorch's kernel takes int64 class indices only
    try:
        return loss_function(input, target, *args, **kwargs)
    except IndexError as exc:
        n_classes = input.shape[0 if input.dim() == 1 else 1]
        raise ValueError(f"target values must be class indices in [0, {n_classes}) or "
                         f"ignore_index: {exc}") from exc


def small_for_kernels(input: torch.Tensor, size: int, threshold: int) -> bool:
    """Whether a CPU ``input`` of ``size`` (elements or samples) is below ``threshold``, where
    PyTorch's own kernel is faster (see :data:`BATCH_NORM_MIN_ELEMENTS`). A threshold read at
    call time, so that tests and users can change it on the module."""
    return size < threshold and input.is_cpu  # is_cpu: no torch.device object per call


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy
# --------------------------------------------------------------------------------------------
def _linear_cross_entropy_double(ctx, grad_loss):
    """:class:`LinearCrossEntropyFunction`'s gradients under ``create_graph=True``."""
    input, linear_weight, linear_bias, target, weight = ctx.saved_tensors[:5]
    ce = ctx.call.ce
    grads = gradients_of(
        lambda x, w, b: cross_entropy_composite(F.linear(x, w, b), target, weight,
                                                ce.reduction, ce.options),
        (input, linear_weight, linear_bias), ctx.needs_input_grad[:3], grad_loss)
    return (*grads, None, None, None, None, None, None, None, None, None)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused linear layer + softmax cross-entropy (``fusedgrad.linear_cross_entropy``): the
    (N, C) logits exist one chunk of rows at a time, in forward and in backward.

    "mean" / "sum": the upstream gradient is a scalar, so the forward's one chunk loop forms
    the loss and the gradients for an upstream gradient of 1 (three matrix products in all, as
    many as the unfused forward and backward), only those autograd will ask for
    (``ctx.needs_input_grad``: a frozen weight skips its product). They are saved, and the
    backward scales them in place by the upstream gradient. So with a retained graph a second
    backward whose upstream gradient is not 1 raises autograd's error about a saved tensor
    modified in place, rather than returning scaled-twice gradients.

    "none": the upstream gradient is one value per row, known only in backward. The forward
    forms the losses and the log-sum-exp of each row; the backward forms each chunk's logits
    again and runs the cross-entropy backward kernel with each row's upstream gradient.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, chunk_size, grad_enabled):
        call = _lce.prepare(kernel_array("input", input),
                            kernel_array("linear_weight", linear_weight),
                            kernel_array("target", target),
                            kernel_array("linear_bias", linear_bias),
                            kernel_array("weight", weight), ignore_index, reduction,
                            label_smoothing, z_loss, softcap, chunk_size)
        # Forward itself runs with grad mode off: whether the caller's was on comes as an
        # argument (off, no backward can follow, whatever the inputs' requires_grad).
        wanted = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        device = input.device
        ctx.call = call
        # the arguments themselves (no copies) for a second-order backward, then the lse
        # ("none") or the gradients for an upstream gradient of 1 ("mean", "sum")
        arguments = (input, linear_weight, linear_bias, target, weight)
        if reduction == "none":
            # lse in float64, as SoftmaxCrossEntropyFunction saves it
            loss, lse = _lce.forward_of_checked(call, lse_dtype=np.float64)
            ctx.save_for_backward(*arguments, as_tensor(lse, device))
        elif any(wanted):
            loss, *grads = _lce.fused_of_checked(call, 1.0, wanted)
            ctx.save_for_backward(*arguments, *(None if g is None else as_tensor(g, device)
                                                for g in grads))
        else:
            loss, _ = _lce.forward_of_checked(call)
        # The loss is float32 for half-precision input; F.linear_cross_entropy returns the
        # input's dtype (a no-op cast for float32 and float64).
        return as_tensor(loss, device).to(input.dtype)

    @staticmethod
    @kernel_backward("fusedgrad.torch.linear_cross_entropy", _linear_cross_entropy_double)
    def backward(ctx, grad_loss):
        # Unpacking the saved tensors checks that none was modified in place since forward.
        saved = ctx.saved_tensors[5:]
        call = ctx.call
        if call.ce.reduction == "none":
            lse = saved[0]
            arrays = call.arrays
            # Autograd may hand over an expanded (stride-0) or half-precision gradient.
            upstream = arrays.as_array("grad_output", kernel_array(
                "grad_output", grad_loss.to(lse.dtype).contiguous()))
            grads = _lce.backward_of_checked(call, upstream,
                                             arrays.as_array("lse", kernel_array("lse", lse)),
                                             tuple(ctx.needs_input_grad[:3]))
            grads = [None if g is None else as_tensor(g, grad_loss.device) for g in grads]
        else:
            grads = list(saved)
            scale = float(grad_loss)
            if scale != 1.0:
                for g in grads:
                    if g is not None:
                        g.mul_(scale)
        return (*grads, None, None, None, None, None, None, None, None, None)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None, chunk_size=None):
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without
    the (N, C) logits: fused, chunked over the rows; autograd-aware.

    The arguments of ``torch.nn.functional.linear_cross_entropy`` (its ``options``, PyTorch's
    own chunking, aside; ``ignore_index=None`` means -100 as there), plus fusedgrad's
    ``z_loss``, ``softcap`` and ``chunk_size`` (see ``fusedgrad.linear_cross_entropy``):
    ``input`` (N, d) or unbatched (d,); ``linear_weight`` (C, d); ``linear_bias`` (C,);
    ``target`` class indices (N,) or probabilities (N, C); ``weight`` (C,). Returns the loss in
    ``input``'s dtype. Gradients flow to ``input``, ``linear_weight`` and ``linear_bias``
    (``dloss/dX = G W``, ``dloss/dW = G^T X``, ``dloss/db = sum_n G_n`` with G the
    cross-entropy gradient of the logits, ``docs/derivations.md``, section 3); ``weight`` and
    probability targets must not require grad (``ValueError``).
    """
    for name, value in (("input", input), ("linear_weight", linear_weight),
                        ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    grad_enabled = torch.is_grad_enabled()
    if weight is not None and weight.requires_grad and grad_enabled:
        raise ValueError("weight must not require grad: gradients with respect to the class "
                         "weights are not computed (pass weight.detach())")
    if target.is_floating_point():
        if target.requires_grad and grad_enabled:
            raise ValueError("target must not require grad: gradients with respect to class "
                             "probabilities are not computed (pass target.detach())")
        # Probability targets: F.cross_entropy needs them in the input's dtype as well.
        target = target.to(input.dtype)
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    loss = LinearCrossEntropyFunction.apply(
        input, linear_weight, linear_bias, target, weight,
        -100 if ignore_index is None else ignore_index, reduction, label_smoothing, z_loss,
        softcap, chunk_size, grad_enabled)
    return loss.squeeze(0) if unbatched and reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# Batch normalization
# --------------------------------------------------------------------------------------------
def _batch_norm_double(ctx, grad_output):
    """:class:`BatchNormFunction`'s gradients under ``create_graph=True``: ``F.batch_norm`` on
    the batch's statistics in training, or the forward's own mean and invstd in eval (the
    running buffers may have changed since), followed by the ReLU where one was fused."""
    _, weight, output, x, bias = ctx.saved_tensors
    channel_shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    mean, invstd = (as_tensor(stat, x.device).to(x.dtype).reshape(channel_shape)
                    for stat in ctx.stats)

    def normalised(x, weight, bias):
        if ctx.training:
            y = F.batch_norm(x, None, None, weight, bias, training=True, eps=ctx.eps)
        else:
            y = (x - mean) * invstd
            if weight is not None:
                y = y * weight.reshape(channel_shape)
            if bias is not None:
                y = y + bias.reshape(channel_shape)
        return y if output is None else torch.relu(y)

    grads = gradients_of(normalised, (x, weight, bias), ctx.needs_input_grad[:3], grad_output)
    return (*grads, None, None, None, None, None, None)


class BatchNormFunction(torch.autograd.Function):
    """Fused batch norm; saves the input, ``weight``, ``bias`` (for a second-order backward,
    :func:`_batch_norm_double`) and mean / invstd per channel.

    The backward reuses what the forward's checked call established (the layout, and mean /
    invstd as the kernels returned them, kept on ``ctx``) and skips the argument checks.

    A channels-last tensor goes to the kernels as its NHWC / NDHWC permutation, a contiguous
    zero-copy view, with ``channel_axis=-1`` (``ChannelLayout``); outputs and gradients come back
    in the same memory format.

    With ``relu`` the output is ``max(BN(x), 0)`` and the function also saves
    that output, whose sign masks the upstream gradient in the backward: the ReLU costs no pass
    over memory of its own, and no memory either, since the next layer keeps the output alive
    anyway.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, relu):
        layout = ChannelLayout(x)
        x_kernel = layout.to_kernel(x)
        y, mean, invstd = _bn.batch_norm_forward(
            kernel_array("input", x_kernel), kernel_array("weight", weight),
            kernel_array("bias", bias), kernel_array("running_mean", running_mean),
            kernel_array("running_var", running_var), training=training, momentum=momentum,
            eps=eps, channel_axis=layout.channel_axis, relu=relu)
        output = layout.from_kernel(as_tensor(y, x.device))
        ctx.layout = layout
        ctx.training = training
        ctx.stats = (mean, invstd)
        ctx.eps = eps
        # x itself too (its storage when x_kernel is a view), for a second-order backward
        ctx.save_for_backward(x_kernel, weight, output if relu else None, x, bias)
        return output

    @staticmethod
    @kernel_backward("fusedgrad.torch.batch_norm", _batch_norm_double)
    def backward(ctx, grad_output):
        x_kernel, weight, output, _, _ = ctx.saved_tensors
        layout = ctx.layout
        mean, invstd = ctx.stats
        dx, dweight, dbias = _bn.backward_of_checked(
            kernel_array("grad_output", layout.to_kernel(grad_output)),
            kernel_array("input", x_kernel), mean, invstd, kernel_array("weight", weight),
            training=ctx.training, channel_axis=layout.channel_axis,
            relu_output=None if output is None else kernel_array("output",
                                                                 layout.to_kernel(output)))
        device = grad_output.device
        # Autograd casts each gradient to its input's dtype (float32 weight, half input on CUDA).
        grads = (layout.from_kernel(as_tensor(dx, device)), as_tensor(dweight, device),
                 as_tensor(dbias, device))
        grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)]
        return (*grads, None, None, None, None, None, None)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalization with fused kernels; same arguments as ``F.batch_norm``.

    ``input`` (N, C, *) with channels on axis 1 (any memory format; channels-last tensors are
    normalised in place of memory, see :class:`BatchNormFunction`); ``weight``, ``bias``,
    ``running_mean``, ``running_var`` (C,) or ``None``. In training the batch statistics
    normalise ``input`` and update the running buffers in place, if given (momentum, unbiased
    variance); otherwise the running statistics are used. Gradients flow to ``input``,
    ``weight`` and ``bias``.
    """
    return batch_norm_with_relu(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, relu=False)


def batch_norm_with_relu(input, running_mean, running_var, weight, bias, training, momentum,
                         eps, *, relu):
    """:func:`batch_norm`, followed by a ReLU if ``relu``, fused into the kernels (CPU and
    CUDA tensors; PyTorch's own path with ``F.relu`` below the CPU break-even size)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    check_cpu_batch_norm_dtypes(input, weight, bias, running_mean, running_var)
    return checked_batch_norm_with_relu(input, running_mean, running_var, weight, bias,
                                        training, momentum, eps, relu=relu)


def checked_batch_norm_with_relu(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, *, relu):
    """:func:`batch_norm_with_relu` of a tensor whose dtypes :func:`check_cpu_batch_norm_dtypes`
    has passed (the modules check before they count the batch, and not twice per call)."""
    if input.numel() == 0 or small_for_kernels(input, input.numel(), BATCH_NORM_MIN_ELEMENTS):
        return small_batch_norm(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, relu=relu)
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                   bool(training), momentum, eps, bool(relu))


def check_cpu_batch_norm_dtypes(input, weight, bias, running_mean, running_var) -> None:
    """On the CPU: ``input`` float32 or float64, and the given parameters and buffers of its
    dtype (PyTorch refuses mixed dtypes too), whatever the size, so that small tensors, which
    go to PyTorch's kernel, are refused as large ones are (``TypeError``)."""
    if not input.is_cpu:
        return
    if input.dtype not in CPU_FLOAT_DTYPES:
        raise TypeError(f"input must be float32 or float64 on the CPU, got {input.dtype}")
    for name, tensor in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)):
        if tensor is not None and tensor.dtype != input.dtype:
            raise TypeError(f"{name} must have the dtype of input ({input.dtype}), "
                            f"got {tensor.dtype}")


def small_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                     *, relu):
    """PyTorch's batch-norm kernel (``torch.batch_norm``, what ``F.batch_norm`` calls) for a
    CPU ``input`` below BATCH_NORM_MIN_ELEMENTS, or an empty one on any device (PyTorch returns
    an empty output, also in training, where the kernels' API refuses fewer than 2 values per
    channel), with the ReLU, if any, applied in place.

    Below that size a call costs microseconds, most of them fixed, so the Python around the
    kernel matters: ``F.batch_norm`` adds a ``__torch_function__`` check and a Python loop over
    the sizes (its "more than 1 value per channel" check, done here from ``numel``), and an
    out-of-place ReLU a second output. The ReLU may overwrite the batch norm's output: that
    output is this function's own, and the batch norm's backward saves its input, not its
    output (as with ``nn.ReLU(inplace=True)`` after a batch norm, as in torchvision's ResNets).
    """
    training = bool(training)
    channels = input.shape[1] if input.dim() > 1 else 1
    if training and channels and input.numel() == channels:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{input.size()}")
    # cudnn_enabled=False: a CPU tensor, where PyTorch ignores the flag, or an empty one.
    output = torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                              momentum, eps, False)
    return torch.relu_(output) if relu else output


# --------------------------------------------------------------------------------------------
# Batch-norm module bookkeeping (fusedgrad.torch's modules, fusedgrad.distributed.SyncBatchNorm)
# --------------------------------------------------------------------------------------------
class StepOptions(NamedTuple):
    """What one forward call of a batch-norm module passes to the functional form."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    use_batch_stats: bool
    momentum: float


def step_options(module: nn.Module) -> StepOptions:
    """PyTorch's ``_BatchNorm.forward`` bookkeeping for ``module`` (counts the batch in
    ``num_batches_tracked`` when training with tracked statistics)."""
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:  # cumulative moving average over all batches so far
            momentum = 1.0 / float(module.num_batches_tracked)
    # Batch statistics in training, and in eval when there are no running buffers.
    use_batch_stats = module.training or (module.running_mean is None
                                          and module.running_var is None)
    # Buffers are updated only when tracked; in eval they are read, if present.
    pass_buffers = not module.training or module.track_running_stats
    return StepOptions(module.running_mean if pass_buffers else None,
                       module.running_var if pass_buffers else None, use_batch_stats, momentum)


def meta_copy_arguments(bn: nn.Module) -> dict:
    """Constructor keywords for a copy of ``bn`` built on the meta device, so that no throwaway
    parameters are allocated before :func:`adopt_state` hands it the original tensors."""
    return dict(num_features=bn.num_features, eps=bn.eps, momentum=bn.momentum,
                affine=bn.affine, track_running_stats=bn.track_running_stats, device="meta",
                **bias_keyword(not (bn.affine and bn.bias is None)))


def bias_keyword(bias: bool) -> dict:
    """The batch-norm constructor's ``bias`` keyword, for ``**``: empty for the default (True),
    because PyTorch releases before 2.13 have no such keyword and would refuse it."""
    return {} if bias else {"bias": False}


def adopt_state(bn: nn.Module, replacement: nn.Module) -> nn.Module:
    """``replacement`` (built on the meta device) takes over ``bn``'s very parameter and buffer
    tensors and its train/eval flag."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(replacement, name, getattr(bn, name))
    return replacement.train(bn.training)
