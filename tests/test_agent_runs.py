"""An agent on a silo host outlives runs: it follows the active run, serves it, and
waits for the next one when it ends (a systemd unit starts it once, not per run)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import RedisFactory
from tests.e2e import ROOT, start_coordinator
from tests.faults import AgentProc, start_agent, wait_until

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


def test_agent_started_as_the_coordinator_says_leaves_with_the_embedded_redis(
        tmp_path: Path) -> None:
    """With no --redis the coordinator's Redis is private and stops with it. Its start-up
    message says how to start an agent; that agent serves the run and, with
    --exit-when-done, leaves cleanly at the end (the coordinator keeps Redis up until its
    agents have seen the end, instead of leaving them to retry a vanished socket)."""
    console = tmp_path / "coordinator.txt"
    with console.open("wb") as out:
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--slots", "2", "--clients", "2", "--rounds",
             "2", "--task", "synthetic", "--no-progress", "--http-port", "0", "--runs-dir",
             str(tmp_path / "runs"), "--run-id", "hinted"],
            cwd=ROOT, stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(lambda: "python -m client_agent" in console.read_text(), 60,
                   "the coordinator prints how to start an agent")
        hint = next(line for line in console.read_text().splitlines()
                    if "python -m client_agent" in line)
        argv = shlex.split(hint.strip())
        assert argv[:3] == ["python", "-m", "client_agent"]
        agent = subprocess.run([sys.executable, *argv[1:], "--exit-when-done"], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               capture_output=True, timeout=120, check=False)
        assert agent.returncode == 0, agent.stderr[-2000:]
        assert coordinator.wait(30) == 0, console.read_text()[-2000:]
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()
    assert b"redis_unreachable" not in agent.stderr + agent.stdout


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def test_a_local_agent_leaves_when_its_coordinator_dies_with_redis(
        redis_factory: RedisFactory, tmp_path: Path) -> None:
    """An agent started with --exit-with-parent whose parent (a local coordinator) dies
    together with its Redis leaves within seconds, instead of retrying the vanished Redis
    for --redis-outage-s (300 s) first."""
    server = redis_factory()
    log_file, pid_file = tmp_path / "agent.jsonl", tmp_path / "agent.pid"
    agent = shlex.join([sys.executable, "-m", "client_agent", "--redis", server.url,
                        "--run-id", "orphaned", "--clients", "0", "--exit-with-parent",
                        "--log-file", str(log_file), "--log-level", "info"])
    parent = subprocess.Popen(
        ["bash", "-c", f"{agent} >{tmp_path / 'agent.console.log'} 2>&1 & echo $! >{pid_file}; "
         "wait"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(lambda: "agent_started" in (log_file.read_text() if log_file.exists()
                                               else ""), 90, "the agent starts")
        pid = int(pid_file.read_text())
        server.stop()
        parent.kill()
        parent.wait()
        orphaned_at = time.monotonic()
        wait_until(lambda: not _alive(pid), 30, "the orphaned agent leaves")
        left_after_s = time.monotonic() - orphaned_at
    finally:
        if parent.poll() is None:
            parent.kill()
    print(f"the agent left {left_after_s:.1f} s after its parent died")  # noqa: T201 - pytest -s
    stopping = [line for line in log_file.read_text().splitlines() if "agent_stopping" in line]
    assert len(stopping) == 1
    assert "parent_exited" in stopping[0]
