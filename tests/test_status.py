"""The live status a slot keeps for /status and the progress table stays small."""

from __future__ import annotations

from rich.console import Console

from coordinator.progress import progress_line, status_table
from coordinator.status import RECENT_ACCURACIES, RunStatus, SlotStatus


def test_a_long_run_keeps_recent_points_and_the_best_one() -> None:
    slot = SlotStatus(slot_id=0, rounds=10_000)
    slot.record_accuracy(1, 0.93, 1.0)  # the best comes early and leaves the window
    for r in range(2, 10_001):
        slot.record_accuracy(r, 0.5 + r / 100_000, float(r))
    view = slot.as_dict()
    assert len(view["accuracies"]) == RECENT_ACCURACIES
    assert view["accuracies"][-1] == {"round": 10_000, "accuracy": 0.6, "elapsed_s": 10_000.0}
    assert (view["best_accuracy"], view["last_accuracy"], view["evaluations"]) == (
        0.93, 0.6, 10_000)


def test_progress_table_shows_the_best_accuracy() -> None:
    status = RunStatus(run_id="r")
    status.slots[0] = SlotStatus(slot_id=0, rounds=5)
    status.slots[0].record_accuracy(1, 0.81, 1.0)
    status.slots[0].record_accuracy(2, 0.79, 2.0)
    console = Console(width=120, record=True)
    console.print(status_table(status, "run r"))
    row = next(line for line in console.export_text().splitlines() if "/5" in line)
    assert "79.00%" in row
    assert "81.00%" in row


def _validated_status() -> RunStatus:
    status = RunStatus(run_id="r")
    status.slots[0] = SlotStatus(slot_id=0, rounds=5)
    slot = status.slots[0]
    for r in (1, 2, 3):
        slot.record_aggregated(r)
    slot.record_evaluated(1)
    slot.record_accuracy(1, 0.7312, 1.0)
    slot.record_validation(2, 0.8125, 2.0)
    return status


def test_progress_shows_rounds_aggregated_and_labels_validation_and_test() -> None:
    """The table counts rounds aggregated and heads the two accuracies apart; the plain line
    says which is which and how far evaluation lags."""
    status = _validated_status()
    console = Console(width=160, record=True)
    console.print(status_table(status, "run r"))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "aggregated" in line)
    assert header.index("validation") < header.index("test")
    row = next(line for line in text.splitlines() if "3/5" in line)
    assert row.index("81.25%") < row.index("73.12%")
    assert progress_line(status.slots[0], 4.0) == (
        "slot 0 round 3/5 aggregated validation 81.25% test 73.12% (evaluation lag 2) at 4.0s")


def test_status_names_the_test_set_and_rounds_aggregated() -> None:
    """/status keeps its old keys and adds names that say what they count."""
    view = _validated_status().slots[0].as_dict()
    assert (view["rounds_aggregated"], view["rounds_done"], view["evaluated_round"]) == (3, 3, 1)
    assert view["evaluation_lag_rounds"] == 2
    assert view["last_test_accuracy"] == view["last_accuracy"] == 0.7312
    assert view["best_test_accuracy"] == 0.7312
    assert (view["last_validation_accuracy"], view["best_validation_accuracy"]) == (0.8125,
                                                                                    0.8125)
