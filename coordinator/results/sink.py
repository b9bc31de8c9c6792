"""Where every handled result ends: acked, its shared memory released, and rejections
reported, each in one place and one way.

A slot hands each delivery here once it has done with it (`handled`), whether it
was folded, rejected, late or dropped: the sink unlinks a handed-over update's
segment at once and acks the stream entries together (`flush`, one XACK per
stream, shielded so a cancelled slot still acks what it handled). Every rejection,
of a result message, an update or a gradient, is `reject`ed: one
``update_rejected`` event and one count in the run's status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog

from bus import streams
from bus.keys import RESULTS_GROUP
from coordinator.delivery import Delivery
from coordinator.status import RunStatus

log = structlog.get_logger()

LOGGED_CHARS = 200  # claimed ids come from untrusted messages (up to 1 MiB): a prefix is logged


class UpdateSegments(Protocol):
    """The local handoff's side that releases handed-over updates (`bus.handoff`)."""

    def discard_update(self, name: str) -> None: ...


class ResultSink:
    """Acks handled results, releases their segments, and reports rejections."""

    def __init__(self, redis: aioredis.Redis, status: RunStatus,
                 segments: UpdateSegments | None = None) -> None:
        self._redis = redis
        self._status = status
        self._segments = segments
        self._unacked: list[Delivery] = []

    def handled(self, delivery: Delivery) -> None:
        """`delivery` is done with: its segment goes now, its ack with the next `flush`."""
        if self._segments is not None and delivery.result.update_shm:
            self._segments.discard_update(delivery.result.update_shm)
        self._unacked.append(delivery)

    async def flush(self) -> None:
        """Ack every handled delivery, one XACK per stream (shielded from cancellation)."""
        unacked, self._unacked = self._unacked, []
        await ack_entries(self._redis, unacked)

    async def ack(self, delivery: Delivery) -> None:
        """`handled`, then acked at once."""
        self.handled(delivery)
        await self.flush()

    def reject(self, delivery: Delivery | None, reason: str, detail: str, **fields: Any) -> None:
        """Log (``update_rejected``) and count a rejection; the process goes on serving."""
        self._status.reject(reason)
        fields = {k: v[:LOGGED_CHARS] if isinstance(v, str) else v for k, v in fields.items()}
        if delivery is not None:
            record = delivery.record
            fields |= {"slot_id": record.slot_id, "round": record.round,
                       "client_id": record.client_id, "job_id": record.job_id}
        log.warning("update_rejected", reason=reason, detail=detail, **fields)

    def never_aggregated(self) -> None:
        """An update dropped because its round closed; ``update_late`` says which."""
        self._status.reject("closed_round")


async def ack_entries(redis: aioredis.Redis, deliveries: Sequence[Delivery]) -> None:
    """Ack the stream entries of `deliveries`, one XACK per stream, shielded."""
    by_stream: dict[str, list[str]] = {}
    for delivery in deliveries:
        if delivery.stream is not None and delivery.entry_id is not None:
            by_stream.setdefault(delivery.stream, []).append(delivery.entry_id)
    for stream, entry_ids in by_stream.items():
        await asyncio.shield(streams.ack(redis, stream, RESULTS_GROUP, entry_ids))
