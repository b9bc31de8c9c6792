"""Live progress on the terminal: a line per slot while the run goes, a table at the end.

On a terminal a rich live table redraws a few times a second; elsewhere (CI,
a pipe, a log file) a plain line is printed each time a slot aggregates a round. Rounds
count when they are aggregated; accuracy comes in two kinds, labelled apart: validation
(the clients' held-out validation splits, federated) and test (the coordinator's central
evaluation on the test set), each with its best so far.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.status import RunStatus, SlotStatus


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


COLUMNS = ("slot", "aggregated", "state", "clients", "validation", "best val", "test",
           "best test", "eval lag", "elapsed")
LEFT = frozenset({"slot", "state", "clients"})


def _slot_row(slot: SlotStatus, elapsed_s: float) -> list[str]:
    clients = ",".join(slot.clients) if slot.state == "training" else ""
    return [str(slot.slot_id), f"{slot.rounds_done}/{slot.rounds}", slot.state, clients,
            _accuracy(slot.last_validation), _accuracy(slot.best_validation),
            _accuracy(slot.last_accuracy), _accuracy(slot.best_accuracy),
            str(slot.evaluation_lag_rounds), f"{elapsed_s:.1f}s"]


def progress_line(slot: SlotStatus, elapsed_s: float) -> str:
    """One slot's plain progress line: rounds aggregated, validation and test accuracy."""
    return (f"slot {slot.slot_id} round {slot.rounds_done}/{slot.rounds} aggregated "
            f"validation {_accuracy(slot.last_validation)} test {_accuracy(slot.last_accuracy)}"
            f" (evaluation lag {slot.evaluation_lag_rounds}) at {elapsed_s:.1f}s")


def status_table(status: RunStatus, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in LEFT else "right")
    for slot in status.slots.values():
        table.add_row(*_slot_row(slot, status.elapsed_s))
    alive = sum(1 for c in status.clients.values() if c.get("alive"))
    rejected = sum(status.rejected.values())
    table.caption = (f"clients alive: {alive}   rejected updates: {rejected}   run "
                     f"{status.run_id}\nvalidation: the clients' held-out splits (federated); "
                     "test: the coordinator's test set; eval lag: rounds aggregated, not yet "
                     "evaluated and checkpointed")
    return table


class Progress:
    """Shows `status` until cancelled; `final()` prints the closing table."""

    def __init__(self, status: RunStatus, *, live: bool | None = None) -> None:
        self._status = status
        self._console = Console(stderr=False)
        self._live = sys.stdout.isatty() if live is None else live
        self._printed: dict[int, int] = {}

    async def run(self) -> None:
        if not self._live:
            await self._plain()
            return
        with Live(self._render(), console=self._console, refresh_per_second=4,
                  transient=True) as live:
            while True:
                await asyncio.sleep(0.25)
                live.update(self._render())

    def _render(self) -> Any:
        return status_table(self._status, f"PWFL run {self._status.state}")

    async def _plain(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for slot in self._status.slots.values():
                if slot.rounds_done > self._printed.get(slot.slot_id, 0):
                    self._printed[slot.slot_id] = slot.rounds_done
                    self._console.print(progress_line(slot, self._status.elapsed_s))

    def final(self) -> None:
        self._console.print(status_table(self._status, f"PWFL run {self._status.state}"))
