"""The agent's model cache: blobs in shared memory by digest, pinned while in use, LRU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client_agent.model_cache import ModelCache
from trainer_worker import shm

SHM = Path("/dev/shm")


@pytest.fixture
def cache() -> Iterator[ModelCache]:
    models = ModelCache(max_bytes=300)
    yield models
    models.close()


def _exists(name: str) -> bool:
    return (SHM / name).exists()


def test_put_copies_into_a_segment_trainers_can_attach(cache: ModelCache) -> None:
    """put copies the blob into a named segment holding exactly those bytes."""
    segment = cache.put("d1", bytearray(b"model bytes"))
    assert (segment.digest, segment.nbytes) == ("d1", 11)
    other = shm.attach(segment.name)
    try:
        assert bytes(shm.buffer(other)[: segment.nbytes]) == b"model bytes"
    finally:
        shm.release(other)
    assert bytes(cache.view("d1")) == b"model bytes"


def test_put_of_a_cached_digest_returns_the_existing_segment(cache: ModelCache) -> None:
    """A digest is stored once; get finds it, an unknown digest gives None."""
    first = cache.put("d1", b"abc")
    assert cache.put("d1", memoryview(b"abc")) == first
    assert cache.get("d1") == first
    assert cache.get("nope") is None
    assert len(cache) == 1


def test_least_recently_used_goes_first(cache: ModelCache) -> None:
    """Beyond max_bytes the least recently used unpinned segment is unlinked."""
    a = cache.put("a", bytes(100))
    cache.put("b", bytes(100))
    cache.put("c", bytes(100))
    cache.get("a")  # now b is the oldest
    cache.put("d", bytes(100))
    assert [d for d in "abcd" if d in cache] == ["a", "c", "d"]
    assert _exists(a.name)
    assert cache.nbytes == 300


def test_entry_count_is_bounded_whatever_the_bytes() -> None:
    """Beyond max_entries the least recently used unpinned segments go, however small."""
    cache = ModelCache(max_bytes=10**9, max_entries=2)
    try:
        first = cache.put("a", b"x")
        cache.acquire("a")
        for digest in "bcd":
            cache.put(digest, b"y")
        assert [d for d in "abcd" if d in cache] == ["a", "d"]
        assert _exists(first.name)
    finally:
        cache.close()


def test_pinned_segments_are_never_evicted(cache: ModelCache) -> None:
    """A pinned segment survives any pressure and can be evicted once fully released."""
    a = cache.put("a", bytes(200))
    cache.acquire("a")
    cache.acquire("a")
    cache.put("b", bytes(200))
    cache.put("c", bytes(200))
    assert "a" in cache
    assert _exists(a.name)
    cache.release("a")
    cache.release("a")
    cache.put("d", bytes(200))
    assert "a" not in cache
    assert not _exists(a.name)


def test_a_new_entry_is_kept_even_if_alone_it_is_too_big(cache: ModelCache) -> None:
    """A blob larger than the budget is still cached (until something newer comes)."""
    big = cache.put("big", bytes(1000))
    assert cache.get("big") == big
    assert _exists(big.name)


def test_release_without_acquire_is_an_error(cache: ModelCache) -> None:
    """Unbalanced release and acquire of an unknown digest raise KeyError."""
    cache.put("a", b"x")
    with pytest.raises(KeyError):
        cache.release("a")
    with pytest.raises(KeyError):
        cache.acquire("missing")


def test_close_unlinks_everything(cache: ModelCache) -> None:
    """close removes every segment, pinned ones included."""
    names = [cache.put(d, b"x" * 10).name for d in "ab"]
    cache.acquire("a")
    cache.close()
    assert len(cache) == 0
    assert not any(_exists(n) for n in names)
