"""``fusedgrad.cuda._arrays``: the device buffer pool of ``empty`` and the NumPy 2.5 check.

The pool tests need a real GPU: the simulator allocates plainly (its arrays are NumPy arrays),
so they are skipped there and in CI; the pool's bookkeeping itself is tested on the host in
``test_buffer_cache.py``.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import cuda_support as cs
import fusedgrad as fg


LARGE = (1024, 512)  # 2 MiB of float32
NBYTES = 1024 * 512 * 4


@pytest.fixture
def empty_cache():
    fg.empty_cache()
    yield
    fg.empty_cache()


def _arrays():
    from fusedgrad.cuda import _arrays
    return _arrays


def _address(array) -> int:
    return array.__cuda_array_interface__["data"][0]


@cs.real_gpu
def test_released_device_buffer_is_reused_on_the_same_stream(empty_cache):
    from numba import cuda
    arrays = _arrays()
    first = arrays.empty(LARGE, np.float32, 0)
    address = _address(first)
    del first
    gc.collect()
    assert arrays._POOL.cached_bytes == NBYTES
    other_stream = cuda.stream()
    elsewhere = arrays.empty(LARGE, np.float32, other_stream)  # another stream: a new buffer
    assert _address(elsewhere) != address
    second = arrays.empty(LARGE, np.float32, 0)
    assert _address(second) == address and arrays._POOL.cached_bytes == 0
    assert second.shape == LARGE and second.is_c_contiguous()


@cs.real_gpu
def test_small_device_arrays_come_from_the_pool_too(empty_cache):
    """One-value and per-sample arrays: cuMemAlloc and Numba's batched cuMemFree would wait
    for the device (the module docstring)."""
    arrays = _arrays()
    first = arrays.to_device(np.array([2.5]), 0)
    address = _address(first)
    del first
    gc.collect()
    assert arrays._POOL.cached_bytes == 8
    again = arrays.empty((1,), np.float64, 0)
    assert _address(again) == address and arrays._POOL.cached_bytes == 0


@cs.real_gpu
def test_device_buffer_stays_leased_while_any_view_lives(empty_cache):
    torch = pytest.importorskip("torch")
    arrays = _arrays()
    array = arrays.empty(LARGE, np.float32, 0)
    derived = [array[3:9], array.reshape(NBYTES // 4), torch.as_tensor(array, device="cuda")]
    address = _address(array)
    del array
    while derived:
        gc.collect()
        assert arrays._POOL.cached_bytes == 0
        other = arrays.empty(LARGE, np.float32, 0)
        assert _address(other) != address
        del other
        fg.empty_cache()
        derived.pop()
    gc.collect()
    assert arrays._POOL.cached_bytes == NBYTES


@cs.real_gpu
def test_device_cache_can_be_switched_off(empty_cache, monkeypatch):
    arrays = _arrays()
    monkeypatch.setenv("FUSEDGRAD_DEVICE_CACHE_MB", "0")
    unused = arrays.empty(LARGE, np.float32, 0)
    del unused
    gc.collect()
    assert arrays._POOL.cached_bytes == 0


@cs.real_gpu
def test_gradients_from_reused_device_buffers_are_fresh(empty_cache):
    """A reused buffer holds the previous call's values: every element must be overwritten."""
    rng = np.random.default_rng(0)
    logits = cs.to_device(rng.standard_normal((64, 8192), dtype=np.float32))
    target = rng.integers(0, 8192, size=64)
    target[::5] = -100  # ignored rows are written as zeros, not left over
    _, expected = fg.softmax_cross_entropy(logits, cs.to_device(target))
    expected = cs.to_host(expected)
    x7 = cs.to_device(rng.standard_normal((64, 8192), dtype=np.float32) * 7)
    _, garbage = fg.softmax_cross_entropy(x7, cs.to_device(np.zeros(64, np.int64)))
    address = _address(garbage)
    del garbage
    gc.collect()
    _, grad = fg.softmax_cross_entropy(logits, cs.to_device(target))
    assert _address(grad) == address
    np.testing.assert_array_equal(cs.to_host(grad), expected)


def test_numpy_without_row_stack_gets_an_error_that_names_the_fix():
    """numba-cuda <= 0.30.4 cannot compile with NumPy 2.5 (no np.row_stack): loading the CUDA
    backend says so and how to fix it, instead of failing in the first kernel compilation."""
    code = ("import numpy\n"
            "if hasattr(numpy, 'row_stack'):\n"
            "    del numpy.row_stack  # what NumPy 2.5 looks like\n"
            "import fusedgrad.cuda._arrays\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"), timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "install numpy<2.5" in proc.stderr, proc.stderr
