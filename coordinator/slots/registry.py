"""The run's one map of slots, and routing to them.

The result dispatcher and the client tracker reach slots only through `Slots`:
a result goes to its slot's inbox (or is dropped and acked once the slot has
finished); a lost client's outstanding jobs are answered as failed here, so the
slots' quorums go on; downloads read a slot's latest model. Besides the slots,
a receiver that sends jobs of its own (`coordinator.slots.scoring.FederatedScorer`,
under the id after the last slot) is routed to the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import structlog

from coordinator.delivery import Delivery
from coordinator.job_table import JobTable
from coordinator.slots.lifecycle import Slot
from serialization import Result

log = structlog.get_logger()


class Receiver(Protocol):
    """What routing needs of a slot (or of another sender of jobs)."""

    slot_id: int
    finished: bool

    def deliver(self, delivery: Delivery) -> None: ...

    async def drop_after_finish(self, delivery: Delivery) -> None: ...


class Slots:
    """Every slot of the run by id, and the outstanding jobs they wait on."""

    def __init__(self, jobs: JobTable, run_id: str) -> None:
        self._jobs = jobs
        self._run_id = run_id
        self._by_id: dict[int, Slot] = {}
        self._others: dict[int, Receiver] = {}

    def add(self, slot: Slot) -> None:
        self._by_id[slot.slot_id] = slot

    def add_receiver(self, receiver: Receiver) -> None:
        """A sender of jobs that is not a slot (not iterated, not downloadable)."""
        self._others[receiver.slot_id] = receiver

    def _receiver(self, slot_id: int) -> Receiver:
        return self._by_id.get(slot_id) or self._others[slot_id]

    def __getitem__(self, slot_id: int) -> Slot:
        return self._by_id[slot_id]

    def __iter__(self) -> Iterator[Slot]:
        return iter(self._by_id.values())

    def get(self, slot_id: int) -> Slot | None:
        return self._by_id.get(slot_id)

    async def route(self, delivery: Delivery) -> None:
        """To its slot; a slot that has finished all its rounds drops (and acks) it."""
        slot = self._receiver(delivery.record.slot_id)
        if slot.finished:
            await slot.drop_after_finish(delivery)
        else:
            slot.deliver(delivery)

    def client_lost(self, client_id: str, slot_id: int | None, reason: str) -> None:
        """Answer the lost client's outstanding jobs as failed, to their slots (unless
        finished); its real result, should it come after all, is then late."""
        for record in self._jobs.of_client(client_id):
            self._jobs.answer(record.job_id, lost=True)
            log.info("lease_returned", slot_id=slot_id, round=record.round, client_id=client_id,
                     reason="lost")
            failed = Result(job_id=record.job_id, run_id=self._run_id, slot_id=record.slot_id,
                            round=record.round, client_id=client_id, status="failed",
                            error=f"client lost ({reason})")
            slot = self._receiver(record.slot_id)
            if not slot.finished:
                slot.deliver(Delivery(record, failed))
