"""A result on its way to its slot (`coordinator.slots.registry.Slots` routes it)."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.job_table import JobRecord
from serialization import Result


@dataclass(frozen=True)
class Delivery:
    """A result routed to its slot, with the stream entry to ack once handled."""

    record: JobRecord
    result: Result
    stream: str | None = None  # None: made up by the coordinator (a lost client)
    entry_id: str | None = None
    recovered: bool = False  # the real result of a job already answered as lost: late
