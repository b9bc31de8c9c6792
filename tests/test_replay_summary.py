"""Rebuilding runs and summarising them: rounds, busy/idle, bytes, leases, restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from replay.events import read_log
from replay.intervals import intersect, length, union
from replay.summary import RunSummary, summarise
from replay.timeline import rebuild_runs
from tests.fixtures.replay.synth import (
    MODEL_NBYTES,
    event_line,
    synth_resumed,
    synth_run,
    write_jsonl,
)

FIXTURES = Path(__file__).parent / "fixtures" / "replay"


def _summary(tmp_path: Path, lines: list[dict[str, Any]], target: float = 0.85) -> RunSummary:
    runs = rebuild_runs(read_log(write_jsonl(lines, tmp_path / "run.jsonl")))
    assert len(runs) == 1
    return summarise(runs[0], target)


def _fixture(name: str, target: float = 0.85) -> RunSummary:
    return summarise(rebuild_runs(read_log(FIXTURES / name))[0], target)


def _edge_run() -> list[dict[str, Any]]:
    """Two slots, two clients, one round each, timed by hand (seconds after T0)."""
    ev = event_line
    lines = [ev(0, "run_started", slots=2, rounds=1, expected_clients=2, policy="partition",
                quorum=1.0)]
    lines += [ev(0.5, "client_registered", client_id=c, agent_id="a") for c in ("x", "y")]
    for slot, client, t0 in ((0, "x", 1.0), (1, "y", 2.0)):
        ids: dict[str, Any] = {"slot_id": slot, "round": 1}
        lines += [
            ev(t0, "lease_taken", client_id=client, **ids),
            ev(t0, "round_started", clients=[client], quorum_count=1, wait_s=0.0, **ids),
            ev(t0 + 1, "model_published", nbytes=1000, duration_s=1.0, **ids),
            ev(t0 + 1, "job_published", client_id=client, job_id=f"j{slot}", **ids),
            ev(t0 + 5, "lease_returned", client_id=client, reason="result", **ids),
            ev(t0 + 5, "update_received", client_id=client, job_id=f"j{slot}", status="ok",
               nbytes=900, timings={"fetch_s": 0.5, "train_s": 3.0, "upload_s": 0.25}, **ids),
            ev(t0 + 6, "update_folded", client_id=client, duration_s=1.0, **ids),
            ev(t0 + 6, "quorum_reached", reason="all", received=1, failed=0, expected=1,
               wait_s=5.0, **ids),
            ev(t0 + 7, "aggregation_finished", num_updates=1, duration_s=1.0, **ids),
            ev(t0 + 9, "evaluation_finished", accuracy=0.8 + slot / 10, duration_s=2.0, **ids),
            ev(t0 + 10, "checkpoint_written", duration_s=1.0, **ids),
            ev(t0 + 10, "round_closed", duration_s=10.0, accuracy=0.8 + slot / 10,
               num_updates=1, **ids),
        ]
    lines.append(ev(20, "run_finished", wall_s=20.0, status="finished"))
    return sorted(lines, key=lambda line: line["ts"])


def test_interval_union_counts_overlap_once() -> None:
    """Busy time is a union: [0,2] and [1,3] make 3 s, not 4."""
    assert union([(1, 3), (0, 2), (5, 5), (6, 7)]) == [(0, 3), (6, 7)]
    assert length([(0, 2), (1, 3)]) == 3
    assert intersect([(0, 10)], [(2, 3), (5, 6)]) == [(2, 3), (5, 6)]


def test_hand_timed_run_gives_the_hand_computed_numbers(tmp_path: Path) -> None:
    """Every headline number of a run timed by hand comes out as computed by hand."""
    s = _summary(tmp_path, _edge_run())
    assert s.wall_s == pytest.approx(20.0)
    assert s.first_round_s == pytest.approx(1.0)
    # Coordinator spans: slot 0 [1,2] [6,7] [7,8] [8,10] [10,11]; slot 1 shifted by 1:
    # union [1,12] minus the gaps [3,6] and [4,7] -> [1,3] + [6,12] = 8 s.
    assert s.coordinator.busy_s == pytest.approx(8.0)
    assert s.coordinator_busy_fraction == pytest.approx(8.0 / 20.0)
    assert s.coordinator.categories["evaluation"].busy_s == pytest.approx(3.0)  # [8,11] union
    assert s.coordinator.categories["io"].busy_s == pytest.approx(2.0)  # [1,3]
    assert s.coordinator.busy_fraction_after_first_round == pytest.approx(8.0 / 19.0)


def test_client_busy_is_lease_time_and_training_is_reported(tmp_path: Path) -> None:
    """Busy = lease_taken to lease_returned; available from registration; train_s summed."""
    s = _summary(tmp_path, _edge_run())
    x = next(c for c in s.clients if c.client_id == "x")
    assert x.busy_s == pytest.approx(5.0)  # leased [1, 6]
    assert x.available_s == pytest.approx(19.5)  # registered at 0.5
    assert x.idle_fraction == pytest.approx(1 - 5.0 / 19.5)
    assert x.idle_fraction_after_first_round == pytest.approx(1 - 5.0 / 19.0)
    assert (x.jobs_done, x.train_s, x.transfer_s) == (1, 3.0, 0.75)
    assert s.client_busy_fraction == pytest.approx(10.0 / 39.0)


def test_rounds_phases_and_time_to_target(tmp_path: Path) -> None:
    """Per slot: rounds, quorum wait, phase times, accuracy curve and time to target."""
    s = _summary(tmp_path, _edge_run(), target=0.85)
    slot0, slot1 = s.slots
    assert (slot0.rounds, slot0.final_accuracy, slot0.time_to_target_s) == (1, 0.8, None)
    assert slot1.time_to_target_s == pytest.approx(11.0)
    assert slot1.rounds_to_target == 1
    assert s.time_to_target_s == pytest.approx(11.0)
    r = slot0.round_details[0]
    assert (r.start_s, r.quorum_wait_s, r.aggregation_s, r.evaluation_s, r.checkpoint_s) == (
        1.0, 5.0, 1.0, 2.0, 1.0)
    assert slot0.accuracy_over_time == [(10.0, 0.8)]


def test_bytes_per_round_are_model_times_clients_plus_updates(tmp_path: Path) -> None:
    """Bytes moved = model_published.nbytes x clients + the updates' nbytes."""
    s = _summary(tmp_path, _edge_run())
    assert [r.bytes_down + r.bytes_up for slot in s.slots for r in slot.round_details] == [
        1900, 1900]
    assert s.traffic.bytes_total == 3800
    assert s.traffic.mean_bytes_per_round == pytest.approx(1900)


