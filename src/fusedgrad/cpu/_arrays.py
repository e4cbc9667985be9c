"""Host arrays for the CPU backend: the array interface of ``fusedgrad._device.arrays``.

The interface is documented once, in ``fusedgrad._device.arrays``; ``fusedgrad.cuda._arrays`` is
the device side. Here the arrays are NumPy arrays: anything ``np.asarray`` takes is accepted as
an input, large outputs come from the pool of released host buffers (``_alloc``), and the matrix
products are NumPy's or PyTorch's (their BLAS, see :func:`matmul`), through
``fusedgrad._matmul``.
"""
from __future__ import annotations

import contextlib
import sys

import numba
import numpy as np

from .. import _matmul
from . import _alloc
from ._codegen import HOST_CPU_NAME, is_amd_zen

#: Floating dtypes the CPU kernels are compiled for (big arrays and per-channel or per-class
#: vectors alike).
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_array(name: str, value) -> np.ndarray:
    """``np.asarray(value)`` (an ndarray is returned as it is); ``TypeError`` naming ``name``
    for objects NumPy cannot take or turns into an object array."""
    if isinstance(value, np.ndarray):
        return value
    try:
        arr = np.asarray(value)
    except Exception as exc:  # e.g. a ragged list
        raise TypeError(f"{name} must be an array, got {type(value).__name__}: {exc}") from None
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got an object array "
                        f"from {type(value).__name__}")
    return arr


def empty(shape, dtype) -> np.ndarray:
    """Uninitialised C-contiguous array; large ones reuse released outputs (``_alloc``), so the
    operating system does not zero fresh pages on every call."""
    return _alloc.empty(shape, dtype)


def empty_like(arr) -> np.ndarray:
    """Uninitialised array with the shape and dtype of ``arr`` (see :func:`empty`)."""
    return _alloc.empty(arr.shape, arr.dtype)


def is_writeable(arr) -> bool:
    return bool(arr.flags.writeable)


def shares_memory(a, b) -> bool:
    """Whether two arrays overlap in memory (exact: ``np.shares_memory``)."""
    return np.shares_memory(a, b)


def torch_blas_pays_on(cpu_name: str) -> bool:
    """Whether PyTorch's BLAS should run the host products, when PyTorch is loaded, on the CPU
    LLVM calls ``cpu_name`` (``llvmlite.binding.get_host_cpu_name()``): not on AMD's Zen cores
    (``znver*``). PyTorch's x86 wheels use MKL, which takes its AVX2 path on AMD processors: on
    the 2-core AMD EPYC (Zen 5) of ``docs/performance.md`` (2026-12-05) it ran the float32
    products of linear + cross-entropy (2048 x 1024 @ 1024 x 32000) at 203 GFLOP/s, NumPy's
    OpenBLAS at 470-530 with the AVX-512 kernels it picks for that CPU (260-273 with the AVX2
    ones that ``OPENBLAS_CORETYPE=Haswell`` forces), so a whole call at N=2048, d=1024, C=32000
    took 2.14 s through PyTorch and 1.26 s through NumPy, the temporary NumPy needs to
    accumulate included. On the Xeons measured, MKL ran these products at 283-320 GFLOP/s.
    A property of the machine, never of a measurement, so a machine always takes the same path
    (the two libraries' products round differently)."""
    return not is_amd_zen(cpu_name)


#: Whether :func:`matmul` hands the products to PyTorch when it is loaded (read at call time).
TORCH_BLAS_PAYS = torch_blas_pays_on(HOST_CPU_NAME)


