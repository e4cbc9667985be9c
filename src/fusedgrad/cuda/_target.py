"""Which CUDA target this process compiles the ``@cuda.jit`` kernels for.

Numba decides once per process, from ``NUMBA_ENABLE_CUDASIM`` at import: real GPU code, or its
CUDA simulator (every GPU thread a Python thread, no warp shuffles, no bfloat16). The other
modules of this package choose their reductions, launch sizes and dtypes from :data:`SIMULATED`,
which lives here, below all of them, so that none of them has to import another for it.
"""
from __future__ import annotations

from numba.cuda.core import config

#: True when Numba's CUDA simulator stands in for the GPU in this process.
SIMULATED = bool(config.ENABLE_CUDASIM)
