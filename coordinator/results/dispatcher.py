"""Reads every slot's results stream and routes each result to its slot.

The dispatcher decodes the small result message, answers the job (at most once,
whatever redelivery happens), returns the client's lease at once so another
slot can take the client, and hands the result to the slot's inbox. Anything
malformed, unknown, replayed, mismatched or (with signing on) not signed with
its client's key is rejected (`ResultValidator.admit` decides), logged, counted
and acked; the dispatcher keeps serving.
"""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis
import structlog

from bus import streams
from bus.connection import raise_if_cancelled
from bus.keys import RESULTS_GROUP, Keys
from coordinator.delivery import Delivery
from coordinator.results.sink import ResultSink
from coordinator.results.validation import ResultValidator, UpdateRejected

log = structlog.get_logger()

CONSUMER = "coordinator"
RECLAIM_IDLE_MS = 0  # at start-up: every pending entry is ours (one coordinator per run)
MAX_DELIVERIES = 5


class LeaseReleaser(Protocol):
    def release(self, client_id: str, slot_id: int, round_: int, reason: str) -> object: ...


class Router(Protocol):
    """Hands a delivery to its slot (`coordinator.slots.registry.Slots`)."""

    async def route(self, delivery: Delivery) -> None: ...


class ResultDispatcher:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, slots: int,
                 validator: ResultValidator, results: ResultSink, leases: LeaseReleaser,
                 slots_router: Router) -> None:
        self._redis = redis
        self._keys = keys
        self._validator = validator
        self._results = results
        self._leases = leases
        self._router = slots_router
        self._streams = [keys.results(slot_id) for slot_id in range(slots)]

    async def run(self) -> None:
        r = self._redis
        for stream in self._streams:
            await streams.ensure_group(r, stream, RESULTS_GROUP)
        for stream in self._streams:  # what a previous coordinator read but never acked
            for entry in await streams.reclaim(
                r, stream, RESULTS_GROUP, CONSUMER, min_idle_ms=RECLAIM_IDLE_MS,
                max_deliveries=MAX_DELIVERIES, dead_letter=self._keys.dead_letter(stream),
            ):
                await self.route(entry)
        while True:
            raise_if_cancelled()
            for entry in await streams.consume(r, self._streams, RESULTS_GROUP, CONSUMER,
                                               count=256, block_ms=1000):
                await self.route(entry)

    async def route(self, entry: streams.Entry) -> None:
        try:
            delivery = self._validator.admit(entry)
        except UpdateRejected as exc:
            self._results.reject(None, exc.reason, exc.detail, **exc.fields)
            await streams.ack(self._redis, entry.stream, RESULTS_GROUP, [entry.entry_id])
            return
        record, result = delivery.record, delivery.result
        log.info("update_received", slot_id=record.slot_id, round=record.round,
                 client_id=record.client_id, job_id=record.job_id, agent_id=result.agent_id,
                 status=result.status, nbytes=result.update_nbytes,
                 num_examples=result.num_examples, timings=result.timings,
                 metrics=result.metrics, error=result.error or None)
        if not delivery.recovered:  # a lost client's lease went back when it was lost
            reason = "result" if result.status == "ok" else "failed"
            self._leases.release(record.client_id, record.slot_id, record.round, reason)
        await self._router.route(delivery)
