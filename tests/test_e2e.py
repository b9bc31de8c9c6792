"""End to end: the real coordinator, agents and trainer processes on a real Redis.

Each test reads what happened from the run's JSON event log, as the replay tool does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bus.embedded import EmbeddedRedis
from serialization import decode
from tests.e2e import (
    Run,
    by_slot_round,
    lease_violations,
    read_events,
    retrained_mean,
    start_coordinator,
)
from tests.faults import ledger_problems
from trainer_worker.tasks.synthetic import SyntheticTask

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SLOW_TASK = "tests.e2e_tasks:SlowClientTask"


@pytest.fixture(scope="module")
def basic_run(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Run]:
    """Three slots, four clients on two agents, three rounds of the synthetic task."""
    run = start_coordinator(redis_server.url, tmp_path_factory.mktemp("runs"), "e2e-basic",
                            "--task", "synthetic", "--slots", "3", "--clients", "4",
                            "--rounds", "3", "--local-agents", "2", "--keep-checkpoints", "10")
    with run:
        assert run.wait(300) == 0, run.output()[-4000:]
        yield run


def test_every_slot_finishes_every_round(basic_run: Run) -> None:
    """Each of the three slots closes rounds 1..3 and the run ends as finished."""
    closed = set(by_slot_round(basic_run.events(), "round_closed"))
    assert closed == {(s, r) for s in range(3) for r in range(1, 4)}
    assert basic_run.events("run_finished")[-1]["status"] == "finished"
    assert all(e["accuracy"] is not None for e in basic_run.events("evaluation_finished"))


def test_leases_are_disjoint_at_every_instant(basic_run: Run) -> None:
    """No client is ever leased to two slots at once, and every lease is returned."""
    events = basic_run.events()
    assert lease_violations(events) == []
    taken = len([e for e in events if e["event"] == "lease_taken"])
    returned = len([e for e in events if e["event"] == "lease_returned"])
    assert taken == returned == len([e for e in events if e["event"] == "job_published"])


def test_slots_overlap_in_time(basic_run: Run) -> None:
    """Slots run concurrently: some slot starts a round while another slot's round is open."""
    open_rounds: set[int] = set()
    overlapped = False
    for e in basic_run.events():
        if e["event"] == "round_started":
            overlapped |= bool(open_rounds - {e["slot_id"]})
            open_rounds.add(e["slot_id"])
        elif e["event"] == "quorum_reached":
            open_rounds.discard(e["slot_id"])
    assert overlapped


def _checkpoint(run: Run, slot_id: int, round_: int) -> dict[str, torch.Tensor]:
    path = run.runs_dir / run.run_id / "checkpoints" / f"slot{slot_id}" / f"round{round_:05d}.pwfl"
    return {k: v.clone() for k, v in decode(path.read_bytes())[0].items()}


def test_aggregate_equals_weighted_mean_computed_independently(basic_run: Run) -> None:
    """Slot 0's round-2 model equals the example-weighted mean of its clients' retrained models."""
    events = basic_run.events()
    previous, aggregated = _checkpoint(basic_run, 0, 1), _checkpoint(basic_run, 0, 2)
    mean = retrained_mean(events, 0, 2, previous, num_clients=4)
    for name, value in aggregated.items():
        expected = mean[name]
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def _quorums(run: Run) -> list[dict[str, Any]]:
    return run.events("quorum_reached")


