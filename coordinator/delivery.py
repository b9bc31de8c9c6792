"""A result on its way to its slot, and the slots' inboxes it is routed to.

The dispatcher and the client tracker hand results to slots through
`SlotInboxes`, which knows each slot only as a `SlotInbox` (is it finished, take
this result, drop this late one): neither of them imports the slot runner, and
the slot runner does not import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class SlotInbox(Protocol):
    """What routing needs of a slot (`coordinator.slot.SlotRunner` is one)."""

    finished: bool

    def deliver(self, delivery: Delivery) -> None: ...

    async def drop_after_finish(self, delivery: Delivery) -> None: ...


class SlotInboxes:
    """Each slot's inbox by slot id."""

    def __init__(self) -> None:
        self._by_slot: dict[int, SlotInbox] = {}

    def add(self, slot_id: int, inbox: SlotInbox) -> None:
        self._by_slot[slot_id] = inbox

    async def route(self, delivery: Delivery) -> None:
        """To its slot; a slot that has finished all its rounds drops (and acks) it."""
        inbox = self._by_slot[delivery.record.slot_id]
        if inbox.finished:
            await inbox.drop_after_finish(delivery)
        else:
            inbox.deliver(delivery)

    def post_failure(self, delivery: Delivery) -> None:
        """A failure made up for a lost client: to its slot, unless that slot has finished."""
        inbox = self._by_slot[delivery.record.slot_id]
        if not inbox.finished:
            inbox.deliver(delivery)
