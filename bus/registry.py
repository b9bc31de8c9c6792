"""Client registry, heartbeats and the active-run pointer.

An agent records the clients it hosts in the run's ``clients`` hash, announces
itself on the ``registrations`` stream (which the coordinator consumes) and
keeps one ``alive:{client}`` key per client alive with a TTL: a client whose
agent stops beating disappears from `Registry.alive` when the key expires.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
import structlog

from bus.connection import as_bytes, as_text, redis_errors
from bus.keys import DEFAULT_NAMESPACE, Keys
from bus.streams import FIELD
from serialization import PayloadError, Registration

DEFAULT_HEARTBEAT_TTL_MS = 5000
MAX_REPORTED = 10_000
# The registrations stream is an announcement log nobody consumes in a group (the
# coordinator polls the clients hash), so a length cap is safe and keeps it bounded.
REGISTRATIONS_MAXLEN = 1000

log = structlog.get_logger(__name__)


class Registry:
    """Which agent hosts which client, and which clients are alive."""

    def __init__(self, r: aioredis.Redis, keys: Keys, *,
                 ttl_ms: int = DEFAULT_HEARTBEAT_TTL_MS,
                 on_undecodable: Callable[[str, PayloadError], None] | None = None) -> None:
        self._r = r
        self._keys = keys
        self._ttl_ms = ttl_ms
        self._on_undecodable = on_undecodable
        self._reported: set[tuple[str, bytes]] = set()  # undecodable entries already logged

    async def register(self, registration: Registration) -> None:
        """Record the agent's clients, mark them alive, announce on the registrations stream."""
        raw = registration.to_bytes()
        with redis_errors():
            async with self._r.pipeline(transaction=True) as pipe:
                if registration.client_ids:
                    pipe.hset(self._keys.clients(),
                              mapping=dict.fromkeys(registration.client_ids, raw))
                for client_id in registration.client_ids:
                    pipe.set(self._keys.alive(client_id), b"1", px=self._ttl_ms)
                pipe.xadd(self._keys.registrations(), {FIELD: raw},
                          maxlen=REGISTRATIONS_MAXLEN, approximate=True)
                await pipe.execute()

    async def unregister(self, registration: Registration) -> None:
        """Clean shutdown: clients are no longer alive; announce it."""
        farewell = dataclasses.replace(registration, event="unregister")
        with redis_errors():
            async with self._r.pipeline(transaction=True) as pipe:
                if registration.client_ids:
                    pipe.unlink(*(self._keys.alive(c) for c in registration.client_ids))
                pipe.xadd(self._keys.registrations(), {FIELD: farewell.to_bytes()},
                          maxlen=REGISTRATIONS_MAXLEN, approximate=True)
                await pipe.execute()

    async def heartbeat(self, client_ids: Iterable[str]) -> None:
        """Refresh the clients' alive keys (one pipeline)."""
        with redis_errors():
            async with self._r.pipeline(transaction=False) as pipe:
                for client_id in client_ids:
                    pipe.set(self._keys.alive(client_id), b"1", px=self._ttl_ms)
                await pipe.execute()

    async def alive(self, client_ids: Iterable[str]) -> set[str]:
        """Which of these clients have a live heartbeat (one MGET)."""
        ids = list(client_ids)
        if not ids:
            return set()
        with redis_errors():
            values = await self._r.mget([self._keys.alive(c) for c in ids])
        return {c for c, v in zip(ids, values, strict=True) if v is not None}

    async def clients(self) -> dict[str, Registration]:
        """Every registered client and its agent's registration (undecodable ones are logged)."""
        with redis_errors():
            raw = await self._r.hgetall(self._keys.clients())
        out: dict[str, Registration] = {}
        for key, value in raw.items():
            client_id = key.decode(errors="replace") if isinstance(key, bytes) else key
            try:
                out[client_id] = Registration.from_bytes(as_bytes(value))
            except PayloadError as exc:
                self._undecodable(client_id, as_bytes(value), exc)
        return out

    def _undecodable(self, client_id: str, value: bytes, exc: PayloadError) -> None:
        """Log (and report) a bad entry once, not on every poll while it stays there."""
        seen = (client_id, hashlib.sha256(value).digest())
        if seen in self._reported:
            return
        if len(self._reported) >= MAX_REPORTED:
            self._reported.clear()
        self._reported.add(seen)
        log.warning("registration_undecodable", client_id=client_id[:200], reason=exc.reason,
                    detail=exc.detail)
        if self._on_undecodable is not None:
            self._on_undecodable(client_id, exc)


async def set_active_run(r: aioredis.Redis, run_id: str,
                         namespace: str = DEFAULT_NAMESPACE) -> None:
    """Point long-lived agents at `run_id`."""
    with redis_errors():
        await r.set(Keys.active_run(namespace), run_id.encode())


async def get_active_run(r: aioredis.Redis, namespace: str = DEFAULT_NAMESPACE) -> str | None:
    """The run agents should serve, or None when none is set."""
    with redis_errors():
        value = await r.get(Keys.active_run(namespace))
    return None if value is None else as_text(value)
