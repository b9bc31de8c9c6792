"""Tracks which clients are registered and alive, and feeds the pool.

Polls the registry (one HGETALL and one pipelined liveness check per period):
new live clients join the pool, clients whose heartbeat expired leave it, and
their outstanding jobs are answered as failed (`Slots.client_lost`) so the
slot's quorum goes on. It also knows which clients share this host (their agents
proved the local handoff's token), which decides where their models go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog

from bus.connection import raise_if_cancelled
from bus.registry import Registry
from coordinator.leases import LeaseBroker
from coordinator.slots.registry import Slots
from coordinator.status import RunStatus

log = structlog.get_logger()

POLL_S = 0.25


class ClientTracker:
    def __init__(self, registry: Registry, *, leases: LeaseBroker, slots: Slots,
                 status: RunStatus, handoff_name: str | None = None) -> None:
        self._registry = registry
        self._leases = leases
        self._slots = slots
        self._status = status
        self._handoff_name = handoff_name  # None: this run offers no local handoff
        self._live: set[str] = set()
        self._local: frozenset[str] = frozenset()
        self.live_changed = asyncio.Event()

    @property
    def live(self) -> set[str]:
        return set(self._live)

    def all_local(self, clients: Sequence[str]) -> bool:
        """Whether every one of `clients` takes its models from shared memory."""
        return self._handoff_name is not None and set(clients) <= self._local

    async def run(self) -> None:
        while True:
            raise_if_cancelled()
            await self.poll()
            await asyncio.sleep(POLL_S)

    async def poll(self) -> None:
        registrations = await self._registry.clients()
        if self._handoff_name is not None:
            self._local = frozenset(c for c, r in registrations.items()
                                    if r.handoff == self._handoff_name)
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
        self._status.clients[client_id] = {
            "agent_id": registration.agent_id, "hostname": registration.hostname, "alive": True}
        self._leases.add_client(client_id)
        log.info("client_registered", client_id=client_id, agent_id=registration.agent_id,
                 hostname=registration.hostname)
        self.live_changed.set()

    def _lost(self, client_id: str, reason: str) -> None:
        self._live.discard(client_id)
        info = self._status.clients.setdefault(client_id, {})
        info["alive"] = False
        log.warning("client_lost", client_id=client_id, agent_id=info.get("agent_id"),
                    reason=reason)
        self._slots.client_lost(client_id, self._leases.remove_client(client_id), reason)
        self.live_changed.set()
