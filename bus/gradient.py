"""Streams of batch-gradient federation: a small header and the tensor bytes in one entry.

Each step travels as one stream entry per direction: the coordinator adds the
slot's weights to ``gradient_down`` (every agent of the lease reads it with a
plain XREAD, no group: it is a broadcast), and each client adds its gradient to
``gradient_up`` (the slot's only reader is the coordinator). An entry has two
fields, ``m`` (a msgpack header, `serialization.gradient`) and ``b`` (the raw
float32 bytes), so the ~MB body goes out and comes back without a blob round
trip and without passing through msgpack. The coordinator deletes what it has
read and trims the broadcast to the current step once every client has answered
the step before, which proves every reader is past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from bus.connection import as_text, redis_errors

HEADER = b"m"
BODY = b"b"
Data = bytes | memoryview


@dataclass(frozen=True)
class TensorEntry:
    """One entry as read: its id, its header, its body bytes."""

    entry_id: str
    header: bytes
    body: bytes


async def add(r: aioredis.Redis, stream: str, header: bytes, body: Data) -> str:
    """XADD one entry (header + body); its id."""
    with redis_errors():
        entry_id = await r.xadd(stream, {HEADER: header, BODY: body})
    return as_text(entry_id)


async def add_after_trim(r: aioredis.Redis, stream: str, header: bytes, body: Data, *,
                         delete: Sequence[tuple[str, Sequence[str]]] = ()) -> str:
    """XDEL entries already read (per stream) and XADD one entry, in one round trip."""
    with redis_errors():
        async with r.pipeline(transaction=False) as pipe:
            for where, ids in delete:
                if ids:
                    pipe.xdel(where, *ids)
            pipe.xadd(stream, {HEADER: header, BODY: body})
            replies = await pipe.execute()
    return as_text(replies[-1])


async def read(r: aioredis.Redis, stream: str, after_id: str, *, count: int = 64,
               block_ms: int = 1000) -> list[TensorEntry]:
    """Entries after `after_id` (XREAD, blocking up to `block_ms`; [] if none came)."""
    with redis_errors():
        reply: Any = await r.xread({stream: after_id}, count=count,
                                   block=block_ms if block_ms > 0 else None)
    return [TensorEntry(as_text(entry_id), fields.get(HEADER, b""), fields.get(BODY, b""))
            for _stream, entries in reply or [] for entry_id, fields in entries
            if entry_id is not None]


async def trim_before(r: aioredis.Redis, stream: str, entry_id: str) -> None:
    """Drop the entries older than `entry_id` (XTRIM MINID)."""
    with redis_errors():
        await r.xtrim(stream, minid=entry_id)


async def delete(r: aioredis.Redis, *streams: str) -> None:
    """Remove streams whose session has ended."""
    with redis_errors():
        await r.unlink(*streams)
