"""Non-temporal ("streaming") stores for outputs written once and not read again soon.

An ordinary store first reads its cache line from memory (the line must be owned before it is
modified), so writing an output costs two transfers per byte; a non-temporal store writes whole
64-byte lines to memory without reading them, and leaves the caches to the inputs. Measured on
the 2-core Xeon of ``docs/performance.md`` (2026-12-05, two threads, float32 ``out = 1.5 * x``
row by row through an L1 staging row, two buffer pairs in rotation, GB/s of bytes read +
written): 51 MB arrays 23.1-23.4 GB/s with ordinary stores, 29.8-31.8 with non-temporal ones;
16.8 MB arrays 29.3-32.6 against 46.7-47.3. With the output 16 bytes past a line, so that each
1 KiB row starts and ends in a partial line written with ordinary stores, the streamed loop was
no faster (21.8-22.2 against 22.9-23.1 GB/s): callers stream only whole lines.

Not on every CPU: on the 2-core AMD EPYC (Zen 5, ``znver5``) of ``docs/performance.md``
(2026-12-05, two threads, each version alternately in one process) the cross-entropy's
streamed rows were the slower ones, 4096 x 32000 float32 28.9 ms streamed against 21.0 with
ordinary stores, 1024 x 128256 26.6 against 20.4 (one thread: 50.4 / 40.5, 46.4 / 35.7). A
bare loop there showed why: one core reading a row and streaming it back took the sum of the
read alone and the write alone (17 + 15 ms over 524 MB each way), while the same copy with
ordinary stores took 25.5 ms. So the cross-entropy streams only where :data:`STREAMING_PAYS`:
on every CPU but AMD's Zen cores, the one family measured slower. Batch norm streams on every
CPU: its streamed sweeps were level or slower on that EPYC while their loops used 512-bit
vectors ((N, C) 4096 x 1024: 1.91 against 1.65 ms), and faster since they use 256-bit ones
(``batch_norm``'s module docstring).

The stores are weakly ordered: :func:`store_fence` must follow them before another thread reads
the memory (each parallel worker calls it at the end of its share).

Users: batch norm's second sweeps (``batch_norm._streams``) and the fused cross-entropy's rows
of large vocabularies (``cross_entropy._streams_rows``), both from STREAM_MIN_BYTES of output.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._codegen import HOST_CPU_NAME, is_amd_zen

#: Bytes per non-temporal store: one cache line, one 512-bit vector.
STREAM_BYTES = 64
#: Outputs from this size on are written with non-temporal stores where the rows allow it:
#: the two L2 caches of the machines in docs/performance.md, 2 x 2 MiB.
STREAM_MIN_BYTES = 4 * 1024 * 1024


def streaming_pays_on(cpu_name: str) -> bool:
    """Whether non-temporal stores speed up large outputs on the CPU LLVM calls ``cpu_name``
    (``llvmlite.binding.get_host_cpu_name()``): not on AMD's Zen cores (``znver*``), see the
    module's docstring. A property of the machine, never of a measurement, so a machine
    always takes the same path."""
    return not is_amd_zen(cpu_name)


#: Whether the cross-entropy writes large gradients with non-temporal stores on this machine
#: (read at call time: tests set it to run the streamed path on any machine).
STREAMING_PAYS = streaming_pays_on(HOST_CPU_NAME)


@intrinsic
def _stream_lines(typingctx, dst, dst_start, src, src_start, n_lines):
    """dst[dst_start + k] = src[src_start + k] for k < n_lines * (64 / itemsize), 64 bytes per
    non-temporal store. dst[dst_start] must be 64-byte aligned; src needs no alignment."""
    def codegen(context, builder, signature, args):
        dst_value, dst_index, src_value, src_index, count = args
        dst_array = context.make_array(signature.args[0])(context, builder, dst_value)
        src_array = context.make_array(signature.args[2])(context, builder, src_value)
        element = context.get_value_type(signature.args[0].dtype)
        itemsize = context.get_abi_sizeof(element)
        line = ir.VectorType(element, STREAM_BYTES // itemsize)
        dst_lines = builder.bitcast(builder.gep(dst_array.data, [dst_index]), line.as_pointer())
        src_lines = builder.bitcast(builder.gep(src_array.data, [src_index]), line.as_pointer())
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, count) as loop:
            value = builder.load(builder.gep(src_lines, [loop.index]), align=itemsize)
            store = builder.store(value, builder.gep(dst_lines, [loop.index]),
                                  align=STREAM_BYTES)
            store.set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()

    return types.void(dst, dst_start, src, src_start, n_lines), codegen


@intrinsic
def store_fence(typingctx):
    """Order every earlier store of this thread, non-temporal ones included, before later memory
    operations (a sequentially consistent fence: ``mfence`` on x86)."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, inline="always")
def stream_copy(dst, start, src, n):
    """dst[start:start + n] = src[:n], the whole 64-byte lines of dst with non-temporal stores
    (dst and src 1-D and contiguous, of one dtype; src typically a row in L1)."""
    per_line = STREAM_BYTES // dst.itemsize
    head = min(n, ((-(dst.ctypes.data + start * dst.itemsize)) % STREAM_BYTES) // dst.itemsize)
    for k in range(head):
        dst[start + k] = src[k]
    n_lines = (n - head) // per_line
    if n_lines > 0:
        _stream_lines(dst, start + head, src, head, n_lines)
    for k in range(head + n_lines * per_line, n):
        dst[start + k] = src[k]
