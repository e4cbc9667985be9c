"""Shared machinery of the CUDA test files (``test_cuda_*.py``); not a test module itself.

Numba picks the CUDA simulator or the real target once per process, from
``NUMBA_ENABLE_CUDASIM`` at import. So each CUDA test file runs its tests in one of two ways:

* in a process with the simulator switched on, or with a real GPU: the tests run directly;
* otherwise (the usual CI process: no GPU, no simulator) a single test re-runs the same file
  under pytest in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (started beside the rest of
  the suite, see ``background``) and asserts it passed; the direct tests are skipped in the
  parent, so every kernel still runs once per pytest session.

The ``api`` fixture (import it into the test module) is the public package: under the
simulator, ``fusedgrad._device.is_device_array`` recognises the simulator's fake device arrays
(which carry no ``__cuda_array_interface__``), so they take the CUDA path as real ones do.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import background

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _real_gpu() -> bool:
    if SIMULATED:
        return False
    from fusedgrad import _device
    return _device.cuda_available()


#: Whether the CUDA tests run in this process (simulator or real GPU).
RUN_HERE = SIMULATED or _real_gpu()

#: Mark for tests that need a real GPU (bfloat16 through PyTorch).
real_gpu_only = pytest.mark.skipif(
    SIMULATED or not RUN_HERE, reason="bfloat16 needs a real GPU (the simulator has none)")

#: Mark for tests of real launches and allocations: sizes the simulator cannot run in time,
#: launch-resource limits and the device buffer pool, which the simulator does not have.
real_gpu = pytest.mark.skipif(SIMULATED or not RUN_HERE, reason="runs only on a real GPU")

#: Mark for the direct tests of a CUDA test file.
direct = pytest.mark.skipif(
    not RUN_HERE, reason="runs in the CUDA-simulator subprocess (test_*_in_simulator)")


def simulator_run(path: str, timeout: float = 480.0) -> background.Run:
    """One test file under pytest with the simulator on, in a subprocess."""
    return background.Run(
        "simulator-" + os.path.basename(path),
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", path],
        env={"NUMBA_ENABLE_CUDASIM": "1"}, timeout=timeout)


def simulator_test(path: str):
    """The test that runs the file at ``path`` in the simulator when this process can't run it
    (beside the rest of the suite, see ``background``)."""
    if RUN_HERE:
        def test_kernels_in_simulator():
            pytest.skip("this process runs the tests directly")
        return test_kernels_in_simulator

    run = simulator_run(path)

    @run.mark
    def test_kernels_in_simulator():
        proc = run.result()
        assert proc.returncode == 0, (f"simulator run of {os.path.basename(path)} failed:\n"
                                      + proc.stdout[-6000:] + proc.stderr[-3000:])
        assert " passed" in proc.stdout, proc.stdout[-2000:]
    return test_kernels_in_simulator


@pytest.fixture
def api():
    """The ``fusedgrad`` package (its device detection routes simulator arrays to the GPU path)."""
    import fusedgrad
    return fusedgrad


def to_device(array):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(array))


def to_host(array) -> np.ndarray:
    return np.asarray(array.copy_to_host())


def torch_bfloat16(array):
    """A PyTorch CUDA bfloat16 tensor holding ``array`` (rounded), and its values as float64."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    tensor = torch.tensor(np.asarray(array, dtype=np.float32), device="cuda",
                          dtype=torch.bfloat16)
    return tensor, tensor.float().cpu().numpy().astype(np.float64)


def bfloat16_values(device_array) -> np.ndarray:
    """float64 values of a bfloat16 device array (its host copy holds raw two-byte ``V2``)."""
    bits = np.asarray(device_array.copy_to_host()).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64)
