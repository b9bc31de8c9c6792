"""Registry against a real Redis: registrations, heartbeats that expire, the active run."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bus.keys import Keys
from bus.registry import Registry, get_active_run, set_active_run
from bus.streams import FIELD
from serialization import Registration

AGENT = Registration(agent_id="agent-1", client_ids=["c1", "c2"], devices=["cpu"],
                     hostname="host", pid=42)


async def announcements(r: aioredis.Redis, keys: Keys) -> list[Registration]:
    return [Registration.from_bytes(f[FIELD]) for _, f in await r.xrange(keys.registrations())]


async def test_register_records_marks_alive_and_announces(redis_client: aioredis.Redis,
                                                          run_keys: Keys) -> None:
    """register fills the clients hash, sets alive keys and adds a registrations entry."""
    registry = Registry(redis_client, run_keys)
    await registry.register(AGENT)
    assert await registry.clients() == {"c1": AGENT, "c2": AGENT}
    assert await registry.alive(["c1", "c2", "c3"]) == {"c1", "c2"}
    assert await announcements(redis_client, run_keys) == [AGENT]


async def test_heartbeats_expire_and_refresh(redis_client: aioredis.Redis,
                                             run_keys: Keys) -> None:
    """Without heartbeats a client stops being alive after the TTL; a beat revives it."""
    registry = Registry(redis_client, run_keys, ttl_ms=100)
    await registry.register(AGENT)
    await registry.heartbeat(["c1"])
    deadline = time.monotonic() + 5
    while await registry.alive(["c1", "c2"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await registry.heartbeat(["c2"])
    assert await registry.alive(["c1", "c2"]) == {"c2"}
    assert 0 < await redis_client.pttl(run_keys.alive("c2")) <= 100


async def test_unregister_clears_alive_and_announces(redis_client: aioredis.Redis,
                                                     run_keys: Keys) -> None:
    """unregister makes the clients not alive and announces event='unregister'."""
    registry = Registry(redis_client, run_keys)
    await registry.register(AGENT)
    await registry.unregister(AGENT)
    assert await registry.alive(AGENT.client_ids) == set()
    assert [a.event for a in await announcements(redis_client, run_keys)] == [
        "register", "unregister"
    ]


async def test_undecodable_registration_is_skipped_and_logged(redis_client: aioredis.Redis,
                                                              run_keys: Keys) -> None:
    """A garbage entry in the clients hash is left out of clients() with a warning."""
    registry = Registry(redis_client, run_keys)
    await registry.register(AGENT)
    await redis_client.hset(run_keys.clients(), "bad", b"\xc1 not msgpack")
    with capture_logs() as logs:
        assert set(await registry.clients()) == {"c1", "c2"}
    assert [(e["event"], e["client_id"]) for e in logs] == [("registration_undecodable", "bad")]


async def test_empty_inputs_need_no_round_trip(redis_client: aioredis.Redis,
                                               run_keys: Keys) -> None:
    """No clients: alive is empty, heartbeat and clients() are no-ops."""
    registry = Registry(redis_client, run_keys)
    assert await registry.alive([]) == set()
    await registry.heartbeat([])
    assert await registry.clients() == {}


async def test_active_run_pointer(redis_client: aioredis.Redis) -> None:
    """The active run is None until set, then the id set, per namespace."""
    assert await get_active_run(redis_client) is None
    await set_active_run(redis_client, "run-7")
    await set_active_run(redis_client, "other", namespace="lab")
    assert await get_active_run(redis_client) == "run-7"
    assert await get_active_run(redis_client, namespace="lab") == "other"
