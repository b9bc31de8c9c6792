"""Content-addressed blobs: SET once under their sha256, fetch, expire, unlink.

Blobs above `chunk_bytes` are stored as chunks ``blob:{digest}:{i}`` so that a
model larger than Redis's 512 MB bulk limit still travels; readers know the
layout from the size the message carries. STUB: signatures fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from bus.keys import Keys

DEFAULT_TTL_MS = 30 * 60 * 1000
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class BlobRef:
    digest: str  # sha256 hex of the bytes
    nbytes: int


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """sha256 hex digest (hashlib releases the GIL: call it from a thread for big data)."""
    raise NotImplementedError


class BlobStore:
    """Blobs of one run."""

    def __init__(self, r: aioredis.Redis, keys: Keys, *, ttl_ms: int = DEFAULT_TTL_MS,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        raise NotImplementedError

    async def put(self, data: bytes | memoryview, digest: str | None = None) -> BlobRef:
        """Store once (SET NX with TTL; an existing blob only has its TTL refreshed)."""
        raise NotImplementedError

    async def get(self, ref: BlobRef, *, verify: bool = False) -> bytes | bytearray:
        """The blob's bytes; raises BlobMissing. `verify` re-hashes against the digest."""
        raise NotImplementedError

    async def delete(self, ref: BlobRef) -> None:
        """UNLINK the blob (all its chunks)."""
        raise NotImplementedError
