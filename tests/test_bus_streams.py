"""Streams against a real Redis: groups, publish / consume / ack, reclaim, dead letters, trim."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.connection import RedisSettings, connect
from bus.errors import BusError
from bus.keys import JOBS_GROUP, RESULTS_GROUP, Keys
from bus.streams import (
    FIELD,
    RECLAIM_BATCH,
    ack,
    consume,
    ensure_group,
    publish,
    publish_many,
    reclaim,
    touch,
    trim,
)

GROUP = JOBS_GROUP


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Poll `check` until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def pending_count(r: aioredis.Redis, stream: str, group: str = GROUP) -> int:
    return int((await r.xpending(stream, group))["pending"])


async def test_ensure_group_is_idempotent(redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """Creating a group twice is fine, and creates the stream too."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    await ensure_group(redis_client, stream, GROUP)
    groups = await redis_client.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [GROUP.encode()]


async def test_ensure_group_raises_other_errors(redis_client: aioredis.Redis,
                                                run_keys: Keys) -> None:
    """Only BUSYGROUP is swallowed: a key of the wrong type raises BusError."""
    stream = run_keys.jobs("c1")
    await redis_client.set(stream, b"not a stream")
    with pytest.raises(BusError, match="WRONGTYPE"):
        await ensure_group(redis_client, stream, GROUP)


