"""Client registry, heartbeats and the active-run pointer. STUB: signatures fixed."""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from bus.keys import Keys
from serialization import Registration

DEFAULT_HEARTBEAT_TTL_MS = 5000


class Registry:
    """Which agent hosts which client, and which clients are alive."""

    def __init__(self, r: aioredis.Redis, keys: Keys, *,
                 ttl_ms: int = DEFAULT_HEARTBEAT_TTL_MS) -> None:
        raise NotImplementedError

    async def register(self, registration: Registration) -> None:
        """Record the agent's clients, mark them alive, announce on the registrations stream."""
        raise NotImplementedError

    async def unregister(self, registration: Registration) -> None:
        """Clean shutdown: clients are no longer alive; announce it."""
        raise NotImplementedError

    async def heartbeat(self, client_ids: Iterable[str]) -> None:
        """Refresh the clients' alive keys (one pipeline)."""
        raise NotImplementedError

    async def alive(self, client_ids: Iterable[str]) -> set[str]:
        """Which of these clients have a live heartbeat (one pipeline)."""
        raise NotImplementedError

    async def clients(self) -> dict[str, Registration]:
        """Every registered client and its agent's registration."""
        raise NotImplementedError


async def set_active_run(r: aioredis.Redis, run_id: str, namespace: str = "pwfl") -> None:
    raise NotImplementedError


async def get_active_run(r: aioredis.Redis, namespace: str = "pwfl") -> str | None:
    raise NotImplementedError
