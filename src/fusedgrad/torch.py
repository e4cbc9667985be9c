"""PyTorch drop-ins backed by fusedgrad's fused kernels.

::

    import fusedgrad.torch as fgt
    loss = fgt.softmax_cross_entropy(logits, target)    # as torch.nn.functional.cross_entropy
    criterion = fgt.CrossEntropyLoss(label_smoothing=0.1)
    model = fgt.convert_model(model)                     # nn.BatchNorm*d -> fgt.BatchNorm*d

How it works
------------
Each operation is a ``torch.autograd.Function`` whose ``forward`` calls fusedgrad's fused forward
kernel and whose ``backward`` calls the fused backward kernel. Tensors reach the kernels without a
copy: a CPU tensor as a NumPy view of its memory (``Tensor.numpy()``), a CUDA tensor as itself,
through ``__cuda_array_interface__`` (the API then runs the ``@cuda.jit`` kernels). Results come
back as NumPy or device arrays and are wrapped with ``torch.as_tensor``, again without a copy.
On the GPU, fusedgrad's CUDA backend launches its kernels on PyTorch's current stream (see
``fusedgrad.cuda._arrays``), so they are ordered with the surrounding PyTorch work; the
backward of a "mean"/"sum" loss reads the upstream gradient as a Python float, which
synchronises with that stream once per call.

What is saved for backward is what the backward kernels need and nothing else:

- cross-entropy: the logits and target (the inputs, kept by reference, not copied) and the
  log-sum-exp of each row, so the backward pass rebuilds ``p = exp(z - lse)`` on the fly;
- batch norm: the input and ``weight`` (by reference) and ``mean`` / ``invstd`` per channel
  (kept on ``ctx`` as the kernels returned them).

A channels-last tensor (``memory_format=torch.channels_last`` or ``channels_last_3d``) goes to the
batch-norm kernels as its NHWC / NDHWC permutation, which is a contiguous zero-copy view, with
``channel_axis=-1``; outputs and gradients come back in the same memory format.

The module classes subclass PyTorch's (``fgt.BatchNorm2d`` is an ``nn.BatchNorm2d``), so
constructor arguments, ``state_dict`` keys (including ``num_batches_tracked``), checkpoint
loading in both directions, ``repr`` and ``isinstance`` checks are PyTorch's own; only
``forward`` differs.

The multi-process drop-ins ``SyncBatchNorm``, ``convert_sync_batchnorm`` and
``vocab_parallel_softmax_cross_entropy`` live in ``fusedgrad.distributed`` and are re-exported
here.

Only this module, ``fusedgrad.distributed`` and the tensor <-> array helpers they share
(``fusedgrad._torch_arrays``) import torch: ``import fusedgrad`` does not.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.autograd.function import once_differentiable

import fusedgrad as fg
from fusedgrad import batch_norm as _bn
from fusedgrad import cross_entropy as _ce
from fusedgrad._torch_arrays import ChannelLayout, as_tensor, kernel_array
from fusedgrad._validate import check_real, check_reduction

#: Multi-process drop-ins, defined in ``fusedgrad.distributed`` and re-exported here on first
#: access (importing them eagerly would load torch.distributed for every user of this module).
_DISTRIBUTED = ("SyncBatchNorm", "convert_sync_batchnorm", "vocab_parallel_softmax_cross_entropy")

__all__ = ["softmax_cross_entropy", "CrossEntropyLoss", "batch_norm",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
           "BatchNormReLU3d", "convert_model", *_DISTRIBUTED]


def __getattr__(name: str):
    if name in _DISTRIBUTED:
        from fusedgrad import distributed
        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _channel_shape(tensor: torch.Tensor, ndim: int) -> tuple:
    """Shape ``(C, 1, ..., 1)`` that broadcasts a per-class vector over axis 1 of an ndim tensor."""
    return (tensor.shape[0],) + (1,) * (ndim - 2)


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------
class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Fused softmax cross-entropy; saves the logits, the target and lse per row.

    The forward keeps the API's validated call (``fusedgrad.cross_entropy._prepare``: the
    kernel arrays, the checked targets and the "mean" denominator) for the backward, which
    therefore neither validates nor scans the targets again: at the loss sizes of a typical
    model (64 x 10) that Python work cost more than the kernels.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss):
        call = _ce._prepare(kernel_array("input", logits), kernel_array("target", target),
                            kernel_array("weight", weight), ignore_index, reduction,
                            label_smoothing, z_loss)
        loss, lse = _ce._forward(call)
        ctx.call = call
        ctx.save_for_backward(logits, target, weight, as_tensor(lse, logits.device))
        # The kernels return float32 losses for half-precision logits; F.cross_entropy returns
        # the input's dtype (a no-op cast for float32 and float64).
        return as_tensor(loss, logits.device).to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # Unpacking the saved tensors checks that none was modified in place since forward.
        logits, target, weight, lse = ctx.saved_tensors
        call = ctx.call
        backend = call.backend
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            if call.reduction == "none":
                # Autograd may hand over an expanded (stride-0) or half-precision gradient.
                upstream = backend.as_array("grad_output", kernel_array(
                    "grad_output", grad_loss.to(lse.dtype).contiguous()))
            else:
                upstream = float(grad_loss)
            grad = _ce._backward(call, upstream,
                                 backend.as_array("lse", kernel_array("lse", lse)),
                                 backend.empty_like(call.logits))
            grad_logits = as_tensor(grad, logits.device)
        if ctx.needs_input_grad[1]:
            grad_target = _probability_target_grad(grad_loss, logits, weight, lse,
                                                   call.reduction,
                                                   call.options.label_smoothing)
        return grad_logits, grad_target, None, None, None, None, None


def _probability_target_grad(grad_loss, logits, weight, lse, reduction, label_smoothing):
    """d(loss)/d(target) for probability targets (PyTorch differentiates these too).

    Each sample's loss is sum_c w_c q_c (lse - z_c) with q = (1 - s) y + s / C, so
    d loss / d y_c = (1 - s) w_c (lse - z_c) = -(1 - s) w_c log p_c; the z_loss term does not
    depend on y. The reduction scales it by the upstream gradient, divided by the number of
    samples for "mean".
    """
    neg_log_p = lse.unsqueeze(1).to(logits.dtype) - logits
    grad = (1.0 - label_smoothing) * neg_log_p
    if weight is not None:
        grad = grad * weight.reshape(_channel_shape(weight, logits.dim()))
    if reduction == "none":
        return grad * grad_loss.unsqueeze(1)
    scale = grad_loss / lse.numel() if reduction == "mean" else grad_loss
    return grad * scale


def softmax_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, *, z_loss=0.0):
    """Softmax cross-entropy with fused forward and backward kernels; autograd-aware.

    Same arguments and semantics as ``torch.nn.functional.cross_entropy`` (without its
    deprecated ``size_average`` / ``reduce``): ``input`` (N, C), (N, C, d1, ..., dk) or
    unbatched (C,); ``target`` class indices (N, d1, ..., dk) (int64 or int32) or class
    probabilities shaped like ``input``; ``weight`` (C,); ``reduction`` "mean" | "sum" |
    "none"; ``label_smoothing`` in [0, 1]. ``z_loss`` adds PaLM's ``z_loss * lse**2`` per
    sample (see ``fusedgrad.softmax_cross_entropy``). Returns the loss in ``input``'s dtype:
    0-d for "mean"/"sum", shaped like the per-sample target for "none".

    The gradient with respect to ``input`` is ``dL/dz = p - y`` (seed, question 1b) with
    weights, smoothing and the reduction folded in, computed by the fused backward kernel from
    the saved log-sum-exp; probability targets also receive their gradient.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    check_reduction(reduction)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad: gradients with respect to the class "
                         "weights are not computed (pass weight.detach())")
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = check_real("z_loss", z_loss, low=0.0)
    if target.is_floating_point():
        # Probability targets: F.cross_entropy needs them in the input's dtype as well.
        target = target.to(input.dtype)
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    loss = _SoftmaxCrossEntropy.apply(input, target, weight, int(ignore_index), reduction,
                                      label_smoothing, z_loss)
    return loss.squeeze(0) if unbatched and reduction == "none" else loss


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`softmax_cross_entropy`.

    Same constructor (plus the keyword ``z_loss``), same ``weight`` buffer and ``state_dict``.
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = check_real("z_loss", z_loss, low=0.0)

    def forward(self, input, target):
        return softmax_cross_entropy(input, target, self.weight, self.ignore_index,
                                     self.reduction, self.label_smoothing, z_loss=self.z_loss)

    def extra_repr(self) -> str:
        return f"z_loss={self.z_loss}" if self.z_loss else ""


