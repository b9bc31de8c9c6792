"""Fault tests: Redis restarted under a live run, and a silo's network cut and restored.

Both runs check the common ledger (`tests.faults.ledger_problems`): the run
finished, every slot reached its rounds, no update was aggregated twice, none
handed over was lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from bus.embedded import find_redis_server, free_port
from tests.conftest import RedisFactory
from tests.e2e import start_coordinator
from tests.faults import AgentProc, ledger_problems, start_agent, stop_agents

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SLOW = "tests.e2e_tasks:SlowClientTask"
# How long Redis stays away: longer than the agents' heartbeat period (so beats are
# missed and retried), shorter than their heartbeat TTL (so no client is lost for it).
REDIS_OUTAGE_S = 2.0


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    stop_agents(started)


def test_redis_restarted_mid_run_with_aof_everyone_reconnects_and_goes_on(
        redis_factory: RedisFactory, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Redis (AOF on) stops mid-round and comes back on the same port: the coordinator and the
    agents reconnect with backoff, streams and groups survived, and the run finishes."""
    port, workdir = free_port(), tmp_path / "redis"
    server = redis_factory(appendonly=True, port=port, workdir=workdir)
    run = start_coordinator(server.url, tmp_path, "fault-redis", "--task", SLOW,
                            "--task-option", "base_s=0.5", "--slots", "2", "--clients", "4",
                            "--rounds", "4")
    with run:
        for name, clients in (("a", "0,1"), ("b", "2,3")):
            agents.append(start_agent(server.url, run.run_id, clients, tmp_path / "agents", name))
        run.wait_for(lambda ev: any(e["event"] == "round_closed" for e in ev), 120)
        server.stop()  # SHUTDOWN: the AOF is flushed, the data directory kept
        time.sleep(REDIS_OUTAGE_S)  # the outage itself: nothing to wait for
        redis_factory(appendonly=True, port=port, workdir=workdir)
        assert run.wait(150) == 0, run.output()[-3000:]
    events = run.events()
    agent_events = [e for a in agents for e in a.events()]
    assert ledger_problems(events, agent_events, slots=2, rounds=4) == []
    assert not [e for e in events if e["event"] == "stream_group_recreated"]
    assert not [e for e in agent_events if e["event"] == "stream_group_recreated"]
