"""Every CUDA kernel x dtype signature compiles to PTX for compute capability 9.0.

The simulator executes kernels as Python and hides typing errors; this test makes Numba really
compile them (``fusedgrad.cuda._compile``), without a GPU. It runs the compiler in a subprocess
with the simulator switched off, because Numba chooses simulator or real target per process and
``_compile`` stands in for the (absent) current device while it compiles.
"""
from __future__ import annotations

import re
import sys

import pytest

import background

pytest.importorskip("numba.cuda", reason="numba-cuda (the [cuda] extra) is not installed")


#: The compiler's run, beside the rest of the suite (see ``background``).
PTX_BUILD = background.Run("ptx", [sys.executable, "-m", "fusedgrad.cuda._compile", "--cc", "9.0"],
                           env={"NUMBA_ENABLE_CUDASIM": "0"}, timeout=480)


@PTX_BUILD.mark
def test_every_kernel_signature_compiles_to_ptx_for_cc90():
    proc = PTX_BUILD.result()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = re.search(r"(\d+)/(\d+) kernel signatures compiled to PTX for cc 9\.0", output)
    assert summary, output[-2000:]
    compiled, total = map(int, summary.groups())
    assert compiled == total
    for kernel in ("cross_entropy._ce_rows[float16]", "cross_entropy._ce_rows[bfloat16]",
                   "cross_entropy._ce_rows[float32]", "cross_entropy._ce_rows[float64]",
                   "batch_norm._partials[float16,float32]",
                   "batch_norm._partials[float32,float64]", "batch_norm._apply[float64]",
                   "batch_norm._apply[float16]", "batch_norm._apply[float32,C]",
                   "batch_norm._partials[float32,float32,C]", "cross_entropy._ce_rows[float32,C]",
                   "_reduce.sum_chunks"):
        assert f"ok   {kernel}" in output, kernel
