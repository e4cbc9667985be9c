"""Device arrays for the CUDA backend: the array interface of ``fusedgrad._device.arrays``, plus
the strided views, streams and helper kernels the GPU launchers share.

The interface (documented once, in ``fusedgrad._device.arrays``; ``fusedgrad.cpu._arrays`` is the
host side): :data:`DTYPES`, :func:`as_array`, :func:`empty`, :func:`empty_like`,
:func:`is_writeable`, :func:`shares_memory`, and for the chunks of ``linear_cross_entropy``
:func:`matmul`, :func:`add_to_rows`, :func:`column_sums`, :func:`copyto`. Inputs are any objects
exposing ``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch CUDA tensors);
they are wrapped zero-copy as Numba ``DeviceNDArray`` objects, and every output is a
``DeviceNDArray`` (CuPy / PyTorch wrap it zero-copy through the same interface). Under Numba's
CUDA simulator the simulator's fake device arrays are used as they are.

Streams: every launcher takes ``stream=None``. ``None`` means: PyTorch's current stream when
PyTorch is imported and has initialised CUDA (so kernels order correctly with the surrounding
PyTorch work), else the default stream. A Numba stream is used as given; an integer is taken
as a raw ``cudaStream_t`` handle (e.g. ``cupy.cuda.get_current_stream().ptr``) and wrapped with
``cuda.external_stream`` (:func:`resolve_stream`). The public API does not pass ``stream``
(yet); the backend functions take it as a keyword.

Allocation: :func:`empty` takes every array from a pool of released buffers
(``FUSEDGRAD_DEVICE_CACHE_MB``, default 4096 MiB; 0 disables it; ``fusedgrad.empty_cache()``
releases it), the small ones too: a call's per-sample and one-value arrays would otherwise be
allocated with ``cuMemAlloc`` and freed by Numba in batches (``cuMemFree`` of every pending
array once more than ``CUDA_DEALLOCS_COUNT``, 10, are waiting), and both wait for the device,
about once per cross-entropy call. :func:`to_device` copies a host array into one. As with
PyTorch's caching allocator, a buffer whose last user was a kernel on another stream must be
kept alive by the caller until that kernel has run (PyTorch: ``Tensor.record_stream``).

Matrix products: numba-cuda has no BLAS, so :func:`matmul` (and the two row operations beside
it) runs in the array library of the call: PyTorch when it is imported (it is whenever the
arguments are PyTorch tensors), else CuPy, on zero-copy views of the device arrays
(``fusedgrad._matmul`` holds the code the libraries share). PyTorch's products run on its
current stream, the stream the kernels use once PyTorch has initialised CUDA; CuPy's on its
current stream, the legacy default stream unless the caller set another. Under the simulator the
products are NumPy's, on the simulator arrays' host data.

For the launchers of both kernel modules: :func:`view3` and :func:`merge_axes` (kernel views
without copies), :func:`launch_blocks`, and the two helper launches :func:`convert` (the one
dtype-conversion kernel) and :func:`device_sum` (a deterministic sum of a 1-D array).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import sys
import weakref

import numpy as np
from numba import cuda

from .. import _matmul
from .._buffer_cache import ReleasedBuffers
from ._reduce import THREADS, sum_chunks
from ._target import SIMULATED


#: bfloat16 as it crosses ``__cuda_array_interface__``: NumPy has no bfloat16 dtype, so PyTorch
#: (like ml_dtypes) describes bfloat16 data as the untyped two-byte ``"<V2"``. Device arrays of
#: this dtype are wrapped as :class:`BFloat16Array`, which Numba types as numba-cuda's bfloat16.
BFLOAT16 = np.dtype("V2")

#: Floating dtypes the GPU kernels take for their big arrays (batch norm's x / dy / out,
#: cross-entropy's logits / probability targets) and for per-channel or per-class vectors:
#: float16 and bfloat16 (``V2``, see :data:`BFLOAT16`) are accumulated in float32; the
#: simulator has no bfloat16.
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)) + (
    () if SIMULATED else (BFLOAT16,))


def _check_numpy_support() -> None:
    """Fail with the fix instead of deep inside the first kernel compilation.

    numba-cuda 0.30.4 and earlier register an overload of ``np.row_stack``, which NumPy 2.5
    removed, in a module the CUDA target loads before compiling anything (NVIDIA/numba-cuda#907,
    not fixed upstream: the package is in maintenance mode). Seen on an H200 machine with
    numpy 2.5.2: every kernel launch raised ``AttributeError: ... 'row_stack'``.
    """
    if hasattr(np, "row_stack"):
        return
    try:
        import numba.cuda.np.arrayobj  # noqa: F401
    except AttributeError as exc:
        if "row_stack" not in str(exc):
            raise
        from importlib.metadata import version
        raise ImportError(
            f"numba-cuda {version('numba-cuda')} cannot compile GPU kernels with NumPy "
            f"{np.__version__} (it needs np.row_stack, removed in NumPy 2.5; "
            "NVIDIA/numba-cuda#907): install numpy<2.5 to use fusedgrad on CUDA, e.g. "
            "pip install 'fusedgrad[cuda]'") from exc


if not SIMULATED:  # the simulator has no bfloat16 type at all
    _check_numpy_support()
    from numba.cuda import types as _cuda_types
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.cudadrv.driver import CudaAPIError, MemoryPointer, binding

    _OUT_OF_MEMORY = binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY

    class BFloat16Array(DeviceNDArray):
        """A device array of bfloat16 values (``dtype`` ``V2``, see :data:`BFLOAT16`)."""

        @property
        def _numba_type_(self):
            layout = "C" if self.is_c_contiguous() else "F" if self.is_f_contiguous() else "A"
            return _cuda_types.Array(_cuda_types.bfloat16, self.ndim, layout)

        @property
        def __cuda_array_interface__(self):
            desc = dict(super().__cuda_array_interface__)
            desc["typestr"] = "<V2"  # what PyTorch exports for bfloat16
            return desc


def _as_bfloat16(arr):
    return BFloat16Array(arr.shape, arr.strides, BFLOAT16, stream=arr.stream,
                         gpu_data=arr.gpu_data)


#: The arrays :func:`as_array` made of objects that export their memory read-only (the flag in
#: the ``data`` entry of ``__cuda_array_interface__``): a Numba device array carries no such
#: flag, so without this record :func:`is_writeable` would find every wrapped array writeable.
_READ_ONLY = weakref.WeakSet()


def as_array(name: str, value):
    """Zero-copy ``DeviceNDArray`` (or simulator array) for a CUDA-array-interface object;
    ``TypeError`` naming ``name`` for anything else."""
    if SIMULATED:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        if isinstance(value, FakeCUDAArray):
            return value
        raise TypeError(f"{name} must be a (simulated) CUDA device array, "
                        f"got {type(value).__name__}")
    if cuda.devicearray.is_cuda_ndarray(value):
        arr, read_only = value, False
    else:
        desc = getattr(value, "__cuda_array_interface__", None)
        if desc is None:
            raise TypeError(f"{name} must expose __cuda_array_interface__, "
                            f"got {type(value).__name__}")
        arr, read_only = cuda.from_cuda_array_interface(desc, owner=value), bool(desc["data"][1])
    if arr.dtype == BFLOAT16 and not isinstance(arr, BFloat16Array):
        arr = _as_bfloat16(arr)
    if read_only:
        _READ_ONLY.add(arr)
    return arr


#: The cached stand-ins of :func:`stand_in`, by (device, dtype, shape).
_STAND_INS: dict = {}


def stand_in(dtype, shape=(1,)):
    """A small zero-filled device array for a kernel argument that the launch does not read (a
    flag says so: numba-cuda cannot launch with ``None``) or reads only for its dtype. One per
    device, dtype and shape, made once and never written, so every stream and call shares it
    and a launch allocates nothing for it (a device allocation is a driver call)."""
    device = 0 if SIMULATED else cuda.get_current_device().id
    key = (device, np.dtype(dtype).str, tuple(int(s) for s in shape))
    array = _STAND_INS.get(key)
    if array is None:
        array = _STAND_INS[key] = cuda.to_device(np.zeros(key[2], dtype=dtype))
    return array


def empty_like(arr):
    """Uninitialised device array with the shape and dtype of ``arr`` (see :func:`empty`)."""
    return empty(arr.shape, arr.dtype)


def is_writeable(arr) -> bool:
    """False for an array :func:`as_array` made of a read-only export (under the simulator: for
    a simulated array over read-only host memory)."""
    if SIMULATED:
        return bool(arr._ary.flags.writeable)
    return arr not in _READ_ONLY


def _byte_range(arr):
    """``[first, last]`` byte addresses an array can touch (its extent, strides considered)."""
    if SIMULATED:
        start = arr._ary.__array_interface__["data"][0]
    else:
        start = arr.__cuda_array_interface__["data"][0]
    low = start + sum(min(0, (n - 1) * st) for n, st in zip(arr.shape, arr.strides))
    high = start + sum(max(0, (n - 1) * st) for n, st in zip(arr.shape, arr.strides))
    return low, high + arr.dtype.itemsize - 1


def shares_memory(a, b) -> bool:
    """Whether the memory extents of two device arrays overlap (conservative for strides)."""
    a, b = as_array("a", a), as_array("b", b)
    if a.size == 0 or b.size == 0:
        return False
    a_low, a_high = _byte_range(a)
    b_low, b_high = _byte_range(b)
    return a_low <= b_high and b_low <= a_high


def matmul(a, b, out, *, transpose_a=False, transpose_b=False, accumulate=False) -> None:
    """``out = op(a) @ op(b)``, or ``out += ...`` with ``accumulate``, by the array library's
    BLAS (cuBLAS) on zero-copy views (``op`` transposes where asked). ``out`` may be float32
    for bfloat16 or float16 operands (see ``fusedgrad._matmul.product``)."""
    xp, (a, b, out) = _library_views(a, b, out)
    _matmul.product(xp, a.T if transpose_a else a, b.T if transpose_b else b, out,
                    accumulate=accumulate)


#: No bound on the accumulating products' temporary but half of ``a`` (unmeasured on a GPU,
#: where each block is a kernel launch).
MATMUL_SCRATCH_BYTES = None


def matmul_accumulates_in_place(operand_dtype, out_dtype) -> bool:
    """Whether :func:`matmul` adds into ``out`` without a temporary: with PyTorch (``addmm_``)
    and operands of ``out``'s dtype (bfloat16 operands accumulate into float32 through one)."""
    return (not SIMULATED and np.dtype(operand_dtype) == np.dtype(out_dtype)
            and _matrix_library().__name__ == "torch")


