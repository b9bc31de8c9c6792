"""One slot's life, whatever its rounds are: the loop every slot runs.

A round: wait for the pool to lease clients, let the round protocol open it, hand
the protocol what the slot's inbox brings until it is done collecting, close it
(or count it failed): the round counts as done and its clients' validation figures
(federated evaluation, `validation_finished`) are known; then queue its central
evaluation and checkpoint behind it
(`coordinator.slots.chain`) and call the population hook. A slot whose rounds
keep failing gives up alone: it retires, its last checkpoint still lands, and
the run's other slots go on. A result that answers no job of the open round is
late: logged and counted here for every kind of slot, folded only where the
protocol takes it. Once the slot has finished, late results are dropped and acked.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import structlog

from bus.connection import raise_if_cancelled
from coordinator.delivery import Delivery
from coordinator.leases import LeaseBroker
from coordinator.results.sink import ResultSink
from coordinator.slots.chain import EvaluationChain
from coordinator.slots.protocol import ClosedRound, Inbox, InboxItem, RoundEnd, RoundProtocol
from coordinator.status import RunStatus, SlotStatus
from serialization import slot_events as events
from serialization.slot_events import emit

log = structlog.get_logger()

MAX_CONSECUTIVE_FAILURES = 5


class SlotFailed(Exception):
    """A slot's rounds kept failing and it gave up (the other slots go on)."""


class BoundaryHook(Protocol):
    """What the population (PBT, merges) does at a slot's round boundary."""

    async def round_closed(self, round_: int) -> None: ...

    async def slot_failed(self, round_: int) -> None: ...


