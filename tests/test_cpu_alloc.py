"""The host buffer cache: reuse only after every view of an output is gone, bounded, optional."""
import gc

import numpy as np
import pytest

import fusedgrad as fg
from fusedgrad.cpu import _alloc

LARGE = (1024, 512)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def empty_cache():
    fg.empty_cache()
    yield
    fg.empty_cache()


def first_nbytes():
    """Bytes the pool holds for one released LARGE buffer: the array and the slack that lets
    it start on a 64-byte boundary."""
    return int(np.prod(LARGE)) * 4 + _alloc.ALIGNMENT - 1


def test_pooled_buffers_start_on_a_cache_line():
    """The kernels' non-temporal stores need 64-byte aligned rows (NumPy's large arrays start
    16 bytes past a page), fresh from the allocator or reused."""
    for _ in range(3):
        array = _alloc.empty(LARGE, np.float32)
        assert array.ctypes.data % 64 == 0 and array.shape == LARGE
        assert array.nbytes == first_nbytes() - (_alloc.ALIGNMENT - 1)
        del array
        gc.collect()


def test_released_buffer_is_reused():
    first = _alloc.empty(LARGE, np.float32)
    address = first.ctypes.data
    del first
    gc.collect()
    assert _alloc.cached_bytes() == first_nbytes()
    second = _alloc.empty(LARGE, np.float32)
    assert second.ctypes.data == address
    assert _alloc.cached_bytes() == 0


def test_buffer_stays_leased_while_any_view_lives():
    array = _alloc.empty(LARGE, np.float32)
    derived = [array[3:9].T, array.reshape(-1)[::7], array.view(np.int32)]
    address = array.ctypes.data
    del array
    while derived:
        gc.collect()
        assert _alloc.cached_bytes() == 0
        other = _alloc.empty(LARGE, np.float32)
        assert other.ctypes.data != address
        del other
        _alloc.empty_cache()
        derived.pop()
    gc.collect()
    assert _alloc.cached_bytes() == first_nbytes()


def test_buffer_stays_leased_while_a_torch_tensor_shares_it():
    torch = pytest.importorskip("torch")
    array = _alloc.empty(LARGE, np.float32)
    tensor = torch.from_numpy(array)
    del array
    gc.collect()
    assert _alloc.cached_bytes() == 0
    del tensor
    gc.collect()
    assert _alloc.cached_bytes() == first_nbytes()


def test_result_is_a_plain_writeable_contiguous_array():
    array = _alloc.empty(LARGE, np.float64)
    assert type(array) is np.ndarray
    assert array.shape == LARGE and array.dtype == np.float64
    assert array.flags.c_contiguous and array.flags.writeable


def test_small_arrays_bypass_the_cache():
    small = _alloc.empty((4, 4), np.float32)
    del small
    gc.collect()
    assert _alloc.cached_bytes() == 0


def test_cache_limit_from_environment(monkeypatch):
    monkeypatch.setenv("FUSEDGRAD_HOST_CACHE_MB", "3")
    buffers = [_alloc.empty(LARGE, np.float32) for _ in range(3)]
    del buffers
    gc.collect()
    assert _alloc.cached_bytes() == first_nbytes()  # 3 MiB holds one 2 MiB buffer
    monkeypatch.setenv("FUSEDGRAD_HOST_CACHE_MB", "0")
    unused = _alloc.empty(LARGE, np.float32)
    assert _alloc.cached_bytes() == first_nbytes()
    del unused


def test_bad_cache_limit_is_reported(monkeypatch):
    monkeypatch.setenv("FUSEDGRAD_HOST_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="FUSEDGRAD_HOST_CACHE_MB"):
        _alloc.empty(LARGE, np.float32)


def test_gradients_from_reused_buffers_are_fresh():
    """A reused buffer holds the previous call's values: every element must be overwritten."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 8192), dtype=np.float32)
    target = rng.integers(0, 8192, size=64)
    target[::5] = -100  # ignored rows are written as zeros, not left over
    _, expected = fg.softmax_cross_entropy(logits, target)
    _, garbage = fg.softmax_cross_entropy(logits * 7, np.zeros(64, np.int64))
    address = garbage.ctypes.data
    del garbage
    gc.collect()
    _, grad = fg.softmax_cross_entropy(logits, target)
    assert grad.ctypes.data == address
    np.testing.assert_array_equal(grad, expected)
