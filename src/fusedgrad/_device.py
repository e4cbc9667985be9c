"""Where an array lives, and whether a usable CUDA GPU is present.

Host arrays (NumPy, or anything ``np.asarray`` accepts) run the ``@njit`` kernels; arrays that
expose ``__cuda_array_interface__`` (Numba device arrays, CuPy, PyTorch CUDA tensors) run the
``@cuda.jit`` kernels. The API modules find, for a call's location, the array interface
(:func:`arrays`) and the operation's kernels (:func:`backend`). Nothing here imports numba-cuda
unless a device array is actually seen, so the CPU path never pays for it.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys

import numpy as np

HOST = "cpu"
DEVICE = "cuda"


@functools.cache
def backend(operation: str, location: str):
    """The kernel module of ``operation`` ("cross_entropy", "batch_norm") for ``location``
    (:data:`HOST` or :data:`DEVICE`): ``fusedgrad.cpu.<operation>`` or
    ``fusedgrad.cuda.<operation>``, imported on first use (so the CPU path never imports
    numba-cuda) and then looked up in a cache."""
    return importlib.import_module(f"fusedgrad.{location}.{operation}")


@functools.cache
def arrays(location: str):
    """The array interface of ``location`` (:data:`HOST` or :data:`DEVICE`):
    ``fusedgrad.cpu._arrays`` or ``fusedgrad.cuda._arrays``, imported on first use.

    The API modules handle every array argument through it, whatever the device; the two
    modules provide the same names:

    ``DTYPES``
        Tuple of the floating NumPy dtypes the device's kernels take (logits, x, and the
        per-class and per-channel vectors).
    ``as_array(name, value) -> array``
        The device's array for an argument, sharing its memory (host: ``np.ndarray``, anything
        ``np.asarray`` takes; GPU: a Numba device array, for any object with
        ``__cuda_array_interface__``). Raises ``TypeError`` naming ``name`` for anything else.
        The result has ``.shape``, ``.ndim`` and a NumPy ``.dtype``.
    ``empty(shape, dtype) -> array``
        Uninitialised C-contiguous array on the device; large ones reuse released outputs
        (``fusedgrad._buffer_cache``).
    ``empty_like(arr) -> array``
        ``empty(arr.shape, arr.dtype)``.
    ``is_writeable(arr) -> bool``
        False for a read-only array (an output or running buffer must not be one).
    ``shares_memory(a, b) -> bool``
        Whether two arrays of the device may overlap in memory (used to refuse an ``out=`` that
        aliases an input).

    For the chunk loop of ``fusedgrad.linear_cross_entropy`` (2-D arrays, written in place; the
    host's are NumPy's, the GPU's run in PyTorch or CuPy, see ``fusedgrad._matmul``):

    ``matmul(a, b, out, *, transpose_a=False, transpose_b=False, accumulate=False) -> None``
        ``out = op(a) @ op(b)``, or ``out += op(a) @ op(b)`` with ``accumulate``, where ``op``
        transposes the operand when asked (without a copy). ``out`` has the operands' dtype, or
        float32 for half-precision operands on the GPU. Accumulating may use a temporary of at
        most half the elements of ``a``, and at most ``MATMUL_SCRATCH_BYTES``.
    ``MATMUL_SCRATCH_BYTES: int | None``
        That bound in bytes (None: half of ``a`` only).
    ``matmul_accumulates_in_place(operand_dtype, out_dtype) -> bool``
        Whether ``matmul(..., accumulate=True)`` adds into ``out`` without a temporary
        (BLAS gemm with beta = 1 exposed by the library in use).
    ``kernels_between_products() -> context manager``
        Within it, fusedgrad's kernels run between the products without slowing them (the
        host: on one thread where NumPy's BLAS, with its own threads, runs the products).
    ``add_to_rows(out, row) -> None``
        ``out[i, :] += row`` for every row ``i`` (the bias of the logits).
    ``column_sums(a, out, *, accumulate=False) -> None``
        ``out = a.sum(axis=0)``, or ``out += ...``, summed in ``out``'s dtype.
    ``copyto(dst, src) -> None``
        ``dst[...] = src`` for arrays of one shape and dtype (per-row results of a chunk into
        the whole batch's array).
    """
    return importlib.import_module(f"fusedgrad.{location}._arrays")


def is_device_array(obj) -> bool:
    """True for arrays that live on a GPU: objects exposing ``__cuda_array_interface__``, and,
    when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1``), its fake device arrays, which
    stand in for device arrays there but carry no such interface."""
    if obj is None:
        return False
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    return _is_simulator_array(obj)


def _is_simulator_array(obj) -> bool:
    # Only a process that already imported the simulator can hold one of its arrays, so this
    # never imports numba-cuda on the CPU path (and costs one dictionary lookup there).
    module = sys.modules.get("numba.cuda.simulator.cudadrv.devicearray")
    return module is not None and isinstance(obj, module.FakeCUDAArray)


def array_location(**arrays) -> str:
    """Return ``"cpu"`` or ``"cuda"`` for a call's array arguments (``None`` ones are skipped).

    Raises ``TypeError`` naming the arguments when host and device arrays are mixed.
    """
    if all(a is None or type(a) is np.ndarray for a in arrays.values()):
        return HOST  # the common case, decided without attribute lookups
    # Not reached with only None and ndarrays (above), so on_device has at least one entry.
    on_device = {name: is_device_array(a) for name, a in arrays.items() if a is not None}
    if all(on_device.values()):
        return DEVICE
    if not any(on_device.values()):
        return HOST
    host = sorted(n for n, d in on_device.items() if not d)
    dev = sorted(n for n, d in on_device.items() if d)
    raise TypeError(
        f"arguments {', '.join(dev)} are GPU (device) arrays but {', '.join(host)} "
        f"{'is a host array' if len(host) == 1 else 'are host arrays'}; "
        "pass all arrays on the same device")


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether a usable CUDA GPU is present (the simulator counts when NUMBA_ENABLE_CUDASIM=1).

    Returns False, without raising, when numba-cuda is not installed or no driver is found.
    """
    try:
        from numba import cuda
    except Exception:  # numba-cuda missing or broken: the CPU path still works
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def simulator_enabled() -> bool:
    """Whether Numba's CUDA simulator is switched on for this process."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
