"""Per-function code-generation hints for the CPU kernels.

LLVM's x86 backend vectorises with 256-bit registers on AVX-512 CPUs unless a function asks for
wider ones: the host's ``prefer-256-bit`` tuning, which Numba inherits, guards against the lower
clock that 512-bit code caused on older Xeons. Where a loop is bound by arithmetic rather than
memory, 512-bit vectors halve the instructions of its vector loops: the row kernels of the
cross-entropy (one exp per element) measured 10-15% faster with them on data in cache
(2026-12-04, the 2-core Xeon of ``docs/performance.md``: 8192 x 1000 float32, 2.61-2.62 ->
2.33-2.37 ms; 64 x 128256, 0.32-0.34 -> 0.28-0.29 ns per element), and no faster on data
streamed from memory. The batch-norm sweeps showed no
consistent difference, the small-class cross-entropy kernel none either, and the spatial one
was 2-9% slower, so they keep the default.

AMD's Zen 4 and 5 are the other way round: LLVM's tuning for them prefers 512-bit vectors, and
there loops that write a stream of memory ran slower with them. A plain Numba loop y = (x - m) s
+ t over a 4096 x 1024 float32 array, one thread: 0.79-0.97 ms with 512-bit vectors, 0.46-0.50
ms with 256-bit ones (as fast as PyTorch's own loop, 0.46-0.50 ms), on the 2-core Zen 5 EPYC of
``docs/performance.md`` (2026-12-05). So the batch-norm loops that write x-sized outputs ask for
256 bits (:func:`prefer_narrow_vectors`: a no-op on Intel), which made its (N, C) 4096 x 1024
backward 0.96 -> 0.75-0.77 ms, the channels-last 64 x 28 x 28 x 256 forward 2.53 -> 2.07-2.20
ms and the eval pass 1.35 -> 1.21 ms, in one process with the variants taking turns; the
reductions (loads only) and the cross-entropy row kernels measured the same either way there.

Setting the preference for the whole process (``NUMBA_CPU_FEATURES``) would change every other
Numba function of the user's program, so a kernel asks for itself, with the LLVM function
attribute ``prefer-vector-width``, which the x86 backend reads per function (other targets
ignore it; CPUs without AVX-512 have no vectors wider than 256 bits to use).

Also here: the host CPU's name as LLVM gives it, and the one family test the other modules
make on it (:func:`is_amd_zen`), so that they decide from the same name.
"""
from llvmlite import binding
from numba.core import types
from numba.extending import intrinsic

#: The host CPU as LLVM names it (``llvmlite.binding.get_host_cpu_name()``): "znver5",
#: "sapphirerapids", ... The choices that depend on the CPU family read it once, at import.
HOST_CPU_NAME = binding.get_host_cpu_name()


def is_amd_zen(cpu_name: str) -> bool:
    """Whether LLVM's ``cpu_name`` is one of AMD's Zen cores (``znver*``): the family on which
    non-temporal stores (``_stream.streaming_pays_on``) and PyTorch's BLAS
    (``_arrays.torch_blas_pays_on``) were measured slower."""
    return cpu_name.startswith("znver")


#: The attributes' IR text. llvmlite validates function attributes against a list that has no
#: string (key = value) attributes, so they are added to the set directly and go into the IR as
#: written.
_PREFER_512_BIT = '"prefer-vector-width"="512"'
_PREFER_256_BIT = '"prefer-vector-width"="256"'


def _mark_function(attribute):
    """Codegen of a hint: add ``attribute`` to the LLVM function being generated; no
    instruction is emitted."""
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, attribute)
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefer_wide_vectors(typingctx):
    """Ask LLVM to vectorise the calling function with 512-bit vectors where the CPU has them.

    It marks the LLVM function being generated, so call it inside a ``prange`` body, which
    Numba compiles as a function of its own (the parallel loop's work).
    """
    return types.none(), _mark_function(_PREFER_512_BIT)


@intrinsic
def prefer_narrow_vectors(typingctx):
    """Ask LLVM to vectorise the calling function with 256-bit vectors: for loops that stream
    memory, on the CPUs whose tuning would otherwise pick 512 bits (AMD Zen 4 and 5).

    A no-op where 256 bits is the default already (Intel's AVX-512 Xeons). Call it in the
    function that holds the loop (a ``prange`` body, or an ``@njit`` function not inlined).
    """
    return types.none(), _mark_function(_PREFER_256_BIT)