# --------------------------------------------------------------------------------------------
# Batch normalization
# --------------------------------------------------------------------------------------------
class _BatchNorm(torch.autograd.Function):
    """Fused batch norm; saves the input, ``weight`` and mean / invstd per channel.

    The backward reuses what the forward's checked call established (the layout, and mean /
    invstd as the kernels returned them, kept on ``ctx``) and skips the argument checks.

    With ``relu`` (CPU tensors) the output is ``max(BN(x), 0)`` and the function also saves
    that output, whose sign masks the upstream gradient in the backward: the ReLU costs no pass
    over memory of its own, and no memory either, since the next layer keeps the output alive
    anyway.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, relu):
        layout = ChannelLayout(x)
        x_kernel = layout.to_kernel(x)
        y, mean, invstd = fg.batch_norm_forward(
            kernel_array("input", x_kernel), kernel_array("weight", weight),
            kernel_array("bias", bias), kernel_array("running_mean", running_mean),
            kernel_array("running_var", running_var), training=training, momentum=momentum,
            eps=eps, channel_axis=layout.channel_axis, relu=relu)
        output = layout.from_kernel(as_tensor(y, x.device))
        ctx.layout = layout
        ctx.training = training
        ctx.stats = (mean, invstd)
        ctx.save_for_backward(x_kernel, weight, output if relu else None)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x_kernel, weight, output = ctx.saved_tensors
        layout = ctx.layout
        mean, invstd = ctx.stats
        dx, dweight, dbias = _bn._backward_of_checked(
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
    normalised in place of memory, see the module docstring); ``weight``, ``bias``,
    ``running_mean``, ``running_var`` (C,) or ``None``. In training the batch statistics
    normalise ``input`` and update the running buffers in place, if given (momentum, unbiased
    variance); otherwise the running statistics are used. Gradients flow to ``input``,
    ``weight`` and ``bias``.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       relu=False)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, *,
                relu):
    """:func:`batch_norm`, followed by a ReLU if ``relu``: fused into the kernels for CPU
    tensors, a separate ``F.relu`` on CUDA (the GPU kernels have no fused ReLU)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    fuse = relu and input.device.type == "cpu"
    output = _BatchNorm.apply(input, weight, bias, running_mean, running_var, bool(training),
                              momentum, eps, fuse)
    return F.relu(output) if relu and not fuse else output


