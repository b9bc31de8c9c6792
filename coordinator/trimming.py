"""Keeps the run's job and result streams short: every few seconds, what every
consumer group has read and acked is trimmed (never unread work: no MAXLEN).

Housekeeping: a trim that fails is logged and tried again next time; it never
stops the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog

from bus import streams
from bus.connection import raise_if_cancelled
from bus.errors import BusError
from bus.keys import JOBS_GROUP, RESULTS_GROUP, Keys

log = structlog.get_logger()

TRIM_EVERY_S = 10.0


class StreamTrimmer:
    """Trims the live clients' job streams and every slot's results stream."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, slots: int,
                 live_clients: Callable[[], set[str]]) -> None:
        self._redis = redis
        self._keys = keys
        self._slots = slots
        self._live_clients = live_clients

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            raise_if_cancelled()
            await self.trim()

    async def trim(self) -> None:
        targets = [(self._keys.jobs(c), JOBS_GROUP) for c in sorted(self._live_clients())]
        targets += [(self._keys.results(s), RESULTS_GROUP) for s in range(self._slots)]
        for stream, group in targets:
            try:
                await streams.trim(self._redis, stream, [group])
            except BusError as exc:
                log.warning("stream_trim_failed", stream=stream, error=str(exc))
