"""Matrix products and row reductions into given arrays, written once for NumPy, CuPy and PyTorch.

The device-array interface (``fusedgrad._device.arrays``) runs these on its own arrays:
``fusedgrad.cpu._arrays`` with NumPy, ``fusedgrad.cuda._arrays`` with PyTorch or CuPy views of
device memory (zero-copy, through ``__cuda_array_interface__``). ``xp`` is the library's module;
the three libraries share everything used here: ``xp.matmul(a, b, out=...)``,
``xp.empty_like(x, dtype=...)``, ``xp.sum(a, axis=..., dtype=...)``, slicing, ``+=`` and slice
assignment (which casts to the destination's dtype).

These are the products of ``fusedgrad.linear_cross_entropy``'s chunk loop. The accumulating one,
``dL/dW += G^T X`` over the chunks of rows, is why this module exists: see :func:`product`.
"""
from __future__ import annotations


def product(xp, a, b, out, *, accumulate: bool, scratch_bytes: int | None = None) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate``; 2-D arrays of the library ``xp``
    (``a`` and ``b`` may be transposed views; the libraries' BLAS takes them without copies).

    ``out`` may have a wider dtype than ``a`` and ``b`` (float32 for bfloat16 operands on the
    GPU: the weight gradient is accumulated over the chunks in float32).

    Accumulating: NumPy's and CuPy's ``matmul`` cannot add into ``out`` (BLAS gemm's
    ``beta = 1`` is not exposed), and forming ``a @ b`` whole would need a temporary the size of
    ``out``, for ``dL/dW`` the size of the weight, per chunk. So the product is formed a block of
    ``out``'s rows at a time in one temporary, which is then added to those rows; the temporary
    holds at most half as many elements as ``a`` (the chunk's gradient ``G^T``), so the chunk
    loop's extra memory stays within 1.5 chunk buffers, and at most ``scratch_bytes`` where
    given (the host's bound, which leaves the rest of the memory budget to the chunk buffer:
    see ``fusedgrad.cpu._arrays.MATMUL_SCRATCH_BYTES``). The price is one more write and read
    of each block, small next to the ``2 * k`` flops the product spends per element of ``out``
    (``k`` the chunk's rows). BLAS gemm with ``beta = 1`` through SciPy would avoid it, but
    SciPy is not a dependency of fusedgrad, and its wrappers copy arrays that are not
    Fortran-ordered without saying so: two code paths, one of them silently allocating, for a
    saving that matters only on the host. PyTorch does expose ``beta = 1`` (``addmm_``), so
    same-dtype accumulation there writes ``out`` in place.
    """
    if a.shape[1] == 0:  # a sum of no terms (an empty batch): zeros, without a block loop
        if not accumulate:
            out[...] = 0
        return
    same_dtype = out.dtype == a.dtype
    if same_dtype and not accumulate:
        xp.matmul(a, b, out=out)
        return
    if same_dtype and xp.__name__ == "torch":
        out.addmm_(a, b)
        return
    n_rows, n_cols = out.shape[0], out.shape[1]
    block = max(1, (a.shape[0] * a.shape[1]) // (2 * max(n_cols, 1)))
    if scratch_bytes is not None:
        block = min(block, max(1, scratch_bytes // (max(n_cols, 1) * a.itemsize)))
    scratch = xp.empty_like(out[:block], dtype=a.dtype)
    for r0 in range(0, n_rows, block):
        r1 = min(r0 + block, n_rows)
        part = scratch[:r1 - r0]
        xp.matmul(a[r0:r1], b, out=part)
        if accumulate:
            out[r0:r1] += part
        else:
            out[r0:r1] = part


def column_sums(xp, a, out, *, accumulate: bool) -> None:
    """``out = a.sum(axis=0)``, or ``out += a.sum(axis=0)`` with ``accumulate``, summed in
    ``out``'s dtype (float32 for bfloat16 ``a``); the one temporary is a row of ``out``'s size."""
    sums = xp.sum(a, axis=0, dtype=out.dtype)
    if accumulate:
        out += sums
    else:
        out[...] = sums
