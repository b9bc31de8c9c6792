"""Redis Streams: publish, consume in groups, ack, reclaim, dead-letter, trim.

Every entry has one field, ``m``, holding a msgpack message (serialization.messages).
Delivery is at least once: an entry stays pending in its group until acked, a
consumer that dies holding entries loses them to `reclaim` after `min_idle_ms`,
and an entry delivered more than `max_deliveries` times is moved to a
dead-letter stream with its origin. Streams are bounded by `trim`, which only
drops what every group has delivered and acked (so `publish` sets no MAXLEN by
default: a MAXLEN could drop an entry nobody has read yet).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis import exceptions as rex

from bus.connection import as_text, redis_errors

FIELD = b"m"
RECLAIM_BATCH = 100

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: where from, its id, its payload, times delivered."""

    stream: str
    entry_id: str
    payload: bytes  # b"" when the entry lacks the ``m`` field (a malformed entry)
    deliveries: int = 1


def _entry(stream: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
    return Entry(stream, as_text(entry_id), fields.get(FIELD, b""))


async def ensure_group(r: aioredis.Redis, stream: str, group: str, start_id: str = "0") -> None:
    """Create the group (and the stream); an existing group is fine, any other error raises."""
    with redis_errors():
        try:
            await r.xgroup_create(stream, group, id=start_id, mkstream=True)
        except rex.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise


async def publish(r: aioredis.Redis, stream: str, payload: bytes, *,
                  maxlen: int | None = None) -> str:
    """XADD one entry; returns its id."""
    with redis_errors():
        entry_id = await r.xadd(stream, {FIELD: payload}, maxlen=maxlen, approximate=True)
    return as_text(entry_id)


async def publish_many(r: aioredis.Redis, items: Sequence[tuple[str, bytes]], *,
                       maxlen: int | None = None) -> list[str]:
    """XADD many entries in one pipeline round trip; ids in the same order."""
    if not items:
        return []
    with redis_errors():
        async with r.pipeline(transaction=False) as pipe:
            for stream, payload in items:
                pipe.xadd(stream, {FIELD: payload}, maxlen=maxlen, approximate=True)
            ids = await pipe.execute()
    return [as_text(i) for i in ids]


async def consume(r: aioredis.Redis, streams: Sequence[str], group: str, consumer: str, *,
                  count: int = 64, block_ms: int = 1000) -> list[Entry]:
    """New entries for this consumer (XREADGROUP >); [] after `block_ms` with none.

    A missing group (Redis restarted without persistence) is recreated.
    `block_ms` <= 0 reads without blocking; keep it below the socket timeout.
    """
    _check_block(r, block_ms)
    with redis_errors():
        try:
            return await _read_group(r, streams, group, consumer, count, block_ms)
        except rex.ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
        log.warning("stream_group_recreated", streams=list(streams), group=group)
        for stream in streams:
            await ensure_group(r, stream, group)
        return await _read_group(r, streams, group, consumer, count, block_ms)


def _check_block(r: aioredis.Redis, block_ms: int) -> None:
    """A block longer than the socket timeout would time out, reconnect and block again."""
    timeout_s = r.connection_pool.connection_kwargs.get("socket_timeout")
    if timeout_s and block_ms >= timeout_s * 1000:
        raise ValueError(f"block_ms={block_ms} must stay below the socket timeout ({timeout_s} s)")


async def _read_group(r: aioredis.Redis, streams: Sequence[str], group: str, consumer: str,
                      count: int, block_ms: int) -> list[Entry]:
    # RESP2 shape (our clients never ask for RESP3): [[stream, [(id, fields), ...]], ...]
    reply: Any = await r.xreadgroup(group, consumer, dict.fromkeys(streams, ">"), count=count,
                                    block=block_ms if block_ms > 0 else None)
    return [
        _entry(as_text(stream), entry_id, fields)
        for stream, entries in reply or []
        for entry_id, fields in entries
        if entry_id is not None
    ]


async def ack(r: aioredis.Redis, stream: str, group: str, entry_ids: Sequence[str]) -> int:
    """XACK; returns how many were pending. Shielded: a cancelled caller's ack still lands."""
    if not entry_ids:
        return 0
    with redis_errors():
        return int(await asyncio.shield(r.xack(stream, group, *entry_ids)))


async def touch(r: aioredis.Redis, stream: str, group: str, consumer: str,
                entry_ids: Sequence[str]) -> None:
    """Reset the idle time of entries this consumer is still working on (XCLAIM JUSTID,
    which leaves the delivery count alone), so that no `reclaim` takes them over."""
    if not entry_ids:
        return
    with redis_errors():
        await r.xclaim(stream, group, consumer, 0, list(entry_ids), justid=True)


async def reclaim(r: aioredis.Redis, stream: str, group: str, consumer: str, *,
                  min_idle_ms: int, max_deliveries: int, dead_letter: str) -> list[Entry]:
    """Take over entries idle longer than `min_idle_ms` (XAUTOCLAIM, following the cursor).

    Entries delivered more than `max_deliveries` times are moved to `dead_letter`
    (added there, then acked here) instead of being returned.
    """
    claimed: list[Entry] = []
    cursor: str = "0-0"
    with redis_errors():
        while True:
            cursor, batch = await _claim_batch(r, stream, group, consumer, min_idle_ms, cursor)
            batch = await _with_deliveries(r, stream, group, consumer, batch)
            poison = [e for e in batch if e.deliveries > max_deliveries]
            claimed += [e for e in batch if e.deliveries <= max_deliveries]
            await _dead_letter(r, group, poison, dead_letter)
            if cursor == "0-0":
                return claimed


async def _claim_batch(r: aioredis.Redis, stream: str, group: str, consumer: str,
                       min_idle_ms: int, cursor: str) -> tuple[str, list[Entry]]:
    reply = await r.xautoclaim(stream, group, consumer, min_idle_ms, start_id=cursor,
                               count=RECLAIM_BATCH)
    next_cursor, entries = as_text(reply[0]), reply[1]
    deleted = [as_text(i) for i in reply[2]] if len(reply) > 2 else []
    if deleted:
        # Redis (>= 7) has already dropped these from the group's pending list.
        log.warning("stream_entries_deleted_while_pending", stream=stream, group=group,
                    entry_ids=deleted)
    batch = [_entry(stream, i, fields) for i, fields in entries if i is not None]
    return next_cursor, batch


async def _with_deliveries(r: aioredis.Redis, stream: str, group: str, consumer: str,
                           batch: list[Entry]) -> list[Entry]:
    """The claimed entries with their delivery counts (XPENDING; XAUTOCLAIM counted this one).

    An entry no longer pending (acked by its slow first consumer meanwhile) is dropped.
    """
    if not batch:
        return []
    async with r.pipeline(transaction=False) as pipe:
        for e in batch:
            pipe.xpending_range(stream, group, e.entry_id, e.entry_id, 1, consumername=consumer)
        rows = await pipe.execute()
    counts = {as_text(row[0]["message_id"]): int(row[0]["times_delivered"]) for row in rows if row}
    return [
        Entry(e.stream, e.entry_id, e.payload, counts[e.entry_id])
        for e in batch
        if e.entry_id in counts
    ]


async def _dead_letter(r: aioredis.Redis, group: str, poison: list[Entry],
                       dead_letter: str) -> None:
    """Move poison entries: XADD to `dead_letter` and XACK here, atomically (MULTI/EXEC)."""
    if not poison:
        return
    async with r.pipeline(transaction=True) as pipe:
        for e in poison:
            pipe.xadd(dead_letter, {FIELD: e.payload, b"origin": e.stream, b"id": e.entry_id,
                                    b"group": group, b"deliveries": e.deliveries})
            pipe.xack(e.stream, group, e.entry_id)
        await pipe.execute()
    log.warning("stream_entries_dead_lettered", stream=poison[0].stream, group=group,
                dead_letter=dead_letter, entry_ids=[e.entry_id for e in poison])


def _successor(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _older(a: str, b: str) -> str:
    def key(i: str) -> tuple[int, int]:
        ms, _, seq = i.partition("-")
        return int(ms), int(seq or 0)

    return min(a, b, key=key)


async def _oldest_needed(r: aioredis.Redis, stream: str, groups: Sequence[str]) -> str | None:
    """The smallest id some group still needs, or None when that cannot be known."""
    infos = {as_text(g["name"]): g for g in await r.xinfo_groups(stream)}
    if not infos or any(g not in infos for g in groups):
        return None  # a group yet to be created will want everything
    needed: str | None = None
    for name, info in infos.items():
        first = _successor(as_text(info["last-delivered-id"]))
        if int(info["pending"]) > 0:
            summary = await r.xpending(stream, name)
            if summary["min"] is not None:  # None: all acked since XINFO (a race, and fine)
                first = _older(first, as_text(summary["min"]))
        needed = first if needed is None else _older(needed, first)
    return needed


async def trim(r: aioredis.Redis, stream: str, groups: Sequence[str]) -> int:
    """Drop entries every group has delivered and acked; never a pending or unread one.

    Every group of the stream counts, listed or not; if a listed group does not
    exist yet nothing is dropped. Returns how many entries were removed.
    """
    with redis_errors():
        try:
            needed = await _oldest_needed(r, stream, groups)
        except rex.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        if needed is None:
            return 0
        return int(await r.xtrim(stream, minid=needed, approximate=False))