class _FusedBatchNorm:
    """``forward`` shared by the BatchNorm classes: PyTorch's module logic, fused kernels.

    Mixed in before ``nn.BatchNormXd``, which supplies everything else (parameters, buffers,
    ``_check_input_dim``, ``state_dict`` handling). ``_relu``: the ``BatchNormReLU`` classes
    apply a ReLU to the output, fused into the kernels (see :func:`convert_model`).
    """

    _relu = False

    def forward(self, input):
        self._check_input_dim(input)
        step = step_options(self)
        return _batch_norm(input, step.running_mean, step.running_var, self.weight, self.bias,
                           step.use_batch_stats, step.momentum, self.eps, relu=self._relu)


class StepOptions(NamedTuple):
    """What one forward call of a batch-norm module passes to the functional form."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    use_batch_stats: bool
    momentum: float


def step_options(module: nn.Module) -> StepOptions:
    """PyTorch's ``_BatchNorm.forward`` bookkeeping for ``module`` (counts the batch in
    ``num_batches_tracked`` when training with tracked statistics); shared with
    ``fusedgrad.distributed.SyncBatchNorm``."""
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


class BatchNorm1d(_FusedBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on (N, C) or (N, C, L), computed by fusedgrad's kernels."""


class BatchNorm2d(_FusedBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on (N, C, H, W) (NCHW or channels-last), fusedgrad's kernels."""


class BatchNorm3d(_FusedBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on (N, C, D, H, W) (or channels-last-3d), fusedgrad's kernels."""


class BatchNormReLU1d(BatchNorm1d):
    """:class:`BatchNorm1d` followed by a ReLU, fused (same parameters, buffers and
    ``state_dict`` keys as the batch norm alone)."""

    _relu = True


class BatchNormReLU2d(BatchNorm2d):
    """:class:`BatchNorm2d` followed by a ReLU, fused (same parameters, buffers and
    ``state_dict`` keys as the batch norm alone)."""

    _relu = True


class BatchNormReLU3d(BatchNorm3d):
    """:class:`BatchNorm3d` followed by a ReLU, fused (same parameters, buffers and
    ``state_dict`` keys as the batch norm alone)."""

    _relu = True


_FUSED_CLASS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                nn.BatchNorm3d: BatchNorm3d}
_WITH_RELU = {BatchNorm1d: BatchNormReLU1d, BatchNorm2d: BatchNormReLU2d,
              BatchNorm3d: BatchNormReLU3d}


def convert_model(module: nn.Module, *, fuse_relu: bool = False) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` with fusedgrad's, in place.

    The replacements take over the very same parameter and buffer tensors (so device, dtype,
    values and any optimizer holding the parameters stay valid) and the train/eval flag.
    Subclasses of PyTorch's batch norm are left alone (they may change ``forward``), as are
    hooks registered on the replaced layers. Returns ``module``, or its replacement when
    ``module`` itself is a batch-norm layer.

    ``fuse_relu=True`` (an addition to ``shared/API.md``): inside ``nn.Sequential`` containers,
    a batch norm directly followed by an ``nn.ReLU`` becomes one ``BatchNormReLU1d/2d/3d``
    and the ReLU an ``nn.Identity``, so that the ReLU's forward and backward make no passes
    over memory of their own (CPU tensors; on CUDA the ReLU runs as ``F.relu``). The
    ``state_dict`` keys do not change (neither module holds state), so checkpoints still load
    both ways. Only a ``Sequential``'s order is known to be its call order, so batch norms in
    other containers are converted without fusing; hooks on a fused ReLU are dropped.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    fused_class = _FUSED_CLASS.get(type(module))
    if fused_class is not None:
        return _fused_copy(module, fused_class)
    for name, child in module.named_children():
        converted = convert_model(child, fuse_relu=fuse_relu)
        if converted is not child:
            module.add_module(name, converted)
    if fuse_relu and isinstance(module, nn.Sequential):
        _fuse_relus(module)
    return module


def _fuse_relus(sequential: nn.Sequential) -> None:
    """Each (fusedgrad batch norm, nn.ReLU) pair of adjacent children -> (BatchNormReLU,
    nn.Identity), in place."""
    children = list(sequential.named_children())
    for (bn_name, bn), (relu_name, relu) in zip(children, children[1:]):
        with_relu = _WITH_RELU.get(type(bn))
        if with_relu is not None and type(relu) is nn.ReLU:
            sequential.add_module(bn_name, _fused_copy(bn, with_relu))
            sequential.add_module(relu_name, nn.Identity())


def _fused_copy(bn: nn.Module, fused_class) -> nn.Module:
    return adopt_state(bn, fused_class(**meta_copy_arguments(bn)))


def meta_copy_arguments(bn: nn.Module) -> dict:
    """Constructor keywords for a copy of ``bn`` built on the meta device, so that no throwaway
    parameters are allocated before :func:`adopt_state` hands it the original tensors; shared
    with ``fusedgrad.distributed``."""
    return dict(num_features=bn.num_features, eps=bn.eps, momentum=bn.momentum,
                affine=bn.affine, track_running_stats=bn.track_running_stats, device="meta",
                **bias_keyword(not (bn.affine and bn.bias is None)))


def bias_keyword(bias: bool) -> dict:
    """The batch-norm constructor's ``bias`` keyword, for ``**``: empty for the default (True),
    because PyTorch releases before 2.13 have no such keyword and would refuse it."""
    return {} if bias else {"bias": False}


def adopt_state(bn: nn.Module, replacement: nn.Module) -> nn.Module:
    """``replacement`` (built on the meta device) takes over ``bn``'s very parameter and buffer
    tensors and its train/eval flag; shared with ``fusedgrad.distributed``."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(replacement, name, getattr(bn, name))
    return replacement.train(bn.training)
