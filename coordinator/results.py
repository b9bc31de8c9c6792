"""Reads every slot's results stream and routes each result to its slot.

The dispatcher decodes the small result message, answers the job (at most once,
whatever redelivery happens), returns the client's lease at once so another
slot can take the client, and hands the result to the slot's inbox. Anything
malformed, unknown, replayed, mismatched or (with signing on) not signed with
its client's key is rejected, logged, counted and acked; the dispatcher keeps
serving.
"""

from __future__ import annotations

import structlog

from bus import streams
from bus.connection import raise_if_cancelled
from bus.keys import RESULTS_GROUP
from coordinator.context import Delivery, RunContext
from coordinator.job_table import JobRecord
from serialization import PayloadError, Result
from serialization.signing import signature_problem

log = structlog.get_logger()

CONSUMER = "coordinator"
RECLAIM_IDLE_MS = 0  # at start-up: every pending entry is ours (one coordinator per run)
MAX_DELIVERIES = 5


class ResultDispatcher:
    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._streams = [ctx.keys.results(slot_id) for slot_id in range(ctx.settings.slots)]

    async def run(self) -> None:
        r = self._ctx.redis
        for stream in self._streams:
            await streams.ensure_group(r, stream, RESULTS_GROUP)
        for stream in self._streams:  # what a previous coordinator read but never acked
            for entry in await streams.reclaim(
                r, stream, RESULTS_GROUP, CONSUMER, min_idle_ms=RECLAIM_IDLE_MS,
                max_deliveries=MAX_DELIVERIES, dead_letter=self._ctx.keys.dead_letter(stream),
            ):
                await self.route(entry)
        while True:
            raise_if_cancelled()
            for entry in await streams.consume(r, self._streams, RESULTS_GROUP, CONSUMER,
                                               count=256, block_ms=1000):
                await self.route(entry)

    async def route(self, entry: streams.Entry) -> None:
        delivery = self._accept(entry)
        if delivery is None:
            await streams.ack(self._ctx.redis, entry.stream, RESULTS_GROUP, [entry.entry_id])
            return
        record, result = delivery.record, delivery.result
        log.info("update_received", slot_id=record.slot_id, round=record.round,
                 client_id=record.client_id, job_id=record.job_id, agent_id=result.agent_id,
                 status=result.status, nbytes=result.update_nbytes,
                 num_examples=result.num_examples, timings=result.timings,
                 metrics=result.metrics, error=result.error or None)
        if not delivery.recovered:  # a lost client's lease went back when it was lost
            reason = "result" if result.status == "ok" else "failed"
            self._ctx.broker.release(record.client_id, record.slot_id, record.round, reason)
        runner = self._ctx.runners[record.slot_id]
        if runner.finished:
            await runner.drop_after_finish(delivery)
        else:
            runner.deliver(delivery)

    def _accept(self, entry: streams.Entry) -> Delivery | None:
        ctx = self._ctx
        try:
            result = Result.from_bytes(entry.payload)
        except PayloadError as exc:
            ctx.reject(None, exc.reason, exc.detail, stream=entry.stream, entry_id=entry.entry_id)
            return None
        record, recovered = self._job_of(result)
        if record is None:
            return None
        same = (record.client_id, record.slot_id, record.round) == (
            result.client_id, result.slot_id, result.round)
        if not same or entry.stream != ctx.keys.results(record.slot_id):
            ctx.reject(None, "mismatch", "result does not match its job", job_id=result.job_id,
                       client_id=result.client_id)
            return None
        if not self._signed_by_client(result, record):
            return None
        if recovered:
            ctx.jobs.recover(result.job_id)
        else:
            ctx.jobs.answer(result.job_id)
        return Delivery(record, result, entry.stream, entry.entry_id, recovered=recovered)

    def _job_of(self, result: Result) -> tuple[JobRecord | None, bool]:
        """The result's outstanding job, or its job answered as lost (True); else rejected."""
        ctx = self._ctx
        if result.run_id == ctx.settings.run_id:
            record = ctx.jobs.get(result.job_id)
            if record is not None:
                return record, False
            record = ctx.jobs.lost(result.job_id)
            if record is not None:
                return record, True
            if ctx.jobs.was_answered(result.job_id):
                ctx.reject(None, "duplicate", "job already answered", job_id=result.job_id)
                return None, False
        if result.client_id not in ctx.status.clients:
            ctx.reject(None, "unknown_client", "no such client in this run",
                       job_id=result.job_id, client_id=result.client_id)
        else:
            ctx.reject(None, "unknown_job", "no such job in this run", job_id=result.job_id,
                       client_id=result.client_id)
        return None, False

    def _signed_by_client(self, result: Result, record: JobRecord) -> bool:
        """With signing on: the result carries the signature of its job's client (else rejected).

        Checked before the job counts as answered, so a forged result cannot use up
        the job: the client's own result is still accepted when it comes.
        """
        keyring = self._ctx.keyring
        if keyring is None:
            return True
        problem = signature_problem(result, keyring.get(record.client_id))
        if problem is not None:
            self._ctx.reject(None, "bad_signature", problem, job_id=result.job_id,
                             client_id=record.client_id, agent_id=result.agent_id)
        return problem is None