def matmul(a, b, out, *, transpose_a=False, transpose_b=False, accumulate=False) -> None:
    """``out = op(a) @ op(b)``, or ``out += ...`` with ``accumulate``; ``op`` transposes where
    asked (a view: BLAS reads it as it lies).

    When PyTorch is already loaded (``fusedgrad.torch``'s callers) and :data:`TORCH_BLAS_PAYS`,
    the product runs on zero-copy tensor views of the arrays: PyTorch's ``addmm_`` adds into
    ``out`` in place (BLAS gemm with beta = 1), where NumPy's ``matmul`` needs a bounded
    temporary and an extra pass to accumulate (``fusedgrad._matmul.product`` says why and how
    large). Arrays PyTorch cannot view (read-only, negative strides) go through NumPy.
    """
    a, b = (a.T if transpose_a else a), (b.T if transpose_b else b)
    torch = _torch_for_products()
    if torch is not None and all(_torch_viewable(x) for x in (a, b, out)):
        a, b, out = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        _matmul.product(torch, a, b, out, accumulate=accumulate)
        return
    _matmul.product(np, a, b, out, accumulate=accumulate, scratch_bytes=MATMUL_SCRATCH_BYTES)


#: The most bytes NumPy's accumulating products take for their temporary (besides the rule of
#: at most half of ``a``), so that the chunk buffer of linear + cross-entropy gets the rest of
#: its memory budget. Measured on the 2-core AMD EPYC (Zen 5) of ``docs/performance.md``
#: (2026-12-05), N=2048, d=1024, C=32000 float32, alternating in one process: 167 rows per
#: chunk with a temporary of half the buffer (10.7 MB) 1.07-1.10 s; 240 rows with 2 MiB
#: 0.96-1.00 s; 232 rows with 4 MiB 0.94-0.99 s. A product alone (k rows of G^T X accumulated
#: into 32000 x 1024) was slower in blocks of 512 rows (2 MiB) than of 2048 (8 MiB), 354
#: against 419 GFLOP/s at k=250: 4 MiB sits between the two.
MATMUL_SCRATCH_BYTES = 4 << 20


def matmul_accumulates_in_place(operand_dtype, out_dtype) -> bool:
    """Whether :func:`matmul` adds into ``out`` without a temporary (PyTorch's BLAS)."""
    return _torch_for_products() is not None


def _torch_for_products():
    """The ``torch`` module when :func:`matmul` hands the products to it (for arrays it can
    view): loaded, and :data:`TORCH_BLAS_PAYS`; otherwise None."""
    return torch_if_loaded() if TORCH_BLAS_PAYS else None


@contextlib.contextmanager
def kernels_between_products():
    """Runs the chunk loop's fusedgrad kernels (the cross-entropy between the products) on
    one thread where NumPy's BLAS runs the products. Its pool of threads is not Numba's: after
    a parallel kernel, Numba's OpenMP workers keep spinning, waiting for more work, and take a
    core from the BLAS product that follows. Measured on the 2-core AMD EPYC (Zen 5) of
    ``docs/performance.md`` (2026-12-05): at 170 rows x 32000 classes, a product after the
    two-thread kernel took 37.7 ms, after the one-thread kernel 31.9 (31.3 with
    ``OMP_WAIT_POLICY=passive``), while the kernel took 1.8 ms on one thread (1.3-2.7 on two);
    a whole call at N=2048, d=1024, C=32000 took 1.16 s instead of 1.29 s (medians of 5,
    alternating in one process). The kernels' results do not depend on their thread count."""
    if _torch_for_products() is not None:
        # PyTorch's BLAS (OpenMP threads) runs them: not measured, kept as it was
        yield
        return
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


def torch_if_loaded():
    """The ``torch`` module if this process has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def _torch_viewable(arr) -> bool:
    """Whether ``torch.from_numpy`` takes ``arr`` without a copy or a warning."""
    return arr.flags.writeable and all(stride >= 0 for stride in arr.strides)


def add_to_rows(out, row) -> None:
    """``out[i, :] += row`` for every row ``i`` of the 2-D ``out``, in place."""
    np.add(out, row, out=out)


def column_sums(a, out, *, accumulate=False) -> None:
    """``out = a.sum(axis=0)``, or ``out += ...`` with ``accumulate``."""
    _matmul.column_sums(np, a, out, accumulate=accumulate)


def copyto(dst, src) -> None:
    """``dst[...] = src`` for two arrays of one shape."""
    np.copyto(dst, src)