def kernels_between_products():
    """Nothing to arrange on the GPU: kernels and products share the library's stream."""
    return contextlib.nullcontext()


def add_to_rows(out, row) -> None:
    """``out[i, :] += row`` for every row ``i`` of the 2-D ``out``, in place."""
    _, (out, row) = _library_views(out, row)
    out += row


def column_sums(a, out, *, accumulate=False) -> None:
    """``out = a.sum(axis=0)``, or ``out += ...`` with ``accumulate``, summed in ``out``'s
    dtype."""
    xp, (a, out) = _library_views(a, out)
    _matmul.column_sums(xp, a, out, accumulate=accumulate)


def copyto(dst, src) -> None:
    """``dst[...] = src`` for two contiguous device arrays of one shape and dtype."""
    if SIMULATED:
        dst.copy_to_device(src)
    else:
        dst.copy_to_device(src, stream=resolve_stream(None))


def _library_views(*arrays):
    """``(xp, views)``: the array library of the products and its zero-copy views of
    ``arrays`` (under the simulator: NumPy and the simulated arrays' host data)."""
    if SIMULATED:
        return np, [arr._ary for arr in arrays]
    xp = _matrix_library()
    if xp.__name__ == "torch":
        # torch.as_tensor cannot import bfloat16 (exported as the untyped "<V2"): reinterpret
        # the bits, as fusedgrad._torch_arrays does for results.
        return xp, [xp.as_tensor(arr.view(np.uint16)).view(xp.bfloat16)
                    if arr.dtype == BFLOAT16 else xp.as_tensor(arr) for arr in arrays]
    if any(arr.dtype == BFLOAT16 for arr in arrays):
        raise TypeError("bfloat16 matrix products on the GPU need PyTorch (CuPy has no "
                        "bfloat16)")
    return xp, [xp.asarray(arr) for arr in arrays]


