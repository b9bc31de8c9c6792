"""Helpers for the fault tests: agents a test starts and kills itself, and the ledger
every fault test checks (the run finished, every slot reached its rounds, no update
was aggregated twice, none that an agent handed over was lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e import ROOT, read_events, wait_for_events

# Where `fault_ledger` appends one JSON line per fault test (`python -m tests.fault_matrix`).
MATRIX_ENV = "PWFL_FAULT_MATRIX"
# An upload this close to its slot's last quorum may not have been read before the
# slot finished (the dispatcher blocks up to 1 s per read); it is not counted as lost.
READ_SLACK_S = 2.0
# The test-only tasks (tests/e2e_tasks.py) that agents started here may run, besides the
# built-in ones: an agent runs no task it was not told to (--allow-task).
TEST_TASKS = tuple(f"--allow-task=tests.e2e_tasks:{name}"
                   for name in ("SlowClientTask", "FlakyTask", "HangingTask",
                                "HangingGradientTask"))


@dataclass
class AgentProc:
    """A `python -m client_agent` process started by a test, and its JSON log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_file: Path
    console: Path

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_events(self.log_file) if name is None or e["event"] == name]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout_s: float = 60) -> list[dict[str, Any]]:
        """Poll the agent's log until `predicate(events)` holds; the events then."""
        return wait_for_events(self.events, self.proc, predicate, timeout_s,
                               f"agent {self.name}", self.output)

    def trainer_pids(self) -> list[int]:
        return [e["trainer_pid"] for e in self.events("trainer_started")]

    def output(self) -> str:
        return self.console.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL: no drain, no unregister; its trainers leave when they see it gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def start_agent(redis_url: str, run_id: str | None, clients: str, log_dir: Path, name: str,
                *args: str, netns: str | None = None) -> AgentProc:
    """An agent serving `run_id` for `clients` (comma-separated), exiting when the run ends;
    with `run_id` None, one that follows the active run, run after run, until stopped."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file, console = log_dir / f"{name}.jsonl", log_dir / f"{name}.console.log"
    serve = ["--run-id", run_id, "--exit-when-done"] if run_id is not None else []
    argv = [sys.executable, "-m", "client_agent", "--redis", redis_url, *serve,
            "--clients", clients, "--agent-id", name,
            "--log-file", str(log_file), "--log-level", "warning", *TEST_TASKS, *args]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]  # ip execs the agent: same pid
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with console.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out, env=env,
                                stdin=subprocess.DEVNULL)
    return AgentProc(name, proc, log_file, console)


def stop_agents(agents: list[AgentProc]) -> None:
    """Teardown: kill whatever agent a test left running."""
    for agent in agents:
        if agent.proc.poll() is None:
            agent.kill()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in time: {what}")
        time.sleep(0.05)


def _of(events: list[dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
    return (e for e in events if e["event"] == name)


def ledger_problems(events: list[dict[str, Any]], agent_events: list[dict[str, Any]],
                    slots: int, rounds: int) -> list[str]:
    """What went wrong by the fault tests' common standard; [] when all is well.

    `events` is the coordinator's log (every incarnation), `agent_events` every agent's.
    """
    problems = []
    finished = [e["status"] for e in _of(events, "run_finished")]
    if not finished or finished[-1] != "finished":
        problems.append(f"run did not finish: {finished}")
    closed = {(e["slot_id"], e["round"]) for e in _of(events, "round_closed")}
    missing = {(s, r) for s in range(slots) for r in range(1, rounds + 1)} - closed
    if missing:
        problems.append(f"rounds never closed: {sorted(missing)}")
    problems += doubled_updates(events)
    problems += lost_updates(events, agent_events)
    problems += lost_gradients(events)
    return problems


def doubled_updates(events: list[dict[str, Any]]) -> list[str]:
    """Job ids folded more than once."""
    folded = Counter(e["job_id"] for e in _of(events, "update_folded"))
    return [f"job {job} folded {n} times" for job, n in folded.items() if n > 1]


def lost_updates(events: list[dict[str, Any]], agent_events: list[dict[str, Any]]) -> list[str]:
    """Updates handed over but never accounted for.

    Every ok result the coordinator received (and acked) must be folded, dropped as
    late, or rejected with a logged reason; every update an agent uploaded while its
    slot was still collecting must have reached the coordinator.
    """
    gradient = gradient_rounds(events)  # their results carry no update: see lost_gradients
    rejected = {e.get("job_id") for e in _of(events, "update_rejected")}
    dropped = {e["job_id"] for e in _of(events, "update_late") if e["action"] == "dropped"}
    fates = {e["job_id"] for e in _of(events, "update_folded")} | dropped | rejected
    received = {e["job_id"]: e for e in _of(events, "update_received")
                if (e["slot_id"], e["round"]) not in gradient}
    problems = [f"job {job} received but neither folded, dropped nor rejected"
                for job, e in received.items() if e["status"] == "ok" and job not in fates]
    last_quorum: dict[int, float] = {}
    for e in _of(events, "quorum_reached"):
        last_quorum[e["slot_id"]] = max(e["ts"], last_quorum.get(e["slot_id"], 0.0))
    slot_of = {e["job_id"]: e["slot_id"] for e in _of(events, "job_published")}
    for e in _of(agent_events, "update_uploaded"):
        slot = slot_of.get(e["job_id"])
        collecting = slot is not None and e["ts"] < last_quorum.get(slot, 0.0) - READ_SLACK_S
        if collecting and e["job_id"] not in set(received) | rejected:
            problems.append(f"job {e['job_id']} uploaded but never reached the coordinator")
    return problems


def gradient_rounds(events: list[dict[str, Any]]) -> set[tuple[int, int]]:
    """(slot, round) of every round a gradient slot started."""
    return {(e["slot_id"], e["round"]) for e in _of(events, "round_started")
            if e.get("mode") == "gradient"}


def lost_gradients(events: list[dict[str, Any]]) -> list[str]:
    """Gradient steps that averaged fewer clients than finished their session ok: such a
    client sent a gradient for every step, so a step without it lost one."""
    finished = Counter((e["slot_id"], e["round"]) for e in _of(events, "update_received")
                       if e["status"] == "ok" and (e["slot_id"], e["round"]) in
                       gradient_rounds(events))
    return [f"slot {e['slot_id']} round {e['round']} step {e['step']} averaged "
            f"{e['clients']} gradients of {finished[e['slot_id'], e['round']]} sessions"
            for e in _of(events, "gradient_step")
            if e["clients"] < finished[e["slot_id"], e["round"]]]


def what_happened(events: list[dict[str, Any]], agent_events: list[dict[str, Any]]) -> str:
    """The recovery steps the logs show, counted: what the system did about the fault."""
    counts: list[str] = []

    def count(name: str, n: int, detail: str = "") -> None:
        if n:
            counts.append(f"{name} {n}" + (f" ({detail})" if detail else ""))

    def reasons(items: Iterator[dict[str, Any]], key: str) -> tuple[int, str]:
        seen = Counter(str(e.get(key)) for e in items)
        return sum(seen.values()), ", ".join(f"{k} x{n}" if n > 1 else k for k, n in seen.items())

    count("coordinator resumed", sum(1 for _ in _of(events, "run_resumed")))
    count("training calls timed out, their trainers killed and restarted",
          sum(1 for _ in _of(agent_events, "train_timeout")))
    count("gradient sessions reopened on a replacement trainer",
          sum(1 for _ in _of(agent_events, "gradient_session_reopened")))
    count("clients dropped from gradient sessions",
          *reasons(_of(events, "gradient_client_dropped"), "reason"))
    timed_out = {e["job_id"] for e in _of(agent_events, "train_timeout")}
    count("trainers died mid-job and restarted",
          sum(1 for e in _of(agent_events, "trainer_exited")
              if e.get("job_id") and e["job_id"] not in timed_out))
    outages = [e["down_s"] for e in _of(events + agent_events, "redis_reconnected")]
    count("Redis reconnections", len(outages),
          f"coordinator and agents, longest {max(outages):.1f} s" if outages else "")
    count("heartbeat retries", sum(1 for _ in _of(agent_events, "heartbeat_failed")))
    count("clients lost", *reasons(_of(events, "client_lost"), "reason"))
    registrations = Counter(e["client_id"] for e in _of(events, "client_registered"))
    count("clients rejoined", sum(n - 1 for n in registrations.values()))
    failed = Counter(str(e["error"]).split(":")[0] for e in _of(events, "job_failed"))
    count("jobs failed", sum(failed.values()), ", ".join(f"{k} x{n}" for k, n in failed.items()))
    count("jobs reclaimed", sum(1 for _ in _of(agent_events, "job_reclaimed")))
    count("rounds closed by deadline",
          sum(1 for e in _of(events, "quorum_reached") if e["reason"] == "deadline"))
    count("late updates", *reasons(_of(events, "update_late"), "action"))
    count("results rejected", *reasons(_of(events, "update_rejected"), "reason"))
    return "; ".join(counts) or "nothing to recover"


def fault_ledger(fault: str, events: list[dict[str, Any]], agent_events: list[dict[str, Any]],
                 slots: int, rounds: int, *, also: str = "") -> list[str]:
    """`ledger_problems`, and a row of the fault matrix when $PWFL_FAULT_MATRIX names a file
    (`also`: a finding of the test's own to add to what happened)."""
    problems = ledger_problems(events, agent_events, slots, rounds)
    path = os.environ.get(MATRIX_ENV)
    if path:
        closed = {(e["slot_id"], e["round"]) for e in _of(events, "round_closed")}
        expected = {(s, r) for s in range(slots) for r in range(1, rounds + 1)}
        row = {
            "fault": fault,
            "happened": "; ".join(filter(None, (what_happened(events, agent_events), also))),
            "rounds": f"{len(closed & expected)}/{len(expected)}",
            "folded": len({e["job_id"] for e in _of(events, "update_folded")})
            + sum(e["clients"] for e in _of(events, "gradient_step")),
            "lost": len(lost_updates(events, agent_events)) + len(lost_gradients(events)),
            "doubled": len(doubled_updates(events)),
            "problems": problems,
        }
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return problems
