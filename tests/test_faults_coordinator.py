"""Fault test: the coordinator SIGKILLed in the middle of a round, then resumed.

The resumed coordinator starts again from its last checkpoint and redoes the round
it lost: that round's aggregate lived only in the dead process, and its job ids
with it. Whatever the old round left in the results stream (entries the dead
process had read but not acked, entries nobody read) is rejected as results of
unknown jobs. Because every job's training seed is fixed by (run seed, slot, round,
client), the redone round trains exactly what the lost one trained.

Why one slot and two clients make the comparison exact: with several slots the
pool's random split of the clients restarts from the run seed on resume (its
draws so far are not saved) and which slots wait together depends on timing, so
the clients of a round may differ; and with more than two updates racing, the
order of the float32 additions (hence the last bit) can differ between any two
runs, killed or not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import torch

from bus.embedded import EmbeddedRedis
from bus.keys import RESULTS_GROUP, Keys
from tests.e2e import Run, start_coordinator
from tests.faults import AgentProc, fault_ledger, start_agent, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SLOW = "tests.e2e_tasks:SlowClientTask"
ROUNDS = 4
# Client 1 always answers last, so both runs fold in the same order (0 then 1): the
# float32 sums then match bit for bit. With several clients racing, the order of
# the additions (and so the last bit) could differ between any two runs, killed or not.
ARGS = ("--task", SLOW, "--task-option", 'slow_clients=["1"]', "--task-option", "slow_s=1.5",
        "--task-option", "base_s=0.1", "--slots", "1", "--clients", "2",
        "--rounds", str(ROUNDS), "--quorum", "1.0", "--seed", "7")



def _folded(run: Run, round_: int, client: str) -> bool:
    return any(e["event"] == "update_folded" and e["round"] == round_
               and e["client_id"] == client for e in run.events())


def test_coordinator_killed_mid_round_resumes_to_the_models_of_an_uninterrupted_run(
        redis_server: EmbeddedRedis, tmp_path: Path, agents: list[AgentProc]) -> None:
    """SIGKILLed with a round half folded and resumed with --resume, the coordinator redoes
    that round from its last checkpoint, rejects the old round's leftover results as unknown
    jobs, folds nothing twice, and ends with exactly the models of the same run left alone."""
    url = redis_server.url
    reference = start_coordinator(url, tmp_path / "ref", "ref", *ARGS)
    cut = start_coordinator(url, tmp_path / "cut", "cut", *ARGS)
    for run in (reference, cut):  # two trainers: client 0 always answers first
        agents.append(start_agent(url, run.run_id, "0,1", tmp_path / "agents", run.run_id,
                                  "--devices", "cpu,cpu"))
    with reference, cut:
        cut.wait_for(lambda _: _folded(cut, 2, "0") and any(
            e["event"] == "checkpoint_written" and e["round"] == 1 for e in cut.events()), 120)
        cut.close()  # SIGKILL: no shutdown, the run stays "running" for its agents
        before = cut.events()
        killed_round = max(e["round"] for e in before if e["event"] == "round_started")
        checkpointed = max(e["round"] for e in before if e["event"] == "checkpoint_written")
        old_jobs = {e["job_id"] for e in before if e["event"] == "job_published"}
        stale_job = next(e["job_id"] for e in before if e["event"] == "job_published"
                         and e["round"] == killed_round and e["client_id"] == "1")
        wait_until(lambda: stale_job in {e["job_id"] for e in agents[1].events("update_uploaded")},
                   60, "the old round's slow job finishes on the agent")
        _read_without_ack(url, Keys("cut").results(0))  # as the dead process might have
        resumed = start_coordinator(url, tmp_path / "cut", "cut", "--resume", "cut")
        with resumed:
            assert resumed.wait(150) == 0, resumed.output()[-3000:]
        assert reference.wait(150) == 0, reference.output()[-3000:]
    events = resumed.events()  # both incarnations: one log file
    start = next(i for i, e in enumerate(events) if e["event"] == "run_resumed")
    assert events[start]["rounds_done"] == {"0": checkpointed}
    assert min(e["round"] for e in events[start:] if e["event"] == "round_started") == (
        checkpointed + 1)
    rejected = [(e["reason"], e.get("job_id")) for e in events if e["event"] == "update_rejected"]
    assert ("unknown_job", stale_job) in rejected
    assert all(reason == "unknown_job" and job in old_jobs for reason, job in rejected)
    agent_events = [e for a in agents[1:] for e in a.events()]
    expected, got = reference.checkpoint(ROUNDS), resumed.checkpoint(ROUNDS)
    same = expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    verdict = "bit-identical to" if same else "DIFFERENT from"
    assert fault_ledger("coordinator SIGKILLed mid-round, restarted with --resume", events,
                        agent_events, slots=1, rounds=ROUNDS,
                        also=f"round {killed_round} redone from the round {checkpointed} "
                             f"checkpoint; final model {verdict} the uninterrupted run's") == []
    assert same


def _read_without_ack(url: str, stream: str) -> None:
    """Deliver the stream's unread entries to the coordinator's consumer and leave them
    pending: the state of a coordinator killed between XREADGROUP and XACK."""
    with redis.Redis.from_url(url) as client:
        reply = client.xreadgroup(RESULTS_GROUP, "coordinator", {stream: ">"}, block=20_000)
        assert reply, "the old round left no result behind"
        assert reply[0][1]
