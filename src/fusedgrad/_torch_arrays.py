"""PyTorch tensors <-> fusedgrad kernel arrays, shared by ``fusedgrad.torch`` and
``fusedgrad.distributed`` (both import torch; nothing else in the package does).
"""
from __future__ import annotations

import numpy as np
import torch


def kernel_array(name: str, tensor):
    """The array the kernels read for ``tensor``, sharing its memory; ``None`` stays ``None``.

    CPU tensors become NumPy views; CUDA tensors are passed as they are (the API reads their
    ``__cuda_array_interface__``). ``detach()`` is needed because NumPy views and the CUDA array
    interface are refused for tensors that require grad; it does not copy.
    """
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_cpu:
        if tensor.dtype == torch.bfloat16:
            raise TypeError(f"{name} has dtype torch.bfloat16, which the CPU kernels do not "
                            "take; use float32 or float64 on the CPU")
        return tensor.detach().numpy()
    if tensor.is_cuda:
        return tensor.detach()
    raise TypeError(f"{name} must be a CPU or CUDA tensor, got device {tensor.device}")


UNTYPED_BFLOAT16 = np.dtype("V2")


def as_tensor(array, device: torch.device) -> torch.Tensor:
    """Wrap a kernel result (NumPy array, or device array on ``device``) without a copy."""
    if type(array) is np.ndarray and device.type == "cpu":  # 3x cheaper than as_tensor
        return torch.from_numpy(array)
    if getattr(array, "dtype", None) == UNTYPED_BFLOAT16:
        # bfloat16 device arrays cross __cuda_array_interface__ as the untyped "<V2" (NumPy has
        # no bfloat16), which torch.as_tensor cannot import: reinterpret the bits instead.
        return torch.as_tensor(array.view(np.uint16), device=device).view(torch.bfloat16)
    return torch.as_tensor(array, device=device)


class ChannelLayout:
    """How a batch-norm input is handed to the kernels: channels first, or channels last.

    A 4-D / 5-D tensor stored channels-last is passed as its NHWC / NDHWC permutation, a
    contiguous view of the same memory, with ``channel_axis=-1``; anything else as a
    contiguous NC... tensor with ``channel_axis=1``. The same layout is applied to the upstream
    gradient, and undone on the outputs.
    """

    def __init__(self, x: torch.Tensor):
        self.ndim = x.dim()
        self.channels_last = (not x.is_contiguous() and self.ndim in (4, 5) and x.is_contiguous(
            memory_format=torch.channels_last if self.ndim == 4 else torch.channels_last_3d))
        self.channel_axis = -1 if self.channels_last else 1

    def to_kernel(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            t = t.permute(0, *range(2, self.ndim), 1)
        return t.contiguous()

    def from_kernel(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return t.permute(0, self.ndim - 1, *range(1, self.ndim - 1))
        return t
