"""One slot lifecycle for both kinds of round: what the gradient slot used to do its own way.

Weight rounds and gradient sessions run behind the same `coordinator.slots.lifecycle.Slot`,
so giving up, evaluation skips and late results behave alike; these runs pin the cases
where the gradient slot's own copy of the loop had drifted.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e import Run, by_slot_round

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_gradient_slot_that_gives_up_retires_alone(launch: Callable[..., Run]) -> None:
    """A gradient slot whose every session fails gives up (slot_failed) after its retries;
    the weight slot beside it trains to its last round, and the run exits 1."""
    clients = '["0","1","2","3"]'
    run = launch("grad-gives-up", "--gradient-slots", "1", "--slots", "2", "--task",
                 "tests.e2e_tasks:BrokenGradientTask", "--task-option",
                 f"fail_clients={clients}", "--task-option", "fail_at=1", "--clients", "4",
                 "--clients-per-round", "2", "--rounds", "3", "--gradient-steps", "2",
                 "--local-agents", "2")
    assert run.wait(240) == 1, run.output()[-4000:]
    events = run.events()
    assert [e["slot_id"] for e in events if e["event"] == "slot_failed"] == [0]
    assert {e["reason"] for e in run.events("round_failed")} == {"no_step"}
    assert set(by_slot_round(events, "round_closed")) == {(1, 1), (1, 2), (1, 3)}
    assert [e["slot_id"] for e in run.events("slot_finished")] == [1]
    assert run.events("run_finished")[-1]["status"] == "failed"


def test_gradient_evaluations_skip_behind_a_slow_evaluator(launch: Callable[..., Run]) -> None:
    """A gradient slot whose evaluation is slower than its rounds skips the overtaken ones
    (evaluation_skipped), as a weight slot does, instead of queueing every round."""
    run = launch("grad-eval-skip", "--mode", "gradient", "--task", "tests.e2e_tasks:SlowEvalTask",
                 "--task-option", "eval_s=1.5", "--slots", "1", "--clients", "2", "--rounds",
                 "8", "--gradient-steps", "2", "--local-agents", "1")
    assert run.wait(240) == 0, run.output()[-4000:]
    skipped = run.events("evaluation_skipped")
    evaluated = [e["round"] for e in run.events("evaluation_finished")]
    assert skipped
    assert {e["round"] for e in skipped}.isdisjoint(evaluated)
    assert evaluated[-1] == 8  # the last round is always evaluated
    assert [e["round"] for e in run.events("round_closed")] == list(range(1, 9))


def test_a_late_gradient_session_result_is_logged_and_counted(
        launch: Callable[..., Run]) -> None:
    """A client dropped at a step deadline answers its session after the round closed: its
    result is an update_late (dropped), as a late weight update is, never acked silently."""
    run = launch("grad-late", "--mode", "gradient", "--task", "tests.e2e_tasks:SlowGradientTask",
                 "--task-option", 'slow_clients=["1"]', "--task-option", "slow_at=2",
                 "--task-option", "slow_s=4", "--slots", "1", "--clients", "2", "--rounds", "2",
                 "--gradient-steps", "2", "--deadline", "2", "--local-agents", "2")
    assert run.wait(240) == 0, run.output()[-4000:]
    dropped = run.events("gradient_client_dropped")
    assert {(e["client_id"], e["reason"]) for e in dropped} == {("1", "step_deadline")}
    late = [e for e in run.events("update_late") if e["client_id"] == "1"]
    assert late
    assert {e["action"] for e in late} == {"dropped"}
    assert [e["round"] for e in run.events("round_closed")] == [1, 2]
