"""Blobs against a real Redis: content addressing, dedupe, TTL, chunking, missing blobs."""

from __future__ import annotations

import array
import asyncio
import hashlib
import os
import time

import pytest
import redis.asyncio as aioredis

from bus.blobs import DEFAULT_CHUNK_BYTES, THREAD_BYTES, BlobRef, BlobStore, digest_of
from bus.errors import BlobMissing, BlobSizeMismatch
from bus.keys import Keys


async def run_key_count(r: aioredis.Redis, keys: Keys) -> int:
    return len([k async for k in r.scan_iter(match=keys.pattern())])


async def test_put_get_round_trip(redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """A blob is stored under its sha256 with the TTL and comes back byte for byte."""
    store = BlobStore(redis_client, run_keys, ttl_ms=60_000)
    data = os.urandom(10_000)
    ref = await store.put(data)
    assert ref == BlobRef(hashlib.sha256(data).hexdigest(), len(data))
    assert await store.get(ref, verify=True) == data
    assert 0 < await redis_client.pttl(run_keys.blob(ref.digest)) <= 60_000


@pytest.mark.parametrize("chunk_bytes", [DEFAULT_CHUNK_BYTES, 1024])
async def test_same_bytes_twice_are_stored_once_with_ttl_refreshed(
        redis_client: aioredis.Redis, run_keys: Keys, chunk_bytes: int) -> None:
    """Putting stored bytes again (whole or chunked) adds no key and refreshes every TTL."""
    store = BlobStore(redis_client, run_keys, ttl_ms=60_000, chunk_bytes=chunk_bytes)
    data = os.urandom(3000)
    ref = await store.put(data)
    names = [k async for k in redis_client.scan_iter(match=run_keys.pattern())]
    for name in names:
        await redis_client.pexpire(name, 1000)
    assert await store.put(data) == ref
    assert await run_key_count(redis_client, run_keys) == len(names)
    assert min([await redis_client.pttl(name) for name in names]) > 1000


async def test_memoryview_of_any_format_is_stored_as_its_bytes(
        redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """A memoryview over floats is stored as its raw bytes, sized in bytes."""
    floats = array.array("f", range(1000))
    ref = await BlobStore(redis_client, run_keys).put(memoryview(floats))
    assert ref.nbytes == 4000
    assert await BlobStore(redis_client, run_keys).get(ref) == floats.tobytes()


async def test_big_blob_hashed_off_the_loop_round_trips(redis_client: aioredis.Redis,
                                                        run_keys: Keys) -> None:
    """A blob above THREAD_BYTES (hashed in a thread) gets the same sha256 key."""
    data = os.urandom(THREAD_BYTES + 1)
    ref = await BlobStore(redis_client, run_keys).put(data)
    assert ref.digest == hashlib.sha256(data).hexdigest()
    assert await redis_client.exists(run_keys.blob(ref.digest))


async def test_caller_supplied_digest_is_the_key(redis_client: aioredis.Redis,
                                                 run_keys: Keys) -> None:
    """A caller that knows the digest skips hashing; the blob lands under that digest."""
    data = b"abc" * 100
    ref = await BlobStore(redis_client, run_keys).put(data, digest=digest_of(data))
    assert await redis_client.get(run_keys.blob(ref.digest)) == data


async def test_blob_expires(redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """After its TTL a blob is gone and get raises BlobMissing."""
    store = BlobStore(redis_client, run_keys, ttl_ms=50)
    ref = await store.put(b"short-lived")
    deadline = time.monotonic() + 5
    while await redis_client.exists(run_keys.blob(ref.digest)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    with pytest.raises(BlobMissing):
        await store.get(ref)


async def test_unknown_blob_is_missing(redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """A reference to bytes never put raises BlobMissing."""
    with pytest.raises(BlobMissing, match="not stored"):
        await BlobStore(redis_client, run_keys).get(BlobRef("0" * 64, 10))


async def test_verify_detects_other_content(redis_client: aioredis.Redis,
                                            run_keys: Keys) -> None:
    """verify=True rejects stored bytes whose digest differs from the reference."""
    store = BlobStore(redis_client, run_keys)
    ref = await store.put(b"original")
    await redis_client.set(run_keys.blob(ref.digest), b"tampered")
    assert await store.get(ref) == b"tampered"
    with pytest.raises(BlobMissing, match="another digest"):
        await store.get(ref, verify=True)


async def test_chunked_round_trip_and_keys(redis_client: aioredis.Redis,
                                           run_keys: Keys) -> None:
    """Above chunk_bytes a blob is stored as chunks plus a manifest, and reads back whole."""
    store = BlobStore(redis_client, run_keys, chunk_bytes=1024, parallel=3)
    data = os.urandom(5 * 1024 + 100)
    ref = await store.put(data)
    assert await run_key_count(redis_client, run_keys) == 6 + 1
    assert len(await redis_client.get(run_keys.blob_chunk(ref.digest, 5))) == 100
    got = await store.get(ref, verify=True)
    assert isinstance(got, bytearray)
    assert got == data
    assert await store.put(data) == ref
    assert await run_key_count(redis_client, run_keys) == 7


async def test_reader_needs_not_the_writers_chunk_size(redis_client: aioredis.Redis,
                                                       run_keys: Keys) -> None:
    """A reader with another chunk_bytes reads chunked and whole blobs alike."""
    chunked = await BlobStore(redis_client, run_keys, chunk_bytes=1024).put(os.urandom(4000))
    whole = await BlobStore(redis_client, run_keys).put(os.urandom(4000))
    small_reader = BlobStore(redis_client, run_keys, chunk_bytes=2048)
    default_reader = BlobStore(redis_client, run_keys)
    for ref in (chunked, whole):
        for reader in (small_reader, default_reader):
            assert digest_of(await reader.get(ref)) == ref.digest


async def test_missing_chunk_is_blob_missing(redis_client: aioredis.Redis,
                                             run_keys: Keys) -> None:
    """A chunked blob with a chunk gone raises BlobMissing."""
    store = BlobStore(redis_client, run_keys, chunk_bytes=1024)
    ref = await store.put(os.urandom(3000))
    await redis_client.delete(run_keys.blob_chunk(ref.digest, 1))
    with pytest.raises(BlobMissing, match="chunk 1"):
        await store.get(ref)


@pytest.mark.parametrize("nbytes", [3000, 500])
async def test_delete_unlinks_every_key(redis_client: aioredis.Redis, run_keys: Keys,
                                        nbytes: int) -> None:
    """delete removes the blob and all of its chunks."""
    store = BlobStore(redis_client, run_keys, chunk_bytes=1024)
    ref = await store.put(os.urandom(nbytes))
    await store.delete(ref)
    assert await run_key_count(redis_client, run_keys) == 0
    with pytest.raises(BlobMissing):
        await store.get(ref)


async def _bytes_sent(r: aioredis.Redis) -> int:
    """What Redis has written to its clients so far (INFO stats)."""
    return int((await r.info("stats"))["total_net_output_bytes"])


async def test_a_value_longer_than_claimed_is_not_read(redis_client: aioredis.Redis,
                                                       run_keys: Keys) -> None:
    """An 8 MiB value under a blob that a reference claims is 1000 bytes: rejected unread."""
    digest = "ab" * 32
    await redis_client.setrange(run_keys.blob(digest), 8 * 2**20 - 1, b"x")
    before = await _bytes_sent(redis_client)
    with pytest.raises(BlobSizeMismatch, match=f"{8 * 2**20} bytes"):
        await BlobStore(redis_client, run_keys).get(BlobRef(digest, 1000))
    assert await _bytes_sent(redis_client) - before < 64 * 1024


async def test_a_chunk_longer_than_its_share_is_not_read(redis_client: aioredis.Redis,
                                                         run_keys: Keys) -> None:
    """A chunk stored longer than the blob's manifest and size say: rejected unread."""
    store = BlobStore(redis_client, run_keys, chunk_bytes=1024)
    ref = await store.put(os.urandom(3000))
    await redis_client.setrange(run_keys.blob_chunk(ref.digest, 1), 8 * 2**20 - 1, b"x")
    before = await _bytes_sent(redis_client)
    with pytest.raises(BlobSizeMismatch, match="chunk 1"):
        await store.get(ref)
    assert await _bytes_sent(redis_client) - before < 64 * 1024


@pytest.mark.parametrize("chunk_bytes", [1, 1023, 3000, 2**40])
async def test_a_manifest_with_an_unusable_chunk_size_is_refused(
        redis_client: aioredis.Redis, run_keys: Keys, chunk_bytes: int) -> None:
    """A forged manifest (chunks below the floor, or not smaller than the blob) is refused
    before any chunk is looked up."""
    digest = "cd" * 32
    await redis_client.set(run_keys.blob(digest), b"PWFLCHNK" + chunk_bytes.to_bytes(8, "little"))
    with pytest.raises(BlobSizeMismatch, match="no usable manifest"):
        await BlobStore(redis_client, run_keys).get(BlobRef(digest, 3000))


async def test_a_reference_of_no_bytes_is_refused(redis_client: aioredis.Redis,
                                                  run_keys: Keys) -> None:
    """A reference claiming 0 bytes never reaches Redis (GETRANGE 0 -1 would read it all)."""
    with pytest.raises(BlobSizeMismatch):
        await BlobStore(redis_client, run_keys).get(BlobRef("ef" * 32, 0))


def test_chunk_size_has_a_floor(run_keys: Keys) -> None:
    """A chunk size below MIN_CHUNK_BYTES is refused."""
    with pytest.raises(ValueError, match="chunk_bytes"):
        BlobStore(None, run_keys, chunk_bytes=10)  # type: ignore[arg-type]