def test_fixture_three_slots_has_no_lease_violation_and_counts_rejections() -> None:
    """The synthetic 3-slot run: 24 slot-rounds, one rejected update, one failed job."""
    s = _fixture("synth_3slot.jsonl")
    assert s.slot_rounds == 24
    assert s.lease_violations == 0
    assert s.rejected_updates == {"non_finite": 1}
    assert sum(c.failures for c in s.clients) == 1
    assert s.traffic.bytes_down == 24 * 2 * MODEL_NBYTES
    assert 0.0 < s.coordinator_busy_fraction < 1.0


def test_a_client_leased_to_two_slots_is_a_violation(tmp_path: Path) -> None:
    """A lease taken while the client holds another is counted, with its details."""
    lines = _edge_run()
    lines.append(event_line(3.0, "lease_taken", slot_id=1, round=1, client_id="x"))
    lines.append(event_line(4.0, "lease_returned", slot_id=1, round=1, client_id="x",
                            reason="result"))
    s = _summary(tmp_path, sorted(lines, key=lambda line: line["ts"]))
    assert s.lease_violations == 1
    detail = s.lease_violation_details[0]
    assert (detail.client_id, detail.held_slot, detail.new_slot, detail.at_s) == ("x", 0, 1, 3.0)


def test_crashed_run_ends_at_its_last_event(tmp_path: Path) -> None:
    """No run_finished: wall time runs to the last event; open rounds count as cut."""
    lines = [ln for ln in synth_run(3, rounds=4) if ln["ts"] < 1_700_000_030.0]
    s = _summary(tmp_path, lines)
    assert s.status == "crashed"
    assert s.wall_s == pytest.approx(max(ln["ts"] for ln in lines) - 1_700_000_000.0)
    assert all(slot.rounds_interrupted >= 1 for slot in s.slots)