class Slot:
    """Runs one slot's rounds from `first_round` to `last_round` (see the module docstring)."""

    def __init__(self, slot_id: int, rounds: RoundProtocol, *, leases: LeaseBroker,
                 chain: EvaluationChain, results: ResultSink, status: RunStatus,
                 first_round: int, last_round: int) -> None:
        self.slot_id = slot_id
        self.rounds = rounds
        self.chain = chain
        self._leases = leases
        self._results = results
        self._status = status
        self.first_round, self.last_round = first_round, last_round
        self.inbox: Inbox = asyncio.Queue()
        self.finished = False
        self.hook: BoundaryHook | None = None
        self._open: int | None = None  # the round collecting now

    @property
    def status(self) -> SlotStatus:
        return self._status.slots[self.slot_id]

    def deliver(self, item: InboxItem) -> None:
        """A result (the dispatcher already returned the lease) or a gradient entry."""
        self.inbox.put_nowait(item)

    async def run(self) -> None:
        with structlog.contextvars.bound_contextvars(slot_id=self.slot_id):
            try:
                failure = await self._rounds_with_companion()
                await self.chain.settle()  # the last round's evaluation and checkpoint
            finally:
                self.finished = True
                self._leases.retire(self.slot_id)
                await self.rounds.finish()
            if failure is not None:
                await self._gave_up(failure)
                return
        self.status.state = "done"
        emit(log, events.SlotFinished(self.slot_id, rounds=self.status.rounds_done,
                                      accuracy=self.status.last_accuracy))

    async def _rounds_with_companion(self) -> SlotFailed | None:
        """Every round, with the protocol's companion task beside them; the failure that
        made the slot give up, if it did."""
        async with asyncio.TaskGroup() as group:
            companion = group.create_task(self.rounds.serve(self.inbox),
                                          name=f"slot{self.slot_id}-companion")
            try:
                for round_ in range(self.first_round, self.last_round + 1):
                    await self._complete_round(round_)
                    if self.hook is not None and round_ < self.last_round:
                        await self.hook.round_closed(round_)
            except SlotFailed as exc:
                return exc
            finally:
                companion.cancel()
        return None

    async def _gave_up(self, exc: SlotFailed) -> None:
        self.status.state = "failed"
        emit(log, events.SlotFailed(self.slot_id, round=self.status.round, reason=str(exc),
                                    rounds=self.status.rounds_done,
                                    accuracy=self.status.last_accuracy))
        if self.hook is not None:
            await self.hook.slot_failed(self.status.round)

    async def _complete_round(self, round_: int) -> None:
        failures = 0
        while not await self._attempt(round_):
            failures += 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise SlotFailed(f"slot {self.slot_id} round {round_} failed {failures} times")

    async def _attempt(self, round_: int) -> bool:
        raise_if_cancelled()
        self.status.state, self.status.round = "waiting", round_
        waiting_since = time.monotonic()
        clients = await self._leases.lease(self.slot_id, round_)
        opened_at = time.monotonic()
        self.status.state, self.status.clients = "training", clients
        await self.rounds.open(round_, clients, opened_at - waiting_since)
        self._open = round_
        try:
            await self._collect()
        finally:
            self._open = None
        end = self.rounds.end()
        if not end.ok:
            self._round_failed(round_, end)
            return False
        self.status.state = "aggregating"
        closed = await self.rounds.close()
        self._aggregated(closed)
        await self.chain.after_round(closed, opened_at)
        self.status.state = "waiting"
        return True

    def _aggregated(self, closed: ClosedRound) -> None:
        """The round counts as done now; its clients' validation figures are known now,
        whatever the central evaluation behind it does."""
        self.status.record_aggregated(closed.round)
        v = closed.validation
        if v is None:
            return
        self.status.record_validation(v.round, v.accuracy, self._status.elapsed_s)
        emit(log, events.ValidationFinished(
            self.slot_id, round=v.round, during_round=closed.round, accuracy=v.accuracy,
            loss=v.loss, num_examples=v.num_examples, clients=v.clients))

    async def _collect(self) -> None:
        """Hand the protocol what the inbox brings until it is done collecting."""
        while (deadline := self.rounds.deadline()) is not None:
            raise_if_cancelled()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    item = await self.inbox.get()
            except TimeoutError:
                await self.rounds.expire()
                continue
            await self._handle(item)
        await self._results.flush()

    async def _handle(self, item: InboxItem) -> None:
        if not isinstance(item, Delivery):
            await self.rounds.take_entry(item)
            return
        handled = False
        try:
            if not self.rounds.owns(item):
                await self._late(item)
            elif item.result.status != "ok":
                self._job_failed(item)
                await self.rounds.client_failed(item)
            else:
                await self.rounds.take_result(item)
            handled = True
        finally:
            self._results.handled(item)
            # With more results waiting, their acks go together after them (one XACK);
            # an error or a cancellation acks at once what was handled.
            if not handled or self.inbox.empty():
                await self._results.flush()

    def _job_failed(self, delivery: Delivery) -> None:
        record = delivery.record
        emit(log, events.JobFailed(self.slot_id, round=record.round, client_id=record.client_id,
                                   job_id=record.job_id, error=delivery.result.error))
        self._status.counters["jobs_failed"] += 1

    async def _late(self, delivery: Delivery) -> None:
        """A result whose round has closed (or whose job counted as failed when its client
        was lost): folded into the open round if the protocol takes it, else dropped."""
        record, result = delivery.record, delivery.result
        fold = self._open is not None and self.rounds.folds_late(delivery)
        staleness = (self._open or self.status.round) - record.round
        action = "folded" if fold else "dropped"
        emit(log, events.UpdateLate(self.slot_id, round=record.round, current_round=self._open,
                                    client_id=record.client_id, job_id=record.job_id,
                                    action=action, staleness=staleness))
        self._status.counters[f"late_{action}"] += 1
        if fold:
            await self.rounds.fold_late(delivery, staleness)
        elif result.status == "ok" and (result.update_digest or result.update_shm):
            self._results.never_aggregated()

    def _round_failed(self, round_: int, end: RoundEnd) -> None:
        self._status.counters["rounds_failed"] += 1
        emit(log, events.RoundFailed(self.slot_id, round=round_, reason=end.reason,
                                     more=end.fields))

    async def drop_after_finish(self, delivery: Delivery) -> None:
        """A late result for a slot that has finished all its rounds: dropped and acked."""
        try:
            await self._late(delivery)
        finally:
            await self._results.ack(delivery)
