"""Shared fixtures: real redis-server processes and clients on them.

    redis_server   one server for the whole session, on a free loopback TCP port
    redis_url      its URL, after FLUSHALL (every test starts from an empty Redis)
    redis_client   an async `bus.connect` client on it, closed after the test
    redis_factory  start extra private servers (AOF, fixed port, ...); all stopped after
    run_keys       `bus.keys.Keys` of a run id unique to the test
    launch         start coordinators (`tests.e2e.start_coordinator`) on the session server;
                   any still running at teardown is killed
    popen_agents   agent processes (subprocess.Popen) a test starts; killed at teardown
    agents         agent processes a test starts (`tests.faults.start_agent`); any still
                   running at teardown is killed
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import torch

from bus.connection import connect
from bus.embedded import EmbeddedRedis
from bus.keys import Keys
from tests.e2e import Run, start_coordinator
from tests.faults import AgentProc, stop_agents

RedisFactory = Callable[..., EmbeddedRedis]


@pytest.fixture(autouse=True)
def _isolated_global_state() -> Iterator[None]:
    """Every test starts from the same process-wide state, whatever ran before it (the
    suite passes in any order): torch on one thread (as in the trainers) and seeded; what a
    test changes of the environment, the working directory or torch's threads is restored."""
    threads, cwd, environ = torch.get_num_threads(), os.getcwd(), dict(os.environ)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
    os.chdir(cwd)
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A real redis-server for the session, on a free loopback TCP port."""
    server = EmbeddedRedis(unix_socket=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session server's URL, emptied (FLUSHALL) for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An async client from `bus.connect` on the emptied session server."""
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    """Start private servers: ``redis_factory(appendonly=True, port=p, workdir=d)``.

    Each started server is stopped at teardown (stopping twice is harmless).
    """
    started: list[EmbeddedRedis] = []

    def start(**kwargs: Any) -> EmbeddedRedis:
        kwargs.setdefault("unix_socket", False)
        server = EmbeddedRedis(**kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def run_keys() -> Keys:
    """Key names of a run id no other test uses."""
    return Keys(run_id=f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    """Agents a test starts go here; any still running at teardown is killed."""
    started: list[AgentProc] = []
    yield started
    stop_agents(started)


@pytest.fixture
def popen_agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Agent processes (`tests.security.start_agent`) a test starts; any still running at
    teardown is killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture
def launch(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start coordinators on the session Redis; any still running at teardown is killed."""
    runs: list[Run] = []

    def start(run_id: str, *args: str) -> Run:
        runs.append(start_coordinator(redis_server.url, tmp_path, run_id, *args))
        return runs[-1]

    yield start
    for run in runs:
        run.close()