def test_resume_in_the_same_file_is_one_run_with_downtime(tmp_path: Path) -> None:
    """run_resumed with the same run id: one run, two segments, downtime not counted as idle."""
    s = _summary(tmp_path, synth_resumed(crash_after_s=30.0, down_s=20.0))
    assert (s.restarts, s.status) == (1, "finished")
    assert s.downtime_s == pytest.approx(20.0, abs=0.01)
    assert s.up_s == pytest.approx(s.wall_s - s.downtime_s)
    assert all(slot.rounds == 8 for slot in s.slots)
    assert s.lease_violations == 0
    assert s.coordinator.busy_s + s.coordinator.idle_s == pytest.approx(s.up_s)


def test_lost_client_return_without_slot_closes_its_lease(tmp_path: Path) -> None:
    """A lost client's lease_returned may carry no slot: it still closes the open lease."""
    lines = _edge_run()
    lines = [ln for ln in lines if not (ln["event"] == "lease_returned"
                                         and ln["client_id"] == "y")]
    lines.append(event_line(4.0, "client_lost", client_id="y", agent_id="a",
                            reason="heartbeat_expired"))
    lines.append(event_line(4.0, "lease_returned", slot_id=None, round=1, client_id="y",
                            reason="lost"))
    s = _summary(tmp_path, sorted(lines, key=lambda line: line["ts"]))
    y = next(c for c in s.clients if c.client_id == "y")
    assert (y.lost, y.busy_s, y.available_s) == (1, 2.0, 3.5)


def test_model_published_before_round_started_is_one_round(tmp_path: Path) -> None:
    """The coordinator publishes the model, then logs round_started: still one round."""
    lines = _edge_run()
    for line in lines:
        if line["event"] == "model_published":
            line["ts"] -= 1.5  # before its round_started
    s = _summary(tmp_path, sorted(lines, key=lambda line: line["ts"]))
    assert [len(slot.round_details) for slot in s.slots] == [1, 1]
    assert s.slots[0].round_details[0].bytes_down == 1000
    assert s.warnings == []


def test_two_run_ids_in_one_file_are_two_runs(tmp_path: Path) -> None:
    """Concatenated logs of two runs are reported as two runs; id-less lines join the first."""
    lines = synth_run(1, rounds=1, run_id="a") + synth_run(1, rounds=1, run_id="b")
    lines.append({"ts": 1_700_000_100.0, "event": "embedded_redis_stopped", "level": "debug",
                  "proc": "coordinator", "pid": 9})
    runs = rebuild_runs(read_log(write_jsonl(lines, tmp_path / "two.jsonl")))
    assert [run.run_id for run in runs] == ["a", "b"]


@pytest.mark.parametrize("name", ["real_3slot.jsonl", "real_1slot.jsonl", "real_resumed.jsonl"])
def test_real_logs_read_cleanly(name: str) -> None:
    """Real coordinator logs: every event known, every round closed, no lease violation."""
    s = _fixture(name, target=0.6)
    assert s.warnings == []
    assert s.lease_violations == 0
    rounds = int(s.config["rounds"])
    assert [slot.rounds for slot in s.slots] == [rounds] * int(s.config["slots"])
    assert s.time_to_target_s is not None
    if s.restarts == 0:  # every job answered: the CNN's update is its model's size
        assert s.traffic.bytes_down == s.traffic.bytes_up


def test_real_resumed_run_has_one_restart_and_its_downtime() -> None:
    """A coordinator stopped with SIGTERM and resumed with --resume into the same log."""
    s = _fixture("real_resumed.jsonl")
    assert (s.restarts, s.status) == (1, "finished")
    assert s.downtime_s > 10.0
    assert all(slot.rounds_interrupted == 1 for slot in s.slots)
    assert s.coordinator.busy_s + s.coordinator.idle_s == pytest.approx(s.up_s)
