"""End to end: real agents refuse a task outside their allowlist, and jobs not signed with
their clients' keys; the run goes on with the agents that serve it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bus.credentials import Keyring
from bus.embedded import EmbeddedRedis
from tests.e2e import read_events, start_coordinator
from tests.security import start_agent, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SLOW = "tests.e2e_tasks:SlowClientTask"


def test_agents_refuse_tasks_they_do_not_allow_and_jobs_they_cannot_verify(
        redis_server: EmbeddedRedis, tmp_path: Path,
        popen_agents: list[subprocess.Popen[bytes]]) -> None:
    """Client 0's agent allows the run's task and has its key: it serves. Client 1's agent
    does not allow the task: each job is refused (job_refused, task_not_allowed), reported
    failed and never trained. Client 2's agent holds a key the coordinator did not sign
    with: it refuses every job as bad_job_signature."""
    keyring = Keyring().with_generated(["0", "1", "2"])
    stranger = Keyring().with_generated(["2"])
    vault = tmp_path / "keys"
    run = start_coordinator(
        redis_server.url, tmp_path / "runs", "refusals", "--task", SLOW,
        "--task-option", "base_s=0.1", "--slots", "1", "--clients", "3", "--rounds", "2",
        "--deadline", "4", "--min-clients", "1",
        "--client-keys", str(keyring.write_dir(vault / "coordinator")))

    def agent(name: str, client: str, keys: Keyring, *args: str) -> Path:
        folder = keys.subset([client]).write_dir(vault / name)
        popen_agents.append(start_agent(redis_server.url, tmp_path, name, client, "--run-id",
                                  "refusals", "--client-keys", str(folder), *args))
        return tmp_path / f"{name}.jsonl"

    with run:
        served = agent("allows", "0", keyring, "--allow-task", SLOW)
        refusing = agent("builtins-only", "1", keyring)
        unverified = agent("other-key", "2", stranger, "--allow-task", SLOW)
        assert run.wait(120) == 0, run.output()[-3000:]
    assert [stop(a) for a in popen_agents] == [0, 0, 0]
    failed = {e["client_id"]: e["error"] for e in run.events("job_failed")}
    assert failed["1"].startswith(f"task_not_allowed: task '{SLOW}' is not allowed")
    refused = [e for e in read_events(refusing) if e["event"] == "job_refused"]
    assert refused
    assert {(e["reason"], e["task"]) for e in refused} == {("task_not_allowed", SLOW)}
    assert not [e for e in read_events(refusing) if e["event"] == "job_started"]
    bad = [e for e in read_events(unverified) if e["event"] == "job_refused"]
    assert {e["reason"] for e in bad} == {"bad_job_signature"}
    # Its refusal is signed with the wrong key too: the coordinator cannot trust it either.
    assert {e["client_id"] for e in run.events("update_rejected")} == {"2"}
    folded = {e["client_id"] for e in run.events("update_folded")}
    assert folded == {"0"}
    assert len([e for e in read_events(served) if e["event"] == "update_uploaded"]) == 2


ATTACK = "trainer_worker.tasks.attack:AttackTask"


def test_an_allowed_wrapper_cannot_load_a_task_the_agent_does_not_allow(
        redis_server: EmbeddedRedis, tmp_path: Path,
        popen_agents: list[subprocess.Popen[bytes]]) -> None:
    """The run's task is the attack wrapper around a test task. Both agents allow the
    wrapper; only client 0's allows the inner task. Client 1's trainer refuses to import
    the inner task (its allowlist holds inside the wrapper), so each of its jobs fails with
    task_not_allowed, while client 0's are folded and the run finishes."""
    run = start_coordinator(
        redis_server.url, tmp_path / "runs", "deep-allowlist", "--task", ATTACK,
        "--task-option", f'inner="{SLOW}"', "--task-option", 'attack="none"',
        "--task-option", "base_s=0.1", "--slots", "1", "--clients", "2", "--rounds", "2",
        "--deadline", "10", "--min-clients", "1")
    with run:
        for name, client, allowed in (("deep", "0", [ATTACK, SLOW]), ("shallow", "1", [ATTACK])):
            flags = [arg for spec in allowed for arg in ("--allow-task", spec)]
            popen_agents.append(start_agent(redis_server.url, tmp_path, name, client,
                                            "--run-id", "deep-allowlist", *flags))
        assert run.wait(120) == 0, run.output()[-3000:]
    assert [stop(a) for a in popen_agents] == [0, 0]
    failed = run.events("job_failed")
    assert failed
    assert {e["client_id"] for e in failed} == {"1"}
    assert all(e["error"].startswith(f"task_not_allowed: task '{SLOW}' is not allowed")
               for e in failed), failed
    started = [e for e in read_events(tmp_path / "shallow.jsonl") if e["event"] == "job_started"]
    assert started  # the wrapper itself was allowed: the refusal came from inside it
    assert {e["client_id"] for e in run.events("update_folded")} == {"0"}