def _matrix_library():
    """PyTorch if it is imported, else CuPy if it is, else whichever of them imports."""
    for name in ("torch", "cupy"):
        if name in sys.modules:
            return sys.modules[name]
    for name in ("torch", "cupy"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("matrix products on the GPU (fusedgrad.linear_cross_entropy) run in "
                      "PyTorch or CuPy; install either")


def strided_view(arr, shape, strides):
    """A view of ``arr``'s memory with the given shape and byte strides (no copy)."""
    shape = tuple(int(s) for s in shape)
    strides = tuple(int(s) for s in strides)
    if SIMULATED:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        host = np.lib.stride_tricks.as_strided(arr._ary, shape=shape, strides=strides)
        return FakeCUDAArray(host)
    return type(arr)(shape, strides, arr.dtype, stream=arr.stream, gpu_data=arr.gpu_data)


def dense_rows(arr3):
    """The ``(P, C)`` C-contiguous view of a ``(P, C, 1)`` view whose rows are contiguous and
    evenly spaced (what the cross-entropy's dense-row kernel and batch norm's column kernels
    take), or None."""
    n_rows, n_columns, n_inner = (int(v) for v in arr3.shape)
    itemsize = arr3.dtype.itemsize
    if n_inner != 1 or n_columns == 0 or arr3.strides[1] != itemsize:
        return None
    if n_rows > 1 and arr3.strides[0] != n_columns * itemsize:
        return None
    return strided_view(arr3, (n_rows, n_columns), (n_columns * itemsize, itemsize))


def merge_axes(name: str, shape, strides, itemsize: int):
    """``(size, stride)`` addressing the given axes, in order, as one strided axis.

    Raises ``ValueError`` when no single stride does (a copy would be needed; the GPU path never
    copies inputs behind the caller's back).
    """
    size = int(np.prod(shape, dtype=np.int64))
    kept = [(int(n), int(st)) for n, st in zip(shape, strides) if n != 1]
    if not kept or size == 0:
        return size, int(itemsize)
    for (_, st_outer), (n_inner, st_inner) in zip(kept, kept[1:]):
        if st_outer != st_inner * n_inner:
            raise ValueError(
                f"{name}: device arrays whose axes cannot be merged into one strided axis are "
                f"not supported (shape {tuple(shape)}, strides {tuple(strides)}); pass a "
                "contiguous array")
    return size, kept[-1][1]


def view3(name: str, arr, axis: int):
    """View ``arr`` as 3-D ``(outer, shape[axis], inner)`` without copying.

    ``axis=1``: ``(N, C, d1..dk) -> (N, C, S)``; ``axis=ndim-1`` (channels last):
    ``(N, d1.., C) -> (M, C, 1)``. The merged axes must share one stride pattern.
    """
    shape, strides = tuple(arr.shape), tuple(arr.strides)
    itemsize = arr.dtype.itemsize
    outer, outer_stride = merge_axes(name, shape[:axis], strides[:axis], itemsize)
    inner, inner_stride = merge_axes(name, shape[axis + 1:], strides[axis + 1:], itemsize)
    return strided_view(arr, (outer, shape[axis], inner),
                        (outer_stride, strides[axis], inner_stride))


#: Released device buffers (see ``fusedgrad._buffer_cache``), keyed by
#: ``(device id, stream handle, bytes)``: a buffer is only reused on the stream it was
#: allocated for, where new kernels queue behind the earlier ones that used it there. Bounded
#: by ``FUSEDGRAD_DEVICE_CACHE_MB`` (default 4096 MiB).
_POOL = ReleasedBuffers("FUSEDGRAD_DEVICE_CACHE_MB", default_mb=4096)


def empty(shape, dtype, stream=None):
    """Uninitialised C-contiguous device array (a :class:`BFloat16Array` for ``BFLOAT16``).

    ``stream``: as :func:`resolve_stream` returns it (the launchers pass the stream of their
    call); ``None``, the interface's call, resolves the current one.

    Arrays reuse a released buffer of the same size on the same device and stream when there
    is one (see the module docstring for why small ones too). The memory is a fresh
    ``MemoryPointer`` (the lease) over a pooled allocation (the arena), and every view or slice
    Numba makes of the result holds the lease (a view's ``owner``), as does any PyTorch tensor
    or CuPy array made from it through ``__cuda_array_interface__``; the lease's finalizer
    hands the arena back to the pool when the last of them is gone.
    """
    if stream is None:
        stream = resolve_stream(None)
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if SIMULATED or nbytes == 0 or _POOL.limit_bytes() == 0:
        out = cuda.device_array(shape, dtype=dtype, stream=stream)
    else:
        context = cuda.current_context()
        key = (context.device.id, int(stream) if stream else 0, nbytes)
        arena = _POOL.take(key)
        if arena is None:
            arena = _allocate(context, nbytes)
        lease = MemoryPointer(context, arena.device_pointer, nbytes,
                              finalizer=functools.partial(_POOL.give_back, key, arena, nbytes))
        out = DeviceNDArray(shape, _c_strides(shape, dtype.itemsize), dtype, stream=stream,
                            gpu_data=lease)
    return _as_bfloat16(out) if dtype == BFLOAT16 else out


def to_device(host, stream=None):
    """A new device array (from :func:`empty`'s pool) holding the host array ``host``; the
    copy is queued on ``stream`` (as :func:`empty` takes it) without waiting for the device.

    For the default stream (0) the copy goes through Numba's Stream object of it: given 0,
    Numba copies with the synchronous ``cuMemcpyHtoD``, which first waits for the device's
    queued work. An asynchronous copy from pageable memory returns once the driver has staged
    the values, so ``host`` may be a temporary."""
    host = np.ascontiguousarray(host)
    if stream is None:
        stream = resolve_stream(None)
    out = empty(host.shape, host.dtype, stream)
    out.copy_to_device(host, stream=stream if stream or SIMULATED else cuda.default_stream())
    return out


def _allocate(context, nbytes: int):
    """A new device allocation; when the device is out of memory, the released buffers go back
    to the driver first and the allocation is tried once more."""
    try:
        return context.memalloc(nbytes)
    except CudaAPIError as exc:
        if exc.code != _OUT_OF_MEMORY or not _POOL.clear():
            raise
        context.memory_manager.deallocations.clear()  # Numba frees dropped buffers lazily
        return context.memalloc(nbytes)


def _c_strides(shape, itemsize: int) -> tuple:
    strides = []
    step = itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


@cuda.jit
def convert(src, dst):
    """``dst[i] = src[i]`` with dtype conversion (1-D): float64 results to an output dtype,
    int32 class indices to int64, strided to contiguous.

    src: (n,) any dtype, any stride; dst: (n,) the dtype converted to.
    """
    i = cuda.grid(1)
    if i < dst.shape[0]:
        dst[i] = src[i]


#: Values per block of the first launch of :func:`device_sum`.
_SUM_CHUNK = 1 << 15


def device_sum(values, out, stream):
    """``out[0] = sum(values)``, float64, in a fixed order.

    ``values``: 1-D device array (any float dtype); ``out``: device array of >= 1 float64 entry.
    Two launches of ``_reduce.sum_chunks``: fixed chunks of ``2**15`` values -> float64 partials
    -> one block.
    """
    n = values.shape[0]
    n_chunks = launch_blocks(n, _SUM_CHUNK)
    if n_chunks == 1:
        sum_chunks[1, THREADS, stream](values, out, _SUM_CHUNK)
        return
    partials = empty((n_chunks,), np.float64, stream)
    sum_chunks[n_chunks, THREADS, stream](values, partials, _SUM_CHUNK)
    sum_chunks[1, THREADS, stream](partials, out, n_chunks)


def resolve_stream(stream):
    """The stream kernels of one call run on (see the module docstring)."""
    if SIMULATED:
        return 0
    if stream is None:
        return _framework_stream()
    if isinstance(stream, (int, np.integer)):
        return cuda.external_stream(int(stream)) if stream else 0
    return stream


def _framework_stream():
    """PyTorch's current stream if PyTorch is in use with CUDA, else the default stream (0).

    The API hands the backend Numba views of PyTorch tensors, so the tensors themselves are not
    seen here; PyTorch being imported with CUDA initialised is what counts. Its default
    stream is the legacy default stream, handle 0, which orders with everything anyway.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    handle = torch.cuda.current_stream().cuda_stream
    return cuda.external_stream(handle) if handle else 0


def launch_blocks(n_items: int, per_block: int) -> int:
    """Number of blocks covering ``n_items`` at ``per_block`` items each (at least one)."""
    return max(1, -(-int(n_items) // int(per_block)))
