"""An agent on a silo host outlives runs: it follows the active run, serves it, and
waits for the next one when it ends (a systemd unit starts it once, not per run)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import RedisFactory
from tests.e2e import start_coordinator
from tests.faults import AgentProc, start_agent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_agent_without_a_run_id_serves_one_run_after_another_until_stopped(
        redis_factory: RedisFactory, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Started before any run, the agent waits; it serves run one, stays up when it ends,
    serves run two, and leaves cleanly on SIGTERM."""
    server = redis_factory()  # its own server: the active-run pointer is server-wide
    agent = start_agent(server.url, None, "0,1", tmp_path / "agents", "follower",
                        "--log-level", "info")
    agents.append(agent)
    for run_id in ("first", "second"):
        run = start_coordinator(server.url, tmp_path, run_id, "--task", "synthetic",
                                "--slots", "1", "--clients", "2", "--rounds", "2")
        with run:
            assert run.wait(150) == 0, run.output()[-3000:]
        folded = {e["client_id"] for e in run.events("update_folded")}
        assert folded == {"0", "1"}, f"{run_id}: updates folded from {folded}"
        assert agent.proc.poll() is None, f"the agent exited after run {run_id}"
    served = [e["run_id"] for e in agent.events("job_received")]
    assert sorted(set(served)) == ["first", "second"]
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(60) == 0
    assert agent.events("agent_stopped")
