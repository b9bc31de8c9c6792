"""Fault tests: agents, trainers and stragglers, with real processes and real signals.

Each run reads what happened from the coordinator's and the agents' JSON logs and
checks the common ledger (`tests.faults.ledger_problems`): the run finished, every
slot reached its rounds, no update was aggregated twice, none handed over was lost.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from bus.embedded import EmbeddedRedis
from tests.e2e import read_events, start_coordinator
from tests.faults import AgentProc, fault_ledger, start_agent
from trainer_worker import shm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FLAKY = "tests.e2e_tasks:FlakyTask"
SHM = Path(shm.SHM_DIR)
SLOW = "tests.e2e_tasks:SlowClientTask"


def _in_round(round_: int) -> str:
    return f"-r{round_}-"


def test_trainer_killed_or_raising_fails_its_job_and_the_round_goes_on(
        redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """A SIGKILLed trainer is replaced and a task that raises fails only its job; rounds go on."""
    run = start_coordinator(
        redis_server.url, tmp_path, "fault-trainer", "--task", FLAKY,
        "--task-option", 'raise_clients=["1"]', "--task-option", "base_s=0.4",
        "--slots", "1", "--clients", "3", "--rounds", "3", "--local-agents", "1")
    with run:
        agent_log = tmp_path / "fault-trainer" / "agent-0.jsonl"
        run.wait_for(lambda _: any(e["event"] == "job_started" and _in_round(2) in e["job_id"]
                                   for e in read_events(agent_log)), timeout_s=90)
        trainer_pid = [e for e in read_events(agent_log) if e["event"] == "trainer_started"][-1]
        os.kill(trainer_pid["trainer_pid"], signal.SIGKILL)
        assert run.wait(120) == 0, run.output()[-3000:]
    agent_events = read_events(agent_log)
    errors = [e["error"] for e in run.events("job_failed")]
    assert any("RuntimeError: injected failure in user code for client 1" in e for e in errors)
    assert any("trainer died (exit code -9)" in e for e in errors)
    exited = [e for e in agent_events if e["event"] == "trainer_exited" and e["job_id"]]
    assert [e["exitcode"] for e in exited] == [-9]
    assert len([e for e in agent_events if e["event"] == "trainer_started"]) == 2
    failed_rounds = [e for e in run.events("quorum_reached") if e["failed"]]
    assert failed_rounds
    assert all(e["reason"] == "all" and e["received"] >= 1 for e in failed_rounds)
    assert fault_ledger("trainer SIGKILLed mid-job; user code raising for one client",
                        run.events(), agent_events, slots=1, rounds=3) == []


def _training(agent: AgentProc) -> bool:
    return bool(agent.events("job_started"))


def test_killed_agents_leases_return_or_a_replacement_reclaims_their_jobs(
        redis_server: EmbeddedRedis, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Two agents SIGKILLed mid-training: one's clients are lost when their heartbeats expire
    (the job counts as failed, the round goes on; when a replacement later finishes that job
    its update is late, never a second answer); the other's replacement, started before
    expiry, reclaims the pending job and its update is folded once."""
    run_id = "fault-agent"
    run = start_coordinator(redis_server.url, tmp_path, run_id, "--task", SLOW,
                            "--task-option", "base_s=1.0", "--slots", "2", "--clients", "4",
                            "--rounds", "3")
    logs = tmp_path / "agents"

    def agent(name: str, clients: str, ttl_ms: int) -> AgentProc:
        agents.append(start_agent(redis_server.url, run_id, clients, logs, name,
                                  "--heartbeat-ttl-ms", str(ttl_ms), "--reclaim-idle-ms", "500"))
        return agents[-1]

    with run:
        healthy = agent("a", "0,1", 5000)
        expiring, outliving = agent("b", "2", 1500), agent("c", "3", 120_000)
        expiring.wait_for(lambda ev: any(e["event"] == "job_started" for e in ev), 90)
        outliving.wait_for(lambda ev: any(e["event"] == "job_started" for e in ev), 90)
        lost_job = expiring.events("job_started")[0]["job_id"]
        reclaimed_job = outliving.events("job_started")[0]["job_id"]
        expiring.kill()
        outliving.kill()
        replacement = agent("c2", "3", 120_000)
        run.wait_for(lambda ev: any(e["event"] == "client_lost" for e in ev), 30)
        late_replacement = agent("b2", "2", 1500)
        assert run.wait(150) == 0, run.output()[-3000:]
    events = run.events()
    lost = [e for e in events if e["event"] == "client_lost"]
    assert [(e["client_id"], e["reason"]) for e in lost] == [("2", "heartbeat_expired")]
    assert {"client_id": "2", "reason": "lost"}.items() <= next(
        e for e in events if e["event"] == "lease_returned" and e["reason"] == "lost").items()
    failed = {e["job_id"]: e["error"] for e in run.events("job_failed")}
    assert failed == {lost_job: "client lost (heartbeat_expired)"}
    assert [e["job_id"] for e in run.events("update_folded")].count(reclaimed_job) == 1
    assert replacement.events("job_reclaimed")
    assert reclaimed_job in {e["job_id"] for e in replacement.events("job_received")}
    # The lost job's real result, if it comes while its slot still runs, is a late update.
    assert not [e for e in run.events("update_rejected") if e.get("job_id") == lost_job]
    assert len([e for e in run.events("update_late") if e["job_id"] == lost_job]) <= 1
    assert late_replacement.events("job_reclaimed")
    assert healthy.events("job_reclaimed") == []  # never its own jobs, however long they train
    for killed in (expiring, outliving):  # swept by the agents started after them
        assert not list(SHM.glob(f"pwfl-{killed.proc.pid}-*")), "segments outlived their agent"
    agent_events = [e for a in agents for e in a.events()]
    assert fault_ledger("two agents SIGKILLed mid-training (one past heartbeat expiry, one "
                        "replaced before it)", events, agent_events, slots=2, rounds=3) == []


def test_straggler_ten_times_slower_is_closed_out_and_its_late_update_dropped(
        redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """A client 10x slower than the rest misses the deadline: its round closes without it and,
    with --late-policy drop, its late update is dropped (counted), never folded.
    (The fold policy on the same straggler: tests/test_e2e.py, deadline test.)"""
    run = start_coordinator(
        redis_server.url, tmp_path, "fault-straggler", "--task", SLOW,
        "--task-option", 'slow_clients=["2"]', "--task-option", "slow_s=3",
        "--task-option", "base_s=0.3", "--slots", "1", "--clients", "3", "--rounds", "5",
        "--deadline", "1.5", "--min-clients", "2", "--late-policy", "drop",
        "--local-agents", "1", "--local-devices", "cpu,cpu")
    with run:
        assert run.wait(150) == 0, run.output()[-3000:]
    events = run.events()
    first = run.events("quorum_reached")[0]
    assert (first["reason"], first["received"], first["expected"]) == ("deadline", 2, 3)
    late = [e for e in run.events("update_late") if e["client_id"] == "2"]
    assert late
    assert all(e["action"] == "dropped" for e in late)
    assert not {e["job_id"] for e in late} & {e["job_id"] for e in run.events("update_folded")}
    agent_events = read_events(tmp_path / "fault-straggler" / "agent-0.jsonl")
    assert fault_ledger("straggler 10x slower, --late-policy drop", events, agent_events,
                        slots=1, rounds=5) == []
