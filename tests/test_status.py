"""The live status a slot keeps for /status and the progress table stays small."""

from __future__ import annotations

from rich.console import Console

from coordinator.progress import status_table
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
