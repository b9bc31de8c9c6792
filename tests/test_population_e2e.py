"""End to end with real agents: a sweep, PBT, periodic and final merges, a resumed PBT run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from replay.events import read_log
from replay.summary import summarise
from replay.timeline import rebuild_runs
from tests.e2e import Run, lease_violations

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
COMMON = ("--task", "synthetic", "--clients", "3", "--local-agents", "1")
SLOW = ("--task", "tests.e2e_tasks:SlowClientTask", "--task-option", "base_s=0.1",
        "--clients", "3", "--local-agents", "1")


def finished(run: Run) -> list[dict[str, object]]:
    """The run's events once it exited 0, its leases (since its last start) disjoint."""
    assert run.wait(240) == 0, run.output()[-4000:]
    events = run.events()
    starts = [i for i, e in enumerate(events) if e["event"] in ("run_started", "run_resumed")]
    assert lease_violations(events[starts[-1]:]) == []  # an interrupted run leaves leases held
    return events


def test_sweep_run_records_each_slot_configuration_and_replay_labels_them(
        launch: Callable[..., Run]) -> None:
    """--sweep: one slot per point; run_started lists the configs; replay labels and ranks."""
    run = launch("pop-sweep", *COMMON, "--rounds", "2", "--sweep", "lr=0.01,0.1",
                 "--sweep", "strategy=fedavg,fedadam")
    events = finished(run)
    configs = next(e for e in events if e["event"] == "run_started")["slot_configs"]
    assert [(c["lr"], c["strategy"]) for c in configs] == [  # type: ignore[index]
        (0.01, "fedavg"), (0.01, "fedadam"), (0.1, "fedavg"), (0.1, "fedadam")]
    jobs = [e for e in events if e["event"] == "job_published"]
    assert {e["slot_id"] for e in jobs} == {0, 1, 2, 3}
    summary = summarise(rebuild_runs(read_log(run.events_path))[0], 0.5)
    assert summary.slot_labels == {"0": "lr=0.01 strategy=fedavg", "1": "lr=0.01 strategy=fedadam",
                                   "2": "lr=0.1 strategy=fedavg", "3": "lr=0.1 strategy=fedadam"}
    assert sorted(r.rank for r in summary.ranking) == [1, 2, 3, 4]


PBT_ARGS = ("--sweep", "lr=0.0001,0.2,0.3", "--population", "pbt", "--pbt-every", "1",
            "--pbt-fraction", "0.34")


def test_pbt_run_logs_exploits_that_replay_shows_as_lineage(launch: Callable[..., Run]) -> None:
    """The weak slot (lr 1e-4) copies a strong one; each exploit is followed by its explore."""
    run = launch("pop-pbt", *COMMON, "--rounds", "4", *PBT_ARGS)
    events = finished(run)
    exploits = [e for e in events if e["event"] == "pbt_exploit"]
    explores = [e for e in events if e["event"] == "pbt_explore"]
    assert exploits
    assert [(e["slot_id"], e["round"]) for e in exploits] == [
        (e["slot_id"], e["round"]) for e in explores]
    summary = summarise(rebuild_runs(read_log(run.events_path))[0], 0.5)
    assert [s.event for s in summary.lineage] == [
        e["event"] for e in events if e["event"] in ("pbt_exploit", "pbt_explore")]
    assert any(len(path) > 1 for path in summary.hyperparameters.values())


def test_pbt_decides_on_validation_figures_and_never_waits_for_an_evaluation(
        launch: Callable[..., Run]) -> None:
    """Every central evaluation takes 2 s (on the coordinator's one evaluation thread, so
    they queue up behind the rounds): PBT still decides at each boundary, on the latest
    validation figures the clients reported, and no slot waits for an evaluation before it
    leases clients again: from a round's aggregation to the next round's start is far
    below one evaluation."""
    run = launch("pop-pbt-async", "--task", "tests.e2e_tasks:SlowEvalTask", "--task-option",
                 "eval_s=2", "--clients", "3", "--local-agents", "1", "--rounds", "4",
                 *PBT_ARGS)
    events = finished(run)
    decisions = [e for e in events if e["event"] == "pbt_exploit"]
    assert decisions
    for e in decisions:
        assert e["selected_on"] == "validation"
        assert 0 <= e["validated_round"] < e["round"]  # a model the clients had already seen
        assert 0 <= e["donor_validated_round"] <= e["round"]
    aggregated = {(e["slot_id"], e["round"]): e["ts"] for e in events
                  if e["event"] == "aggregation_finished"}
    started = {(e["slot_id"], e["round"]): e["ts"] for e in events
               if e["event"] == "round_started"}
    gaps = [started[(s, r + 1)] - t for (s, r), t in aggregated.items() if (s, r + 1) in started]
    assert len(gaps) == 9  # 3 slots x rounds 2..4
    assert max(gaps) < 1.0, gaps
    validated = [e for e in events if e["event"] == "validation_finished"]
    assert {(e["slot_id"], e["during_round"]) for e in validated} == {
        (s, r) for s in range(3) for r in range(1, 5)}
    behind = max(e["ts"] for e in events if e["event"] == "round_closed") - max(aggregated.values())
    assert behind > 2.0  # the evaluations did lag behind the rounds