async def test_publish_consume_ack(redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """Entries come back once, in order, with their payloads; acking clears them."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    ids = [await publish(redis_client, stream, f"job{i}".encode()) for i in range(3)]
    entries = await consume(redis_client, [stream], GROUP, "agent-1", block_ms=100)
    assert [(e.stream, e.entry_id, e.payload, e.deliveries) for e in entries] == [
        (stream, ids[i], f"job{i}".encode(), 1) for i in range(3)
    ]
    assert await consume(redis_client, [stream], GROUP, "agent-1", block_ms=10) == []
    assert await ack(redis_client, stream, GROUP, ids) == 3
    assert await pending_count(redis_client, stream) == 0


async def test_consume_over_several_streams(redis_client: aioredis.Redis,
                                            run_keys: Keys) -> None:
    """One read serves every stream given, up to `count` entries each."""
    streams = [run_keys.results(0), run_keys.results(1)]
    for stream in streams:
        await ensure_group(redis_client, stream, RESULTS_GROUP)
    ids = await publish_many(redis_client, [(s, b"r") for s in streams for _ in range(3)])
    assert len(ids) == 6
    entries = await consume(redis_client, streams, RESULTS_GROUP, "coord", count=2)
    assert sorted((e.stream, e.entry_id) for e in entries) == sorted(
        [(streams[0], ids[0]), (streams[0], ids[1]), (streams[1], ids[3]), (streams[1], ids[4])]
    )


async def test_ack_lands_even_if_the_caller_is_cancelled(redis_client: aioredis.Redis,
                                                         run_keys: Keys) -> None:
    """ack is shielded: cancelling the task that acks does not lose the ack."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    entry_id = await publish(redis_client, stream, b"x")
    await consume(redis_client, [stream], GROUP, "a", block_ms=0)
    task = asyncio.create_task(ack(redis_client, stream, GROUP, [entry_id]))
    await asyncio.sleep(0)  # the ack is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def acked() -> bool:
        return await pending_count(redis_client, stream) == 0

    await eventually(acked)


async def test_block_must_stay_below_the_socket_timeout() -> None:
    """A block_ms the socket timeout would cut short is refused up front."""
    client = connect(RedisSettings(url="redis://127.0.0.1:1", socket_timeout_s=2.0))
    with pytest.raises(ValueError, match="socket timeout"):
        await consume(client, ["s"], GROUP, "a", block_ms=2000)
    await client.aclose()


async def test_publish_many_one_round_trip_keeps_order(redis_client: aioredis.Redis,
                                                      run_keys: Keys) -> None:
    """publish_many returns the ids in the order of its items."""
    stream = run_keys.jobs("c1")
    ids = await publish_many(redis_client, [(stream, bytes([i])) for i in range(50)])
    stored = await redis_client.xrange(stream)
    assert [i.encode() for i in ids] == [entry_id for entry_id, _ in stored]
    assert [fields[FIELD] for _, fields in stored] == [bytes([i]) for i in range(50)]
    assert await publish_many(redis_client, []) == []


async def test_entry_without_payload_field_reads_as_empty(redis_client: aioredis.Redis,
                                                         run_keys: Keys) -> None:
    """A malformed entry (no ``m`` field) is delivered with an empty payload."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    await redis_client.xadd(stream, {b"other": b"x"})
    (entry,) = await consume(redis_client, [stream], GROUP, "a", block_ms=100)
    assert entry.payload == b""


async def test_consume_recreates_a_missing_group(redis_client: aioredis.Redis,
                                                 run_keys: Keys) -> None:
    """NOGROUP (the group vanished) makes consume recreate it and read again."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    await publish(redis_client, stream, b"a")
    await redis_client.xgroup_destroy(stream, GROUP)
    entries = await consume(redis_client, [stream], GROUP, "agent-1", block_ms=100)
    assert [e.payload for e in entries] == [b"a"]


async def test_dead_consumer_entries_are_reclaimed(redis_client: aioredis.Redis,
                                                   run_keys: Keys) -> None:
    """Entries read but never acked go to another consumer once idle for min_idle_ms."""
    stream, dead = run_keys.jobs("c1"), run_keys.dead_letter(run_keys.jobs("c1"))
    await ensure_group(redis_client, stream, GROUP)
    ids = await publish_many(redis_client, [(stream, b"x"), (stream, b"y")])
    await consume(redis_client, [stream], GROUP, "dies", block_ms=100)
    assert await reclaim(redis_client, stream, GROUP, "rescuer", min_idle_ms=60_000,
                         max_deliveries=5, dead_letter=dead) == []

    claimed = []

    async def reclaimed() -> bool:
        claimed.extend(await reclaim(redis_client, stream, GROUP, "rescuer", min_idle_ms=50,
                                     max_deliveries=5, dead_letter=dead))
        return len(claimed) == 2

    await eventually(reclaimed)
    assert [(e.entry_id, e.payload, e.deliveries) for e in claimed] == [
        (ids[0], b"x", 2), (ids[1], b"y", 2)
    ]
    owners = await redis_client.xpending_range(stream, GROUP, "-", "+", 10)
    assert {row["consumer"] for row in owners} == {b"rescuer"}


async def test_touched_entries_stay_with_their_consumer(redis_client: aioredis.Redis,
                                                        run_keys: Keys) -> None:
    """An entry its consumer still works on and touches is not reclaimed, and its delivery
    count does not grow."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    entry_id = await publish(redis_client, stream, b"long job")
    await consume(redis_client, [stream], GROUP, "busy", block_ms=100)

    async def idle_ms() -> int:
        rows = await redis_client.xpending_range(stream, GROUP, entry_id, entry_id, 1)
        return int(rows[0]["time_since_delivered"])

    async def idle_enough() -> bool:
        return await idle_ms() >= 200

    await eventually(idle_enough)
    await touch(redis_client, stream, GROUP, "busy", [entry_id])
    claimed = await reclaim(redis_client, stream, GROUP, "rescuer", min_idle_ms=200,
                            max_deliveries=5, dead_letter=run_keys.dead_letter(stream))
    assert claimed == []
    rows = await redis_client.xpending_range(stream, GROUP, entry_id, entry_id, 1)
    assert (rows[0]["consumer"], rows[0]["times_delivered"]) == (b"busy", 1)


async def test_reclaim_follows_the_cursor(redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """More idle entries than one XAUTOCLAIM batch are all reclaimed in one call."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    total = RECLAIM_BATCH * 2 + 17
    await publish_many(redis_client, [(stream, b"e")] * total)
    read = await consume(redis_client, [stream], GROUP, "dies", count=total, block_ms=100)
    await ack(redis_client, stream, GROUP, [e.entry_id for e in read[::3]])
    claimed = await reclaim(redis_client, stream, GROUP, "rescuer", min_idle_ms=0,
                            max_deliveries=5, dead_letter=run_keys.dead_letter(stream))
    assert [e.entry_id for e in claimed] == [e.entry_id for i, e in enumerate(read) if i % 3]


async def test_poison_entries_are_dead_lettered(redis_client: aioredis.Redis,
                                                run_keys: Keys) -> None:
    """An entry delivered more than max_deliveries times moves to the dead-letter stream."""
    stream = run_keys.jobs("c1")
    dead = run_keys.dead_letter(stream)
    await ensure_group(redis_client, stream, GROUP)
    entry_id = await publish(redis_client, stream, b"poison")
    await consume(redis_client, [stream], GROUP, "a", block_ms=100)  # delivery 1

    async def reclaim_once() -> list[str]:
        got = await reclaim(redis_client, stream, GROUP, "b", min_idle_ms=0, max_deliveries=2,
                            dead_letter=dead)
        return [e.entry_id for e in got]

    assert await reclaim_once() == [entry_id]  # delivery 2
    assert await reclaim_once() == []  # delivery 3 > 2: dead-lettered
    assert await pending_count(redis_client, stream) == 0
    ((_, fields),) = await redis_client.xrange(dead)
    assert fields[FIELD] == b"poison"
    assert fields[b"origin"] == stream.encode()
    assert fields[b"id"] == entry_id.encode()
    assert fields[b"deliveries"] == b"3"


async def test_entries_deleted_while_pending_are_dropped(redis_client: aioredis.Redis,
                                                         run_keys: Keys) -> None:
    """An entry deleted while pending is neither returned nor left pending by reclaim."""
    stream = run_keys.jobs("c1")
    await ensure_group(redis_client, stream, GROUP)
    gone, kept = await publish_many(redis_client, [(stream, b"gone"), (stream, b"kept")])
    await consume(redis_client, [stream], GROUP, "dies", block_ms=100)
    await redis_client.xdel(stream, gone)
    claimed = await reclaim(redis_client, stream, GROUP, "b", min_idle_ms=0, max_deliveries=5,
                            dead_letter=run_keys.dead_letter(stream))
    assert [e.entry_id for e in claimed] == [kept]
    assert await pending_count(redis_client, stream) == 1


async def test_trim_drops_only_what_every_group_acked(redis_client: aioredis.Redis,
                                                     run_keys: Keys) -> None:
    """Entries acked by all groups go; one group's pending or unread entries stay."""
    stream = run_keys.registrations()
    for group in ("g1", "g2"):
        await ensure_group(redis_client, stream, group)
    ids = await publish_many(redis_client, [(stream, b"e")] * 6)
    first4 = await consume(redis_client, [stream], "g1", "c", count=4)
    await ack(redis_client, stream, "g1", [e.entry_id for e in first4])
    everything = await consume(redis_client, [stream], "g2", "c", count=6)
    await ack(redis_client, stream, "g2", [e.entry_id for e in everything[:3]])
    assert await trim(redis_client, stream, ["g1", "g2"]) == 3
    assert [i.decode() for i, _ in await redis_client.xrange(stream)] == ids[3:]


async def test_trim_keeps_everything_for_a_group_not_yet_created(
        redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """A listed group that does not exist yet blocks trimming; a missing stream trims 0."""
    stream = run_keys.registrations()
    await ensure_group(redis_client, stream, "g1")
    await publish(redis_client, stream, b"e")
    read = await consume(redis_client, [stream], "g1", "c", block_ms=0)
    await ack(redis_client, stream, "g1", [e.entry_id for e in read])
    assert await trim(redis_client, stream, ["g1", "late"]) == 0
    assert await redis_client.xlen(stream) == 1
    assert await trim(redis_client, run_keys.jobs("nobody"), ["g1"]) == 0


# One step of the trim property: (op, group index, amount).
_STEPS = st.lists(
    st.tuples(st.sampled_from(["publish", "read", "ack", "trim"]), st.integers(0, 1),
              st.integers(1, 4)),
    max_size=25,
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_STEPS)
async def test_trim_never_drops_pending_or_unread(redis_client: aioredis.Redis,
                                                 steps: list[tuple[str, int, int]]) -> None:
    """Whatever publishes, reads and acks happen, trim keeps every entry some group lacks."""
    model = _Model(stream=f"prop:{uuid.uuid4().hex}")
    for group in model.groups:
        await ensure_group(redis_client, model.stream, group)
    for op, g, n in steps:
        await model.apply(redis_client, op, g, n)
        stored = {i.decode() for i, _ in await redis_client.xrange(model.stream)}
        for g in range(len(model.groups)):
            assert set(model.pending[g]) <= stored, "a pending entry was trimmed"
            assert set(model.published[model.read[g]:]) <= stored, "an unread entry was trimmed"


@dataclass
class _Model:
    """What each group has read and not yet acked, tracked beside Redis."""

    stream: str
    groups: tuple[str, str] = ("g0", "g1")
    published: list[str] = field(default_factory=list)
    read: list[int] = field(default_factory=lambda: [0, 0])
    pending: list[list[str]] = field(default_factory=lambda: [[], []])

    async def apply(self, r: aioredis.Redis, op: str, g: int, n: int) -> None:
        if op == "publish":
            self.published += await publish_many(r, [(self.stream, b"p")] * n)
        elif op == "read":
            got = [e.entry_id for e in await consume(r, [self.stream], self.groups[g], "c",
                                                     count=n, block_ms=0)]
            assert got == self.published[self.read[g] : self.read[g] + n]
            self.read[g] += len(got)
            self.pending[g] += got
        elif op == "ack":
            done, self.pending[g] = self.pending[g][:n], self.pending[g][n:]
            await ack(r, self.stream, self.groups[g], done)
        else:
            await trim(r, self.stream, self.groups)
