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

#: The attribute's IR text. llvmlite validates function attributes against a list that has no
#: string (key = value) attributes, so it is added to the set directly and goes into the IR as
#: written.
_PREFER_512_BIT = '"prefer-vector-width"="512"'


@intrinsic
def prefer_wide_vectors(typingctx):
    """Ask LLVM to vectorise the calling function with 512-bit vectors where the CPU has them.

    It marks the LLVM function being generated, so call it inside a ``prange`` body, which
    Numba compiles as a function of its own (the parallel loop's work). No instruction is
    emitted.
    """
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, _PREFER_512_BIT)
        return context.get_dummy_value()

    return types.none(), codegen
