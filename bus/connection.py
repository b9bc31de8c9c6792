"""Connecting to Redis: one place for URLs, credentials, retries and error mapping.

STUB: signatures fixed; implementation pending.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis. `url` is redis://, rediss:// or unix://."""

    url: str
    username: str | None = None
    password: str | None = None  # read from a file or the environment by the entry point
    socket_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    retries: int = 20
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


def connect(settings: RedisSettings | str) -> aioredis.Redis:
    """An asyncio client (bytes replies) that reconnects with exponential backoff."""
    raise NotImplementedError


async def wait_ready(client: aioredis.Redis, timeout_s: float = 10.0) -> None:
    """Return once PING answers; raise RedisUnavailable after `timeout_s`."""
    raise NotImplementedError
