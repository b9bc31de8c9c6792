"""Redis restarts under a live consumer: the consumer carries on without help."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bus.connection import RedisSettings, connect, redis_errors
from bus.embedded import EmbeddedRedis, free_port
from bus.errors import RedisUnavailable
from bus.keys import JOBS_GROUP, Keys
from bus.streams import ack, consume, ensure_group, publish
from tests.conftest import RedisFactory


async def wait_seen(seen: list[bytes], payload: bytes, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while payload not in seen:
        assert time.monotonic() < deadline, f"{payload!r} never consumed; saw {seen}"
        await asyncio.sleep(0.01)


async def wait_blocked(r: aioredis.Redis, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not int((await r.info("clients"))["blocked_clients"]):
        assert time.monotonic() < deadline, "the consumer never blocked"
        await asyncio.sleep(0.01)


async def consume_forever(r: aioredis.Redis, stream: str, seen: list[bytes]) -> None:
    """A consumer loop as an agent runs it: read, record, ack, repeat."""
    while True:
        entries = await consume(r, [stream], JOBS_GROUP, "agent-1", block_ms=200)
        seen.extend(e.payload for e in entries)
        await ack(r, stream, JOBS_GROUP, [e.entry_id for e in entries])


async def restart_under_consumer(redis_factory: RedisFactory, workdir: Path, run_keys: Keys,
                                 *, appendonly: bool) -> tuple[list[bytes], list[str]]:
    """Publish, restart Redis on the same port, publish again: what was consumed, and logged."""
    port = free_port()
    server = redis_factory(appendonly=appendonly, port=port, workdir=workdir)
    settings = RedisSettings(url=server.url, backoff_base_s=0.01, backoff_cap_s=0.1, retries=200)
    consumer, producer = connect(settings), connect(settings)
    stream, seen = run_keys.jobs("c1"), list[bytes]()
    await ensure_group(producer, stream, JOBS_GROUP)
    try:
        with capture_logs() as logs:
            await _restart_while_consuming(redis_factory, server, consumer, producer, stream, seen)
    finally:
        await consumer.aclose()
        await producer.aclose()
    return seen, [e["event"] for e in logs]


async def _restart_while_consuming(redis_factory: RedisFactory, server: EmbeddedRedis,
                                   consumer: aioredis.Redis, producer: aioredis.Redis,
                                   stream: str, seen: list[bytes]) -> None:
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(consume_forever(consumer, stream, seen))
        await publish(producer, stream, b"before")
        await wait_seen(seen, b"before")
        await wait_blocked(producer)  # the consumer is inside XREADGROUP when Redis goes
        server.stop()
        redis_factory(appendonly=server.appendonly, port=server.port, workdir=server.workdir)
        await publish(producer, stream, b"after")
        await wait_seen(seen, b"after")
        task.cancel()


async def test_consumer_survives_restart_with_aof(redis_factory: RedisFactory, tmp_path: Path,
                                                  run_keys: Keys) -> None:
    """With AOF the group survives a restart: the consumer reconnects and gets only new work."""
    seen, events = await restart_under_consumer(redis_factory, tmp_path / "redis", run_keys,
                                                appendonly=True)
    assert seen == [b"before", b"after"]
    assert "stream_group_recreated" not in events
    # The consumer's blocked read lost its connection: the outage is logged once per client
    # at its start and once at its end, however many commands were retried meanwhile.
    assert 1 <= events.count("redis_unreachable") <= 2
    assert events.count("redis_reconnected") == events.count("redis_unreachable")


async def test_consumer_recreates_group_after_restart_without_persistence(
        redis_factory: RedisFactory, tmp_path: Path, run_keys: Keys) -> None:
    """Without persistence the group is gone after a restart; consume recreates it."""
    seen, events = await restart_under_consumer(redis_factory, tmp_path / "redis", run_keys,
                                                appendonly=False)
    assert seen == [b"before", b"after"]
    assert "stream_group_recreated" in events


async def test_a_client_waits_out_an_outage_as_long_as_it_was_told(
        redis_factory: RedisFactory, tmp_path: Path) -> None:
    """`outage_s` bounds the wait: a client told 0.3 s gives up (RedisUnavailable) while one
    told 10 s waits out a 1.5 s restart and its command then succeeds."""
    port, workdir = free_port(), tmp_path / "redis"
    server = redis_factory(port=port, workdir=workdir)
    fast = {"backoff_base_s": 0.01, "backoff_cap_s": 0.1}
    impatient = connect(RedisSettings(url=server.url, outage_s=0.3, **fast))
    patient = connect(RedisSettings(url=server.url, outage_s=10.0, **fast))
    try:
        assert await impatient.ping()
        assert await patient.ping()
        server.stop()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable), redis_errors():
            await impatient.set("k", b"1")
        assert 0.3 <= time.monotonic() - started < 5

        async def restart() -> None:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(redis_factory, port=port, workdir=workdir)

        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(restart())
            assert await patient.set("k", b"1")
        assert time.monotonic() - started >= 1.5
    finally:
        await impatient.aclose()
        await patient.aclose()
