"""Redis ACL users from `bus.acl`, on a real redis-server started with the generated file.

The agent user of clients 0 and 1 does everything its job needs through the
bus functions it really calls, and is refused the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis import exceptions as rex

from bus import acl
from bus.blobs import BlobRef, BlobStore
from bus.connection import RedisSettings, connect, wait_ready
from bus.embedded import EmbeddedRedis
from bus.errors import BusError
from bus.keys import JOBS_GROUP, RESULTS_GROUP, Keys
from bus.registry import Registry, get_active_run, set_active_run
from bus.streams import FIELD, ack, consume, ensure_group, publish, reclaim, trim
from serialization import Registration
from tests.conftest import RedisFactory
from tests.security import Account, account, require_redis_7, write_acl

KEYS = Keys("run-1")
OTHER_RUN = Keys("run-0")
MODEL = b"m" * 5000


@dataclass
class AclServer:
    server: EmbeddedRedis
    admin: Account
    coordinator: Account
    agent: Account  # clients 0 and 1
    login: Callable[[Account], aioredis.Redis]


@pytest.fixture
async def acl_server(redis_factory: RedisFactory, tmp_path: Path) -> AsyncIterator[AclServer]:
    """A redis-server whose users come from bus.acl: admin, coordinator, agent of clients 0,1."""
    admin, coordinator = account(tmp_path, "admin"), account(tmp_path, "coordinator")
    agent = account(tmp_path, "silo-a")
    aclfile = write_acl(tmp_path, admin=admin, coordinator=coordinator,
                        agents=((agent, ["0", "1"]),))
    server = redis_factory(aclfile=aclfile, username=admin.name, password=admin.password)
    clients: list[aioredis.Redis] = []

    def login(who: Account) -> aioredis.Redis:
        clients.append(connect(RedisSettings(server.url, username=who.name,
                                             password=who.password)))
        return clients[-1]

    yield AclServer(server, admin, coordinator, agent, login)
    for client in clients:
        await client.aclose()


async def _coordinator_publishes(r: aioredis.Redis) -> BlobRef:
    """A run as the coordinator announces it: pointer, state, model blob, two jobs for client 0."""
    await set_active_run(r, KEYS.run_id)
    await r.hset(KEYS.state(), "status", "running")
    await ensure_group(r, KEYS.results(0), RESULTS_GROUP)
    model = await BlobStore(r, KEYS).put(MODEL)
    for job in (b"job-1", b"job-2"):
        await publish(r, KEYS.jobs("0"), job)
    return model


async def test_agent_user_can_do_its_job(acl_server: AclServer) -> None:
    """Active run, state, registration, heartbeats, jobs, blobs, results: all allowed."""
    coordinator = acl_server.login(acl_server.coordinator)
    agent = acl_server.login(acl_server.agent)
    model = await _coordinator_publishes(coordinator)
    await wait_ready(agent)
    assert await get_active_run(agent) == KEYS.run_id
    assert await agent.hget(KEYS.state(), "status") == b"running"
    registry, me = Registry(agent, KEYS), Registration(agent_id="silo-a", client_ids=["0", "1"])
    await registry.register(me)
    await registry.heartbeat(["0", "1"])
    jobs = [KEYS.jobs("0"), KEYS.jobs("1")]
    for stream in jobs:
        await ensure_group(agent, stream, JOBS_GROUP)
    first = (await consume(agent, jobs, JOBS_GROUP, "silo-a", count=1, block_ms=0))[0]
    blobs = BlobStore(agent, KEYS, chunk_bytes=1024)
    assert await blobs.get(model) == MODEL
    update = await blobs.put(b"u" * 3000)  # chunked: several keys and a manifest
    await publish(agent, KEYS.results(0), b"result")
    await ack(agent, first.stream, JOBS_GROUP, [first.entry_id])
    await consume(agent, jobs, JOBS_GROUP, "silo-a", block_ms=0)  # job-2, left pending
    dead = KEYS.dead_letter(KEYS.jobs("0"))
    assert await reclaim(agent, KEYS.jobs("0"), JOBS_GROUP, "silo-a2", min_idle_ms=0,
                         max_deliveries=1, dead_letter=dead) == []
    await registry.unregister(me)
    results = await consume(coordinator, [KEYS.results(0)], RESULTS_GROUP, "c", block_ms=0)
    assert [e.payload for e in results] == [b"result"]
    assert await BlobStore(coordinator, KEYS).get(update, verify=True) == b"u" * 3000
    admin = acl_server.login(acl_server.admin)
    assert [f[FIELD] for _, f in await admin.xrange(dead)] == [b"job-2"]


REFUSED_TO_AGENT = [
    ("HSET", KEYS.state(), "status", "finished"),  # its run's state
    ("HSET", OTHER_RUN.state(), "status", "running"),  # another run's state
    ("SET", "pwfl:active_run", "evil"),
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0"),
    ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST"), ("EVAL", "return 1", "0"), ("MONITOR",),
    ("XRANGE", KEYS.results(0), "-", "+"),  # other silos' update digests
    ("XREADGROUP", "GROUP", RESULTS_GROUP, "x", "STREAMS", KEYS.results(0), ">"),
    ("XREADGROUP", "GROUP", JOBS_GROUP, "x", "STREAMS", KEYS.jobs("2"), ">"),  # not its client
    ("XGROUP", "CREATE", KEYS.jobs("2"), JOBS_GROUP, "0", "MKSTREAM"),
    ("SET", KEYS.alive("2"), "1"),  # another client's heartbeat
    ("HGETALL", KEYS.clients()), ("DEL", KEYS.blob("0" * 64)), ("GET", KEYS.alive("0")),
    ("SET", "elsewhere:key", "1"),
]


@pytest.mark.parametrize("command", REFUSED_TO_AGENT, ids=lambda c: " ".join(c[:2]))
async def test_agent_user_is_refused_the_rest(acl_server: AclServer,
                                              command: tuple[str, ...]) -> None:
    """Anything outside the agent's job answers NOPERM."""
    agent = acl_server.login(acl_server.agent)
    with pytest.raises(rex.NoPermissionError):
        await agent.execute_command(*command)


