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
from tests.e2e import read_events, start_coordinator
from tests.faults import AgentProc, fault_ledger, start_agent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SLOW = "tests.e2e_tasks:SlowClientTask"
# How long Redis stays away: longer than the agents' heartbeat period (so beats are
# missed and retried), shorter than their heartbeat TTL (so no client is lost for it).
REDIS_OUTAGE_S = 2.0


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
    assert fault_ledger(f"Redis (AOF) shut down mid-round, back after {REDIS_OUTAGE_S:.0f} s",
                        events, agent_events, slots=2, rounds=4) == []
    assert not [e for e in events if e["event"] == "stream_group_recreated"]
    assert not [e for e in agent_events if e["event"] == "stream_group_recreated"]


def test_redis_gone_past_the_outage_budget_coordinator_exits_and_resumes_to_the_end(
        redis_factory: RedisFactory, tmp_path: Path) -> None:
    """Redis stays away longer than --redis-outage-s: the coordinator gives up with status 2
    and says how to go on; once Redis is back (AOF), --resume finishes the run, and nothing
    was lost or folded twice across the two incarnations."""
    port, workdir = free_port(), tmp_path / "redis"
    server = redis_factory(appendonly=True, port=port, workdir=workdir)
    args = ("--task", SLOW, "--task-option", "base_s=0.3", "--slots", "2", "--clients", "4",
            "--rounds", "4", "--local-agents", "2", "--redis-outage-s", "1")
    run = start_coordinator(server.url, tmp_path, "fault-redis-gone", *args)
    with run:
        run.wait_for(lambda ev: any(e["event"] == "round_closed" for e in ev), 120)
        server.stop()
        assert run.wait(60) == 2, run.output()[-3000:]
    assert "--resume fault-redis-gone" in run.output()
    assert "unreachable" in run.output()
    redis_factory(appendonly=True, port=port, workdir=workdir)
    resumed = start_coordinator(server.url, tmp_path, "fault-redis-gone",
                                "--resume", "fault-redis-gone", "--local-agents", "2")
    with resumed:
        assert resumed.wait(150) == 0, resumed.output()[-3000:]
    events = resumed.events()  # both incarnations: one log file
    assert [e["event"] for e in events if e["event"] == "redis_unreachable"]
    agent_events = [e for log in (tmp_path / "fault-redis-gone").glob("agent-*.jsonl")
                    for e in read_events(log)]
    assert fault_ledger("Redis gone past --redis-outage-s 1: coordinator exits 2; --resume "
                        "once Redis is back", events, agent_events, slots=2, rounds=4) == []


@dataclass(frozen=True)
class Silo:
    """A network namespace joined to the host by a veth pair with two private addresses."""

    netns: str
    host_link: str
    host_address: str
    silo_address: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def silo() -> Iterator[Silo]:
    """A namespace `pwfl<pid>` and veth pair 10.213.N.1/30 (host) <-> 10.213.N.2/30 (silo);
    skipped where namespaces cannot be made; removed at teardown whatever happened."""
    tag = os.getpid() % 10_000
    n = 1 + os.getpid() % 250
    spec = Silo(f"pwfl{tag}", f"pwh{tag}", f"10.213.{n}.1", f"10.213.{n}.2")
    try:
        _ip("netns", "add", spec.netns)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or str(exc)
        pytest.skip(f"cannot create a network namespace (needs root and ip netns): {detail!r}")
    try:
        _ip("link", "add", spec.host_link, "type", "veth", "peer", "name", f"pws{tag}")
        _ip("link", "set", f"pws{tag}", "netns", spec.netns)
        _ip("addr", "add", f"{spec.host_address}/30", "dev", spec.host_link)
        _ip("link", "set", spec.host_link, "up")
        for args in (("addr", "add", f"{spec.silo_address}/30", "dev", f"pws{tag}"),
                     ("link", "set", f"pws{tag}", "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", spec.netns, "ip", *args)
        yield spec
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", spec.host_link)  # takes its peer with it
        _ip("netns", "del", spec.netns)


@pytest.fixture
def silo_redis(silo: Silo, tmp_path: Path) -> Iterator[int]:
    """A redis-server on loopback and on the host end of the silo's link; yields its port."""
    port, workdir = free_port(), tmp_path / "silo-redis"
    workdir.mkdir()
    proc = subprocess.Popen(
        [find_redis_server(), "--bind", "127.0.0.1", silo.host_address, "--port", str(port),
         # Protected mode refuses non-loopback clients without a password; this server
         # listens only on loopback and the test's own link.
         "--protected-mode", "no",
         "--save", "", "--appendonly", "no", "--dir", str(workdir),
         "--logfile", str(workdir / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ping(f"redis://{silo.host_address}:{port}")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_ping(url: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.ping():
                    return
            assert time.monotonic() < deadline, f"no redis-server at {url}"
            time.sleep(0.05)


def _count(events: list[dict[str, object]], name: str, client_id: str) -> int:
    return sum(1 for e in events if e["event"] == name and e.get("client_id") == client_id)


def test_silo_network_cut_and_restored_run_finishes(
        silo: Silo, silo_redis: int, tmp_path: Path, agents: list[AgentProc]) -> None:
    """A silo's agent in its own network namespace loses its link mid-run: its clients are
    lost when their heartbeats expire and the rounds go on; once the link is back the agent
    reconnects, its clients rejoin and train again, and the run finishes."""
    local = f"redis://127.0.0.1:{silo_redis}"
    run = start_coordinator(local, tmp_path, "fault-net", "--task", SLOW,
                            "--task-option", "base_s=0.5", "--slots", "2", "--clients", "4",
                            "--rounds", "5")
    with run:
        agents.append(start_agent(local, run.run_id, "0,1", tmp_path / "agents", "host"))
        remote = start_agent(f"redis://{silo.host_address}:{silo_redis}", run.run_id, "2,3",
                             tmp_path / "agents", "silo", "--heartbeat-ttl-ms", "2000",
                             netns=silo.netns)
        agents.append(remote)
        remote.wait_for(lambda ev: any(e["event"] == "job_started" for e in ev), 120)
        _ip("link", "set", silo.host_link, "down")
        run.wait_for(lambda ev: _count(ev, "client_lost", "2") == 1, 60)
        _ip("link", "set", silo.host_link, "up")
        run.wait_for(lambda ev: _count(ev, "client_registered", "2") == 2, 90)
        rejoined_at = len(run.events())
        assert run.wait(150) == 0, run.output()[-3000:]
    events = run.events()
    lost = {(e["client_id"], e["reason"]) for e in events if e["event"] == "client_lost"}
    assert lost == {("2", "heartbeat_expired"), ("3", "heartbeat_expired")}
    lost_jobs = {e["job_id"] for e in events if e["event"] == "job_failed"}
    assert not [e for e in events if e["event"] == "update_rejected" and e["job_id"] in lost_jobs]
    assert any(e["event"] == "update_folded" and e["client_id"] in {"2", "3"}
               for e in events[rejoined_at:])
    agent_events = [e for a in agents for e in a.events()]
    assert fault_ledger("silo link down (netns veth) past heartbeat expiry, then up",
                        events, agent_events, slots=2, rounds=5) == []
