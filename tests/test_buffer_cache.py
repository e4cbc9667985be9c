"""``fusedgrad._buffer_cache.ReleasedBuffers``: the pool behind the host and device caches."""
from __future__ import annotations

import pytest

import fusedgrad as fg
from fusedgrad import _buffer_cache
from fusedgrad._buffer_cache import ReleasedBuffers

MIB = 1 << 20


@pytest.fixture
def make_pool():
    """Pools for one test, taken off the module's list of pools (which fg.empty_cache walks)
    afterwards."""
    made = []

    def make(default_mb):
        made.append(ReleasedBuffers("FUSEDGRAD_TEST_CACHE_MB", default_mb=default_mb))
        return made[-1]
    yield make
    for pool in made:
        _buffer_cache._POOLS.remove(pool)


@pytest.fixture
def pool(monkeypatch, make_pool):
    monkeypatch.setenv("FUSEDGRAD_TEST_CACHE_MB", "10")
    return make_pool(default_mb=1)


def test_buffers_come_back_only_under_their_own_key(pool):
    pool.give_back(("gpu0", "stream1", MIB), "a", MIB)
    assert pool.take(("gpu0", "stream2", MIB)) is None  # another stream gets nothing
    assert pool.take(("gpu0", "stream1", 2 * MIB)) is None  # nor another size
    assert pool.cached_bytes == MIB
    assert pool.take(("gpu0", "stream1", MIB)) == "a"
    assert pool.cached_bytes == 0 and pool.take(("gpu0", "stream1", MIB)) is None


def test_most_recently_released_buffer_comes_back_first(pool):
    pool.give_back(MIB, "older", MIB)
    pool.give_back(MIB, "newer", MIB)
    assert [pool.take(MIB), pool.take(MIB)] == ["newer", "older"]


def test_limit_drops_least_recently_released_keys_first(pool):
    for name, nbytes in (("a", 4 * MIB), ("b", 3 * MIB), ("c", 2 * MIB), ("d", 3 * MIB)):
        pool.give_back(nbytes, name, nbytes)
    # 12 MiB released into a 10 MiB pool: "a", the oldest, is dropped.
    assert pool.cached_bytes == 8 * MIB
    assert pool.take(4 * MIB) is None
    assert pool.take(3 * MIB) == "d" and pool.take(2 * MIB) == "c"


def test_a_buffer_larger_than_the_limit_is_not_kept(pool, monkeypatch):
    pool.give_back(11 * MIB, "huge", 11 * MIB)
    assert pool.cached_bytes == 0
    monkeypatch.setenv("FUSEDGRAD_TEST_CACHE_MB", "0")
    pool.give_back(MIB, "small", MIB)
    assert pool.cached_bytes == 0


def test_default_limit_and_bad_values(monkeypatch, make_pool):
    monkeypatch.delenv("FUSEDGRAD_TEST_CACHE_MB", raising=False)
    pool = make_pool(default_mb=3)
    assert pool.limit_bytes() == 3 * MIB
    monkeypatch.setenv("FUSEDGRAD_TEST_CACHE_MB", "-5")
    assert pool.limit_bytes() == 0
    monkeypatch.setenv("FUSEDGRAD_TEST_CACHE_MB", "plenty")
    with pytest.raises(ValueError, match="FUSEDGRAD_TEST_CACHE_MB must be a number"):
        pool.give_back(MIB, "a", MIB)


def test_public_empty_cache_empties_every_pool(pool):
    assert pool in _buffer_cache._POOLS
    pool.give_back(MIB, "a", MIB)
    pool.give_back(2 * MIB, "b", 2 * MIB)
    assert fg.empty_cache() >= 3 * MIB
    assert pool.cached_bytes == 0 and pool.take(MIB) is None
