"""Connections: URL forms, credentials, readiness, error mapping, cancellation safety."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.connection import SSLConnection
from redis.backoff import ExponentialBackoff

from bus.connection import (
    RedisSettings,
    connect,
    raise_if_cancelled,
    redis_errors,
    retries_for,
    wait_ready,
)
from bus.embedded import EmbeddedRedis, free_port
from bus.errors import BusError, RedisUnavailable
from bus.keys import JOBS_GROUP, Keys
from bus.streams import consume, ensure_group, publish
from tests.conftest import RedisFactory


async def blocked_clients(r: aioredis.Redis) -> int:
    return int((await r.info("clients"))["blocked_clients"])


async def wait_blocked(r: aioredis.Redis, expected: int, timeout_s: float = 5.0) -> None:
    """Poll INFO until the server counts `expected` blocked clients."""
    deadline = time.monotonic() + timeout_s
    while await blocked_clients(r) != expected:
        assert time.monotonic() < deadline, f"never saw {expected} blocked clients"
        await asyncio.sleep(0.01)


async def test_replies_are_bytes(redis_client: aioredis.Redis) -> None:
    """connect() gives a client whose replies are bytes, not str."""
    await redis_client.set("k", "v")
    assert await redis_client.get("k") == b"v"


async def test_unix_socket_url() -> None:
    """A unix:// URL (the embedded default) connects."""
    with EmbeddedRedis() as server:
        client = connect(server.url)
        try:
            await wait_ready(client)
            assert await client.ping()
        finally:
            await client.aclose()


async def test_username_and_password(redis_factory: RedisFactory) -> None:
    """ACL credentials from the settings authenticate; wrong ones fail fast as BusError."""
    url = redis_factory().url
    admin = connect(url)
    await admin.acl_setuser("alice", enabled=True, passwords=["+s3cret"], keys=["*"],
                            commands=["+@all"])
    await admin.config_set("requirepass", "adminpass")  # the default user needs one now
    await admin.aclose()
    good = connect(RedisSettings(url=url, username="alice", password="s3cret"))
    bad = connect(RedisSettings(url=url, username="alice", password="wrong"))
    try:
        assert await good.ping()
        started = time.monotonic()
        with pytest.raises(BusError, match=r"(?i)invalid username-password|WRONGPASS"):
            await wait_ready(bad, timeout_s=10)
        assert time.monotonic() - started < 2, "bad credentials must not be retried"
    finally:
        await good.aclose()
        await bad.aclose()


def test_settings_shape_the_client() -> None:
    """Backoff, retries, timeouts and TLS files are passed to redis-py's pool."""
    settings = RedisSettings(url="rediss://redis.example:6380/0", password="pw",
                             tls_ca_file="/ca.pem", tls_cert_file="/c.pem",
                             tls_key_file="/k.pem", retries=7, backoff_base_s=0.01,
                             backoff_cap_s=0.5, socket_timeout_s=3.0)
    pool = connect(settings).connection_pool
    kwargs = pool.connection_kwargs
    assert pool.connection_class is SSLConnection
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
        "/ca.pem", "/c.pem", "/k.pem")
    assert kwargs["retry"].get_retries() == 7
    assert kwargs["retry"]._backoff == ExponentialBackoff(cap=0.5, base=0.01)
    assert (kwargs["socket_timeout"], kwargs["password"]) == (3.0, "pw")


def test_the_outage_budget_becomes_a_retry_count() -> None:
    """The backoff sleeps of `retries_for(outage)` retries add up to the outage, not less."""
    for outage, base, cap in ((300.0, 0.05, 2.0), (0.3, 0.01, 0.1), (5.0, 0.05, 2.0)):
        n = retries_for(outage, base, cap)
        sleeps = [min(cap, base * 2**k) for k in range(1, n + 1)]
        assert sum(sleeps) >= outage > sum(sleeps[:-1])
    client = connect(RedisSettings(url="redis://x", outage_s=300.0))
    assert client.connection_pool.connection_kwargs["retry"].get_retries() == retries_for(
        300.0, 0.05, 2.0) == 154


def test_bad_url_is_bus_error() -> None:
    """An unsupported URL scheme raises BusError."""
    with pytest.raises(BusError, match="bad Redis URL"):
        connect("http://localhost")


async def test_wait_ready_gives_up_with_redis_unavailable() -> None:
    """Nothing listening: wait_ready raises RedisUnavailable once its time is up."""
    client = connect(f"redis://127.0.0.1:{free_port()}")
    started = time.monotonic()
    try:
        with pytest.raises(RedisUnavailable, match="did not answer PING"):
            await wait_ready(client, timeout_s=0.3)
    finally:
        await client.aclose()
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(("raised", "expected"), [
    (rex.ConnectionError("down"), RedisUnavailable),
    (rex.TimeoutError("slow"), RedisUnavailable),
    (rex.ResponseError("ERR nope"), BusError),
    (rex.AuthenticationError("WRONGPASS"), BusError),
])
def test_redis_errors_are_mapped(raised: Exception, expected: type[Exception]) -> None:
    """redis-py exceptions come out as the bus's, chained to the original."""
    with pytest.raises(expected) as info, redis_errors():
        raise raised
    assert info.value.__cause__ is raised
    if expected is BusError:
        assert not isinstance(info.value, RedisUnavailable)


async def test_cancelled_blocking_read_leaves_no_stray_reply(
        redis_url: str, redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """Cancelling a blocked consume drops its connection: the next command gets its own reply."""
    client = connect(redis_url, max_connections=1)  # so the GET below reuses that connection
    stream = run_keys.jobs("c1")
    try:
        await ensure_group(client, stream, JOBS_GROUP)
        await client.set("k", b"v")
        task = asyncio.create_task(consume(client, [stream], JOBS_GROUP, "a", block_ms=5000))
        await wait_blocked(redis_client, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_blocked(redis_client, 0)  # the server saw the connection go
        await publish(redis_client, stream, b"late")  # nobody may have received it
        assert await client.get("k") == b"v"
        entries = await consume(client, [stream], JOBS_GROUP, "a", block_ms=100)
        assert [e.payload for e in entries] == [b"late"]
    finally:
        await client.aclose()


async def test_a_loop_on_redis_always_ends_when_cancelled(redis_client: aioredis.Redis) -> None:
    """A cancel that redis-py's write drops (asyncio.wait_for on 3.11) still ends a loop that
    checks raise_if_cancelled each turn; nothing else needs a second cancel."""

    async def beat() -> None:
        while True:
            raise_if_cancelled()
            await redis_client.set("beat", b"1", px=5000)

    for _ in range(50):
        task = asyncio.create_task(beat())
        await asyncio.sleep(0.002)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        assert done, "the cancel was lost and the loop went on"