def test_periodic_merge_run_merges_without_waiting(launch: Callable[..., Run]) -> None:
    """--merge every=2 with --shared-init: each slot merges at its own round-2 boundary (none
    after the last round) with the latest models of the others that folded examples in
    rounds 1..2, and goes on; the merged models are validated by the next round's clients."""
    run = launch("pop-merge", *COMMON, "--rounds", "4", "--slots", "3", "--shared-init",
                 "--merge", "every=2")
    events = finished(run)
    merges = [e for e in events if e["event"] == "slots_merged"]
    assert merges
    assert {e["epoch"] for e in merges} == {1}
    assert sorted(e["slot_id"] for e in merges) == sorted({e["slot_id"] for e in merges})
    for e in merges:
        assert e["slot_id"] in e["slot_ids"]
        assert len(e["slot_ids"]) >= 2
        assert all(1 <= r <= 3 for r in e["rounds"].values())  # type: ignore[union-attr]
        assert all(w > 0 for w in e["weights"].values())  # type: ignore[union-attr]
    assert not [e for e in events if e["event"] == "merge_evaluated"]
    for e in merges:  # the next round's clients validated the merged model
        assert any(v["event"] == "validation_finished" and v["slot_id"] == e["slot_id"]
                   and v["round"] == 2 and v["during_round"] == 3 for v in events)
    digests = {e["digest"] for e in events if e["event"] == "model_published" and e["round"] == 1}
    assert len(digests) == 1  # a shared initial model: the three slots publish the same bytes


def test_final_merge_chooses_on_the_clients_and_tests_once(
        launch: Callable[..., Run], tmp_path: Path) -> None:
    """--merge final: every candidate (slots, average, soup) is scored by the clients on
    their validation splits; the best is kept, evaluated once on the test set, and saved."""
    run = launch("pop-final", *COMMON, "--rounds", "2", "--slots", "3", "--shared-init",
                 "--merge", "final")
    events = finished(run)
    (final,) = [e for e in events if e["event"] == "final_merge"]
    scored = [e for e in events if e["event"] == "final_candidate_validated"]
    assert [e["candidate"] for e in scored][:4] == ["slot 0", "slot 1", "slot 2", "average"]
    assert all(e["clients"] == 3 and e["num_examples"] > 0 for e in scored)
    assert final["selected_on"] == "validation"
    assert final["validation_accuracy"] == max(final["scores"].values())  # type: ignore[union-attr]
    assert final["accuracy"] is not None  # the one test-set evaluation of the kept model
    after = [e for e in events[events.index(final) - 1:] if e["event"] == "evaluation_finished"]
    assert len(after) <= 1
    assert (tmp_path / "pop-final" / "checkpoints" / "result.pwfl").exists()


def test_resumed_pbt_run_continues_its_lineage(launch: Callable[..., Run], tmp_path: Path) -> None:
    """Stopped after an exploit, a resumed run goes on with the explored configuration."""
    first = launch("pop-resume", *SLOW, "--rounds", "6", *PBT_ARGS)
    first.wait_for(lambda ev: any(e["event"] == "pbt_explore" for e in ev)
                            and any(e["event"] == "round_closed" and e["round"] >= 3
                                    for e in ev), timeout_s=120)
    assert first.interrupt() == 130
    explores = [e for e in first.events() if e["event"] == "pbt_explore"]
    last = {e["slot_id"]: e["config"] for e in explores}
    saved = json.loads((tmp_path / "pop-resume" / "state.json").read_text())["slot_configs"]
    second = launch("pop-resume", "--resume", "pop-resume", "--local-agents", "1")
    events = finished(second)
    resumed = next(e for e in events if e["event"] == "run_resumed")
    for slot_id, config in last.items():
        assert resumed["slot_configs"][slot_id] == config == saved[str(slot_id)]  # type: ignore[index]
    assert max(e["round"] for e in events if e["event"] == "round_closed") == 6
    summary = summarise(rebuild_runs(read_log(second.events_path))[0], 0.5)
    assert summary.restarts == 1
    assert len(summary.lineage) >= 2 * len(explores)  # the lineage of both processes


def test_a_diverged_sweep_point_fails_alone(launch: Callable[..., Run]) -> None:
    """A sweep point whose updates are all NaN gives up (slot_failed) after its retries; the
    other slot trains to its last round, and the run exits 1 (not every slot finished)."""
    run = launch("pop-diverge", "--task", "tests.e2e_tasks:DivergingTask", "--task-option",
                 "diverge_lr=0.5", "--clients", "2", "--local-agents", "1", "--rounds", "3",
                 "--sweep", "lr=0.05,1.0")
    assert run.wait(240) == 1, run.output()[-4000:]
    events = run.events()
    failed = [e for e in events if e["event"] == "slot_failed"]
    assert [e["slot_id"] for e in failed] == [1]
    assert {e["reason"] for e in events if e["event"] == "update_rejected"} == {"not_finite"}
    closed = {(e["slot_id"], e["round"]) for e in events if e["event"] == "round_closed"}
    assert closed == {(0, 1), (0, 2), (0, 3)}
    assert next(e for e in events if e["event"] == "run_finished")["status"] == "failed"
