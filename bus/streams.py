"""Redis Streams: publish, consume in groups, ack, reclaim, dead-letter, trim.

Every entry has one field, ``m``, holding a msgpack message (serialization.messages).
STUB: signatures fixed; implementation pending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

FIELD = b"m"


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: where from, its id, its payload, times delivered."""

    stream: str
    entry_id: str
    payload: bytes  # b"" when the entry lacks the ``m`` field (a malformed entry)
    deliveries: int = 1


async def ensure_group(r: aioredis.Redis, stream: str, group: str, start_id: str = "0") -> None:
    """Create the group (and the stream); an existing group is fine, any other error raises."""
    raise NotImplementedError


async def publish(r: aioredis.Redis, stream: str, payload: bytes, *,
                  maxlen: int | None = None) -> str:
    """XADD one entry; returns its id."""
    raise NotImplementedError


async def publish_many(r: aioredis.Redis, items: Sequence[tuple[str, bytes]], *,
                       maxlen: int | None = None) -> list[str]:
    """XADD many entries in one pipeline round trip; ids in the same order."""
    raise NotImplementedError


async def consume(r: aioredis.Redis, streams: Sequence[str], group: str, consumer: str, *,
                  count: int = 64, block_ms: int = 1000) -> list[Entry]:
    """New entries for this consumer (XREADGROUP >); [] after `block_ms` with none.

    A missing group (Redis restarted without persistence) is recreated.
    """
    raise NotImplementedError


async def ack(r: aioredis.Redis, stream: str, group: str, entry_ids: Sequence[str]) -> int:
    """XACK; returns how many were pending."""
    raise NotImplementedError


async def reclaim(r: aioredis.Redis, stream: str, group: str, consumer: str, *,
                  min_idle_ms: int, max_deliveries: int, dead_letter: str) -> list[Entry]:
    """Take over entries idle longer than `min_idle_ms` (XAUTOCLAIM, following the cursor).

    Entries delivered more than `max_deliveries` times are moved to `dead_letter`
    (added there, then acked here) instead of being returned.
    """
    raise NotImplementedError


async def trim(r: aioredis.Redis, stream: str, groups: Sequence[str]) -> int:
    """Drop entries every group has delivered and acked; never a pending or unread one."""
    raise NotImplementedError