async def test_agent_cannot_beat_for_another_client(acl_server: AclServer) -> None:
    """Through the bus, a heartbeat for a client the agent does not host is a BusError."""
    agent = acl_server.login(acl_server.agent)
    with pytest.raises(BusError, match="no permissions"):
        await Registry(agent, KEYS).heartbeat(["0", "2"])


async def test_coordinator_user_can_run_the_run(acl_server: AclServer) -> None:
    """The coordinator's reads, trims, registry polls and blob deletes are allowed."""
    coordinator = acl_server.login(acl_server.coordinator)
    model = await _coordinator_publishes(coordinator)
    await ensure_group(coordinator, KEYS.jobs("0"), JOBS_GROUP)
    registry = Registry(coordinator, KEYS)
    await registry.register(Registration(agent_id="a", client_ids=["0"]))
    assert set(await registry.clients()) == {"0"}
    assert await registry.alive(["0", "1"]) == {"0"}
    assert await trim(coordinator, KEYS.jobs("0"), [JOBS_GROUP]) == 0
    blobs = BlobStore(coordinator, KEYS)
    assert await blobs.get(model) == MODEL
    await blobs.delete(model)
    admin = acl_server.login(acl_server.admin)
    assert await admin.exists(KEYS.blob(model.digest)) == 0


@pytest.mark.parametrize("command", [("FLUSHALL",), ("CONFIG", "SET", "save", ""), ("KEYS", "*"),
                                     ("SHUTDOWN", "NOSAVE"), ("SET", "elsewhere:key", "1")],
                         ids=lambda c: c[0])
async def test_coordinator_user_is_refused_admin_commands(acl_server: AclServer,
                                                          command: tuple[str, ...]) -> None:
    """The coordinator cannot flush, reconfigure, list or stop Redis, or leave its namespace."""
    coordinator = acl_server.login(acl_server.coordinator)
    with pytest.raises(rex.NoPermissionError):
        await coordinator.execute_command(*command)


async def test_no_login_or_a_wrong_password_is_refused_at_once(acl_server: AclServer) -> None:
    """The default user is off; a wrong password fails fast (no retries) as a BusError."""
    anonymous = connect(acl_server.server.url)
    wrong = connect(RedisSettings(acl_server.server.url, username=acl_server.agent.name,
                                  password="wrong"))
    try:
        with pytest.raises(rex.AuthenticationError):
            await anonymous.ping()
        async with asyncio.timeout(5):
            with pytest.raises(BusError):
                await wait_ready(wrong)
    finally:
        await anonymous.aclose()
        await wrong.aclose()


def test_acl_command_line_writes_a_loadable_file(tmp_path: Path,
                                                 redis_factory: RedisFactory) -> None:
    """`python -m bus.acl` writes a 0600 file redis-server loads; it holds no password."""
    require_redis_7()
    admin, coordinator = account(tmp_path, "admin"), account(tmp_path, "coordinator")
    agent = account(tmp_path, "agents")
    out = tmp_path / "users.acl"
    assert acl.main(["--admin", admin.name, str(admin.password_file),
                     "--coordinator", coordinator.name, str(coordinator.password_file),
                     "--agent", agent.name, str(agent.password_file), "*",
                     "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    text = out.read_text()
    assert all(a.password not in text for a in (admin, coordinator, agent))
    server = redis_factory(aclfile=out, username=admin.name, password=admin.password)
    with redis.Redis.from_url(server.url, username=agent.name, password=agent.password) as r:
        assert r.ping()
        r.set(KEYS.alive("any-client"), "1")  # a shared agents' user: any client
        with pytest.raises(rex.NoPermissionError):
            r.hset(KEYS.state(), "status", "x")


async def test_setuser_commands_apply_to_a_running_server(redis_factory: RedisFactory) -> None:
    """The same users can be added to a running server with ACL SETUSER."""
    require_redis_7()
    server = redis_factory()
    users = acl.users(agents=[("silo-b", "pw-" + "x" * 20, ["2"])])
    admin = connect(server.url)
    agent = connect(RedisSettings(server.url, username="silo-b", password="pw-" + "x" * 20))
    try:
        for command in acl.setuser_commands(users):
            await admin.execute_command(*command)
        await agent.set(KEYS.alive("2"), "1")
        with pytest.raises(rex.NoPermissionError):
            await agent.set(KEYS.alive("3"), "1")
    finally:
        await admin.aclose()
        await agent.aclose()


def test_names_that_would_widen_a_pattern_are_refused() -> None:
    """Client ids, users and namespaces with glob characters or spaces cannot make rules."""
    for bad in ("*", "a b", "c?", "[0-9]", ""):
        with pytest.raises(BusError):
            acl.agent_rules([bad])
    assert acl.glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"
