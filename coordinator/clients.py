"""Tracks which clients are registered and alive, and feeds the pool.

Polls the registry (one HGETALL and one pipelined liveness check per period):
new live clients join the pool, clients whose heartbeat expired leave it, and
their outstanding jobs are answered as failed so the slot's quorum goes on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from bus import streams
from bus.connection import raise_if_cancelled
from bus.errors import BusError
from bus.keys import JOBS_GROUP, RESULTS_GROUP
from bus.registry import Registry
from coordinator.context import RunContext
from coordinator.delivery import Delivery
from serialization import Result

log = structlog.get_logger()

POLL_S = 0.25
TRIM_EVERY_S = 10.0


class ClientTracker:
    def __init__(self, ctx: RunContext, registry: Registry) -> None:
        self._ctx = ctx
        self._registry = registry
        self._live: set[str] = set()
        self.live_changed = asyncio.Event()

    @property
    def live(self) -> set[str]:
        return set(self._live)

    async def run(self) -> None:
        since_trim = 0.0
        while True:
            raise_if_cancelled()
            await self.poll()
            await asyncio.sleep(POLL_S)
            since_trim += POLL_S
            if since_trim >= TRIM_EVERY_S:
                since_trim = 0.0
                await self._trim()

    async def poll(self) -> None:
        registrations = await self._registry.clients()
        handoff = self._ctx.handoff
        if handoff is not None:
            self._ctx.local_clients = frozenset(
                c for c, r in registrations.items() if r.handoff == handoff.advert.name)
        alive = await self._registry.alive(registrations)
        for client_id in sorted(alive - self._live):
            self._joined(client_id, registrations[client_id])
        for client_id in sorted(self._live - alive):
            reason = "heartbeat_expired" if client_id in registrations else "unregistered"
            self._lost(client_id, reason)

    async def wait_for(self, count: int) -> None:
        """Return once at least `count` clients are alive."""
        while len(self._live) < count:
            self.live_changed.clear()
            await self.live_changed.wait()

    def _joined(self, client_id: str, registration: Any) -> None:
        self._live.add(client_id)
        self._ctx.status.clients[client_id] = {
            "agent_id": registration.agent_id, "hostname": registration.hostname, "alive": True}
        self._ctx.broker.add_client(client_id)
        declared = self._ctx.validator.claims.declare(client_id, registration)
        log.info("client_registered", client_id=client_id, agent_id=registration.agent_id,
                 hostname=registration.hostname, declared_examples=declared)
        self.live_changed.set()

    def _lost(self, client_id: str, reason: str) -> None:
        ctx = self._ctx
        self._live.discard(client_id)
        info = ctx.status.clients.setdefault(client_id, {})
        info["alive"] = False
        log.warning("client_lost", client_id=client_id, agent_id=info.get("agent_id"),
                    reason=reason)
        slot_id = ctx.broker.remove_client(client_id)
        for record in ctx.jobs.of_client(client_id):
            ctx.jobs.answer(record.job_id, lost=True)
            log.info("lease_returned", slot_id=slot_id, round=record.round, client_id=client_id,
                     reason="lost")
            failed = Result(job_id=record.job_id, run_id=ctx.settings.run_id,
                            slot_id=record.slot_id, round=record.round, client_id=client_id,
                            status="failed", error=f"client lost ({reason})")
            ctx.inboxes.post_failure(Delivery(record, failed))
        self.live_changed.set()

    async def _trim(self) -> None:
        """Keep streams short: drop what every group has read and acked.

        Housekeeping: a trim that fails is logged and tried again next time; it never
        stops the tracker (and with it the run).
        """
        ctx = self._ctx
        targets = [(ctx.keys.jobs(c), JOBS_GROUP) for c in sorted(self._live)]
        targets += [(ctx.keys.results(s), RESULTS_GROUP) for s in range(ctx.settings.slots)]
        for stream, group in targets:
            try:
                await streams.trim(ctx.redis, stream, [group])
            except BusError as exc:
                log.warning("stream_trim_failed", stream=stream, error=str(exc))