def test_deadline_closes_round_without_straggler(launch: Callable[..., Run]) -> None:
    """A client slower than the deadline does not hold its round; its late update folds later."""
    # The straggler's update (6 s) must land while the run still goes: round 1 closes
    # at its 3 s deadline, then nine rounds of at least 0.4 s each follow.
    run = launch(
        "e2e-deadline", "--task", SLOW_TASK,
        "--task-option", 'slow_clients=["3"]', "--task-option", "slow_s=6",
        "--task-option", "base_s=0.4", "--slots", "1", "--clients", "4", "--rounds", "10",
        "--deadline", "3", "--min-clients", "2", "--late-policy", "fold",
        "--local-agents", "2", "--local-devices", "cpu,cpu")
    assert run.wait(300) == 0, run.output()[-4000:]
    first = _quorums(run)[0]
    summary = (first["round"], first["reason"], first["received"], first["expected"])
    assert summary == (1, "deadline", 3, 4)
    late = [e for e in run.events("update_late") if e["client_id"] == "3"]
    assert late
    assert all(e["action"] == "folded" and e["staleness"] >= 1 for e in late)
    folded_late = {e["job_id"] for e in run.events("update_folded")} & {e["job_id"] for e in late}
    assert folded_late == {e["job_id"] for e in late}
    assert lease_violations(run.events()) == []
    agent_logs = sorted((run.runs_dir / run.run_id).glob("agent-*.jsonl"))
    agent_events = [e for path in agent_logs for e in read_events(path)]
    assert ledger_problems(run.events(), agent_events, slots=1, rounds=10) == []


def test_quorum_fraction_closes_before_all_answer(launch: Callable[..., Run]) -> None:
    """With --quorum 0.5 a round closes once half its clients answered, not waiting for the rest."""
    run = launch(
        "e2e-quorum", "--task", SLOW_TASK,
        "--task-option", 'slow_clients=["2","3"]', "--task-option", "slow_s=4",
        "--slots", "1", "--clients", "4", "--rounds", "2", "--quorum", "0.5",
        "--local-agents", "2", "--local-devices", "cpu,cpu")
    assert run.wait(300) == 0, run.output()[-4000:]
    first = _quorums(run)[0]
    assert first["reason"] == "quorum"
    assert first["received"] == 2
    assert first["expected"] == 4
    assert first["wait_s"] < 4.0


def test_resume_continues_from_checkpoints(launch: Callable[..., Run], tmp_path: Path) -> None:
    """A coordinator stopped between rounds resumes from its checkpoints and finishes the run."""
    args = ("--task", SLOW_TASK, "--task-option", "base_s=0.2", "--slots", "2", "--clients",
            "4", "--rounds", "5", "--local-agents", "2")
    first = launch("e2e-resume", *args)
    first.wait_for(lambda ev: {(s, r) for s, r in by_slot_round(ev, "round_closed") if r == 2}
                   == {(0, 2), (1, 2)}, timeout_s=120)
    assert first.interrupt() == 130
    state = json.loads((tmp_path / "e2e-resume" / "state.json").read_text())
    done = {int(k): v["round"] for k, v in state["slots"].items()}
    assert all(r >= 2 for r in done.values())
    second = launch("e2e-resume", "--resume", "e2e-resume", "--local-agents", "2")
    assert second.wait(300) == 0, second.output()[-4000:]
    events = second.events()
    resumed_at = max(i for i, e in enumerate(events) if e["event"] == "run_resumed")
    after = events[resumed_at:]
    restarted = {(e["slot_id"], e["round"]) for e in after if e["event"] == "round_started"}
    assert all(r > done[s] for s, r in restarted)
    closed = set(by_slot_round(events, "round_closed"))
    assert {(s, r) for s in range(2) for r in range(1, 6)} <= closed


def test_agents_declare_partition_sizes_and_honest_claims_count_in_full(basic_run: Run
                                                                         ) -> None:
    """Each client registers with its partition size declared (issue 23); an honest claim
    is within it, so nothing is capped and every update weighs its client's size."""
    declared = {e["client_id"]: e["declared_examples"]
                for e in basic_run.events("client_registered")}
    sizes = {c: SyntheticTask(num_clients=4).partition_size(c) for c in declared}
    assert declared == sizes
    assert len(sizes) == 4
    assert basic_run.events("num_examples_capped") == []
    claims = {e["job_id"]: e["num_examples"] for e in basic_run.events("update_received")}
    folded = basic_run.events("update_folded")
    assert folded
    assert all(e["weight"] == claims[e["job_id"]] for e in folded)
