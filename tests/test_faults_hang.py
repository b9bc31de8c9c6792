"""Fault tests: one client's training call, or gradient step, hangs forever (a stuck user call).

Before agents bounded a training call, the hung call held its trainer, so the agent's
other client waited behind it for the rest of the run, and neither lease ever came
back: the silo was silently gone. Now the call is killed after --train-timeout-s, the
trainer restarts, the job fails with reason train_timeout and both clients serve on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.embedded import EmbeddedRedis
from tests.e2e import lease_violations, start_coordinator
from tests.faults import AgentProc, fault_ledger, start_agent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HANGING = "tests.e2e_tasks:HangingTask"
SLOTS, ROUNDS = 2, 5


def test_a_hung_training_call_is_killed_and_every_client_keeps_serving(
        redis_server: EmbeddedRedis, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Client 1's 2nd training call never returns: after --train-timeout-s its trainer is
    killed and restarted, the job fails (train_timeout) and its lease returns; the agent's
    other client and the other agent's clients never miss a job, and client 1's later jobs
    are folded; nothing is lost or doubled."""
    run_id = "fault-hang"
    run = start_coordinator(
        redis_server.url, tmp_path, run_id, "--task", HANGING,
        "--task-option", 'hang_clients=["1"]', "--task-option", "hang_on_job=2",
        "--task-option", f'once_file="{tmp_path / "hung"}"', "--task-option", "base_s=0.2",
        "--slots", str(SLOTS), "--clients", "4", "--rounds", str(ROUNDS),
        "--deadline", "60", "--min-clients", "1")
    logs = tmp_path / "agents"
    with run:
        for name, clients in (("a", "0,1"), ("b", "2,3")):
            agents.append(start_agent(redis_server.url, run_id, clients, logs, name,
                                      "--train-timeout-s", "3"))
        assert run.wait(180) == 0, run.output()[-3000:]
    events = run.events()
    hung_agent = agents[0]
    timeouts = hung_agent.events("train_timeout")
    assert [(e["client_id"], e["limit_s"]) for e in timeouts] == [("1", 3.0)]
    hung_job = timeouts[0]["job_id"]
    failed = {e["job_id"]: e["error"] for e in run.events("job_failed")}
    assert list(failed) == [hung_job]
    assert failed[hung_job].startswith("train_timeout: no result within 3 s")
    returned = [e for e in run.events("lease_returned") if e["client_id"] == "1"]
    assert any(e["reason"] == "failed" for e in returned)
    assert len(hung_agent.events("trainer_started")) == 2  # the first, and its replacement
    folded = {e["job_id"] for e in run.events("update_folded")}
    published = run.events("job_published")
    others = [e["job_id"] for e in published if e["client_id"] != "1"]
    assert others
    assert set(others) <= folded  # every other client served every job
    after = [e["job_id"] for e in published
             if e["client_id"] == "1" and e["ts"] > timeouts[0]["ts"]]
    assert after
    assert set(after) <= folded  # the hung client came back
    assert lease_violations(events) == []
    agent_events = [e for a in agents for e in a.events()]
    assert fault_ledger("one client's training call hangs forever (--train-timeout-s 3)",
                        events, agent_events, slots=SLOTS, rounds=ROUNDS) == []


HANGING_GRADIENT = "tests.e2e_tasks:HangingGradientTask"
GRADIENT_ROUNDS, GRADIENT_STEPS = 4, 5


def test_a_hung_gradient_step_is_killed_and_the_other_sessions_go_on(
        redis_server: EmbeddedRedis, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Every round leases all 4 clients of a gradient slot; client 1's 3rd step never
    returns. Its trainer, which client 0's session shares, is killed after
    --train-timeout-s and restarted; client 1's session fails (train_timeout) and its
    lease returns; client 0's session reopens on the new trainer and, like clients 2 and
    3, is averaged in every step; client 1 is back in every later round; nothing lost."""
    run_id = "fault-hang-gradient"
    run = start_coordinator(
        redis_server.url, tmp_path, run_id, "--mode", "gradient", "--task", HANGING_GRADIENT,
        "--task-option", 'hang_clients=["1"]', "--task-option", "hang_at=3",
        "--task-option", f'once_file="{tmp_path / "hung"}"', "--slots", "1", "--clients", "4",
        "--clients-per-round", "4", "--rounds", str(GRADIENT_ROUNDS), "--gradient-steps",
        str(GRADIENT_STEPS), "--deadline", "60", "--min-clients", "1")
    with run:
        for name, clients in (("a", "0,1"), ("b", "2,3")):
            agents.append(start_agent(redis_server.url, run_id, clients, tmp_path / "agents",
                                      name, "--train-timeout-s", "3"))
        assert run.wait(180) == 0, run.output()[-3000:]
    events, hung_agent = run.events(), agents[0]
    timeouts = hung_agent.events("train_timeout")
    assert [(e["client_id"], e["limit_s"]) for e in timeouts] == [("1", 3.0)]
    failed = run.events("job_failed")
    assert [(e["client_id"], e["round"]) for e in failed] == [("1", 1)]
    assert failed[0]["error"].startswith("train_timeout: no result within 3 s")
    assert any(e["reason"] == "failed" for e in run.events("lease_returned")
               if e["client_id"] == "1")
    assert len(hung_agent.events("trainer_started")) == 2  # the first, and its replacement
    assert [e["client_id"] for e in hung_agent.events("gradient_session_reopened")] == ["0"]
    steps = [(e["round"], e["step"], e["clients"]) for e in run.events("gradient_step")]
    assert steps == [(r, k, 3 if r == 1 and k >= 3 else 4)
                     for r in range(1, GRADIENT_ROUNDS + 1)
                     for k in range(1, GRADIENT_STEPS + 1)]
    assert run.events("gradient_client_dropped") == []
    assert lease_violations(events) == []
    agent_events = [e for a in agents for e in a.events()]
    assert fault_ledger("one client's gradient step hangs forever (--train-timeout-s 3)",
                        events, agent_events, slots=1, rounds=GRADIENT_ROUNDS) == []
