"""The async face of the client pool: slots await leases, clients come and go.

`ClientPool` (coordinator.scheduling) is pure and decides; this broker runs on
the event loop, calls it whenever something changes, resolves the futures of
the slots it assigned clients to, and logs every lease taken and returned.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from coordinator.scheduling import ClientPool

log = structlog.get_logger()


class LeaseBroker:
    """Hands clients to waiting slots; a client is leased to one slot at a time."""

    def __init__(self, pool: ClientPool) -> None:
        self._pool = pool
        self._waiters: dict[int, tuple[int, asyncio.Future[tuple[str, ...]]]] = {}
        self._open = False
        self.changed = asyncio.Event()

    @property
    def pool(self) -> ClientPool:
        return self._pool

    def open(self) -> None:
        """Start assigning (the coordinator waits for the expected clients first)."""
        self._open = True
        self._dispatch()

    async def lease(self, slot_id: int, round_: int) -> tuple[str, ...]:
        """Wait until the policy gives this slot clients for `round_`; they are leased."""
        future: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self._waiters[slot_id] = (round_, future)
        self._pool.slot_waiting(slot_id, time.monotonic())
        log.info("slot_waiting", slot_id=slot_id, round=round_)
        self._dispatch()
        try:
            return await future
        finally:
            self._waiters.pop(slot_id, None)
            if not future.done():  # cancelled while waiting: the pool must forget the wait
                self._pool.slot_cancelled(slot_id)

    def retire(self, slot_id: int) -> None:
        self._pool.slot_retired(slot_id)

    def add_client(self, client_id: str) -> None:
        self._pool.add_client(client_id, time.monotonic())
        self._dispatch()

    def remove_client(self, client_id: str) -> int | None:
        """Forget a lost client; returns the slot whose lease it held."""
        slot_id = self._pool.remove_client(client_id)
        self._dispatch()
        return slot_id

    def release(self, client_id: str, slot_id: int, round_: int, reason: str) -> int | None:
        """Return a client's lease held by `slot_id` (its result arrived or it failed)."""
        released = self._pool.release(client_id, time.monotonic(), slot_id=slot_id)
        if released is not None:
            log.info("lease_returned", slot_id=released, round=round_, client_id=client_id,
                     reason=reason)
        self._dispatch()
        return released

    def _dispatch(self) -> None:
        if self._open:
            for assignment in self._pool.assign(time.monotonic()):
                self._hand_over(assignment.slot_id, assignment.client_ids)
        self.changed.set()

    def _hand_over(self, slot_id: int, client_ids: tuple[str, ...]) -> None:
        round_, future = self._waiters[slot_id]
        for client_id in client_ids:
            log.info("lease_taken", slot_id=slot_id, round=round_, client_id=client_id)
        future.set_result(client_ids)
