"""PyTorch drop-ins backed by fusedgrad's fused kernels.

::

    import fusedgrad.torch as fgt
    loss = fgt.softmax_cross_entropy(logits, target)    # as torch.nn.functional.cross_entropy
    loss = fgt.linear_cross_entropy(hidden, head.weight, target)  # F.linear_cross_entropy
    criterion = fgt.CrossEntropyLoss(label_smoothing=0.1)
    model = fgt.convert_model(model)                     # nn.BatchNorm*d -> fgt.BatchNorm*d

This module is the public facade: the modules (:class:`CrossEntropyLoss`, ``BatchNorm1d/2d/3d``,
``BatchNormReLU1d/2d/3d``), :func:`convert_model`, and the functional forms
:func:`softmax_cross_entropy`, :func:`linear_cross_entropy` and :func:`batch_norm`, which with
their autograd Functions live in ``fusedgrad._torch_ops`` (see there how they reach the
kernels and what they save for backward). On the GPU, fusedgrad's CUDA backend launches its
kernels on PyTorch's current stream (see ``fusedgrad.cuda._arrays``), so they are ordered with
the surrounding PyTorch work. A cross-entropy forward with class-index targets waits for that
stream once, to check the targets before anything is written; the loss, its "mean"
denominator and the backward's upstream gradient stay on the device. The linear +
cross-entropy backward of a "mean"/"sum" loss reads the upstream gradient as a Python float
(which waits), to skip scaling the weight-sized gradients when it is 1.

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

Only this module, ``fusedgrad.distributed`` and the modules they share (``fusedgrad._torch_ops``,
``fusedgrad._torch_arrays``) import torch: ``import fusedgrad`` does not.
"""
from __future__ import annotations

import torch
from torch import nn

from ._torch_ops import (adopt_state, batch_norm, check_cpu_batch_norm_dtypes,
                         checked_batch_norm_with_relu, handed_over_cross_entropy,
                         hands_over_cross_entropy, linear_cross_entropy, meta_copy_arguments,
                         softmax_cross_entropy, step_options)
from ._validate import check_int, check_real, check_softcap

#: Multi-process drop-ins, defined in ``fusedgrad.distributed`` and re-exported here on first
#: access (importing them eagerly would load torch.distributed for every user of this module).
_DISTRIBUTED = ("SyncBatchNorm", "convert_sync_batchnorm", "vocab_parallel_softmax_cross_entropy")

__all__ = ["softmax_cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "batch_norm",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
           "BatchNormReLU3d", "convert_model", *_DISTRIBUTED]


def __getattr__(name: str):
    if name in _DISTRIBUTED:
        from fusedgrad import distributed
        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------
class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`softmax_cross_entropy`.

    Same constructor (plus the keywords ``z_loss`` and ``softcap``), same ``weight`` buffer and
    ``state_dict``.
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
        super().__init__(weight, size_average, check_int("ignore_index", ignore_index), reduce,
                         reduction, check_real("label_smoothing", label_smoothing, low=0.0,
                                               high=1.0))
        self.z_loss = check_real("z_loss", z_loss, low=0.0)
        self.softcap = check_softcap(softcap)

    def forward(self, input, target):
        if (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
                and hands_over_cross_entropy(input, target, self.ignore_index, self.z_loss,
                                             self.softcap)):
            # PyTorch's own module path (see _torch_ops.CROSS_ENTROPY_MIN_SAMPLES); the module's
            # options were checked when it was built.
            return handed_over_cross_entropy(super().forward, input, target)
        return softmax_cross_entropy(input, target, self.weight, self.ignore_index,
                                     self.reduction, self.label_smoothing, z_loss=self.z_loss,
                                     softcap=self.softcap)

    def extra_repr(self) -> str:
        options = []
        if self.z_loss:
            options.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            options.append(f"softcap={self.softcap}")
        return ", ".join(options)


# --------------------------------------------------------------------------------------------
# Batch normalization
# --------------------------------------------------------------------------------------------
class _FusedBatchNorm:
    """``forward`` shared by the BatchNorm classes: PyTorch's module logic, fused kernels.

    Mixed in before ``nn.BatchNormXd``, which supplies everything else (parameters, buffers,
    ``_check_input_dim``, ``state_dict`` handling). ``_relu``: the ``BatchNormReLU`` classes
    apply a ReLU to the output, fused into the kernels (see :func:`convert_model`).
    """

    _relu = False

    def forward(self, input):
        self._check_input_dim(input)
        # before step_options, which counts the batch: a refused call must not count
        check_cpu_batch_norm_dtypes(input, self.weight, self.bias, self.running_mean,
                                    self.running_var)
        step = step_options(self)
        # Small CPU inputs go to PyTorch's kernel inside (see _torch_ops.small_batch_norm).
        return checked_batch_norm_with_relu(input, step.running_mean, step.running_var,
                                            self.weight, self.bias, step.use_batch_stats,
                                            step.momentum, self.eps, relu=self._relu)


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
    hooks registered on the replaced layers. A layer registered under several names, or in
    several containers, is replaced by one layer everywhere. Returns ``module``, or its
    replacement when ``module`` itself is a batch-norm layer.

    ``fuse_relu=True`` (an addition to the contract, see ``docs/api.md``): inside
    ``nn.Sequential`` containers, a batch norm directly followed by an ``nn.ReLU`` becomes one
    ``BatchNormReLU1d/2d/3d`` and the ReLU an ``nn.Identity``, so that the ReLU's forward and
    backward make no passes over memory of their own (CPU and CUDA tensors). The
    ``state_dict`` keys do not change (neither module holds state), so checkpoints still load
    both ways. Only a ``Sequential``'s order is known to be its call order, so batch norms in
    other containers are converted without fusing; hooks on a fused ReLU are dropped.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return _convert(module, fuse_relu, {})


def _convert(module: nn.Module, fuse_relu: bool, done: dict) -> nn.Module:
    """:func:`convert_model` below ``module``. ``done``: ``id`` -> (module met so far, what it
    became), so that a layer registered under several names, or in several containers, is
    replaced by one and the same layer everywhere (``named_children`` would name it once);
    holding the module keeps its ``id`` from being reused once it is replaced."""
    if id(module) in done:
        return done[id(module)][1]
    fused_class = _FUSED_CLASS.get(type(module))
    if fused_class is not None:
        replacement = _fused_copy(module, fused_class)
        done[id(module)] = (module, replacement)
        return replacement
    done[id(module)] = (module, module)
    for name, child in _all_children(module):
        converted = _convert(child, fuse_relu, done)
        if converted is not child:
            module.add_module(name, converted)
    if fuse_relu and isinstance(module, nn.Sequential):
        _fuse_relus(module)
    return module


def _all_children(module: nn.Module) -> list:
    """(name, child) for every name a child is registered under, the same child repeated."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _fuse_relus(sequential: nn.Sequential) -> None:
    """Each (fusedgrad batch norm, nn.ReLU) pair of adjacent children -> (BatchNormReLU,
    nn.Identity), in place."""
    children = _all_children(sequential)
    for (bn_name, bn), (relu_name, relu) in zip(children, children[1:]):
        with_relu = _WITH_RELU.get(type(bn))
        if with_relu is not None and type(relu) is nn.ReLU:
            sequential.add_module(bn_name, _fused_copy(bn, with_relu))
            sequential.add_module(relu_name, nn.Identity())


def _fused_copy(bn: nn.Module, fused_class) -> nn.Module:
    return adopt_state(bn, fused_class(**meta_copy_arguments(bn)))
